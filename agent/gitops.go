package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// ErrManagedElsewhere means the release is not the agent's to change with Helm: git
// (Flux, Argo CD) or another tool owns it. Nothing was applied.
var ErrManagedElsewhere = errors.New("the release is managed by something else")

// managedBy is install.managed_by in words.
func managedBy(cfg *configs.Config) string {
	switch cfg.Install.ManagedBy {
	case configs.ManagedByFlux:
		ns, name := cfg.FluxHelmRelease()
		return fmt.Sprintf("Flux (HelmRelease %s/%s)", ns, name)
	case configs.ManagedByArgoCD:
		return "Argo CD"
	case configs.ManagedByExternal:
		return "a tool other than the agent"
	}
	return "the agent"
}

// gitHint is what to do instead of a Helm upgrade on a release git owns.
func gitHint(cfg *configs.Config) string {
	switch cfg.Install.ManagedBy {
	case configs.ManagedByFlux:
		return "upgrades are git's job: run `pve-vault-agent backup-now`, then change the chart or values in git (`pve-vault-agent render --flux -o DIR` writes what the agent needs) and let Flux apply it; provision, unseal, backups, drills and recover need no install"
	case configs.ManagedByArgoCD:
		return "upgrades are git's job: run `pve-vault-agent backup-now`, then change the chart or values in git (`pve-vault-agent render -o DIR` writes what the agent needs) and let Argo CD sync it; provision, unseal, backups, drills and recover need no install"
	}
	return "upgrade the release the way it was installed, after `pve-vault-agent backup-now`; `pve-vault-agent render -o DIR` writes the values the agent needs. Provision, unseal, backups, drills and recover need no install"
}

// checkHelmOwner refuses a Helm install or upgrade the agent is not to run: the
// configuration gives the release to Flux, Argo CD or another tool, or the live
// objects say one of them owns it, or a Vault of another release already runs in the
// namespace. It reads only; nothing is applied.
func checkHelmOwner(ctx context.Context, env *Env, cl *k8s.Cluster) (*k8s.Owner, error) {
	cfg := env.Config
	o, err := cl.ReleaseOwner(ctx, cfg.Chart.Release)
	if err != nil {
		return nil, err
	}
	if cfg.Install.ManagedBy != configs.ManagedByAgent {
		what := "nothing is installed yet"
		if o.Kind != k8s.OwnerNone {
			what = "live: " + o.String()
		}
		return o, withHint(fmt.Errorf("%w: install.managed_by is %s: the agent runs no Helm on release %s (%s); nothing was applied",
			ErrManagedElsewhere, cfg.Install.ManagedBy, cfg.Chart.Release, what), "%s", gitHint(cfg))
	}
	switch o.Kind {
	case k8s.OwnerFlux, k8s.OwnerArgoCD, k8s.OwnerOther:
		setting := map[string]string{k8s.OwnerFlux: "flux", k8s.OwnerArgoCD: "argocd", k8s.OwnerOther: "external"}[o.Kind]
		return o, withHint(fmt.Errorf("%w: the Vault in namespace %s is owned by %s (%s); a Helm upgrade by the agent would be undone at the next sync; nothing was applied",
			ErrManagedElsewhere, cl.Namespace(), o, o.Evidence),
			"set install.managed_by: %s: the agent then provisions, unseals, backs up and recovers it and leaves Helm to its owner", setting)
	case k8s.OwnerHelm:
		if o.Release != cfg.Chart.Release {
			return o, hintf(fmt.Sprintf("set chart.release: %s to keep that Vault, or remove it first; installing would build a second Vault beside it", o.Release),
				"a Vault of release %s (StatefulSet %s) already runs in namespace %s, not release %s; nothing was applied", o.Release, o.StatefulSet, cl.Namespace(), cfg.Chart.Release)
		}
	}
	return o, nil
}

// fluxHold suspends the HelmRelease for a flow that changes Vault's data under it
// (recover, restore) and resumes it when the flow is done, as `flux suspend` and `flux
// resume helmrelease` do: helm-controller then neither upgrades, rolls back, remediates
// nor corrects drift in the middle of it. A flow that fails leaves it suspended, and
// says so; running the flow again resumes it.
type fluxHold struct {
	env       *Env
	cl        *k8s.Cluster
	namespace string
	name      string
	suspended bool
	resumedAt time.Time
}

// newFluxHold returns nil when the release is not Flux's.
func newFluxHold(env *Env) *fluxHold {
	if env.Config.Install.ManagedBy != configs.ManagedByFlux {
		return nil
	}
	ns, name := env.Config.FluxHelmRelease()
	return &fluxHold{env: env, namespace: ns, name: name}
}

func (h *fluxHold) String() string { return "HelmRelease " + h.namespace + "/" + h.name }

// suspend is the flow's "suspend" step.
func (h *fluxHold) suspend(ctx context.Context) (string, error) {
	if h == nil {
		return "skipped: install.managed_by is not flux", nil
	}
	cl, err := h.env.InstallCluster(ctx)
	if err != nil {
		return "", err
	}
	h.cl = cl
	st, err := cl.HelmRelease(ctx, h.namespace, h.name)
	if errors.Is(err, k8s.ErrNoHelmRelease) {
		return "", withHint(err, "install.managed_by is flux: bootstrap Flux from git first (its HelmRelease installs Vault), or set install.helmrelease to the HelmRelease's namespace/name; then run this again")
	}
	if err != nil {
		return "", err
	}
	if err := cl.SuspendHelmRelease(ctx, h.namespace, h.name, true, h.env.Clock.Now()); err != nil {
		return "", err
	}
	h.suspended = true
	h.env.Log.Info("suspended the HelmRelease while Vault's data is restored", "helmrelease", h.String(), "was_suspended", st.Suspended)
	if st.Suspended {
		return h.String() + " was suspended already (an earlier run that failed): resumed at the end", nil
	}
	return h.String() + " suspended", nil
}

// resume is the flow's last step: resume the HelmRelease, wait for its Ready.
func (h *fluxHold) resume(ctx context.Context) (string, error) {
	if h == nil {
		return "skipped: install.managed_by is not flux", nil
	}
	h.resumedAt = h.env.Clock.Now()
	if err := h.cl.SuspendHelmRelease(ctx, h.namespace, h.name, false, h.resumedAt); err != nil {
		return "", err
	}
	h.suspended = false
	st, err := h.cl.WaitHelmReleaseReady(ctx, h.namespace, h.name, h.resumedAt, h.env.Config.Chart.Timeout)
	if err != nil {
		return "", withHint(err, "Vault itself is back; see `flux get helmrelease -n %s %s` and `kubectl -n %s describe helmrelease %s` for what helm-controller reports", h.namespace, h.name, h.namespace, h.name)
	}
	return fmt.Sprintf("%s resumed and Ready (%s)", h, st.Reason), nil
}

// failed wraps a flow's error when the HelmRelease was left suspended.
func (h *fluxHold) failed(err error) error {
	if h == nil || !h.suspended || err == nil {
		return err
	}
	return withHint(fmt.Errorf("%w; %s is left suspended, so Flux does not act on a half-restored Vault", err, h), "fix the cause and run the same command again: it resumes the HelmRelease when it is done (or `flux resume helmrelease -n %s %s` to give it back to Flux as it is)", h.namespace, h.name)
}

// ValuesDrift compares the values of the live release (Helm's record: the chart's
// defaults under what it was given) with the values the agent requires, and names each
// required key that differs. An account that may not read Helm's records gets an
// error saying so.
func ValuesDrift(ctx context.Context, env *Env, cl *k8s.Cluster, release string) ([]k8s.ValueDrift, error) {
	cfg := env.Config
	live, err := cl.ReleaseValues(release)
	if err != nil {
		return nil, err
	}
	user, err := k8s.ReadValuesFiles(cfg.Chart.ValuesFiles)
	if err != nil {
		return nil, fmt.Errorf("%w: chart.values_files: %v", ErrChartValues, err)
	}
	schedulable, err := cl.SchedulableNodes(ctx)
	if err != nil {
		return nil, err
	}
	want, err := EnforcedValues(cfg, user, schedulable)
	if err != nil {
		return nil, err
	}
	return k8s.Drift(live, want), nil
}

// ReleaseCheck is what `config check` says of the live release: who owns it, whether
// install.managed_by agrees, and the required values it lacks.
type ReleaseCheck struct {
	Owner *k8s.Owner       `json:"owner"`
	Drift []k8s.ValueDrift `json:"drift"`
	// Problems make config check fail; Notes do not.
	Problems []string `json:"problems"`
	Notes    []string `json:"notes"`
}

// CheckRelease reads the live release with the install account (it reads Helm's
// records). No release yet: an empty check.
func CheckRelease(ctx context.Context, env *Env) (*ReleaseCheck, error) {
	cfg := env.Config
	cl, err := env.InstallCluster(ctx)
	if err != nil {
		return nil, err
	}
	o, err := cl.ReleaseOwner(ctx, cfg.Chart.Release)
	if err != nil {
		return nil, err
	}
	rc := &ReleaseCheck{Owner: o}
	if o.Kind == k8s.OwnerNone {
		rc.Notes = append(rc.Notes, fmt.Sprintf("no Vault release in namespace %s yet (install.managed_by: %s)", cl.Namespace(), cfg.Install.ManagedBy))
		return rc, nil
	}
	rc.Problems = append(rc.Problems, ownerProblems(cfg, o)...)
	if o.Kind == k8s.OwnerOther {
		rc.Notes = append(rc.Notes, "no Helm release record to compare values with: "+o.Evidence)
		return rc, nil
	}
	if rc.Drift, err = ValuesDrift(ctx, env, cl, o.Release); err != nil {
		return rc, err
	}
	for _, d := range rc.Drift {
		if cfg.Install.ManagedBy == configs.ManagedByAgent {
			rc.Notes = append(rc.Notes, "values drift: "+d.String()+" (the next install applies it)")
		} else {
			rc.Problems = append(rc.Problems, "values drift: "+d.String()+" (put it in git: pve-vault-agent render)")
		}
	}
	return rc, nil
}

// ownerProblems is where the live owner o contradicts the configuration: a release
// Flux, Argo CD or another tool owns while install.managed_by is agent, a Vault of
// another release name, another owner than Flux or another HelmRelease than
// install.helmrelease with managed_by flux. status shows them, config check fails on them.
func ownerProblems(cfg *configs.Config, o *k8s.Owner) []string {
	var out []string
	want := map[string]string{k8s.OwnerFlux: configs.ManagedByFlux, k8s.OwnerArgoCD: configs.ManagedByArgoCD, k8s.OwnerOther: configs.ManagedByExternal}[o.Kind]
	switch cfg.Install.ManagedBy {
	case configs.ManagedByAgent:
		if want != "" {
			out = append(out, fmt.Sprintf("release %s is owned by %s (%s) but install.managed_by is agent: set install.managed_by: %s", o.Release, o, o.Evidence, want))
		}
		if o.Kind == k8s.OwnerHelm && o.Release != cfg.Chart.Release {
			out = append(out, fmt.Sprintf("a Vault of release %s (StatefulSet %s) runs in namespace %s, not release %s: set chart.release: %s", o.Release, o.StatefulSet, cfg.Chart.Namespace, cfg.Chart.Release, o.Release))
		}
	case configs.ManagedByFlux:
		ns, name := cfg.FluxHelmRelease()
		switch {
		case o.Kind != k8s.OwnerFlux:
			out = append(out, fmt.Sprintf("install.managed_by is flux, but the release is owned by %s (%s)", o, o.Evidence))
		case o.Namespace != ns || o.Name != name:
			out = append(out, fmt.Sprintf("the release belongs to HelmRelease %s/%s, not %s/%s: set install.helmrelease: %s/%s", o.Namespace, o.Name, ns, name, o.Namespace, o.Name))
		}
	}
	return out
}
