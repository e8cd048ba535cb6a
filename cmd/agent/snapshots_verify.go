package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type snapshotsVerifyOptions struct {
	output   string
	target   string
	identity string
}

func newSnapshotsVerifyCommand(g *globalOptions) *cobra.Command {
	opts := &snapshotsVerifyOptions{}
	cmd := &cobra.Command{
		Use:   "verify [FILE...]",
		Short: "Verify snapshots offline: all stored ones, or the files given (changes nothing)",
		RunE: func(cmd *cobra.Command, files []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runSnapshotsVerify(cmd.Context(), opts, env, g, files)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	cmd.Flags().StringVar(&opts.target, "target", "", "verify every copy on this off-host target: download, authenticate, decrypt, verify")
	cmd.Flags().StringVar(&opts.identity, "identity", "", "with --target: the offline age identity file that decrypts the copies")
	return cmd
}

func runSnapshotsVerify(ctx context.Context, opts *snapshotsVerifyOptions, env *agent.Env, g *globalOptions, files []string) error {
	var res []agent.VerifyResult
	var err error
	switch {
	case opts.target != "" && len(files) > 0:
		return usageErrorf("--target verifies every copy on the target: give no files")
	case opts.target != "":
		res, err = agent.VerifyTarget(ctx, env, opts.target, opts.identity)
	default:
		res, err = agent.VerifySnapshots(ctx, env, files)
	}
	if res == nil {
		res = []agent.VerifyResult{}
	}
	return report(g, opts.output, res, func(w io.Writer) {
		for _, r := range res {
			if r.Error != "" {
				fmt.Fprintf(w, "FAIL %s: %s\n", r.Path, r.Error)
				continue
			}
			fmt.Fprintf(w, "ok   %s (raft index %d, term %d)\n", r.Path, r.Info.Index, r.Info.Term)
		}
	}, err)
}
