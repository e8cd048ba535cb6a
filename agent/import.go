package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// ImportResult is one file's import.
type ImportResult struct {
	File string `json:"file"`
	// Stored is the snapshot in the store (new, or the one imported before).
	Stored string `json:"stored,omitempty"`
	Index  uint64 `json:"raft_index,omitempty"`
	Again  bool   `json:"already_imported,omitempty"`
	Error  string `json:"error,omitempty"`
}

// ImportSnapshots copies snapshots saved by hand (`vault operator raft snapshot save`)
// into the store: each verified as a backup is (archive, checksums, Raft metadata),
// named by the file's modification time so it sorts among the agent's own, with a
// manifest marking it imported. An imported snapshot has no keyset yet: the first drill
// that opens it with the keyfile's shares pairs them, and only then do restore and
// recover take it. A file whose bytes are stored already is not stored twice; a bad
// file is reported and the others still imported. The originals are not touched.
func ImportSnapshots(ctx context.Context, env *Env, files []string) ([]ImportResult, error) {
	store, err := snapshotStore(ctx, env)
	if err != nil {
		return nil, err
	}
	unlock, err := store.Lock(ctx)
	if err != nil {
		return nil, storeError(store, err)
	}
	defer unlock()
	existing, err := store.List()
	if err != nil {
		return nil, err
	}
	stored := map[string]string{}
	for _, e := range existing {
		if e.Manifest != nil {
			stored[e.Manifest.SHA256] = e.Path
		}
	}
	var out []ImportResult
	failed := 0
	for _, f := range files {
		r := importOne(ctx, env, store, f, stored)
		if r.Error != "" {
			failed++
			env.Log.Warn("snapshot not imported", "file", f, "err", r.Error)
		} else if !r.Again {
			env.Log.Info("snapshot imported", "file", f, "stored", r.Stored, "raft_index", r.Index)
		}
		out = append(out, r)
	}
	if failed > 0 {
		return out, withHint(fmt.Errorf("%d of %d file(s) not imported", failed, len(files)), "a file that fails verification is not a whole Raft snapshot: take it again with `vault operator raft snapshot save`")
	}
	return out, nil
}

func importOne(ctx context.Context, env *Env, store *snapshot.Store, path string, stored map[string]string) ImportResult {
	r := ImportResult{File: path}
	f, err := os.Open(path)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer f.Close()
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	h := sha256.New()
	if err == nil {
		_, err = io.Copy(h, f)
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		r.Error = err.Error()
		return r
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if p, ok := stored[sum]; ok {
		r.Stored, r.Again = p, true
		return r
	}
	m := snapshot.Manifest{AgentVersion: env.Version, Source: "import",
		Imported: &snapshot.Import{From: filepath.Base(path), At: env.Clock.Now().UTC()}}
	e, err := store.Save(ctx, fi.ModTime(), m, func(w io.Writer) error {
		_, err := io.Copy(w, f)
		return err
	})
	if err != nil {
		r.Error = err.Error()
		return r
	}
	stored[sum] = e.Path
	r.Stored, r.Index = e.Path, e.Manifest.RaftIndex
	return r
}
