package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type drillOptions struct {
	snapshot string
	latest   bool
	cleanup  bool
	output   string
}

func newDrillCommand(g *globalOptions) *cobra.Command {
	opts := &drillOptions{}
	cmd := &cobra.Command{
		Use:   "drill [--snapshot FILE | --latest] | drill --cleanup",
		Short: "Prove a snapshot restores: restore it into a throwaway Vault pod and check it",
		Long: `Starts a throwaway Vault pod in the cluster (the release's image, an emptyDir, no chart
labels so nothing of the release selects it, the lowest priority, TLS with a one-off
certificate), initialises it with the keyfile's shares and threshold, restores the
snapshot with snapshot-force, unseals it with the keyfile's shares, and checks that the
Raft index is at least the manifest's and that the canary init wrote reads back equal.
Everything it created is deleted on every path; --cleanup deletes what a killed drill
left. Without --snapshot the newest verified snapshot is drilled.

Changes: nothing of production (pods, volumes, release, keyfile). Records the result in
the state directory (status, metrics) and in the snapshot's manifest.
Exit 0 when the drill passed, 1 when it failed (the report says which check and why).
The restored copy runs for the seconds the checks take: a secrets engine that revokes
expired leases on unseal may reach its backends from the pod; see the README.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.snapshot != "" && opts.latest {
				return usageErrorf("--snapshot and --latest exclude each other")
			}
			if opts.cleanup && (opts.snapshot != "" || opts.latest) {
				return usageErrorf("--cleanup runs no drill: give it alone")
			}
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			if opts.cleanup {
				return runDrillCleanup(cmd.Context(), opts, env, g)
			}
			return runDrill(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().StringVar(&opts.snapshot, "snapshot", "", "drill this snapshot file")
	cmd.Flags().BoolVar(&opts.latest, "latest", false, "drill the newest verified snapshot (the default)")
	cmd.Flags().BoolVar(&opts.cleanup, "cleanup", false, "delete what an interrupted drill left in the cluster, run no drill")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runDrill(ctx context.Context, opts *drillOptions, env *agent.Env, g *globalOptions) error {
	rep, err := agent.Drill(ctx, env, agent.DrillOptions{Snapshot: opts.snapshot})
	if rep == nil {
		return err
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		verdict := "PASSED"
		if !rep.Passed {
			verdict = "FAILED"
		}
		fmt.Fprintf(w, "drill %s in %.1f s\n", verdict, rep.DurationSecs)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "snapshot\t%s\n", rep.Snapshot)
		if rep.Pod != "" {
			fmt.Fprintf(tw, "pod\t%s on %s (%s)\n", rep.Pod, rep.Node, rep.Image)
		}
		for _, c := range rep.Checks {
			mark := "ok"
			if !c.OK {
				mark = "FAIL"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", mark, c.Name, c.Detail)
		}
		fmt.Fprintf(tw, "cleaned\t%d objects\n", len(rep.Cleaned))
		tw.Flush()
		if !rep.Passed {
			fmt.Fprintf(w, "reason: %s\n", rep.Reason)
		}
	}, err)
}

func runDrillCleanup(ctx context.Context, opts *drillOptions, env *agent.Env, g *globalOptions) error {
	gone, err := agent.CleanupDrills(ctx, env)
	if gone == nil {
		gone = []string{}
	}
	return report(g, opts.output, map[string]any{"deleted": gone}, func(w io.Writer) {
		if len(gone) == 0 && err == nil {
			fmt.Fprintln(w, "nothing left by a drill")
		}
		for _, o := range gone {
			fmt.Fprintln(w, "deleted", o)
		}
	}, err)
}
