package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type provisionOptions struct {
	nodes            []string
	acceptNewHostKey bool
	output           string
}

func newProvisionCommand(g *globalOptions) *cobra.Command {
	opts := &provisionOptions{}
	cmd := &cobra.Command{
		Use:   "provision",
		Short: "Prepare the Vault hostPath on the node VM(s) over SSH (idempotent)",
		Long: `Resolves each configured node (a static address, or a Proxmox VM whose address comes
from the QEMU guest agent), connects over SSH with the host key checked against
ssh.known_hosts, and makes the Vault data directory exist with owner vault.uid:vault.gid
and mode vault.data_mode, chowning inside it only entries with the wrong owner (never
following a symlink, never crossing a mount). The result is read back numerically.

Changes: the directory on each node (and, with --accept-new-host-key, known_hosts).
Safe to re-run: a prepared node reports "unchanged". Exit 1 if any node failed.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runProvision(cmd.Context(), opts, env, g)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&opts.nodes, "node", nil, "only this node (repeatable); default all configured nodes")
	f.BoolVar(&opts.acceptNewHostKey, "accept-new-host-key", false, "pin the host key of a node not yet in known_hosts (a changed key is still refused)")
	f.StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

type provisionJSON struct {
	agent.NodeResult
	DurationMS int64  `json:"duration_ms"`
	Error      string `json:"error,omitempty"`
}

func runProvision(ctx context.Context, opts *provisionOptions, env *agent.Env, g *globalOptions) error {
	unlock, err := env.Lock("provision")
	if err != nil {
		return err
	}
	defer unlock()
	results, runErr := agent.Provision(ctx, env, agent.ProvisionOptions{Nodes: opts.nodes, AcceptNewHostKey: opts.acceptNewHostKey})
	if errors.Is(runErr, agent.ErrUnknownNode) {
		return &usageError{msg: runErr.Error()}
	}
	out := make([]provisionJSON, 0, len(results))
	for _, r := range results {
		j := provisionJSON{NodeResult: r, DurationMS: r.Duration.Milliseconds()}
		if r.Err != nil {
			j.Error = r.Err.Error()
		}
		out = append(out, j)
	}
	for _, r := range results {
		if r.PinnedHostKey != "" {
			fmt.Fprintf(g.stderr, "pinned new host key of %s (%s) %s in %s\n", r.Node, r.Location.Address, r.PinnedHostKey, env.Config.SSH.KnownHosts)
		}
	}
	if runErr != nil {
		runErr = fmt.Errorf("provision: %w", runErr)
	}
	return report(g, opts.output, out, func(w io.Writer) {
		if len(results) == 0 {
			return
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NODE\tADDRESS\tPATH\tOWNER\tMODE\tSTATE\tTIME")
		for _, r := range results {
			if r.Err != nil {
				fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\tFAILED\t%s\n", r.Node, dash(r.Location.Address), r.Duration.Round(time.Millisecond))
				continue
			}
			p := r.Prepared
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d:%d\t%s\t%s\t%s\n", r.Node, r.Location.Address, p.Path, p.UID, p.GID, p.Mode, p.State, r.Duration.Round(time.Millisecond))
		}
		tw.Flush()
	}, runErr)
}
