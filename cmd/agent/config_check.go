package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

type configCheckOptions struct {
	output string
}

func newConfigCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Inspect the configuration", Args: noArgs, RunE: showHelp}
	opts := &configCheckOptions{}
	check := &cobra.Command{
		Use:   "check",
		Short: "Load and validate the configuration, then print the effective result (changes nothing)",
		Long: `Loads the configuration file (--config), applies PVA_ environment overrides, reports every
problem at once with its key path and a hint, and exits 78 if there is any. Otherwise prints
the effective configuration with defaults filled in, and warns (on stderr) about directories
the service unit would not let the agent write. With snapshots.proxmox_storage it asks the
Proxmox API (read only) where that storage is, and checks that directory too. Secrets are
references (a file or a systemd credential), so nothing secret is printed. Changes
nothing; safe to re-run.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runConfigCheck(cmd.Context(), opts, g) },
	}
	check.Flags().StringVarP(&opts.output, "output", "o", "yaml", "output format: yaml or json")
	cmd.AddCommand(check)
	return cmd
}

func runConfigCheck(ctx context.Context, opts *configCheckOptions, g *globalOptions) error {
	if err := outputFormat(opts.output, "yaml", "json"); err != nil {
		return err
	}
	cfg, err := configs.Load(g.configPath)
	if err != nil {
		return err
	}
	writable, source := agent.UnitWritable(ctx)
	resolved := ""
	if cfg.Snapshots.ProxmoxStorage != "" {
		resolved = resolveStorage(ctx, g)
	}
	for _, w := range agent.WritablePathWarnings(cfg, writable, resolved) {
		fmt.Fprintf(g.stderr, "warning: %s (writable paths from %s)\n", w, source)
	}
	if cfg.Vault.TLSCAFile == "" {
		fmt.Fprintln(g.stderr, "warning: vault.tls_ca_file is empty: Vault's listener has TLS off, unseal shares cross the pod network in clear text")
	}
	for _, w := range agent.ValuesWarnings(cfg) {
		fmt.Fprintf(g.stderr, "warning: %s\n", w)
	}
	if cfg.Cluster.Enabled() {
		if env, err := g.environment(); err == nil {
			for _, w := range agent.ClusterSnapshotWarnings(ctx, env) {
				fmt.Fprintf(g.stderr, "%s\n", w)
			}
			env.Close()
		}
	}
	view := cfg.View()
	if opts.output == "json" {
		if err := writeJSON(g, view); err != nil {
			return err
		}
		return errors.Join(checkUnitCredentials(ctx, g, cfg), checkCluster(ctx, g))
	}
	out, err := yaml.Marshal(view)
	if err != nil {
		return fmt.Errorf("render configuration: %w", err)
	}
	fmt.Fprintf(g.stderr, "configuration %s is valid\n", g.configPath)
	if _, err = g.stdout.Write(out); err != nil {
		return err
	}
	return errors.Join(checkUnitCredentials(ctx, g, cfg), checkCluster(ctx, g))
}

// checkRelease says who owns the live release and which values the agent requires it
// lacks: a problem when git owns it (git must carry them), a note when the agent does.
// A cluster that cannot be reached is a warning.
func checkRelease(ctx context.Context, g *globalOptions, env *agent.Env) error {
	rc, err := agent.CheckRelease(ctx, env)
	if err != nil {
		fmt.Fprintf(g.stderr, "warning: could not check the live release: %v\n", err)
		return nil
	}
	if rc.Owner.Kind != "" {
		fmt.Fprintf(g.stderr, "release: owned by %s (%s); install.managed_by: %s\n", rc.Owner, rc.Owner.Evidence, env.Config.Install.ManagedBy)
		if len(rc.Drift) == 0 && rc.Owner.Kind != "other" {
			fmt.Fprintln(g.stderr, "release values: every value the agent requires is live")
		}
	}
	for _, n := range rc.Notes {
		fmt.Fprintf(g.stderr, "note: %s\n", n)
	}
	for _, p := range rc.Problems {
		fmt.Fprintf(g.stderr, "error: %s\n", p)
	}
	if len(rc.Problems) > 0 {
		return fmt.Errorf("%d problem(s) with the live release: see above", len(rc.Problems))
	}
	return nil
}

// checkCluster runs the checks that ask the API server, in one environment and within
// 30 seconds each.
func checkCluster(ctx context.Context, g *globalOptions) error {
	env, err := g.environment()
	if err != nil {
		return err
	}
	defer env.Close()
	var errs []error
	for _, check := range []func(context.Context, *globalOptions, *agent.Env) error{checkKubernetesAccess, checkRelease} {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		errs = append(errs, check(cctx, g, env))
		cancel()
	}
	return errors.Join(errs...)
}

// checkKubernetesAccess asks the API server whether the configured kubeconfigs may do
// what their roles need; a cluster that cannot be reached is a warning, a refused rule
// an error.
func checkKubernetesAccess(ctx context.Context, g *globalOptions, env *agent.Env) error {
	rep, err := agent.CheckKubernetesAccess(ctx, env)
	if err != nil {
		fmt.Fprintf(g.stderr, "warning: could not check the Kubernetes accounts' access: %v\n", err)
		return nil
	}
	n := 0
	for _, role := range []string{"operate", "install"} {
		for _, m := range rep.Missing[role] {
			fmt.Fprintf(g.stderr, "error: the %s account may not: %s\n", role, m)
			n++
		}
		if rep.Checked[role] && len(rep.Missing[role]) == 0 {
			fmt.Fprintf(g.stderr, "the %s account may do everything its role needs\n", role)
		}
	}
	if n > 0 {
		return fmt.Errorf("%d rule(s) refused to the agent's Kubernetes accounts; apply the roles `pve-vault-agent rbac` prints, and use their kubeconfigs (`pve-vault-agent rbac kubeconfig`)", n)
	}
	return nil
}

// checkUnitCredentials prints what the service units must load; an installed unit that
// disagrees with the configuration is an error.
func checkUnitCredentials(ctx context.Context, g *globalOptions, cfg *configs.Config) error {
	c := agent.CheckUnitCredentials(ctx, cfg)
	if !c.Installed {
		fmt.Fprintf(g.stderr, "note: no pve-vault-agent unit is installed here; once it is, it must load these credentials:\n%s", c.DropIn)
		return nil
	}
	if c.Err == nil {
		return nil
	}
	for _, p := range c.Problems {
		fmt.Fprintf(g.stderr, "error: %s\n", p)
	}
	fmt.Fprintf(g.stderr, "make the units load exactly the configuration's credentials (as root):\n%s", c.DropIn)
	return c.Err
}

// resolveStorage asks the Proxmox API where snapshots.proxmox_storage is, to check the
// unit may write there; it only reads. A failure is a warning: the configuration itself
// is valid, and the same error would stop the first backup.
func resolveStorage(ctx context.Context, g *globalOptions) string {
	env, err := g.environment()
	if err == nil {
		defer env.Close()
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		var dir string
		if dir, err = agent.SnapshotDir(ctx, env); err == nil {
			fmt.Fprintf(g.stderr, "snapshots.proxmox_storage resolves to %s\n", dir)
			return dir
		}
	}
	fmt.Fprintf(g.stderr, "warning: snapshots.proxmox_storage: %v\n", err)
	return ""
}
