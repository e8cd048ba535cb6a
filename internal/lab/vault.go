package lab

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// VaultOptions describe one Vault server ("pod").
type VaultOptions struct {
	// DataDir is the Raft storage path. The test decides its owner and mode.
	DataDir string
	// StateDir holds the config file and log; created if missing.
	StateDir string
	// IP is the loopback address to listen on (127.0.0.2, 127.0.0.3, … for HA peers).
	IP string
	// Port is the API as clients see it (the Gate); BackendPort is Vault's own listener
	// behind it; ClusterPort is Raft's. 0 picks a free port, so tests running in
	// parallel never collide (inside a namespace give them explicitly).
	Port, BackendPort, ClusterPort int
	// NodeID of the Raft node (default: vault-<IP>).
	NodeID string
	// RetryJoin lists leader API addresses for Raft retry_join.
	RetryJoin []string
	// UID/GID to run as; nil runs as the caller.
	UID, GID *uint32
	// Config replaces the generated HCL entirely (for configs rendered by a chart).
	Config string
	// Env is added to the process environment (VAULT_RAFT_NODE_ID, VAULT_API_ADDR …).
	Env []string
	// Netns runs Vault inside a node's network namespace (IP is then an address there).
	Netns *Netns
	// TLS, when set, makes the gate serve HTTPS with it (Vault behind stays plain: the
	// gate must read requests to apply the 2.x rules).
	TLS *tls.Config
}

// Vault is a running Vault server process behind its Gate (the Vault 2.x rules).
type Vault struct {
	Opts VaultOptions
	// Addr is the API URL clients use, http://IP:PORT (the gate).
	Addr string
	// Direct is Vault's own listener behind the gate (tests that inspect Vault itself).
	Direct     string
	ConfigPath string
	Gate       *Gate
	bin        string
	proc       *Process
}

// VaultHCL renders the lab's Vault configuration: Raft storage on DataDir with
// performance_multiplier 1 (init in ~1.5 s instead of ~9 s), a plain-HTTP listener on
// the backend port, the gate's address as api_addr.
func VaultHCL(o VaultOptions) string {
	var join strings.Builder
	for _, a := range o.RetryJoin {
		fmt.Fprintf(&join, "  retry_join {\n    leader_api_addr = %q\n  }\n", a)
	}
	listen := net.JoinHostPort(o.IP, strconv.Itoa(o.BackendPort))
	api := net.JoinHostPort(o.IP, strconv.Itoa(o.Port))
	cluster := net.JoinHostPort(o.IP, strconv.Itoa(o.ClusterPort))
	return fmt.Sprintf(`storage "raft" {
  path = %q
  node_id = %q
  performance_multiplier = 1
%s}

listener "tcp" {
  address = %q
  cluster_address = %q
  tls_disable = 1
}

api_addr = "http://%s"
cluster_addr = "https://%s"
disable_mlock = true
ui = false
`, o.DataDir, o.NodeID, join.String(), listen, cluster, api, cluster)
}

// StartVault writes the config, starts the gate and Vault behind it, and waits until
// the API answers through the gate (any HTTP status: uninitialised is 501, sealed 503).
func StartVault(ctx context.Context, bins Bins, o VaultOptions) (*Vault, error) {
	if o.IP == "" {
		o.IP = "127.0.0.1"
	}
	for _, port := range []*int{&o.Port, &o.BackendPort, &o.ClusterPort} {
		if *port == 0 {
			p, err := FreePort(o.IP)
			if err != nil {
				return nil, err
			}
			*port = p
		}
	}
	if o.NodeID == "" {
		o.NodeID = "vault-" + strings.ReplaceAll(o.IP, ".", "-")
	}
	if err := os.MkdirAll(o.StateDir, 0o755); err != nil {
		return nil, err
	}
	cfg := o.Config
	if cfg == "" {
		cfg = VaultHCL(o)
	}
	v := &Vault{Opts: o, Addr: "http://" + net.JoinHostPort(o.IP, strconv.Itoa(o.Port)),
		Direct:     "http://" + net.JoinHostPort(o.IP, strconv.Itoa(o.BackendPort)),
		ConfigPath: filepath.Join(o.StateDir, "vault.hcl"), bin: bins.Vault}
	if err := os.WriteFile(v.ConfigPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	var l net.Listener
	var err error
	if o.Netns != nil {
		l, err = o.Netns.Listen(net.JoinHostPort(o.IP, strconv.Itoa(o.Port)))
	} else {
		l, err = net.Listen("tcp", net.JoinHostPort(o.IP, strconv.Itoa(o.Port)))
	}
	if err != nil {
		return nil, fmt.Errorf("gate for vault %s: %w", o.NodeID, err)
	}
	if o.TLS != nil {
		l = tls.NewListener(l, o.TLS)
		v.Addr = "https://" + net.JoinHostPort(o.IP, strconv.Itoa(o.Port))
	}
	if v.Gate, err = StartGate(l, v.Direct, filepath.Join(o.StateDir, "gate.log")); err != nil {
		l.Close()
		return nil, err
	}
	if o.UID != nil {
		for _, d := range []string{o.StateDir, o.DataDir} {
			if err := MakeTraversable(d); err != nil {
				return nil, fmt.Errorf("let uid %d reach %s: %w", *o.UID, d, err)
			}
		}
		if err := os.Chmod(o.StateDir, 0o755); err != nil {
			return nil, err
		}
	}
	if err := v.Start(ctx); err != nil {
		v.Gate.Close()
		return nil, err
	}
	return v, nil
}

// Start (re)starts the process with the same config and waits for the API.
func (v *Vault) Start(ctx context.Context) error {
	var cred *syscall.Credential
	if v.Opts.UID != nil {
		cred = &syscall.Credential{Uid: *v.Opts.UID, Gid: *v.Opts.UID}
		if v.Opts.GID != nil {
			cred.Gid = *v.Opts.GID
		}
	}
	bin, args := v.bin, []string{"server", "-config=" + v.ConfigPath, "-log-level=info"}
	if ns := v.Opts.Netns; ns != nil {
		// Entering a namespace needs root: drop to the uid after setns, with setpriv.
		if cred != nil {
			args = append([]string{fmt.Sprintf("--reuid=%d", cred.Uid), fmt.Sprintf("--regid=%d", cred.Gid), "--clear-groups", bin}, args...)
			bin, cred = "setpriv", nil
		}
		bin, args = ns.Wrap(bin, args...)
	}
	p, err := startProcess("vault "+v.Opts.NodeID, filepath.Join(v.Opts.StateDir, "vault.log"), bin, args, cred,
		append([]string{"VAULT_LOG_FORMAT=standard"}, v.Opts.Env...))
	if err != nil {
		return err
	}
	v.proc = p
	client := &http.Client{Timeout: time.Second}
	if v.Opts.TLS != nil {
		// The lab's own readiness probe of its own listener: any answer will do.
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec
	}
	err = WaitFor(ctx, 20*time.Second, "vault "+v.Addr, func(ctx context.Context) error {
		if err := p.errIfExited(); err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, v.Addr+"/v1/sys/health", nil)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	})
	if err != nil {
		p.Kill()
	}
	return err
}

// Process is the current Vault process.
func (v *Vault) Process() *Process { return v.proc }

// Kill is kill -9: Vault comes back sealed on the next Start.
func (v *Vault) Kill() { v.proc.Kill() }

// Close stops Vault gracefully, then its gate.
func (v *Vault) Close() {
	v.proc.Stop()
	v.Gate.Close()
}

// StartFreshVault starts a single-node Raft Vault on 127.0.0.1 with an empty data
// directory dir/data (mode 0700) and its state in dir/vault.
func StartFreshVault(ctx context.Context, bins Bins, dir string) (*Vault, error) {
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return nil, err
	}
	return StartVault(ctx, bins, VaultOptions{DataDir: data, StateDir: filepath.Join(dir, "vault")})
}

// StaticAgentConfig writes dir/config.yaml for an agent that reaches the Vault at addr by
// URL (vault.pod_access static), keeps its keyfile in dir/state sealed with the host key
// and its snapshots in dir/snaps; snapshotsExtra adds indented lines to the snapshots
// section. The SSH identity is a placeholder: static access needs none. Returns the
// config and keyfile paths.
func StaticAgentConfig(dir, addr, snapshotsExtra string) (cfg, keyfile string, err error) {
	key := filepath.Join(dir, "id")
	if err := os.WriteFile(key, []byte("unused"), 0o600); err != nil {
		return "", "", err
	}
	keyfile = filepath.Join(dir, "state", "unseal.cred")
	cfg = filepath.Join(dir, "config.yaml")
	body := fmt.Sprintf(`nodes: [{name: n1, address: 127.0.0.1}]
ssh: {identity: {file: %s}}
vault:
  pod_access: static
  addresses: [%s]
  allow_http: true   # the lab's listener has no TLS
  keyfile: %s
  systemd_creds_key: host
metrics:
  listen: "127.0.0.1:0"
snapshots:
  dir: %s
%s`, key, addr, keyfile, filepath.Join(dir, "snaps"), snapshotsExtra)
	return cfg, keyfile, os.WriteFile(cfg, []byte(body), 0o600)
}
