package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
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
	sock := filepath.Join(t.TempDir(), "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var mu sync.Mutex
	var msgs []string
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := l.ReadFromUnix(buf)
			if err != nil {
				return
			}
			mu.Lock()
			msgs = append(msgs, string(buf[:n]))
			mu.Unlock()
		}
	}()
	cmd := exec.Command(binary, "run", "--config", cfg, "--log-level", "debug")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=400000")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	logDone := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			mu.Lock()
			logs.WriteString(sc.Text() + "\n")
			mu.Unlock()
		}
		close(logDone)
	}()
	logged := func(want string) error {
		mu.Lock()
		defer mu.Unlock()
		if !strings.Contains(logs.String(), want) {
			return errors.New("not logged yet")
		}
		return nil
	}
	expect := func(want string) {
		t.Helper()
		err := lab.WaitFor(context.Background(), 20*time.Second, "sd_notify "+want, func(context.Context) error {
			mu.Lock()
			defer mu.Unlock()
			for _, m := range msgs {
				if strings.Contains(m, want) {
					return nil
				}
			}
			return errors.New("not received")
		})
		if err != nil {
			cmd.Process.Kill()
			t.Fatal(err)
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
	cmd.Process.Signal(syscall.SIGHUP)
	if err := lab.WaitFor(context.Background(), 20*time.Second, "reload on SIGHUP", func(context.Context) error {
		return logged("configuration and keyfile reloaded")
	}); err != nil {
		cmd.Process.Kill()
		t.Fatal(err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	expect("STOPPING=1")
	err = cmd.Wait()
	<-logDone
	if err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, logs.String())
	}
	if err := logged("daemon stopped"); err != nil {
		t.Fatalf("no clean stop in the logs:\n%s", logs.String())
	}
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
