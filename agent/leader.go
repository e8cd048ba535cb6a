package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// ErrNotLeader means this agent does not hold the cluster's Lease (or could not prove
// it does): a backup it was taking is not committed.
var ErrNotLeader = errors.New("this agent does not hold the leadership Lease")

// Identity is this agent's name among the agents of a Proxmox cluster: proxmox.node, or
// the host's short name (what Proxmox calls the node).
func (e *Env) Identity() (string, error) {
	if e.Config.Proxmox.Node != "" {
		return e.Config.Proxmox.Node, nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("this host's name: %w", err)
	}
	return strings.SplitN(h, ".", 2)[0], nil
}

// clusterIdentity is Identity, checked against cluster.hosts.
func (e *Env) clusterIdentity() (string, error) {
	id, err := e.Identity()
	if err != nil {
		return "", err
	}
	for _, h := range e.Config.Cluster.Hosts {
		if h.Name == id {
			return id, nil
		}
	}
	return "", hintf("add it to cluster.hosts, or set proxmox.node to the name listed there",
		"this agent's node %q is not in cluster.hosts", id)
}

// fence proves, right before a snapshot is committed, that the agent still leads, and
// returns the holder to record.
type fence func(ctx context.Context) (string, error)

// leadFunc runs the leader's jobs until ctx ends.
type leadFunc func(ctx context.Context, f fence)

// lead runs the jobs only one agent of a cluster runs: the backup schedule (with its
// off-host pushes and retention), the drill schedule and the token renewals. It returns
// when ctx ends, after every job has.
func (d *daemon) lead(ctx context.Context, env *Env, f fence) {
	var wg sync.WaitGroup
	if env.Config.Snapshots.Schedule != "" {
		wg.Go(func() { d.runBackups(ctx, env, f) })
	} else {
		d.log.Info("no backup schedule (snapshots.schedule is empty): a timer or backup-now takes the snapshots")
	}
	if env.Config.Snapshots.DrillSchedule != "" {
		wg.Go(func() { d.runDrills(ctx, env) })
	}
	wg.Go(func() { d.runRenewals(ctx, env) })
	wg.Wait()
}

// elect takes part in the election of the cluster's agents (k8s.Cluster.Elect: a
// coordination.k8s.io Lease in the Vault namespace, identity the PVE node name) until
// ctx ends. While this agent holds the Lease, lead runs with a context that ends the
// moment it stops holding it; the next attempt waits for lead to return, so two
// generations of jobs never overlap. With the API server unreachable nobody can take or
// renew the Lease: the leader stops leading and no other agent starts. Unsealing never
// waits on any of this.
func (d *daemon) elect(ctx context.Context, env *Env, lead leadFunc) {
	cl := env.Config.Cluster
	id, err := env.clusterIdentity()
	if err != nil {
		d.log.Error("not taking part in the leader election: backups, drills and renewals run on the other hosts", "err", err)
		return
	}
	log := d.log.With("lease", cl.Lease, "identity", id)
	e := env.election(id)
	e.Log = log
	e.OnNewLeader = func(holder string) {
		d.metrics.leaderObserved(holder)
		if holder != id {
			log.Info("another agent leads", "leader", holder)
		}
	}
	checked := false
	for ctx.Err() == nil {
		c, err := env.Cluster(ctx)
		if err != nil {
			log.Warn("leader election: Kubernetes unreachable; trying again", "err", err)
			if sleep(ctx, env.Clock, cl.RetryPeriod) != nil {
				return
			}
			continue
		}
		if !checked {
			// client-go only logs a refusal, every retry period: say once what is missing.
			if err := leaseOnce(ctx, c, env, id); err != nil {
				log.Error("leader election: the Lease cannot be taken or renewed", "err", err, "hint", strings.Join(Hints(err), "; "))
			}
			checked = true
		}
		err = c.Elect(ctx, e, func(lctx context.Context) {
			t0 := env.Clock.Now()
			log.Info("leading: backups, drills and token renewals run here")
			d.metrics.leader.Set(1)
			d.metrics.leaderChanges.Inc()
			lead(lctx, leaseFence(lctx, c, env, id))
			d.metrics.leader.Set(0)
			if ctx.Err() == nil {
				log.Warn("stopped leading: the Lease could not be renewed; nothing new starts here until it is held again", "led_for", env.Clock.Now().Sub(t0).Round(time.Millisecond))
			}
		})
		if err != nil {
			log.Error("leader election unusable", "err", err) // validated at load: not expected
			return
		}
	}
}

func (e *Env) election(id string) k8s.Election {
	cl := e.Config.Cluster
	return k8s.Election{Name: cl.Lease, Identity: id, LeaseDuration: cl.LeaseDuration, RenewDeadline: cl.RenewDeadline, RetryPeriod: cl.RetryPeriod}
}

// leaseOnce does what one election round does to the Lease, bounded by renew_deadline.
func leaseOnce(ctx context.Context, c *k8s.Cluster, env *Env, id string) error {
	ctx, cancel := context.WithTimeout(ctx, env.Config.Cluster.RenewDeadline)
	defer cancel()
	return c.LeaseOnce(ctx, env.election(id))
}

// leaseFence proves, right before a snapshot is committed, that this agent still holds
// the Lease: it has not stopped leading, and the Lease itself (read again) names it and
// was renewed within its duration. Without an answer from the API server nothing is
// committed.
func leaseFence(lctx context.Context, c *k8s.Cluster, env *Env, id string) fence {
	cl := env.Config.Cluster
	return func(ctx context.Context) (string, error) {
		if lctx.Err() != nil {
			return "", fmt.Errorf("%w: it stopped leading", ErrNotLeader)
		}
		ctx, cancel := context.WithTimeout(ctx, cl.RenewDeadline)
		defer cancel()
		if err := c.HoldsLease(ctx, cl.Lease, id, env.Clock.Now()); err != nil {
			return "", fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		return id, nil
	}
}

// ClusterSnapshotWarnings (lines starting "warning: " are problems) says, for the agents of a Proxmox cluster, whether every one of
// them sees the snapshots the leader takes (a shared Proxmox storage), or whether each
// host would keep a history of its own (a per-host directory): then a new leader starts
// its own schedule, retention and drills, and only the off-host targets hold them all.
func ClusterSnapshotWarnings(ctx context.Context, env *Env) []string {
	cfg := env.Config
	if !cfg.Cluster.Enabled() {
		return nil
	}
	var out []string
	if id, err := env.clusterIdentity(); err != nil {
		out = append(out, "warning: "+err.Error())
	} else {
		out = append(out, fmt.Sprintf("cluster: this agent is %s of %d hosts; the one holding the Lease %s/%s leads", id, len(cfg.Cluster.Hosts), cfg.Chart.Namespace, cfg.Cluster.Lease))
	}
	offsite := ""
	if n := len(cfg.Snapshots.Targets); n > 0 {
		offsite = fmt.Sprintf("; the %d off-host target(s) receive every leader's snapshots, and recover --from reads them", n)
	}
	if id := cfg.Snapshots.ProxmoxStorage; id != "" {
		r, err := env.Resolver()
		var shared bool
		var typ string
		if err == nil {
			shared, typ, err = r.StorageShared(ctx, id)
		}
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("warning: cluster: whether storage %s is shared is unknown (%v)", id, err))
		case shared:
			out = append(out, fmt.Sprintf("cluster: snapshots on storage %s (%s, shared): whichever agent leads sees every snapshot", id, typ))
		default:
			out = append(out, fmt.Sprintf("warning: cluster: storage %s (%s) is not shared: each host would keep its own snapshot history, and a new leader starts its schedule, retention and drills from its own%s; use a shared storage (nfs, cifs, cephfs)", id, typ, offsite))
		}
		return out
	}
	return append(out, fmt.Sprintf("warning: cluster: snapshots.dir %s is a directory of this host: unless every host mounts the same share there, each keeps its own snapshot history and a new leader starts from its own%s; set snapshots.proxmox_storage to a shared storage", cfg.Snapshots.Dir, offsite))
}
