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

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

var units = []string{"pve-vault-agent.service", "pve-vault-agent-backup.service", "pve-vault-agent-backup.timer"}

// stage copies the units with ExecStart pointing at an existing executable (verify
// checks that it exists), as make install would lay them out.
func stage(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		lab.SkipOrFail(t, "systemd-analyze is missing")
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
	for _, unit := range []string{"pve-vault-agent.service", "pve-vault-agent-backup.service"} {
		out, err := exec.Command("systemd-analyze", "security", "--offline=true", filepath.Join(dir, unit)).CombinedOutput()
		if err != nil {
			t.Fatalf("systemd-analyze security %s: %v\n%s", unit, err, out)
		}
		m := regexp.MustCompile(`Overall exposure level for ` + regexp.QuoteMeta(unit) + `: ([0-9.]+) (\w+)`).FindStringSubmatch(string(out))
		if m == nil {
			t.Fatalf("no exposure level in:\n%s", out)
		}
		score, _ := strconv.ParseFloat(m[1], 64)
		t.Logf("%s: systemd-analyze security exposure %s %s", unit, m[1], m[2])
		if score > 3.0 {
			t.Fatalf("%s: exposure %.1f, target ≤ 3.0", unit, score)
		}
	}
}

func TestServiceDirectives(t *testing.T) {
	b, err := os.ReadFile("pve-vault-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Type=notify", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=78\n",
		"LimitCORE=0", "MemoryMax=", "OOMScoreAdjust=", "ConfigurationDirectoryMode=0700", "SystemCallErrorNumber=EPERM",
		"InaccessiblePaths=-/etc/pve/priv ", "-/etc/shadow",
		"After=network-online.target pve-guests.service", "Wants=network-online.target",
		"LoadCredentialEncrypted=pve-vault-agent-unseal:",
		"StateDirectory=pve-vault-agent", "ProtectSystem=strict", "ReadWritePaths=/var/lib/pve-vault-agent",
		"PrivateTmp=yes", "NoNewPrivileges=yes", "ProtectHome=yes", "CapabilityBoundingSet=\n",
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the service lacks %q", want)
		}
	}
}

// The oneshot backup unit is hardened like the daemon: a filtered system call fails with
// EPERM instead of killing it, no core dumps, the host's secrets out of reach.
func TestBackupUnitDirectives(t *testing.T) {
	b, err := os.ReadFile("pve-vault-agent-backup.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"SystemCallErrorNumber=EPERM", "LimitCORE=0", "MemoryMax=", "InaccessiblePaths=-/etc/pve/priv ", "ProtectSystem=strict"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the backup unit lacks %q", want)
		}
	}
}
