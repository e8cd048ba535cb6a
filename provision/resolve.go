package provision

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
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
	ErrForbidden    = errors.New("proxmox API denied the token a privilege")
	ErrNodeOffline  = errors.New("proxmox node is offline")
	ErrUnknownNode  = errors.New("unknown proxmox node")
	ErrNoStorage    = errors.New("proxmox storage not found")
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
	// Node is the PVE node the agent runs on, for storage status; "" means this host's
	// short hostname, which is what Proxmox names a node.
	Node    string
	Timeout time.Duration
}

// Resolver finds node VMs and storages through the Proxmox API, using only what the
// README's least-privilege role grants (see RolePrivileges).
type Resolver struct {
	client  *proxmox.Client
	prefer  netip.Prefix
	tokenID string
	node    string

	mu       sync.Mutex
	pveMajor int
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
	base := strings.TrimRight(cfg.URL, "/")
	u, err := url.Parse(base)
	if err != nil {
		return nil, fmt.Errorf("proxmox URL %q: %w", cfg.URL, err)
	}
	hc := &http.Client{Timeout: timeout, Transport: &apiTransport{basePath: u.Path,
		base: &http.Transport{TLSClientConfig: tlsCfg, Proxy: http.ProxyFromEnvironment}}}
	r := &Resolver{client: proxmox.NewClient(base, proxmox.WithHTTPClient(hc), proxmox.WithAPIToken(cfg.TokenID, cfg.TokenSecret)),
		tokenID: cfg.TokenID, node: cfg.Node}
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

// clusterEntry is a guest in /cluster/resources?type=vm, decoded here rather than by
// go-proxmox (v0.8.2 decodes maxcpu as an integer, and an LXC container with
// cpulimit 0.5 answers 0.5, which failed the whole list). Entries without RRD data
// carry no name and status "unknown".
type clusterEntry struct {
	Type     string `json:"type"`
	VMID     int    `json:"vmid"`
	Name     string `json:"name"`
	Node     string `json:"node"`
	Status   string `json:"status"`
	Template int    `json:"template"`
}

func (r *Resolver) find(ctx context.Context, t Target) (Location, error) {
	var res []clusterEntry
	if err := r.get(ctx, "", "/cluster/resources?type=vm", &res); err != nil {
		return Location{}, fmt.Errorf("list cluster resources: %w", err)
	}
	var found []clusterEntry
	var templates, nameless []string
	for _, e := range res {
		if e.Type != "qemu" {
			continue // LXC containers are never node VMs
		}
		match := (t.VMID != 0 && e.VMID == t.VMID) || (t.VMID == 0 && e.Name == t.VMName)
		switch {
		case match && e.Template == 1:
			templates = append(templates, strconv.Itoa(e.VMID))
		case match:
			found = append(found, e)
		case e.Name == "" && t.VMID == 0:
			nameless = append(nameless, fmt.Sprintf("%d on %s", e.VMID, e.Node))
		}
	}
	what := "VMID " + strconv.Itoa(t.VMID)
	if t.VMID == 0 {
		what = fmt.Sprintf("VM name %q", t.VMName)
	}
	switch {
	case len(found) == 0 && len(templates) > 0:
		return Location{}, fmt.Errorf("%w: %s is a template (VMID %s), which never runs: name the VM cloned from it", ErrUnknownVM, what, strings.Join(templates, ", "))
	case len(found) == 0 && len(nameless) > 0:
		return Location{}, fmt.Errorf("%w: %s is not in the cluster resources, where %d guests have no name yet (%s: their PVE node may be offline): use vmid, or check the name in the Proxmox UI", ErrUnknownVM, what, len(nameless), strings.Join(nameless, ", "))
	case len(found) == 0:
		return Location{}, fmt.Errorf("%w: %s is not in the cluster (check the id/name in the Proxmox UI; the token sees only VMs it has VM.Audit on)", ErrUnknownVM, what)
	case len(found) > 1:
		return Location{}, fmt.Errorf("%w: %s matches VMIDs %d and %d; use vmid instead", ErrAmbiguousVM, what, found[0].VMID, found[1].VMID)
	}
	e := found[0]
	loc := Location{Name: t.Name, VMID: e.VMID, PVENode: e.Node, Status: e.Status}

	var st struct {
		Name   string `json:"name"`
		Status string `json:"status"`
	}
	if err := r.get(ctx, e.Node, fmt.Sprintf("/nodes/%s/qemu/%d/status/current", e.Node, e.VMID), &st); err != nil {
		return Location{}, fmt.Errorf("read VM %d on %s: %w", e.VMID, e.Node, err)
	}
	loc.Status = st.Status
	if st.Status != "running" {
		return Location{}, fmt.Errorf("%w: VM %d (%s) on %s is %s; start it (qm start %d)", ErrVMStopped, loc.VMID, st.Name, loc.PVENode, st.Status, loc.VMID)
	}
	var ga struct {
		Result []*proxmox.AgentNetworkIface `json:"result"`
	}
	if err := r.get(ctx, e.Node, fmt.Sprintf("/nodes/%s/qemu/%d/agent/network-get-interfaces", e.Node, e.VMID), &ga); err != nil {
		return Location{}, fmt.Errorf("ask the guest agent of VM %d: %w", loc.VMID, err)
	}
	addr, err := pickAddress(ga.Result, r.prefer)
	if err != nil {
		return Location{}, fmt.Errorf("VM %d: %w", loc.VMID, err)
	}
	loc.Address = addr.String()
	return loc, nil
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

// storageEntry is one storage of GET /storage.
type storageEntry struct {
	Storage string `json:"storage"`
	Path    string `json:"path"`
	Type    string `json:"type"`
	Disable int    `json:"disable"`
	// Shared: every node of the cluster sees the same storage (Proxmox sets it for
	// nfs, cifs, cephfs … and for a dir storage marked shared).
	Shared int `json:"shared"`
}

// StoragePath resolves a Proxmox storage ID to its directory on this host and the free
// bytes the API reports. Only storages with a path (dir, nfs, cifs, cephfs …) qualify.
// It reads the storage list (GET /storage, filtered by Datastore.Audit) rather than
// GET /storage/{id}, which needs Datastore.Allocate.
func (r *Resolver) StoragePath(ctx context.Context, node, id string) (string, uint64, error) {
	var list []storageEntry
	if err := r.get(ctx, "", "/storage", &list); err != nil {
		return "", 0, fmt.Errorf("list storages: %w", err)
	}
	i := slices.IndexFunc(list, func(s storageEntry) bool { return s.Storage == id })
	if i < 0 {
		user, _, _ := strings.Cut(r.tokenID, "!")
		return "", 0, fmt.Errorf("%w: storage %s is not among those the token sees: it does not exist (pvesm status) or the token lacks Datastore.Audit on /storage/%s (pveum acl modify /storage/%s --users %s --tokens '%s' --roles %s)",
			ErrNoStorage, id, id, id, user, r.tokenID, RoleName)
	}
	cfg := list[i]
	switch {
	case cfg.Disable == 1:
		return "", 0, fmt.Errorf("storage %s is disabled (pvesm set %s --disable 0)", id, id)
	case cfg.Path == "":
		return "", 0, fmt.Errorf("storage %s (type %s) has no directory path: use a dir, nfs or cifs storage, or snapshots.dir", id, cfg.Type)
	}
	var st struct {
		Active int    `json:"active"`
		Avail  uint64 `json:"avail"`
	}
	if err := r.get(ctx, node, "/nodes/"+node+"/storage/"+id+"/status", &st); err != nil {
		return "", 0, fmt.Errorf("storage %s status on %s: %w", id, node, err)
	}
	if st.Active != 1 {
		return "", 0, fmt.Errorf("storage %s is not active on %s (pvesm status): mount it, or check its server", id, node)
	}
	return strings.TrimRight(cfg.Path, "/") + "/vault-snapshots", st.Avail, nil
}

// StorageShared reports whether every node of the cluster sees storage id (GET /storage,
// as StoragePath reads it), and its type.
func (r *Resolver) StorageShared(ctx context.Context, id string) (bool, string, error) {
	var list []storageEntry
	if err := r.get(ctx, "", "/storage", &list); err != nil {
		return false, "", fmt.Errorf("list storages: %w", err)
	}
	i := slices.IndexFunc(list, func(s storageEntry) bool { return s.Storage == id })
	if i < 0 {
		return false, "", fmt.Errorf("%w: storage %s is not among those the token sees", ErrNoStorage, id)
	}
	return list[i].Shared == 1, list[i].Type, nil
}

// LocalNode is the name of the Proxmox node the agent runs on: proxmox.node, or this
// host's short hostname (Proxmox names a node after its host). Reading it from
// /cluster/status would need Sys.Audit on /, which the agent's role does not hold.
func (r *Resolver) LocalNode(context.Context) (string, error) {
	if r.node != "" {
		return r.node, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("this host's name (set proxmox.node): %w", err)
	}
	short, _, _ := strings.Cut(h, ".")
	return short, nil
}
