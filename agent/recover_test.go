package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// cancelOn cancels when a log record says the given recover step finished: an
// interruption at a step boundary, like an operator's Ctrl-C or a killed process.
type cancelOn struct {
	slog.Handler
	step   string
	cancel context.CancelFunc
}

func (c cancelOn) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "recover step done" {
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "step" && a.Value.String() == c.step {
				c.cancel()
			}
			return true
		})
	}
	return c.Handler.Handle(ctx, r)
}

func (c cancelOn) WithAttrs(as []slog.Attr) slog.Handler {
	return cancelOn{c.Handler.WithAttrs(as), c.step, c.cancel}
}

// readSecret reads kv/probe with a root token generated from the keyfile.
func readSecret(t *testing.T, ctx context.Context, n *vault.Node, kf *vault.Keyfile) string {
	t.Helper()
	root, err := n.GenerateRoot(ctx, kf.Keyset)
	if err != nil {
		t.Fatal(err)
	}
	defer n.RevokeSelf(ctx, root)
	v, err := n.Read(ctx, root, "kv/probe")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestRecoverAfterNodeRebuild(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	vl.cfg.Snapshots.Dir = vl.dir + "/snaps"
	if _, err := Init(ctx, vl.cfg, InitOptions{}, vl.log); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	pod := func() *vault.Node {
		n, err := vault.NewNode("vault-0", vl.pods.Vault("vault-0").Addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	n := pod()
	root, err := n.GenerateRoot(ctx, kf.Keyset)
	if err != nil {
		t.Fatal(err)
	}
	n.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"})
	if err := n.Write(ctx, root, "kv/probe", map[string]any{"value": "survives the rebuild"}); err != nil {
		t.Fatal(err)
	}
	n.RevokeSelf(ctx, root)
	if _, err := BackupNow(ctx, vl.cfg, BackupOptions{Version: "test"}, vl.log); err != nil {
		t.Fatal(err)
	}

	// A snapshot of another keyset is refused before anything changes.
	other := *vl.cfg
	other.Vault.Keyfile = vl.dir + "/other/unseal.cred"
	fk := &vault.Keyfile{Keyset: fakeKeyset(t, ctx), Created: time.Now()}
	if err := vault.WriteKeyfile(ctx, other.Vault.Keyfile, fk, vault.SystemdCreds{WithKey: "host"}, true); err != nil {
		t.Fatal(err)
	}
	rep, err := Recover(ctx, &other, RecoverOptions{}, vl.log)
	if !errors.Is(err, ErrUnknownKeyset) || len(rep.Steps) != 1 {
		t.Fatalf("foreign keyset: %v, steps %+v", err, rep.Steps)
	}

	// The node is rebuilt: Vault gone, its data directory gone, the pod deleted.
	vl.pods.Vault("vault-0").Kill()
	if err := os.RemoveAll(vl.cfg.Nodes[0].HostPath); err != nil {
		t.Fatal(err)
	}
	if err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Delete(ctx, "vault-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	// Interrupted after each step in turn, then run to the end.
	for _, stopAfter := range []string{"check", "provision", "install", "open", "restore", "unseal", "followers"} {
		ictx, icancel := context.WithCancel(ctx)
		ilog := slog.New(cancelOn{vl.log.Handler(), stopAfter, icancel})
		_, err := Recover(ictx, vl.cfg, RecoverOptions{}, ilog)
		icancel()
		if err == nil {
			t.Fatalf("recover interrupted after %s returned no error", stopAfter)
		}
	}
	rep, err = Recover(ctx, vl.cfg, RecoverOptions{}, vl.log)
	if err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 30))
	}
	t.Logf("node rebuilt → unsealed with data back: %s (including an interruption after each step)", time.Since(t0).Round(time.Millisecond))
	var names []string
	for _, s := range rep.Steps {
		names = append(names, s.Name+": "+s.Result)
	}
	if got := readSecret(t, ctx, pod(), kf); got != "survives the rebuild" {
		t.Fatalf("secret after recover: %q\nsteps:\n%s", got, strings.Join(names, "\n"))
	}
	if _, err := os.Stat(vl.cfg.Vault.Keyfile + ".recover-throwaway"); !os.IsNotExist(err) {
		t.Fatalf("throwaway keys left behind: %v", err)
	}
	// A second run finds nothing to do.
	rep, err = Recover(ctx, vl.cfg, RecoverOptions{}, vl.log)
	if err != nil || !strings.Contains(rep.Steps[3].Result, "no restore needed") {
		t.Fatalf("re-run: %v %+v", err, rep.Steps)
	}
	st := GetStatus(ctx, vl.cfg, time.Now(), vl.log)
	if len(st.Attention) != 0 || len(st.Pods) != 1 || st.Pods[0].Sealed || st.Keyfile == nil || st.LastSnapshot == nil || st.Release == nil || st.Nodes[0].Owner != "100:100" {
		t.Fatalf("status after recover: %+v", st)
	}
	vl.assertNoSecrets(t, kf)
}

// One node of three rebuilt: the cluster survives on the other two, the rebuilt pod
// rejoins through recover without a restore.
func TestRecoverHAOneNodeRebuilt(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	vl.cfg.Snapshots.Dir = vl.dir + "/snaps"
	if _, err := Init(ctx, vl.cfg, InitOptions{}, vl.log); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	if _, err := BackupNow(ctx, vl.cfg, BackupOptions{}, vl.log); err != nil {
		t.Fatal(err)
	}
	vl.pods.Vault("vault-2").Kill()
	if err := os.RemoveAll(vl.cfg.Nodes[2].HostPath); err != nil {
		t.Fatal(err)
	}
	if err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Delete(ctx, "vault-2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	rep, err := Recover(ctx, vl.cfg, RecoverOptions{}, vl.log)
	if err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 40))
	}
	t.Logf("HA, one node rebuilt → all three unsealed: %s", time.Since(t0).Round(time.Millisecond))
	if !strings.Contains(rep.Steps[3].Result, "no restore needed") {
		t.Fatalf("restored although the cluster survived: %+v", rep.Steps)
	}
	for p := 0; p < 3; p++ {
		if sealed, _ := vl.sealed(t, "vault-"+string(rune('0'+p))); sealed {
			t.Fatalf("vault-%d sealed after recover", p)
		}
	}
	vl.assertNoSecrets(t, kf)
}

// Every node rebuilt: the snapshot is restored into the first pod and the others join it.
func TestRecoverHAAllNodesRebuilt(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	vl.cfg.Snapshots.Dir = vl.dir + "/snaps"
	if _, err := Init(ctx, vl.cfg, InitOptions{}, vl.log); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	leaderNode := func() *vault.Node {
		t.Helper()
		for p := 0; p < 3; p++ {
			name := "vault-" + string(rune('0'+p))
			n, _ := vault.NewNode(name, vl.pods.Vault(name).Addr, nil)
			if h, err := n.Health(ctx); err == nil && h.Active {
				return n
			}
		}
		t.Fatal("no active node")
		return nil
	}
	var n *vault.Node
	if err := lab.WaitFor(ctx, 60*time.Second, "a leader", func(context.Context) error {
		for p := 0; p < 3; p++ {
			name := "vault-" + string(rune('0'+p))
			c, _ := vault.NewNode(name, vl.pods.Vault(name).Addr, nil)
			if h, err := c.Health(ctx); err == nil && h.Active {
				n = c
				return nil
			}
		}
		return errors.New("no leader yet")
	}); err != nil {
		t.Fatal(err)
	}
	root, err := n.GenerateRoot(ctx, kf.Keyset)
	if err != nil {
		t.Fatal(err)
	}
	n.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"})
	if err := n.Write(ctx, root, "kv/probe", map[string]any{"value": "whole cluster rebuilt"}); err != nil {
		t.Fatal(err)
	}
	n.RevokeSelf(ctx, root)
	if _, err := BackupNow(ctx, vl.cfg, BackupOptions{}, vl.log); err != nil {
		t.Fatal(err)
	}
	for p := 0; p < 3; p++ {
		name := "vault-" + string(rune('0'+p))
		vl.pods.Vault(name).Kill()
		if err := os.RemoveAll(vl.cfg.Nodes[p].HostPath); err != nil {
			t.Fatal(err)
		}
		if err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Now()
	rep, err := Recover(ctx, vl.cfg, RecoverOptions{}, vl.log)
	if err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 40))
	}
	t.Logf("HA, all three nodes rebuilt → unsealed with data back: %s (%s)", time.Since(t0).Round(time.Millisecond), rep.Steps[6].Result)
	if got := readSecret(t, ctx, leaderNode(), kf); got != "whole cluster rebuilt" {
		t.Fatalf("secret %q", got)
	}
	for p := 0; p < 3; p++ {
		if sealed, _ := vl.sealed(t, "vault-"+string(rune('0'+p))); sealed {
			t.Fatalf("vault-%d sealed after recover", p)
		}
	}
	vl.assertNoSecrets(t, kf)
}
