package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type snapshotsListOptions struct {
	output string
	target string
}

func newSnapshotsListCommand(g *globalOptions) *cobra.Command {
	opts := &snapshotsListOptions{}
	cmd := &cobra.Command{
		Use: "list", Short: "List stored snapshots, oldest first (changes nothing)", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runSnapshotsList(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	cmd.Flags().StringVar(&opts.target, "target", "", "list the copies on this off-host target (snapshots.targets)")
	return cmd
}

func runSnapshotsList(ctx context.Context, opts *snapshotsListOptions, env *agent.Env, g *globalOptions) error {
	if opts.target != "" {
		cs, err := agent.TargetCopies(ctx, env, opts.target)
		if err != nil {
			return err
		}
		return report(g, opts.output, cs, func(w io.Writer) {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TIME\tSIZE\tCOMPLETE\tCOPY")
			for _, c := range cs {
				fmt.Fprintf(tw, "%s\t%s\t%v\t%s\n", c.Time.Format(time.RFC3339), humanBytes(c.Size), c.Complete, c.Name)
			}
			tw.Flush()
		}, nil)
	}
	_, es, err := agent.Snapshots(ctx, env)
	if err != nil {
		return err
	}
	if es == nil {
		es = []agent.SnapshotEntry{}
	}
	return report(g, opts.output, es, func(w io.Writer) {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TIME\tSIZE\tVERIFIED\tRAFT INDEX\tKEYSET\tFILE")
		for _, e := range es {
			idx, ks := "-", "-"
			if e.Manifest != nil {
				idx, ks = fmt.Sprint(e.Manifest.RaftIndex), e.Manifest.KeysetFingerprint
				if e.Manifest.Unpaired() {
					ks = "imported, not drilled"
				} else if e.Manifest.Imported != nil {
					ks += " (imported)"
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\t%s\n", e.Time.Format(time.RFC3339), humanBytes(e.Size), e.Verified, idx, ks, e.Path)
		}
		tw.Flush()
	}, nil)
}
