package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// Refusals of recover and restore, made before anything changes.
var (
	ErrUnknownKeyset = errors.New("the keyfile does not hold this snapshot's keys")
	ErrNoSnapshot    = errors.New("no usable snapshot")
)

// RecoverOptions choose the snapshot and what to do.
type RecoverOptions struct {
	// Snapshot is a file; empty means the newest verified one in the store.
	Snapshot string
	// DryRun checks the snapshot and keys and returns the plan; changes nothing.
	DryRun bool
}

// RecoverStep is one named step and what it found or did.
type RecoverStep struct {
	Name     string        `json:"name"`
	Result   string        `json:"result"`
	Duration time.Duration `json:"-"`
	Seconds  float64       `json:"seconds"`
}

// RecoverReport is the plan and the steps taken.
type RecoverReport struct {
	Snapshot string             `json:"snapshot"`
	Manifest *snapshot.Manifest `json:"manifest"`
	Plan     []string           `json:"plan"`
	Steps    []RecoverStep      `json:"steps"`
}

// RecoverPlan is the fixed order of recover's steps.
var RecoverPlan = []string{
	"check the snapshot and that the keyfile holds its keys",
	"provision the hostPath on every node",
	"install the chart and wait for the pods",
	"open the first pod (a throwaway init when its data is gone)",
	"restore the snapshot (snapshot-force)",
	"unseal with the snapshot's keys",
	"join and unseal the other pods, remove stale Raft peers",
	"verify every pod is unsealed and one is active",
}

// Recover brings Vault back after a node rebuild. Every step checks state first, so a
// re-run after a failure or a kill continues where it stopped: a throwaway cluster's
// keys are sealed next to the keyfile (".recover-throwaway") until the restore is done.
// A snapshot whose keys the keyfile does not hold is refused before anything changes.
func Recover(ctx context.Context, cfg *configs.Config, opts RecoverOptions, log *slog.Logger) (*RecoverReport, error) {
	log = log.With("component", "recover")
	rep := &RecoverReport{Plan: RecoverPlan}
	s, err := sealer(cfg)
	if err != nil {
		return rep, err
	}
	step := func(name string, f func() (string, error)) error {
		t0 := time.Now()
		log.Info("recover step started", "step", name)
		res, err := f()
		d := time.Since(t0)
		rep.Steps = append(rep.Steps, RecoverStep{Name: name, Result: res, Duration: d, Seconds: d.Seconds()})
		if err != nil {
			return fmt.Errorf("recover step %q: %w", name, err)
		}
		log.Info("recover step done", "step", name, "result", res, "took", d.Round(time.Millisecond))
		return nil
	}

	var kf *vault.Keyfile
	if err := step("check", func() (string, error) {
		path, m, err := chooseSnapshot(ctx, cfg, opts.Snapshot, log)
		if err != nil {
			return "", err
		}
		rep.Snapshot, rep.Manifest = path, m
		if kf, err = vault.ReadKeyfile(ctx, cfg.Vault.Keyfile, s); err != nil {
			return "", fmt.Errorf("keyfile: %w", err)
		}
		if fp := kf.Keyset.Fingerprint(); fp != m.KeysetFingerprint {
			return "", fmt.Errorf("%w: snapshot %s was taken under keyset %s, the keyfile holds %s; use a snapshot of this keyset or the keyfile it belongs to (the offline recovery copy)", ErrUnknownKeyset, path, m.KeysetFingerprint, fp)
		}
		return fmt.Sprintf("%s (raft index %d, keyset %s)", path, m.RaftIndex, m.KeysetFingerprint), nil
	}); err != nil || opts.DryRun {
		return rep, err
	}
	if err := step("provision", func() (string, error) {
		res, err := Provision(ctx, cfg, ProvisionOptions{}, log)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d node(s) ready", len(res)), nil
	}); err != nil {
		return rep, err
	}
	if err := step("install", func() (string, error) {
		r, err := Install(ctx, cfg, InstallOptions{}, log)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("release %s revision %d, %d pod(s) running", r.Action, r.Revision, len(r.Pods)), nil
	}); err != nil {
		return rep, err
	}
	acc, err := newPodAccess(ctx, cfg, log)
	if err != nil {
		return rep, err
	}
	defer acc.Close()
	pods, err := acc.Pods(ctx)
	if err != nil {
		return rep, err
	}
	if len(pods) == 0 {
		return rep, errors.New("no running vault pod after install")
	}
	first := pods[0]
	throwawayPath := cfg.Vault.Keyfile + ".recover-throwaway"
	var throwaway *vault.Keyfile
	restored := false
	if err := step("open", func() (string, error) {
		if alive, who := clusterAlive(ctx, pods, kf, log); alive {
			restored = true
			return "the cluster opens with the keyfile (" + who + "): no restore needed", nil
		}
		if vault.KeyfileExists(throwawayPath) {
			if throwaway, err = vault.ReadKeyfile(ctx, throwawayPath, s); err != nil {
				return "", fmt.Errorf("throwaway keys of an interrupted recover: %w", err)
			}
			if _, err := first.API.Unseal(ctx, throwaway.Keyset, log); err != nil {
				if !errors.Is(err, vault.ErrWrongKeys) {
					return "", err
				}
				// The restore went through before the interruption: the data, and so the
				// keyring, are the snapshot's now.
				if err := unsealAfterRestore(ctx, first, kf, log); err != nil {
					return "", err
				}
				restored = true
				_ = os.Remove(throwawayPath)
				return "the interrupted recover had restored the snapshot already", nil
			}
			if _, err := waitActive(ctx, first.API, 60*time.Second); err != nil {
				return "", err
			}
			return "resumed the throwaway cluster of an interrupted recover", nil
		}
		st, err := first.API.SealStatus(ctx)
		if err != nil {
			return "", err
		}
		if st.Initialized {
			return "", fmt.Errorf("%s is initialised but opens neither with the keyfile nor with throwaway keys: it is not this cluster; recover will not overwrite it", first.Name)
		}
		// The same shares/threshold as the keyfile: after snapshot-force Vault keeps the
		// running seal configuration until it restarts, so the snapshot's keys must fit it.
		res, err := first.API.Init(ctx, len(kf.Keyset.Keys), kf.Keyset.Threshold)
		if err != nil {
			return "", err
		}
		throwaway = &vault.Keyfile{Keyset: res.Keyset, Created: time.Now().UTC()}
		if err := vault.WriteKeyfile(ctx, throwawayPath, throwaway, s, true); err != nil {
			return "", fmt.Errorf("store the throwaway keys: %w", err)
		}
		if _, err := first.API.Unseal(ctx, throwaway.Keyset, log); err != nil {
			return "", err
		}
		if _, err := waitActive(ctx, first.API, 60*time.Second); err != nil {
			return "", err
		}
		_ = first.API.RevokeSelf(ctx, res.RootToken)
		return "initialised a throwaway cluster on " + first.Name, nil
	}); err != nil {
		return rep, err
	}
	if err := step("restore", func() (string, error) {
		if restored {
			return "skipped: already restored", nil
		}
		root, err := first.API.GenerateRoot(ctx, throwaway.Keyset)
		if err != nil {
			return "", err
		}
		f, err := os.Open(rep.Snapshot)
		if err != nil {
			return "", err
		}
		defer f.Close()
		if err := first.API.RestoreSnapshot(ctx, root, f, true); err != nil {
			return "", err
		}
		return fmt.Sprintf("restored %s into %s", rep.Snapshot, first.Name), nil
	}); err != nil {
		return rep, err
	}
	if err := step("unseal", func() (string, error) {
		if restored {
			return "skipped: already open", nil
		}
		if err := unsealAfterRestore(ctx, first, kf, log); err != nil {
			return "", err
		}
		if _, err := waitActive(ctx, first.API, 60*time.Second); err != nil {
			return "", err
		}
		if err := os.Remove(throwawayPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
		return first.Name + " unsealed with the snapshot's keys", nil
	}); err != nil {
		return rep, err
	}
	if err := step("followers", func() (string, error) {
		return joinFollowers(ctx, pods, kf, log)
	}); err != nil {
		return rep, err
	}
	err = step("verify", func() (string, error) {
		if _, _, err := findActive(ctx, acc.Pods); err != nil {
			return "", err
		}
		for _, p := range pods {
			st, err := p.API.SealStatus(ctx)
			if err != nil || st.Sealed {
				return "", fmt.Errorf("%s still sealed (%v)", p.Name, err)
			}
		}
		return fmt.Sprintf("%d pod(s) unsealed, one active", len(pods)), nil
	})
	return rep, err
}

// chooseSnapshot is the given file or the newest verified one, checked offline, with
// its manifest.
func chooseSnapshot(ctx context.Context, cfg *configs.Config, file string, log *slog.Logger) (string, *snapshot.Manifest, error) {
	if file == "" {
		_, es, err := Snapshots(ctx, cfg, log)
		if err != nil {
			return "", nil, err
		}
		for i := len(es) - 1; i >= 0; i-- {
			if es[i].Verified {
				file = es[i].Path
				break
			}
		}
		if file == "" {
			return "", nil, fmt.Errorf("%w in %s: give one with --snapshot", ErrNoSnapshot, cfg.Snapshots.Dir)
		}
	}
	if _, err := snapshot.CheckFile(file); err != nil {
		return "", nil, fmt.Errorf("%w: %v", ErrNoSnapshot, err)
	}
	m, err := snapshot.ReadManifest(file)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %s has no readable manifest (%v): the agent cannot tell which keys it needs", ErrNoSnapshot, file, err)
	}
	return file, m, nil
}

// clusterAlive reports whether some pod opens with the keyfile (unsealed already, or
// unsealed now): then the cluster's data exists and no restore is needed.
func clusterAlive(ctx context.Context, pods []vaultPod, kf *vault.Keyfile, log *slog.Logger) (bool, string) {
	for _, p := range pods {
		st, err := p.API.SealStatus(ctx)
		if err != nil || !st.Initialized {
			continue
		}
		if st.Sealed {
			if res, err := p.API.Unseal(ctx, kf.Keyset, log); err == nil && !res.Sealed {
				return true, p.Name
			}
			continue
		}
		// Unsealed: it is ours if our keys can generate a root token on it.
		if root, err := p.API.GenerateRoot(ctx, kf.Keyset); err == nil {
			_ = p.API.RevokeSelf(ctx, root)
			return true, p.Name
		}
	}
	return false, ""
}

// unsealAfterRestore waits for the seal that follows snapshot-force and unseals.
func unsealAfterRestore(ctx context.Context, p vaultPod, kf *vault.Keyfile, log *slog.Logger) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		res, err := p.API.Unseal(ctx, kf.Keyset, log)
		if err == nil && !res.Sealed {
			if res.WasSealed {
				return nil
			}
			// Open already: by the daemon with the snapshot's keys (done), or still with
			// the throwaway keyring because the restore has not sealed it yet (wait).
			if root, gerr := p.API.GenerateRoot(ctx, kf.Keyset); gerr == nil {
				_ = p.API.RevokeSelf(ctx, root)
				return nil
			}
		}
		// Right after a restore Vault may still report the throwaway cluster's seal
		// configuration (one share): keep trying until the restored one shows.
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not seal and reopen with the snapshot's keys within 60s (last: %v)", p.Name, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// joinFollowers unseals the other pods (they join through retry_join) and removes Raft
// peers that no running pod answers for.
func joinFollowers(ctx context.Context, pods []vaultPod, kf *vault.Keyfile, log *slog.Logger) (string, error) {
	if len(pods) == 1 {
		return "single node: nothing to join", nil
	}
	// Every pod that is not open yet joins (the rebuilt one among them when the rest of
	// the cluster survived).
	for _, p := range pods {
		if st, err := p.API.SealStatus(ctx); err == nil && st.Initialized && !st.Sealed {
			continue
		}
		if err := unsealFollower(ctx, p, kf.Keyset, log); err != nil {
			return "", err
		}
	}
	leader, _, err := findActive(ctx, func(context.Context) ([]vaultPod, error) { return pods, nil })
	if err != nil {
		return "", err
	}
	root, err := leader.API.GenerateRoot(ctx, kf.Keyset)
	if err != nil {
		return "", err
	}
	defer leader.API.RevokeSelf(ctx, root)
	peers, err := leader.API.RaftPeers(ctx, root)
	if err != nil {
		return "", err
	}
	live := map[string]bool{}
	for _, p := range pods {
		live[p.Name] = true
	}
	removed := 0
	for _, peer := range peers {
		if !live[peer.NodeID] {
			if err := leader.API.RemovePeer(ctx, root, peer.NodeID); err != nil {
				return "", err
			}
			log.Info("removed a stale raft peer", "node_id", peer.NodeID, "address", peer.Address)
			removed++
		}
	}
	return fmt.Sprintf("%d follower(s) unsealed, %d stale peer(s) removed", len(pods)-1, removed), nil
}
