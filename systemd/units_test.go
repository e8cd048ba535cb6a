// Package systemd_test checks the shipped units with systemd's own tools.
package systemd_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var units = []string{"pve-vault-agent.service", "pve-vault-agent-backup.service", "pve-vault-agent-backup.timer"}

// stage copies the units with ExecStart pointing at an existing executable (verify
// checks that it exists), as make install would lay them out.
func stage(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI=true: systemd-analyze is missing")
		}
		t.Skip("skipped outside CI: systemd-analyze is missing")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		s := strings.ReplaceAll(string(b), "/usr/bin/pve-vault-agent", self)
		if err := os.WriteFile(filepath.Join(dir, u), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestUnitsVerify(t *testing.T) {
	dir := stage(t)
	args := []string{"verify"}
	for _, u := range units {
		args = append(args, filepath.Join(dir, u))
	}
	out, err := exec.Command("systemd-analyze", args...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestServiceExposure(t *testing.T) {
	dir := stage(t)
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", filepath.Join(dir, "pve-vault-agent.service")).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for pve-vault-agent.service: ([0-9.]+) (\w+)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	score, _ := strconv.ParseFloat(m[1], 64)
	t.Logf("systemd-analyze security exposure: %s %s", m[1], m[2])
	if score > 3.0 {
		t.Fatalf("exposure %.1f, target ≤ 3.0", score)
	}
}

func TestServiceDirectives(t *testing.T) {
	b, err := os.ReadFile("pve-vault-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=2",
		"After=network-online.target pve-guests.service", "Wants=network-online.target",
		"LoadCredentialEncrypted=pve-vault-agent-unseal:", "LoadCredentialEncrypted=ssh-key:", "LoadCredentialEncrypted=pve-token:",
		"StateDirectory=pve-vault-agent", "ProtectSystem=strict", "ReadWritePaths=/var/lib/pve-vault-agent",
		"PrivateTmp=yes", "NoNewPrivileges=yes", "ProtectHome=yes", "CapabilityBoundingSet=\n",
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the service lacks %q", want)
		}
	}
}
