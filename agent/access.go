package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// podAccess reaches every Vault server pod. In ssh-tunnel mode the pods come from the
// Kubernetes API and each is dialled through an SSH connection to its node (sealed pods
// are NotReady and absent from Services, so this is the one path that always works); in
// static mode the configured URLs are the pods. SSH connections are cached per node and
// redialled when they die.
type podAccess struct {
	cfg     *configs.Config
	log     *slog.Logger
	cluster *k8s.Cluster
	resolve *provision.Resolver
	sshCfg  provision.SSHConfig
	roots   *x509.CertPool

	mu    sync.Mutex
	conns map[string]*provision.Conn // node name → connection
}

// vaultPod is a pod with its API client.
type vaultPod struct {
	k8s.Pod
	API *vault.Node
}

func newPodAccess(ctx context.Context, cfg *configs.Config, log *slog.Logger) (*podAccess, error) {
	a := &podAccess{cfg: cfg, log: log, conns: map[string]*provision.Conn{}}
	if cfg.Vault.TLSCAFile != "" {
		pem, err := os.ReadFile(cfg.Vault.TLSCAFile)
		if err != nil {
			return nil, fmt.Errorf("vault.tls_ca_file: %w", err)
		}
		a.roots = x509.NewCertPool()
		if !a.roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("vault.tls_ca_file %s holds no PEM certificate", cfg.Vault.TLSCAFile)
		}
	}
	if cfg.Vault.PodAccess == "static" {
		return a, nil
	}
	var err error
	if a.cluster, err = k8s.Connect(ctx, k8s.ClusterConfig{Kubeconfig: cfg.Kubernetes.Kubeconfig, Context: cfg.Kubernetes.Context, Namespace: cfg.Chart.Namespace}, log); err != nil {
		return nil, err
	}
	key, err := cfg.SSH.Identity.Read()
	if err != nil {
		return nil, fmt.Errorf("ssh.identity: %w", err)
	}
	if a.resolve, err = newResolver(cfg, cfg.Nodes, log); err != nil {
		return nil, err
	}
	a.sshCfg = provision.SSHConfig{User: cfg.SSH.User, Port: cfg.SSH.Port, Key: key.Bytes(), KnownHosts: cfg.SSH.KnownHosts,
		Sudo: cfg.SSH.Sudo, ConnectTimeout: cfg.SSH.ConnectTimeout, CommandTimeout: cfg.SSH.CommandTimeout}
	return a, nil
}

// Close drops the SSH connections.
func (a *podAccess) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		c.Close()
	}
	a.conns = map[string]*provision.Conn{}
}

// Pods lists the Vault server pods with a client for each, by ordinal.
func (a *podAccess) Pods(ctx context.Context) ([]vaultPod, error) {
	if a.cluster == nil {
		return a.staticPods()
	}
	pods, err := a.cluster.Pods(ctx, a.cfg.Chart.Release)
	if err != nil {
		return nil, err
	}
	var out []vaultPod
	for _, p := range pods {
		if p.IP == "" || p.Node == "" {
			continue // not running yet: nothing to talk to
		}
		n, err := a.client(p)
		if err != nil {
			return nil, err
		}
		out = append(out, vaultPod{Pod: p, API: n})
	}
	return out, nil
}

func (a *podAccess) staticPods() ([]vaultPod, error) {
	var out []vaultPod
	for i, raw := range a.cfg.Vault.Addresses {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("vault.addresses[%d]: %w", i, err)
		}
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: a.roots, MinVersion: tls.VersionTLS12}}
		n, err := vault.NewNode(u.Host, raw, &http.Client{Transport: tr, Timeout: 15 * time.Second})
		if err != nil {
			return nil, err
		}
		out = append(out, vaultPod{Pod: k8s.Pod{Name: u.Host, Ordinal: i, IP: u.Hostname(), Phase: "Running"}, API: n})
	}
	return out, nil
}

// client builds the API client of a pod, dialling through its node's SSH connection.
func (a *podAccess) client(p k8s.Pod) (*vault.Node, error) {
	scheme := "http"
	if a.roots != nil {
		scheme = "https"
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := a.sshTo(ctx, p.Node)
			if err != nil {
				return nil, err
			}
			c, err := conn.DialContext(ctx, "tcp", addr)
			if err != nil {
				a.drop(p.Node, conn)
				return nil, fmt.Errorf("tunnel through node %s to pod %s (%s): %w", p.Node, p.Name, addr, err)
			}
			return c, nil
		},
		// The listener's certificate names the pod's DNS name, not its IP.
		TLSClientConfig:     &tls.Config{RootCAs: a.roots, ServerName: p.Name + "." + a.cfg.Chart.Release + "-internal", MinVersion: tls.VersionTLS12},
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	addr := scheme + "://" + net.JoinHostPort(p.IP, strconv.Itoa(a.cfg.Vault.Port))
	return vault.NewNode(p.Name, addr, &http.Client{Transport: tr, Timeout: 15 * time.Second})
}

// sshTo returns a live SSH connection to the node, dialling it when needed.
func (a *podAccess) sshTo(ctx context.Context, nodeName string) (*provision.Conn, error) {
	a.mu.Lock()
	c := a.conns[nodeName]
	a.mu.Unlock()
	if c != nil {
		return c, nil
	}
	var node *configs.Node
	for i := range a.cfg.Nodes {
		if a.cfg.Nodes[i].Name == nodeName {
			node = &a.cfg.Nodes[i]
		}
	}
	if node == nil {
		return nil, fmt.Errorf("vault pod runs on node %s, which is not in the configuration's nodes: add it (the agent reaches pods through their node)", nodeName)
	}
	loc, err := a.resolve.Resolve(ctx, provision.Target{Name: node.Name, Address: node.Address, VMID: node.VMID, VMName: node.VMName})
	if err != nil {
		return nil, err
	}
	c, err = provision.Dial(ctx, loc.Address, a.sshCfg)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", nodeName, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if old := a.conns[nodeName]; old != nil {
		c.Close()
		return old, nil
	}
	a.conns[nodeName] = c
	return c, nil
}

// drop forgets a connection that failed, unless another one replaced it already.
func (a *podAccess) drop(nodeName string, c *provision.Conn) {
	if c.Alive() {
		return // the SSH connection is fine; the pod itself refused
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conns[nodeName] == c {
		delete(a.conns, nodeName)
		c.Close()
	}
}

// KeyfileSealer is the keyfile's sealing method from the configuration.
func KeyfileSealer(cfg *configs.Config) (vault.Sealer, error) { return sealer(cfg) }

// sealer is the keyfile's sealing method from the configuration.
func sealer(cfg *configs.Config) (vault.Sealer, error) {
	if cfg.Vault.Seal == "age" {
		sec, err := cfg.Vault.AgeIdentity.Read()
		if err != nil {
			return nil, fmt.Errorf("vault.age_identity: %w", err)
		}
		return parseAgeSealer(sec)
	}
	return vault.SystemdCreds{WithKey: cfg.Vault.SystemdCredsKey}, nil
}

// openPods connects to the pods and lists them; none running is an error that says what
// to do.
func openPods(ctx context.Context, cfg *configs.Config, log *slog.Logger) (*podAccess, []vaultPod, error) {
	acc, err := newPodAccess(ctx, cfg, log)
	if err != nil {
		return nil, nil, err
	}
	pods, err := acc.Pods(ctx)
	if err == nil && len(pods) == 0 {
		err = fmt.Errorf("no running vault pod in namespace %s: run `pve-vault-agent install` first", cfg.Chart.Namespace)
	}
	if err != nil {
		acc.Close()
		return nil, nil, err
	}
	return acc, pods, nil
}

// readKeyfile opens the keyfile with the configured sealing method.
func readKeyfile(ctx context.Context, cfg *configs.Config) (*vault.Keyfile, error) {
	s, err := sealer(cfg)
	if err != nil {
		return nil, err
	}
	kf, err := vault.ReadKeyfile(ctx, cfg.Vault.Keyfile, s)
	if err != nil {
		return nil, fmt.Errorf("keyfile: %w", err)
	}
	return kf, nil
}
