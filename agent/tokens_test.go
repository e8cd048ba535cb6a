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

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// Vault never renews a token because it was used. With a token period of seconds (a
// test knob): the agent's tokens lapse when nothing renews them (a host switched off for
// longer than the period); token rotate cannot mint new ones without a valid token under
// Vault 2.x and says how to get one; with one, it does; and the daemon keeps tokens
// alive through many periods.
func TestTokensLapseUnlessRenewed(t *testing.T) {
	const period = 6 * time.Second
	vl := newVaultLabWith(t, labOptions{nodes: 1, tokenPeriod: period})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	n := vl.node(t, vl.pod(0))

	// The host is "off" for longer than the period: nothing renews.
	if err := pollTest(ctx, 3*period, func() error {
		if _, err := n.LookupSelf(ctx, kf.SnapshotToken); !errors.Is(err, vault.ErrTokenRefused) {
			return errors.New("still valid")
		}
		return nil
	}); err != nil {
		t.Fatalf("the snapshot token did not lapse: %v", err)
	}
	_, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err == nil || !strings.Contains(strings.Join(Hints(err), " "), "token rotate") {
		t.Fatalf("backup with a lapsed token: %v %v", err, Hints(err))
	}
	rep, err := CheckKeyfile(ctx, vl.env)
	if err == nil || len(rep.Tokens) != 2 || rep.Tokens[0].Error == "" {
		t.Fatalf("keyfile check with lapsed tokens: %+v %v", rep, err)
	}
	st := GetStatus(ctx, vl.env)
	if !strings.Contains(strings.Join(st.Attention, "\n"), "snapshot token") {
		t.Fatalf("status does not report the lapsed token: %v", st.Attention)
	}
	_, err = RotateTokens(ctx, vl.env, TokenRotateOptions{})
	if !errors.Is(err, ErrNoValidToken) || !strings.Contains(strings.Join(Hints(err), " "), "--auth-token-file") {
		t.Fatalf("rotate without a valid token: %v", err)
	}
	// The operator's way out: a token of their own (here generated once without the gate,
	// as an operator would after enabling unauthenticated generate-root for a moment).
	direct, err := vault.NewNode("direct", vl.pods.Vault(vl.pod(0)).Direct, nil)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := direct.GenerateRoot(ctx, kf.Keyset, vault.GenerateRootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	authFile := filepath.Join(t.TempDir(), "auth-token")
	if err := os.WriteFile(authFile, []byte(tokenValueForTest(t, admin)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := RotateTokens(ctx, vl.env, TokenRotateOptions{AuthTokenFile: authFile}); err != nil {
		t.Fatalf("rotate with an operator's token: %v", err)
	}
	_ = n.RevokeSelf(ctx, admin)
	kf = vl.keyfile(t)
	if len(kf.RetiredOperatorTokens) != 1 || kf.Rotated.IsZero() {
		t.Fatalf("keyfile after rotation: %+v", kf.Meta())
	}

	// The daemon renews at a third of the period: through four periods the tokens live,
	// and a backup at the end works.
	_, stop := runDaemon(t, ctx, vl, DaemonOptions{})
	deadline := time.Now().Add(4 * period)
	for time.Now().Before(deadline) {
		if _, err := n.LookupSelf(ctx, kf.OperatorToken); err != nil {
			t.Fatalf("the operator token lapsed under the daemon: %v", err)
		}
		if err := sleep(ctx, RealClock{}, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	stop()
	brep, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err != nil || brep.Token == nil || !brep.Token.Renewed {
		t.Fatalf("backup after four periods: %+v %v", brep, err)
	}
	vl.assertNoSecrets(t, kf)
}

// tokenValueForTest writes a token where an operator would; only tests see values.
func tokenValueForTest(t *testing.T, tok vault.Token) string {
	t.Helper()
	v := vault.TokenValueForTest(tok)
	if v == "" {
		t.Fatal("empty token")
	}
	return v
}

// A rotation retires the old operator token; restoring a snapshot taken before it
// brings that token back (and not the new one): the agent finds the retired token valid
// there and mints fresh tokens with it. An interrupted rotation leaves no root token.
func TestRotationAndAnOlderSnapshot(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	n := vl.node(t, vl.pod(0))
	writeSecret(t, ctx, n, kf, "before the rotation")
	before, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// Interrupted right after the root token was generated: it is revoked anyway.
	countTokens := func() int {
		var c int
		withRoot(t, ctx, n, vl.keyfile(t), func(root vault.Token) { c = accessors(t, ctx, n, root) })
		return c
	}
	want := countTokens()
	ictx, icancel := context.WithCancel(ctx)
	ienv := NewEnv(vl.cfg, slog.New(cancelOn{vl.log.Handler(), "token rotate", "root", icancel}), EnvOptions{Waits: testWaits()})
	if _, err := RotateTokens(ictx, ienv, TokenRotateOptions{}); err == nil {
		t.Fatal("the interrupted rotation returned no error")
	}
	icancel()
	ienv.Close()
	if got := countTokens(); got != want {
		t.Fatalf("%d tokens after an interrupted rotation, %d before: a root token survived", got, want)
	}

	rep, err := RotateTokens(ctx, vl.env, TokenRotateOptions{})
	if err != nil || !rep.Rotated {
		t.Fatalf("rotate: %+v %v", rep, err)
	}
	rotated := vl.keyfile(t)
	if rotated.OperatorToken == kf.OperatorToken || len(rotated.RetiredOperatorTokens) != 1 || rotated.RetiredOperatorTokens[0] != kf.OperatorToken {
		t.Fatal("the rotation did not retire the old operator token")
	}
	if _, err := n.LookupSelf(ctx, kf.OperatorToken); !errors.Is(err, vault.ErrTokenRefused) {
		t.Fatalf("the old operator token survived the rotation: %v", err)
	}
	if got := countTokens(); got != want {
		t.Fatalf("%d tokens after the rotation, %d before", got, want)
	}

	// Restore the snapshot from before the rotation.
	rrep, err := Restore(ctx, vl.env, before.Snapshot.Path, RestoreOptions{})
	if err != nil {
		t.Fatalf("restore: %v\n%s", err, tail(vl.logs.String(), 30))
	}
	tokensStep := resultNamed(t, rrep.Steps, "tokens")
	if !strings.Contains(tokensStep.Result, "replaced") {
		t.Fatalf("the restored data's tokens were not replaced: %+v", rrep.Steps)
	}
	after := vl.keyfile(t)
	for _, tok := range []vault.Token{after.SnapshotToken, after.OperatorToken} {
		if _, err := n.LookupSelf(ctx, tok); err != nil {
			t.Fatalf("a token after the restore: %v", err)
		}
	}
	if got := readSecret(t, ctx, n, after); got != "before the rotation" {
		t.Fatalf("secret %q", got)
	}
	if !strings.Contains(vl.logs.String(), "retired operator token #") {
		t.Fatal("the retired operator token was not what authorised the new tokens")
	}
	_ = lab.Need
}

// Init interrupted: before Vault is touched nothing happens; from Vault's init to the
// revoked root token it finishes what it began (split, it would leave shares without a
// token or a root token alive), so Vault ends with the agent's two tokens and no root.
func TestInitInterrupted(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	for _, stopAfter := range []string{"check", "init"} {
		ictx, icancel := context.WithCancel(ctx)
		ienv := NewEnv(vl.cfg, slog.New(cancelOn{vl.log.Handler(), "init", stopAfter, icancel}), EnvOptions{Waits: testWaits()})
		_, err := Init(ictx, ienv, InitOptions{})
		icancel()
		ienv.Close()
		switch stopAfter {
		case "check":
			if !errors.Is(err, context.Canceled) || vault.KeyfileExists(vl.cfg.Vault.Keyfile) {
				t.Fatalf("interrupted after the checks: %v", err)
			}
			if st, _ := vl.node(t, vl.pod(0)).SealStatus(ctx); st.Initialized {
				t.Fatal("Vault was initialised by an init interrupted before it")
			}
		case "init":
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("interrupted after Vault's init: %v", err)
			}
		}
	}
	kf := vl.keyfile(t)
	if kf.OperatorToken.Empty() || kf.SnapshotToken.Empty() {
		t.Fatal("the setup did not finish after the interruption")
	}
	n := vl.node(t, vl.pod(0))
	withRoot(t, ctx, n, kf, func(root vault.Token) {
		if c := accessors(t, ctx, n, root); c != 3 {
			t.Fatalf("%d tokens: want the agent's 2 and this check's root (the initial root token must be gone)", c)
		}
	})
}

// A rotation that cannot seal the keyfile's recovery copy (a recipient age cannot parse,
// set here behind validation's back) writes nothing: the keyfile and its tokens stay as
// they were and valid, however often it is tried. Before, the keyfile went in place
// first, its new tokens were then revoked, and every try pushed the last valid operator
// token further out of the retired list.
func TestRotationIsAllOrNothing(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	before := vl.keyfile(t)
	vl.cfg.Vault.RecoveryRecipient = "age1bad"
	for i := 0; i < 5; i++ {
		if _, err := RotateTokens(ctx, vl.env, TokenRotateOptions{}); err == nil || !strings.Contains(err.Error(), "nothing was written") {
			t.Fatalf("rotation %d with a bad recipient: %v", i, err)
		}
	}
	after := vl.keyfile(t)
	if after.OperatorToken != before.OperatorToken || after.SnapshotToken != before.SnapshotToken || len(after.RetiredOperatorTokens) != 0 {
		t.Fatal("the keyfile changed although the rotation failed")
	}
	n := vl.node(t, vl.pod(0))
	for _, tok := range []vault.Token{after.OperatorToken, after.SnapshotToken} {
		if _, err := n.LookupSelf(ctx, tok); err != nil {
			t.Fatalf("a token of the unchanged keyfile was revoked: %v", err)
		}
	}
	ents, _ := os.ReadDir(filepath.Dir(vl.cfg.Vault.Keyfile))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".keyfile-") || strings.Contains(e.Name(), "recovery") {
			t.Fatalf("left in the state directory: %s", e.Name())
		}
	}
}
