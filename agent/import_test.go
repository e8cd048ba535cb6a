package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// The write-up's manual snapshots, brought in after adopt: verified on import (a
// truncated one refused, the others stored, a second import a no-op), refused by
// restore until a drill opens one with the keyfile and pairs it, then restored: the
// operator's data of that day is back, Vault unsealed, and the agent's tokens (which
// the snapshot predates) minted again with the operator's token of that time.
func TestImportedSnapshotsDrilledPairedRestored(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	pod := vl.pod(0)
	out, _, root := handInit(t, ctx, vl.pods.Vault(pod).Addr, 5, 3, true)
	rootTok := vault.NewToken(root)
	vl.leader(t, ctx)
	cli := apiClient(t, vl.pods.Vault(pod).Addr, root)
	if _, err := cli.Logical().WriteWithContext(ctx, "sys/mounts/kv", map[string]any{"type": "kv"}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	manual := func(name, value string) string {
		t.Helper()
		if _, err := cli.Logical().WriteWithContext(ctx, "kv/probe", map[string]any{"value": value}); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// What `vault operator raft snapshot save` does: GET sys/storage/raft/snapshot.
		if err := cli.Sys().RaftSnapshotWithContext(ctx, f); err != nil {
			t.Fatal(err)
		}
		return p
	}
	older := manual("vault-2026-11-01.snap", "november")
	newer := manual("vault-2026-11-15.snap", "mid-november")
	// Modification times as the operator's copies carry them.
	os.Chtimes(older, time.Now(), time.Now().Add(-32*24*time.Hour))
	os.Chtimes(newer, time.Now(), time.Now().Add(-18*24*time.Hour))
	b, _ := os.ReadFile(newer)
	broken := filepath.Join(dir, "vault-truncated.snap")
	os.WriteFile(broken, b[:len(b)/2], 0o600)
	if _, err := cli.Logical().WriteWithContext(ctx, "kv/probe", map[string]any{"value": "today"}); err != nil {
		t.Fatal(err)
	}

	ks, err := ReadShares(operatorFile(t, dir, "init.json", out), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: ks, AuthToken: rootTok}); err != nil {
		t.Fatalf("adopt: %v\n%s", err, tail(vl.logs.String(), 20))
	}

	res, err := ImportSnapshots(ctx, vl.env, []string{older, broken, newer})
	if err == nil || len(res) != 3 || res[0].Error != "" || res[1].Error == "" || res[2].Error != "" {
		t.Fatalf("import: %+v %v", res, err)
	}
	stored := res[2].Stored
	if again, err := ImportSnapshots(ctx, vl.env, []string{newer}); err != nil || !again[0].Again || again[0].Stored != stored {
		t.Fatalf("second import: %+v %v", again, err)
	}
	_, es, err := Snapshots(ctx, vl.env)
	if err != nil || len(es) != 3 {
		t.Fatalf("store after import: %d entries, %v", len(es), err)
	}
	if !es[0].Manifest.Unpaired() || !es[1].Manifest.Unpaired() || es[2].Manifest.Unpaired() {
		t.Fatalf("the imports sort before adopt's first backup, unpaired: %+v %+v %+v", es[0].Manifest, es[1].Manifest, es[2].Manifest)
	}

	// Not paired: restore refuses and says to drill it.
	if _, err := Restore(ctx, vl.env, stored, RestoreOptions{}); !errors.Is(err, ErrUnknownKeyset) || !strings.Contains(strings.Join(Hints(err), " "), "drill --snapshot "+stored) {
		t.Fatalf("restore of an unpaired import: %v %v", err, Hints(err))
	}
	d, err := Drill(ctx, vl.env, DrillOptions{Snapshot: stored})
	if err != nil || !d.Passed {
		t.Fatalf("drill of the import: %v %+v\n%s", err, d, tail(vl.logs.String(), 20))
	}
	m, err := readManifest(stored)
	if err != nil || m.Unpaired() || m.KeysetFingerprint != ks.Fingerprint() || m.Drill == nil || !m.Drill.Passed {
		t.Fatalf("after the drill: %+v %v", m, err)
	}

	// Restored: their data of mid-November. The agent's tokens did not exist then: the
	// operator's token of that time mints them again.
	tf := operatorFile(t, dir, "root-token", []byte(root))
	if rep, err := Restore(ctx, vl.env, stored, RestoreOptions{AuthTokenFile: tf}); err != nil {
		t.Fatalf("restore of the paired import: %v %+v\n%s", err, rep, tail(vl.logs.String(), 30))
	}
	n := vl.leader(t, ctx)
	if got, err := n.Read(ctx, rootTok, "kv/probe"); err != nil || got != "mid-november" {
		t.Fatalf("after restore: %q %v", got, err)
	}
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatalf("backup after restoring an import: %v", err)
	}
	vl.assertNoSecrets(t, &vault.Keyfile{Keyset: ks, RetiredOperatorTokens: []vault.Token{rootTok}})
}
