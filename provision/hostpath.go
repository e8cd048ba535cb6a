// Package provision owns the node VMs: resolving where a node is (a static address or a
// Proxmox VM through its QEMU guest agent) and preparing the Vault hostPath on it over SSH.
//
// Invariants: a host path is absolute, clean, free of "..", and never a system directory
// or its ancestor; the check runs before anything touches a node. Owner and mode are read
// back numerically after every change. Failures name the node and the step.
//
// It imports only the standard library and the SDKs of the systems it owns
// (go-proxmox, x/crypto/ssh); it never imports the agent or another domain package.
package provision

import (
	"errors"
	"fmt"
	"path"
	"strings"
)

// ErrUnsafePath is wrapped by every refusal of CheckHostPath.
var ErrUnsafePath = errors.New("unsafe host path")

// systemDirs are directories whose ownership must never change, nor that of anything
// the agent would chown recursively beneath them as the directory itself.
var systemDirs = []string{
	"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
	"/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp",
	"/usr", "/var", "/var/lib", "/var/log", "/var/run", "/var/tmp", "/usr/local",
	"/usr/bin", "/usr/sbin", "/usr/lib", "/etc/kubernetes", "/var/lib/kubelet",
}

// CheckHostPath refuses a path the agent must never own: relative, unclean, containing
// "..", a system directory, or inside /proc, /sys, /dev, /etc, /boot, /usr, /bin, /sbin,
// /lib*. The error says what is wrong and what to use instead.
func CheckHostPath(p string) error {
	hint := "use a dedicated directory such as /srv/vault or /var/lib/vault"
	switch {
	case p == "":
		return fmt.Errorf("%w: empty; %s", ErrUnsafePath, hint)
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("%w: %q is relative; %s", ErrUnsafePath, p, hint)
	}
	for _, el := range strings.Split(p, "/") {
		if el == ".." || el == "." {
			return fmt.Errorf("%w: %q contains %q; write the path without it", ErrUnsafePath, p, el)
		}
	}
	if c := path.Clean(p); c != p {
		return fmt.Errorf("%w: %q is not clean; write it as %q", ErrUnsafePath, p, c)
	}
	for _, d := range systemDirs {
		if p == d {
			return fmt.Errorf("%w: %q is a system directory; %s", ErrUnsafePath, p, hint)
		}
	}
	for _, d := range []string{"/proc", "/sys", "/dev", "/etc", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/run", "/var/run"} {
		if strings.HasPrefix(p, d+"/") {
			return fmt.Errorf("%w: %q is inside the system directory %s; %s", ErrUnsafePath, p, d, hint)
		}
	}
	for _, u := range unsafeTrees {
		if p == u.dir || strings.HasPrefix(p, u.dir+"/") {
			return fmt.Errorf("%w: %q is inside %s, %s; %s", ErrUnsafePath, p, u.dir, u.why, hint)
		}
	}
	return nil
}

// unsafeTrees are directories whose contents belong to someone else: Vault's data there
// would be cleaned up, shared, or would hand the agent's chown a tree it must not touch.
var unsafeTrees = []struct{ dir, why string }{
	{"/tmp", "which is cleaned at boot and writable by every user"},
	{"/var/tmp", "which is writable by every user and cleaned by tmpfiles"},
	{"/dev/shm", "which is memory and writable by every user"},
	{"/home", "which holds users' files"},
	{"/root", "root's home directory"},
	{"/var/log", "which log rotation cleans"},
	{"/var/lib/etcd", "the Kubernetes datastore"},
	{"/var/lib/kubelet", "the kubelet's state (pods, volumes, secrets)"},
	{"/var/lib/containerd", "the container runtime's state"},
	{"/var/lib/docker", "the container runtime's state"},
	{"/var/lib/cni", "the container network's state"},
	{"/opt/cni", "the container network plugins"},
	{"/etc/kubernetes", "the cluster's configuration and keys"},
}
