package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type initOptions struct {
	recoveryRecipient string
	output            string
}

func newInitCommand(g *globalOptions) *cobra.Command {
	opts := &initOptions{}
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Initialise Vault once and seal its unseal keys into the keyfile",
		Long: `Initialises Vault with vault.shares/vault.threshold, writes the unseal shares straight
into the sealed keyfile (systemd-creds or age; never plaintext on disk, never printed),
creates the agent's least-privilege periodic tokens (snapshot; operator: restore, Raft
peers, generate-root under Vault 2.x) and a canary for restore drills, revokes the root
token (on every path, an interruption included) and unseals every pod. With
--recovery-recipient (or vault.recovery_recipient) a second copy is encrypted to an
offline age key, for the day this host is lost.

Every precondition is checked before Vault is touched. Refuses when a keyfile exists or
any pod is already initialised: not safe to re-run by design.
Changes: Vault (initialised, policies, tokens, canary), the keyfile.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runInit(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().StringVar(&opts.recoveryRecipient, "recovery-recipient", "", "age public key (age1…) that receives an offline copy of the keyfile")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runInit(ctx context.Context, opts *initOptions, env *agent.Env, g *globalOptions) error {
	unlock, err := env.Lock("init")
	if err != nil {
		return err
	}
	defer unlock()
	rep, err := agent.Init(ctx, env, agent.InitOptions{RecoveryRecipient: opts.recoveryRecipient})
	if err != nil {
		err = fmt.Errorf("init: %w", err)
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		printSteps(g.stderr, rep.Steps)
		if rep.Pod == "" {
			return
		}
		m := rep.Meta
		fmt.Fprintf(w, "initialised vault through pod %s\nkeyfile %s: %d shares, threshold %d, keyset %s, cluster %s\n",
			rep.Pod, rep.Keyfile, m.Shares, m.Threshold, m.Fingerprint, m.ClusterID)
		if rep.RecoveryCopy != "" {
			fmt.Fprintf(w, "offline recovery copy %s (age); move it off this host\n", rep.RecoveryCopy)
		}
		if rep.ManifestKey != "" {
			fmt.Fprintf(w, "manifest key %s: note it with the offline identity; recover --from shows the one it finds\n", rep.ManifestKey)
		}
		for _, p := range rep.Unsealed {
			fmt.Fprintf(w, "unsealed %s\n", p)
		}
	}, err)
}
