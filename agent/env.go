package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"sync"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
)

// Env is the outside world of the flows, built once where the binary is wired: the
// configuration, the logger, the clock, the keyfile's source, and connections to
// Kubernetes, the Proxmox API, the node VMs and the Vault pods, each made on first use
// and shared by every step after.
type Env struct {
	Config  *configs.Config
	Log     *slog.Logger
	Clock   Clock
	Waits   Waits
	Keyfile *KeyfileSource
	Version string

	mu       sync.Mutex
	cluster  *k8s.Cluster
	install  *k8s.Cluster // through kubernetes.install_kubeconfig, when set
	resolver *provision.Resolver
	ssh      *provision.SSHConfig
	pods     *podAccess
}

// EnvOptions complete an Env; zero values take the binary's defaults.
type EnvOptions struct {
	Clock   Clock
	Waits   Waits
	Version string
	// CredentialsDir is $CREDENTIALS_DIRECTORY when running under systemd: the keyfile
	// credential there is then the keyfile's source (see KeyfileSource).
	CredentialsDir string
}

// NewEnv builds the environment of one run of a verb (or one configuration of the
// daemon). It connects to nothing yet.
func NewEnv(cfg *configs.Config, log *slog.Logger, o EnvOptions) *Env {
	if o.Clock == nil {
		o.Clock = RealClock{}
	}
	if o.Waits == (Waits{}) {
		o.Waits = DefaultWaits()
	}
	return &Env{Config: cfg, Log: log, Clock: o.Clock, Waits: o.Waits, Version: o.Version,
		Keyfile: NewKeyfileSource(cfg, o.CredentialsDir)}
}

// Close drops the connections the environment made.
func (e *Env) Close() {
	e.mu.Lock()
	p := e.pods
	e.pods = nil
	e.mu.Unlock()
	if p != nil {
		p.Close()
	}
}

// Cluster connects to the Kubernetes API server once, as the operate account
// (kubernetes.kubeconfig): what reading, unsealing and drilling need.
func (e *Env) Cluster(ctx context.Context) (*k8s.Cluster, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cluster != nil {
		return e.cluster, nil
	}
	c, err := e.connect(ctx, "kubernetes.kubeconfig", e.Config.Kubernetes.Kubeconfig)
	if err != nil {
		return nil, err
	}
	e.cluster = c
	return c, nil
}

// InstallCluster connects as the install account (kubernetes.install_kubeconfig, else
// the operate one): what changing the release, its volumes and its pods needs.
func (e *Env) InstallCluster(ctx context.Context) (*k8s.Cluster, error) {
	if !e.Config.Kubernetes.InstallKubeconfig.IsSet() {
		return e.Cluster(ctx)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.install != nil {
		return e.install, nil
	}
	c, err := e.connect(ctx, "kubernetes.install_kubeconfig", e.Config.Kubernetes.InstallKubeconfig)
	if err != nil {
		return nil, err
	}
	e.install = c
	return c, nil
}

func (e *Env) connect(ctx context.Context, key string, ref configs.SecretRef) (*k8s.Cluster, error) {
	sec, err := ref.Read()
	if err != nil {
		return nil, withHint(fmt.Errorf("%s: %w", key, err), "write the kubeconfig `pve-vault-agent rbac kubeconfig` prints (or an admin's) to a root-owned 0600 file, or seal it as a credential, and point %s at it", key)
	}
	c, err := k8s.Connect(ctx, k8s.ClusterConfig{Kubeconfig: sec.Bytes(), Source: ref.String(),
		Context: e.Config.Kubernetes.Context, Namespace: e.Config.Chart.Namespace}, e.Log)
	if err != nil {
		return nil, err
	}
	if c.Pins, err = e.volumePins(); err != nil {
		return nil, err
	}
	return c, nil
}

// addPins tells every connection made so far where the pods found on hostPath volumes
// without node affinity are (adopt, before it records them).
func (e *Env) addPins(pins map[string]string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range []*k8s.Cluster{e.cluster, e.install} {
		if c != nil {
			maps.Copy(c.Pins, pins)
		}
	}
}

// volumePinsPath records the nodes of pods whose hostPath volumes (written by the
// operator) have no node affinity, as adopt found them.
func (e *Env) volumePinsPath() string {
	return filepath.Join(filepath.Dir(e.Config.Vault.Keyfile), "volume-pins.json")
}

// volumePins reads what adopt recorded (none: an empty map).
func (e *Env) volumePins() (map[string]string, error) {
	pins := map[string]string{}
	b, err := os.ReadFile(e.volumePinsPath())
	if errors.Is(err, os.ErrNotExist) {
		return pins, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &pins)
	}
	if err != nil {
		return nil, withHint(fmt.Errorf("read %s: %w", e.volumePinsPath(), err), "it records which node holds the data of a hostPath volume without node affinity: restore it from a backup of the host, or run adopt again")
	}
	return pins, nil
}

// needsProxmox reports whether any node is a Proxmox VM.
func (e *Env) needsProxmox() bool {
	for _, n := range e.Config.Nodes {
		if n.VMID != 0 || n.VMName != "" {
			return true
		}
	}
	return false
}

// Resolver is the Proxmox API client, built once; nil (and no error) when every node has
// a static address and no Proxmox storage is configured.
func (e *Env) Resolver() (*provision.Resolver, error) {
	if !e.needsProxmox() && e.Config.Snapshots.ProxmoxStorage == "" {
		return nil, nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.resolver != nil {
		return e.resolver, nil
	}
	px := e.Config.Proxmox
	secret, err := px.TokenSecret.Read()
	if err != nil {
		return nil, fmt.Errorf("proxmox.token_secret: %w", err)
	}
	if px.InsecureSkipVerify {
		e.Log.Warn("TLS verification of the Proxmox API is disabled (proxmox.insecure_skip_verify); set proxmox.ca_file instead", "url", px.URL)
	}
	r, err := provision.NewResolver(provision.ProxmoxConfig{
		URL: px.URL, TokenID: px.TokenID, TokenSecret: secret.Trimmed(),
		CAFile: px.CAFile, InsecureSkipVerify: px.InsecureSkipVerify,
		PreferCIDR: px.PreferCIDR, Node: px.Node, Timeout: px.Timeout,
	})
	if err != nil {
		return nil, err
	}
	e.resolver = r
	return r, nil
}

// SSH is how the agent reaches node VMs; acceptNew pins the key of a host not yet in
// known_hosts (provision --accept-new-host-key).
func (e *Env) SSH(acceptNew bool) (provision.SSHConfig, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ssh == nil {
		s := e.Config.SSH
		key, err := s.Identity.Read()
		if err != nil {
			return provision.SSHConfig{}, fmt.Errorf("ssh.identity: %w", err)
		}
		e.ssh = &provision.SSHConfig{User: s.User, Port: s.Port, Key: key.Bytes(), KnownHosts: s.KnownHosts,
			Sudo: s.Sudo, ConnectTimeout: s.ConnectTimeout, CommandTimeout: s.CommandTimeout, KeepaliveInterval: s.KeepaliveInterval}
	}
	c := *e.ssh
	c.AcceptNewHostKey = acceptNew
	return c, nil
}

// target is where a configured node is.
func target(n configs.Node) provision.Target {
	return provision.Target{Name: n.Name, Address: n.Address, VMID: n.VMID, VMName: n.VMName}
}

// resolve locates a configured node.
func (e *Env) resolve(ctx context.Context, n configs.Node) (provision.Location, error) {
	r, err := e.Resolver()
	if err != nil {
		return provision.Location{}, err
	}
	return r.Resolve(ctx, target(n))
}

// node is the configured node of that name.
func (e *Env) node(name string) (configs.Node, bool) {
	for _, n := range e.Config.Nodes {
		if n.Name == name {
			return n, true
		}
	}
	return configs.Node{}, false
}

// dial opens an SSH connection to a configured node.
func (e *Env) dial(ctx context.Context, n configs.Node) (*provision.Conn, provision.Location, error) {
	loc, err := e.resolve(ctx, n)
	if err != nil {
		return nil, loc, err
	}
	sshCfg, err := e.SSH(false)
	if err != nil {
		return nil, loc, err
	}
	c, err := provision.Dial(ctx, loc.Address, sshCfg)
	if err != nil {
		return nil, loc, fmt.Errorf("node %s: %w", n.Name, err)
	}
	return c, loc, nil
}

// Pods is the access to the Vault server pods, built once.
func (e *Env) Pods() (*podAccess, error) {
	e.mu.Lock()
	if e.pods != nil {
		defer e.mu.Unlock()
		return e.pods, nil
	}
	e.mu.Unlock()
	p, err := newPodAccess(e)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pods == nil {
		e.pods = p
	}
	return e.pods, nil
}
