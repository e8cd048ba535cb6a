package provision

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

const (
	tokenID     = "vault-agent@pve!test"
	tokenSecret = "0d4b8f2e-7c1a-4e9b-b3d5-6a8c0e2f4b1d"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// startPVE is the Proxmox stand-in speaking as PVE major, its token holding the
// README's role on the VMs and on the storage "backup".
func startPVE(t *testing.T, major int) *lab.PVE {
	t.Helper()
	p, err := lab.StartPVE(t.TempDir(), tokenID, tokenSecret)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	p.SetMajor(major)
	if err := p.GrantREADMERole("backup"); err != nil {
		t.Fatal(err)
	}
	return p
}

func resolver(t *testing.T, p *lab.PVE, mod func(*ProxmoxConfig)) *Resolver {
	t.Helper()
	cfg := ProxmoxConfig{URL: p.URL, TokenID: tokenID, TokenSecret: tokenSecret, CAFile: p.CAFile, Timeout: 5 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	r, err := NewResolver(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestResolve(t *testing.T) {
	lab.Need(t)
	ctx := ctxFor(t, time.Minute)
	p := startPVE(t, 8)
	p.AddNode("pve2")
	p.PutVM(lab.FakeVM{VMID: 201, Name: "worker-1", Node: "pve2", Status: "running", Agent: true, Interfaces: []lab.FakeIface{
		{Name: "lo", Addrs: []string{"127.0.0.1/8"}},
		{Name: "cni0", Addrs: []string{"198.19.0.1/24"}},
		{Name: "eth0", Addrs: []string{"fe80::1/64", "198.18.7.2/24", "2001:db8::7/64"}},
		{Name: "eth1", Addrs: []string{"198.18.9.2/24"}},
	}})
	p.PutVM(lab.FakeVM{VMID: 202, Name: "worker-2", Status: "stopped", Agent: true})
	p.PutVM(lab.FakeVM{VMID: 203, Name: "worker-3", Status: "running", Agent: false})
	p.PutVM(lab.FakeVM{VMID: 208, Name: "worker-8", Status: "running", NoAgentConfig: true})
	p.PutVM(lab.FakeVM{VMID: 204, Name: "worker-4", Status: "running", Agent: true, Interfaces: []lab.FakeIface{
		{Name: "eth0", Addrs: []string{"fe80::2/64", "169.254.3.4/16"}},
	}})
	p.PutVM(lab.FakeVM{VMID: 205, Name: "twin", Status: "running", Agent: true})
	p.PutVM(lab.FakeVM{VMID: 206, Name: "twin", Status: "running", Agent: true})
	p.PutVM(lab.FakeVM{VMID: 207, Name: "v6-only", Status: "running", Agent: true, Interfaces: []lab.FakeIface{
		{Name: "ens18", Addrs: []string{"2001:db8::9/64"}},
	}})

	for _, tc := range []struct {
		name    string
		target  Target
		mod     func(*ProxmoxConfig)
		want    string
		wantErr error
		msg     string
	}{
		{name: "static", target: Target{Name: "n", Address: "192.0.2.10"}, want: "192.0.2.10"},
		{name: "by vmid on another pve node", target: Target{Name: "n", VMID: 201}, want: "198.18.7.2"},
		{name: "by name", target: Target{Name: "n", VMName: "worker-1"}, want: "198.18.7.2"},
		{name: "preferred cidr", target: Target{Name: "n", VMID: 201}, mod: func(c *ProxmoxConfig) { c.PreferCIDR = "198.18.9.0/24" }, want: "198.18.9.2"},
		{name: "ipv6 when nothing else", target: Target{Name: "n", VMID: 207}, want: "2001:db8::9"},
		{name: "stopped", target: Target{Name: "n", VMID: 202}, wantErr: ErrVMStopped, msg: "qm start 202"},
		{name: "agent not running", target: Target{Name: "n", VMID: 203}, wantErr: ErrGuestAgent, msg: "systemctl enable --now qemu-guest-agent"},
		{name: "agent not configured", target: Target{Name: "n", VMID: 208}, wantErr: ErrGuestAgent, msg: "qm set <vmid> --agent enabled=1"},
		{name: "unknown vmid", target: Target{Name: "n", VMID: 999}, wantErr: ErrUnknownVM, msg: "VMID 999"},
		{name: "unknown name", target: Target{Name: "n", VMName: "nope"}, wantErr: ErrUnknownVM, msg: `"nope"`},
		{name: "only link-local", target: Target{Name: "n", VMID: 204}, wantErr: ErrNoAddress, msg: "169.254.3.4"},
		{name: "ambiguous name", target: Target{Name: "n", VMName: "twin"}, wantErr: ErrAmbiguousVM, msg: "use vmid"},
		{name: "bad token", target: Target{Name: "n", VMID: 201}, mod: func(c *ProxmoxConfig) { c.TokenSecret = "wrong" }, wantErr: ErrUnauthorized, msg: "token_id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			loc, err := resolver(t, p, tc.mod).Resolve(ctx, tc.target)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.msg) || !strings.HasPrefix(err.Error(), "node n: ") {
					t.Fatalf("err %v; want %v mentioning %q", err, tc.wantErr, tc.msg)
				}
				if strings.Contains(err.Error(), tokenSecret) {
					t.Fatal("error carries the token secret")
				}
				return
			}
			if err != nil || loc.Address != tc.want {
				t.Fatalf("address %q err %v; want %q", loc.Address, err, tc.want)
			}
		})
	}
	t.Run("untrusted certificate", func(t *testing.T) {
		_, err := resolver(t, p, func(c *ProxmoxConfig) { c.CAFile = "" }).Resolve(ctx, Target{Name: "n", VMID: 201})
		if err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("err %v, want a certificate error", err)
		}
	})
	t.Run("insecure skip verify", func(t *testing.T) {
		loc, err := resolver(t, p, func(c *ProxmoxConfig) { c.CAFile = ""; c.InsecureSkipVerify = true }).Resolve(ctx, Target{Name: "n", VMID: 201})
		if err != nil || loc.PVENode != "pve2" || loc.VMID != 201 {
			t.Fatalf("%+v %v", loc, err)
		}
	})
}

// nodeSetup is a node VM in the lab plus the SSH settings to reach it.
type nodeSetup struct {
	vm  *lab.NodeVM
	cfg SSHConfig
	dir string
}

func newNode(t *testing.T) *nodeSetup {
	t.Helper()
	vm := lab.StartNodeVM(t, nil, 0, "")
	dir := t.TempDir()
	kh := filepath.Join(dir, "known_hosts")
	if err := vm.SSHD.WriteKnownHosts(kh); err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(vm.SSHD.ClientKeyPath)
	if err != nil {
		t.Fatal(err)
	}
	return &nodeSetup{vm: vm, dir: dir, cfg: SSHConfig{User: "root", Port: 22, Key: key, KnownHosts: kh, Sudo: "auto",
		ConnectTimeout: 5 * time.Second, CommandTimeout: 20 * time.Second}}
}

func (n *nodeSetup) prepare(t *testing.T, ctx context.Context, w Want) (Prepared, error) {
	t.Helper()
	c, err := Dial(ctx, n.vm.Netns.NodeIP, n.cfg)
	if err != nil {
		return Prepared{}, err
	}
	defer c.Close()
	return c.Prepare(ctx, w)
}

// conn dials the node; closed at cleanup.
func (n *nodeSetup) conn(t *testing.T, ctx context.Context) *Conn {
	t.Helper()
	c, err := Dial(ctx, n.vm.Netns.NodeIP, n.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func statOwner(t *testing.T, p string) (int, int, os.FileMode) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return int(st.Uid), int(st.Gid), fi.Mode().Perm()
}

func TestPrepareCreatesFixesAndIsIdempotent(t *testing.T) {
	n := newNode(t)
	ctx := ctxFor(t, time.Minute)
	path := filepath.Join(lab.TestDataDir(t), "srv", "vault")
	want := Want{Path: path, UID: 100, GID: 100, Mode: 0o700}

	t0 := time.Now()
	got, err := n.prepare(t, ctx, want)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("provision one node (connect → verified) took %s", time.Since(t0).Round(time.Millisecond))
	if got != (Prepared{Path: path, State: Created, UID: 100, GID: 100, Mode: "0700"}) {
		t.Fatalf("first run %+v", got)
	}
	if u, g, m := statOwner(t, path); u != 100 || g != 100 || m != 0o700 {
		t.Fatalf("on disk %d:%d %o", u, g, m)
	}
	if got, err := n.prepare(t, ctx, want); err != nil || got.State != Unchanged {
		t.Fatalf("second run %+v %v", got, err)
	}

	// Break it the usual ways: data restored as root, mode loosened.
	inner := filepath.Join(path, "raft", "raft.db")
	if err := os.MkdirAll(filepath.Dir(inner), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inner, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o755); err != nil {
		t.Fatal(err)
	}
	got, err = n.prepare(t, ctx, want)
	if err != nil || got.State != Fixed || got.Mode != "0700" {
		t.Fatalf("after breaking: %+v %v", got, err)
	}
	for _, p := range []string{path, filepath.Dir(inner), inner} {
		if u, g, _ := statOwner(t, p); u != 100 || g != 100 {
			t.Fatalf("%s owned by %d:%d after fix", p, u, g)
		}
	}
	// Only inside the directory: its parent keeps its owner.
	if u, _, _ := statOwner(t, filepath.Dir(path)); u != 0 {
		t.Fatalf("parent chowned to %d", u)
	}
	// A different owner asked for (config changed) is applied and verified.
	if got, err := n.prepare(t, ctx, Want{Path: path, UID: 1234, GID: 1234, Mode: 0o750}); err != nil || got.State != Fixed || got.UID != 1234 || got.Mode != "0750" {
		t.Fatalf("re-own: %+v %v", got, err)
	}
}

func TestPrepareRefusesUnsafePaths(t *testing.T) {
	n := newNode(t)
	ctx := ctxFor(t, time.Minute)
	base := lab.TestDataDir(t)
	real := filepath.Join(base, "real")
	if err := os.Mkdir(real, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/", "/etc", "relative/vault", "/srv/../etc/vault", link, filepath.Join(link, "vault")} {
		_, err := n.prepare(t, ctx, Want{Path: p, UID: 100, GID: 100, Mode: 0o700})
		if !errors.Is(err, ErrUnsafePath) {
			t.Errorf("%q: %v, want ErrUnsafePath", p, err)
		}
	}
	if u, _, m := statOwner(t, real); u != 0 || m != 0o755 {
		t.Fatalf("symlink target changed: %d %o", u, m)
	}
	if _, err := os.Stat(filepath.Join(real, "vault")); !os.IsNotExist(err) {
		t.Fatalf("created through a symlinked parent: %v", err)
	}
}

// Inside the data directory nothing leads the agent astray: a symlink planted there is
// re-owned itself, never its target (chown -h through find -execdir); a filesystem
// mounted inside is not crossed; and a wipe for a rejoin empties the directory the same
// way, keeping the directory, its owner and mode.
func TestPrepareAndSetAsideStayInside(t *testing.T) {
	n := newNode(t)
	ctx := ctxFor(t, time.Minute)
	base := lab.TestDataDir(t)
	path := filepath.Join(base, "vault")
	if _, err := n.prepare(t, ctx, Want{Path: path, UID: 100, GID: 100, Mode: 0o700}); err != nil {
		t.Fatal(err)
	}
	outside := filepath.Join(base, "outside-secret")
	if err := os.WriteFile(outside, []byte("root's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(path, "planted")); err != nil {
		t.Fatal(err)
	}
	// The mount is made in the node's own mount namespace (ip netns exec gives sshd
	// one), where the agent's commands run: mounted here, it would be invisible there.
	mnt := filepath.Join(path, "mnt")
	os.Mkdir(mnt, 0o755)
	inNode := func(args ...string) ([]byte, error) {
		return exec.Command("nsenter", append([]string{"--target", strconv.Itoa(n.vm.SSHD.Process().PID()), "--mount", "--"}, args...)...).CombinedOutput()
	}
	if out, err := inNode("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", mnt); err != nil {
		lab.SkipOrFail(t, "cannot mount a tmpfs in the node: %v %s", err, out)
	}
	t.Cleanup(func() { inNode("umount", mnt) })
	inMount := filepath.Join(mnt, "other-fs")
	if out, err := inNode("sh", "-c", "echo x > "+inMount); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	os.Chown(path, 0, 0) // a wrong owner, so prepare chowns
	got, err := n.prepare(t, ctx, Want{Path: path, UID: 100, GID: 100, Mode: 0o700})
	if err != nil || got.State != Fixed {
		t.Fatalf("prepare: %+v %v", got, err)
	}
	if u, _, _ := statOwner(t, outside); u != 0 {
		t.Fatalf("the symlink's target was chowned to %d", u)
	}
	if fi, err := os.Lstat(filepath.Join(path, "planted")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 100 {
		t.Fatalf("the planted link itself was not re-owned: %v", err)
	}
	if out, err := inNode("stat", "-c", "%u", inMount); err != nil || strings.TrimSpace(string(out)) != "0" {
		t.Fatalf("prepare crossed into a mounted filesystem: owner %s %v", out, err)
	}
	// Emptying the data refuses to leave a mount half-emptied, and never follows the link.
	c := n.conn(t, ctx)
	want := Want{Path: path, UID: 100, GID: 100, Mode: 0o700}
	if err := c.SetAside(ctx, path); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("the data directory is still there after SetAside: %v", err)
	}
	if err := c.SetAside(ctx, path); err != nil {
		t.Fatalf("SetAside again (a re-run): %v", err)
	}
	if _, err := c.ReplaceEmpty(ctx, want); err == nil || !strings.Contains(err.Error(), "mounted inside") || !strings.Contains(err.Error(), "nothing deleted") {
		t.Fatalf("replace with a mount inside: %v", err)
	}
	inNode("umount", filepath.Join(path+AsideSuffix, "mnt"))
	got, err = c.ReplaceEmpty(ctx, want)
	if err != nil || got.State != Created {
		t.Fatalf("replace: %+v %v", got, err)
	}
	ents, _ := os.ReadDir(path)
	if len(ents) != 0 {
		t.Fatalf("left after the wipe: %v", ents)
	}
	if _, err := os.Stat(path + AsideSuffix); !os.IsNotExist(err) {
		t.Fatalf("the data set aside is still there: %v", err)
	}
	if u, _, m := statOwner(t, path); u != 100 || m != 0o700 {
		t.Fatalf("the wiped directory is %d %o", u, m)
	}
	if b, err := os.ReadFile(outside); err != nil || string(b) != "root's" {
		t.Fatalf("the link's target was touched: %v", err)
	}
	// Something wrote into a directory recreated while the data was set aside: refused.
	if err := c.SetAside(ctx, path); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(path, 0o755)
	os.WriteFile(filepath.Join(path, "vault.db"), []byte("x"), 0o600)
	if _, err := c.ReplaceEmpty(ctx, want); err == nil || !strings.Contains(err.Error(), "recreated and written") {
		t.Fatalf("replace over a written directory: %v", err)
	}
	// A data directory that is a mount point cannot be set aside.
	os.RemoveAll(path)
	os.Mkdir(path, 0o700)
	if out, err := inNode("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	t.Cleanup(func() { inNode("umount", path) })
	if err := c.SetAside(ctx, path); !errors.Is(err, ErrMountPoint) {
		t.Fatalf("set aside a mount point: %v", err)
	}
}

func TestHostKeyChecks(t *testing.T) {
	n := newNode(t)
	ctx := ctxFor(t, time.Minute)
	path := filepath.Join(lab.TestDataDir(t), "vault")

	t.Run("mismatch refused with both fingerprints, nothing changed", func(t *testing.T) {
		other, err := lab.NewKey(filepath.Join(t.TempDir(), "other"))
		if err != nil {
			t.Fatal(err)
		}
		cfg := n.cfg
		cfg.KnownHosts = filepath.Join(t.TempDir(), "known_hosts")
		cfg.AcceptNewHostKey = true // never overrides a mismatch
		os.WriteFile(cfg.KnownHosts, []byte(knownhosts.Line([]string{n.vm.Netns.NodeIP}, other.PublicKey())+"\n"), 0o600)
		_, err = Dial(ctx, n.vm.Netns.NodeIP, cfg)
		if !errors.Is(err, ErrHostKeyMismatch) {
			t.Fatalf("err %v", err)
		}
		for _, fp := range []string{ssh.FingerprintSHA256(other.PublicKey()), ssh.FingerprintSHA256(n.vm.SSHD.HostKey), "ssh-keygen -R"} {
			if !strings.Contains(err.Error(), fp) {
				t.Errorf("message lacks %s: %v", fp, err)
			}
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Fatal("directory created despite the mismatch")
		}
	})
	t.Run("unknown host refused without opt-in, pinned with it", func(t *testing.T) {
		cfg := n.cfg
		cfg.KnownHosts = filepath.Join(t.TempDir(), "known_hosts")
		if _, err := Dial(ctx, n.vm.Netns.NodeIP, cfg); !errors.Is(err, ErrUnknownHostKey) || !strings.Contains(err.Error(), "--accept-new-host-key") {
			t.Fatalf("missing known_hosts: %v", err)
		}
		os.WriteFile(cfg.KnownHosts, nil, 0o600)
		_, err := Dial(ctx, n.vm.Netns.NodeIP, cfg)
		if !errors.Is(err, ErrUnknownHostKey) || !strings.Contains(err.Error(), ssh.FingerprintSHA256(n.vm.SSHD.HostKey)) {
			t.Fatalf("unknown host: %v", err)
		}
		cfg.AcceptNewHostKey = true
		c, err := Dial(ctx, n.vm.Netns.NodeIP, cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if c.PinnedKey != ssh.FingerprintSHA256(n.vm.SSHD.HostKey) {
			t.Fatalf("pinned %q", c.PinnedKey)
		}
		cfg.AcceptNewHostKey = false
		c, err = Dial(ctx, n.vm.Netns.NodeIP, cfg)
		if err != nil {
			t.Fatalf("after pinning: %v", err)
		}
		c.Close()
		if fi, _ := os.Stat(cfg.KnownHosts); fi.Mode().Perm() != 0o600 {
			t.Fatalf("known_hosts mode %o", fi.Mode().Perm())
		}
	})
	t.Run("wrong client key", func(t *testing.T) {
		other := filepath.Join(t.TempDir(), "other")
		if _, err := lab.NewKey(other); err != nil {
			t.Fatal(err)
		}
		cfg := n.cfg
		cfg.Key, _ = os.ReadFile(other)
		if _, err := Dial(ctx, n.vm.Netns.NodeIP, cfg); !errors.Is(err, ErrSSHAuth) || !strings.Contains(err.Error(), "authorized_keys") {
			t.Fatalf("err %v", err)
		}
	})
	t.Run("garbage key never echoed", func(t *testing.T) {
		cfg := n.cfg
		cfg.Key = []byte("not-a-key-SECRETVALUE")
		if _, err := Dial(ctx, n.vm.Netns.NodeIP, cfg); err == nil || strings.Contains(err.Error(), "SECRETVALUE") {
			t.Fatalf("err %v", err)
		}
	})
}

func TestNonRootUsers(t *testing.T) {
	n := newNode(t)
	ctx := ctxFor(t, time.Minute)
	for _, tc := range []struct {
		user    string
		sudo    bool
		wantErr error
	}{
		{"pva-sudoer", true, nil},
		{"pva-nosudo", false, ErrSudo},
	} {
		t.Run(tc.user, func(t *testing.T) {
			u, err := lab.NewUser(tc.user, tc.sudo)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(u.Close)
			if err := n.vm.SSHD.Authorize(tc.user, n.vm.SSHD.ClientSigner.PublicKey()); err != nil {
				t.Fatal(err)
			}
			cfg := n.cfg
			cfg.User = tc.user
			c, err := Dial(ctx, n.vm.Netns.NodeIP, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			path := filepath.Join(lab.TestDataDir(t), "vault")
			got, err := c.Prepare(ctx, Want{Path: path, UID: 100, GID: 100, Mode: 0o700})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), "NOPASSWD") {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
				if _, err := os.Stat(path); !os.IsNotExist(err) {
					t.Fatal("directory created without sudo")
				}
				return
			}
			if err != nil || got.State != Created || got.UID != 100 {
				t.Fatalf("%+v %v", got, err)
			}
		})
	}
}

// The point of provisioning: Vault running as uid 100 initialises on the prepared
// directory and cannot on an unprepared root-owned one.
func TestVaultAsUID100NeedsProvisioning(t *testing.T) {
	n := newNode(t)
	bins := lab.Need(t)
	ctx := ctxFor(t, 2*time.Minute)
	uid, gid := uint32(100), uint32(100)

	data := lab.TestDataDir(t)
	unprepared := filepath.Join(data, "unprepared")
	if err := os.Mkdir(unprepared, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := lab.StartVault(ctx, bins, lab.VaultOptions{DataDir: unprepared, StateDir: filepath.Join(t.TempDir(), "s1"), UID: &uid, GID: &gid})
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("vault on a root-owned directory: %v, want permission denied", err)
	}

	prepared := filepath.Join(data, "srv", "vault")
	if _, err := n.prepare(t, ctx, Want{Path: prepared, UID: 100, GID: 100, Mode: 0o700}); err != nil {
		t.Fatal(err)
	}
	v, err := lab.StartVault(ctx, bins, lab.VaultOptions{DataDir: prepared, StateDir: filepath.Join(t.TempDir(), "s2"), UID: &uid, GID: &gid})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	cfg := vaultapi.DefaultConfig()
	cfg.Address = v.Addr
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sys().InitWithContext(ctx, &vaultapi.InitRequest{SecretShares: 1, SecretThreshold: 1}); err != nil {
		t.Fatalf("init on the prepared directory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(prepared, "vault.db")); err != nil {
		t.Fatalf("vault wrote no data: %v", err)
	}
}
