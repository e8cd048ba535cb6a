package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// handInit initialises the Vault at addr the way an operator does, `vault operator init
// -format=json` (the same sys/init call, printed as the CLI prints it), and unseals it
// with the threshold shares as they would. It returns what the CLI printed.
// apiClient is a plain Vault API client with tok, as the operator's CLI would be.
func apiClient(t *testing.T, addr, tok string) *vaultapi.Client {
	t.Helper()
	cfg := vaultapi.DefaultConfig()
	cfg.Address = addr
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(tok)
	return c
}

func handInit(t *testing.T, ctx context.Context, addr string, shares, threshold int, unseal bool) (out []byte, b64 []string, root string) {
	t.Helper()
	c := apiClient(t, addr, "")
	c.ClearToken()
	var err error
	var res *vaultapi.InitResponse
	if err := lab.WaitFor(ctx, 60*time.Second, "vault to answer init", func(ctx context.Context) error {
		res, err = c.Sys().InitWithContext(ctx, &vaultapi.InitRequest{SecretShares: shares, SecretThreshold: threshold})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// command/operator_init.go prints these fields with -format=json.
	out, err = json.MarshalIndent(map[string]any{"unseal_keys_b64": res.KeysB64, "unseal_keys_hex": res.Keys, "unseal_shares": shares,
		"unseal_threshold": threshold, "recovery_keys_b64": []string{}, "recovery_keys_hex": []string{}, "recovery_keys_shares": 0,
		"recovery_keys_threshold": 0, "root_token": res.RootToken}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if unseal {
		for _, k := range res.KeysB64[:threshold] {
			if _, err := c.Sys().UnsealWithContext(ctx, k); err != nil {
				t.Fatal(err)
			}
		}
	}
	return out, res.KeysB64, res.RootToken
}

// A Vault initialised by hand, with the write-up's values: wrong shares, too few shares
// and a policy of the agent's name that is someone else's are refused with nothing
// written; the right shares are proven in a drill pod before the keyfile is written,
// the proven snapshot is the first backup, a second adopt changes nothing, and the
// agent unseals the Vault after a restart and backs it up.
func TestAdoptAVaultInitialisedByHand(t *testing.T) {
	writeup, err := filepath.Abs(filepath.Join("testdata", "writeup-values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	vl := newVaultLabWith(t, labOptions{nodes: 1, valuesFiles: []string{writeup}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	pod := vl.pod(0)
	out, shares, root := handInit(t, ctx, vl.pods.Vault(pod).Addr, 5, 3, true)
	rootTok := vault.NewToken(root)
	n := vl.node(t, pod)
	cli := apiClient(t, vl.pods.Vault(pod).Addr, root)
	policy := func(name string) string {
		body, err := cli.Sys().GetPolicyWithContext(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return body
	}
	if err := lab.WaitFor(ctx, 60*time.Second, "the hand-initialised vault to be active", func(ctx context.Context) error {
		h, err := n.Health(ctx)
		if err == nil && !h.Active {
			err = errors.New("not active")
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	_ = n.Write(ctx, rootTok, "sys/mounts/kv", map[string]any{"type": "kv"})
	if err := n.Write(ctx, rootTok, "kv/probe", map[string]any{"value": "theirs"}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "root-token")
	if err := os.WriteFile(tokFile, []byte(root+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ks, err := ReadShares(operatorFile(t, dir, "init.json", out), nil)
	if err != nil {
		t.Fatal(err)
	}
	nothingWritten := func(what string) {
		t.Helper()
		if vl.env.Keyfile.Exists() {
			t.Fatalf("%s: a keyfile was written", what)
		}
		for _, p := range []string{vault.SnapshotPolicyName, vault.OperatorPolicyName} {
			if policy(p) != "" {
				t.Fatalf("%s: policy %s was written", what, p)
			}
		}
		if ents, _ := os.ReadDir(vl.cfg.Snapshots.Dir); len(ents) > 0 {
			t.Fatalf("%s: the snapshot directory holds %d entries", what, len(ents))
		}
	}

	// Another Vault's shares: accepted share by share, refused by the drill pod at the
	// threshold; nothing written, the drill pod gone.
	otherOut, _, _ := handInit(t, ctx, lab.TestVault(t).Addr, 5, 3, false)
	wrong, err := ReadShares(operatorFile(t, dir, "other.json", otherOut), nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: wrong, AuthToken: rootTok})
	if !errors.Is(err, ErrAdoptSharesRefused) || !errors.Is(err, vault.ErrWrongKeys) {
		t.Fatalf("another Vault's shares: %v\n%s", err, tail(vl.logs.String(), 20))
	}
	if rep.Drill == nil || rep.Drill.Passed || len(rep.Drill.Cleaned) == 0 {
		t.Fatalf("the proof drill: %+v", rep.Drill)
	}
	nothingWritten("another Vault's shares")

	// Two shares of a threshold of three: refused before anything runs.
	few, err := vault.KeysetFromShares(0, shares[:2])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: few, AuthToken: rootTok}); !errors.Is(err, ErrAdoptSharesRefused) || !strings.Contains(strings.Join(Hints(err), " "), "at least 3 shares") {
		t.Fatalf("too few shares: %v %v", err, Hints(err))
	}
	nothingWritten("too few shares")

	// A policy of the agent's name that the operator wrote: refused, left as it was.
	if err := cli.Sys().PutPolicyWithContext(ctx, vault.SnapshotPolicyName, `path "kv/*" { capabilities = ["read"] }`); err != nil {
		t.Fatal(err)
	}
	if _, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: ks, AuthToken: rootTok}); err == nil || !strings.Contains(err.Error(), "policy "+vault.SnapshotPolicyName+" (another body)") {
		t.Fatalf("a foreign policy: %v", err)
	}
	if body := policy(vault.SnapshotPolicyName); !strings.Contains(body, "kv/*") {
		t.Fatalf("the operator's policy was changed: %q", body)
	}
	if err := cli.Sys().DeletePolicyWithContext(ctx, vault.SnapshotPolicyName); err != nil {
		t.Fatal(err)
	}

	// The right shares (three of five, as a password manager would give them).
	three, err := vault.KeysetFromShares(0, shares[1:4])
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	rep, err = Adopt(ctx, vl.env, AdoptOptions{Keyset: three, AuthToken: rootTok})
	if err != nil || !rep.Adopted {
		t.Fatalf("adopt: %v %+v\n%s", err, rep, tail(vl.logs.String(), 30))
	}
	took := time.Since(t0)
	if rep.Drill == nil || !rep.Drill.Passed || rep.Backup.Path == "" {
		t.Fatalf("adopt's proof: drill %+v backup %+v", rep.Drill, rep.Backup)
	}
	m, err := readManifest(rep.Backup.Path)
	if err != nil || m.Drill == nil || !m.Drill.Passed || m.KeysetFingerprint != three.Fingerprint() {
		t.Fatalf("the first backup's manifest: %+v %v", m, err)
	}
	t.Logf("adopt to the first verified, drilled backup: %s (the proof drill %.1fs)", took.Round(100*time.Millisecond), rep.Drill.DurationSecs)
	kf := vl.keyfile(t)
	if kf.Keyset.Fingerprint() != three.Fingerprint() || kf.SnapshotToken.Empty() || kf.OperatorToken.Empty() || kf.Canary == "" {
		t.Fatalf("keyfile: %+v", kf.Meta())
	}

	// Again: nothing to do.
	if rep, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: three, AuthToken: rootTok}); err != nil || !rep.Already {
		t.Fatalf("second adopt: %v %+v", err, rep)
	}
	// Other shares of the same Vault are another keyset: refused, the keyfile kept.
	if _, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: ks, AuthToken: rootTok}); !errors.Is(err, ErrAdoptKeyfileExists) {
		t.Fatalf("adopt over a keyfile: %v", err)
	}

	// The Vault restarts: the agent unseals it with the adopted keyfile, backs it up,
	// and a drill opens the backup and reads the canary back.
	v := vl.pods.Vault(pod)
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := Unseal(ctx, vl.env); err != nil || res[0].Sealed {
		t.Fatalf("unseal after a restart: %+v %v", res, err)
	}
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	if d, err := Drill(ctx, vl.env, DrillOptions{}); err != nil || !d.Passed {
		t.Fatalf("drill of the adopted Vault's backup: %v %+v", err, d)
	}
	if got, err := n.Read(ctx, rootTok, "kv/probe"); err != nil || got != "theirs" {
		t.Fatalf("their secret: %q %v", got, err)
	}
	// No share of the five, no agent token and not the operator's root token anywhere in
	// the agent's output or files.
	vl.assertNoSecrets(t, &vault.Keyfile{Keyset: ks, SnapshotToken: kf.SnapshotToken, OperatorToken: kf.OperatorToken, RetiredOperatorTokens: []vault.Token{rootTok}})
}

// Three pods, only the first initialised and unsealed by hand (the followers wait to
// join through retry_join, uninitialised and sealed): adopt proves the shares on the
// first pod's snapshot and the followers join and unseal with the keyfile.
func TestAdoptJoinsFollowersTheOperatorNeverUnsealed(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, _, root := handInit(t, ctx, vl.pods.Vault(vl.pod(0)).Addr, 3, 2, true)
	vl.leader(t, ctx)
	dir := t.TempDir()
	ks, err := ReadShares(operatorFile(t, dir, "init.json", out), nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: ks, AuthToken: vault.NewToken(root)})
	if err != nil || !rep.Adopted || len(rep.Unsealed) != 2 {
		t.Fatalf("adopt: %v %+v\n%s", err, rep, tail(vl.logs.String(), 30))
	}
	for i := 0; i < 3; i++ {
		if sealed, _ := vl.sealed(t, vl.pod(i)); sealed {
			t.Fatalf("%s sealed after adopt", vl.pod(i))
		}
	}
	kf := vl.keyfile(t)
	peers, err := vl.leader(t, ctx).RaftPeers(ctx, kf.OperatorToken)
	if err != nil || len(peers) != 3 {
		t.Fatalf("raft peers after adopt: %+v %v", peers, err)
	}
}

// operatorFile is a file the operator keeps (outside the agent's directories).
func operatorFile(t *testing.T, dir, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
