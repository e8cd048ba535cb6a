package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// podAccess reaches every Vault server pod. In ssh-tunnel mode the pods come from the
// Kubernetes API, identity-checked (k8s.ServerPods: owned by the release's StatefulSet,
// named <release>-N, on the node its volume pins), and each is dialled through an SSH
// connection to its node (sealed pods are NotReady and absent from Services, so this is
// the one path that always works); TLS is verified against the pod's DNS name. In static
// mode the configured URLs are the pods. SSH connections are cached per node and
// redialled when they die.
type podAccess struct {
	env   *Env
	roots *x509.CertPool

	mu       sync.Mutex
	conns    map[string]*provision.Conn // node name → connection
	rejected []k8s.Rejected
	statics  []vaultPod // static mode: built once, the addresses never change
	// clients are the pods' API clients by incarnation (name/uid/ip), kept across
	// listings: the daemon lists every few seconds, and a client is a transport.
	clients map[string]*vault.Node
}

// vaultPod is a pod with its API client.
type vaultPod struct {
	k8s.Pod
	API *vault.Node
}

func newPodAccess(env *Env) (*podAccess, error) {
	a := &podAccess{env: env, conns: map[string]*provision.Conn{}}
	if f := env.Config.Vault.TLSCAFile; f != "" {
		pem, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("vault.tls_ca_file: %w", err)
		}
		a.roots = x509.NewCertPool()
		if !a.roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("vault.tls_ca_file %s holds no PEM certificate", f)
		}
	} else {
		env.Log.Warn(tlsOffWarning)
	}
	return a, nil
}

// tlsOffWarning is said at every start and in status while the listener has no TLS.
const tlsOffWarning = "Vault's listener has TLS off (vault.tls_ca_file is empty): unseal shares and tokens cross the pod network in clear text; enable TLS in the chart and set vault.tls_ca_file"

func (a *podAccess) static() bool { return a.env.Config.Vault.PodAccess == "static" }

// Close drops the SSH connections.
func (a *podAccess) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		c.Close()
	}
	a.conns = map[string]*provision.Conn{}
}

// Rejected lists the pods with the chart's labels the last listing refused, and why.
func (a *podAccess) Rejected() []k8s.Rejected {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]k8s.Rejected(nil), a.rejected...)
}

// Pods lists the Vault server pods that run (have an IP and a node), with a client for
// each, by ordinal.
func (a *podAccess) Pods(ctx context.Context) ([]vaultPod, error) {
	if a.static() {
		return a.staticPods()
	}
	cl, err := a.env.Cluster(ctx)
	if err != nil {
		return nil, err
	}
	pods, rejected, err := cl.ServerPods(ctx, a.env.Config.Chart.Release)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.rejected = rejected
	a.mu.Unlock()
	for _, r := range rejected {
		a.env.Log.Warn("a pod carries the Vault server labels but is not one of the release's server pods: it gets nothing", "pod", r.Name, "reason", r.Reason)
	}
	var out []vaultPod
	keep := map[string]*vault.Node{}
	for _, p := range pods {
		if p.IP == "" || p.Node == "" || p.Terminating {
			continue // not running yet (or going): nothing to talk to
		}
		key := p.Name + "/" + p.UID + "/" + p.IP
		a.mu.Lock()
		n := a.clients[key]
		a.mu.Unlock()
		if n == nil {
			if n, err = a.client(p); err != nil {
				return nil, err
			}
		}
		keep[key] = n
		out = append(out, vaultPod{Pod: p, API: n})
	}
	a.mu.Lock()
	a.clients = keep
	a.mu.Unlock()
	return out, nil
}

func (a *podAccess) staticPods() ([]vaultPod, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.statics != nil {
		return a.statics, nil
	}
	var out []vaultPod
	for i, raw := range a.env.Config.Vault.Addresses {
		u, err := url.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("vault.addresses[%d]: %w", i, err)
		}
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: a.roots, MinVersion: tls.VersionTLS12}, Proxy: nil,
			MaxIdleConnsPerHost: 2, IdleConnTimeout: 30 * time.Second}
		n, err := vault.NewNode(u.Host, raw, &http.Client{Transport: tr})
		if err != nil {
			return nil, err
		}
		out = append(out, vaultPod{Pod: k8s.Pod{Name: u.Host, Ordinal: i, IP: u.Hostname(), Phase: "Running", UID: raw}, API: n})
	}
	a.statics = out
	return out, nil
}

// client builds the API client of a pod, dialling through its node's SSH connection.
func (a *podAccess) client(p k8s.Pod) (*vault.Node, error) {
	return a.clientVia(p, a.roots, a.env.Config.Vault.Port)
}

// clientVia is client with the roots the pod's TLS certificate is checked against (nil:
// plain HTTP) and its port.
func (a *podAccess) clientVia(p k8s.Pod, roots *x509.CertPool, port int) (*vault.Node, error) {
	scheme := "http"
	if roots != nil {
		scheme = "https"
	}
	tr := &http.Transport{
		Proxy: nil,
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
		TLSClientConfig:     &tls.Config{RootCAs: roots, ServerName: p.ServerName, MinVersion: tls.VersionTLS12},
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	addr := scheme + "://" + net.JoinHostPort(p.IP, strconv.Itoa(port))
	return vault.NewNode(p.Name, addr, &http.Client{Transport: tr})
}

// sshTo returns a live SSH connection to the node, dialling it when needed.
func (a *podAccess) sshTo(ctx context.Context, nodeName string) (*provision.Conn, error) {
	a.mu.Lock()
	c := a.conns[nodeName]
	a.mu.Unlock()
	if c != nil {
		return c, nil
	}
	node, ok := a.env.node(nodeName)
	if !ok {
		return nil, withHint(fmt.Errorf("%w: vault pod runs on node %s, which is not in the configuration's nodes", ErrUnknownNode, nodeName),
			"add the node to the configuration's nodes: the agent reaches pods through their node")
	}
	c, _, err := a.env.dial(ctx, node)
	if err != nil {
		return nil, err
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

// openPods lists the pods; none running is an error that says what to do.
func (e *Env) openPods(ctx context.Context) ([]vaultPod, error) {
	acc, err := e.Pods()
	if err != nil {
		return nil, err
	}
	pods, err := acc.Pods(ctx)
	if err == nil && len(pods) == 0 {
		err = hintf("run `pve-vault-agent install` first", "no running vault server pod in namespace %s", e.Config.Chart.Namespace)
	}
	return pods, err
}
