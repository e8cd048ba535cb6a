package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type unsealOptions struct {
	output string
}

func newUnsealCommand(g *globalOptions) *cobra.Command {
	opts := &unsealOptions{}
	cmd := &cobra.Command{
		Use:   "unseal",
		Short: "Unseal every sealed Vault pod now (safe to re-run)",
		Long: `Reads the sealed keyfile and unseals each sealed Vault server pod, resetting a stale unseal
in progress first. Shares of another cluster are detected at the threshold, the progress is
reset, and the pod is reported. A pod that is uninitialised while the agent holds a
keyfile is reported (its data is gone): use recover. Changes: the seal state of Vault.
Safe to re-run. Exit 1 if any pod stays sealed.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runUnseal(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runUnseal(ctx context.Context, opts *unsealOptions, env *agent.Env, g *globalOptions) error {
	res, err := agent.Unseal(ctx, env)
	if err != nil {
		err = fmt.Errorf("unseal: %w", err)
	}
	if res == nil {
		res = []agent.PodUnseal{}
	}
	return report(g, opts.output, res, func(w io.Writer) {
		if len(res) == 0 {
			return
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "POD\tWAS\tNOW\tSHARES")
		for _, r := range res {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", r.Node, sealWord(r.WasSealed), sealWord(r.Sealed), r.SharesUsed)
		}
		tw.Flush()
	}, err)
}

func sealWord(sealed bool) string {
	if sealed {
		return "sealed"
	}
	return "unsealed"
}
