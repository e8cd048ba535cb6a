package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

// writeJSON prints v as indented JSON on stdout.
func writeJSON(g *globalOptions, v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("write the result: %w", err)
	}
	return nil
}

// report prints a verb's result: JSON with -o json, else text through printText. A
// failure to write the result joins the verb's own error.
func report(g *globalOptions, output string, v any, printText func(w io.Writer), verbErr error) error {
	var werr error
	if output == "json" {
		werr = writeJSON(g, v)
	} else if printText != nil {
		printText(g.stdout)
	}
	return errors.Join(verbErr, werr)
}

// printSteps prints a flow's steps as a table.
func printSteps(w io.Writer, steps []agent.StepResult) {
	if len(steps) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tTIME\tRESULT")
	for _, s := range steps {
		res := s.Result
		if s.Error != "" {
			res = "FAILED: " + firstLineOf(s.Error)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Name, s.Duration.Round(time.Millisecond), res)
	}
	tw.Flush()
}

// printPlan prints a flow's plan on stderr.
func printPlan(w io.Writer, title string, plan []agent.PlanStep) {
	fmt.Fprintln(w, title)
	for i, s := range plan {
		fmt.Fprintf(w, "  %d. %-12s %s\n", i+1, s.Name, s.Plan)
	}
}

// confirm asks on a terminal (or the reader a test handed in); without one, --yes is
// required.
func confirm(g *globalOptions, yes bool, question string) error {
	if yes {
		return nil
	}
	if !g.interactive() {
		return usageErrorf("%s: not a terminal to ask on; pass --yes to proceed", question)
	}
	fmt.Fprintf(g.stderr, "%s [y/N] ", question)
	answer, _ := bufio.NewReader(g.stdin).ReadString('\n')
	if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
		return errors.New("cancelled: nothing changed")
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func firstLineOf(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// progress writes a "bytes, rate" line to a terminal while a snapshot streams.
type progress struct {
	w     io.Writer
	out   io.Writer
	start time.Time
	mu    sync.Mutex
	n     int64
	last  time.Time
}

func newProgress(w, out io.Writer) io.Writer { return &progress{w: w, out: out, start: time.Now()} }

func (p *progress) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n += int64(n)
	if now := time.Now(); now.Sub(p.last) > 200*time.Millisecond {
		p.last = now
		rate := float64(p.n) / max(now.Sub(p.start).Seconds(), 0.001)
		fmt.Fprintf(p.out, "\r%s  %s/s   ", humanBytes(p.n), humanBytes(int64(rate)))
	}
	return n, err
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
