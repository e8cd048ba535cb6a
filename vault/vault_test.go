package vault

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
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
	waitActive(t, ctx, n)

	// The agent's tokens: each does its job and nothing else, and can renew itself.
	toks, err := n.CreateAgentTokens(ctx, res.RootToken, Setup{Period: time.Hour, Canary: "canary-value"})
	if err != nil {
		t.Fatal(err)
	}
	sc, _ := n.withToken(toks.Snapshot)
	resp, err := sc.Logical().ReadRawWithContext(ctx, "sys/storage/raft/snapshot")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("snapshot with the snapshot token: %v", err)
	}
	resp.Body.Close()
	if _, err := sc.Logical().ListWithContext(ctx, "sys/policies/acl"); err == nil {
		t.Fatal("the snapshot token can list policies")
	}
	if _, err := n.Read(ctx, toks.Snapshot, CanaryPath); err == nil {
		t.Fatal("the snapshot token reads the canary")
	}
	if got, err := n.Read(ctx, toks.Operator, CanaryPath); err != nil || got != "canary-value" {
		t.Fatalf("canary with the operator token: %q %v", got, err)
	}
	if err := n.Write(ctx, toks.Operator, "sys/policies/acl/x", map[string]any{"policy": ""}); err == nil {
		t.Fatal("the operator token can write policies")
	}
	for _, tok := range []Token{toks.Snapshot, toks.Operator} {
		ti, err := n.RenewSelf(ctx, tok)
		if err != nil || ti.Period != time.Hour || ti.TTL < 59*time.Minute || ti.Accessor == "" {
			t.Fatalf("renew-self: %+v %v", ti, err)
		}
	}
	if err := n.RevokeSelf(ctx, res.RootToken); err != nil {
		t.Fatal(err)
	}
	if _, err := n.LookupSelf(ctx, res.RootToken); !errors.Is(err, ErrTokenRefused) {
		t.Fatalf("root token after revocation: %v", err)
	}

	// Vault 2.x (the lab's gate): generate-root without a token is refused with Vault's
	// 403; with the operator token it works.
	if _, err := n.GenerateRoot(ctx, res.Keyset, GenerateRootOptions{}); !errors.Is(err, ErrTokenRefused) {
		t.Fatalf("generate-root without a token: %v", err)
	}
	if _, err := n.GenerateRoot(ctx, res.Keyset, GenerateRootOptions{Auth: toks.Snapshot}); !errors.Is(err, ErrTokenRefused) {
		t.Fatalf("generate-root with the snapshot token: %v", err)
	}
	if v.Gate.Refusals() < 2 {
		t.Fatalf("the gate refused %d calls", v.Gate.Refusals())
	}
	var nonce string
	root, err := n.GenerateRoot(ctx, res.Keyset, GenerateRootOptions{Auth: toks.Operator, Started: func(s string) error { nonce = s; return nil }})
	if err != nil || nonce == "" {
		t.Fatalf("generate-root with the operator token: %v (nonce %q)", err, nonce)
	}
	if _, err := n.LookupSelf(ctx, root); err != nil {
		t.Fatalf("generated root: %v", err)
	}
	if err := n.RevokeSelf(ctx, root); err != nil {
		t.Fatal(err)
	}

	// An attempt in progress is an operator's unless its nonce is the agent's own: the
	// agent cancels only its own.
	oc, _ := n.withToken(toks.Operator)
	st, err := oc.Sys().GenerateRootInitWithContext(ctx, strings.Repeat("a", 28), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.GenerateRoot(ctx, res.Keyset, GenerateRootOptions{Auth: toks.Operator, OwnNonce: "not-it"}); !errors.Is(err, ErrGenerateRootInProgress) {
		t.Fatalf("an operator's attempt in progress: %v", err)
	}
	if started, got, err := n.GenerateRootStatus(ctx, toks.Operator); err != nil || !started || got != st.Nonce {
		t.Fatalf("the operator's attempt was touched: %v %v %v", started, got, err)
	}
	root, err = n.GenerateRoot(ctx, res.Keyset, GenerateRootOptions{Auth: toks.Operator, OwnNonce: st.Nonce})
	if err != nil {
		t.Fatalf("the agent's own leftover attempt: %v", err)
	}
	_ = n.RevokeSelf(ctx, root)

	// kill -9, restart: sealed; a share of this cluster already there (another agent's,
	// or one an operator typed) is built on, not reset: two more reach the threshold.
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := n.client.Sys().UnsealWithContext(ctx, res.Keyset.Keys[4].value); err != nil {
		t.Fatal(err)
	}
	u, err = n.Unseal(ctx, res.Keyset, log)
	if err != nil || u.Sealed || u.ResetStale || !u.WasSealed || u.SharesUsed != 2 {
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
	sst, err := n.SealStatus(ctx)
	if err != nil || sst.Progress != 0 || !sst.Sealed {
		t.Fatalf("after foreign keys: progress %d sealed %v %v", sst.Progress, sst.Sealed, err)
	}
	// A share of another cluster left in progress fails at the threshold with the
	// agent's: reset, and the agent's own shares unseal from a clean start.
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := n.client.Sys().UnsealWithContext(ctx, otherInit.Keyset.Keys[0].value); err != nil {
		t.Fatal(err)
	}
	if u, err := n.Unseal(ctx, res.Keyset, log); err != nil || u.Sealed || !u.ResetStale || u.SharesUsed != 5 {
		t.Fatalf("own keys after a foreign share left in progress: %+v %v", u, err)
	}

	secrets := append([]Token{res.RootToken, toks.Snapshot, toks.Operator, root}, otherInit.RootToken)
	if ContainsAny(logs.String(), res.Keyset, secrets...) || ContainsAny(logs.String(), otherInit.Keyset) {
		t.Fatalf("a secret reached the log:\n%s", logs.String())
	}
	for _, s := range []string{fmt.Sprint(res.Keyset), fmt.Sprintf("%+v", res), fmt.Sprintf("%#v", toks)} {
		if ContainsAny(s, res.Keyset, secrets...) {
			t.Fatalf("a secret prints: %s", s)
		}
	}
}

func waitActive(t *testing.T, ctx context.Context, n *Node) {
	t.Helper()
	if err := lab.WaitFor(ctx, 30*time.Second, "active", func(ctx context.Context) error {
		h, err := n.Health(ctx)
		if err == nil && !h.Active {
			err = errors.New("not active yet")
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// Nothing in the environment reaches the client: VAULT_ADDR, VAULT_AGENT_ADDR (which the
// API client would otherwise prefer over the configured address, shares included),
// VAULT_TOKEN, VAULT_NAMESPACE, VAULT_HEADERS, VAULT_WRAP_TTL (which would wrap init's
// keys away) and VAULT_CACERT are set to hostile values; the node still talks to its own
// address, with exactly the headers it sets.
func TestClientIgnoresTheEnvironment(t *testing.T) {
	ctx := ctxFor(t, time.Minute)
	var mu sync.Mutex
	var hostile []string
	trap := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hostile = append(hostile, r.Method+" "+r.URL.Path)
		mu.Unlock()
		w.WriteHeader(http.StatusTeapot)
	}))
	defer trap.Close()
	var seen []http.Header
	real := lab.TestVault(t)
	target, _ := url.Parse(real.Addr)
	rp := httputil.NewSingleHostReverseProxy(target)
	spy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Clone())
		mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	defer spy.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, []byte("not a certificate"), 0o600)
	for k, v := range map[string]string{
		"VAULT_ADDR": trap.URL, "VAULT_AGENT_ADDR": trap.URL, "VAULT_TOKEN": "hvs.hostile-token",
		"VAULT_NAMESPACE": "evil/", "VAULT_HEADERS": `{"X-Evil":"1"}`, "VAULT_WRAP_TTL": "5m", "VAULT_CACERT": ca,
		"VAULT_MAX_RETRIES": "not-a-number", "VAULT_SKIP_VERIFY": "true",
	} {
		t.Setenv(k, v)
	}
	n, err := NewNode("v", spy.URL, nil)
	if err != nil {
		t.Fatalf("a hostile environment stops the client: %v", err)
	}
	res, err := n.Init(ctx, 1, 1)
	if err != nil || len(res.Keyset.Keys) != 1 || res.RootToken.Empty() {
		t.Fatalf("init through a hostile environment: %+v %v", res, err)
	}
	if _, err := n.Unseal(ctx, res.Keyset, nil); err != nil {
		t.Fatal(err)
	}
	waitActive(t, ctx, n)
	if _, err := n.LookupSelf(ctx, res.RootToken); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(hostile) > 0 {
		t.Fatalf("requests went to the environment's address: %v", hostile)
	}
	for _, h := range seen {
		if h.Get("X-Vault-Namespace") != "" || h.Get("X-Evil") != "" || h.Get("X-Vault-Wrap-TTL") != "" || h.Get("X-Vault-Token") == "hvs.hostile-token" {
			t.Fatalf("a request carried the environment's headers: %v", h)
		}
	}
	if os.Getenv("VAULT_AGENT_ADDR") != trap.URL {
		t.Fatal("the environment was not restored")
	}
}

// A snapshot stream has no total timeout, only an idle one: a slow link that keeps
// moving finishes; one that stalls is abandoned with ErrStalled.
func TestSnapshotStreamIdleDeadline(t *testing.T) {
	ctx := ctxFor(t, 2*time.Minute)
	v, direct := startVault(t)
	res, err := direct.Init(ctx, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Unseal(ctx, res.Keyset, nil); err != nil {
		t.Fatal(err)
	}
	waitActive(t, ctx, direct)
	// Some data, so the snapshot takes a while over the slow link.
	if err := direct.Write(ctx, res.RootToken, "sys/mounts/kv", map[string]any{"type": "kv"}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if err := direct.Write(ctx, res.RootToken, fmt.Sprintf("kv/k%d", i), map[string]any{"value": strings.Repeat(fmt.Sprint(i), 4000)}); err != nil {
			t.Fatal(err)
		}
	}
	slow := lab.StartSlowLink(t, strings.TrimPrefix(v.Addr, "http://"))
	n, err := NewNode("slow", "http://"+slow.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	// 16 KiB/s: the snapshot takes several times the 1 s idle timeout in all.
	slow.SetRate(16 << 10)
	t0 := time.Now()
	var buf bytes.Buffer
	size, err := n.StreamSnapshot(ctx, res.RootToken, time.Second, &buf)
	took := time.Since(t0)
	if err != nil || took < 2*time.Second {
		t.Fatalf("slow but moving: %d bytes in %s: %v", size, took, err)
	}
	t.Logf("slow link: %d bytes in %s with a 1s idle timeout", size, took.Round(time.Millisecond))
	// Stalled after the first bytes: abandoned after the idle timeout, not later.
	slow.SetRate(0)
	slow.StallAfter(512)
	t0 = time.Now()
	_, err = n.StreamSnapshot(ctx, res.RootToken, time.Second, io.Discard)
	if !errors.Is(err, ErrStalled) || time.Since(t0) > 5*time.Second {
		t.Fatalf("stalled stream: %v after %s", err, time.Since(t0))
	}
}

func testKeyfile() *Keyfile {
	return &Keyfile{Version: keyfileVersion, ClusterID: "c-123", ClusterName: "vault-cluster-x", Created: time.Now().UTC().Truncate(time.Second),
		SnapshotToken: Token{"hvs.snapshot-token-value"}, OperatorToken: Token{"hvs.operator-token-value"}, Canary: "c4n4ry",
		Keyset: Keyset{Threshold: 2, Keys: []Key{{1, "share-one-value"}, {2, "share-two-value"}, {3, "share-three-value"}}}}
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
	if got.Meta() != k.Meta() || got.SnapshotToken != k.SnapshotToken || got.OperatorToken != k.OperatorToken || got.Keyset.Keys[2] != k.Keyset.Keys[2] || got.Canary != k.Canary {
		t.Fatalf("round trip %+v", got.Meta())
	}

	// $CREDENTIALS_DIRECTORY never overrides the path asked for (a throwaway keyfile
	// once came back as the main one): which source to read is the caller's choice.
	creds := t.TempDir()
	plain, _ := k.marshal()
	os.WriteFile(filepath.Join(creds, CredentialName), plain, 0o400)
	t.Setenv("CREDENTIALS_DIRECTORY", creds)
	if _, err := ReadKeyfile(ctx, filepath.Join(dir, "absent"), s); !errors.Is(err, ErrNoKeyfile) {
		t.Fatalf("the credentials directory answered for another path: %v", err)
	}
	if got, err := ParseKeyfile(plain); err != nil || got.ClusterID != "c-123" {
		t.Fatalf("parse the decrypted credential: %v", err)
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
		if !errors.Is(err, ErrKeyfileCorrupt) || ContainsAny(err.Error(), k.Keyset, k.Tokens()...) {
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

	// An existing directory open to others is refused, never re-moded.
	open := filepath.Join(t.TempDir(), "shared")
	os.Mkdir(open, 0o755)
	if err := WriteKeyfile(ctx, filepath.Join(open, "unseal.cred"), k, s, true); err == nil || !strings.Contains(err.Error(), "0755") {
		t.Fatalf("a 0755 directory: %v", err)
	}
	if fi, _ := os.Stat(open); fi.Mode().Perm() != 0o755 {
		t.Fatalf("the existing directory was re-moded to %o", fi.Mode().Perm())
	}

	// A version 1 keyfile (no operator token) still opens.
	v1 := bytes.Replace(plain, []byte(`"version":2`), []byte(`"version":1`), 1)
	if got, err := ParseKeyfile(v1); err != nil || got.Version != 1 {
		t.Fatalf("version 1: %v", err)
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
		if ContainsAny(string(b), k.Keyset, k.Tokens()...) || bytes.Contains(b, []byte(k.Canary)) {
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
