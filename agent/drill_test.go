package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// drillLeftovers lists the drill objects of the release still in the namespace.
func (vl *vaultLab) drillLeftovers(t *testing.T) []string {
	t.Helper()
	ctx := context.Background()
	sel := metav1.ListOptions{LabelSelector: k8s.DrillSelector(vl.release)}
	var out []string
	ns := vl.cfg.Chart.Namespace
	if l, err := vl.cs.CoreV1().Pods(ns).List(ctx, sel); err == nil {
		for _, o := range l.Items {
			out = append(out, "pod/"+o.Name)
		}
	}
	if l, err := vl.cs.CoreV1().ConfigMaps(ns).List(ctx, sel); err == nil {
		for _, o := range l.Items {
			out = append(out, "configmap/"+o.Name)
		}
	}
	if l, err := vl.cs.NetworkingV1().NetworkPolicies(ns).List(ctx, sel); err == nil {
		for _, o := range l.Items {
			out = append(out, "networkpolicy/"+o.Name)
		}
	}
	if l, err := vl.cs.CoreV1().Secrets(ns).List(ctx, sel); err == nil {
		for _, o := range l.Items {
			out = append(out, "secret/"+o.Name)
		}
	}
	return out
}

func checkNames(rep *DrillReport) string {
	var s []string
	for _, c := range rep.Checks {
		s = append(s, c.Name+"="+map[bool]string{true: "ok", false: "FAIL"}[c.OK])
	}
	return strings.Join(s, " ")
}

// A good snapshot passes every check in a throwaway pod the release never counts, and
// nothing of the drill is left; production is not touched.
func TestDrillPassesAndLeavesNothing(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx := ctxFor(t, 4*time.Minute)
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	brep, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := vl.env.Cluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before, _, err := cl.ServerPods(ctx, vl.release)
	if err != nil || len(before) != 1 {
		t.Fatalf("server pods %v %v", before, err)
	}

	// While the drill runs, the release's pod listing never shows (or rejects) it.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var seen []string
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			pods, rejected, err := cl.ServerPods(ctx, vl.release)
			if err == nil && (len(pods) != 1 || len(rejected) != 0) {
				seen = append(seen, pods[len(pods)-1].Name)
			}
		}
	}()
	rep, err := Drill(ctx, vl.env, DrillOptions{})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("drill: %v\n%s", err, tail(vl.logs.String(), 40))
	}
	if len(seen) > 0 {
		t.Fatalf("the release's pod listing saw the drill pod: %v", seen)
	}
	if !rep.Passed || rep.Snapshot != brep.Snapshot.Path || checkNames(rep) != "offline=ok keyset=ok unseal=ok cluster=ok raft index=ok canary=ok" {
		t.Fatalf("report %+v: %s", rep, checkNames(rep))
	}
	var steps []string
	for _, st := range rep.Steps {
		steps = append(steps, fmt.Sprintf("%s %.1fs", st.Name, st.Seconds))
	}
	t.Logf("drill in the lab: %.1f s (pod %s on %s): %s", rep.DurationSecs, rep.Pod, rep.Node, strings.Join(steps, ", "))
	if left := vl.drillLeftovers(t); len(left) != 0 {
		t.Fatalf("the drill left %v", left)
	}
	after, _, _ := cl.ServerPods(ctx, vl.release)
	if len(after) != 1 || after[0].UID != before[0].UID {
		t.Fatalf("production pod changed: %+v → %+v", before, after)
	}
	if sealed, _ := vl.sealed(t, vl.pod(0)); sealed {
		t.Fatal("production sealed after the drill")
	}
	m, err := snapshot.ReadManifest(brep.Snapshot.Path)
	if err != nil || m.Drill == nil || !m.Drill.Passed {
		t.Fatalf("manifest drill record %+v %v", m, err)
	}
	if _, err := snapshot.CheckFile(brep.Snapshot.Path); err != nil {
		t.Fatalf("the manifest rewrite broke the snapshot's check: %v", err)
	}
	rec, err := LastDrill(vl.env)
	if err != nil || rec.Last == nil || !rec.Last.Passed || rec.LastSuccess.IsZero() || rec.Failures != 0 {
		t.Fatalf("drill record %+v %v", rec, err)
	}
	st := GetStatus(ctx, vl.env)
	if st.LastDrill == nil || !st.LastDrill.Passed {
		t.Fatalf("status drill %+v", st.LastDrill)
	}

	// The daemon's schedule (compressed to 2 s) runs the next drill; metrics show it.
	vl.cfg.Snapshots.DrillSchedule = "2s"
	daemonStart := time.Now()
	addr, shutdown := runDaemon(t, ctx, vl, DaemonOptions{})
	if err := poll(ctx, RealClock{}, 100*time.Millisecond, time.Minute, "a scheduled drill", func(context.Context) error {
		rec, err := LastDrill(vl.env)
		if err != nil || rec.Last == nil || rec.Last.Started.Before(daemonStart) {
			return errNotYet
		}
		if !rec.Last.Passed {
			return permanent(fmt.Errorf("scheduled drill failed: %s", rec.Last.Reason))
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, tail(vl.logs.String(), 30))
	}
	body := scrape(t, addr)
	for _, want := range []string{"pva_drill_failures_total 0", "pva_drill_last_success_timestamp_seconds 1.", "pva_drill_duration_seconds "} {
		if !strings.Contains(body, want) {
			t.Fatalf("metrics lack %q:\n%s", want, body)
		}
	}
	shutdown()
	if left := vl.drillLeftovers(t); len(left) != 0 {
		t.Fatalf("the scheduled drill left %v", left)
	}
	vl.assertNoSecrets(t, vl.keyfile(t))
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// Snapshots that pass offline checks but do not restore fail the drill with a reason:
// one of another Vault whose manifest was rewritten to match, one whose canary differs,
// one of another keyset; no room in the cluster fails at once. A killed drill's
// objects go with --cleanup or the next drill.
func TestDrillFailures(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx := ctxFor(t, 6*time.Minute)
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	good, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)

	// Another Vault's snapshot, its manifest rewritten with this cluster's facts and the
	// file's true sums: offline it is perfect.
	other := lab.TestVault(t)
	on, err := vault.NewNode("other", other.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := on.Init(ctx, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := on.Unseal(ctx, res.Keyset, vl.log); err != nil {
		t.Fatal(err)
	}
	if _, err := vl.env.waitActive(ctx, on); err != nil {
		t.Fatal(err)
	}
	forged := filepath.Join(vl.cfg.Snapshots.Dir, "vault-20200101T000000.000Z.snap")
	f, err := os.Create(forged)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := on.StreamSnapshot(ctx, res.RootToken, 10*time.Second, f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b, _ := os.ReadFile(forged)
	sum := sha256.Sum256(b)
	m := *good.Snapshot.Manifest
	m.File, m.SHA256, m.Size, m.Created = filepath.Base(forged), hex.EncodeToString(sum[:]), int64(len(b)), time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	mj, _ := json.Marshal(m)
	os.WriteFile(forged+".json", mj, 0o600)
	if _, err := snapshot.CheckFile(forged); err != nil {
		t.Fatalf("the forged snapshot should pass offline: %v", err)
	}
	rep, err := Drill(ctx, vl.env, DrillOptions{Snapshot: forged})
	if !errors.Is(err, ErrDrillFailed) || rep.Passed || !strings.Contains(rep.Reason, "unseal") || !strings.Contains(checkNames(rep), "unseal=FAIL") {
		t.Fatalf("forged snapshot: %v %+v %s", err, rep, checkNames(rep))
	}
	if left := vl.drillLeftovers(t); len(left) != 0 {
		t.Fatalf("a failed drill left %v", left)
	}
	t.Logf("forged snapshot failed in %.1f s: %s", rep.DurationSecs, rep.Reason)

	// A canary that no longer matches the keyfile's.
	withRoot(t, ctx, vl.node(t, vl.pod(0)), kf, func(root vault.Token) {
		if err := vl.node(t, vl.pod(0)).Write(ctx, root, vault.CanaryPath, map[string]any{"value": "tampered"}); err != nil {
			t.Fatal(err)
		}
	})
	tampered, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rep, err = Drill(ctx, vl.env, DrillOptions{})
	if !errors.Is(err, ErrDrillFailed) || rep.Snapshot != tampered.Snapshot.Path || !strings.Contains(checkNames(rep), "canary=FAIL") || !strings.Contains(rep.Reason, "different") {
		t.Fatalf("tampered canary: %v %+v %s", err, rep, checkNames(rep))
	}
	if m, _ := snapshot.ReadManifest(tampered.Snapshot.Path); m.Drill == nil || m.Drill.Passed {
		t.Fatalf("the failure is not in the manifest: %+v", m.Drill)
	}

	// Another keyset: refused before any pod starts.
	otherKeys := filepath.Join(vl.cfg.Snapshots.Dir, "vault-20200102T000000.000Z.snap")
	os.WriteFile(otherKeys, b, 0o600)
	m.File, m.KeysetFingerprint = filepath.Base(otherKeys), "0123456789abcdef"
	mj, _ = json.Marshal(m)
	os.WriteFile(otherKeys+".json", mj, 0o600)
	rep, err = Drill(ctx, vl.env, DrillOptions{Snapshot: otherKeys})
	if !errors.Is(err, ErrDrillFailed) || rep.Pod != "" || !strings.Contains(rep.Reason, "keyset 0123456789abcdef") || len(Hints(err)) == 0 {
		t.Fatalf("other keyset: %v %+v", err, rep)
	}

	// No room: the scheduler's answer, at once.
	if err := lab.SetNodeMemory(ctx, vl.cs, vl.cfg.Nodes[0].Name, "32Mi"); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	rep, err = Drill(ctx, vl.env, DrillOptions{Snapshot: good.Snapshot.Path})
	if !errors.Is(err, k8s.ErrNoRoom) || !strings.Contains(err.Error(), "Insufficient memory") || time.Since(t0) > 30*time.Second {
		t.Fatalf("no room: %v after %s", err, time.Since(t0))
	}
	if left := vl.drillLeftovers(t); len(left) != 0 {
		t.Fatalf("an unschedulable drill left %v", left)
	}
	if err := lab.SetNodeMemory(ctx, vl.cs, vl.cfg.Nodes[0].Name, "64Gi"); err != nil {
		t.Fatal(err)
	}

	rec, err := LastDrill(vl.env)
	if err != nil || rec.Failures != 4 || rec.Last.Passed {
		t.Fatalf("record %+v %v", rec, err)
	}
	vl.assertNoSecrets(t, kf)
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
