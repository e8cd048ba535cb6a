package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type installOptions struct {
	dryRun  bool
	output  string
	upgrade bool // the upgrade verb: the release must exist
}

func newInstallCommand(g *globalOptions) *cobra.Command {
	opts := &installOptions{}
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install or upgrade the Vault Helm chart with Raft storage on the provisioned hostPaths",
		Long: `Runs helm upgrade --install through the Helm SDK with the configured chart (repository +
name + pinned version, an oci:// repository, or a local chart). Your values files are
merged under the values the agent enforces: Raft HA with one replica per node, data on
a local PersistentVolume per node bound to its hostPath, the pod running as
vault.uid:vault.gid. A value of yours that contradicts an enforced one is reported
(exit 78), never overwritten.

When the release exists and the change reaches the pods (a new chart version, a new
image, new values), this is an upgrade done as Vault's documentation asks: a verified
snapshot first, then the standbys one at a time, then the active node steps down and is
rolled last. A pod that does not come back healthy stops the roll; nothing more is deleted.

Changes: the StorageClass and PersistentVolumes (server-side apply, field manager
pve-vault-agent), the Helm release, the Vault pods. Safe to re-run: nothing changed makes
no new revision. --dry-run prints the merged values and what would change.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runInstall(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().BoolVar(&opts.dryRun, "dry-run", false, "render and compare with the deployed release; change nothing")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runInstall(ctx context.Context, opts *installOptions, env *agent.Env, g *globalOptions) error {
	verb := "install"
	if opts.upgrade {
		verb = "upgrade"
	}
	if !opts.dryRun {
		unlock, err := env.Lock(verb)
		if err != nil {
			return err
		}
		defer unlock()
	}
	rep, err := agent.Install(ctx, env, agent.InstallOptions{DryRun: opts.dryRun, RequireRelease: opts.upgrade})
	if err != nil {
		err = fmt.Errorf("%s: %w", verb, err)
	}
	return report(g, opts.output, rep, func(w io.Writer) { printInstall(w, rep) }, err)
}

func printInstall(w io.Writer, rep *agent.InstallReport) {
	printSteps(w, rep.Steps)
	if rep.Release == "" {
		return
	}
	verb := string(rep.Action)
	if rep.DryRun {
		verb = "would be " + verb
		b, _ := yaml.Marshal(rep.Values)
		fmt.Fprintf(w, "# merged values (user files under the enforced values)\n%s\n", b)
	}
	if rep.Recovered != "" {
		fmt.Fprintf(w, "recovered: %s\n", rep.Recovered)
	}
	fmt.Fprintf(w, "release %s in namespace %s %s: revision %d, chart version %s\n", rep.Release, rep.Namespace, verb, rep.Revision, rep.ChartVersion)
	for _, c := range rep.Changes {
		fmt.Fprintf(w, "  %-8s %s\n", c.Change, c.Object)
	}
	if rep.Snapshot != "" {
		fmt.Fprintf(w, "snapshot before the roll: %s\n", rep.Snapshot)
	}
	for _, p := range rep.Pods {
		fmt.Fprintf(w, "pod %s on %s: %s (%s)\n", p.Name, p.Node, p.Phase, p.IP)
	}
	if r := rep.Roll; r != nil {
		for _, name := range r.Rolled {
			fmt.Fprintf(w, "rolled %s onto revision %s\n", name, r.Target)
		}
		for _, name := range r.Left {
			fmt.Fprintf(w, "left on the old revision: %s\n", name)
		}
	}
}
