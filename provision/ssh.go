package provision

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// SSH errors an operator must act on.
var (
	ErrHostKeyMismatch = errors.New("host key mismatch")
	ErrUnknownHostKey  = errors.New("host key not in known_hosts")
	ErrSSHAuth         = errors.New("ssh authentication failed")
	ErrSudo            = errors.New("sudo -n refused")
)

// SSHConfig is how to reach a node over SSH.
type SSHConfig struct {
	User string
	Port int
	// Key is the private key (OpenSSH or PEM). Never logged or put into errors.
	Key []byte
	// KnownHosts is the known_hosts file every host key is checked against.
	KnownHosts string
	// AcceptNewHostKey pins the key of a host not yet in KnownHosts (explicit opt-in).
	// A key that differs from a pinned one is always refused.
	AcceptNewHostKey bool
	// Sudo: "auto" (sudo -n unless User is root), "always", "never".
	Sudo           string
	ConnectTimeout time.Duration
	CommandTimeout time.Duration
	// KeepaliveInterval sends OpenSSH's keepalive request this often once connected
	// (default 15s); a connection that leaves three unanswered is closed, so a peer that
	// vanished (a powered-off VM, a dropped route) fails every call on it at once
	// instead of when TCP gives up, a quarter of an hour later.
	KeepaliveInterval time.Duration
}

// keepaliveCount is how many keepalive intervals may pass without an answer.
const keepaliveCount = 3

func (c SSHConfig) useSudo() bool {
	switch c.Sudo {
	case "always":
		return true
	case "never":
		return false
	}
	return c.User != "root"
}

// Conn is an SSH connection to one node.
type Conn struct {
	Host   string
	client *ssh.Client
	cfg    SSHConfig
	// PinnedKey is set when this connection added the host's key to known_hosts.
	PinnedKey string
}

// Dial connects to host with the key in cfg, verifying the host key against
// cfg.KnownHosts; an unknown host is refused unless cfg.AcceptNewHostKey.
func Dial(ctx context.Context, host string, cfg SSHConfig) (*Conn, error) {
	signer, err := ssh.ParsePrivateKey(cfg.Key)
	if err != nil {
		var pp *ssh.PassphraseMissingError
		if errors.As(err, &pp) {
			return nil, errors.New("ssh identity is protected by a passphrase; the agent needs an unencrypted key (keep it in a 0600 file or a systemd credential)")
		}
		return nil, errors.New("ssh identity is not a private key the agent can read (OpenSSH or PEM format)")
	}
	addr := net.JoinHostPort(host, strconv.Itoa(cfg.Port))
	c := &Conn{Host: host, cfg: cfg}
	hostKeyCB, err := c.hostKeyCallback(addr)
	if err != nil {
		return nil, err
	}
	timeout := cfg.ConnectTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	tcp, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	// The handshake is bounded by the same deadline.
	if dl, ok := dctx.Deadline(); ok {
		_ = tcp.SetDeadline(dl)
	}
	stop := context.AfterFunc(dctx, func() { _ = tcp.SetDeadline(time.Unix(1, 0)) })
	sc, chans, reqs, err := ssh.NewClientConn(tcp, addr, &ssh.ClientConfig{
		User:              cfg.User,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   hostKeyCB,
		HostKeyAlgorithms: c.hostKeyAlgorithms(addr),
		Timeout:           timeout,
	})
	stop()
	if err != nil {
		tcp.Close()
		return nil, c.handshakeError(addr, err)
	}
	_ = tcp.SetDeadline(time.Time{})
	c.client = ssh.NewClient(sc, chans, reqs)
	go c.keepalive()
	return c, nil
}

// keepalive asks the server for a reply every interval (keepalive@openssh.com, which
// OpenSSH answers with a failure: any answer will do) and closes the connection when
// none came for keepaliveCount intervals. It ends with the connection.
func (c *Conn) keepalive() {
	iv := c.cfg.KeepaliveInterval
	if iv <= 0 {
		iv = 15 * time.Second
	}
	closed := make(chan struct{})
	go func() { _ = c.client.Wait(); close(closed) }()
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-closed:
			return
		case <-t.C:
		}
		answered := make(chan struct{})
		go func() {
			_, _, _ = c.client.SendRequest("keepalive@openssh.com", true, nil)
			close(answered)
		}()
		select {
		case <-answered:
		case <-closed:
			return
		case <-time.After(keepaliveCount * iv):
			_ = c.client.Close()
			return
		}
	}
}

// Close closes the connection.
func (c *Conn) Close() error { return c.client.Close() }

// hostKeyAlgorithms prefers the algorithms already pinned for addr, so a server with
// several host keys presents the one known_hosts holds.
func (c *Conn) hostKeyAlgorithms(addr string) []string {
	check, err := knownhosts.New(c.cfg.KnownHosts)
	if err != nil {
		return nil
	}
	var algos []string
	err = check(knownhosts.Normalize(addr), &net.TCPAddr{}, probeKey{})
	var ke *knownhosts.KeyError
	if errors.As(err, &ke) {
		for _, k := range ke.Want {
			algos = append(algos, algorithmsFor(k.Key.Type())...)
		}
	}
	return algos
}

func algorithmsFor(keyType string) []string {
	if keyType == ssh.KeyAlgoRSA {
		return []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	}
	return []string{keyType}
}

// probeKey is a key no host has, used to list the pinned keys of an address.
type probeKey struct{}

func (probeKey) Type() string                        { return "pva-probe" }
func (probeKey) Marshal() []byte                     { return []byte("pva-probe") }
func (probeKey) Verify([]byte, *ssh.Signature) error { return errors.New("probe") }

func (c *Conn) hostKeyCallback(addr string) (ssh.HostKeyCallback, error) {
	path := c.cfg.KnownHosts
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if !c.cfg.AcceptNewHostKey {
			return nil, fmt.Errorf("%w: known_hosts file %s does not exist; create it with the node's verified key (ssh-keyscan -p %d HOST >> %s, then compare fingerprints) or run once with --accept-new-host-key", ErrUnknownHostKey, path, c.cfg.Port, path)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			return nil, err
		}
	}
	check, err := knownhosts.New(path)
	if err != nil {
		return nil, fmt.Errorf("read known_hosts %s: %w", path, err)
	}
	return func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		err := check(hostname, remote, key)
		var ke *knownhosts.KeyError
		if err == nil || !errors.As(err, &ke) {
			return err
		}
		offered := ssh.FingerprintSHA256(key)
		if len(ke.Want) > 0 {
			var pinned []string
			for _, w := range ke.Want {
				pinned = append(pinned, fmt.Sprintf("%s (%s line %d)", ssh.FingerprintSHA256(w.Key), w.Filename, w.Line))
			}
			return fmt.Errorf("%w for %s: the server offered %s %s, known_hosts pins %s. If the VM was rebuilt and you verified the new key, remove the old entry (ssh-keygen -R '%s' -f %s) and run again with --accept-new-host-key",
				ErrHostKeyMismatch, addr, key.Type(), offered, strings.Join(pinned, ", "), knownhosts.Normalize(addr), path)
		}
		if !c.cfg.AcceptNewHostKey {
			return fmt.Errorf("%w: %s offered %s %s, which %s does not list; verify the fingerprint on the VM console (ssh-keygen -lf /etc/ssh/ssh_host_%s_key.pub) and run again with --accept-new-host-key",
				ErrUnknownHostKey, addr, key.Type(), offered, path, strings.TrimPrefix(key.Type(), "ssh-"))
		}
		line := knownhosts.Line([]string{knownhosts.Normalize(addr)}, key)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("pin host key in %s: %w", path, err)
		}
		defer f.Close()
		if _, err := f.WriteString(line + "\n"); err != nil {
			return fmt.Errorf("pin host key in %s: %w", path, err)
		}
		c.PinnedKey = offered
		return nil
	}, nil
}

func (c *Conn) handshakeError(addr string, err error) error {
	if errors.Is(err, ErrHostKeyMismatch) || errors.Is(err, ErrUnknownHostKey) {
		return err
	}
	if strings.Contains(err.Error(), "unable to authenticate") {
		return fmt.Errorf("%w as %s@%s: the node does not accept the agent's key; add its public key to ~%s/.ssh/authorized_keys on the node", ErrSSHAuth, c.cfg.User, addr, c.cfg.User)
	}
	return fmt.Errorf("ssh handshake with %s: %w", addr, err)
}

// RunError is a remote command that failed: its exit status and what it wrote to stderr.
type RunError struct {
	Command string
	Status  int
	Stderr  string
}

func (e *RunError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = "no output"
	}
	return fmt.Sprintf("%s exited %d: %s", e.Command, e.Status, msg)
}

// Run executes script with sh on the node (through sudo -n when configured), args as
// $1…, and returns its stdout. The command timeout and ctx both bound it.
func (c *Conn) Run(ctx context.Context, name, script string, args ...string) (string, error) {
	return c.run(ctx, name, "sh -s --", strings.NewReader(script), args)
}

// RunInput executes script with sh -c (through sudo -n when configured), args as $1…,
// with input on its standard input: a secret handed to a command there goes through
// the SSH channel and a pipe only, never a file or an argument.
func (c *Conn) RunInput(ctx context.Context, name, script string, input io.Reader, args ...string) (string, error) {
	return c.run(ctx, name, "sh -c "+shellQuote(script)+" sh", input, args)
}

func (c *Conn) run(ctx context.Context, name, cmd string, stdin io.Reader, args []string) (string, error) {
	sess, err := c.client.NewSession()
	if err != nil {
		return "", fmt.Errorf("%s: open session: %w", name, err)
	}
	defer sess.Close()
	var stdout, stderr bytes.Buffer
	sess.Stdin = stdin
	sess.Stdout = &stdout
	sess.Stderr = &stderr
	if c.cfg.useSudo() {
		cmd = "sudo -n " + cmd
	}
	for _, a := range args {
		cmd += " " + shellQuote(a)
	}
	timeout := c.cfg.CommandTimeout
	if timeout <= 0 {
		timeout = time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- sess.Run(cmd) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = sess.Signal(ssh.SIGKILL)
		sess.Close()
		return "", fmt.Errorf("%s on %s: %w", name, c.Host, ctx.Err())
	}
	if err != nil {
		var ee *ssh.ExitError
		if errors.As(err, &ee) {
			re := &RunError{Command: name, Status: ee.ExitStatus(), Stderr: stderr.String()}
			if c.cfg.useSudo() && strings.Contains(re.Stderr, "sudo:") {
				return stdout.String(), fmt.Errorf("%w for %s on %s: %s; give the user passwordless sudo (NOPASSWD) or connect as root", ErrSudo, c.cfg.User, c.Host, strings.TrimSpace(re.Stderr))
			}
			return stdout.String(), re
		}
		return stdout.String(), fmt.Errorf("%s on %s: %w", name, c.Host, err)
	}
	return stdout.String(), nil
}

// shellQuote quotes s for sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Client is the connection's SSH client, for a protocol on top of it (SFTP).
func (c *Conn) Client() *ssh.Client { return c.client }
