package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
)

// ErrUnknownNode is returned when a requested node is not in the configuration.
var ErrUnknownNode = errors.New("node not in the configuration")

// ProvisionOptions narrow and permit a provision run.
type ProvisionOptions struct {
	// Nodes limits the run to these node names; empty means every configured node.
	Nodes []string
	// AcceptNewHostKey pins the key of a node not yet in known_hosts.
	AcceptNewHostKey bool
}

// NodeResult is what happened on one node.
type NodeResult struct {
	Node     string              `json:"node"`
	Location provision.Location  `json:"location"`
	Prepared *provision.Prepared `json:"prepared,omitempty"`
	// PinnedHostKey is the fingerprint pinned by --accept-new-host-key, if any.
	PinnedHostKey string        `json:"pinned_host_key,omitempty"`
	Duration      time.Duration `json:"-"`
	Err           error         `json:"-"`
}

// Provision prepares the Vault hostPath on each selected node: resolve its address
// (static, or the Proxmox VM's guest agent), connect over SSH with a verified host key,
// create/chown/chmod the directory in one session and read it back numerically. Nodes
// are handled one after another; a failed node does not stop the others, and the
// returned error joins every failure. Safe to re-run: a prepared node reports unchanged.
func Provision(ctx context.Context, cfg *configs.Config, opts ProvisionOptions, log *slog.Logger) ([]NodeResult, error) {
	log = log.With("component", "provision")
	nodes, err := selectNodes(cfg, opts.Nodes)
	if err != nil {
		return nil, err
	}
	key, err := cfg.SSH.Identity.Read()
	if err != nil {
		return nil, fmt.Errorf("ssh.identity: %w", err)
	}
	resolver, err := newResolver(cfg, nodes, log)
	if err != nil {
		return nil, err
	}
	sshCfg := provision.SSHConfig{
		User: cfg.SSH.User, Port: cfg.SSH.Port, Key: key.Bytes(), KnownHosts: cfg.SSH.KnownHosts,
		AcceptNewHostKey: opts.AcceptNewHostKey, Sudo: cfg.SSH.Sudo,
		ConnectTimeout: cfg.SSH.ConnectTimeout, CommandTimeout: cfg.SSH.CommandTimeout,
	}

	var results []NodeResult
	var errs []error
	for _, n := range nodes {
		t0 := time.Now()
		res := NodeResult{Node: n.Name}
		err := provisionNode(ctx, cfg, n, resolver, sshCfg, &res)
		res.Duration = time.Since(t0)
		if err != nil {
			res.Err = fmt.Errorf("node %s: %w", n.Name, err)
			errs = append(errs, res.Err)
			log.Error("provision failed", "node", n.Name, "err", err)
		} else {
			log.Info("provisioned", "node", n.Name, "address", res.Location.Address, "path", res.Prepared.Path,
				"state", res.Prepared.State, "owner", fmt.Sprintf("%d:%d", res.Prepared.UID, res.Prepared.GID), "mode", res.Prepared.Mode,
				"duration", res.Duration.Round(time.Millisecond))
		}
		results = append(results, res)
		if ctx.Err() != nil {
			break
		}
	}
	return results, errors.Join(errs...)
}

// provisionNode runs the steps for one node: resolve → connect → prepare.
func provisionNode(ctx context.Context, cfg *configs.Config, n configs.Node, r *provision.Resolver, sshCfg provision.SSHConfig, res *NodeResult) error {
	loc, err := r.Resolve(ctx, provision.Target{Name: n.Name, Address: n.Address, VMID: n.VMID, VMName: n.VMName})
	if err != nil {
		return fmt.Errorf("resolve: %w", err)
	}
	res.Location = loc
	conn, err := provision.Dial(ctx, loc.Address, sshCfg)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	res.PinnedHostKey = conn.PinnedKey
	p, err := conn.Prepare(ctx, provision.Want{Path: cfg.NodeHostPath(n), UID: cfg.Vault.UID, GID: cfg.Vault.GID, Mode: uint32(cfg.Vault.DataMode)})
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	res.Prepared = &p
	return nil
}

func selectNodes(cfg *configs.Config, names []string) ([]configs.Node, error) {
	if len(names) == 0 {
		return cfg.Nodes, nil
	}
	byName := map[string]configs.Node{}
	var known []string
	for _, n := range cfg.Nodes {
		byName[n.Name] = n
		known = append(known, n.Name)
	}
	var out []configs.Node
	for _, name := range names {
		n, ok := byName[name]
		if !ok {
			return nil, fmt.Errorf("%w: %q (configured: %v)", ErrUnknownNode, name, known)
		}
		out = append(out, n)
	}
	return out, nil
}

// newResolver builds the Proxmox resolver when a selected node is a VM; nil otherwise
// (static addresses need no API).
func newResolver(cfg *configs.Config, nodes []configs.Node, log *slog.Logger) (*provision.Resolver, error) {
	needed := false
	for _, n := range nodes {
		needed = needed || n.VMID != 0 || n.VMName != ""
	}
	if !needed {
		return nil, nil
	}
	return newResolverAlways(cfg, log)
}

// newResolverAlways builds the Proxmox API client from the configuration.
func newResolverAlways(cfg *configs.Config, log *slog.Logger) (*provision.Resolver, error) {
	secret, err := cfg.Proxmox.TokenSecret.Read()
	if err != nil {
		return nil, fmt.Errorf("proxmox.token_secret: %w", err)
	}
	if cfg.Proxmox.InsecureSkipVerify {
		log.Warn("TLS verification of the Proxmox API is disabled (proxmox.insecure_skip_verify); set proxmox.ca_file instead", "url", cfg.Proxmox.URL)
	}
	return provision.NewResolver(provision.ProxmoxConfig{
		URL: cfg.Proxmox.URL, TokenID: cfg.Proxmox.TokenID, TokenSecret: secret.Trimmed(),
		CAFile: cfg.Proxmox.CAFile, InsecureSkipVerify: cfg.Proxmox.InsecureSkipVerify,
		PreferCIDR: cfg.Proxmox.PreferCIDR, Timeout: cfg.Proxmox.Timeout,
	})
}
