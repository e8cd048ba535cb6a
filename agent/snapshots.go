package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// The snapshot store's types, as the CLI prints them.
type (
	SnapshotEntry    = snapshot.Entry
	SnapshotDecision = snapshot.Decision
)

// ErrNoSnapshot means no usable snapshot was found or given.
var ErrNoSnapshot = errors.New("no usable snapshot")

// Snapshots lists the snapshot store, oldest first.
func Snapshots(ctx context.Context, env *Env) (*snapshot.Store, []snapshot.Entry, error) {
	store, err := snapshotStore(ctx, env)
	if err != nil {
		return nil, nil, err
	}
	es, err := store.List()
	return store, es, err
}

// VerifyResult is one snapshot's offline check.
type VerifyResult struct {
	Path  string        `json:"path"`
	Info  snapshot.Info `json:"info"`
	Error string        `json:"error,omitempty"`
}

// VerifySnapshots checks files offline: the ones given, or every stored snapshot.
func VerifySnapshots(ctx context.Context, env *Env, files []string) ([]VerifyResult, error) {
	if len(files) == 0 {
		_, es, err := Snapshots(ctx, env)
		if err != nil {
			return nil, err
		}
		for _, e := range es {
			files = append(files, e.Path)
		}
	}
	var out []VerifyResult
	bad := 0
	for _, f := range files {
		info, err := snapshot.CheckFile(f)
		r := VerifyResult{Path: f, Info: info}
		if err != nil {
			r.Error = err.Error()
			bad++
		}
		out = append(out, r)
	}
	if bad > 0 {
		return out, fmt.Errorf("%d of %d snapshot(s) failed verification", bad, len(files))
	}
	return out, nil
}

// PruneSnapshots applies the retention policy; with dryRun it only says what would go.
func PruneSnapshots(ctx context.Context, env *Env, dryRun bool) ([]snapshot.Decision, error) {
	store, err := snapshotStore(ctx, env)
	if err != nil {
		return nil, err
	}
	if !dryRun {
		unlock, err := store.Lock(ctx)
		if err != nil {
			return nil, storeError(store, err)
		}
		defer unlock()
	}
	return applyRetention(store, env, env.Clock.Now(), !dryRun)
}

// chooseSnapshot is the given file or the newest verified one, checked offline, with
// its manifest.
func chooseSnapshot(ctx context.Context, env *Env, file string) (string, *snapshot.Manifest, error) {
	file, err := snapshotOrLatest(ctx, env, file)
	if err != nil {
		return "", nil, err
	}
	if _, err := snapshot.CheckFile(file); err != nil {
		return "", nil, fmt.Errorf("%w: %v", ErrNoSnapshot, err)
	}
	m, err := readManifest(file)
	return file, m, err
}

// snapshotOrLatest is file, or the newest verified snapshot when file is "".
func snapshotOrLatest(ctx context.Context, env *Env, file string) (string, error) {
	if file != "" {
		return file, nil
	}
	store, es, err := Snapshots(ctx, env)
	if err != nil {
		return "", err
	}
	for i := len(es) - 1; i >= 0; i-- {
		if es[i].Verified && !es[i].Manifest.Unpaired() {
			return es[i].Path, nil
		}
	}
	return "", withHint(fmt.Errorf("%w in %s", ErrNoSnapshot, store.Dir), "give one with --snapshot FILE")
}

// checkKeyset refuses a snapshot the keyfile's shares are not known to open.
// An imported snapshot it takes may predate the agent's tokens: that is said up front.
func checkKeyset(env *Env, path string, m *snapshot.Manifest, kf *vault.Keyfile) error {
	if m.Unpaired() {
		return withHint(fmt.Errorf("%w: %s was imported (from %s) and no drill has opened it with this keyfile yet", ErrUnknownKeyset, path, m.Imported.From),
			"run `pve-vault-agent drill --snapshot %s` first: when the keyfile's shares open it, the drill pairs it with their keyset", path)
	}
	if fp := kf.Keyset.Fingerprint(); fp != m.KeysetFingerprint {
		return withHint(fmt.Errorf("%w: snapshot %s was taken under keyset %s, the keyfile holds %s", ErrUnknownKeyset, path, m.KeysetFingerprint, fp),
			"use a snapshot of this keyset, or the keyfile it belongs to (the offline recovery copy)")
	}
	if m.Imported != nil {
		env.Log.Warn("an imported snapshot may predate the agent's policies and tokens: Vault will be restored and unsealed; give --auth-token-file with a token valid in that snapshot (the root token of that time) so the tokens step can mint the agent's, or run `pve-vault-agent token rotate --auth-token-file F` after",
			"snapshot", path, "imported_from", m.Imported.From)
	}
	return nil
}

// readManifest reads the manifest the agent needs to know a snapshot's keys.
func readManifest(file string) (*snapshot.Manifest, error) {
	m, err := snapshot.ReadManifest(file)
	if err != nil {
		return nil, withHint(fmt.Errorf("%w: %s has no readable manifest (%v)", ErrNoSnapshot, file, err), "the agent cannot tell which keys it needs; use a snapshot taken by backup-now")
	}
	return m, nil
}
