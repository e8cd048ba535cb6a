package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// Refusals of init; each message says what to do instead.
var (
	ErrInitKeyfileExists = errors.New("refusing to initialise: a keyfile exists")
	ErrInitInitialised   = errors.New("refusing to initialise: vault is already initialised")
	ErrDataGone          = errors.New("vault is uninitialised but the agent holds its keyfile")
)

// InitOptions tune init.
type InitOptions struct {
	// RecoveryRecipient (age1…) gets an offline copy of the keyfile; overrides the config.
	RecoveryRecipient string
}

// InitReport is the non-secret outcome of init.
type InitReport struct {
	Pod          string     `json:"pod"`
	Keyfile      string     `json:"keyfile"`
	RecoveryCopy string     `json:"recovery_copy,omitempty"`
	Meta         vault.Meta `json:"keyfile_meta"`
	Unsealed     []string   `json:"unsealed"`
}

// Init initialises Vault once: only when no keyfile exists and every pod reports
// uninitialised. Steps: check the keyfile can be written (before any key exists) → init
// the first pod → seal the keys into the keyfile at once → optional offline recovery
// copy → unseal → create the least-privilege snapshot token → record cluster id and token
// in the keyfile → revoke the root token → unseal the other pods. Keys and tokens never
// reach logs or output.
func Init(ctx context.Context, cfg *configs.Config, opts InitOptions, log *slog.Logger) (*InitReport, error) {
	log = log.With("component", "init")
	path := cfg.Vault.Keyfile
	if vault.KeyfileExists(path) {
		return nil, fmt.Errorf("%w at %s: this cluster was initialised by the agent before; use `pve-vault-agent unseal`. If Vault now reports uninitialised, its data is gone: use `pve-vault-agent recover`", ErrInitKeyfileExists, path)
	}
	s, err := sealer(cfg)
	if err != nil {
		return nil, err
	}
	recipient := opts.RecoveryRecipient
	if recipient == "" {
		recipient = cfg.Vault.RecoveryRecipient
	}
	var recovery vault.Sealer
	if recipient != "" {
		if recovery, err = recoverySealer(recipient); err != nil {
			return nil, err
		}
	}
	if err := probeSealer(ctx, path, s); err != nil {
		return nil, fmt.Errorf("the keyfile could not be written, so Vault was not initialised: %w", err)
	}
	acc, pods, err := openPods(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	defer acc.Close()
	for _, p := range pods {
		st, err := p.API.SealStatus(ctx)
		if err != nil {
			return nil, err
		}
		if st.Initialized {
			return nil, fmt.Errorf("%w (pod %s) and the agent has no keyfile for it: the unseal keys are wherever it was initialised; the agent will not touch it", ErrInitInitialised, p.Name)
		}
	}
	first := pods[0]
	res, err := first.API.Init(ctx, cfg.Vault.Shares, cfg.Vault.Threshold)
	if err != nil {
		return nil, err
	}
	kf := &vault.Keyfile{Keyset: res.Keyset, Created: time.Now().UTC()}
	if err := vault.WriteKeyfile(ctx, path, kf, s, true); err != nil {
		return nil, fmt.Errorf("CRITICAL: vault %s was initialised but its keys could not be stored (%w); they are lost: delete its data and run init again", first.Name, err)
	}
	log.Info("initialised; keyfile written", "pod", first.Name, "keyfile", path, "shares", len(res.Keyset.Keys), "threshold", res.Keyset.Threshold)
	rep := &InitReport{Pod: first.Name, Keyfile: path}
	if recovery != nil {
		rep.RecoveryCopy = path + ".recovery.age"
		if err := vault.WriteKeyfile(ctx, rep.RecoveryCopy, kf, recovery, true); err != nil {
			return rep, fmt.Errorf("write the recovery copy: %w", err)
		}
	}
	if _, err := first.API.Unseal(ctx, res.Keyset, log); err != nil {
		return rep, err
	}
	h, err := waitActive(ctx, first.API, 60*time.Second)
	if err != nil {
		return rep, err
	}
	tok, err := first.API.CreateSnapshotToken(ctx, res.RootToken)
	if err != nil {
		return rep, err
	}
	kf.ClusterID, kf.ClusterName, kf.SnapshotToken = h.ClusterID, h.ClusterName, tok
	if err := vault.WriteKeyfile(ctx, path, kf, s, false); err != nil {
		return rep, fmt.Errorf("record the snapshot token in the keyfile: %w", err)
	}
	if recovery != nil {
		if err := vault.WriteKeyfile(ctx, rep.RecoveryCopy, kf, recovery, false); err != nil {
			return rep, fmt.Errorf("update the recovery copy: %w", err)
		}
	}
	if err := first.API.RevokeSelf(ctx, res.RootToken); err != nil {
		return rep, fmt.Errorf("revoke the initial root token: %w", err)
	}
	log.Info("root token revoked; snapshot token stored", "pod", first.Name, "cluster_id", h.ClusterID)
	rep.Meta = kf.Meta()
	rep.Unsealed = append(rep.Unsealed, first.Name)
	// Followers join through retry_join once they have the keys.
	for _, p := range pods[1:] {
		if err := unsealFollower(ctx, p, kf.Keyset, log); err != nil {
			return rep, err
		}
		rep.Unsealed = append(rep.Unsealed, p.Name)
	}
	return rep, nil
}

// probeSealer seals a throwaway payload beside the keyfile, proving the directory is
// writable and the sealing method works before any key exists.
func probeSealer(ctx context.Context, path string, s vault.Sealer) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return err
	}
	f.Close()
	defer os.Remove(f.Name())
	return s.Seal(ctx, []byte("probe"), f.Name())
}

// waitActive waits until n is unsealed and active.
func waitActive(ctx context.Context, n *vault.Node, timeout time.Duration) (vault.Health, error) {
	deadline := time.Now().Add(timeout)
	for {
		h, err := n.Health(ctx)
		if err == nil && h.Active {
			return h, nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("sealed=%v standby=%v", h.Sealed, h.Standby)
			}
			return h, fmt.Errorf("%s did not become active within %s: %w", n.Name, timeout, err)
		}
		select {
		case <-ctx.Done():
			return h, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// unsealFollower unseals a pod that joins an existing Raft cluster through retry_join.
// It may report uninitialised until its join attempt reaches the leader, so it is
// retried until the timeout.
func unsealFollower(ctx context.Context, p vaultPod, ks vault.Keyset, log *slog.Logger) error {
	deadline := time.Now().Add(90 * time.Second)
	for {
		res, err := p.API.Unseal(ctx, ks, log)
		if err == nil && !res.Sealed {
			return nil
		}
		if errors.Is(err, vault.ErrWrongKeys) || time.Now().After(deadline) {
			if err == nil {
				err = errors.New("still sealed")
			}
			return fmt.Errorf("unseal follower %s: %w", p.Name, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}
