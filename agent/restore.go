package agent

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

// RestoreOptions tune restore.
type RestoreOptions struct {
	// Force restores a snapshot of another cluster (snapshot-force); the keyfile must
	// hold that snapshot's keys.
	Force bool
}

// RestoreReport says what restore did.
type RestoreReport struct {
	Snapshot string `json:"snapshot"`
	Pod      string `json:"pod"`
	Forced   bool   `json:"forced"`
}

// Restore writes a snapshot into the running cluster: the file is verified and its
// keyset matched against the keyfile before Vault is touched; a root token is generated
// from the keys for the upload and revoked after; a snapshot of another cluster needs
// Force. Vault is unsealed again if the restore sealed it.
func Restore(ctx context.Context, cfg *configs.Config, file string, opts RestoreOptions, log *slog.Logger) (*RestoreReport, error) {
	log = log.With("component", "restore")
	path, m, err := chooseSnapshot(ctx, cfg, file, log)
	if err != nil {
		return nil, err
	}
	kf, err := readKeyfile(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if fp := kf.Keyset.Fingerprint(); fp != m.KeysetFingerprint {
		return nil, fmt.Errorf("%w: snapshot keyset %s, keyfile keyset %s", ErrUnknownKeyset, m.KeysetFingerprint, fp)
	}
	acc, err := newPodAccess(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	defer acc.Close()
	active, h, err := findActive(ctx, acc.Pods)
	if err != nil {
		return nil, err
	}
	other := m.ClusterID != "" && h.ClusterID != "" && m.ClusterID != h.ClusterID
	if other && !opts.Force {
		return nil, fmt.Errorf("snapshot %s is of cluster %s, the running cluster is %s: a restore across clusters needs --force", path, m.ClusterID, h.ClusterID)
	}
	root, err := active.API.GenerateRoot(ctx, kf.Keyset)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	err = active.API.RestoreSnapshot(ctx, root, f, other)
	_ = active.API.RevokeSelf(ctx, root) // gone with the old data after a restore; revoke in case it is not
	if err != nil {
		return nil, err
	}
	log.Info("snapshot restored", "file", path, "pod", active.Name, "forced", other)
	// A forced restore seals Vault a moment later; a normal one leaves it open.
	if err := unsealAfterRestore(ctx, active, kf, log); err != nil {
		return nil, err
	}
	if _, err := waitActive(ctx, active.API, time.Minute); err != nil {
		return nil, err
	}
	return &RestoreReport{Snapshot: path, Pod: active.Name, Forced: other}, nil
}
