package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// ErrNoActive means no Vault pod was active (all sealed, standby-only or unreachable).
var ErrNoActive = errors.New("no active vault node")

// BackupOptions tune one backup.
type BackupOptions struct {
	// Progress, when set, receives the stream (a terminal progress line).
	Progress func(w io.Writer) io.Writer
	Now      func() time.Time
	Version  string
}

// BackupReport is what a backup stored and pruned.
type BackupReport struct {
	Snapshot snapshot.Entry      `json:"snapshot"`
	Pod      string              `json:"pod"`
	Duration time.Duration       `json:"-"`
	Seconds  float64             `json:"seconds"`
	Pruned   []snapshot.Decision `json:"pruned,omitempty"`
}

// BackupNow takes a Raft snapshot and stores it: lock the target directory → check free
// space → find the active node (a standby never yields a snapshot) → stream it with the
// snapshot token into a temp file while verifying the same bytes → fsync, manifest,
// rename, fsync the directory → only then apply retention. A failure leaves no partial
// file and no retention change.
func BackupNow(ctx context.Context, cfg *configs.Config, opts BackupOptions, log *slog.Logger) (*BackupReport, error) {
	log = log.With("component", "backup")
	if opts.Now == nil {
		opts.Now = time.Now
	}
	store, err := snapshotStore(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	unlock, err := store.Lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := store.CheckSpace(); err != nil {
		return nil, err
	}
	kf, err := readKeyfile(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if kf.SnapshotToken.Empty() {
		return nil, errors.New("the keyfile holds no snapshot token (init did not finish): run `pve-vault-agent init` on a fresh cluster, or see the recovery runbook")
	}
	acc, err := newPodAccess(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	defer acc.Close()
	active, health, err := findActive(ctx, acc.Pods)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	sctx, cancel := context.WithTimeout(ctx, cfg.Snapshots.Timeout)
	defer cancel()
	m := snapshot.Manifest{VaultVersion: health.Version, ClusterID: health.ClusterID, KeysetFingerprint: kf.Keyset.Fingerprint(),
		AgentVersion: opts.Version, Source: active.Name}
	entry, err := store.Save(sctx, opts.Now(), m, func(w io.Writer) error {
		if opts.Progress != nil {
			w = opts.Progress(w)
		}
		_, err := active.API.StreamSnapshot(sctx, kf.SnapshotToken, w)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("backup from %s: %w", active.Name, err)
	}
	rep := &BackupReport{Snapshot: entry, Pod: active.Name, Duration: time.Since(t0)}
	rep.Seconds = rep.Duration.Seconds()
	log.Info("snapshot stored", "file", entry.Path, "bytes", entry.Size, "raft_index", entry.Manifest.RaftIndex, "from", active.Name, "took", rep.Duration.Round(time.Millisecond))
	pruned, err := applyRetention(store, cfg, opts.Now(), false)
	rep.Pruned = pruned
	if err != nil {
		return rep, fmt.Errorf("retention: %w", err)
	}
	return rep, nil
}

// findActive returns the pod that answers sys/health as active. While unsealed pods are
// all standby (a leader election after a restart), it waits up to 30s for one to lead.
func findActive(ctx context.Context, list func(context.Context) ([]vaultPod, error)) (vaultPod, vault.Health, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		p, h, states, electing, err := activeOnce(ctx, list)
		if err != nil || p.API != nil {
			return p, h, err
		}
		if !electing || time.Now().After(deadline) {
			return vaultPod{}, vault.Health{}, fmt.Errorf("%w: %v; unseal Vault first (pve-vault-agent unseal)", ErrNoActive, states)
		}
		select {
		case <-ctx.Done():
			return vaultPod{}, vault.Health{}, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func activeOnce(ctx context.Context, list func(context.Context) ([]vaultPod, error)) (vaultPod, vault.Health, []string, bool, error) {
	pods, err := list(ctx)
	if err != nil {
		return vaultPod{}, vault.Health{}, nil, false, err
	}
	var states []string
	electing := false
	for _, p := range pods {
		h, err := p.API.Health(ctx)
		switch {
		case err != nil:
			states = append(states, p.Name+" unreachable")
		case h.Active:
			return p, h, nil, false, nil
		case h.Sealed:
			states = append(states, p.Name+" sealed")
		case !h.Initialized:
			states = append(states, p.Name+" uninitialised")
		default:
			states = append(states, p.Name+" standby")
			electing = true
		}
	}
	return vaultPod{}, vault.Health{}, states, electing, nil
}

// snapshotStore is snapshots.dir, or the path of snapshots.proxmox_storage.
func snapshotStore(ctx context.Context, cfg *configs.Config, log *slog.Logger) (*snapshot.Store, error) {
	if cfg.Snapshots.ProxmoxStorage == "" {
		return &snapshot.Store{Dir: cfg.Snapshots.Dir}, nil
	}
	r, err := newResolverAlways(cfg, log)
	if err != nil {
		return nil, err
	}
	node, err := r.LocalNode(ctx)
	if err != nil {
		return nil, err
	}
	dir, avail, err := r.StoragePath(ctx, node, cfg.Snapshots.ProxmoxStorage)
	if err != nil {
		return nil, err
	}
	log.Debug("snapshot storage resolved", "storage", cfg.Snapshots.ProxmoxStorage, "dir", dir, "avail_bytes", avail)
	return &snapshot.Store{Dir: dir}, nil
}

// applyRetention plans retention over the directory and removes what it drops (unless
// dryRun). It returns the dropped decisions.
func applyRetention(store *snapshot.Store, cfg *configs.Config, now time.Time, dryRun bool) ([]snapshot.Decision, error) {
	entries, err := store.List()
	if err != nil {
		return nil, err
	}
	r := cfg.Snapshots.Retention
	var dropped []snapshot.Decision
	for _, d := range snapshot.Plan(now, entries, snapshot.Policy{KeepLast: r.KeepLast, Hourly: r.Hourly, Daily: r.Daily, Weekly: r.Weekly, Monthly: r.Monthly}) {
		if d.Keep {
			continue
		}
		if !dryRun {
			if err := store.Remove(d.Entry); err != nil {
				return dropped, err
			}
		}
		dropped = append(dropped, d)
	}
	return dropped, nil
}

// SnapshotPlan is the retention plan over the snapshot store, for `snapshots prune`.
func SnapshotPlan(ctx context.Context, cfg *configs.Config, now time.Time, dryRun bool, log *slog.Logger) ([]snapshot.Decision, error) {
	store, err := snapshotStore(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	if !dryRun {
		unlock, err := store.Lock(ctx)
		if err != nil {
			return nil, err
		}
		defer unlock()
	}
	return applyRetention(store, cfg, now, dryRun)
}

// Snapshots lists the snapshot store.
func Snapshots(ctx context.Context, cfg *configs.Config, log *slog.Logger) (*snapshot.Store, []snapshot.Entry, error) {
	store, err := snapshotStore(ctx, cfg, log)
	if err != nil {
		return nil, nil, err
	}
	es, err := store.List()
	return store, es, err
}
