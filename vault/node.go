package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
)

// Errors a caller branches on.
var (
	ErrNotInitialised     = errors.New("vault is not initialised")
	ErrAlreadyInitialised = errors.New("vault is already initialised")
	ErrWrongKeys          = errors.New("unseal keys belong to another cluster")
	ErrSealed             = errors.New("vault is sealed")
	ErrRemoved            = errors.New("vault node was removed from the raft cluster")
)

// callTimeout bounds every small API call (status, unseal, tokens); snapshot streams are
// bounded by their context and an idle deadline instead (see stream.go).
const callTimeout = 15 * time.Second

// Node is one Vault server (a pod) reached at Addr through HTTP.
type Node struct {
	Name string
	Addr string
	// client carries the per-call timeout and no token; streams get their own client
	// without a timeout (streamWithToken).
	client *api.Client
	hc     *http.Client
}

// NewNode builds an API client for addr using hc (its transport decides how the pod is
// reached: an SSH tunnel, TLS with the pod's DNS name …). No token is set, and nothing of
// the process environment is used: VAULT_ADDR, VAULT_AGENT_ADDR, VAULT_TOKEN,
// VAULT_NAMESPACE, VAULT_HEADERS, VAULT_WRAP_TTL and the rest cannot redirect the shares
// or change a request.
func NewNode(name, addr string, hc *http.Client) (*Node, error) {
	if hc == nil {
		hc = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	c, err := newClient(addr, &http.Client{Transport: hc.Transport}, callTimeout)
	if err != nil {
		return nil, fmt.Errorf("vault client for %s: %w", name, err)
	}
	return &Node{Name: name, Addr: addr, client: c, hc: &http.Client{Transport: hc.Transport}}, nil
}

// envMu serialises client construction: api.NewClient reads the VAULT_* environment
// (DefaultConfig, VAULT_TOKEN, VAULT_NAMESPACE, VAULT_HEADERS), so the variables are
// hidden from it while it runs and restored after.
var envMu sync.Mutex

func newClient(addr string, hc *http.Client, timeout time.Duration) (*api.Client, error) {
	envMu.Lock()
	defer envMu.Unlock()
	saved := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "VAULT_") {
			saved[k] = v
			_ = os.Unsetenv(k)
		}
	}
	defer func() {
		for k, v := range saved {
			_ = os.Setenv(k, v)
		}
	}()
	cfg := &api.Config{Address: addr, HttpClient: hc, MaxRetries: 0, Timeout: timeout}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c.ClearToken()
	c.ClearNamespace()
	c.SetCloneToken(false)
	c.SetHeaders(http.Header{api.RequestHeaderName: []string{"true"}})
	c.SetWrappingLookupFunc(func(string, string) string { return "" })
	return c, nil
}

// SealState is sys/seal-status reduced to what the agent decides on.
type SealState struct {
	Initialized bool   `json:"initialized"`
	Sealed      bool   `json:"sealed"`
	Threshold   int    `json:"threshold"`
	Shares      int    `json:"shares"`
	Progress    int    `json:"progress"`
	Version     string `json:"version,omitempty"`
	ClusterID   string `json:"cluster_id,omitempty"`
	ClusterName string `json:"cluster_name,omitempty"`
	// Removed: the node was removed from the Raft configuration (Vault 1.19+); it seals
	// and refuses to rejoin while it holds data.
	Removed bool `json:"removed_from_cluster,omitempty"`
}

// SealStatus reads sys/seal-status. It is what the daemon asks every pod every second,
// so it is one plain GET decoded into the fields the agent uses (through the vault/api
// client it cost the idle daemon a third of its CPU).
func (n *Node) SealStatus(ctx context.Context) (SealState, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(n.Addr, "/")+"/v1/sys/seal-status", nil)
	if err != nil {
		return SealState{}, fmt.Errorf("%s: seal status: %w", n.Name, err)
	}
	resp, err := n.hc.Do(req)
	if err != nil {
		return SealState{}, fmt.Errorf("%s: seal status: %w", n.Name, err)
	}
	defer resp.Body.Close()
	body := io.LimitReader(resp.Body, 64<<10)
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(body)
		return SealState{}, fmt.Errorf("%s: seal status: %s: %s", n.Name, resp.Status, strings.TrimSpace(string(b)))
	}
	var st struct {
		Initialized, Sealed bool
		T, N, Progress      int
		Version             string
		ClusterID           string `json:"cluster_id"`
		ClusterName         string `json:"cluster_name"`
		Removed             *bool  `json:"removed_from_cluster"`
	}
	if err := json.NewDecoder(body).Decode(&st); err != nil {
		return SealState{}, fmt.Errorf("%s: seal status: %w", n.Name, err)
	}
	return SealState{Initialized: st.Initialized, Sealed: st.Sealed, Threshold: st.T, Shares: st.N, Progress: st.Progress,
		Version: st.Version, ClusterID: st.ClusterID, ClusterName: st.ClusterName, Removed: st.Removed != nil && *st.Removed}, nil
}

// Health is sys/health reduced to what the agent decides on.
type Health struct {
	Initialized bool   `json:"initialized"`
	Sealed      bool   `json:"sealed"`
	Standby     bool   `json:"standby"`
	Active      bool   `json:"active"`
	Version     string `json:"version"`
	ClusterID   string `json:"cluster_id,omitempty"`
	ClusterName string `json:"cluster_name,omitempty"`
	// Removed is Vault's 530: the node was removed from the Raft cluster.
	Removed bool `json:"removed_from_cluster,omitempty"`
	// HAUnhealthy is Vault's 474: a standby that cannot reach the active node.
	HAUnhealthy bool `json:"ha_unhealthy,omitempty"`
}

// Code is the status sys/health would answer with its default codes, for reports.
func (h Health) Code() int {
	switch {
	case h.Removed:
		return 530
	case !h.Initialized:
		return 501
	case h.Sealed:
		return 503
	case h.Standby && h.HAUnhealthy:
		return 474
	case h.Standby:
		return 429
	}
	return 200
}

// Health reads sys/health (which answers 200/429/474/501/503/530 by state; all are answers).
func (n *Node) Health(ctx context.Context) (Health, error) {
	h, err := n.client.Sys().HealthWithContext(ctx)
	if err != nil {
		return Health{}, fmt.Errorf("%s: health: %w", n.Name, err)
	}
	out := Health{Initialized: h.Initialized, Sealed: h.Sealed, Standby: h.Standby,
		Active:  h.Initialized && !h.Sealed && !h.Standby && !h.PerformanceStandby,
		Version: h.Version, ClusterID: h.ClusterID, ClusterName: h.ClusterName,
		Removed:     h.RemovedFromCluster != nil && *h.RemovedFromCluster,
		HAUnhealthy: h.HAConnectionHealthy != nil && !*h.HAConnectionHealthy}
	if out.Removed {
		out.Active = false
	}
	return out, nil
}

// InitResult is what Init returns: the keyset and the initial root token.
type InitResult struct {
	Keyset    Keyset
	RootToken Token
}

// Init initialises Vault with shares/threshold. The caller must store the keys before
// doing anything else: they exist nowhere else. It should pass a context that an
// interruption does not cancel between this call and the write of the keys.
func (n *Node) Init(ctx context.Context, shares, threshold int) (*InitResult, error) {
	resp, err := n.client.Sys().InitWithContext(ctx, &api.InitRequest{SecretShares: shares, SecretThreshold: threshold})
	if err != nil {
		if strings.Contains(err.Error(), "already initialized") {
			return nil, fmt.Errorf("%s: %w", n.Name, ErrAlreadyInitialised)
		}
		return nil, fmt.Errorf("%s: init: %w", n.Name, err)
	}
	res := &InitResult{RootToken: Token{resp.RootToken}, Keyset: Keyset{Threshold: threshold}}
	for i, k := range resp.KeysB64 {
		res.Keyset.Keys = append(res.Keyset.Keys, Key{Index: i + 1, value: k})
	}
	return res, nil
}

// withToken returns a client carrying t with the per-call timeout. (api.Client.Clone
// would read the environment again, so a fresh client is built.)
func (n *Node) withToken(t Token) (*api.Client, error) {
	return n.tokenClient(t, callTimeout)
}

// streamWithToken is withToken without a per-call timeout, for snapshot streams.
func (n *Node) streamWithToken(t Token) (*api.Client, error) {
	return n.tokenClient(t, 0)
}

func (n *Node) tokenClient(t Token, timeout time.Duration) (*api.Client, error) {
	c, err := newClient(n.Addr, n.hc, timeout)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", n.Name, err)
	}
	c.SetToken(t.value)
	return c, nil
}

// statusCode is the HTTP status of a Vault API error, 0 when it is not one.
func statusCode(err error) int {
	var re *api.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode
	}
	return 0
}

// IsPermissionDenied reports whether Vault refused a token (403): revoked, expired, or
// lacking the capability.
func IsPermissionDenied(err error) bool { return statusCode(err) == http.StatusForbidden }
