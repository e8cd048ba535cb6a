package agent

import (
	"context"
	"fmt"
	"time"
)

// step is one named step of a flow over its state S. It checks state before acting and
// returns a one-line result. run is usually a method expression of the state type
// ((*recoverState).restore), so the table reads as the flow.
type step[S any] struct {
	// name is stable: logs, reports and tests refer to the step by it.
	name string
	// plan is the step's line in the printed plan.
	plan string
	run  func(s *S, ctx context.Context) (string, error)
}

// StepResult is what one step reported.
type StepResult struct {
	Name     string        `json:"name"`
	Result   string        `json:"result,omitempty"`
	Error    string        `json:"error,omitempty"`
	Duration time.Duration `json:"-"`
	Seconds  float64       `json:"seconds"`
}

// PlanStep is a step as the printed plan shows it.
type PlanStep struct {
	Name string `json:"name"`
	Plan string `json:"plan"`
}

func planOf[S any](steps []step[S]) []PlanStep {
	out := make([]PlanStep, len(steps))
	for i, s := range steps {
		out[i] = PlanStep{Name: s.name, Plan: s.plan}
	}
	return out
}

// runSteps runs steps in order over s, appending each result to *results. The first
// failure stops the flow; its error names the flow and the step.
func runSteps[S any](ctx context.Context, env *Env, flow string, steps []step[S], s *S, results *[]StepResult) error {
	log := env.Log
	for _, st := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		t0 := env.Clock.Now()
		log.Info("step started", "flow", flow, "step", st.name)
		res, err := st.run(s, ctx)
		d := env.Clock.Now().Sub(t0)
		r := StepResult{Name: st.name, Result: res, Duration: d, Seconds: d.Seconds()}
		if err != nil {
			r.Error = err.Error()
			*results = append(*results, r)
			log.Warn("step failed", "flow", flow, "step", st.name, "took", d.Round(time.Millisecond), "err", err)
			return fmt.Errorf("%s step %q: %w", flow, st.name, err)
		}
		*results = append(*results, r)
		log.Info("step done", "flow", flow, "step", st.name, "result", res, "took", d.Round(time.Millisecond))
	}
	return nil
}
