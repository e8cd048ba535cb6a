package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type keyfileCheckOptions struct {
	output string
}

func newKeyfileCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "keyfile", Short: "Inspect the sealed keyfile", Args: noArgs, RunE: showHelp}
	opts := &keyfileCheckOptions{}
	check := &cobra.Command{
		Use:   "check",
		Short: "Prove the keyfile decrypts; show its metadata and its tokens' TTL (changes nothing)",
		Long: `Decrypts the keyfile and prints its non-secret metadata. When a Vault pod answers, it also
looks up the agent's tokens (without renewing them) and warns when one is close to expiry.
Exit 1 when the keyfile cannot be opened or a token is refused.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runKeyfileCheck(cmd.Context(), opts, env, g)
		},
	}
	check.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	cmd.AddCommand(check, newKeyfileEnrollCommand(g))
	return cmd
}

type keyfileEnrollOptions struct {
	acceptNewHostKey bool
	output           string
}

func newKeyfileEnrollCommand(g *globalOptions) *cobra.Command {
	opts := &keyfileEnrollOptions{}
	cmd := &cobra.Command{
		Use:   "enroll HOST",
		Short: "Seal this keyfile on another PVE node of the cluster with that node's own key",
		Long: `Copies the keyfile to HOST (a name in cluster.hosts) over SSH and seals it there with
HOST's own systemd-creds key (vault.systemd_creds_key: its host secret, its TPM2, or both),
at cluster.hosts[].keyfile or vault.keyfile. The plaintext goes from this process's memory
through the SSH channel into systemd-creds there: it is written to neither disk. The copy
is decrypted there and compared by SHA-256 before it replaces what was at the path. The
agent on HOST unseals with it from its next pod listing. Safe to re-run.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			unlock, err := env.Lock("keyfile enroll")
			if err != nil {
				return err
			}
			defer unlock()
			rep, err := agent.EnrollKeyfile(cmd.Context(), env, args[0], agent.EnrollOptions{AcceptNewHostKey: opts.acceptNewHostKey})
			if err != nil {
				err = fmt.Errorf("keyfile enroll: %w", err)
			}
			return report(g, opts.output, rep, func(w io.Writer) {
				if rep == nil {
					return
				}
				fmt.Fprintf(w, "keyfile sealed on %s at %s with its own key (payload sha256 %s…, the same as here)\n", rep.Host, rep.Path, rep.Digest)
			}, err)
		},
	}
	cmd.Flags().BoolVar(&opts.acceptNewHostKey, "accept-new-host-key", false, "pin HOST's SSH key when known_hosts does not list it yet")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runKeyfileCheck(ctx context.Context, opts *keyfileCheckOptions, env *agent.Env, g *globalOptions) error {
	rep, err := agent.CheckKeyfile(ctx, env)
	if err != nil {
		err = fmt.Errorf("keyfile check: %w", err)
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		if rep == nil {
			return
		}
		m := rep.Meta
		fmt.Fprintf(w, "keyfile %s decrypts (%s)\ncluster %s (%s)\nshares %d, threshold %d, keyset %s\nsnapshot token: %v, operator token: %v, canary: %v\ncreated %s\n",
			rep.Source, env.Config.Vault.Seal, m.ClusterID, m.ClusterName, m.Shares, m.Threshold, m.Fingerprint, m.HasToken, m.HasOperatorToken, m.HasCanary,
			m.Created.Format("2006-01-02 15:04:05 MST"))
		if m.ManifestKey != "" {
			fmt.Fprintf(w, "manifest key %s (pins a host-lost recovery: recover --from … --manifest-key %s)\n", m.ManifestKey, m.ManifestKey)
		}
		if !m.Rotated.IsZero() {
			fmt.Fprintf(w, "tokens rotated %s\n", m.Rotated.Format(time.RFC3339))
		}
		printTokens(w, rep.Tokens)
	}, err)
}

func printTokens(w io.Writer, tokens []agent.TokenStatus) {
	for _, t := range tokens {
		switch {
		case t.Error != "":
			fmt.Fprintf(w, "%s token: REFUSED: %s\n", t.Name, t.Error)
		default:
			fmt.Fprintf(w, "%s token: %s left (expires %s)\n", t.Name, t.TTL.Round(time.Second), t.Expires.Format(time.RFC3339))
			if t.Warning != "" {
				fmt.Fprintf(w, "  warning: %s\n", t.Warning)
			}
		}
	}
}
