package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type snapshotsImportOptions struct {
	output string
}

func newSnapshotsImportCommand(g *globalOptions) *cobra.Command {
	opts := &snapshotsImportOptions{}
	cmd := &cobra.Command{
		Use:   "import FILE...",
		Short: "Bring snapshots saved by hand (vault operator raft snapshot save) into the snapshot directory",
		Long: `Copies each file into the snapshot directory after verifying it as a backup is verified
(the archive whole, its checksums, its Raft metadata), named by the file's modification
time so it sorts among the agent's own, with a manifest marking it imported. The
originals are not touched; a file whose bytes are stored already is not stored twice.

An imported snapshot carries no keyset: run "pve-vault-agent drill --snapshot PATH" on
it, and when the keyfile's shares open it the drill pairs it with their keyset. Only then
do restore and recover take it, and only then is it pushed to off-host targets.
Retention applies to imported snapshots as to the agent's.
Changes: the snapshot directory.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, files []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			res, err := agent.ImportSnapshots(cmd.Context(), env, files)
			return printImport(cmd.Context(), g, opts, res, err)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func printImport(_ context.Context, g *globalOptions, opts *snapshotsImportOptions, res []agent.ImportResult, err error) error {
	if res == nil {
		res = []agent.ImportResult{}
	}
	return report(g, opts.output, res, func(w io.Writer) {
		for _, r := range res {
			switch {
			case r.Error != "":
				fmt.Fprintf(w, "FAIL %s: %s\n", r.File, r.Error)
			case r.Again:
				fmt.Fprintf(w, "had  %s: stored already as %s\n", r.File, r.Stored)
			default:
				fmt.Fprintf(w, "ok   %s -> %s (raft index %d; drill it to pair it with the keyfile)\n", r.File, r.Stored, r.Index)
			}
		}
	}, err)
}
