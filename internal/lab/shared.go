package lab

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

// The control plane is started once per test binary (it takes seconds) and shared;
// each test uses its own namespace.
var shared struct {
	once sync.Once
	cp   *ControlPlane
	dir  string
	err  error
}

// SharedControlPlane starts the test binary's control plane on first use and returns it.
// The test binary's TestMain must call RunTests so that it is stopped at the end.
func SharedControlPlane(t testing.TB) *ControlPlane {
	t.Helper()
	bins := Need(t)
	shared.once.Do(func() {
		shared.dir, shared.err = os.MkdirTemp("", "pva-lab-kube-")
		if shared.err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		shared.cp, shared.err = StartControlPlane(ctx, bins, shared.dir)
	})
	if shared.err != nil {
		t.Fatalf("start the lab control plane: %v", shared.err)
	}
	return shared.cp
}

// RunTests runs m and then stops the shared control plane, if one was started.
func RunTests(m *testing.M) int {
	code := m.Run()
	if shared.cp != nil {
		shared.cp.Close()
	}
	switch {
	case shared.dir != "" && code == 0:
		_ = os.RemoveAll(shared.dir)
	case shared.dir != "":
		fmt.Fprintf(os.Stderr, "lab: control plane state and logs kept in %s\n", shared.dir)
	}
	return code
}

// NodeVM is a lab node VM: sshd on port 22 in its own network namespace, optionally
// registered in a fake Proxmox API as a running VM whose guest agent reports the
// namespace address on eth0 (plus loopback and a CNI bridge, as a real k8s node would).
type NodeVM struct {
	Netns *Netns
	SSHD  *SSHD
	VMID  int
	Name  string
}

// StartNodeVM starts a NodeVM for a test and registers it in pve (when not nil).
// Everything is torn down by t.Cleanup.
func StartNodeVM(t testing.TB, pve *PVE, vmid int, name string) *NodeVM {
	t.Helper()
	bins := Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns, err := NewNetns(ctx, bins)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Close)
	s, err := StartSSHDIn(ctx, bins, t.TempDir(), ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if pve != nil {
		pve.PutVM(FakeVM{VMID: vmid, Name: name, Status: "running", Agent: true, Interfaces: []FakeIface{
			{Name: "eth0", MAC: "bc:24:11:00:00:" + fmt.Sprintf("%02x", vmid%256), Addrs: []string{ns.NodeIP + "/30", "fe80::be24:11ff:fe00:1/64"}},
			{Name: "cni0", MAC: "0a:58:c6:13:00:01", Addrs: []string{"198.19.0.1/24"}},
		}})
	}
	return &NodeVM{Netns: ns, SSHD: s, VMID: vmid, Name: name}
}

// TestVault starts a fresh single-node Raft Vault for a test, stopped by t.Cleanup.
func TestVault(t testing.TB) *Vault {
	t.Helper()
	bins := Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v, err := StartFreshVault(ctx, bins, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	return v
}
