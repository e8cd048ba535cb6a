package provision

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

// The README's role is what RolePrivileges says, for each major version.
func TestREADMERoleMatchesRolePrivileges(t *testing.T) {
	for _, major := range []int{8, 9} {
		cmds, err := lab.READMERole(major, tokenID, "backup")
		if err != nil {
			t.Fatal(err)
		}
		want := `pveum role add ` + RoleName + ` --privs "` + strings.Join(RolePrivileges(major), " ") + `"`
		if len(cmds) != 3 || cmds[0] != want {
			t.Fatalf("PVE %d: README role commands %q; want first %q", major, cmds, want)
		}
	}
}

// On each version the README's role resolves VMs and the storage, and the agent calls
// no endpoint the role does not allow; a token without it gets errors that name the
// missing privilege and the command that grants it.
func TestResolveWithLeastPrivilege(t *testing.T) {
	lab.Need(t)
	ctx := ctxFor(t, time.Minute)
	storageDir := t.TempDir()
	for _, major := range []int{8, 9} {
		t.Run("PVE "+string(rune('0'+major)), func(t *testing.T) {
			p := startPVE(t, major)
			p.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Status: "running", Agent: true, Interfaces: []lab.FakeIface{{Name: "eth0", Addrs: []string{"198.18.7.2/24"}}}})
			p.PutStorage(lab.FakeStorage{ID: "backup", Type: "dir", Path: storageDir, Content: "backup", Total: 100 << 30, Used: 30 << 30, Active: true})
			r := resolver(t, p, func(c *ProxmoxConfig) { c.Node = "pve1" })
			loc, err := r.Resolve(ctx, Target{Name: "n", VMName: "worker-1"})
			if err != nil || loc.Address != "198.18.7.2" {
				t.Fatalf("resolve with the README role: %+v %v", loc, err)
			}
			dir, avail, err := r.StoragePath(ctx, "pve1", "backup")
			if err != nil || dir != storageDir+"/vault-snapshots" || avail != 70<<30 {
				t.Fatalf("storage with the README role: %q %d %v", dir, avail, err)
			}
			for _, req := range p.Requests() {
				for _, banned := range []string{"/cluster/status", "/nodes/pve1/status", "/storage/backup "} {
					if strings.Contains(req+" ", banned) {
						t.Errorf("the agent called %s, which the role does not allow", req)
					}
				}
			}
		})
	}

	t.Run("PVEAuditor on PVE 8 lacks VM.Monitor", func(t *testing.T) {
		p, err := lab.StartPVE(t.TempDir(), tokenID, tokenSecret)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		// The role the README used to recommend.
		if err := p.Pveum("pveum acl modify / --users vault-agent@pve --tokens 'vault-agent@pve!test' --roles PVEAuditor"); err != nil {
			t.Fatal(err)
		}
		p.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Status: "running", Agent: true})
		_, err = resolver(t, p, nil).Resolve(ctx, Target{Name: "n", VMID: 201})
		for _, want := range []string{"VM.Monitor on /vms/201", "403 Permission check failed (/vms/201, VM.Monitor)",
			`pveum role add PVEVaultAgent --privs "VM.Audit VM.Monitor Datastore.Audit"`,
			"pveum acl modify /vms/201 --users vault-agent@pve --tokens 'vault-agent@pve!test' --roles PVEVaultAgent"} {
			if !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), want) {
				t.Fatalf("err %v; want ErrForbidden naming %q", err, want)
			}
		}
		// PVE 9 gave PVEAuditor VM.GuestAgent.Audit: the same grant resolves there.
		p2, err := lab.StartPVE(t.TempDir(), tokenID, tokenSecret)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p2.Close)
		p2.SetMajor(9)
		if err := p2.Pveum("pveum acl modify / --users vault-agent@pve --tokens 'vault-agent@pve!test' --roles PVEAuditor"); err != nil {
			t.Fatal(err)
		}
		p2.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Status: "running", Agent: true, Interfaces: []lab.FakeIface{{Name: "eth0", Addrs: []string{"198.18.7.2/24"}}}})
		if _, err := resolver(t, p2, nil).Resolve(ctx, Target{Name: "n", VMID: 201}); err != nil {
			t.Fatalf("PVEAuditor on PVE 9: %v", err)
		}
	})

	t.Run("the PVE 8 role does not exist on PVE 9", func(t *testing.T) {
		p, err := lab.StartPVE(t.TempDir(), tokenID, tokenSecret)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		p.SetMajor(9)
		cmds, err := lab.READMERole(8, tokenID, "backup")
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Pveum(cmds[0]); err == nil || !strings.Contains(err.Error(), "invalid privilege 'VM.Monitor'") {
			t.Fatalf("PVE 8 role on PVE 9: %v", err)
		}
	})

	t.Run("a privilege-separated token without its own grant", func(t *testing.T) {
		p, err := lab.StartPVE(t.TempDir(), tokenID, tokenSecret)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		cmds, _ := lab.READMERole(8, tokenID, "backup")
		p.Pveum(cmds[0])
		// Granted to the user only: the separated token holds the intersection, nothing.
		if err := p.Pveum("pveum acl modify /vms --users vault-agent@pve --roles PVEVaultAgent"); err != nil {
			t.Fatal(err)
		}
		p.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Status: "running", Agent: true})
		_, err = resolver(t, p, nil).Resolve(ctx, Target{Name: "n", VMID: 201})
		if !errors.Is(err, ErrUnknownVM) || !strings.Contains(err.Error(), "VM.Audit") {
			t.Fatalf("err %v; want the VM hidden, naming VM.Audit", err)
		}
		if err := p.Pveum("pveum user token modify vault-agent@pve test --privsep 0"); err != nil {
			t.Fatal(err)
		}
		p.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Status: "running", Agent: true, Interfaces: []lab.FakeIface{{Name: "eth0", Addrs: []string{"198.18.7.2/24"}}}})
		if _, err := resolver(t, p, nil).Resolve(ctx, Target{Name: "n", VMID: 201}); err != nil {
			t.Fatalf("unseparated token with the user's grant: %v", err)
		}
	})

	t.Run("storage outside the grant", func(t *testing.T) {
		p := startPVE(t, 9)
		p.PutStorage(lab.FakeStorage{ID: "nas.vault", Type: "nfs", Path: "/mnt/pve/nas.vault", Total: 1 << 40, Active: true})
		_, _, err := resolver(t, p, nil).StoragePath(ctx, "pve1", "nas.vault")
		if !errors.Is(err, ErrNoStorage) || !strings.Contains(err.Error(), "Datastore.Audit on /storage/nas.vault") ||
			!strings.Contains(err.Error(), "pveum acl modify /storage/nas.vault") {
			t.Fatalf("err %v", err)
		}
	})
}

// Containers with fractional CPU limits, templates, guests without RRD data and an
// offline PVE node do not stop a VM on a live node from resolving; a VM on the offline
// node fails naming that node.
func TestResolveInAnUntidyCluster(t *testing.T) {
	lab.Need(t)
	ctx := ctxFor(t, time.Minute)
	p := startPVE(t, 8)
	p.AddNode("pve2")
	p.AddNode("pve3")
	eth := []lab.FakeIface{{Name: "eth0", Addrs: []string{"198.18.7.2/24"}}}
	p.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Node: "pve2", Status: "running", Agent: true, Interfaces: eth})
	p.PutContainer(lab.FakeCT{VMID: 150, Name: "worker-1", Node: "pve1", CPULimit: 0.5})
	p.PutContainer(lab.FakeCT{VMID: 151, Name: "dns", Node: "pve3", CPULimit: 1.5})
	p.PutVM(lab.FakeVM{VMID: 9000, Name: "worker-1", Status: "stopped", Template: true})
	p.PutVM(lab.FakeVM{VMID: 9001, Name: "debian-tmpl", Status: "stopped", Template: true})
	p.PutVM(lab.FakeVM{VMID: 210, Name: "fresh", Node: "pve2", Status: "running", Agent: true, NoRRD: true, Interfaces: eth})
	p.PutVM(lab.FakeVM{VMID: 301, Name: "worker-9", Node: "pve3", Status: "running", Agent: true, Interfaces: eth})
	p.SetNodeOnline("pve3", false)
	r := resolver(t, p, nil)

	for _, tc := range []struct {
		name    string
		target  Target
		want    string
		wantErr error
		msg     []string
	}{
		{name: "by name beside a container and a template of that name", target: Target{Name: "n", VMName: "worker-1"}, want: "198.18.7.2"},
		{name: "by vmid with no RRD data", target: Target{Name: "n", VMID: 210}, want: "198.18.7.2"},
		{name: "template", target: Target{Name: "n", VMName: "debian-tmpl"}, wantErr: ErrUnknownVM, msg: []string{"template (VMID 9001)"}},
		{name: "on the offline node by vmid", target: Target{Name: "n", VMID: 301}, wantErr: ErrNodeOffline, msg: []string{"PVE node pve3", "595 No route to host"}},
		{name: "on the offline node by name", target: Target{Name: "n", VMName: "worker-9"}, wantErr: ErrUnknownVM, msg: []string{"301 on pve3", "210 on pve2", "offline"}},
		{name: "a container's id", target: Target{Name: "n", VMID: 150}, wantErr: ErrUnknownVM, msg: []string{"VMID 150"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			loc, err := r.Resolve(ctx, tc.target)
			if tc.wantErr == nil {
				if err != nil || loc.Address != tc.want {
					t.Fatalf("%+v %v; want %s", loc, err, tc.want)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v; want %v", err, tc.wantErr)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Fatalf("err %v; want it to mention %q", err, m)
				}
			}
			if strings.Contains(err.Error(), "JSON") {
				t.Fatalf("a decoding error leaks through: %v", err)
			}
		})
	}

	t.Run("storage", func(t *testing.T) {
		dir := t.TempDir()
		p.PutStorage(lab.FakeStorage{ID: "backup", Node: "pve3", Type: "dir", Path: dir, Active: true, Total: 1 << 30})
		if _, _, err := r.StoragePath(ctx, "pve3", "backup"); !errors.Is(err, ErrNodeOffline) || !strings.Contains(err.Error(), "pve3") {
			t.Fatalf("storage on the offline node: %v", err)
		}
		p.PutStorage(lab.FakeStorage{ID: "backup", Type: "nfs", Path: dir, Active: false, Total: 1 << 30})
		if _, _, err := r.StoragePath(ctx, "pve1", "backup"); err == nil || !strings.Contains(err.Error(), "not active on pve1") {
			t.Fatalf("inactive storage: %v", err)
		}
		if _, _, err := r.StoragePath(ctx, "nosuch", "backup"); !errors.Is(err, ErrUnknownNode) || !strings.Contains(err.Error(), "proxmox.node") {
			t.Fatalf("unknown local node: %v", err)
		}
	})

	t.Run("local node", func(t *testing.T) {
		host, _ := os.Hostname()
		short, _, _ := strings.Cut(host, ".")
		if n, _ := r.LocalNode(ctx); n != short {
			t.Fatalf("local node %q; want the short hostname %q", n, short)
		}
		if n, _ := resolver(t, p, func(c *ProxmoxConfig) { c.Node = "pve1" }).LocalNode(ctx); n != "pve1" {
			t.Fatalf("local node %q; want proxmox.node", n)
		}
	})
}
