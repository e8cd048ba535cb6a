package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

// binary is the pve-vault-agent built once for this test binary, so verbs are tested
// the way an operator runs them: exit codes, stdout, stderr.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pva-cli-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "pve-vault-agent")
	// No unit is installed as far as the verbs can tell, whatever this machine has; a
	// test about the units points this at its own.
	noUnits := filepath.Join(dir, "no-units")
	os.Mkdir(noUnits, 0o755)
	os.Setenv("SYSTEMD_UNIT_PATH", noUnits)
	build := exec.Command("go", "build", "-ldflags", "-X main.version=v9.9.9-test -X main.commit=abc1234", "-o", binary, ".")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build pve-vault-agent:", err)
		os.Exit(1)
	}
	code := lab.RunTests(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	code           int
	stdout, stderr string
}

func runBinary(t *testing.T, env []string, args ...string) result {
	t.Helper()
	cmd := exec.CommandContext(context.Background(), binary, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	t0 := time.Now()
	err := cmd.Run()
	if os.Getenv("PVA_TIMING") != "" {
		t.Logf("TIMING %.1fs %v", time.Since(t0).Seconds(), args)
	}
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code, out.String(), errb.String()}
}

func TestVersion(t *testing.T) {
	r := runBinary(t, nil, "version", "-o", "json")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	var v versionInfo
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatal(err)
	}
	if v.Version != "v9.9.9-test" || v.Commit != "abc1234" {
		t.Fatalf("version %+v", v)
	}
	if r := runBinary(t, nil, "version"); r.code != 0 || !strings.HasPrefix(r.stdout, "pve-vault-agent v9.9.9-test") {
		t.Fatalf("text version: %+v", r)
	}
}

func TestConfigCheckExample(t *testing.T) {
	for _, format := range []string{"yaml", "json"} {
		r := runBinary(t, nil, "config", "check", "--config", "../../configs/config.example.yaml", "-o", format)
		if r.code != 0 {
			t.Fatalf("%s: exit %d: %s", format, r.code, r.stderr)
		}
		if !strings.Contains(r.stdout, "pve-token") || !strings.Contains(r.stdout, "k8s-worker-1") {
			t.Fatalf("%s: effective config incomplete:\n%s", format, r.stdout)
		}
	}
}

// The acceptance case of the foundation issue: three mistakes, all reported, exit 78.
func TestConfigCheckReportsAllMistakes(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte(`
nodes:
  - name: w1
    adress: 10.0.0.21
ssh:
  identity:
    file: /etc/pve-vault-agent/id_ed25519
  port: 0
vault:
  data_mode: "0777"
`), 0o600)
	r := runBinary(t, nil, "config", "check", "--config", cfg)
	if r.code != 78 {
		t.Fatalf("exit %d, want 78\n%s", r.code, r.stderr)
	}
	for _, want := range []string{"3 problem(s)", `nodes[0].adress: unknown key (did you mean "address"?)`, "ssh.port:", "vault.data_mode:"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
	if r.stdout != "" {
		t.Errorf("stdout not empty on failure: %q", r.stdout)
	}
}

func TestConfigCheckNeverEchoesInlineSecret(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	const secret = "9d1f3c2e-5b8a-4f7d-a1c6-0e2b4d6f8a9c"
	os.WriteFile(cfg, []byte(`
nodes: [{name: w1, vmid: 201}]
proxmox:
  url: https://pve.lan:8006/api2/json
  token_id: agent@pve!a
  token_secret: `+secret+`
ssh:
  identity: "-----BEGIN OPENSSH PRIVATE KEY-----AAAAB3NzaC1yc2E"
`), 0o600)
	r := runBinary(t, nil, "config", "check", "--config", cfg, "--log-level", "debug")
	if r.code != 78 {
		t.Fatalf("exit %d", r.code)
	}
	for _, leak := range []string{secret, "BEGIN OPENSSH", "AAAAB3"} {
		if strings.Contains(r.stdout+r.stderr, leak) {
			t.Fatalf("output echoes a secret (%q):\n%s", leak, r.stderr)
		}
	}
	if !strings.Contains(r.stderr, "proxmox.token_secret: inline secret values are not accepted") {
		t.Fatalf("stderr: %s", r.stderr)
	}
}

func TestEnvironmentOverrideShowsInEffectiveConfig(t *testing.T) {
	r := runBinary(t, []string{"PVA_VAULT_SHARES=7", "PVA_VAULT_THRESHOLD=4"}, "config", "check", "--config", "../../configs/config.example.yaml", "-o", "json")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	var view struct {
		Vault struct{ Shares, Threshold int } `json:"vault"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &view); err != nil {
		t.Fatal(err)
	}
	if view.Vault.Shares != 7 || view.Vault.Threshold != 4 {
		t.Fatalf("vault %+v", view.Vault)
	}
}

func TestUsageErrorsExit2(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"version", "-o", "xml"}, `-o "xml": use one of text, json`},
		{[]string{"version", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"version", "extra"}, "takes no arguments"},
		{[]string{"config", "check", "--log-level", "loud"}, "--log-level"},
	} {
		r := runBinary(t, nil, tc.args...)
		if r.code != 2 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
	if r := runBinary(t, nil, "config", "check", "--config", "/nonexistent/config.yaml"); r.code != 78 || !strings.Contains(r.stderr, "file not found") {
		t.Errorf("a missing configuration: exit %d, stderr %q; want 78", r.code, r.stderr)
	}
}

func TestCompletion(t *testing.T) {
	r := runBinary(t, nil, "completion", "bash")
	if r.code != 0 || !strings.Contains(r.stdout, "pve-vault-agent") {
		t.Fatalf("completion: exit %d %s", r.code, r.stderr)
	}
}

// The units must load exactly the credentials the configuration references: config
// check compares them with the installed units (their files and drop-ins), prints the
// drop-in that makes them agree, and fails until they do.
func TestConfigCheckUnitCredentials(t *testing.T) {
	dir := t.TempDir()
	etc, lib := filepath.Join(dir, "etc"), filepath.Join(dir, "lib")
	os.MkdirAll(etc, 0o755)
	os.MkdirAll(lib, 0o755)
	for _, u := range []string{"pve-vault-agent.service", "pve-vault-agent-backup.service"} {
		os.WriteFile(filepath.Join(lib, u), []byte(mustRead(t, filepath.Join("..", "..", "systemd", u))), 0o644)
	}
	env := []string{"SYSTEMD_UNIT_PATH=" + etc + ":" + lib}
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte(`nodes: [{name: n1, address: 127.0.0.1}]
ssh: {identity: {credential: ssh-key}}
snapshots:
  targets:
    - {name: s3, type: s3, endpoint: s3.lan:443, bucket: vault-copies, access_key: {credential: s3-access-key}, secret_key: {credential: s3-secret-key}}
vault: {recovery_recipient: age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p}
credentials_dir: /etc/pve-vault-agent/credentials
`), 0o600)
	r := runBinary(t, env, "config", "check", "--config", cfg)
	if r.code != 1 || !strings.Contains(r.stderr, "does not load ssh-key:/etc/pve-vault-agent/credentials/ssh-key.cred") ||
		!strings.Contains(r.stderr, "LoadCredentialEncrypted=s3-secret-key:/etc/pve-vault-agent/credentials/s3-secret-key.cred") {
		t.Fatalf("units without the configuration's credentials: %d\n%s", r.code, r.stderr)
	}
	// Run what it printed (into the test's own unit directory).
	script := r.stderr[strings.Index(r.stderr, "mkdir -p"):strings.Index(r.stderr, "systemctl daemon-reload")]
	script = strings.ReplaceAll(script, "/etc/systemd/system", etc)
	script = strings.ReplaceAll(script, "systemctl daemon-reload\n", "")
	if out, err := exec.Command("sh", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("the printed drop-in: %v %s", err, out)
	}
	if r := runBinary(t, env, "config", "check", "--config", cfg); r.code != 0 {
		t.Fatalf("with the drop-in: %d\n%s", r.code, r.stderr)
	}
	// A credential the configuration stops referencing is one the unit loads in vain.
	os.WriteFile(cfg, []byte(strings.Replace(mustRead(t, cfg), "{credential: ssh-key}", "{file: /etc/pve-vault-agent/id_ed25519}", 1)), 0o600)
	if r := runBinary(t, env, "config", "check", "--config", cfg); r.code != 1 || !strings.Contains(r.stderr, "loads ssh-key:") {
		t.Fatalf("a credential no longer referenced: %d\n%s", r.code, r.stderr)
	}
}
