package lab

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Netns is a network namespace playing a node VM's network: a veth pair with the host
// end at HostIP and the node end at NodeIP, both in 198.18.0.0/15 (the benchmarking
// range, never routed). Servers started in it listen on NodeIP with real ports (22),
// and the VM's "guest agent" can report NodeIP like a real NIC address. PodIP
// (198.19.0.0/16, routed to the namespace from the host) is a second address there for
// a pod beside the node's own (a restore drill's).
type Netns struct {
	Name   string
	HostIP string
	NodeIP string
	PodIP  string
	ipBin  string
}

// NewNetns creates a namespace with a fresh /30 subnet.
func NewNetns(ctx context.Context, bins Bins) (*Netns, error) {
	var lastErr error
	for range 5 {
		var b [2]byte
		_, _ = rand.Read(b[:])
		n := int(binary.BigEndian.Uint16(b[:]) % 16000)
		base := n * 4 // /30 blocks across 198.18.0.0/16
		ns := &Netns{
			Name:   fmt.Sprintf("pva-%d", n),
			HostIP: fmt.Sprintf("198.18.%d.%d", base>>8, base&255+1),
			NodeIP: fmt.Sprintf("198.18.%d.%d", base>>8, base&255+2),
			PodIP:  fmt.Sprintf("198.19.%d.%d", base>>8, base&255+2),
			ipBin:  bins.IP,
		}
		host, peer := fmt.Sprintf("pvah%d", n), fmt.Sprintf("pvan%d", n)
		if lastErr = ns.ip(ctx, "netns", "add", ns.Name); lastErr != nil {
			continue
		}
		for _, args := range [][]string{
			{"link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns.Name},
			{"addr", "add", ns.HostIP + "/30", "dev", host},
			{"link", "set", host, "up"},
			{"-n", ns.Name, "addr", "add", ns.NodeIP + "/30", "dev", peer},
			{"-n", ns.Name, "link", "set", peer, "up"},
			{"-n", ns.Name, "link", "set", "lo", "up"},
			{"-n", ns.Name, "addr", "add", ns.PodIP + "/32", "dev", peer},
			{"route", "add", ns.PodIP + "/32", "dev", host},
		} {
			if err := ns.ip(ctx, args...); err != nil {
				ns.Close()
				return nil, err
			}
		}
		return ns, nil
	}
	return nil, fmt.Errorf("create a network namespace: %w", lastErr)
}

func (ns *Netns) ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, ns.ipBin, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Wrap returns the argv that runs bin with args inside the namespace.
func (ns *Netns) Wrap(bin string, args ...string) (string, []string) {
	return ns.ipBin, append([]string{"netns", "exec", ns.Name, bin}, args...)
}

// Close deletes the namespace; its veth pair goes with it.
func (ns *Netns) Close() {
	_ = exec.Command(ns.ipBin, "netns", "del", ns.Name).Run()
}

// User is a local account the lab created for a test (non-root SSH, sudo or not).
type User struct {
	Name    string
	sudoers string
}

// NewUser creates a login-capable account without a password (key login only); with
// sudo it may run anything through sudo -n. Close removes both.
func NewUser(name string, sudo bool) (*User, error) {
	_ = exec.Command("userdel", name).Run() // a leftover of a killed run
	if out, err := exec.Command("useradd", "--no-create-home", "--shell", "/bin/sh", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("useradd %s: %v: %s", name, err, out)
	}
	// "*" instead of useradd's "!": no password, but not locked, so sshd lets keys in.
	if out, err := exec.Command("usermod", "-p", "*", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("usermod %s: %v: %s", name, err, out)
	}
	u := &User{Name: name}
	if sudo {
		u.sudoers = filepath.Join("/etc/sudoers.d", "pva-lab-"+name)
		if err := os.WriteFile(u.sudoers, []byte(name+" ALL=(ALL) NOPASSWD: ALL\n"), 0o440); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// Close removes the account and its sudo rule.
func (u *User) Close() {
	if u.sudoers != "" {
		_ = os.Remove(u.sudoers)
	}
	_ = exec.Command("userdel", u.Name).Run()
}

// Listen opens a TCP listener inside the namespace: the socket is created by a thread
// that entered the namespace and then returned to its own, so it serves the namespace's
// addresses while the test process stays where it is.
//
// The thread must never exit: lab servers are started with Pdeathsig, which the kernel
// ties to the thread that forked them, so a dying thread would kill an unrelated server.
// A thread that cannot get back to its namespace is parked for good instead.
func (ns *Netns) Listen(addr string) (net.Listener, error) {
	type result struct {
		l   net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("open this thread's namespace: %w", err)}
			return
		}
		defer unix.Close(self)
		fd, err := unix.Open("/var/run/netns/"+ns.Name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("open namespace %s: %w", ns.Name, err)}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("enter namespace %s: %w", ns.Name, err)}
			return
		}
		l, err := net.Listen("tcp", addr)
		ch <- result{l, err}
		if unix.Setns(self, unix.CLONE_NEWNET) != nil {
			select {} // stuck in the namespace: park the thread rather than let it die
		}
		runtime.UnlockOSThread()
	}()
	r := <-ch
	return r.l, r.err
}
