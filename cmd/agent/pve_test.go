package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// The binary backs up onto a Proxmox storage through the README's role, on PVE 8 and
// PVE 9; config check reports where the storage is and that the unit cannot write it.
func TestBackupOntoProxmoxStorage(t *testing.T) {
	b := newBackupLab(t)
	for _, major := range []int{8, 9} {
		t.Run(map[int]string{8: "PVE 8", 9: "PVE 9"}[major], func(t *testing.T) {
			dir := t.TempDir()
			pve, err := lab.StartPVE(dir, labTokenID, labTokenSecret)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pve.Close)
			pve.SetMajor(major)
			if err := pve.GrantREADMERole("nas-backup"); err != nil {
				t.Fatal(err)
			}
			mount := filepath.Join(dir, "mnt", "pve", "nas-backup")
			pve.PutStorage(lab.FakeStorage{ID: "nas-backup", Type: "nfs", Path: mount, Content: "backup", Total: 100 << 30, Used: 1 << 30, Active: true})
			secret := filepath.Join(dir, "pve-token")
			os.WriteFile(secret, []byte(labTokenSecret+"\n"), 0o600)
			env := []string{"PVA_PROXMOX_URL=" + pve.URL, "PVA_PROXMOX_TOKEN_ID=" + labTokenID, "PVA_PROXMOX_TOKEN_SECRET_FILE=" + secret,
				"PVA_PROXMOX_CA_FILE=" + pve.CAFile, "PVA_PROXMOX_NODE=pve1", "PVA_SNAPSHOTS_PROXMOX_STORAGE=nas-backup"}

			r := runBinary(t, env, "backup-now", "-o", "json", "--config", b.cfg)
			if r.code != 0 {
				t.Fatalf("backup-now onto the storage: %d %s", r.code, r.stderr)
			}
			var rep struct{ Snapshot snapshot.Entry }
			if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
				t.Fatal(err)
			}
			if filepath.Dir(rep.Snapshot.Path) != filepath.Join(mount, "vault-snapshots") {
				t.Fatalf("snapshot at %s; want it under the storage's path %s", rep.Snapshot.Path, mount)
			}
			if r := runBinary(t, env, "snapshots", "verify", "--config", b.cfg); r.code != 0 || !strings.HasPrefix(r.stdout, "ok") || !strings.Contains(r.stdout, rep.Snapshot.Path) {
				t.Fatalf("verify on the storage: %d %s %s", r.code, r.stdout, r.stderr)
			}
			r = runBinary(t, env, "config", "check", "--config", b.cfg)
			if r.code != 0 || !strings.Contains(r.stderr, "resolves to "+filepath.Join(mount, "vault-snapshots")) ||
				!strings.Contains(r.stderr, "ReadWritePaths="+filepath.Join(mount, "vault-snapshots")) {
				t.Fatalf("config check: %d %s", r.code, r.stderr)
			}
			for _, req := range pve.Requests() {
				if strings.HasPrefix(req, "GET /api2/json/storage/") || strings.Contains(req, "/cluster/status") {
					t.Errorf("the agent called %s, which the README's role does not allow", req)
				}
			}
			if strings.Contains(r.stdout+r.stderr, labTokenSecret) {
				t.Fatal("output carries the token secret")
			}

			// Without the storage grant: a clear refusal, exit 1, nothing written.
			before := listNames(t, filepath.Join(mount, "vault-snapshots"))
			if err := pve.Pveum("pveum acl delete /storage/nas-backup --users vault-agent@pve --tokens '" + labTokenID + "' --roles PVEVaultAgent"); err != nil {
				t.Fatal(err)
			}
			r = runBinary(t, env, "backup-now", "--config", b.cfg)
			if r.code != 1 || !strings.Contains(r.stderr, "Datastore.Audit on /storage/nas-backup") || !strings.Contains(r.stderr, "pveum acl modify /storage/nas-backup") {
				t.Fatalf("backup-now without the grant: %d %s", r.code, r.stderr)
			}
			if after := listNames(t, filepath.Join(mount, "vault-snapshots")); after != before {
				t.Fatalf("the refused backup changed the storage: %s → %s", before, after)
			}
		})
	}
}

func listNames(t *testing.T, dir string) string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return strings.Join(names, " ")
}
