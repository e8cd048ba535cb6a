package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

func newNotifyCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "notify", Short: "The daemon's notifications (notify.targets)", Args: noArgs, RunE: showHelp}
	var output string
	test := &cobra.Command{
		Use:   "test",
		Short: "Send a test message to every notify target and say what each did",
		Long: `Sends one test message to each target in notify.targets (mail, webhook, push service), each
bounded by notify.timeout, and prints what each did. Exit 1 when a target did not take it.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(output)
			if err != nil {
				return err
			}
			defer env.Close()
			res, err := agent.NotifyTest(cmd.Context(), env)
			if err != nil {
				err = fmt.Errorf("notify test: %w", err)
			}
			return report(g, output, res, func(w io.Writer) {
				for _, r := range res {
					if r.OK {
						fmt.Fprintf(w, "%s: sent (%.2f s)\n", r.Target, r.Seconds)
					} else {
						fmt.Fprintf(w, "%s: FAILED after %.2f s: %s\n", r.Target, r.Seconds, r.Error)
					}
				}
			}, err)
		},
	}
	test.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	cmd.AddCommand(test)
	return cmd
}
