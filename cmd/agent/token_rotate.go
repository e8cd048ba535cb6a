package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type tokenRotateOptions struct {
	authTokenFile string
	output        string
}

func newTokenCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Look after the agent's Vault tokens", Args: noArgs, RunE: showHelp}
	opts := &tokenRotateOptions{}
	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Mint fresh agent tokens from the shares and rewrite the keyfile (safe to re-run)",
		Long: `Generates a short-lived root token from the keyfile's shares (authorised, as Vault 2.x
requires, by the agent's operator token, or by a token it remembers from before a rotation
when a restored snapshot predates one), writes the agent's policies, mints fresh periodic
snapshot and operator tokens, rewrites the keyfile (and its offline recovery copy)
atomically, revokes the replaced tokens and the root token. When every agent token has
expired (a snapshot older than the tokens' period was restored), pass --auth-token-file
with any token that may use sys/generate-root. A running service reads the rewritten
keyfile at its next backup or renewal; restart it only when the keyfile is sealed with a
TPM2 (its sandbox has no devices to decrypt one).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runTokenRotate(cmd.Context(), opts, env, g)
		},
	}
	rotate.Flags().StringVar(&opts.authTokenFile, "auth-token-file", "", "a 0600 file holding a token that authorises generate-root when no agent token is valid")
	rotate.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	cmd.AddCommand(rotate)
	return cmd
}

func runTokenRotate(ctx context.Context, opts *tokenRotateOptions, env *agent.Env, g *globalOptions) error {
	unlock, err := env.Lock("token rotate")
	if err != nil {
		return err
	}
	defer unlock()
	rep, err := agent.RotateTokens(ctx, env, agent.TokenRotateOptions{AuthTokenFile: opts.authTokenFile})
	if err != nil {
		err = fmt.Errorf("token rotate: %w", err)
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		printSteps(g.stderr, rep.Steps)
		printTokens(w, rep.Tokens)
		if rep.Rotated {
			fmt.Fprintln(w, "a running service uses the new keyfile from its next backup or token renewal; with a TPM2-sealed keyfile (vault.systemd_creds_key host+tpm2 or tpm2) restart it: systemctl restart pve-vault-agent")
		}
	}, err)
}
