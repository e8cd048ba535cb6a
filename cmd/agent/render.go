package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

type renderOptions struct {
	flux bool
	dir  string
}

func newRenderCommand(g *globalOptions) *cobra.Command {
	opts := &renderOptions{}
	cmd := &cobra.Command{
		Use:   "render [--flux] [-o DIR]",
		Short: "Print what to commit to git when Flux, Argo CD or you install the chart (changes nothing in the cluster)",
		Long: `For a release git owns (install.managed_by: flux or argocd) or one you install by hand:
values.yaml, your values files with the values the agent requires merged over them (Raft
storage on the provisioned hostPaths, the uid/gid, OnDelete updates, one replica per node),
exactly as install would apply them; storage.yaml, the StorageClass and one local
PersistentVolume per node that install would apply; with --flux, helmrepository.yaml and
helmrelease.yaml (helm.toolkit.fluxcd.io/v2, Flux 2.x) carrying those values.

Without -o the files are printed as one YAML stream. With -o DIR each is written there
atomically; a file that render did not write is never overwritten (the run is refused and
nothing is written). Reads only the configuration and the values files.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configs.Load(g.configPath)
			if err != nil {
				return err
			}
			files, err := agent.Render(cfg, agent.RenderOptions{Flux: opts.flux})
			if err != nil {
				return err
			}
			if opts.dir == "" {
				for i, f := range files {
					if i > 0 {
						fmt.Fprintln(g.stdout, "---")
					}
					fmt.Fprintf(g.stdout, "# %s\n%s", f.Name, f.Content)
				}
				return nil
			}
			written, err := agent.WriteRendered(opts.dir, files)
			for _, p := range written {
				fmt.Fprintf(g.stderr, "wrote %s\n", p)
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&opts.flux, "flux", false, "also write a Flux HelmRepository and HelmRelease carrying the values")
	cmd.Flags().StringVarP(&opts.dir, "output", "o", "", "write the files into this directory instead of printing them")
	return cmd
}
