package vault

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// startVault starts one lab Vault with Raft storage and returns a Node for it.
func startVault(t *testing.T) (*lab.Vault, *Node) {
	t.Helper()
	v := lab.TestVault(t)
	n, err := NewNode(v.Opts.NodeID, v.Addr, &http.Client{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return v, n
}

// logBuffer captures every log line of a test so it can be scanned for secrets.
func logBuffer() (*slog.Logger, *bytes.Buffer) {
	var b bytes.Buffer
	return slog.New(slog.NewTextHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug})), &b
}

func TestInitUnsealRestartAndWrongKeys(t *testing.T) {
	ctx := ctxFor(t, 2*time.Minute)
	log, logs := logBuffer()
	v, n := startVault(t)
	res, err := n.Init(ctx, 5, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Keyset.Keys) != 5 || res.Keyset.Threshold != 3 {
		t.Fatalf("keyset %d/%d", len(res.Keyset.Keys), res.Keyset.Threshold)
	}
	if _, err := n.Init(ctx, 5, 3); !errors.Is(err, ErrAlreadyInitialised) {
		t.Fatalf("second init: %v", err)
	}
	u, err := n.Unseal(ctx, res.Keyset, log)
	if err != nil || u.Sealed || u.SharesUsed != 3 {
		t.Fatalf("unseal %+v %v", u, err)
	}

	// Snapshot token: reads snapshots only.
	var h Health
	if err := lab.WaitFor(ctx, 30*time.Second, "active", func(ctx context.Context) error {
		h, err = n.Health(ctx)
		if err == nil && !h.Active {
			err = errors.New("not active yet")
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	snap, err := n.CreateSnapshotToken(ctx, res.RootToken)
	if err != nil {
		t.Fatal(err)
	}
	sc, _ := n.withToken(snap)
	resp, err := sc.Logical().ReadRawWithContext(ctx, "sys/storage/raft/snapshot")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("snapshot with the snapshot token: %v", err)
	}
	resp.Body.Close()
	if _, err := sc.Logical().ListWithContext(ctx, "sys/policies/acl"); err == nil {
		t.Fatal("the snapshot token can list policies")
	}
	if err := n.RevokeSelf(ctx, res.RootToken); err != nil {
		t.Fatal(err)
	}
	if err := n.LookupSelf(ctx, res.RootToken); err == nil {
		t.Fatal("root token still valid after revocation")
	}

	// A generated root token works and is revoked after use.
	root, err := n.GenerateRoot(ctx, res.Keyset)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.LookupSelf(ctx, root); err != nil {
		t.Fatalf("generated root: %v", err)
	}
	if err := n.RevokeSelf(ctx, root); err != nil {
		t.Fatal(err)
	}

	// kill -9, restart: sealed; a stale share is reset, then unsealed.
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := n.client.Sys().UnsealWithContext(ctx, res.Keyset.Keys[4].value); err != nil {
		t.Fatal(err)
	}
	u, err = n.Unseal(ctx, res.Keyset, log)
	if err != nil || u.Sealed || !u.ResetStale || !u.WasSealed {
		t.Fatalf("unseal after restart %+v %v", u, err)
	}

	// Shares of another cluster: detected at the threshold, progress reset.
	_, other := startVault(t)
	otherInit, err := other.Init(ctx, 5, 3)
	if err != nil {
		t.Fatal(err)
	}
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	u, err = n.Unseal(ctx, otherInit.Keyset, log)
	if !errors.Is(err, ErrWrongKeys) || u.SharesUsed != 3 {
		t.Fatalf("foreign keys: %+v %v", u, err)
	}
	st, err := n.SealStatus(ctx)
	if err != nil || st.Progress != 0 || !st.Sealed {
		t.Fatalf("after foreign keys: progress %d sealed %v %v", st.Progress, st.Sealed, err)
	}
	if u, err := n.Unseal(ctx, res.Keyset, log); err != nil || u.Sealed {
		t.Fatalf("own keys after the foreign attempt: %+v %v", u, err)
	}
	// A keyset whose threshold differs is refused before any share is sent.
	if _, err := n.Unseal(ctx, Keyset{Threshold: 2, Keys: res.Keyset.Keys[:2]}, log); err != nil {
		t.Fatalf("already unsealed node: %v", err)
	}

	if ContainsAny(logs.String(), res.Keyset, res.RootToken, snap, root) || ContainsAny(logs.String(), otherInit.Keyset, otherInit.RootToken) {
		t.Fatalf("a secret reached the log:\n%s", logs.String())
	}
	for _, s := range []string{fmt.Sprint(res.Keyset), fmt.Sprintf("%+v", res), fmt.Sprintf("%#v", snap)} {
		if ContainsAny(s, res.Keyset, res.RootToken, snap) {
			t.Fatalf("a secret prints: %s", s)
		}
	}
}

func testKeyfile() *Keyfile {
	return &Keyfile{Version: keyfileVersion, ClusterID: "c-123", ClusterName: "vault-cluster-x", Created: time.Now().UTC().Truncate(time.Second),
		SnapshotToken: Token{"hvs.snapshot-token-value"},
		Keyset:        Keyset{Threshold: 2, Keys: []Key{{1, "share-one-value"}, {2, "share-two-value"}, {3, "share-three-value"}}}}
}

func TestKeyfileSystemdCredsRoundTrip(t *testing.T) {
	bins := lab.Need(t)
	ctx := ctxFor(t, 30*time.Second)
	dir := filepath.Join(t.TempDir(), "state")
	path := filepath.Join(dir, "unseal.cred")
	s := SystemdCreds{WithKey: "host", Bin: bins.SystemdCreds}
	k := testKeyfile()
	if err := WriteKeyfile(ctx, path, k, s, true); err != nil {
		t.Fatal(err)
	}
	if err := WriteKeyfile(ctx, path, k, s, true); !errors.Is(err, ErrKeyfileExists) {
		t.Fatalf("second exclusive write: %v", err)
	}
	fi, _ := os.Stat(path)
	di, _ := os.Stat(dir)
	if fi.Mode().Perm() != 0o600 || di.Mode().Perm() != 0o700 {
		t.Fatalf("modes file %o dir %o", fi.Mode().Perm(), di.Mode().Perm())
	}
	assertNoPlaintext(t, filepath.Dir(dir), k)
	got, err := ReadKeyfile(ctx, path, s)
	if err != nil {
		t.Fatal(err)
	}
	if got.Meta() != k.Meta() || got.SnapshotToken != k.SnapshotToken || got.Keyset.Keys[2] != k.Keyset.Keys[2] {
		t.Fatalf("round trip %+v", got.Meta())
	}

	// Under systemd, the decrypted credential is read from $CREDENTIALS_DIRECTORY.
	creds := t.TempDir()
	plain, _ := k.marshal()
	os.WriteFile(filepath.Join(creds, CredentialName), plain, 0o400)
	t.Setenv("CREDENTIALS_DIRECTORY", creds)
	if got, err := ReadKeyfile(ctx, filepath.Join(dir, "absent"), s); err != nil || got.ClusterID != "c-123" {
		t.Fatalf("from the credentials directory: %v", err)
	}
	t.Setenv("CREDENTIALS_DIRECTORY", "")

	// Truncated, corrupted, or sealed under another name: a clear error, no secret.
	b, _ := os.ReadFile(path)
	for name, mutate := range map[string]func([]byte) []byte{
		"truncated": func(b []byte) []byte { return b[:len(b)/2] },
		"flipped":   func(b []byte) []byte { c := bytes.Clone(b); c[len(c)/2] ^= 0x40; return c },
		"empty":     func([]byte) []byte { return nil },
	} {
		bad := filepath.Join(dir, name)
		os.WriteFile(bad, mutate(b), 0o600)
		_, err := ReadKeyfile(ctx, bad, s)
		if !errors.Is(err, ErrKeyfileCorrupt) || ContainsAny(err.Error(), k.Keyset, k.SnapshotToken) {
			t.Errorf("%s: %v", name, err)
		}
	}
	other := filepath.Join(dir, "other-name")
	enc := exec.CommandContext(ctx, bins.SystemdCreds, "encrypt", "--name=something-else", "--with-key=host", "-", other)
	enc.Stdin = bytes.NewReader(plain)
	if out, err := enc.CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	if _, err := ReadKeyfile(ctx, other, s); !errors.Is(err, ErrKeyfileCorrupt) {
		t.Fatalf("another credential name: %v", err)
	}
	if _, err := ReadKeyfile(ctx, filepath.Join(dir, "missing"), s); !errors.Is(err, ErrNoKeyfile) {
		t.Fatalf("missing: %v", err)
	}
}

func TestKeyfileAgeRoundTrip(t *testing.T) {
	ctx := ctxFor(t, 10*time.Second)
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "keys", "unseal.age")
	k := testKeyfile()
	if err := WriteKeyfile(ctx, path, k, Age{Recipient: id.Recipient()}, true); err != nil {
		t.Fatal(err)
	}
	assertNoPlaintext(t, dir, k)
	got, err := ReadKeyfile(ctx, path, Age{Identity: id})
	if err != nil || got.Keyset.Fingerprint() != k.Keyset.Fingerprint() {
		t.Fatalf("%v", err)
	}
	wrong, _ := age.GenerateX25519Identity()
	if _, err := ReadKeyfile(ctx, path, Age{Identity: wrong}); !errors.Is(err, ErrKeyfileCorrupt) {
		t.Fatalf("wrong identity: %v", err)
	}
}

// assertNoPlaintext walks dir and fails if any file holds a share or the token.
func assertNoPlaintext(t *testing.T, dir string, k *Keyfile) {
	t.Helper()
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(p)
		if ContainsAny(string(b), k.Keyset, k.SnapshotToken) {
			t.Errorf("%s holds a plaintext secret", p)
		}
		return nil
	})
}

func TestFingerprintIgnoresOrderAndHidesKeys(t *testing.T) {
	a := Keyset{Threshold: 2, Keys: []Key{{1, "aaa"}, {2, "bbb"}}}
	b := Keyset{Threshold: 2, Keys: []Key{{1, "bbb"}, {2, "aaa"}}}
	c := Keyset{Threshold: 2, Keys: []Key{{1, "aaa"}, {2, "ccc"}}}
	if a.Fingerprint() != b.Fingerprint() || a.Fingerprint() == c.Fingerprint() || !strings.HasPrefix(a.Fingerprint(), "sha256:") {
		t.Fatal(a.Fingerprint(), b.Fingerprint(), c.Fingerprint())
	}
}
