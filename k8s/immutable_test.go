package k8s

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Each field Kubernetes forbids changing is named with both values; the ones it allows
// (replicas, the pod template) are not.
func TestImmutableDiff(t *testing.T) {
	spec := func(sc, size string, replicas int32, image string) *appsv1.StatefulSetSpec {
		return &appsv1.StatefulSetSpec{Replicas: &replicas, ServiceName: "vault-internal",
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "vault"}},
			Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "vault", Image: image}}}},
			VolumeClaimTemplates: []corev1.PersistentVolumeClaim{{ObjectMeta: metav1.ObjectMeta{Name: "data"},
				Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &sc, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
					Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}}}}}}
	}
	if d := immutableDiff(spec("manual", "10Gi", 1, "vault:1"), spec("manual", "10Gi", 3, "vault:2")); len(d) != 0 {
		t.Fatalf("replicas and image are mutable: %v", d)
	}
	d := strings.Join(immutableDiff(spec("manual", "10Gi", 1, "v"), spec("pva-vault", "20Gi", 1, "v")), "\n")
	for _, want := range []string{`volumeClaimTemplates[data].storageClassName: live "manual", would be "pva-vault"`,
		`volumeClaimTemplates[data].resources.requests.storage: live "10Gi", would be "20Gi"`} {
		if !strings.Contains(d, want) {
			t.Errorf("missing %q in:\n%s", want, d)
		}
	}
	other := spec("manual", "10Gi", 1, "v")
	other.ServiceName = "vault-headless"
	other.VolumeClaimTemplates[0].Name = "audit"
	d = strings.Join(immutableDiff(spec("manual", "10Gi", 1, "v"), other), "\n")
	for _, want := range []string{`serviceName: live "vault-internal", would be "vault-headless"`, "volumeClaimTemplates[audit]: not in the live StatefulSet", "volumeClaimTemplates[data]: in the live StatefulSet, would be removed"} {
		if !strings.Contains(d, want) {
			t.Errorf("missing %q in:\n%s", want, d)
		}
	}
}
