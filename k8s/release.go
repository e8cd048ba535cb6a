package k8s

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/storage/driver"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// InstallSpec is one upgrade --install.
type InstallSpec struct {
	Release string
	Chart   *chart.Chart
	Values  map[string]any
	Timeout time.Duration
	// DryRun renders and compares against the deployed release; changes nothing.
	DryRun bool
	// Now is the clock for the age of a pending revision (default time.Now).
	Now func() time.Time
}

// ErrReleaseBusy means the release's last revision is pending and young enough that
// another operation may still be working on it.
var ErrReleaseBusy = errors.New("release is busy")

// Action is what Install did (or, in a dry run, would do).
type Action string

const (
	Installed Action = "installed"
	Upgraded  Action = "upgraded"
	Unchanged Action = "unchanged"
)

// ObjectChange is one rendered object that differs from the deployed release.
type ObjectChange struct {
	Object string `json:"object"` // Kind/name
	Change string `json:"change"` // added, changed, removed
}

// InstallResult reports the release after Install.
type InstallResult struct {
	Release      string         `json:"release"`
	Namespace    string         `json:"namespace"`
	Action       Action         `json:"action"`
	Revision     int            `json:"revision"`
	ChartVersion string         `json:"chart_version"`
	DryRun       bool           `json:"dry_run,omitempty"`
	Recovered    string         `json:"recovered,omitempty"`
	Changes      []ObjectChange `json:"changes,omitempty"`
	// Immutable lists, on a dry run over a live StatefulSet, the fields the rendered one
	// would change that Kubernetes forbids changing (ImmutableChanges).
	Immutable []string `json:"immutable_changes,omitempty"`
}

// Install is Helm's upgrade --install through the SDK. Same chart version and values
// as the deployed revision: nothing happens (no new revision). A release stuck in a
// pending state is recovered first (rolled back to its last good revision, or removed
// when its first install never finished); a failed one is upgraded over.
func (c *Cluster) Install(ctx context.Context, spec InstallSpec) (*InstallResult, error) {
	cfg, err := c.helm()
	if err != nil {
		return nil, err
	}
	res := &InstallResult{Release: spec.Release, Namespace: c.cfg.Namespace, ChartVersion: spec.Chart.Metadata.Version, DryRun: spec.DryRun}
	hist := action.NewHistory(cfg)
	hist.Max = 1000
	history, err := hist.Run(spec.Release)
	if err != nil && !errors.Is(err, driver.ErrReleaseNotFound) {
		return nil, fmt.Errorf("read release %s history: %w", spec.Release, err)
	}
	sort.Slice(history, func(i, j int) bool { return history[i].Version < history[j].Version })

	var last *release.Release
	if len(history) > 0 {
		last = history[len(history)-1]
	}
	if last != nil && last.Info.Status.IsPending() {
		now := time.Now
		if spec.Now != nil {
			now = spec.Now
		}
		if age := now().Sub(last.Info.LastDeployed.Time); age < spec.Timeout {
			return nil, fmt.Errorf("%w: revision %d of %s has been %s for %s: another helm operation may still be working on it; wait until it ends (or chart.timeout, %s, has passed) and run install again",
				ErrReleaseBusy, last.Version, spec.Release, last.Info.Status, age.Round(time.Second), spec.Timeout)
		}
		msg, gone, err := c.recoverPending(cfg, spec, history)
		if err != nil {
			return nil, err
		}
		res.Recovered = msg
		c.log.Warn("recovered a stuck release", "release", spec.Release, "detail", msg)
		if spec.DryRun {
			last = nil // report the install/upgrade as it would go after recovery
		} else if gone {
			last = nil
		} else if last, err = action.NewGet(cfg).Run(spec.Release); err != nil {
			return nil, fmt.Errorf("read release %s after recovery: %w", spec.Release, err)
		}
	}
	if last != nil && last.Info.Status == release.StatusFailed {
		res.Recovered = fmt.Sprintf("revision %d had failed (%s); upgrading over it", last.Version, strings.TrimSpace(last.Info.Description))
	}

	if last != nil && last.Info.Status == release.StatusDeployed && sameRelease(last, spec) {
		res.Action, res.Revision = Unchanged, last.Version
		return res, nil
	}

	var rel *release.Release
	if last == nil && !c.releaseExists(cfg, spec.Release) {
		inst := action.NewInstall(cfg)
		inst.ReleaseName = spec.Release
		inst.Namespace = c.cfg.Namespace
		// Helm's CreateNamespace creates the namespace even when it exists (ignoring
		// AlreadyExists), which the install account's Role, confined to the namespace,
		// may not: create it only when it is missing.
		inst.CreateNamespace = c.namespaceMissing(ctx)
		inst.Timeout = spec.Timeout
		inst.DryRun = spec.DryRun
		if spec.DryRun {
			inst.DryRunOption = "client"
			inst.ClientOnly = false
		}
		rel, err = inst.RunWithContext(ctx, spec.Chart, spec.Values)
		res.Action = Installed
	} else {
		up := action.NewUpgrade(cfg)
		up.Namespace = c.cfg.Namespace
		up.Timeout = spec.Timeout
		up.MaxHistory = 10
		up.DryRun = spec.DryRun
		if spec.DryRun {
			up.DryRunOption = "client"
		}
		rel, err = up.RunWithContext(ctx, spec.Release, spec.Chart, spec.Values)
		res.Action = Upgraded
	}
	if err != nil {
		verb := map[Action]string{Installed: "install", Upgraded: "upgrade"}[res.Action]
		return nil, fmt.Errorf("helm %s %s: %w", verb, spec.Release, err)
	}
	res.Revision = rel.Version
	old := ""
	if last != nil {
		old = last.Manifest
	}
	res.Changes = diffManifests(old, rel.Manifest)
	if spec.DryRun {
		if res.Immutable, err = c.ImmutableChanges(ctx, spec.Release, rel.Manifest); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// namespaceMissing reports whether the release's namespace does not exist (a refusal to
// read it says it does: whoever made the agent's roles made it).
func (c *Cluster) namespaceMissing(ctx context.Context) bool {
	_, err := c.Clients.CoreV1().Namespaces().Get(ctx, c.cfg.Namespace, metav1.GetOptions{})
	return apierrors.IsNotFound(err)
}

func (c *Cluster) releaseExists(cfg *action.Configuration, name string) bool {
	_, err := cfg.Releases.Last(name)
	return err == nil
}

// recoverPending handles a release whose last revision is pending-*: an install or
// upgrade that was interrupted (the process killed, the API gone) and would otherwise
// block every later operation. Reports whether the release is gone afterwards.
func (c *Cluster) recoverPending(cfg *action.Configuration, spec InstallSpec, history []*release.Release) (string, bool, error) {
	last := history[len(history)-1]
	var good *release.Release
	for i := len(history) - 2; i >= 0; i-- {
		if s := history[i].Info.Status; s == release.StatusDeployed || s == release.StatusSuperseded {
			good = history[i]
			break
		}
	}
	if good == nil {
		msg := fmt.Sprintf("revision %d was stuck in %s with no earlier good revision: removed it to install again", last.Version, last.Info.Status)
		if spec.DryRun {
			return "would remove it: " + msg, true, nil
		}
		un := action.NewUninstall(cfg)
		un.Timeout = spec.Timeout
		if _, err := un.Run(spec.Release); err != nil {
			return "", false, fmt.Errorf("remove stuck release %s (%s): %w", spec.Release, last.Info.Status, err)
		}
		return msg, true, nil
	}
	msg := fmt.Sprintf("revision %d was stuck in %s (an interrupted operation): rolled back to revision %d before upgrading", last.Version, last.Info.Status, good.Version)
	if spec.DryRun {
		return "would roll back: " + msg, false, nil
	}
	// Helm refuses to act on a pending release; mark the stuck revision failed first.
	last.SetStatus(release.StatusFailed, "marked failed by pve-vault-agent: the operation never finished")
	if err := cfg.Releases.Update(last); err != nil {
		return "", false, fmt.Errorf("mark stuck revision %d of %s failed: %w", last.Version, spec.Release, err)
	}
	rb := action.NewRollback(cfg)
	rb.Version = good.Version
	rb.Timeout = spec.Timeout
	rb.MaxHistory = 10
	if err := rb.Run(spec.Release); err != nil {
		return "", false, fmt.Errorf("roll back %s to revision %d: %w", spec.Release, good.Version, err)
	}
	return msg, false, nil
}

// sameRelease reports whether the deployed revision has the chart version and values
// Install would apply.
func sameRelease(last *release.Release, spec InstallSpec) bool {
	if last.Chart == nil || last.Chart.Metadata == nil {
		return false
	}
	if last.Chart.Metadata.Name != spec.Chart.Metadata.Name || last.Chart.Metadata.Version != spec.Chart.Metadata.Version {
		return false
	}
	return equalValue(map[string]any(last.Config), spec.Values)
}

// diffManifests compares rendered objects by kind and name.
func diffManifests(old, new string) []ObjectChange {
	a, b := splitManifest(old), splitManifest(new)
	var out []ObjectChange
	for k, v := range b {
		switch ov, ok := a[k]; {
		case !ok:
			out = append(out, ObjectChange{k, "added"})
		case !equalValue(ov, v):
			out = append(out, ObjectChange{k, "changed"})
		}
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			out = append(out, ObjectChange{k, "removed"})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Object < out[j].Object })
	return out
}

func splitManifest(m string) map[string]any {
	out := map[string]any{}
	for _, doc := range strings.Split(m, "\n---") {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil || obj == nil {
			continue
		}
		kind, _ := obj["kind"].(string)
		meta, _ := obj["metadata"].(map[string]any)
		name, _ := meta["name"].(string)
		if kind == "" || name == "" {
			continue
		}
		out[kind+"/"+name] = obj
	}
	return out
}

// ReleaseInfo is the deployed release as status shows it.
type ReleaseInfo struct {
	Name         string `json:"name"`
	Namespace    string `json:"namespace"`
	Revision     int    `json:"revision"`
	Status       string `json:"status"`
	ChartVersion string `json:"chart_version"`
	// FromStatefulSet: read from the StatefulSet's labels, the account may not read
	// Helm's records (the operate role reads no Secrets): no revision, no Helm status.
	FromStatefulSet bool `json:"from_statefulset,omitempty"`
}

// Release reads the last revision of a release.
func (c *Cluster) Release(name string) (*ReleaseInfo, error) {
	cfg, err := c.helm()
	if err != nil {
		return nil, err
	}
	rel, err := cfg.Releases.Last(name)
	if _, refused := ParseForbidden(err); refused {
		return c.releaseFromStatefulSet(name)
	}
	if err != nil {
		return nil, fmt.Errorf("release %s: %w", name, err)
	}
	info := &ReleaseInfo{Name: rel.Name, Namespace: rel.Namespace, Revision: rel.Version, Status: string(rel.Info.Status)}
	if rel.Chart != nil && rel.Chart.Metadata != nil {
		info.ChartVersion = rel.Chart.Metadata.Version
	}
	return info, nil
}

// releaseFromStatefulSet is what the release's StatefulSet says of it, for an account
// that may not read Helm's records (they are Secrets: the operate role reads none): the
// chart version from its helm.sh/chart label, no revision.
func (c *Cluster) releaseFromStatefulSet(name string) (*ReleaseInfo, error) {
	sts, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("release %s: %w", name, err)
	}
	info := &ReleaseInfo{Name: name, Namespace: c.cfg.Namespace, Status: "unknown", FromStatefulSet: true}
	if ch := sts.Labels["helm.sh/chart"]; ch != "" {
		info.ChartVersion = ch[strings.LastIndexByte(ch, '-')+1:]
	}
	return info, nil
}

// Render renders the chart with values as Helm would install it (client side only, for
// the Kubernetes version the lab and the agent target) and returns the manifest.
func Render(ch *chart.Chart, release, namespace string, values map[string]any) (string, error) {
	inst := action.NewInstall(&action.Configuration{})
	inst.ReleaseName, inst.Namespace = release, namespace
	inst.DryRun, inst.ClientOnly, inst.Replace = true, true, true
	inst.KubeVersion = &chartutil.KubeVersion{Version: "v1.37.2", Major: "1", Minor: "37"}
	rel, err := inst.Run(ch, values)
	if err != nil {
		return "", fmt.Errorf("render %s: %w", ch.Metadata.Name, err)
	}
	return rel.Manifest, nil
}

// ReleaseValues are the values the release's last revision was rendered with: the
// chart's defaults with the values it was given over them (Helm's record; Flux keeps
// the same record). An account that may not read Secrets is refused.
func (c *Cluster) ReleaseValues(name string) (map[string]any, error) {
	cfg, err := c.helm()
	if err != nil {
		return nil, err
	}
	rel, err := cfg.Releases.Last(name)
	if err != nil {
		return nil, fmt.Errorf("read release %s's values: %w", name, err)
	}
	if rel.Chart == nil {
		return map[string]any(rel.Config), nil
	}
	vals, err := chartutil.CoalesceValues(rel.Chart, rel.Config)
	if err != nil {
		return nil, fmt.Errorf("release %s's values: %w", name, err)
	}
	return AsValuesFile(vals.AsMap())
}
