package provision

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	proxmox "github.com/luthermonson/go-proxmox"
)

// Errors a caller (and an operator) can tell apart. Each is wrapped with the node's name
// and what to do about it.
var (
	ErrUnauthorized = errors.New("proxmox API refused the token")
	ErrUnknownVM    = errors.New("no such VM")
	ErrVMStopped    = errors.New("VM is not running")
	ErrGuestAgent   = errors.New("QEMU guest agent is not running")
	ErrNoAddress    = errors.New("no usable address")
	ErrAmbiguousVM  = errors.New("VM name is not unique")
)

// Target is where a node is: a static address, or a Proxmox VM by id or name.
type Target struct {
	Name    string // the Kubernetes node name, for messages
	Address string
	VMID    int
	VMName  string
}

// Location is a resolved node.
type Location struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	VMID    int    `json:"vmid,omitempty"`
	PVENode string `json:"pve_node,omitempty"`
	Status  string `json:"vm_status,omitempty"`
}

// ProxmoxConfig is what the resolver needs of the Proxmox API.
type ProxmoxConfig struct {
	URL         string
	TokenID     string
	TokenSecret string // the token's UUID; never logged or wrapped into errors
	CAFile      string
	// InsecureSkipVerify disables certificate checks; the caller warns the operator.
	InsecureSkipVerify bool
	// PreferCIDR picks the address inside this network when a VM reports several.
	PreferCIDR string
	Timeout    time.Duration
}

// Resolver finds node VMs through the Proxmox API.
type Resolver struct {
	client *proxmox.Client
	prefer netip.Prefix
}

// NewResolver builds an API client that verifies TLS against cfg.CAFile (or the system
// roots), unless cfg.InsecureSkipVerify.
func NewResolver(cfg ProxmoxConfig) (*Resolver, error) {
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	switch {
	case cfg.InsecureSkipVerify:
		tlsCfg.InsecureSkipVerify = true //nolint:gosec // explicit opt-in, warned about by the caller
	case cfg.CAFile != "":
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("proxmox CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("proxmox CA file %s holds no PEM certificate", cfg.CAFile)
		}
		tlsCfg.RootCAs = pool
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	hc := &http.Client{Timeout: timeout, Transport: &http.Transport{TLSClientConfig: tlsCfg, Proxy: http.ProxyFromEnvironment}}
	r := &Resolver{client: proxmox.NewClient(strings.TrimRight(cfg.URL, "/"), proxmox.WithHTTPClient(hc), proxmox.WithAPIToken(cfg.TokenID, cfg.TokenSecret))}
	if cfg.PreferCIDR != "" {
		p, err := netip.ParsePrefix(cfg.PreferCIDR)
		if err != nil {
			return nil, fmt.Errorf("prefer CIDR %q: %w", cfg.PreferCIDR, err)
		}
		r.prefer = p.Masked()
	}
	return r, nil
}

// Resolve locates t: a static address is returned as is; a VM must exist, run, and
// report a usable address through its guest agent.
func (r *Resolver) Resolve(ctx context.Context, t Target) (Location, error) {
	if t.Address != "" {
		return Location{Name: t.Name, Address: t.Address}, nil
	}
	if r == nil {
		return Location{}, fmt.Errorf("node %s: a VM needs the Proxmox API; set proxmox.url", t.Name)
	}
	loc, err := r.find(ctx, t)
	if err != nil {
		return Location{}, fmt.Errorf("node %s: %w", t.Name, err)
	}
	return loc, nil
}

func (r *Resolver) find(ctx context.Context, t Target) (Location, error) {
	cl, err := r.client.Cluster(ctx)
	if err != nil {
		return Location{}, apiError("read cluster status", err)
	}
	res, err := cl.Resources(ctx, "vm")
	if err != nil {
		return Location{}, apiError("list cluster resources", err)
	}
	var found []*proxmox.ClusterResource
	for _, vm := range res {
		if vm.Type != "qemu" {
			continue
		}
		if (t.VMID != 0 && int(vm.VMID) == t.VMID) || (t.VMID == 0 && vm.Name == t.VMName) {
			found = append(found, vm)
		}
	}
	what := "VMID " + strconv.Itoa(t.VMID)
	if t.VMID == 0 {
		what = fmt.Sprintf("VM name %q", t.VMName)
	}
	switch {
	case len(found) == 0:
		return Location{}, fmt.Errorf("%w: %s is not in the cluster (check the id/name in the Proxmox UI; the token needs VM.Audit on it)", ErrUnknownVM, what)
	case len(found) > 1:
		return Location{}, fmt.Errorf("%w: %s matches VMIDs %d and %d; use vmid instead", ErrAmbiguousVM, what, found[0].VMID, found[1].VMID)
	}
	res0 := found[0]
	loc := Location{Name: t.Name, VMID: int(res0.VMID), PVENode: res0.Node, Status: res0.Status}

	node, err := r.client.Node(ctx, res0.Node)
	if err != nil {
		return Location{}, apiError("read Proxmox node "+res0.Node, err)
	}
	vm, err := node.VirtualMachine(ctx, loc.VMID)
	if err != nil {
		return Location{}, apiError(fmt.Sprintf("read VM %d", loc.VMID), err)
	}
	loc.Status = vm.Status
	if vm.Status != "running" {
		return Location{}, fmt.Errorf("%w: VM %d (%s) on %s is %s; start it (qm start %d)", ErrVMStopped, loc.VMID, vm.Name, loc.PVENode, vm.Status, loc.VMID)
	}
	ifaces, err := vm.AgentGetNetworkIFaces(ctx)
	if err != nil {
		return Location{}, apiError(fmt.Sprintf("ask the guest agent of VM %d", loc.VMID), err)
	}
	addr, err := pickAddress(ifaces, r.prefer)
	if err != nil {
		return Location{}, fmt.Errorf("VM %d: %w", loc.VMID, err)
	}
	loc.Address = addr.String()
	return loc, nil
}

// apiError names the operation and maps the API's failures to the package's errors.
func apiError(op string, err error) error {
	msg := err.Error()
	switch {
	case errors.Is(err, proxmox.ErrNotAuthorized):
		return fmt.Errorf("%s: %w (check proxmox.token_id and the token secret, and that the token has VM.Audit and VM.Monitor)", op, ErrUnauthorized)
	case strings.Contains(msg, "QEMU guest agent is not running"):
		return fmt.Errorf("%s: %w (install and start qemu-guest-agent in the VM, and enable the agent in its Options)", op, ErrGuestAgent)
	case strings.Contains(msg, "not running"):
		return fmt.Errorf("%s: %w: %s", op, ErrVMStopped, msg)
	case strings.Contains(msg, "does not exist"):
		return fmt.Errorf("%s: %w: %s", op, ErrUnknownVM, msg)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// virtualIfacePrefixes are interfaces of container runtimes and CNIs on a Kubernetes
// node: their addresses are not how the host reaches the VM.
var virtualIfacePrefixes = []string{"lo", "docker", "cni", "flannel", "cali", "veth", "kube-", "cilium", "vxlan", "tunl", "weave", "lxc", "virbr", "br-", "nodelocaldns"}

// pickAddress chooses the VM's address: skipping loopback, link-local, multicast and the
// interfaces of container networking; inside prefer when given; IPv4 before IPv6.
func pickAddress(ifaces []*proxmox.AgentNetworkIface, prefer netip.Prefix) (netip.Addr, error) {
	var candidates []netip.Addr
	var seen []string
	for _, ifc := range ifaces {
		if ifc == nil || isVirtualIface(ifc.Name) {
			continue
		}
		for _, ip := range ifc.IPAddresses {
			a, err := netip.ParseAddr(ip.IPAddress)
			if err != nil {
				continue
			}
			seen = append(seen, ifc.Name+" "+a.String())
			if a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsUnspecified() {
				continue
			}
			candidates = append(candidates, a.Unmap())
		}
	}
	if prefer.IsValid() {
		for _, a := range candidates {
			if prefer.Contains(a) {
				return a, nil
			}
		}
	}
	for _, a := range candidates {
		if a.Is4() {
			return a, nil
		}
	}
	if len(candidates) > 0 {
		return candidates[0], nil
	}
	if len(seen) == 0 {
		return netip.Addr{}, fmt.Errorf("%w: the guest agent reports no address outside loopback and container networks", ErrNoAddress)
	}
	return netip.Addr{}, fmt.Errorf("%w: only loopback or link-local addresses (%s); check the VM's network, or set the node's address statically", ErrNoAddress, strings.Join(seen, ", "))
}

func isVirtualIface(name string) bool {
	for _, p := range virtualIfacePrefixes {
		if name == p || strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// StoragePath resolves a Proxmox storage ID to its directory on this host and the free
// bytes the API reports. Only storages with a path (dir, nfs, cifs, cephfs …) qualify.
func (r *Resolver) StoragePath(ctx context.Context, node, id string) (string, uint64, error) {
	var cfg struct {
		Path string `json:"path"`
		Type string `json:"type"`
	}
	if err := r.client.Get(ctx, "/storage/"+id, &cfg); err != nil {
		return "", 0, apiError("read storage "+id, err)
	}
	if cfg.Path == "" {
		return "", 0, fmt.Errorf("storage %s (type %s) has no directory path: use a dir, nfs or cifs storage, or snapshots.dir", id, cfg.Type)
	}
	n, err := r.client.Node(ctx, node)
	if err != nil {
		return "", 0, apiError("read Proxmox node "+node, err)
	}
	st, err := n.Storage(ctx, id)
	if err != nil {
		return "", 0, apiError("storage "+id+" status", err)
	}
	if st.Active != 1 {
		return "", 0, fmt.Errorf("storage %s is not active on %s", id, node)
	}
	return strings.TrimRight(cfg.Path, "/") + "/vault-snapshots", st.Avail, nil
}

// LocalNode is the name of the Proxmox node the agent runs on (cluster status "local").
func (r *Resolver) LocalNode(ctx context.Context) (string, error) {
	var st []struct {
		Type  string `json:"type"`
		Name  string `json:"name"`
		Local int    `json:"local"`
	}
	if err := r.client.Get(ctx, "/cluster/status", &st); err != nil {
		return "", apiError("read cluster status", err)
	}
	for _, s := range st {
		if s.Type == "node" && s.Local == 1 {
			return s.Name, nil
		}
	}
	return "", errors.New("the Proxmox API does not say which node is local")
}
