package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type backupNowOptions struct {
	output string
}

func newBackupNowCommand(g *globalOptions) *cobra.Command {
	opts := &backupNowOptions{}
	cmd := &cobra.Command{
		Use:   "backup-now",
		Short: "Take a Raft snapshot now, verify it, store it, apply retention",
		Long: `Finds the active Vault node, renews the snapshot token, streams the Raft snapshot into a
temporary file in the snapshot directory while verifying it (gzip to the end, exactly the
four archive members, SHA256SUMS), fsyncs it, writes a manifest beside it and renames both
into place. Only then retention runs. Prints the stored path. A stream that moves no byte
for snapshots.idle_timeout is abandoned; there is no total timeout.

Changes: the snapshot directory. Safe to re-run (waits for a backup in progress).
Exit 1 when nothing was stored.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runBackupNow(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runBackupNow(ctx context.Context, opts *backupNowOptions, env *agent.Env, g *globalOptions) error {
	var bo agent.BackupOptions
	if f, ok := g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		bo.Progress = func(w io.Writer) io.Writer { return newProgress(w, g.stderr) }
	}
	rep, err := agent.BackupNow(ctx, env, bo)
	if bo.Progress != nil {
		fmt.Fprintln(g.stderr)
	}
	if err != nil {
		err = fmt.Errorf("backup-now: %w", err)
	}
	if rep == nil {
		return err
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		fmt.Fprintln(w, rep.Snapshot.Path)
		for _, d := range rep.Pruned {
			fmt.Fprintf(g.stderr, "pruned %s (%s)\n", d.Entry.Path, strings.Join(d.Reasons, "; "))
		}
		if t := rep.Token; t != nil && t.Warning != "" {
			fmt.Fprintf(g.stderr, "warning: %s\n", t.Warning)
		}
	}, err)
}
