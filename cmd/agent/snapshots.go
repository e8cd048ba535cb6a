package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

func newBackupNowCommand(g *globalOptions) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "backup-now",
		Short: "Take a Raft snapshot now, verify it, store it, apply retention",
		Long: `Finds the active Vault node, streams its Raft snapshot with the agent's snapshot token
into a temporary file in the snapshot directory while verifying it (gzip to the end,
exactly the four archive members, SHA256SUMS), fsyncs it, writes a manifest beside it
and renames both into place. Only then retention runs. Prints the stored path.

Changes: the snapshot directory. Safe to re-run (waits for a backup in progress).
Exit 1 when nothing was stored.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, cfg, err := g.start(output)
			if err != nil {
				return err
			}
			opts := agent.BackupOptions{Version: version}
			if f, ok := g.stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
				opts.Progress = func(w io.Writer) io.Writer { return newProgress(w, g.stderr) }
			}
			rep, err := agent.BackupNow(cmd.Context(), cfg, opts, log)
			if opts.Progress != nil {
				fmt.Fprintln(g.stderr)
			}
			if rep != nil {
				if output == "json" {
					writeJSON(g, rep)
				} else {
					fmt.Fprintln(g.stdout, rep.Snapshot.Path)
					for _, d := range rep.Pruned {
						fmt.Fprintf(g.stderr, "pruned %s (%s)\n", d.Entry.Path, strings.Join(d.Reasons, "; "))
					}
				}
			}
			if err != nil {
				return fmt.Errorf("backup-now: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func newSnapshotsCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "snapshots", Short: "Inspect and maintain the snapshot directory", Args: noArgs, RunE: showHelp}
	var listOut string
	list := &cobra.Command{
		Use: "list", Short: "List stored snapshots, oldest first (changes nothing)", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, cfg, err := g.start(listOut)
			if err != nil {
				return err
			}
			_, es, err := agent.Snapshots(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			if listOut == "json" {
				if es == nil {
					es = []snapshot.Entry{}
				}
				writeJSON(g, es)
				return nil
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TIME\tSIZE\tVERIFIED\tRAFT INDEX\tKEYSET\tFILE")
			for _, e := range es {
				idx, ks := "-", "-"
				if e.Manifest != nil {
					idx, ks = fmt.Sprint(e.Manifest.RaftIndex), e.Manifest.KeysetFingerprint
				}
				fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\t%s\n", e.Time.Format(time.RFC3339), humanBytes(e.Size), e.Verified, idx, ks, e.Path)
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVarP(&listOut, "output", "o", "text", "output format: text or json")

	verify := &cobra.Command{
		Use: "verify [FILE...]", Short: "Verify snapshots offline: all stored ones, or the files given (changes nothing)",
		RunE: func(cmd *cobra.Command, files []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			if len(files) == 0 {
				cfg, err := g.loadConfig()
				if err != nil {
					return err
				}
				_, es, err := agent.Snapshots(cmd.Context(), cfg, log)
				if err != nil {
					return err
				}
				for _, e := range es {
					files = append(files, e.Path)
				}
			}
			bad := 0
			for _, f := range files {
				info, err := snapshot.CheckFile(f)
				if err != nil {
					bad++
					fmt.Fprintf(g.stdout, "FAIL %s: %v\n", f, err)
					continue
				}
				fmt.Fprintf(g.stdout, "ok   %s (raft index %d, term %d)\n", f, info.Index, info.Term)
			}
			if bad > 0 {
				return fmt.Errorf("%d of %d snapshot(s) failed verification", bad, len(files))
			}
			return nil
		},
	}

	var dryRun bool
	prune := &cobra.Command{
		Use: "prune", Short: "Apply the retention policy (snapshots.retention); --dry-run shows what would go and why", Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, cfg, err := g.setup()
			if err != nil {
				return err
			}
			dropped, err := agent.SnapshotPlan(cmd.Context(), cfg, time.Now(), dryRun, log)
			verb := "removed"
			if dryRun {
				verb = "would remove"
			}
			for _, d := range dropped {
				fmt.Fprintf(g.stdout, "%s %s (%s)\n", verb, d.Entry.Path, strings.Join(d.Reasons, "; "))
			}
			if len(dropped) == 0 {
				fmt.Fprintln(g.stdout, "nothing to prune")
			}
			return err
		},
	}
	prune.Flags().BoolVar(&dryRun, "dry-run", false, "show what would be removed and why; remove nothing")
	cmd.AddCommand(list, verify, prune)
	return cmd
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
