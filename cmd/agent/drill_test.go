package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// drillObjects lists the drill objects of the release in the lab's namespace.
func (cl *clusterLab) drillObjects(t *testing.T, ns string) (pods []corev1.Pod, others int) {
	t.Helper()
	ctx := context.Background()
	sel := metav1.ListOptions{LabelSelector: "pva.io/drill,pva.io/release=" + cl.release}
	p, err := cl.cs.CoreV1().Pods(ns).List(ctx, sel)
	if err != nil {
		t.Fatal(err)
	}
	cms, _ := cl.cs.CoreV1().ConfigMaps(ns).List(ctx, sel)
	secrets, _ := cl.cs.CoreV1().Secrets(ns).List(ctx, sel)
	policies, _ := cl.cs.NetworkingV1().NetworkPolicies(ns).List(ctx, sel)
	return p.Items, len(cms.Items) + len(secrets.Items) + len(policies.Items)
}

// The drill verb passes on a good snapshot; killed with SIGKILL while its pod runs, it
// leaves objects that drill --cleanup, or the next drill, deletes.
func TestDrillVerbAndKill9(t *testing.T) {
	cl := newClusterLab(t, 1, "", "")
	ns := "cl-" + strings.TrimPrefix(cl.release, "vault-")
	if r := runBinary(t, nil, "backup-now", "--config", cl.config); r.code != 0 {
		t.Fatalf("backup-now: %s", r.stderr)
	}
	r := runBinary(t, nil, "drill", "--config", cl.config)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "drill PASSED in ") || !regexp.MustCompile(`(?m)^\s+ok\s+canary\s`).MatchString(r.stdout) {
		t.Fatalf("drill: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("drill verb:\n%s", r.stdout)
	if r := runBinary(t, nil, "drill", "--snapshot", "x", "--latest", "--config", cl.config); r.code != 2 {
		t.Fatalf("--snapshot with --latest: exit %d", r.code)
	}

	kill := func() {
		t.Helper()
		cmd := exec.Command(binary, "drill", "--config", cl.config)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		err := lab.WaitFor(context.Background(), time.Minute, "the drill pod to run", func(context.Context) error {
			if pods, _ := cl.drillObjects(t, ns); len(pods) != 1 || pods[0].Status.Phase != corev1.PodRunning {
				return errors.New("not yet")
			}
			return nil
		})
		cmd.Process.Kill()
		if err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if pods, others := cl.drillObjects(t, ns); len(pods) != 1 || others != 3 {
			t.Fatalf("after kill -9: %d pods, %d other objects; want what the killed drill made", len(pods), others)
		}
	}
	kill()
	r = runBinary(t, nil, "drill", "--cleanup", "-o", "json", "--config", cl.config)
	var cleaned struct{ Deleted []string }
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &cleaned) != nil || len(cleaned.Deleted) != 4 {
		t.Fatalf("drill --cleanup: exit %d %s %s", r.code, r.stdout, r.stderr)
	}
	if pods, others := cl.drillObjects(t, ns); len(pods)+others != 0 {
		t.Fatalf("left after --cleanup: %d pods, %d others", len(pods), others)
	}

	kill()
	r = runBinary(t, nil, "drill", "-o", "json", "--config", cl.config)
	var rep struct {
		Passed  bool
		Cleaned []string
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil || !rep.Passed || len(rep.Cleaned) != 8 {
		t.Fatalf("drill after a killed one: exit %d %s %s", r.code, r.stdout, r.stderr)
	}
	if pods, others := cl.drillObjects(t, ns); len(pods)+others != 0 {
		t.Fatalf("left after the next drill: %d pods, %d others", len(pods), others)
	}
	r = runBinary(t, nil, "status", "-o", "json", "--config", cl.config)
	if !strings.Contains(r.stdout, `"last_drill"`) || !strings.Contains(r.stdout, `"passed": true`) {
		t.Fatalf("status: %s", r.stdout)
	}
}

// A drill killed with SIGKILL after it unsealed the restored copy leaves that copy
// running, unsealed: the pod's deadline (snapshots.drill_deadline, activeDeadlineSeconds)
// has the kubelet stop it even though nobody cleans up, and the daemon deletes what is
// left when it starts. The pod admits nothing but the API port, from the nodes.
func TestKilledDrillEndsAtItsDeadline(t *testing.T) {
	const deadline = 20 * time.Second
	cl := newClusterLab(t, 1, "", fmt.Sprintf("  drill_deadline: %s\n", deadline))
	ns := "cl-" + strings.TrimPrefix(cl.release, "vault-")
	if r := runBinary(t, nil, "backup-now", "--config", cl.config); r.code != 0 {
		t.Fatalf("backup-now: %s", r.stderr)
	}
	cmd := exec.Command(binary, "drill", "--config", cl.config)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	err := lab.WaitFor(context.Background(), 2*time.Minute, "the drill's restored copy to be unsealed", func(ctx context.Context) error {
		pods, _ := cl.drillObjects(t, ns)
		if len(pods) != 1 || pods[0].Status.Phase != corev1.PodRunning {
			return errors.New("no running drill pod")
		}
		pod = pods[0]
		v := cl.pods.Vault(pod.Name)
		if v == nil {
			return errors.New("no process")
		}
		n, err := vault.NewNode("drill", v.Direct, nil)
		if err != nil {
			return err
		}
		if st, err := n.SealStatus(ctx); err != nil || st.Sealed || !st.Initialized {
			return errors.New("not unsealed yet")
		}
		// Sealed by the forced restore, then unsealed with the keyfile: the restored
		// data is what answers (its cluster id is the production one).
		if h, err := n.Health(ctx); err != nil || h.ClusterID != cl.clusterID(t) {
			return errors.New("not the restored data yet")
		}
		return nil
	})
	cmd.Process.Kill()
	_ = cmd.Wait()
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	if pod.Spec.ActiveDeadlineSeconds == nil || time.Duration(*pod.Spec.ActiveDeadlineSeconds)*time.Second != deadline {
		t.Fatalf("drill pod deadline %v, want %s", pod.Spec.ActiveDeadlineSeconds, deadline)
	}
	np, err := cl.cs.NetworkingV1().NetworkPolicies(ns).Get(context.Background(), pod.Name, metav1.GetOptions{})
	if err != nil || len(np.Spec.PolicyTypes) != 2 || len(np.Spec.Egress) != 0 {
		t.Fatalf("drill NetworkPolicy: %+v %v", np, err)
	}
	for _, in := range np.Spec.Ingress {
		if len(in.Ports) != 1 || in.Ports[0].Port.IntValue() != 8200 {
			t.Fatalf("drill ingress rule %+v", in)
		}
	}
	start := pod.Status.StartTime.Time
	var stopped time.Duration
	err = lab.WaitFor(context.Background(), deadline+15*time.Second, "the drill pod's Vault to be stopped at its deadline", func(ctx context.Context) error {
		if cl.pods.Vault(pod.Name) != nil {
			return errors.New("still running")
		}
		if stopped == 0 {
			stopped = time.Since(start)
		}
		if p, err := cl.cs.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{}); err != nil || p.Status.Reason != "DeadlineExceeded" || p.Status.Phase != corev1.PodFailed {
			return errors.New("the pod has not failed with DeadlineExceeded yet")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the unsealed copy of a killed drill ran %s after the kill, %s after the pod started (deadline %s)",
		(stopped - killed.Sub(start)).Round(100*time.Millisecond), stopped.Round(100*time.Millisecond), deadline)
	d := startDaemon(t, cl.config, 0)
	err = lab.WaitFor(context.Background(), time.Minute, "the daemon to delete the killed drill's objects", func(context.Context) error {
		if pods, others := cl.drillObjects(t, ns); len(pods)+others != 0 {
			return fmt.Errorf("%d pods, %d others", len(pods), others)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, tailLines(d.Logs(), 20))
	}
	d.stop(t)
}

// clusterID is the cluster id of the lab's Vault, from its keyfile.
func (cl *clusterLab) clusterID(t *testing.T) string {
	t.Helper()
	kf, err := vault.ReadKeyfile(context.Background(), cl.keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	return kf.ClusterID
}
