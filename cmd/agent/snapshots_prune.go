package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type snapshotsPruneOptions struct {
	dryRun bool
	output string
}

func newSnapshotsPruneCommand(g *globalOptions) *cobra.Command {
	opts := &snapshotsPruneOptions{}
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Apply the retention policy (snapshots.retention); --dry-run shows what would go and why",
		Long: `Plans retention over the snapshot directory (keep_last plus the newest of each hour, day,
week and month for that many periods; never the newest verified snapshot; never an
unverified one) and removes what it drops. Serialised with backups by the directory lock.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runSnapshotsPrune(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().BoolVar(&opts.dryRun, "dry-run", false, "show what would be removed and why; remove nothing")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runSnapshotsPrune(ctx context.Context, opts *snapshotsPruneOptions, env *agent.Env, g *globalOptions) error {
	dropped, err := agent.PruneSnapshots(ctx, env, opts.dryRun)
	if dropped == nil {
		dropped = []agent.SnapshotDecision{}
	}
	return report(g, opts.output, dropped, func(w io.Writer) {
		verb := "removed"
		if opts.dryRun {
			verb = "would remove"
		}
		for _, d := range dropped {
			fmt.Fprintf(w, "%s %s (%s)\n", verb, d.Entry.Path, strings.Join(d.Reasons, "; "))
		}
		if len(dropped) == 0 {
			fmt.Fprintln(w, "nothing to prune")
		}
	}, err)
}
