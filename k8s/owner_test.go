package k8s

import (
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// ReleaseOwner reads who owns a Vault from the marks the real tools leave: a Helm
// release record and nothing else (the agent or helm by hand), helm-controller's
// origin labels, Argo CD's tracking annotation or instance label, Helm's labels with no
// record (applied as plain manifests); and it finds a Vault under another release name.
func TestReleaseOwnerReadsTheMarks(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 3*time.Minute)
	o, err := e.c.ReleaseOwner(ctx, "vault")
	if err != nil || o.Kind != OwnerNone {
		t.Fatalf("empty namespace: %+v %v", o, err)
	}
	e.storage(t, ctx, 1)
	if _, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	o, err = e.c.ReleaseOwner(ctx, "vault")
	if err != nil || o.Kind != OwnerHelm || o.Release != "vault" || o.StatefulSet != "vault" {
		t.Fatalf("Helm's own release: %+v %v", o, err)
	}

	patch := func(p string) {
		t.Helper()
		if _, err := e.c.Clients.AppsV1().StatefulSets(e.ns).Patch(ctx, "vault", types.MergePatchType, []byte(p), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	patch(`{"metadata":{"labels":{"helm.toolkit.fluxcd.io/name":"vault","helm.toolkit.fluxcd.io/namespace":"flux-system"}}}`)
	o, err = e.c.ReleaseOwner(ctx, "vault")
	if err != nil || o.Kind != OwnerFlux || o.Name != "vault" || o.Namespace != "flux-system" || o.String() != "Flux (HelmRelease flux-system/vault)" {
		t.Fatalf("Flux's release: %+v %v", o, err)
	}
	patch(`{"metadata":{"labels":{"helm.toolkit.fluxcd.io/name":null,"helm.toolkit.fluxcd.io/namespace":null},"annotations":{"argocd.argoproj.io/tracking-id":"vault-app:apps/StatefulSet:` + e.ns + `/vault"}}}`)
	o, err = e.c.ReleaseOwner(ctx, "vault")
	if err != nil || o.Kind != OwnerArgoCD || o.Name != "vault-app" {
		t.Fatalf("Argo CD's (annotation tracking): %+v %v", o, err)
	}
	patch(`{"metadata":{"annotations":{"argocd.argoproj.io/tracking-id":null},"labels":{"argocd.argoproj.io/instance":"vault-lab"}}}`)
	o, err = e.c.ReleaseOwner(ctx, "vault")
	if err != nil || o.Kind != OwnerArgoCD || o.Name != "vault-lab" {
		t.Fatalf("Argo CD's (label tracking): %+v %v", o, err)
	}

	// Another namespace: the chart's objects applied as plain manifests under release
	// name "lab-vault" (Flux's targetNamespace prefix), no Helm record.
	other := e.ns + "-b"
	if _, err := e.c.Clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: other}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app.kubernetes.io/name": "vault", "app.kubernetes.io/instance": "lab-vault", "app.kubernetes.io/managed-by": "Helm"}
	sel := map[string]string{"app.kubernetes.io/name": "vault"}
	sts := &appsv1.StatefulSet{ObjectMeta: metav1.ObjectMeta{Name: "lab-vault", Labels: labels}, Spec: appsv1.StatefulSetSpec{
		Selector: &metav1.LabelSelector{MatchLabels: sel},
		Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: sel}, Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "vault", Image: "hashicorp/vault:2.0.4"}}}},
	}}
	if _, err := e.c.Clients.AppsV1().StatefulSets(other).Create(ctx, sts, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	oc, err := Connect(ctx, ClusterConfig{Kubeconfig: readFile(t, e.cp.Kubeconfig), Source: e.cp.Kubeconfig, Namespace: other}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	o, err = oc.ReleaseOwner(ctx, "vault")
	if err != nil || o.Kind != OwnerOther || o.Release != "lab-vault" || o.StatefulSet != "lab-vault" {
		t.Fatalf("plain manifests under another name: %+v %v", o, err)
	}
}
