package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type recoverOptions struct {
	snapshot string
	latest   bool
	dryRun   bool
	yes      bool
	output   string
}

func newRecoverCommand(g *globalOptions) *cobra.Command {
	opts := &recoverOptions{}
	cmd := &cobra.Command{
		Use:   "recover [--snapshot FILE | --latest]",
		Short: "After a node rebuild: provision, install, restore the snapshot, unseal (resumable)",
		Long: `Brings Vault back from a snapshot after its data was lost. Checks the snapshot offline and
that the keyfile holds its keys (refused before anything changes otherwise), then
provisions, installs, opens the first pod (a throwaway init when its data is gone),
restores the snapshot with the throwaway's own root token, waits until it is applied,
unseals with the snapshot's keys, joins the other pods (wiping a node Vault removed from
the cluster first), replaces agent tokens the snapshot brought back expired, and
verifies. Each step checks state first: re-run it after any failure or interruption and it
continues. Prints its plan first; asks before changing anything unless --yes. --dry-run
stops after the checks.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.snapshot != "" && opts.latest {
				return usageErrorf("--snapshot and --latest exclude each other")
			}
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runRecover(cmd.Context(), opts, env, g)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.snapshot, "snapshot", "", "snapshot file to restore (default: the newest verified one)")
	f.BoolVar(&opts.latest, "latest", false, "restore the newest verified snapshot (the default)")
	f.BoolVar(&opts.dryRun, "dry-run", false, "check the snapshot and keys, print the plan, change nothing")
	f.BoolVar(&opts.yes, "yes", false, "do not ask")
	f.StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runRecover(ctx context.Context, opts *recoverOptions, env *agent.Env, g *globalOptions) error {
	printPlan(g.stderr, "recover plan:", agent.RecoverPlan())
	if !opts.dryRun {
		if err := confirm(g, opts.yes, "restore Vault from a snapshot, replacing whatever the first pod holds?"); err != nil {
			return err
		}
		unlock, err := env.Lock("recover")
		if err != nil {
			return err
		}
		defer unlock()
	}
	rep, err := agent.Recover(ctx, env, agent.RecoverOptions{Snapshot: opts.snapshot, DryRun: opts.dryRun})
	if err != nil && !agent.Refused(err) {
		err = withRerun(err)
	}
	return report(g, opts.output, rep, func(w io.Writer) { printSteps(w, rep.Steps) }, err)
}

// withRerun reminds that recover resumes.
func withRerun(err error) error {
	return fmt.Errorf("recover: %w (re-run recover to continue)", err)
}
