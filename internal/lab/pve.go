package lab

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// PVE is a fake Proxmox VE API over TLS: the one stand-in of the lab, since Proxmox
// cannot run here. It checks the PVEAPIToken header, answers the endpoints the agent uses
// with the JSON shapes of the real API ({"data": …}), and fails the way the real API
// does: the reason in the HTTP status line ("500 QEMU guest agent is not running"),
// 401 for a bad token, 403 "Permission check failed (/vms/201, VM.Monitor)" when the
// token lacks the privilege the real endpoint checks (see perms.go), and 595 with an
// empty body for a request proxied to an offline PVE node.
type PVE struct {
	// URL is the API base, https://127.0.0.1:PORT/api2/json.
	URL string
	// CAFile is the PEM of the CA that signed the server certificate.
	CAFile      string
	TokenID     string
	TokenSecret string

	srv *http.Server
	ln  net.Listener

	mu         sync.Mutex
	major      int // 8 or 9: which privileges exist and which one the guest agent checks
	nodes      []string
	offline    map[string]bool
	vms        map[int]*FakeVM
	containers map[int]*FakeCT
	storages   map[string]*FakeStorage
	acl        *aclStore
	requests   []string
}

// FakeVM is a QEMU VM as the fake API reports it.
type FakeVM struct {
	VMID   int
	Name   string
	Node   string
	Status string // "running" or "stopped"
	// Agent: the guest agent runs in the guest.
	Agent bool
	// NoAgentConfig: the VM's config lacks "agent: 1" (Options → QEMU Guest Agent off):
	// the API answers "500 No QEMU guest agent configured".
	NoAgentConfig bool
	// Template: a template (template: 1 in cluster resources; never running).
	Template bool
	// NoRRD: no recent RRD data (a VM just created, or whose node went away): cluster
	// resources list it without a name and with status "unknown".
	NoRRD      bool
	Interfaces []FakeIface
}

// FakeCT is an LXC container: listed by /cluster/resources?type=vm beside the VMs.
// CPULimit is its cpulimit (0.5 gives maxcpu 0.5, which go-proxmox v0.8.2 cannot decode).
type FakeCT struct {
	VMID     int
	Name     string
	Node     string
	CPULimit float64
}

// FakeIface is one guest network interface; Addrs are CIDRs ("10.0.0.5/24", "fe80::1/64").
type FakeIface struct {
	Name  string
	MAC   string
	Addrs []string
}

// FakeStorage is a Proxmox storage with a directory path.
type FakeStorage struct {
	ID      string
	Node    string
	Type    string // "dir", "nfs", …
	Path    string
	Content string
	Total   uint64
	Used    uint64
	Active  bool
}

// StartPVE serves the fake API on 127.0.0.1 with a certificate from its own CA
// (written to dir/pve-ca.pem), speaking as PVE 8. The token is tokenID
// (user@realm!name, privilege-separated) and secret; like a token just made in the UI
// it holds no privilege until Pveum grants some (GrantREADMERole runs the README's).
func StartPVE(dir, tokenID, secret string) (*PVE, error) {
	ca, err := NewCA("pva-lab-pve-ca")
	if err != nil {
		return nil, err
	}
	kp, err := ca.Issue("pve.lab", nil, []string{"127.0.0.1", "localhost"}, true)
	if err != nil {
		return nil, err
	}
	cert, err := kp.TLS()
	if err != nil {
		return nil, err
	}
	caFile := filepath.Join(dir, "pve-ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o644); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &PVE{
		URL:         "https://" + ln.Addr().String() + "/api2/json",
		CAFile:      caFile,
		TokenID:     tokenID,
		TokenSecret: secret,
		ln:          ln,
		major:       8,
		nodes:       []string{"pve1"},
		offline:     map[string]bool{},
		vms:         map[int]*FakeVM{},
		containers:  map[int]*FakeCT{},
		storages:    map[string]*FakeStorage{},
		acl:         newACLStore(8),
	}
	p.acl.addToken(tokenID, true)
	// HTTP/1.1 only (TLSNextProto set): the real API's reason phrases need a raw status line.
	p.srv = &http.Server{Handler: p, TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog: log.New(io.Discard, "", 0)} // clients that refuse the certificate are expected
	tlsLn := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	go func() { _ = p.srv.Serve(tlsLn) }()
	return p, nil
}

// Close stops the server.
func (p *PVE) Close() { _ = p.srv.Close() }

// SetMajor makes the API speak as PVE 8 or PVE 9: the privileges that exist (PVE 9
// dropped VM.Monitor and added VM.GuestAgent.*), the one the guest agent's
// network-get-interfaces checks, and /version. Roles made before keep their privileges.
func (p *PVE) SetMajor(major int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.major = major
	p.acl.major = major
}

// AddNode adds a Proxmox node (the cluster starts with "pve1").
func (p *PVE) AddNode(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nodes = append(p.nodes, name)
}

// SetNodeOnline takes a PVE node off line or back: requests proxied to it answer 595
// with an empty body, and its guests lose their RRD data (no name, status "unknown").
func (p *PVE) SetNodeOnline(name string, online bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.offline[name] = !online
}

// PutVM adds or replaces a VM.
func (p *PVE) PutVM(vm FakeVM) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if vm.Node == "" {
		vm.Node = p.nodes[0]
	}
	p.vms[vm.VMID] = &vm
}

// PutContainer adds or replaces an LXC container.
func (p *PVE) PutContainer(ct FakeCT) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ct.Node == "" {
		ct.Node = p.nodes[0]
	}
	p.containers[ct.VMID] = &ct
}

// PutStorage adds or replaces a storage.
func (p *PVE) PutStorage(s FakeStorage) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.Node == "" {
		s.Node = p.nodes[0]
	}
	p.storages[s.ID] = &s
}

// Pveum runs one pveum command line against the fake's access control, as an operator
// would on the host: "role add NAME --privs \"A B\"", "role modify …", "acl modify PATH
// --users U --tokens T --roles R [--propagate 0]", "acl delete …",
// "user token modify USER NAME --privsep 0". It fails as pveum does on an unknown
// privilege or role.
func (p *PVE) Pveum(line string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.acl.pveum(line)
}

// Requests lists "METHOD path?query Authorization" of every request so far, for tests
// that check what the agent sent (and that it sent no secret elsewhere).
func (p *PVE) Requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.requests...)
}

// ServeHTTP routes /api2/json/… like the real API: authentication, then the
// endpoint's permission check (before it looks at whether the object exists, as the
// real schema-driven check does), then the proxy to the node that owns the object.
func (p *PVE) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.requests = append(p.requests, r.Method+" "+r.URL.RequestURI())

	auth := r.Header.Get("Authorization")
	switch {
	case auth == "":
		rawStatus(w, 401, "No ticket")
		return
	case auth != "PVEAPIToken="+p.TokenID+"="+p.TokenSecret:
		rawStatus(w, 401, "invalid token value!")
		return
	}
	if r.Method != http.MethodGet {
		rawStatus(w, 501, "Method '"+r.Method+" "+r.URL.Path+"' not implemented")
		return
	}
	path := strings.TrimPrefix(r.URL.Path, "/api2/json")
	seg := strings.Split(strings.Trim(path, "/"), "/")
	ep := route(path, seg)
	if ep.name == "" {
		rawStatus(w, 501, "Method 'GET "+path+"' not implemented")
		return
	}
	if ep.check != nil {
		acl, privs, any := ep.check(p.major)
		if !p.acl.allowed(p.TokenID, acl, privs, any) {
			// pve-access-control RPCEnvironment::check → raise_perm_exc("$path, $privs").
			rawStatus(w, 403, "Permission check failed ("+acl+", "+strings.Join(privs, "|")+")")
			return
		}
	}
	if ep.node != "" && !p.hasNode(ep.node) {
		// PVE::Cluster::remote_node_ip, before any proxying.
		rawStatus(w, 500, "hostname lookup '"+ep.node+"' failed - failed to get address info for: "+ep.node+": Name or service not known")
		return
	}
	if ep.node != "" && p.offline[ep.node] {
		// pveproxy cannot proxy to the node: 595 with no body (PVE::APIServer::AnyEvent).
		rawStatusBody(w, 595, "No route to host", "")
		return
	}
	switch ep.name {
	case "version":
		v := map[int][3]string{8: {"8.3.2", "8.3", "3e76eec21c4a14a7"}, 9: {"9.0.10", "9.0", "deb1ca707ec72a89"}}[p.major]
		data(w, map[string]any{"version": v[0], "release": v[1], "repoid": v[2]})
	case "cluster-status":
		p.clusterStatus(w)
	case "cluster-resources":
		p.clusterResources(w, r.URL.Query().Get("type"))
	case "nodes":
		p.nodeList(w)
	case "node-status":
		p.nodeStatus(w, seg[1])
	case "qemu":
		p.qemu(w, seg[1], seg[3], strings.Join(seg[4:], "/"))
	case "storage-status":
		p.storageStatus(w, seg[1], seg[3])
	case "storage-list":
		p.storageList(w)
	case "storage-config":
		p.storageConfig(w, seg[1])
	}
}

// endpoint is one API path the fake knows and the permission check the real one makes:
// check returns the ACL path, the privileges, and whether any one of them suffices.
type endpoint struct {
	name  string
	node  string // the PVE node the request is proxied to, if any
	check func(major int) (path string, privs []string, any bool)
}

func need(path string, privs ...string) func(int) (string, []string, bool) {
	return func(int) (string, []string, bool) { return path, privs, false }
}

func needAny(path string, privs ...string) func(int) (string, []string, bool) {
	return func(int) (string, []string, bool) { return path, privs, true }
}

// route maps a path to its endpoint; the privileges are those of the Proxmox sources:
// pve-manager API2/Cluster.pm (status: Sys.Audit on /; resources: filtered per entry),
// API2/Nodes.pm (node status: Sys.Audit on /nodes/{node}), qemu-server API2/Qemu.pm
// (status/current and config: VM.Audit) and API2/Qemu/Agent.pm (network-get-interfaces:
// VM.Monitor on PVE 8, VM.GuestAgent.Audit on PVE 9), pve-storage API2/Storage/Config.pm
// (list: filtered by Datastore.Audit or Datastore.AllocateSpace; read one:
// Datastore.Allocate) and API2/Storage/Status.pm (status: Datastore.Audit or
// Datastore.AllocateSpace).
func route(path string, seg []string) endpoint {
	switch {
	case path == "/version":
		return endpoint{name: "version"}
	case path == "/cluster/status":
		return endpoint{name: "cluster-status", check: need("/", "Sys.Audit")}
	case path == "/cluster/resources":
		return endpoint{name: "cluster-resources"}
	case path == "/nodes":
		return endpoint{name: "nodes"}
	case len(seg) == 3 && seg[0] == "nodes" && seg[2] == "status":
		return endpoint{name: "node-status", node: seg[1], check: need("/nodes/"+seg[1], "Sys.Audit")}
	case len(seg) >= 5 && seg[0] == "nodes" && seg[2] == "qemu":
		acl := "/vms/" + seg[3]
		ep := endpoint{name: "qemu", node: seg[1], check: need(acl, "VM.Audit")}
		if seg[4] == "agent" {
			ep.check = func(major int) (string, []string, bool) {
				if major >= 9 {
					return acl, []string{"VM.GuestAgent.Audit"}, false
				}
				return acl, []string{"VM.Monitor"}, false
			}
		}
		return ep
	case len(seg) == 5 && seg[0] == "nodes" && seg[2] == "storage" && seg[4] == "status":
		return endpoint{name: "storage-status", node: seg[1], check: needAny("/storage/"+seg[3], "Datastore.Audit", "Datastore.AllocateSpace")}
	case path == "/storage":
		return endpoint{name: "storage-list"}
	case len(seg) == 2 && seg[0] == "storage":
		return endpoint{name: "storage-config", check: need("/storage/"+seg[1], "Datastore.Allocate")}
	}
	return endpoint{}
}

func (p *PVE) hasNode(n string) bool {
	for _, x := range p.nodes {
		if x == n {
			return true
		}
	}
	return false
}

func (p *PVE) clusterStatus(w http.ResponseWriter) {
	out := []map[string]any{{"type": "cluster", "id": "cluster", "name": "lab", "nodes": len(p.nodes), "quorate": 1, "version": 3}}
	for i, n := range p.nodes {
		out = append(out, map[string]any{"type": "node", "id": "node/" + n, "name": n, "nodeid": i + 1, "online": b2i(!p.offline[n]), "local": b2i(i == 0), "ip": "127.0.0.1", "level": ""})
	}
	data(w, out)
}

func (p *PVE) nodeList(w http.ResponseWriter) {
	var out []map[string]any
	for _, n := range p.nodes {
		out = append(out, map[string]any{"node": n, "id": "node/" + n, "type": "node", "status": map[bool]string{false: "online", true: "offline"}[p.offline[n]], "cpu": 0.03, "maxcpu": 8,
			"mem": 6 << 30, "maxmem": 32 << 30, "disk": 10 << 30, "maxdisk": 100 << 30, "uptime": 86400, "level": "",
			"ssl_fingerprint": "AA:BB:CC"})
	}
	data(w, out)
}

func (p *PVE) nodeStatus(w http.ResponseWriter, node string) {
	if !p.hasNode(node) {
		rawStatus(w, 500, "hostname lookup '"+node+"' failed - failed to get address info for: "+node+": Name or service not known")
		return
	}
	data(w, map[string]any{"uptime": 86400, "pveversion": "pve-manager/8.3.2/3e76eec21c4a14a7", "kversion": "Linux 6.8.12-5-pve",
		"cpuinfo": map[string]any{"cpus": 8, "model": "lab"}, "memory": map[string]any{"total": 32 << 30, "used": 6 << 30, "free": 26 << 30},
		"loadavg": []string{"0.10", "0.12", "0.09"}})
}

// clusterResources lists what the token may see, as pve-manager does: a guest only with
// VM.Audit on /vms/{vmid}, a storage only with Datastore.Audit or AllocateSpace on it.
func (p *PVE) clusterResources(w http.ResponseWriter, typ string) {
	out := []map[string]any{}
	if typ == "" || typ == "node" {
		for _, n := range p.nodes {
			out = append(out, map[string]any{"id": "node/" + n, "type": "node", "node": n, "status": map[bool]string{false: "online", true: "offline"}[p.offline[n]], "level": "", "maxcpu": 8, "maxmem": 32 << 30})
		}
	}
	if typ == "" || typ == "vm" {
		ids := make([]int, 0, len(p.vms)+len(p.containers))
		for id := range p.vms {
			ids = append(ids, id)
		}
		for id := range p.containers {
			ids = append(ids, id)
		}
		sort.Ints(ids)
		for _, id := range ids {
			if !p.acl.allowed(p.TokenID, "/vms/"+strconv.Itoa(id), []string{"VM.Audit"}, false) {
				continue
			}
			if ct, ok := p.containers[id]; ok {
				e := map[string]any{"id": fmt.Sprintf("lxc/%d", ct.VMID), "type": "lxc", "vmid": ct.VMID, "name": ct.Name, "node": ct.Node,
					"status": "running", "template": 0, "maxcpu": ct.CPULimit, "maxmem": 512 << 20, "maxdisk": 8 << 30, "uptime": 7200, "tags": ""}
				if p.offline[ct.Node] {
					delete(e, "name")
					e["status"] = "unknown"
				}
				out = append(out, e)
				continue
			}
			vm := p.vms[id]
			e := map[string]any{"id": fmt.Sprintf("qemu/%d", vm.VMID), "type": "qemu", "vmid": vm.VMID, "name": vm.Name,
				"node": vm.Node, "status": vm.Status, "template": b2i(vm.Template), "maxcpu": 2, "maxmem": 4 << 30, "maxdisk": 32 << 30,
				"uptime": b2i(vm.Status == "running") * 3600, "hastate": "", "tags": "k8s"}
			if vm.NoRRD || p.offline[vm.Node] {
				// PVE::API2Tools::extract_vm_stats: without RRD data no name, status unknown.
				e = map[string]any{"id": e["id"], "type": "qemu", "vmid": vm.VMID, "node": vm.Node, "status": "unknown", "template": b2i(vm.Template)}
			}
			out = append(out, e)
		}
	}
	if typ == "" || typ == "storage" {
		for _, s := range p.storages {
			if !p.acl.allowed(p.TokenID, "/storage/"+s.ID, []string{"Datastore.Audit", "Datastore.AllocateSpace"}, true) {
				continue
			}
			out = append(out, map[string]any{"id": "storage/" + s.Node + "/" + s.ID, "type": "storage", "storage": s.ID, "node": s.Node,
				"status": map[bool]string{true: "available", false: "unknown"}[s.Active], "plugintype": s.Type, "content": s.Content,
				"disk": s.Used, "maxdisk": s.Total, "shared": 0})
		}
	}
	data(w, out)
}

func (p *PVE) qemu(w http.ResponseWriter, node, id, rest string) {
	vmid, err := strconv.Atoi(id)
	if err != nil {
		rawStatus(w, 400, "Parameter verification failed.")
		return
	}
	vm, ok := p.vms[vmid]
	if !ok || vm.Node != node {
		rawStatus(w, 500, fmt.Sprintf("Configuration file 'nodes/%s/qemu-server/%d.conf' does not exist", node, vmid))
		return
	}
	switch rest {
	case "status/current":
		qmp := vm.Status
		data(w, map[string]any{"vmid": vm.VMID, "name": vm.Name, "status": vm.Status, "qmpstatus": qmp, "agent": b2i(!vm.NoAgentConfig),
			"cpus": 2, "maxmem": 4 << 30, "maxdisk": 32 << 30, "uptime": b2i(vm.Status == "running") * 3600, "ha": map[string]any{"managed": 0}, "template": b2i(vm.Template)})
	case "config":
		data(w, map[string]any{"name": vm.Name, "agent": strconv.Itoa(b2i(!vm.NoAgentConfig)), "cores": 2, "memory": "4096",
			"net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0", "ostype": "l26", "scsi0": "local-lvm:vm-" + id + "-disk-0,size=32G", "digest": "0123456789abcdef"})
	case "agent/network-get-interfaces":
		// qemu-server PVE::QemuServer::Agent::agent_cmd: config first, then run state.
		switch {
		case vm.NoAgentConfig:
			rawStatus(w, 500, "No QEMU guest agent configured")
		case vm.Status != "running":
			rawStatus(w, 500, fmt.Sprintf("VM %d is not running", vmid))
		case !vm.Agent:
			rawStatus(w, 500, "QEMU guest agent is not running")
		default:
			data(w, map[string]any{"result": agentIfaces(vm.Interfaces)})
		}
	default:
		rawStatus(w, 501, "Method 'GET /nodes/"+node+"/qemu/"+id+"/"+rest+"' not implemented")
	}
}

func agentIfaces(ifaces []FakeIface) []map[string]any {
	out := []map[string]any{{
		"name": "lo", "hardware-address": "00:00:00:00:00:00",
		"ip-addresses": []map[string]any{{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}, {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}},
		"statistics":   map[string]any{"rx-bytes": 0, "tx-bytes": 0, "rx-packets": 0, "tx-packets": 0, "rx-errs": 0, "tx-errs": 0, "rx-dropped": 0, "tx-dropped": 0},
	}}
	for _, f := range ifaces {
		var addrs []map[string]any
		for _, a := range f.Addrs {
			pfx, err := netip.ParsePrefix(a)
			if err != nil {
				continue
			}
			typ := "ipv4"
			if pfx.Addr().Is6() {
				typ = "ipv6"
			}
			addrs = append(addrs, map[string]any{"ip-address": pfx.Addr().String(), "ip-address-type": typ, "prefix": pfx.Bits()})
		}
		out = append(out, map[string]any{"name": f.Name, "hardware-address": f.MAC, "ip-addresses": addrs,
			"statistics": map[string]any{"rx-bytes": 1024, "tx-bytes": 2048, "rx-packets": 10, "tx-packets": 20, "rx-errs": 0, "tx-errs": 0, "rx-dropped": 0, "tx-dropped": 0}})
	}
	return out
}

func (p *PVE) storageStatus(w http.ResponseWriter, node, id string) {
	s, ok := p.storages[id]
	if !ok || s.Node != node {
		rawStatus(w, 500, fmt.Sprintf("storage '%s' does not exist", id))
		return
	}
	avail := uint64(0)
	if s.Total > s.Used {
		avail = s.Total - s.Used
	}
	data(w, map[string]any{"active": b2i(s.Active), "enabled": 1, "shared": 0, "type": s.Type, "content": s.Content,
		"total": s.Total, "used": s.Used, "avail": avail, "used_fraction": float64(s.Used) / float64(max(s.Total, 1))})
}

// storageList is GET /storage: the configured storages the token may see
// (Datastore.Audit or Datastore.AllocateSpace on /storage/{id}), each with its path.
func (p *PVE) storageList(w http.ResponseWriter) {
	ids := make([]string, 0, len(p.storages))
	for id := range p.storages {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	out := []map[string]any{}
	for _, id := range ids {
		if !p.acl.allowed(p.TokenID, "/storage/"+id, []string{"Datastore.Audit", "Datastore.AllocateSpace"}, true) {
			continue
		}
		out = append(out, p.storageEntry(p.storages[id]))
	}
	data(w, out)
}

func (p *PVE) storageEntry(s *FakeStorage) map[string]any {
	e := map[string]any{"storage": s.ID, "type": s.Type, "content": s.Content, "digest": "fedcba9876543210", "shared": 0}
	if s.Path != "" {
		e["path"] = s.Path
	}
	if s.Type == "nfs" || s.Type == "cifs" {
		e["shared"] = 1
	}
	return e
}

func (p *PVE) storageConfig(w http.ResponseWriter, id string) {
	s, ok := p.storages[id]
	if !ok {
		rawStatus(w, 500, fmt.Sprintf("storage '%s' does not exist", id))
		return
	}
	data(w, p.storageEntry(s))
}

func data(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	_ = json.NewEncoder(w).Encode(map[string]any{"data": v})
}

// rawStatus writes a status line with the real API's own reason phrase, which net/http
// cannot do, by taking over the connection.
func rawStatus(w http.ResponseWriter, code int, reason string) {
	body := `{"data":null}`
	if code == 400 {
		body = `{"data":null,"errors":{"vmid":"type check ('integer') failed - got '` + "x" + `'"}}`
	}
	rawStatusBody(w, code, reason, body)
}

// rawStatusBody is rawStatus with a given body (595 from pveproxy has none).
func rawStatusBody(w http.ResponseWriter, code int, reason, body string) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, reason, code)
		return
	}
	conn, buf, err := hj.Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	writeRaw(buf, code, reason, body)
}

func writeRaw(buf *bufio.ReadWriter, code int, reason, body string) {
	fmt.Fprintf(buf, "HTTP/1.1 %d %s\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", code, reason, len(body), body)
	_ = buf.Flush()
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
