package k8s

import (
	"context"
	"io"
	"log/slog"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// The Priority admission plugin reads PriorityClasses from an informer cache, so the
// first pod after the class was created can be refused (seen in CI on the lab's real
// kube-apiserver 1.37). The create is retried for that refusal only.
func TestDrillPodCreateWaitsForThePriorityClassCache(t *testing.T) {
	notSeen := apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, "vault-drill-1",
		errString("no PriorityClass with name "+DrillPriorityClass+" was found"))
	other := apierrors.NewForbidden(schema.GroupResource{Resource: "pods"}, "vault-drill-1",
		errString("exceeded quota: compute"))
	for _, tc := range []struct {
		name      string
		refusals  int
		refusal   error
		wantErr   bool
		wantTries int
	}{
		{"cache catches up", 3, notSeen, false, 4},
		{"quota is not retried", 5, other, true, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clients := fake.NewClientset()
			tries := 0
			clients.PrependReactor("create", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
				tries++
				if tries <= tc.refusals {
					return true, nil, tc.refusal
				}
				return false, nil, nil
			})
			c := &Cluster{Clients: clients, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "vault-drill-1", Namespace: "vault"},
				Spec: corev1.PodSpec{PriorityClassName: DrillPriorityClass}}
			_, err := c.createDrillPod(context.Background(), pod)
			if (err != nil) != tc.wantErr || tries != tc.wantTries {
				t.Fatalf("err %v after %d tries; want error %v after %d", err, tries, tc.wantErr, tc.wantTries)
			}
		})
	}
}

type errString string

func (e errString) Error() string { return string(e) }
