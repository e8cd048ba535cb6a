package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// Gate stands in front of a lab Vault (1.21.4, the newest the module proxy serves) and
// enforces what Vault 2.x, the chart's default image, documents and 1.21.4 does not:
//
//   - sys/generate-root/*, sys/rekey*, sys/rekey-recovery-key* and
//     sys/generate-operation-token need a valid token that may use the path, as well as
//     the shares (Vault 2.0.0 "important changes", CVE-2026-5807 / HCSEC-2026-08); the
//     refusal is Vault's own: 403 {"errors":["permission denied"]}. The old behaviour
//     would return only with the server setting enable_unauthenticated_access, which
//     the agent never sets (so the gate has no switch for it).
//   - a request whose path holds "//", "/./" or "/../" is rejected (1.21.5+).
//   - a snapshot restore answers once Vault has accepted the file; the restore is
//     applied in the background (2.x), here after RestoreDelay.
//
// Everything else passes through unchanged, streamed. While Vault is down the gate
// closes connections, as a refused connection would look to a client.
type Gate struct {
	// Addr is where clients connect (host:port).
	Addr    string
	backend *url.URL
	srv     *http.Server
	proxy   *httputil.ReverseProxy
	logger  *log.Logger
	// RestoreDelay is how long after the upload a restore is applied (default 100ms).
	RestoreDelay time.Duration

	mu       sync.Mutex
	restores sync.WaitGroup
	Refused  int // generate-root/rekey calls refused
}

// gatedPrefixes need a token under Vault 2.x.
var gatedPrefixes = []string{"/v1/sys/generate-root", "/v1/sys/rekey", "/v1/sys/rekey-recovery-key", "/v1/sys/generate-operation-token"}

// StartGate serves the gate on l in front of the Vault API at backend (http://ip:port),
// logging to logPath.
func StartGate(l net.Listener, backend, logPath string) (*Gate, error) {
	u, err := url.Parse(backend)
	if err != nil {
		return nil, err
	}
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	g := &Gate{Addr: l.Addr().String(), backend: u, logger: log.New(lf, "gate ", log.LstdFlags|log.Lmicroseconds), RestoreDelay: 100 * time.Millisecond}
	g.proxy = &httputil.ReverseProxy{
		Rewrite:       func(r *httputil.ProxyRequest) { r.SetURL(u); r.Out.Host = r.In.Host },
		FlushInterval: -1,
		ErrorLog:      g.logger,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			g.logger.Printf("backend %s %s: %v", r.Method, r.URL.Path, err)
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					c.Close() // like a refused or reset connection
					return
				}
			}
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	g.srv = &http.Server{Handler: g, ErrorLog: g.logger, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = g.srv.Serve(l) }()
	return g, nil
}

// Close stops the gate after any background restore has been applied.
func (g *Gate) Close() {
	g.restores.Wait()
	_ = g.srv.Close()
}

func vaultError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string][]string{"errors": {msg}})
}

// ServeHTTP applies the 2.x rules, then passes the request on.
func (g *Gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	raw := r.URL.EscapedPath()
	if strings.Contains(raw, "//") || strings.Contains(raw, "/./") || strings.Contains(raw, "/../") || strings.HasSuffix(raw, "/.") || strings.HasSuffix(raw, "/..") {
		vaultError(w, http.StatusBadRequest, "invalid request path: "+raw)
		return
	}
	for _, p := range gatedPrefixes {
		if strings.HasPrefix(r.URL.Path, p) {
			if !g.authorised(r) {
				g.mu.Lock()
				g.Refused++
				g.mu.Unlock()
				g.logger.Printf("refused %s %s: Vault 2.x needs a token that may use it", r.Method, r.URL.Path)
				vaultError(w, http.StatusForbidden, "permission denied")
				return
			}
			break
		}
	}
	if (r.Method == http.MethodPost || r.Method == http.MethodPut) && (r.URL.Path == "/v1/sys/storage/raft/snapshot" || r.URL.Path == "/v1/sys/storage/raft/snapshot-force") {
		g.restore(w, r)
		return
	}
	g.proxy.ServeHTTP(w, r)
}

// authorised asks Vault whether the request's token may use its path for its method
// (sys/capabilities-self, which the default policy grants). A token that cannot even
// ask is refused: the lab is stricter than "a valid token", never laxer.
func (g *Gate) authorised(r *http.Request) bool {
	tok := r.Header.Get("X-Vault-Token")
	if tok == "" {
		return false
	}
	allowed, _ := g.capabilities(r, tok)
	return allowed
}

// capabilities answers whether tok may use the request's path for its method; ok is
// false when Vault would not say (the token may not ask).
func (g *Gate) capabilities(r *http.Request, tok string) (allowed, ok bool) {
	want := map[string]string{http.MethodGet: "read", http.MethodPut: "update", http.MethodPost: "update", http.MethodDelete: "delete"}[r.Method]
	path := strings.TrimPrefix(r.URL.Path, "/v1/")
	body, _ := json.Marshal(map[string][]string{"paths": {path}})
	req, _ := http.NewRequestWithContext(r.Context(), http.MethodPost, g.backend.String()+"/v1/sys/capabilities-self", bytes.NewReader(body))
	req.Header.Set("X-Vault-Token", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, false
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, false
	}
	var caps map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&caps); err != nil {
		return false, false
	}
	list, _ := caps[path].([]any)
	if data, ok := caps["data"].(map[string]any); ok && list == nil {
		list, _ = data[path].([]any)
	}
	for _, c := range list {
		if c == "root" || c == want {
			return true, true
		}
	}
	return false, true
}

// restore accepts the upload, answers, and applies it in the background.
func (g *Gate) restore(w http.ResponseWriter, r *http.Request) {
	tok := r.Header.Get("X-Vault-Token")
	if !g.authorised(r) {
		vaultError(w, http.StatusForbidden, "permission denied")
		return
	}
	f, err := os.CreateTemp("", "pva-gate-restore-*")
	if err != nil {
		vaultError(w, http.StatusInternalServerError, err.Error())
		return
	}
	n, err := io.Copy(f, r.Body)
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		vaultError(w, http.StatusBadRequest, "reading the snapshot: "+err.Error())
		return
	}
	g.logger.Printf("accepted a %d-byte restore for %s; applying it in the background", n, r.URL.Path)
	w.WriteHeader(http.StatusNoContent)
	g.restores.Add(1)
	go func(path string) {
		defer g.restores.Done()
		defer os.Remove(f.Name())
		defer f.Close()
		time.Sleep(g.RestoreDelay) // the lab's stand-in for a background restore's work
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.backend.String()+path, f)
		req.Header.Set("X-Vault-Token", tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			g.logger.Printf("background restore %s failed: %v", path, err)
			return
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		g.logger.Printf("background restore %s: HTTP %d %s", path, resp.StatusCode, strings.TrimSpace(string(b)))
	}(r.URL.Path)
}

// Refusals reports how many gated calls were refused.
func (g *Gate) Refusals() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.Refused
}

func (g *Gate) String() string { return fmt.Sprintf("gate %s → %s", g.Addr, g.backend) }
