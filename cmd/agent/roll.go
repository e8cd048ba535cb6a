package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type rollOptions struct {
	output string
}

func newRollCommand(g *globalOptions) *cobra.Command {
	opts := &rollOptions{}
	cmd := &cobra.Command{
		Use:   "roll",
		Short: "Roll the Vault pods a chart change left on the old revision: snapshot first, standbys one at a time, the active node last",
		Long: `The agent's values set the StatefulSet's OnDelete strategy: a chart or values change that
Flux, Argo CD or helm by hand applies restarts no pod. roll replaces the pods still on
the old revision the way install does after its own upgrades: a Raft snapshot taken and
verified first; every pod unsealed and a healthy voter; standbys one at a time, lowest
ordinal first, each unsealed and rejoined before the next; then the active node steps
down and goes last. A pod that does not come back healthy stops the roll: nothing more is
deleted, and roll again rolls what is left. Nothing to roll: nothing is done. Uses the
install account (it deletes pods). Changes: the pods.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			rep, err := agent.RollPods(cmd.Context(), env)
			return report(g, opts.output, rep, func(w io.Writer) {
				switch {
				case rep.Target == "":
				case len(rep.Rolled) == 0 && len(rep.Left) == 0:
					fmt.Fprintf(w, "every pod is on revision %s: nothing to roll\n", rep.Target)
				default:
					if rep.Snapshot != "" {
						fmt.Fprintf(w, "snapshot: %s\n", rep.Snapshot)
					}
					fmt.Fprintf(w, "rolled to %s: %s\n", rep.Target, strings.Join(rep.Rolled, ", "))
					if len(rep.Left) > 0 {
						fmt.Fprintf(w, "left on the old revision: %s\n", strings.Join(rep.Left, ", "))
					}
				}
			}, err)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}
