package agent

import (
	"context"
	"errors"
	"fmt"

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
	if e, ok := newestVerified(es); ok {
		return e.Path, nil
	}
	return "", withHint(fmt.Errorf("%w in %s", ErrNoSnapshot, store.Dir), "give one with --snapshot FILE")
}

// readManifest reads the manifest the agent needs to know a snapshot's keys.
func readManifest(file string) (*snapshot.Manifest, error) {
	m, err := snapshot.ReadManifest(file)
	if err != nil {
		return nil, withHint(fmt.Errorf("%w: %s has no readable manifest (%v)", ErrNoSnapshot, file, err), "the agent cannot tell which keys it needs; use a snapshot taken by backup-now")
	}
	return m, nil
}
