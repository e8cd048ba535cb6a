package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
)

// ErrUnknownNode is returned when a requested node, or the node a pod runs on, is not
// in the configuration (no waiting makes such a pod reachable).
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
	theirs := env.operatorVolumes(ctx)
	var results []NodeResult
	var errs []error
	for _, n := range nodes {
		t0 := env.Clock.Now()
		res := NodeResult{Node: n.Name}
		want := env.want(n)
		if p, ok := theirs[n.Name]; ok && p != want.Path {
			log.Warn("the release's volume on this node is one you wrote, at another path than the configuration's: preparing the volume's", "node", n.Name, "volume_path", p, "host_path", want.Path)
			want.Path = p
		}
		err := provisionNode(ctx, env, n, sshCfg, want, &res)
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
func provisionNode(ctx context.Context, env *Env, n configs.Node, sshCfg provision.SSHConfig, want provision.Want, res *NodeResult) error {
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
	p, err := conn.Prepare(ctx, want)
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	res.Prepared = &p
	return nil
}

// operatorVolumes are the directories of the hostPath and local volumes the operator
// wrote for the release, by node (none when the cluster or the release is not there
// yet: provision then prepares the configured host_path, as before an install).
func (e *Env) operatorVolumes(ctx context.Context) map[string]string {
	if e.Config.Vault.PodAccess == "static" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	cl, err := e.Cluster(ctx)
	if err == nil {
		var out map[string]string
		if out, err = cl.OperatorVolumes(ctx, e.Config.Chart.Release); err == nil {
			return out
		}
	}
	e.Log.Debug("provision: the release's volumes could not be read; preparing the configured host_path", "err", err)
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
