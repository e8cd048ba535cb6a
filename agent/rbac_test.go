package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// Every rule of the agent's two roles is needed: with that one rule taken out of the
// roles `rbac` prints, the flow it is there for fails on the RBAC-enforcing API server,
// and the hint names the rule to add and the role that has it. The cases are generated
// from the roles; with every rule in place every flow passes (every other lab test runs
// as these accounts).
func TestRolesAreMinimal(t *testing.T) {
	base := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	// An agent of a Proxmox cluster: the operate role has the Lease rules too.
	base.cfg.Proxmox.Node = "pve-a"
	base.cfg.Cluster.Hosts = []configs.ClusterHost{{Name: "pve-a", Address: "127.0.0.1"}, {Name: "pve-b", Address: "127.0.0.1"}}
	useAgentAccounts(t, ctx, base.cfg, lab.SharedControlPlane(t).Kubeconfig, base.cs, base.dir)
	if _, err := Init(ctx, base.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := BackupNow(ctx, base.env, BackupOptions{}); err != nil {
		t.Fatal(err) // the drill restores it
	}
	for _, role := range []string{k8s.RoleOperate, k8s.RoleInstall} {
		spec, err := RBACSpecFor(base.cfg)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range k8s.Rules(role, spec) {
			t.Run(fmt.Sprintf("%s %d %s", role, i, k8s.RuleString(r)), func(t *testing.T) {
				vl := base
				if r.Flow == "install" || r.Flow == "reclaim" {
					vl = newVaultLabWith(t, labOptions{nodes: 1, noInstall: true})
				}
				prepareFlow(t, ctx, vl, r)
				err := withoutRule(t, ctx, vl, role, i, func() error { return runFlow(t, ctx, vl, r) })
				hints := strings.Join(Hints(err), "\n")
				named := false
				for _, res := range r.Resources {
					named = named || strings.Contains(hints, fmt.Sprintf("resources: [%q]", res))
				}
				if err == nil || !strings.Contains(hints, "Kubernetes refused") || !named {
					t.Fatalf("without %s (%s) the %s flow: %v\nhints: %s", k8s.RuleString(r), r.Why, r.Flow, err, hints)
				}
				if !strings.Contains(hints, "the "+role+" role has it") {
					t.Fatalf("the hint does not name the %s role:\n%s", role, hints)
				}
				t.Logf("refused as expected: %v", firstLine(err.Error()))
			})
		}
	}
}

// withoutRule runs f while rule i of role is missing from the roles (from both accounts:
// the install account holds the operate rules too), and puts the roles back after.
func withoutRule(t *testing.T, ctx context.Context, vl *vaultLab, role string, i int, f func() error) error {
	t.Helper()
	spec, err := RBACSpecFor(vl.cfg)
	if err != nil {
		t.Fatal(err)
	}
	full := map[string][]k8s.Rule{k8s.RoleOperate: k8s.Rules(k8s.RoleOperate, spec), k8s.RoleInstall: k8s.Rules(k8s.RoleInstall, spec)}
	reduced := map[string][]k8s.Rule{k8s.RoleOperate: full[k8s.RoleOperate], k8s.RoleInstall: full[k8s.RoleInstall]}
	gone := full[role][i]
	reduced[role] = append(append([]k8s.Rule(nil), full[role][:i]...), full[role][i+1:]...)
	apply := func(rules map[string][]k8s.Rule, wantMissing bool) {
		t.Helper()
		if err := lab.Apply(ctx, vl.cs, k8s.RBACObjectsWith(spec, rules)); err != nil {
			t.Fatal(err)
		}
		// The authorizer reads roles from an informer: wait until the change shows, to
		// the account whose flows the rule is for.
		env := vl.newEnv()
		defer env.Close()
		cl, err := env.Cluster(ctx)
		if role == k8s.RoleInstall {
			cl, err = env.InstallCluster(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := lab.WaitFor(ctx, 30*time.Second, "the API server to apply the roles", func(ctx context.Context) error {
			missing, err := cl.CheckAccess(ctx, []k8s.Rule{gone})
			if err != nil {
				return err
			}
			if (len(missing) > 0) != wantMissing {
				return errors.New("not yet")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	apply(reduced, true)
	defer apply(full, false)
	return f()
}

// prepareFlow sets up, with every rule in place, what the flow of rule r starts from.
func prepareFlow(t *testing.T, ctx context.Context, vl *vaultLab, r k8s.Rule) {
	t.Helper()
	switch r.Flow {
	case "install", "reclaim":
		if _, err := Provision(ctx, vl.env, ProvisionOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if r.Flow == "install" && r.Resources[0] == "priorityclasses" {
		// Made once per cluster: take it away, so this install must make it.
		_ = vl.cs.SchedulingV1().PriorityClasses().Delete(ctx, k8s.DrillPriorityClass, metav1.DeleteOptions{})
	}
	if r.Flow == "lead" {
		// create is needed only when there is no Lease yet, get and update when there is.
		leases := vl.cs.CoordinationV1().Leases(vl.cfg.Chart.Namespace)
		_ = leases.Delete(ctx, vl.cfg.Cluster.Lease, metav1.DeleteOptions{})
		if !slices.Contains(r.Verbs, "create") {
			if err := runFlow(t, ctx, vl, r); err != nil {
				t.Fatalf("the Lease with every rule in place: %v", err)
			}
		}
	}
	if r.Flow != "reclaim" {
		return
	}
	// Installed; then the pod and its claim are deleted (a rebuild that took the claim
	// too): the volume is Released, and the claim the StatefulSet makes anew must get it
	// back.
	if _, err := Install(ctx, vl.env, InstallOptions{}); err != nil {
		t.Fatal(err)
	}
	ns := vl.cfg.Chart.Namespace
	pvName := k8s.PVName(ns, vl.release, 0)
	if err := vl.cs.CoreV1().PersistentVolumeClaims(ns).Delete(ctx, k8s.ClaimName(vl.release, 0), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := vl.cs.CoreV1().Pods(ns).Delete(ctx, vl.pod(0), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(ctx, time.Minute, "the volume to be Released", func(ctx context.Context) error {
		pv, err := vl.cs.CoreV1().PersistentVolumes().Get(ctx, pvName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if pv.Status.Phase != "Released" {
			return fmt.Errorf("phase %s", pv.Status.Phase)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// runFlow runs the flow a rule is there for, in a fresh environment (no connection or
// client from before the roles changed).
func runFlow(t *testing.T, ctx context.Context, vl *vaultLab, r k8s.Rule) error {
	t.Helper()
	env := vl.newEnv()
	defer env.Close()
	switch r.Flow {
	case "unseal":
		_, err := Unseal(ctx, env)
		return err
	case "drill":
		_, err := Drill(ctx, env, DrillOptions{})
		return err
	case "install", "reclaim":
		_, err := Install(ctx, env, InstallOptions{})
		return err
	case "lead":
		c, err := env.Cluster(ctx)
		if err != nil {
			return err
		}
		return leaseOnce(ctx, c, env, "pve-a")
	case "flux":
		// What recover and restore do first: read and suspend the HelmRelease.
		_, err := newFluxHold(env).suspend(ctx)
		return err
	}
	t.Fatalf("no flow %q", r.Flow)
	return nil
}
