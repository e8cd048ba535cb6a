package agent

import (
	"context"
	"errors"
	"fmt"
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
func Provision(ctx context.Context, env *Env, opts ProvisionOptions) ([]NodeResult, error) {
	log := env.Log.With("component", "provision")
	nodes, err := selectNodes(env.Config, opts.Nodes)
	if err != nil {
		return nil, err
	}
	sshCfg, err := env.SSH(opts.AcceptNewHostKey)
	if err != nil {
		return nil, err
	}
	var results []NodeResult
	var errs []error
	for _, n := range nodes {
		t0 := env.Clock.Now()
		res := NodeResult{Node: n.Name}
		err := provisionNode(ctx, env, n, sshCfg, &res)
		res.Duration = env.Clock.Now().Sub(t0)
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
func provisionNode(ctx context.Context, env *Env, n configs.Node, sshCfg provision.SSHConfig, res *NodeResult) error {
	loc, err := env.resolve(ctx, n)
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
	p, err := conn.Prepare(ctx, env.want(n))
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	res.Prepared = &p
	return nil
}

// want is the state node n's hostPath must have.
func (e *Env) want(n configs.Node) provision.Want {
	return provision.Want{Path: e.Config.NodeHostPath(n), UID: e.Config.Vault.UID, GID: e.Config.Vault.GID, Mode: uint32(e.Config.Vault.DataMode)}
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
