package lab

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Netns is a network namespace playing a node VM's network: a veth pair with the host
// end at HostIP and the node end at NodeIP, both in 198.18.0.0/15 (the benchmarking
// range, never routed). Servers started in it listen on NodeIP with real ports (22),
// and the VM's "guest agent" can report NodeIP like a real NIC address.
type Netns struct {
	Name   string
	HostIP string
	NodeIP string
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
