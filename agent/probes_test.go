package agent

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The deployment write-up's values (testdata, exactly) carry a liveness probe that fails
// while Vault is uninitialised or sealed, and the lab kubelet runs it as the kubelet
// does: an uninitialised pod is restarted after 60 s + 6 × 10 s, and after its second
// failure waits in CrashLoopBackOff, refusing connections. init, run right then, rides
// through it (it waits for the pod to answer; before, it failed on the refused
// connection), the values are warned about, and the restarts a recover sees are counted.
func TestWriteupLivenessProbeRestartsAndInitRidesThrough(t *testing.T) {
	writeup, err := filepath.Abs(filepath.Join("testdata", "writeup-values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	vl := newVaultLabWith(t, labOptions{nodes: 1, valuesFiles: []string{writeup}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if w := strings.Join(ValuesWarnings(vl.cfg), "\n"); !strings.Contains(w, "writeup-values.yaml: server.livenessProbe: the liveness probe /v1/sys/health?standbyok=true fails while Vault is sealed") {
		t.Fatalf("no warning for the write-up's liveness probe: %q", w)
	}
	t0 := time.Now()
	if err := pollTest(ctx, 8*time.Minute, func() error {
		p, err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Get(ctx, vl.pod(0), metav1.GetOptions{})
		if err != nil || len(p.Status.ContainerStatuses) == 0 {
			return errors.New("no pod")
		}
		if w := p.Status.ContainerStatuses[0].State.Waiting; w == nil || w.Reason != "CrashLoopBackOff" {
			return errors.New("not in back-off yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("the uninitialised pod was restarted by its liveness probe %d times and waits in CrashLoopBackOff %s after install", vl.kubelet.Restarts(vl.pod(0)), time.Since(t0).Round(time.Second))
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatalf("init after the liveness probe restarted the pod: %v\n%s", err, tail(vl.logs.String(), 20))
	}
	st := GetStatus(ctx, vl.env)
	if !strings.Contains(strings.Join(st.Warnings, "\n"), "fails while Vault is sealed") {
		t.Fatalf("status does not warn about the live liveness probe: %v", st.Warnings)
	}
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	vl.rebuild(t, ctx, 0)
	before := vl.kubelet.Restarts(vl.pod(0))
	t1 := time.Now()
	if _, err := Recover(ctx, vl.env, RecoverOptions{}); err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 20))
	}
	t.Logf("recover took %s; liveness restarts during it: %d", time.Since(t1).Round(100*time.Millisecond), vl.kubelet.Restarts(vl.pod(0))-before)
}
