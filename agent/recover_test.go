package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

func TestRecoverAfterNodeRebuild(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	writeSecret(t, ctx, vl.node(t, vl.pod(0)), kf, "survives the rebuild")
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}

	// A snapshot of another keyset is refused before anything changes.
	other := *vl.cfg
	other.Vault.Keyfile = filepath.Join(vl.dir, "other", "unseal.cred")
	fk := &vault.Keyfile{Keyset: fakeKeyset(t, ctx), Created: time.Now()}
	if err := vault.WriteKeyfile(ctx, other.Vault.Keyfile, fk, vault.SystemdCreds{WithKey: "host"}, true); err != nil {
		t.Fatal(err)
	}
	oenv := NewEnv(&other, vl.log, EnvOptions{Waits: testWaits()})
	defer oenv.Close()
	rep, err := Recover(ctx, oenv, RecoverOptions{})
	if !errors.Is(err, ErrUnknownKeyset) || !Refused(err) || len(rep.Steps) != 1 {
		t.Fatalf("foreign keyset: %v, steps %+v", err, rep.Steps)
	}

	vl.rebuild(t, ctx, 0)
	t0 := time.Now()
	// Interrupted after each step in turn (an operator's Ctrl-C, a killed process), then
	// run to the end: every step checks state first.
	for _, stopAfter := range []string{"check", "provision", "install", "open", "restore", "unseal", "followers", "tokens"} {
		ictx, icancel := context.WithCancel(ctx)
		ienv := NewEnv(vl.cfg, slog.New(cancelOn{vl.log.Handler(), "recover", stopAfter, icancel}), EnvOptions{Waits: testWaits()})
		_, err := Recover(ictx, ienv, RecoverOptions{})
		icancel()
		ienv.Close()
		if err == nil {
			t.Fatalf("recover interrupted after %s returned no error", stopAfter)
		}
	}
	rep, err = Recover(ctx, vl.env, RecoverOptions{})
	if err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 30))
	}
	t.Logf("node rebuilt → unsealed with data back: %s (including an interruption after each step)", time.Since(t0).Round(time.Millisecond))
	if got := readSecret(t, ctx, vl.node(t, vl.pod(0)), kf); got != "survives the rebuild" {
		t.Fatalf("secret after recover: %q\nsteps: %+v", got, rep.Steps)
	}
	for _, f := range []string{".recover-throwaway", ".recover-throwaway.pending"} {
		if _, err := os.Stat(vl.cfg.Vault.Keyfile + f); !os.IsNotExist(err) {
			t.Fatalf("%s left behind: %v", f, err)
		}
	}
	// A second run finds nothing to do.
	rep, err = Recover(ctx, vl.env, RecoverOptions{})
	if err != nil || rep.Opened != string(openOurs) || rep.Restored {
		t.Fatalf("re-run: %v %+v", err, rep)
	}
	st := GetStatus(ctx, vl.env)
	if len(st.Attention) != 0 || len(st.Pods) != 1 || st.Pods[0].Sealed || st.Keyfile == nil || st.LastSnapshot == nil || st.Release == nil || st.Nodes[0].Owner != "100:100" {
		t.Fatalf("status after recover: %+v", st)
	}
	vl.assertNoSecrets(t, kf)
}

// A kill -9 inside the one window an interruption cannot be deferred through (after
// Vault's init of the throwaway, before its keys reach the disk) leaves a throwaway
// cluster nobody can open. The pending marker written before the init lets the next run
// recognise it as the agent's own, empty the node and start again; without the marker
// the same state is another cluster's data and is never touched.
func TestRecoverAfterAKillBetweenThrowawayInitAndItsKeys(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	writeSecret(t, ctx, vl.node(t, vl.pod(0)), kf, "after a kill in the window")
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	vl.rebuild(t, ctx, 0)
	// Bring the pod back and initialise it as the killed run did, losing the keys.
	if _, err := Provision(ctx, vl.env, ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(ctx, vl.env, InstallOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vl.node(t, vl.pod(0)).Init(ctx, 5, 3); err != nil {
		t.Fatal(err)
	}
	rep, err := Recover(ctx, vl.env, RecoverOptions{})
	if !errors.Is(err, ErrOtherCluster) || rep.Opened != string(openUnsealOurs) {
		t.Fatalf("unknown initialised data without a marker: %v (%s)", err, rep.Opened)
	}
	os.WriteFile(vl.cfg.Vault.Keyfile+".recover-throwaway.pending", []byte(vl.pod(0)+"\n"), 0o600)
	rep, err = Recover(ctx, vl.env, RecoverOptions{})
	if err != nil || rep.Opened != string(openWipeLost) || !rep.Restored {
		t.Fatalf("recover after the kill: %v (%s)\n%s", err, rep.Opened, tail(vl.logs.String(), 30))
	}
	if got := readSecret(t, ctx, vl.node(t, vl.pod(0)), kf); got != "after a kill in the window" {
		t.Fatalf("secret %q", got)
	}
}

// One node of three rebuilt: the cluster survives on the other two, the rebuilt pod
// rejoins through recover without a restore.
func TestRecoverHAOneNodeRebuilt(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	vl.rebuild(t, ctx, 2)
	t0 := time.Now()
	rep, err := Recover(ctx, vl.env, RecoverOptions{})
	if err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 40))
	}
	t.Logf("HA, one node rebuilt → all three unsealed: %s", time.Since(t0).Round(time.Millisecond))
	if rep.Opened != string(openOurs) || rep.Restored {
		t.Fatalf("restored although the cluster survived: %+v", rep.Steps)
	}
	for p := 0; p < 3; p++ {
		if sealed, _ := vl.sealed(t, vl.pod(p)); sealed {
			t.Fatalf("%s sealed after recover", vl.pod(p))
		}
	}
	vl.assertNoSecrets(t, kf)
}

// Every node rebuilt: the snapshot is restored into the first pod and the others join
// it. A node Vault removed from the Raft configuration (1.19+: it seals itself and will
// not rejoin while it holds data) is wiped first, then rejoins.
func TestRecoverHAAllNodesRebuilt(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	writeSecret(t, ctx, vl.leader(t, ctx), kf, "whole cluster rebuilt")
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	for p := 0; p < 3; p++ {
		vl.rebuild(t, ctx, p)
	}
	t0 := time.Now()
	rep, err := Recover(ctx, vl.env, RecoverOptions{})
	if err != nil {
		t.Fatalf("recover: %v\n%s", err, tail(vl.logs.String(), 40))
	}
	t.Logf("HA, all three nodes rebuilt → unsealed with data back: %s (%s)", time.Since(t0).Round(time.Millisecond), resultNamed(t, rep.Steps, "followers").Result)
	if !rep.Restored || rep.Opened != string(openThrowawayInit) {
		t.Fatalf("the snapshot was not restored into an empty node: %+v", rep)
	}
	if got := readSecret(t, ctx, vl.leader(t, ctx), kf); got != "whole cluster rebuilt" {
		t.Fatalf("secret %q", got)
	}

	// Remove a follower from the Raft configuration: it seals itself and refuses to
	// rejoin with its data (530). Recover wipes it and lets it join again.
	leader := vl.leader(t, ctx)
	victim := vl.pod(2)
	if leader.Name == victim {
		victim = vl.pod(1)
	}
	if err := leader.RemovePeer(ctx, kf.OperatorToken, victim); err != nil {
		t.Fatal(err)
	}
	var h vault.Health
	if err := pollTest(ctx, 30*time.Second, func() error {
		var err error
		if h, err = vl.node(t, victim).Health(ctx); err != nil || !h.Removed {
			return errors.New("not removed yet")
		}
		return nil
	}); err != nil {
		t.Fatalf("the removed node does not say so: %+v %v", h, err)
	}
	if h.Code() != 530 {
		t.Fatalf("health code of a removed node: %d", h.Code())
	}
	st := GetStatus(ctx, vl.env)
	if !strings.Contains(strings.Join(st.Attention, "\n"), "removed from the Raft cluster (530)") {
		t.Fatalf("status does not report the removed node: %v", st.Attention)
	}
	rep, err = Recover(ctx, vl.env, RecoverOptions{})
	if err != nil || !strings.Contains(resultNamed(t, rep.Steps, "followers").Result, "1 wiped before rejoining") {
		t.Fatalf("recover of a removed node: %v %+v\n%s", err, rep.Steps, tail(vl.logs.String(), 30))
	}
	if sealed, _ := vl.sealed(t, victim); sealed {
		t.Fatalf("%s sealed after it rejoined", victim)
	}
	vl.assertNoSecrets(t, kf)
}

// pollTest waits for cond with a deadline.
func pollTest(ctx context.Context, d time.Duration, cond func() error) error {
	return poll(ctx, RealClock{}, 100*time.Millisecond, d, "condition", func(context.Context) error { return cond() })
}

// The open decision, without the lab: never overwrite data that is neither the
// keyfile's cluster nor the agent's own throwaway.
func TestDecideOpen(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    openFacts
		want openAction
	}{
		{"HA cluster survived", openFacts{Initialized: true, Sealed: true, OursOpen: true, KeyfileCluster: "c1"}, openOurs},
		{"empty node", openFacts{KeyfileCluster: "c1"}, openThrowawayInit},
		{"empty node, stale throwaway file", openFacts{KeyfileCluster: "c1", Throwaway: true, ThrowawayCluster: "t1"}, openThrowawayInit},
		{"open with our cluster", openFacts{Initialized: true, ClusterID: "c1", KeyfileCluster: "c1"}, openOurs},
		{"throwaway open", openFacts{Initialized: true, ClusterID: "t1", KeyfileCluster: "c1", Throwaway: true, ThrowawayCluster: "t1"}, openResume},
		{"another cluster open", openFacts{Initialized: true, ClusterID: "x9", KeyfileCluster: "c1"}, openRefuse},
		{"another cluster open beside a throwaway file", openFacts{Initialized: true, ClusterID: "x9", KeyfileCluster: "c1", Throwaway: true, ThrowawayCluster: "t1"}, openRefuse},
		{"sealed throwaway", openFacts{Initialized: true, Sealed: true, KeyfileCluster: "c1", Throwaway: true, ThrowawayCluster: "t1"}, openUnsealThrowaway},
		{"sealed, keys lost in the window", openFacts{Initialized: true, Sealed: true, KeyfileCluster: "c1", PendingInit: true}, openWipeLost},
		{"sealed, unknown", openFacts{Initialized: true, Sealed: true, KeyfileCluster: "c1"}, openUnsealOurs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, why := decideOpen(tc.f); got != tc.want {
				t.Fatalf("decideOpen = %s (%s), want %s", got, why, tc.want)
			}
		})
	}
}
