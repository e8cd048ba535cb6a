package k8s

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
)

// Owners of a release, as the live objects name them.
const (
	OwnerNone   = ""       // no Vault StatefulSet in the namespace
	OwnerHelm   = "helm"   // a Helm release with no GitOps marks: the agent's, or helm by hand
	OwnerFlux   = "flux"   // helm-controller installed it for a HelmRelease
	OwnerArgoCD = "argocd" // Argo CD applied it for an Application
	OwnerOther  = "other"  // objects with no Helm release record and no known tracker
)

// Marks the GitOps controllers leave on every object they apply.
const (
	// helm-controller's post-renderer labels every object of a release with the
	// HelmRelease it belongs to (helm-controller v1.4 internal/postrender/build.go,
	// NewOriginLabels(v2.GroupVersion.Group, …)).
	FluxNameLabel      = "helm.toolkit.fluxcd.io/name"
	FluxNamespaceLabel = "helm.toolkit.fluxcd.io/namespace"
	// Argo CD's tracking annotation (the default tracking method since Argo CD 3.0:
	// "<app>:<group>/<kind>:<namespace>/<name>"), and the label many set with
	// application.instanceLabelKey (label tracking, the default before 3.0).
	ArgoTrackingAnnotation = "argocd.argoproj.io/tracking-id"
	ArgoInstanceLabel      = "argocd.argoproj.io/instance"
)

// Owner is who changes a Vault release, read from its StatefulSet.
type Owner struct {
	Kind string `json:"kind"`
	// Release is the Helm release the objects name (app.kubernetes.io/instance).
	Release string `json:"release,omitempty"`
	// StatefulSet is the object the marks were read from.
	StatefulSet string `json:"statefulset,omitempty"`
	// Name and Namespace: the HelmRelease (flux) or Application (argocd).
	Name      string `json:"name,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	// Evidence is the label or annotation that says so.
	Evidence string `json:"evidence,omitempty"`
}

func (o Owner) String() string {
	switch o.Kind {
	case OwnerFlux:
		return fmt.Sprintf("Flux (HelmRelease %s/%s)", o.Namespace, o.Name)
	case OwnerArgoCD:
		return fmt.Sprintf("Argo CD (Application %s)", o.Name)
	case OwnerHelm:
		return "Helm (release " + o.Release + ")"
	case OwnerOther:
		return "something other than Helm (no Helm release record)"
	}
	return "nothing (no Vault StatefulSet)"
}

// ReleaseOwner finds the Vault StatefulSet of release in the namespace (by name, as
// the agent's fullnameOverride names it, else any StatefulSet of the vault chart there:
// Flux prefixes release names with the target namespace) and says who owns it. Several
// Vault StatefulSets under other names: the first by name, and an error naming them all
// when none is the release's.
func (c *Cluster) ReleaseOwner(ctx context.Context, release string) (*Owner, error) {
	sts := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace)
	obj, err := sts.Get(ctx, release, metav1.GetOptions{})
	var meta metav1.ObjectMeta
	switch {
	case err == nil:
		meta = obj.ObjectMeta
	case apierrors.IsNotFound(err):
		list, err := sts.List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vault"})
		if err != nil {
			return nil, fmt.Errorf("list the Vault StatefulSets in %s: %w", c.cfg.Namespace, err)
		}
		if len(list.Items) == 0 {
			return &Owner{Kind: OwnerNone}, nil
		}
		sort.Slice(list.Items, func(i, j int) bool { return list.Items[i].Name < list.Items[j].Name })
		meta = list.Items[0].ObjectMeta
	default:
		return nil, fmt.Errorf("read StatefulSet %s/%s: %w", c.cfg.Namespace, release, err)
	}
	o := &Owner{Release: meta.Labels["app.kubernetes.io/instance"], StatefulSet: meta.Name}
	if o.Release == "" {
		o.Release = meta.Name
	}
	switch {
	case meta.Labels[FluxNameLabel] != "":
		o.Kind, o.Name, o.Namespace = OwnerFlux, meta.Labels[FluxNameLabel], meta.Labels[FluxNamespaceLabel]
		o.Evidence = fmt.Sprintf("label %s=%s on StatefulSet %s", FluxNameLabel, o.Name, meta.Name)
	case meta.Annotations[ArgoTrackingAnnotation] != "":
		id := meta.Annotations[ArgoTrackingAnnotation]
		o.Kind, o.Name = OwnerArgoCD, id[:max(strings.IndexByte(id, ':'), 0)]
		if o.Name == "" {
			o.Name = id
		}
		o.Evidence = fmt.Sprintf("annotation %s=%s on StatefulSet %s", ArgoTrackingAnnotation, id, meta.Name)
	case meta.Labels[ArgoInstanceLabel] != "":
		o.Kind, o.Name = OwnerArgoCD, meta.Labels[ArgoInstanceLabel]
		o.Evidence = fmt.Sprintf("label %s=%s on StatefulSet %s", ArgoInstanceLabel, o.Name, meta.Name)
	case c.releaseRecorded(o.Release):
		o.Kind = OwnerHelm
		o.Evidence = fmt.Sprintf("Helm release %s, no Flux or Argo CD marks on StatefulSet %s", o.Release, meta.Name)
	default:
		// Argo CD with label tracking under the chart's own instance label, kubectl
		// apply of rendered manifests: Helm objects with no Helm release record.
		o.Kind = OwnerOther
		o.Evidence = fmt.Sprintf("StatefulSet %s has no Helm release record %s and no Flux or Argo CD marks", meta.Name, o.Release)
	}
	return o, nil
}

// releaseRecorded reports whether Helm keeps a record of the release in the namespace
// (an account that may not read Secrets is told yes: only the install account, which
// reads them, acts on the answer).
func (c *Cluster) releaseRecorded(release string) bool {
	cfg, err := c.helm()
	if err != nil {
		return false
	}
	_, err = cfg.Releases.Last(release)
	if _, refused := ParseForbidden(err); refused {
		return true
	}
	return err == nil
}

// HelmRelease is Flux's HelmRelease, as the agent reads and suspends it.
var helmReleaseGVR = schema.GroupVersionResource{Group: "helm.toolkit.fluxcd.io", Version: "v2", Resource: "helmreleases"}

// ErrNoHelmRelease means the HelmRelease the configuration names does not exist.
var ErrNoHelmRelease = errors.New("no such HelmRelease")

// HelmReleaseState is what the agent reads of a HelmRelease.
type HelmReleaseState struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Suspended bool   `json:"suspended"`
	// Ready is the Ready condition's status ("True", "False", "Unknown") and its
	// reason and message; Observed whether it describes the current generation.
	Ready    string `json:"ready"`
	Reason   string `json:"reason,omitempty"`
	Message  string `json:"message,omitempty"`
	Observed bool   `json:"observed"`
	// LastAttempted is the generation helm-controller last worked on; History the
	// release revisions it made, newest first (status.history[].version).
	History []int64 `json:"history,omitempty"`
}

func (c *Cluster) dynamic() (dynamic.Interface, error) { return dynamic.NewForConfig(c.rest) }

// HelmRelease reads a HelmRelease.
func (c *Cluster) HelmRelease(ctx context.Context, namespace, name string) (*HelmReleaseState, error) {
	dc, err := c.dynamic()
	if err != nil {
		return nil, err
	}
	u, err := dc.Resource(helmReleaseGVR).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("%w %s/%s", ErrNoHelmRelease, namespace, name)
	}
	if err != nil {
		return nil, fmt.Errorf("read HelmRelease %s/%s: %w", namespace, name, err)
	}
	return helmReleaseState(u), nil
}

func helmReleaseState(u *unstructured.Unstructured) *HelmReleaseState {
	st := &HelmReleaseState{Namespace: u.GetNamespace(), Name: u.GetName(), Ready: "Unknown"}
	st.Suspended, _, _ = unstructured.NestedBool(u.Object, "spec", "suspend")
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] != "Ready" {
			continue
		}
		st.Ready, _ = m["status"].(string)
		st.Reason, _ = m["reason"].(string)
		st.Message, _ = m["message"].(string)
		og, _, _ := unstructured.NestedInt64(m, "observedGeneration")
		st.Observed = og == u.GetGeneration()
	}
	hist, _, _ := unstructured.NestedSlice(u.Object, "status", "history")
	for _, h := range hist {
		if m, ok := h.(map[string]any); ok {
			v, _, _ := unstructured.NestedInt64(m, "version")
			st.History = append(st.History, v)
		}
	}
	return st
}

// SuspendHelmRelease sets spec.suspend as `flux suspend helmrelease` and `flux resume
// helmrelease` do (a merge patch of that one field). Resuming also asks for a
// reconcile at once (the reconcile.fluxcd.io/requestedAt annotation, as `flux resume`
// sets it), instead of at the next interval.
func (c *Cluster) SuspendHelmRelease(ctx context.Context, namespace, name string, suspend bool, now time.Time) error {
	dc, err := c.dynamic()
	if err != nil {
		return err
	}
	patch := fmt.Sprintf(`{"spec":{"suspend":%t}}`, suspend)
	if !suspend {
		patch = fmt.Sprintf(`{"metadata":{"annotations":{"reconcile.fluxcd.io/requestedAt":%q}},"spec":{"suspend":false}}`, now.UTC().Format(time.RFC3339Nano))
	}
	_, err = dc.Resource(helmReleaseGVR).Namespace(namespace).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: "pve-vault-agent"})
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("%w %s/%s", ErrNoHelmRelease, namespace, name)
	}
	if err != nil {
		verb := map[bool]string{true: "suspend", false: "resume"}[suspend]
		return fmt.Errorf("%s HelmRelease %s/%s: %w", verb, namespace, name, err)
	}
	return nil
}

// RequestReconcile asks helm-controller to reconcile the HelmRelease now, as `flux
// reconcile helmrelease` does (the reconcile.fluxcd.io/requestedAt annotation);
// WaitHelmReleaseReady with the same time waits until it was handled.
func (c *Cluster) RequestReconcile(ctx context.Context, namespace, name string, at time.Time) error {
	dc, err := c.dynamic()
	if err != nil {
		return err
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{"reconcile.fluxcd.io/requestedAt":%q}}}`, at.UTC().Format(time.RFC3339Nano))
	if _, err := dc.Resource(helmReleaseGVR).Namespace(namespace).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: "pve-vault-agent"}); err != nil {
		return fmt.Errorf("request a reconcile of HelmRelease %s/%s: %w", namespace, name, err)
	}
	return nil
}

// WaitHelmReleaseReady waits until helm-controller reports the HelmRelease Ready for its
// current generation (and, when after is set, reconciled at or after it: a Ready of
// before the resume is not the answer). A Ready False with a terminal reason (the
// install or upgrade failed) ends the wait at once with that message.
func (c *Cluster) WaitHelmReleaseReady(ctx context.Context, namespace, name string, after time.Time, timeout time.Duration) (*HelmReleaseState, error) {
	dc, err := c.dynamic()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last *HelmReleaseState
	for {
		u, err := dc.Resource(helmReleaseGVR).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			last = helmReleaseState(u)
			handled, _, _ := unstructured.NestedString(u.Object, "status", "lastHandledReconcileAt")
			fresh := after.IsZero() || handled != "" && !reconciledBefore(handled, after)
			switch {
			case last.Ready == "True" && last.Observed && fresh && !last.Suspended:
				return last, nil
			case last.Ready == "False" && last.Observed && fresh && terminalReason(last.Reason):
				return last, fmt.Errorf("HelmRelease %s/%s is not Ready: %s: %s", namespace, name, last.Reason, last.Message)
			}
		} else if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w %s/%s", ErrNoHelmRelease, namespace, name)
		}
		select {
		case <-ctx.Done():
			if last == nil {
				return nil, fmt.Errorf("HelmRelease %s/%s: %w", namespace, name, err)
			}
			return last, fmt.Errorf("HelmRelease %s/%s not Ready after %s: Ready %s %s: %s", namespace, name, timeout, last.Ready, last.Reason, last.Message)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// reconciledBefore reports whether the requestedAt token helm-controller last handled
// is older than t (the token is the RFC 3339 time SuspendHelmRelease wrote).
func reconciledBefore(handled string, t time.Time) bool {
	h, err := time.Parse(time.RFC3339Nano, handled)
	return err != nil || h.Before(t)
}

// terminalReason: helm-controller's reasons for a Ready False that retrying the wait
// will not change (helm-controller api v2 condition reasons).
func terminalReason(reason string) bool {
	switch reason {
	case "InstallFailed", "UpgradeFailed", "RollbackFailed", "UninstallFailed", "TestFailed", "ArtifactFailed", "InitFailed":
		return true
	}
	return false
}
