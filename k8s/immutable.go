package k8s

import (
	"context"
	"fmt"
	"reflect"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// ImmutableChanges lists what the rendered manifest would change in the live
// StatefulSet of release that Kubernetes forbids changing: everything but replicas,
// ordinals, template, updateStrategy, persistentVolumeClaimRetentionPolicy and
// minReadySeconds (k8s.io/kubernetes pkg/apis/apps/validation,
// ValidateStatefulSetUpdate: "updates to statefulset spec for fields other than …
// are forbidden"). The agent checks for the fields its values decide: the selector,
// serviceName, podManagementPolicy and the claim templates' storage class, access modes
// and size. None when the StatefulSet does not exist yet.
func (c *Cluster) ImmutableChanges(ctx context.Context, release, manifest string) ([]string, error) {
	live, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(ctx, release, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read StatefulSet %s: %w", release, err)
	}
	obj, ok := splitManifest(manifest)["StatefulSet/"+release]
	if !ok {
		return nil, nil
	}
	b, err := yaml.Marshal(obj)
	if err != nil {
		return nil, err
	}
	var want appsv1.StatefulSet
	if err := yaml.Unmarshal(b, &want); err != nil {
		return nil, fmt.Errorf("rendered StatefulSet %s: %w", release, err)
	}
	return immutableDiff(&live.Spec, &want.Spec), nil
}

func immutableDiff(live, want *appsv1.StatefulSetSpec) []string {
	var out []string
	diff := func(field string, a, b any) {
		if !reflect.DeepEqual(a, b) {
			out = append(out, fmt.Sprintf("%s: live %v, would be %v", field, show(a), show(b)))
		}
	}
	if want.Selector != nil {
		diff("selector", live.Selector.MatchLabels, want.Selector.MatchLabels)
	}
	diff("serviceName", live.ServiceName, want.ServiceName)
	if want.PodManagementPolicy != "" {
		diff("podManagementPolicy", live.PodManagementPolicy, want.PodManagementPolicy)
	}
	liveT := claimTemplates(live.VolumeClaimTemplates)
	for name, w := range claimTemplates(want.VolumeClaimTemplates) {
		l, ok := liveT[name]
		if !ok {
			out = append(out, fmt.Sprintf("volumeClaimTemplates[%s]: not in the live StatefulSet, would be added", name))
			continue
		}
		f := "volumeClaimTemplates[" + name + "]."
		diff(f+"storageClassName", deref(l.StorageClassName), deref(w.StorageClassName))
		diff(f+"accessModes", l.AccessModes, w.AccessModes)
		diff(f+"resources.requests.storage", l.Resources.Requests.Storage().String(), w.Resources.Requests.Storage().String())
	}
	for name := range liveT {
		if _, ok := claimTemplates(want.VolumeClaimTemplates)[name]; !ok {
			out = append(out, fmt.Sprintf("volumeClaimTemplates[%s]: in the live StatefulSet, would be removed", name))
		}
	}
	sort.Strings(out)
	return out
}

func claimTemplates(ts []corev1.PersistentVolumeClaim) map[string]corev1.PersistentVolumeClaimSpec {
	out := map[string]corev1.PersistentVolumeClaimSpec{}
	for _, t := range ts {
		out[t.Name] = t.Spec
	}
	return out
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func show(v any) string {
	switch x := v.(type) {
	case string:
		if x == "" {
			return `""`
		}
		return fmt.Sprintf("%q", x)
	case []corev1.PersistentVolumeAccessMode:
		var s []string
		for _, m := range x {
			s = append(s, string(m))
		}
		return "[" + strings.Join(s, ",") + "]"
	}
	return fmt.Sprintf("%v", v)
}
