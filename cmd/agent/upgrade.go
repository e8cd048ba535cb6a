package main

import (
	"github.com/spf13/cobra"
)

func newUpgradeCommand(g *globalOptions) *cobra.Command {
	opts := &installOptions{upgrade: true}
	cmd := &cobra.Command{
		Use:   "upgrade",
		Short: "Roll a chart or image version change the way Vault's docs ask (resumable)",
		Long: `Like install, but refuses when the release does not exist. Steps: take and verify a Raft
snapshot; helm upgrade (the chart's OnDelete strategy restarts nothing); unseal every pod;
roll the standbys one at a time (delete, running, unsealed, rejoined, autopilot healthy
voter); step the active node down and roll it last. A pod not healthy within the wait
stops the roll and the error says what is left; nothing more is deleted. Re-run it after
fixing the cause: pods already on the new revision are left alone.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runInstall(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().BoolVar(&opts.dryRun, "dry-run", false, "render and compare with the deployed release; change nothing")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}
