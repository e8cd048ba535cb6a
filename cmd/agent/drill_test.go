package main

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
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
