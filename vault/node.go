package vault

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
)

// Errors a caller branches on.
var (
	ErrNotInitialised     = errors.New("vault is not initialised")
	ErrAlreadyInitialised = errors.New("vault is already initialised")
	ErrWrongKeys          = errors.New("unseal keys belong to another cluster")
	ErrSealed             = errors.New("vault is sealed")
)

// Node is one Vault server (a pod) reached at Addr through HTTP.
type Node struct {
	Name   string
	Addr   string
	client *api.Client
}

// NewNode builds an API client for addr using hc (its transport decides how the pod is
// reached: an SSH tunnel, TLS with the pod's DNS name …). No token is set.
func NewNode(name, addr string, hc *http.Client) (*Node, error) {
	cfg := api.DefaultConfig()
	cfg.Address = addr
	if hc != nil {
		cfg.HttpClient = hc
	}
	cfg.MaxRetries = 0
	cfg.Timeout = 15 * time.Second
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("vault client for %s: %w", name, err)
	}
	c.ClearToken()
	c.SetCloneToken(false)
	return &Node{Name: name, Addr: addr, client: c}, nil
}

// SealStatus reads sys/seal-status.
func (n *Node) SealStatus(ctx context.Context) (*api.SealStatusResponse, error) {
	st, err := n.client.Sys().SealStatusWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: seal status: %w", n.Name, err)
	}
	return st, nil
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
}

// Health reads sys/health (which answers 200/429/501/503 by state; all are answers).
func (n *Node) Health(ctx context.Context) (Health, error) {
	h, err := n.client.Sys().HealthWithContext(ctx)
	if err != nil {
		return Health{}, fmt.Errorf("%s: health: %w", n.Name, err)
	}
	return Health{Initialized: h.Initialized, Sealed: h.Sealed, Standby: h.Standby, Active: h.Initialized && !h.Sealed && !h.Standby && !h.PerformanceStandby,
		Version: h.Version, ClusterID: h.ClusterID, ClusterName: h.ClusterName}, nil
}

// InitResult is what Init returns: the keyset and the initial root token.
type InitResult struct {
	Keyset    Keyset
	RootToken Token
}

// Init initialises Vault with shares/threshold. The caller must store the keys before
// doing anything else: they exist nowhere else.
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

// withToken returns a copy of the client carrying t.
func (n *Node) withToken(t Token) (*api.Client, error) {
	c, err := n.client.Clone()
	if err != nil {
		return nil, err
	}
	c.SetToken(t.value)
	return c, nil
}
