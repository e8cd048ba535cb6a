package agent

import (
	"context"
	"fmt"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// RBACSpecFor is what the agent's Kubernetes roles are for under cfg: the release, its
// namespace, one volume per node, the nodes, and whether the chart's agent injector is
// on (the chart's default; off only when a values file says injector.enabled: false).
func RBACSpecFor(cfg *configs.Config) (k8s.RBACSpec, error) {
	spec := k8s.RBACSpec{Namespace: cfg.Chart.Namespace, Release: cfg.Chart.Release, Replicas: len(cfg.Nodes), Injector: true}
	for _, n := range cfg.Nodes {
		spec.Nodes = append(spec.Nodes, n.Name)
	}
	if cfg.Cluster.Enabled() {
		spec.Lease = cfg.Cluster.Lease
	}
	if cfg.Install.ManagedBy == configs.ManagedByFlux {
		_, spec.HelmRelease = cfg.FluxHelmRelease()
	}
	files, err := k8s.ReadValuesFiles(cfg.Chart.ValuesFiles)
	if err != nil {
		return spec, fmt.Errorf("%w: chart.values_files: %v", ErrChartValues, err)
	}
	for _, f := range files {
		if inj, ok := f.Values["injector"].(map[string]any); ok {
			if on, ok := inj["enabled"].(bool); ok {
				spec.Injector = on
			}
		}
	}
	return spec, nil
}

// AccessReport is what the configured Kubernetes accounts may not do of what their
// roles need.
type AccessReport struct {
	Checked map[string]bool     `json:"checked"` // role → its kubeconfig was checked
	Missing map[string][]string `json:"missing"` // role → rules refused, with why
}

// CheckKubernetesAccess asks the API server (SelfSubjectAccessReview) whether
// kubernetes.kubeconfig may do all the operate role needs, and, when set,
// kubernetes.install_kubeconfig all the install role needs.
func CheckKubernetesAccess(ctx context.Context, env *Env) (*AccessReport, error) {
	spec, err := RBACSpecFor(env.Config)
	if err != nil {
		return nil, err
	}
	rep := &AccessReport{Checked: map[string]bool{}, Missing: map[string][]string{}}
	cl, err := env.Cluster(ctx)
	if err != nil {
		return nil, err
	}
	if rep.Missing[k8s.RoleOperate], err = cl.CheckAccess(ctx, k8s.Rules(k8s.RoleOperate, spec)); err != nil {
		return nil, err
	}
	rep.Checked[k8s.RoleOperate] = true
	if env.Config.Kubernetes.InstallKubeconfig.IsSet() {
		icl, err := env.InstallCluster(ctx)
		if err != nil {
			return rep, err
		}
		rules := append(k8s.Rules(k8s.RoleOperate, spec), k8s.Rules(k8s.RoleInstall, spec)...)
		if rep.Missing[k8s.RoleInstall], err = icl.CheckAccess(ctx, rules); err != nil {
			return rep, err
		}
		rep.Checked[k8s.RoleInstall] = true
	}
	return rep, nil
}

// ServiceAccountKubeconfig is a kubeconfig for one of the agent's accounts, built from
// its token Secret with an administrator's kubeconfig.
func ServiceAccountKubeconfig(ctx context.Context, cfg *configs.Config, admin []byte, role string) ([]byte, error) {
	return k8s.ServiceAccountKubeconfig(ctx, admin, cfg.Kubernetes.Context, cfg.Chart.Namespace, role)
}

// RBACManifests are the manifests of the agent's accounts and roles for cfg.
func RBACManifests(cfg *configs.Config) (string, error) {
	spec, err := RBACSpecFor(cfg)
	if err != nil {
		return "", err
	}
	return k8s.RBACYAML(spec)
}
