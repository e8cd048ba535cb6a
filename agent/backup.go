package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// ErrNoActive means no Vault pod was active (all sealed, standby-only or unreachable).
var ErrNoActive = errors.New("no active vault node")

// BackupOptions tune one backup.
type BackupOptions struct {
	// Progress, when set, receives the stream (a terminal progress line).
	Progress func(w io.Writer) io.Writer
	// pods lists the pods to back up from; nil lists them from Kubernetes. The daemon
	// hands its last discovery, so a hung API server does not stop its backups.
	pods podLister
	// fence, in a cluster of agents, proves the agent still leads right before the
	// snapshot is committed, and names the holder recorded in its manifest.
	fence fence
}

// podLister lists the Vault pods with their clients.
type podLister func(context.Context) ([]vaultPod, error)

// BackupReport is what a backup stored and pruned.
type BackupReport struct {
	Snapshot snapshot.Entry      `json:"snapshot"`
	Pod      string              `json:"pod"`
	Duration time.Duration       `json:"-"`
	Seconds  float64             `json:"seconds"`
	Pruned   []snapshot.Decision `json:"pruned,omitempty"`
	Token    *TokenStatus        `json:"snapshot_token,omitempty"`
	Offsite  []TargetResult      `json:"offsite,omitempty"`
	Steps    []StepResult        `json:"steps"`
}

type backupState struct {
	env    *Env
	opts   BackupOptions
	store  *snapshot.Store
	unlock func()
	kf     *vault.Keyfile
	active vaultPod
	health vault.Health
	rep    *BackupReport
}

var backupSteps = []step[backupState]{
	{"lock", "take the snapshot directory's lock (one backup at a time)", (*backupState).lock},
	{"space", "check free space", (*backupState).space},
	{"active", "find the active Vault node (a standby never yields a snapshot)", (*backupState).findActive},
	{"token", "renew the snapshot token before use (Vault never renews a token because it was used)", (*backupState).renew},
	{"stream", "stream the snapshot into a temp file while verifying it; fsync, manifest, rename", (*backupState).stream},
	{"retention", "apply retention (only after a verified save)", (*backupState).retention},
	{"offsite", "push to each off-host target what it lacks, encrypted and authenticated (a failure here never fails the backup)", (*backupState).offsite},
}

// BackupNow takes a Raft snapshot and stores it. A failure leaves no partial file and no
// retention change.
func BackupNow(ctx context.Context, env *Env, opts BackupOptions) (*BackupReport, error) {
	s := &backupState{env: env, opts: opts, rep: &BackupReport{}}
	defer func() {
		if s.unlock != nil {
			s.unlock()
		}
	}()
	t0 := env.Clock.Now()
	err := runSteps(ctx, env, "backup", backupSteps, s, &s.rep.Steps)
	s.rep.Duration = env.Clock.Now().Sub(t0)
	s.rep.Seconds = s.rep.Duration.Seconds()
	if s.rep.Snapshot.Path == "" {
		return nil, err
	}
	return s.rep, err
}

func (s *backupState) lock(ctx context.Context) (string, error) {
	store, err := snapshotStore(ctx, s.env)
	if err != nil {
		return "", err
	}
	s.store = store
	if s.unlock, err = store.Lock(ctx); err != nil {
		return "", storeError(store, err)
	}
	return store.Dir, nil
}

func (s *backupState) space(context.Context) (string, error) {
	return "", storeError(s.store, s.store.CheckSpace())
}

func (s *backupState) findActive(ctx context.Context) (string, error) {
	kf, err := s.env.Keyfile.Read(ctx)
	if err != nil {
		return "", err
	}
	if kf.SnapshotToken.Empty() {
		return "", hintf("run `pve-vault-agent token rotate` to mint the agent's tokens", "the keyfile holds no snapshot token")
	}
	s.kf = kf
	if s.active, s.health, err = findActiveIn(ctx, s.env, s.opts.pods); err != nil {
		return "", err
	}
	return s.active.Name, nil
}

func (s *backupState) renew(ctx context.Context) (string, error) {
	st := renewToken(ctx, s.env, s.active.API, "snapshot", s.kf.SnapshotToken)
	s.rep.Token = &st
	if st.Error != "" {
		return "", tokenRefusedError("snapshot", st)
	}
	return fmt.Sprintf("valid for %s", st.TTL.Round(time.Second)), nil
}

func (s *backupState) stream(ctx context.Context) (string, error) {
	env, kf, active := s.env, s.kf, s.active
	m := snapshot.Manifest{VaultVersion: s.health.Version, ClusterID: s.health.ClusterID, KeysetFingerprint: kf.Keyset.Fingerprint(),
		AgentVersion: env.Version, Source: active.Name}
	if s.opts.fence != nil {
		s.store.BeforeCommit = func(ctx context.Context, m *snapshot.Manifest) error {
			holder, err := s.opts.fence(ctx)
			m.LeaseHolder = holder
			return err
		}
	}
	entry, err := s.store.Save(ctx, env.Clock.Now(), m, func(w io.Writer) error {
		if s.opts.Progress != nil {
			w = s.opts.Progress(w)
		}
		_, err := active.API.StreamSnapshot(ctx, kf.SnapshotToken, env.Config.Snapshots.IdleTimeout, w)
		return err
	})
	if err != nil {
		return "", storeError(s.store, fmt.Errorf("backup from %s: %w", active.Name, err))
	}
	s.rep.Snapshot, s.rep.Pod = entry, active.Name
	env.Log.Info("snapshot stored", "file", entry.Path, "bytes", entry.Size, "raft_index", entry.Manifest.RaftIndex, "from", active.Name)
	return fmt.Sprintf("%s (%d bytes, raft index %d)", entry.Path, entry.Size, entry.Manifest.RaftIndex), nil
}

func (s *backupState) retention(context.Context) (string, error) {
	pruned, err := applyRetention(s.store, s.env, s.env.Clock.Now(), true)
	s.rep.Pruned = pruned
	if err != nil {
		return "", fmt.Errorf("the snapshot is stored; retention failed: %w", err)
	}
	return fmt.Sprintf("%d pruned", len(pruned)), nil
}

func (s *backupState) offsite(ctx context.Context) (string, error) {
	if len(s.env.Config.Snapshots.Targets) == 0 {
		return "no targets", nil
	}
	s.rep.Offsite = PushOffsite(ctx, s.env, s.kf, s.store)
	failed := 0
	for _, r := range s.rep.Offsite {
		if r.Error != "" {
			failed++
		}
	}
	return fmt.Sprintf("%d of %d targets up to date", len(s.rep.Offsite)-failed, len(s.rep.Offsite)), nil
}

// storeError explains a read-only snapshot directory: under the shipped unit
// (ProtectSystem=strict) only /var/lib/pve-vault-agent is writable.
func storeError(store *snapshot.Store, err error) error {
	if errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		return withHint(err, "the service may write only where its unit allows: add a drop-in with `systemctl edit pve-vault-agent` (and pve-vault-agent-backup): [Service] ReadWritePaths=%s; `pve-vault-agent config check` lists what the unit can write", store.Dir)
	}
	return err
}

// findActive returns the pod that answers sys/health as active. While unsealed pods are
// all standby (a leader election after a restart), it waits for one to lead.
func findActive(ctx context.Context, env *Env) (vaultPod, vault.Health, error) {
	return findActiveIn(ctx, env, nil)
}

// findActiveIn is findActive over the pods list gives (nil: from Kubernetes).
func findActiveIn(ctx context.Context, env *Env, list podLister) (vaultPod, vault.Health, error) {
	if list == nil {
		list = env.openPods
	}
	var p vaultPod
	var h vault.Health
	var states []string
	err := poll(ctx, env.Clock, env.Waits.Poll, env.Waits.Election, "an active vault node", func(ctx context.Context) error {
		var electing bool
		var err error
		p, h, states, electing, err = activeOnceStates(ctx, list)
		switch {
		case err != nil:
			return err
		case p.API != nil:
			return nil
		case !electing:
			return permanent(withHint(fmt.Errorf("%w: %v", ErrNoActive, states), "unseal Vault first (pve-vault-agent unseal, or start the daemon)"))
		}
		return fmt.Errorf("%w yet: %v", ErrNoActive, states)
	})
	return p, h, err
}

// activeOnce looks for the active pod once.
func activeOnce(ctx context.Context, env *Env) (vaultPod, vault.Health, error) {
	p, h, _, _, err := activeOnceStates(ctx, env.openPods)
	return p, h, err
}

func activeOnceStates(ctx context.Context, list podLister) (vaultPod, vault.Health, []string, bool, error) {
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
		case h.Removed:
			states = append(states, p.Name+" removed from the cluster (530)")
		case h.Sealed:
			states = append(states, p.Name+" sealed")
		case !h.Initialized:
			states = append(states, p.Name+" uninitialised")
		case h.HAUnhealthy:
			states = append(states, p.Name+" standby that cannot reach the active node (474)")
			electing = true
		default:
			states = append(states, p.Name+" standby")
			electing = true
		}
	}
	return vaultPod{}, vault.Health{}, states, electing, nil
}

// snapshotStore is snapshots.dir, or the path of snapshots.proxmox_storage.
func snapshotStore(ctx context.Context, env *Env) (*snapshot.Store, error) {
	if env.Config.Snapshots.ProxmoxStorage == "" {
		return &snapshot.Store{Dir: env.Config.Snapshots.Dir}, nil
	}
	r, err := env.Resolver()
	if err != nil {
		return nil, err
	}
	node, err := r.LocalNode(ctx)
	if err != nil {
		return nil, err
	}
	dir, avail, err := r.StoragePath(ctx, node, env.Config.Snapshots.ProxmoxStorage)
	if err != nil {
		return nil, err
	}
	env.Log.Debug("snapshot storage resolved", "storage", env.Config.Snapshots.ProxmoxStorage, "dir", dir, "avail_bytes", avail)
	return &snapshot.Store{Dir: dir}, nil
}

// SnapshotDir is the directory snapshots go to: snapshots.dir, or the path of
// snapshots.proxmox_storage as the Proxmox API reports it.
func SnapshotDir(ctx context.Context, env *Env) (string, error) {
	s, err := snapshotStore(ctx, env)
	if err != nil {
		return "", err
	}
	return s.Dir, nil
}

// applyRetention plans retention over the directory and, when remove is set, deletes
// what it drops. It returns the dropped decisions.
func applyRetention(store *snapshot.Store, env *Env, now time.Time, remove bool) ([]snapshot.Decision, error) {
	entries, err := store.List()
	if err != nil {
		return nil, err
	}
	r := env.Config.Snapshots.Retention
	var dropped []snapshot.Decision
	for _, d := range snapshot.Plan(now, entries, snapshot.Policy{KeepLast: r.KeepLast, Hourly: r.Hourly, Daily: r.Daily, Weekly: r.Weekly, Monthly: r.Monthly}) {
		if d.Keep {
			continue
		}
		if remove {
			if err := store.Remove(d.Entry); err != nil {
				return dropped, err
			}
		}
		dropped = append(dropped, d)
	}
	return dropped, nil
}
