package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// staticVaultConfig starts one lab Vault and writes a config that reaches it by URL.
func staticVaultConfig(t *testing.T) (*lab.Vault, string, string) {
	t.Helper()
	v := lab.TestVault(t)
	cfg, keyfile, err := lab.StaticAgentConfig(t.TempDir(), v.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	return v, cfg, keyfile
}

func TestInitUnsealKeyfileVerbs(t *testing.T) {
	v, cfg, keyfile := staticVaultConfig(t)
	var outputs []string
	run := func(args ...string) result {
		r := runBinary(t, nil, append(args, "--config", cfg)...)
		outputs = append(outputs, r.stdout, r.stderr)
		return r
	}
	r := run("init", "-o", "json")
	if r.code != 0 {
		t.Fatalf("init: exit %d\n%s", r.code, r.stderr)
	}
	var rep struct {
		Keyfile string
		Meta    vault.Meta `json:"keyfile_meta"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || rep.Keyfile != keyfile || rep.Meta.Shares != 5 || !rep.Meta.HasToken {
		t.Fatalf("init report %v %s", err, r.stdout)
	}
	if r := run("init"); r.code != 1 || !strings.Contains(r.stderr, "a keyfile exists") {
		t.Fatalf("second init: exit %d %s", r.code, r.stderr)
	}
	r = run("keyfile", "check")
	if r.code != 0 || !strings.Contains(r.stdout, rep.Meta.Fingerprint) || !strings.Contains(r.stdout, "threshold 3") {
		t.Fatalf("keyfile check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	v.Kill()
	if err := v.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	r = run("unseal")
	if r.code != 0 || !strings.Contains(r.stdout, "sealed  unsealed  3") {
		t.Fatalf("unseal: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if r := run("unseal", "-o", "json"); r.code != 0 || !strings.Contains(r.stdout, `"was_sealed": false`) {
		t.Fatalf("second unseal: %d %s", r.code, r.stdout)
	}
	kf, err := vault.ReadKeyfile(context.Background(), keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	if vault.ContainsAny(strings.Join(outputs, "\n"), kf.Keyset, kf.SnapshotToken) {
		t.Fatal("a share or token reached the verbs' output")
	}
}

// The daemon as systemd runs it: READY=1 and STOPPING=1 on a real unixgram socket,
// unseal after a restart, SIGHUP reload, SIGTERM exits 0.
func TestRunDaemonBinary(t *testing.T) {
	v, cfg, _ := staticVaultConfig(t)
	if r := runBinary(t, nil, "init", "--config", cfg); r.code != 0 {
		t.Fatalf("init: %s", r.stderr)
	}
	d := startDaemon(t, cfg, 400*time.Millisecond)
	expect := func(want string) {
		t.Helper()
		err := lab.WaitFor(context.Background(), 20*time.Second, "sd_notify "+want, func(context.Context) error {
			if !d.notify.Received(want) {
				return errors.New("not received")
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%v\n%s", err, tailLines(d.Logs(), 20))
		}
	}
	expect("READY=1")
	expect("WATCHDOG=1")
	v.Kill()
	if err := v.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	n, _ := vault.NewNode("v", v.Addr, nil)
	if err := lab.WaitFor(context.Background(), 20*time.Second, "unsealed by the daemon", func(ctx context.Context) error {
		st, err := n.SealStatus(ctx)
		if err != nil || st.Sealed {
			return errors.New("sealed")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	expect("STATUS=")
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLogged(t, "configuration and keyfile reloaded", 1, 20*time.Second)
	d.stop(t)
	expect("STOPPING=1")
	d.waitLogged(t, "daemon stopped", 1, time.Second)
}

// A bad configuration exits 78 (EX_CONFIG), the one code the unit does not restart on;
// a usage mistake exits 2, a panic or SIGABRT (the watchdog) another code, restarted.
func TestRunBadConfigExits78(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	os.WriteFile(cfg, []byte("nodes: []\n"), 0o600)
	if r := runBinary(t, nil, "run", "--config", cfg); r.code != 78 || !strings.Contains(r.stderr, "hint: fix the configuration") {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
}

// The service loads the keyfile as a credential (systemd decrypts it into
// $CREDENTIALS_DIRECTORY at start). An operator's `token rotate` rewrites the keyfile
// and revokes the tokens the credential holds: the running daemon reads the rewritten
// keyfile itself, and its next scheduled backup succeeds without a restart.
func TestDaemonPicksUpARotatedKeyfile(t *testing.T) {
	_, cfg, keyfile := staticVaultConfig(t)
	if r := runBinary(t, nil, "init", "--config", cfg); r.code != 0 {
		t.Fatalf("init: %s", r.stderr)
	}
	os.WriteFile(cfg, []byte(strings.Replace(mustRead(t, cfg), "snapshots:\n", "snapshots:\n  schedule: '@every 2s'\n", 1)), 0o600)
	// What LoadCredentialEncrypted= does at the service's start.
	creds := t.TempDir()
	out, err := exec.Command("systemd-creds", "decrypt", "--name="+vault.CredentialName, keyfile, filepath.Join(creds, vault.CredentialName)).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-creds decrypt: %v %s", err, out)
	}
	os.Chmod(filepath.Join(creds, vault.CredentialName), 0o400) // as systemd leaves it
	d := startDaemon(t, cfg, 0, "CREDENTIALS_DIRECTORY="+creds)
	d.waitLogged(t, "snapshot stored", 1, time.Minute)
	if r := runBinary(t, nil, "token", "rotate", "--config", cfg); r.code != 0 || !strings.Contains(r.stdout, "next backup") {
		t.Fatalf("token rotate: %d %s %s", r.code, r.stdout, r.stderr)
	}
	stored := d.count("snapshot stored")
	failedBefore := d.count("scheduled backup failed")
	d.waitLogged(t, "snapshot stored", stored+1, time.Minute)
	if n := d.count("scheduled backup failed"); n != failedBefore {
		t.Fatalf("%d scheduled backups failed after the rotation:\n%s", n-failedBefore, tailLines(d.Logs(), 30))
	}
	d.stop(t)
}
