package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type restoreOptions struct {
	force, yes bool
	output     string
	authFile   string
}

func newRestoreCommand(g *globalOptions) *cobra.Command {
	opts := &restoreOptions{}
	cmd := &cobra.Command{
		Use:   "restore FILE",
		Short: "Restore a snapshot into the running Vault cluster",
		Long: `Verifies FILE offline and that the keyfile holds its keys before touching Vault, then
uploads it to the active node with the agent's operator token, waits until Vault has
applied it (Vault 2.x applies a restore after the upload returns), unseals every pod and
replaces any agent token the snapshot brought back expired. A snapshot of another
cluster needs --force (snapshot-force). Asks first unless --yes.
Changes: all of Vault's data, replaced by the snapshot's.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageErrorf("restore takes one snapshot file")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runRestore(cmd.Context(), opts, env, g, args[0])
		},
	}
	cmd.Flags().BoolVar(&opts.force, "force", false, "restore a snapshot of another cluster")
	cmd.Flags().StringVar(&opts.authFile, "auth-token-file", "", "a 0600 file with a token valid in the snapshot, for minting the agent's tokens when the snapshot brings none back (imported from before adopt, or older than vault.token_period)")
	cmd.Flags().BoolVar(&opts.yes, "yes", false, "do not ask")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runRestore(ctx context.Context, opts *restoreOptions, env *agent.Env, g *globalOptions, file string) error {
	if err := confirm(g, opts.yes, "replace all of Vault's data with "+file+"?"); err != nil {
		return err
	}
	unlock, err := env.Lock("restore")
	if err != nil {
		return err
	}
	defer unlock()
	rep, err := agent.Restore(ctx, env, file, agent.RestoreOptions{Force: opts.force, AuthTokenFile: opts.authFile})
	if err != nil {
		err = fmt.Errorf("restore: %w", err)
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		printSteps(g.stderr, rep.Steps)
		if err == nil {
			fmt.Fprintf(w, "restored %s through %s (forced: %v)\n", rep.Snapshot, rep.Pod, rep.Forced)
		}
	}, err)
}
