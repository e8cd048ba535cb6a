package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

const (
	labTokenID     = "vault-agent@pve!cli"
	labTokenSecret = "6e1f0a3b-9c2d-4b8e-a7f5-1d3c5e7a9b0f"
)

// provisionLab is a fake Proxmox with one node VM (VMID 201) and a config for it.
type provisionLab struct {
	vm        *lab.NodeVM
	config    string
	knownHost string
	hostPath  string
	key       string
}

func newProvisionLab(t *testing.T, knownHosts bool) *provisionLab {
	t.Helper()
	lab.Need(t)
	dir := t.TempDir()
	pve, err := lab.StartPVE(dir, labTokenID, labTokenSecret)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pve.Close)
	if err := pve.GrantREADMERole(""); err != nil {
		t.Fatal(err)
	}
	vm := lab.StartNodeVM(t, pve, 201, "k8s-worker-1")
	pl := &provisionLab{vm: vm, knownHost: filepath.Join(dir, "known_hosts"), hostPath: filepath.Join(lab.TestDataDir(t), "srv", "vault")}
	if knownHosts {
		if err := vm.SSHD.WriteKnownHosts(pl.knownHost); err != nil {
			t.Fatal(err)
		}
	}
	secret := filepath.Join(dir, "pve-token")
	os.WriteFile(secret, []byte(labTokenSecret+"\n"), 0o600)
	key, _ := os.ReadFile(vm.SSHD.ClientKeyPath)
	pl.key = string(key)
	pl.config = filepath.Join(dir, "config.yaml")
	os.WriteFile(pl.config, fmt.Appendf(nil, `
proxmox:
  url: %s
  token_id: %s
  token_secret: {file: %s}
  ca_file: %s
nodes:
  - name: k8s-worker-1
    vmid: 201
    host_path: %s
ssh:
  identity: {file: %s}
  known_hosts: %s
`, pve.URL, labTokenID, secret, pve.CAFile, pl.hostPath, vm.SSHD.ClientKeyPath, pl.knownHost), 0o600)
	return pl
}

func (pl *provisionLab) assertNoSecrets(t *testing.T, r result) {
	t.Helper()
	all := r.stdout + r.stderr
	if strings.Contains(all, labTokenSecret) || strings.Contains(all, "PRIVATE KEY") || strings.Contains(all, strings.Split(pl.key, "\n")[1]) {
		t.Fatalf("output carries a secret:\n%s", all)
	}
}

func TestProvisionVerb(t *testing.T) {
	pl := newProvisionLab(t, true)
	r := runBinary(t, nil, "provision", "--config", pl.config, "-o", "json")
	pl.assertNoSecrets(t, r)
	if r.code != 0 {
		t.Fatalf("exit %d\n%s", r.code, r.stderr)
	}
	var out []struct {
		Node     string
		Location struct{ Address string }
		Prepared struct {
			Path, State, Mode string
			UID, GID          int
		}
		DurationMS int64 `json:"duration_ms"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	if len(out) != 1 || out[0].Node != "k8s-worker-1" || out[0].Location.Address != pl.vm.Netns.NodeIP ||
		out[0].Prepared.State != "created" || out[0].Prepared.UID != 100 || out[0].Prepared.Mode != "0700" || out[0].Prepared.Path != pl.hostPath {
		t.Fatalf("json %+v", out)
	}
	r = runBinary(t, nil, "provision", "--config", pl.config)
	if r.code != 0 || !strings.Contains(r.stdout, "unchanged") || !strings.Contains(r.stdout, "NODE") {
		t.Fatalf("second run: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	pl.assertNoSecrets(t, r)
	r = runBinary(t, nil, "provision", "--config", pl.config, "--node", "nope")
	if r.code != 2 || !strings.Contains(r.stderr, `"nope"`) {
		t.Fatalf("unknown node: exit %d %s", r.code, r.stderr)
	}
}

func TestProvisionVerbUnknownHost(t *testing.T) {
	pl := newProvisionLab(t, false)
	r := runBinary(t, nil, "provision", "--config", pl.config)
	if r.code != 1 || !strings.Contains(r.stderr, "--accept-new-host-key") || !strings.Contains(r.stdout, "FAILED") {
		t.Fatalf("exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(pl.hostPath); !os.IsNotExist(err) {
		t.Fatal("directory created on an unverified host")
	}
	r = runBinary(t, nil, "provision", "--config", pl.config, "--accept-new-host-key", "-o", "json")
	if r.code != 0 || !strings.Contains(r.stderr, "pinned new host key") || !strings.Contains(r.stdout, `"pinned_host_key": "SHA256:`) {
		t.Fatalf("with opt-in: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	pl.assertNoSecrets(t, r)
}
