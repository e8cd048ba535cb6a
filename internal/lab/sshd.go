package lab

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// SSHD is an OpenSSH server playing a node VM: its own host key, listening on a
// loopback address, accepting public keys listed per user under Dir/authorized_keys.
type SSHD struct {
	Host    string // e.g. 127.0.0.1
	Port    int
	Dir     string
	HostKey ssh.PublicKey
	// ClientKeyPath is an OpenSSH private key (mode 0600) authorised for root.
	ClientKeyPath string
	ClientSigner  ssh.Signer
	proc          *Process
	// SFTPLog (StartSFTP only) receives what internal-sftp logs in the chroot.
	SFTPLog string
	syslog  *net.UnixConn
}

// Addr is host:port.
func (s *SSHD) Addr() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) }

// KnownHostsLine is the known_hosts entry for this server's host key.
func (s *SSHD) KnownHostsLine() string {
	return knownhosts.Line([]string{knownhosts.Normalize(s.Addr())}, s.HostKey)
}

// WriteKnownHosts writes a known_hosts file trusting this server, mode 0600.
func (s *SSHD) WriteKnownHosts(path string) error {
	return os.WriteFile(path, []byte(s.KnownHostsLine()+"\n"), 0o600)
}

// Authorize lets user log in with pub (appends to that user's authorized_keys).
func (s *SSHD) Authorize(user string, pub ssh.PublicKey) error {
	f, err := os.OpenFile(filepath.Join(s.Dir, "authorized_keys", user), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Write(ssh.MarshalAuthorizedKey(pub))
	return err
}

// Process is the sshd process (for logs or a crash).
func (s *SSHD) Process() *Process { return s.proc }

// Close stops sshd.
func (s *SSHD) Close() {
	s.proc.Stop()
	if s.syslog != nil {
		s.syslog.Close()
	}
}

// NewKey creates an ed25519 key and writes it as an OpenSSH private key file (0600).
func NewKey(path string) (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, "lab")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return nil, err
	}
	return ssh.NewSignerFromKey(priv)
}

// StartSSHD starts sshd on host (a loopback address) and a free port, with state in dir.
func StartSSHD(ctx context.Context, bins Bins, dir, host string) (*SSHD, error) {
	if host == "" {
		host = "127.0.0.1"
	}
	port, err := FreePort(host)
	if err != nil {
		return nil, err
	}
	return startSSHD(ctx, bins, dir, host, port, nil)
}

// StartSSHDWith is StartSSHD with extra sshd_config lines (SetEnv for a lab "host"'s
// own systemd-creds secret, say).
func StartSSHDWith(ctx context.Context, bins Bins, dir, host string, extra ...string) (*SSHD, error) {
	port, err := FreePort(host)
	if err != nil {
		return nil, err
	}
	return startSSHD(ctx, bins, dir, host, port, nil, extra...)
}

// StartSSHDIn starts sshd inside ns on its node address, port 22, like a VM's sshd.
func StartSSHDIn(ctx context.Context, bins Bins, dir string, ns *Netns) (*SSHD, error) {
	return startSSHD(ctx, bins, dir, ns.NodeIP, 22, ns)
}

// StartSFTP starts an sshd on 127.0.0.1 that offers user nothing but SFTP, chrooted to
// chroot (OpenSSH's internal-sftp, as a NAS serves its backup share): the account sees
// chroot as / and may write only where the chroot's owner let it. The chroot and each
// directory above it must be root's and writable by nobody else (sshd checks).
// internal-sftp logs at DEBUG3 to the syslog socket <chroot>/dev/log, as a NAS that logs
// its chrooted SFTP does; the lab collects those messages in SFTPLog.
func StartSFTP(ctx context.Context, bins Bins, dir string, user *User, chroot string) (*SSHD, error) {
	port, err := FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	syslog, logPath, err := chrootSyslog(chroot, filepath.Join(dir, "sftp-server.log"))
	if err != nil {
		return nil, err
	}
	s, err := startSSHD(ctx, bins, dir, "127.0.0.1", port, nil,
		"Subsystem sftp internal-sftp",
		"Match User "+user.Name,
		"  ChrootDirectory "+chroot,
		"  ForceCommand internal-sftp -l DEBUG3",
		"  AllowTcpForwarding no",
		"  X11Forwarding no")
	if err != nil {
		syslog.Close()
		return nil, err
	}
	s.syslog, s.SFTPLog = syslog, logPath
	if err := s.Authorize(user.Name, s.ClientSigner.PublicKey()); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// chrootSyslog listens on <chroot>/dev/log (datagrams, as syslog(3) sends them) and
// appends each message to logPath.
func chrootSyslog(chroot, logPath string) (*net.UnixConn, string, error) {
	dev := filepath.Join(chroot, "dev")
	if err := os.MkdirAll(dev, 0o755); err != nil {
		return nil, "", err
	}
	sock := filepath.Join(dev, "log")
	_ = os.Remove(sock)
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return nil, "", fmt.Errorf("syslog socket in the chroot: %w", err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		l.Close()
		return nil, "", err
	}
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		l.Close()
		return nil, "", err
	}
	go func() {
		defer f.Close()
		buf := make([]byte, 8192)
		for {
			n, _, err := l.ReadFromUnix(buf)
			if err != nil {
				return
			}
			_, _ = f.Write(append(buf[:n:n], '\n'))
		}
	}()
	return l, logPath, nil
}

func startSSHD(ctx context.Context, bins Bins, dir, host string, port int, ns *Netns, extra ...string) (*SSHD, error) {
	if err := os.MkdirAll(filepath.Join(dir, "authorized_keys"), 0o755); err != nil {
		return nil, err
	}
	// sshd reads a user's authorized_keys as that user: let non-root test users reach it.
	if err := MakeTraversable(filepath.Join(dir, "authorized_keys", "user")); err != nil {
		return nil, err
	}
	// sshd insists on its privilege-separation directory.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		return nil, fmt.Errorf("sshd needs /run/sshd: %w", err)
	}
	hostSigner, err := NewKey(filepath.Join(dir, "ssh_host_ed25519_key"))
	if err != nil {
		return nil, err
	}
	clientSigner, err := NewKey(filepath.Join(dir, "client_ed25519"))
	if err != nil {
		return nil, err
	}
	s := &SSHD{Host: host, Port: port, Dir: dir, HostKey: hostSigner.PublicKey(),
		ClientKeyPath: filepath.Join(dir, "client_ed25519"), ClientSigner: clientSigner}
	if err := s.Authorize("root", clientSigner.PublicKey()); err != nil {
		return nil, err
	}
	cfg := strings.Join([]string{
		"ListenAddress " + s.Addr(),
		"HostKey " + filepath.Join(dir, "ssh_host_ed25519_key"),
		"PidFile " + filepath.Join(dir, "sshd.pid"),
		"AuthorizedKeysFile " + filepath.Join(dir, "authorized_keys", "%u"),
		"StrictModes no",
		"UsePAM no",
		"PermitRootLogin prohibit-password",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PubkeyAuthentication yes",
		"AllowTcpForwarding yes",
		"LogLevel VERBOSE",
		"MaxStartups 100",
	}, "\n") + "\n" + strings.Join(extra, "\n") + "\n"
	cfgPath := filepath.Join(dir, "sshd_config")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	bin, args := bins.SSHD, []string{"-D", "-e", "-f", cfgPath}
	if ns != nil {
		bin, args = ns.Wrap(bin, args...)
	}
	p, err := startProcess("sshd", filepath.Join(dir, "sshd.log"), bin, args, nil, nil)
	if err != nil {
		return nil, err
	}
	s.proc = p
	err = WaitFor(ctx, 10*time.Second, "sshd on "+s.Addr(), func(ctx context.Context) error {
		if err := p.errIfExited(); err != nil {
			return err
		}
		return readBanner(ctx, s.Addr())
	})
	if err != nil {
		p.Stop()
		return nil, err
	}
	return s, nil
}

// readBanner connects and reads the SSH identification line.
func readBanner(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "SSH-2.0-") {
		return fmt.Errorf("unexpected banner %q", line)
	}
	return nil
}
