package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

type rbacOptions struct {
	adminKubeconfig string
}

func newRBACCommand(g *globalOptions) *cobra.Command {
	opts := &rbacOptions{}
	cmd := &cobra.Command{
		Use:   "rbac",
		Short: "Print the Kubernetes accounts and roles the agent needs (changes nothing)",
		Long: `Prints, for the configured namespace and release, the manifests a cluster administrator
applies once (kubectl apply -f -): the namespace; an operate account (the daemon, unseal,
backup-now, status, drill, snapshots) and an install account (install, upgrade, recover,
restore: it holds the operate rules too), each a ServiceAccount with a token Secret, a
Role in the namespace and a ClusterRole for the cluster-scoped objects, every rule with
why it is there and narrowed to the release's objects' names where Kubernetes allows.
The agent itself never applies them. Changes nothing; safe to re-run.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configs.Load(g.configPath)
			if err != nil {
				return err
			}
			out, err := agent.RBACManifests(cfg)
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(g.stdout, out)
			return err
		},
	}
	kc := &cobra.Command{
		Use:   "kubeconfig operate|install --admin-kubeconfig FILE",
		Short: "Print a kubeconfig for one of the agent's accounts (reads its token Secret; changes nothing)",
		Long: `Reads the account's token Secret (made by the manifests ` + "`rbac`" + ` prints) with an
administrator's kubeconfig and prints a kubeconfig for the account: the administrator's
API server and CA, the account's token. The token does not expire; delete the Secret to
revoke it (a new one is made when the manifests are applied again). Write it to a
root-owned 0600 file and point kubernetes.kubeconfig (operate) or
kubernetes.install_kubeconfig (install) at it.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 || (args[0] != "operate" && args[0] != "install") {
				return usageErrorf("rbac kubeconfig takes one account: operate or install")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runRBACKubeconfig(cmd.Context(), opts, g, args[0])
		},
	}
	kc.Flags().StringVar(&opts.adminKubeconfig, "admin-kubeconfig", "", "an administrator's kubeconfig, used once to read the account's token")
	cmd.AddCommand(kc)
	return cmd
}

func runRBACKubeconfig(ctx context.Context, opts *rbacOptions, g *globalOptions, role string) error {
	if opts.adminKubeconfig == "" {
		return usageErrorf("--admin-kubeconfig is required: the account's token is read with it")
	}
	cfg, err := configs.Load(g.configPath)
	if err != nil {
		return err
	}
	admin, err := os.ReadFile(opts.adminKubeconfig)
	if err != nil {
		return fmt.Errorf("--admin-kubeconfig: %w", err)
	}
	out, err := agent.ServiceAccountKubeconfig(ctx, cfg, admin, role)
	if err != nil {
		return err
	}
	_, err = g.stdout.Write(out)
	return err
}
