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
// 401 for a bad token.
type PVE struct {
	// URL is the API base, https://127.0.0.1:PORT/api2/json.
	URL string
	// CAFile is the PEM of the CA that signed the server certificate.
	CAFile      string
	TokenID     string
	TokenSecret string

	srv *http.Server
	ln  net.Listener

	mu       sync.Mutex
	nodes    []string
	vms      map[int]*FakeVM
	storages map[string]*FakeStorage
	requests []string
}

// FakeVM is a QEMU VM as the fake API reports it.
type FakeVM struct {
	VMID   int
	Name   string
	Node   string
	Status string // "running" or "stopped"
	// Agent: the guest agent is enabled in the VM config and running in the guest.
	Agent      bool
	Interfaces []FakeIface
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
// (written to dir/pve-ca.pem). The token is tokenID (user@realm!name) and secret.
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
		nodes:       []string{"pve1"},
		vms:         map[int]*FakeVM{},
		storages:    map[string]*FakeStorage{},
	}
	// HTTP/1.1 only (TLSNextProto set): the real API's reason phrases need a raw status line.
	p.srv = &http.Server{Handler: p, TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog: log.New(io.Discard, "", 0)} // clients that refuse the certificate are expected
	tlsLn := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	go func() { _ = p.srv.Serve(tlsLn) }()
	return p, nil
}

// Close stops the server.
func (p *PVE) Close() { _ = p.srv.Close() }

// AddNode adds a Proxmox node (the cluster starts with "pve1").
func (p *PVE) AddNode(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nodes = append(p.nodes, name)
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

// PutStorage adds or replaces a storage.
func (p *PVE) PutStorage(s FakeStorage) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.Node == "" {
		s.Node = p.nodes[0]
	}
	p.storages[s.ID] = &s
}

// Requests lists "METHOD path?query Authorization" of every request so far, for tests
// that check what the agent sent (and that it sent no secret elsewhere).
func (p *PVE) Requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.requests...)
}

// ServeHTTP routes /api2/json/… like the real API.
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
	switch {
	case path == "/version":
		data(w, map[string]any{"version": "8.3.2", "release": "8.3", "repoid": "3e76eec21c4a14a7"})
	case path == "/cluster/status":
		p.clusterStatus(w)
	case path == "/cluster/resources":
		p.clusterResources(w, r.URL.Query().Get("type"))
	case path == "/nodes":
		p.nodeList(w)
	case len(seg) == 3 && seg[0] == "nodes" && seg[2] == "status":
		p.nodeStatus(w, seg[1])
	case len(seg) >= 4 && seg[0] == "nodes" && seg[2] == "qemu":
		p.qemu(w, seg[1], seg[3], strings.Join(seg[4:], "/"))
	case len(seg) == 5 && seg[0] == "nodes" && seg[2] == "storage" && seg[4] == "status":
		p.storageStatus(w, seg[1], seg[3])
	case len(seg) == 2 && seg[0] == "storage":
		p.storageConfig(w, seg[1])
	default:
		rawStatus(w, 501, "Method 'GET "+path+"' not implemented")
	}
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
		out = append(out, map[string]any{"type": "node", "id": "node/" + n, "name": n, "nodeid": i + 1, "online": 1, "local": b2i(i == 0), "ip": "127.0.0.1", "level": ""})
	}
	data(w, out)
}

func (p *PVE) nodeList(w http.ResponseWriter) {
	var out []map[string]any
	for _, n := range p.nodes {
		out = append(out, map[string]any{"node": n, "id": "node/" + n, "type": "node", "status": "online", "cpu": 0.03, "maxcpu": 8,
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

func (p *PVE) clusterResources(w http.ResponseWriter, typ string) {
	var out []map[string]any
	if typ == "" || typ == "node" {
		for _, n := range p.nodes {
			out = append(out, map[string]any{"id": "node/" + n, "type": "node", "node": n, "status": "online", "level": "", "maxcpu": 8, "maxmem": 32 << 30})
		}
	}
	if typ == "" || typ == "vm" {
		ids := make([]int, 0, len(p.vms))
		for id := range p.vms {
			ids = append(ids, id)
		}
		sort.Ints(ids)
		for _, id := range ids {
			vm := p.vms[id]
			out = append(out, map[string]any{"id": fmt.Sprintf("qemu/%d", vm.VMID), "type": "qemu", "vmid": vm.VMID, "name": vm.Name,
				"node": vm.Node, "status": vm.Status, "template": 0, "maxcpu": 2, "maxmem": 4 << 30, "maxdisk": 32 << 30,
				"uptime": b2i(vm.Status == "running") * 3600, "hastate": "", "tags": "k8s"})
		}
	}
	if typ == "" || typ == "storage" {
		for _, s := range p.storages {
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
		data(w, map[string]any{"vmid": vm.VMID, "name": vm.Name, "status": vm.Status, "qmpstatus": qmp, "agent": b2i(vm.Agent),
			"cpus": 2, "maxmem": 4 << 30, "maxdisk": 32 << 30, "uptime": b2i(vm.Status == "running") * 3600, "ha": map[string]any{"managed": 0}})
	case "config":
		data(w, map[string]any{"name": vm.Name, "agent": strconv.Itoa(b2i(vm.Agent)), "cores": 2, "memory": "4096",
			"net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0", "ostype": "l26", "scsi0": "local-lvm:vm-" + id + "-disk-0,size=32G", "digest": "0123456789abcdef"})
	case "agent/network-get-interfaces":
		switch {
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

func (p *PVE) storageConfig(w http.ResponseWriter, id string) {
	s, ok := p.storages[id]
	if !ok {
		rawStatus(w, 500, fmt.Sprintf("storage '%s' does not exist", id))
		return
	}
	data(w, map[string]any{"storage": s.ID, "type": s.Type, "path": s.Path, "content": s.Content, "digest": "fedcba9876543210", "shared": 0})
}

func data(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	_ = json.NewEncoder(w).Encode(map[string]any{"data": v})
}

// rawStatus writes a status line with the real API's own reason phrase, which net/http
// cannot do, by taking over the connection.
func rawStatus(w http.ResponseWriter, code int, reason string) {
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
	body := `{"data":null}`
	if code == 400 {
		body = `{"data":null,"errors":{"vmid":"type check ('integer') failed - got '` + "x" + `'"}}`
	}
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
