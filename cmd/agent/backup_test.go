package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

type backupLab struct {
	v       *lab.Vault
	cfg     string
	keyfile string
	node    *vault.Node
	kf      *vault.Keyfile
}

func newBackupLab(t *testing.T) *backupLab {
	t.Helper()
	v, cfg, keyfile := staticVaultConfig(t)
	if r := runBinary(t, nil, "init", "--config", cfg); r.code != 0 {
		t.Fatalf("init: %s", r.stderr)
	}
	kf, err := vault.ReadKeyfile(context.Background(), keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	n, err := vault.NewNode("v", v.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	return &backupLab{v: v, cfg: cfg, keyfile: keyfile, node: n, kf: kf}
}

// load writes about mib MiB of incompressible KV data with a generated root token.
func (b *backupLab) load(t *testing.T, mib int) {
	t.Helper()
	ctx := context.Background()
	root, err := b.node.GenerateRoot(ctx, b.kf.Keyset, vault.GenerateRootOptions{Auth: b.kf.OperatorToken})
	if err != nil {
		t.Fatal(err)
	}
	defer b.node.RevokeSelf(ctx, root)
	if err := b.node.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"}); err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 384<<10)
	for i := 0; i < mib*1024/512; i++ {
		rand.Read(chunk)
		if err := b.node.Write(ctx, root, fmt.Sprintf("kv/blob-%d", i), map[string]any{"v": base64.StdEncoding.EncodeToString(chunk)}); err != nil {
			t.Fatal(err)
		}
	}
}

func (b *backupLab) list(t *testing.T) []snapshot.Entry {
	t.Helper()
	r := runBinary(t, nil, "snapshots", "list", "-o", "json", "--config", b.cfg)
	if r.code != 0 {
		t.Fatalf("snapshots list: %d %s", r.code, r.stderr)
	}
	var es []snapshot.Entry
	if err := json.Unmarshal([]byte(r.stdout), &es); err != nil {
		t.Fatalf("%v: %s", err, r.stdout)
	}
	return es
}

func TestBackupNowAndSnapshotVerbs(t *testing.T) {
	b := newBackupLab(t)
	r := runBinary(t, nil, "backup-now", "--config", b.cfg, "-o", "json")
	if r.code != 0 {
		t.Fatalf("backup-now: %d %s", r.code, r.stderr)
	}
	var rep struct {
		Snapshot snapshot.Entry
		Pod      string
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	m := rep.Snapshot.Manifest
	if m == nil || m.KeysetFingerprint != b.kf.Keyset.Fingerprint() || m.ClusterID != b.kf.ClusterID || m.RaftIndex == 0 ||
		m.VaultVersion != lab.VaultVersion || m.AgentVersion != "v9.9.9-test" || m.SHA256 == "" || m.Size != rep.Snapshot.Size {
		t.Fatalf("manifest %+v", m)
	}
	r = runBinary(t, nil, "backup-now", "--config", b.cfg)
	if r.code != 0 || !strings.HasSuffix(strings.TrimSpace(r.stdout), ".snap") {
		t.Fatalf("text backup-now: %d %q %s", r.code, r.stdout, r.stderr)
	}
	if es := b.list(t); len(es) != 2 || !es[0].Verified || !es[1].Verified {
		t.Fatalf("list %+v", es)
	}
	if r := runBinary(t, nil, "snapshots", "verify", "--config", b.cfg); r.code != 0 || strings.Count(r.stdout, "ok ") != 2 {
		t.Fatalf("verify: %d %s %s", r.code, r.stdout, r.stderr)
	}
	data, _ := os.ReadFile(rep.Snapshot.Path)
	data[len(data)/2] ^= 1
	os.WriteFile(rep.Snapshot.Path, data, 0o600)
	if r := runBinary(t, nil, "snapshots", "verify", "--config", b.cfg); r.code != 1 || !strings.Contains(r.stdout, "FAIL "+rep.Snapshot.Path) {
		t.Fatalf("verify of a flipped byte: %d %s", r.code, r.stdout)
	}

	// Retention: keep the last 2 only, once a backup succeeded.
	env := []string{"PVA_SNAPSHOTS_RETENTION_KEEP_LAST=2", "PVA_SNAPSHOTS_RETENTION_DAILY=0", "PVA_SNAPSHOTS_RETENTION_WEEKLY=0", "PVA_SNAPSHOTS_RETENTION_MONTHLY=0"}
	if r := runBinary(t, env, "snapshots", "prune", "--dry-run", "--config", b.cfg); r.code != 0 || strings.Contains(r.stdout, "would remove") {
		t.Fatalf("prune dry run with 2 snapshots: %s", r.stdout)
	}
	for i := 0; i < 2; i++ {
		if r := runBinary(t, env, "backup-now", "--config", b.cfg); r.code != 0 {
			t.Fatalf("backup %d: %s", i, r.stderr)
		}
	}
	if es := b.list(t); len(es) != 2 {
		t.Fatalf("retention kept %d", len(es))
	}

	// Vault down: exit 1, nothing new, nothing pruned.
	before := b.list(t)
	b.v.Kill()
	r = runBinary(t, env, "backup-now", "--config", b.cfg)
	if r.code != 1 || !strings.Contains(r.stderr, "no active vault node") {
		t.Fatalf("vault down: %d %s", r.code, r.stderr)
	}
	if after := b.list(t); len(after) != len(before) {
		t.Fatalf("snapshots changed while Vault was down: %d → %d", len(before), len(after))
	}
	if err := b.v.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := runBinary(t, nil, "unseal", "--config", b.cfg); r.code != 0 {
		t.Fatal(r.stderr)
	}
	// Token revoked: exit 1 naming the token, nothing new.
	ctx := context.Background()
	if err := lab.WaitFor(ctx, 30*time.Second, "vault active again", func(ctx context.Context) error {
		h, err := b.node.Health(ctx)
		if err == nil && !h.Active {
			err = fmt.Errorf("not active: %+v", h)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := b.node.RevokeSelf(ctx, b.kf.SnapshotToken); err != nil {
		t.Fatal(err)
	}
	r = runBinary(t, env, "backup-now", "--config", b.cfg)
	if r.code != 1 || !strings.Contains(r.stderr, "token refused") || !strings.Contains(r.stderr, "hint: ") || !strings.Contains(r.stderr, "token rotate") {
		t.Fatalf("token revoked: %d %s", r.code, r.stderr)
	}
	if after := b.list(t); len(after) != len(before) {
		t.Fatalf("snapshots changed with a revoked token")
	}
	if vault.ContainsAny(r.stdout+r.stderr, b.kf.Keyset, b.kf.SnapshotToken) {
		t.Fatal("a secret in the output")
	}
}

// backup-now killed -9 at random points leaves nothing that list or verify takes for a
// snapshot, and the next backup succeeds; two at once are serialised.
func TestBackupNowKilledAndConcurrent(t *testing.T) {
	b := newBackupLab(t)
	b.load(t, 24)
	t0 := time.Now()
	if r := runBinary(t, nil, "backup-now", "--config", b.cfg); r.code != 0 {
		t.Fatal(r.stderr)
	}
	full := time.Since(t0)
	t.Logf("a full backup-now of ~24 MiB takes %s", full.Round(time.Millisecond))
	const trials = 24
	killed := 0
	for i := 0; i < trials; i++ {
		n, _ := rand.Int(rand.Reader, big.NewInt(int64(full)))
		cmd := exec.Command(binary, "backup-now", "--config", b.cfg)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done: // finished before the kill: fine, it is a complete snapshot
		case <-time.After(time.Duration(n.Int64())):
			cmd.Process.Signal(syscall.SIGKILL)
			<-done
			killed++
		}
		// Whatever the kill interrupted, every listed snapshot is whole: a verified one
		// matches its manifest, and one listed without its manifest (killed between the
		// two renames) is still a complete archive, renamed only after verification.
		for _, e := range b.list(t) {
			if _, err := snapshot.CheckFile(e.Path); err != nil {
				t.Fatalf("trial %d: listed snapshot %s (verified %v) is not whole: %v", i, e.Path, e.Verified, err)
			}
		}
	}
	t.Logf("%d of %d backups killed mid-way", killed, trials)
	if killed < trials/2 {
		t.Fatalf("only %d kills landed mid-backup", killed)
	}
	if r := runBinary(t, nil, "backup-now", "--config", b.cfg); r.code != 0 {
		t.Fatalf("backup after the kills: %s", r.stderr)
	}
	ents, _ := os.ReadDir(filepath.Join(filepath.Dir(b.keyfile), "..", "snaps"))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".incoming-") {
			t.Fatalf("stale partial file survived the next backup: %s", e.Name())
		}
	}

	// Two at once: both succeed, one after the other.
	var wg sync.WaitGroup
	results := make([]result, 2)
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i] = runBinary(t, nil, "backup-now", "--config", b.cfg)
		}(i)
	}
	wg.Wait()
	for i, r := range results {
		if r.code != 0 {
			t.Fatalf("concurrent backup %d: %s", i, r.stderr)
		}
		if _, err := snapshot.CheckFile(strings.TrimSpace(r.stdout)); err != nil {
			t.Fatalf("concurrent backup %d: %v", i, err)
		}
	}
	if results[0].stdout == results[1].stdout {
		t.Fatal("both backups wrote the same file")
	}
}
