package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

func (b *backupLab) waitActive(t *testing.T) {
	t.Helper()
	if err := lab.WaitFor(context.Background(), 30*time.Second, "vault active", func(ctx context.Context) error {
		h, err := b.node.Health(ctx)
		if err == nil && !h.Active {
			err = fmt.Errorf("not active: %+v", h)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

func (b *backupLab) secret(t *testing.T, value string) string {
	t.Helper()
	ctx := context.Background()
	b.waitActive(t)
	root, err := b.node.GenerateRoot(ctx, b.kf.Keyset, vault.GenerateRootOptions{Auth: b.kf.OperatorToken})
	if err != nil {
		t.Fatal(err)
	}
	defer b.node.RevokeSelf(ctx, root)
	if value != "" {
		b.node.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"})
		if err := b.node.Write(ctx, root, "kv/probe", map[string]any{"value": value}); err != nil {
			t.Fatal(err)
		}
		return value
	}
	got, err := b.node.Read(ctx, root, "kv/probe")
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestRestoreVerb(t *testing.T) {
	b := newBackupLab(t)
	b.secret(t, "before")
	r := runBinary(t, nil, "backup-now", "--config", b.cfg)
	if r.code != 0 {
		t.Fatal(r.stderr)
	}
	snap := strings.TrimSpace(r.stdout)
	b.secret(t, "after")

	// A corrupt copy is refused before Vault is touched.
	data, _ := os.ReadFile(snap)
	data[len(data)/2] ^= 1
	bad := snap + ".corrupt.snap"
	os.WriteFile(bad, data, 0o600)
	if r := runBinary(t, nil, "restore", bad, "--yes", "--config", b.cfg); r.code != 1 || !strings.Contains(r.stderr, "invalid raft snapshot") {
		t.Fatalf("corrupt snapshot: %d %s", r.code, r.stderr)
	}
	if got := b.secret(t, ""); got != "after" {
		t.Fatalf("vault changed by a refused restore: %q", got)
	}
	// Without a terminal, --yes is required.
	if r := runBinary(t, nil, "restore", snap, "--config", b.cfg); r.code != 2 || !strings.Contains(r.stderr, "--yes") {
		t.Fatalf("no --yes: %d %s", r.code, r.stderr)
	}
	r = runBinary(t, nil, "restore", snap, "--yes", "--config", b.cfg, "-o", "json")
	if r.code != 0 || !strings.Contains(r.stdout, `"forced": false`) {
		t.Fatalf("restore: %d %s %s", r.code, r.stdout, r.stderr)
	}
	if got := b.secret(t, ""); got != "before" {
		t.Fatalf("after restore: %q", got)
	}
}

func TestStatusVerb(t *testing.T) {
	b := newBackupLab(t)
	if r := runBinary(t, nil, "backup-now", "--config", b.cfg); r.code != 0 {
		t.Fatal(r.stderr)
	}
	// The static lab has no sshd for its node: status says so and exits 1, and shows the rest.
	r := runBinary(t, nil, "status", "--config", b.cfg)
	if r.code != 1 || !strings.Contains(r.stdout, "needs attention:") || !strings.Contains(r.stdout, "last snapshot:") ||
		!strings.Contains(r.stdout, b.kf.Keyset.Fingerprint()) || !strings.Contains(r.stdout, "POD") {
		t.Fatalf("status text: %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	r = runBinary(t, nil, "status", "--config", b.cfg, "-o", "json")
	var st struct {
		Pods []struct {
			Name                string
			Sealed, Initialized bool
			Active              bool
		}
		Keyfile      struct{ Threshold int }
		LastSnapshot struct{ Verified bool } `json:"last_snapshot"`
		Attention    []string
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	if r.code != 1 || len(st.Pods) != 1 || st.Pods[0].Sealed || !st.Pods[0].Active || st.Keyfile.Threshold != 3 || !st.LastSnapshot.Verified || len(st.Attention) == 0 {
		t.Fatalf("status json: %d %+v", r.code, st)
	}
	b.v.Kill()
	b.v.Start(context.Background())
	r = runBinary(t, nil, "status", "--config", b.cfg)
	if r.code != 1 || !strings.Contains(r.stdout, "is sealed") {
		t.Fatalf("sealed pod not flagged: %s", r.stdout)
	}
}
