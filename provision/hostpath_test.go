package provision

import (
	"errors"
	"testing"
)

func TestCheckHostPath(t *testing.T) {
	for _, p := range []string{"/srv/vault", "/var/lib/vault", "/data/vault", "/srv/vault-2/raft"} {
		if err := CheckHostPath(p); err != nil {
			t.Errorf("%q refused: %v", p, err)
		}
	}
	for _, p := range []string{"", "/", "/etc", "/etc/vault", "srv/vault", "/srv/../etc", "/srv/./vault", "/srv//vault", "/srv/vault/",
		"/var", "/var/lib", "/usr/local", "/proc/1", "/root", "/home", "/tmp", "/run/vault", "/boot/x",
		"/tmp/vault", "/var/tmp/vault", "/home/alice/vault", "/root/vault", "/var/lib/etcd", "/var/lib/etcd/vault",
		"/var/lib/kubelet/pods/x", "/opt/cni/bin", "/var/lib/containerd/vault", "/var/log/vault", "/dev/shm/vault"} {
		if err := CheckHostPath(p); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("%q accepted (err %v)", p, err)
		}
	}
}
