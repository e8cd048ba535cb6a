package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type installOptions struct {
	dryRun bool
	output string
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
(exit 2), never overwritten.

Changes: the StorageClass and PersistentVolumes (server-side apply, field manager
pve-vault-agent), the Helm release, and — when the pod template changed — the Vault
pods, restarted one at a time. Safe to re-run: nothing changed makes no new revision.
--dry-run prints the merged values and what would change, and changes nothing.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runInstall(cmd, opts, g) },
	}
	cmd.Flags().BoolVar(&opts.dryRun, "dry-run", false, "render and compare with the deployed release; change nothing")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runInstall(cmd *cobra.Command, opts *installOptions, g *globalOptions) error {
	log, cfg, err := g.start(opts.output)
	if err != nil {
		return err
	}
	rep, err := agent.Install(cmd.Context(), cfg, agent.InstallOptions{DryRun: opts.dryRun}, log)
	if errors.Is(err, agent.ErrChartValues) {
		return &usageError{msg: err.Error()}
	}
	if rep != nil {
		if opts.output == "json" {
			if jerr := writeJSON(g, rep); jerr != nil {
				return jerr
			}
		} else {
			printInstall(g, rep)
		}
	}
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	return nil
}

func printInstall(g *globalOptions, rep *agent.InstallReport) {
	w := g.stdout
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
	for _, p := range rep.Pods {
		fmt.Fprintf(w, "pod %s on %s: %s (%s)\n", p.Name, p.Node, p.Phase, p.IP)
	}
	for _, r := range rep.Rolled {
		fmt.Fprintf(w, "rolled %s onto the new revision\n", r)
	}
}
