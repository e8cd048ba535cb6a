package agent

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// RestoreOptions tune restore.
type RestoreOptions struct {
	// Force restores a snapshot of another cluster (snapshot-force); the keyfile must
	// hold that snapshot's keys.
	Force bool
	// AuthTokenFile: as RecoverOptions.AuthTokenFile.
	AuthTokenFile string
}

// RestoreReport says what restore did.
type RestoreReport struct {
	Snapshot string       `json:"snapshot"`
	Pod      string       `json:"pod"`
	Forced   bool         `json:"forced"`
	Steps    []StepResult `json:"steps"`
}

type restoreState struct {
	env      *Env
	file     string
	opts     RestoreOptions
	manifest *snapshot.Manifest
	kf       *vault.Keyfile
	active   vaultPod
	health   vault.Health
	op       vault.Token
	marker   vault.Token
	other    bool
	hold     *fluxHold // the HelmRelease suspended while the snapshot is applied (managed_by flux)
	rep      *RestoreReport
}

var restoreSteps = []step[restoreState]{
	{"check", "verify the file offline, match its keyset with the keyfile, find the active node", (*restoreState).check},
	{"suspend", "managed_by flux: suspend the HelmRelease while the snapshot is applied", (*restoreState).suspend},
	{"marker", "create a short-lived marker token: it vanishes when the restore is applied", (*restoreState).createMarker},
	{"upload", "upload the snapshot with the operator token", (*restoreState).upload},
	{"applied", "wait until Vault has applied it (Vault 2.x applies it after the upload returns)", (*restoreState).applied},
	{"unseal", "unseal every pod again", (*restoreState).unseal},
	{"tokens", "check the agent's tokens; replace any the snapshot brought back expired", (*restoreState).tokens},
	{"resume", "managed_by flux: resume the HelmRelease and wait until it is Ready", (*restoreState).resume},
}

func (s *restoreState) suspend(ctx context.Context) (string, error) { return s.hold.suspend(ctx) }
func (s *restoreState) resume(ctx context.Context) (string, error)  { return s.hold.resume(ctx) }

// Restore writes a snapshot into the running cluster: the file is verified and its
// keyset matched against the keyfile before Vault is touched; the operator token
// uploads it; a snapshot of another cluster needs Force.
func Restore(ctx context.Context, env *Env, file string, opts RestoreOptions) (*RestoreReport, error) {
	s := &restoreState{env: env, file: file, opts: opts, rep: &RestoreReport{}, hold: newFluxHold(env)}
	defer func() {
		if !s.marker.Empty() && s.active.API != nil {
			revokeRoot(ctx, env, s.active.API, s.marker)
		}
	}()
	return s.rep, s.hold.failed(runSteps(ctx, env, "restore", restoreSteps, s, &s.rep.Steps))
}

func (s *restoreState) check(ctx context.Context) (string, error) {
	path, m, err := chooseSnapshot(ctx, s.env, s.file)
	if err != nil {
		return "", err
	}
	s.manifest, s.rep.Snapshot = m, path
	if s.kf, err = s.env.Keyfile.Read(ctx); err != nil {
		return "", err
	}
	if err := checkKeyset(s.env, path, m, s.kf); err != nil {
		return "", err
	}
	if s.active, s.health, err = findActive(ctx, s.env); err != nil {
		return "", err
	}
	s.rep.Pod = s.active.Name
	s.other = m.ClusterID != "" && s.health.ClusterID != "" && m.ClusterID != s.health.ClusterID
	if s.other && !s.opts.Force {
		return "", withHint(fmt.Errorf("snapshot %s is of cluster %s, the running cluster is %s", path, m.ClusterID, s.health.ClusterID), "a restore across clusters needs --force")
	}
	s.rep.Forced = s.other
	if s.op, _, err = validOperatorToken(ctx, s.active, s.kf); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s into %s (forced: %v)", path, s.active.Name, s.other), nil
}

func (s *restoreState) createMarker(ctx context.Context) (string, error) {
	if s.other {
		return "skipped: a forced restore seals Vault, which is the sign", nil
	}
	m, err := s.active.API.CreateMarker(ctx, s.op)
	if err != nil {
		return "", err
	}
	s.marker = m
	return "created", nil
}

func (s *restoreState) upload(ctx context.Context) (string, error) {
	f, err := os.Open(s.rep.Snapshot)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := s.active.API.RestoreSnapshot(ctx, s.op, f, s.other, s.env.Config.Snapshots.IdleTimeout); err != nil {
		return "", err
	}
	s.env.Log.Info("snapshot uploaded", "file", s.rep.Snapshot, "pod", s.active.Name, "forced", s.other)
	return "accepted", nil
}

func (s *restoreState) applied(ctx context.Context) (string, error) {
	env := s.env
	if s.other {
		if err := awaitRestored(ctx, env, s.active, s.kf, s.manifest.ClusterID, s.health.ClusterID); err != nil {
			return "", err
		}
		return "sealed by the forced restore and unsealed with the snapshot's keys", nil
	}
	err := poll(ctx, env.Clock, env.Waits.Poll, env.Waits.Restore, "the restore to be applied", func(ctx context.Context) error {
		_, err := s.active.API.LookupSelf(ctx, s.marker)
		switch {
		case errors.Is(err, vault.ErrTokenRefused):
			return nil // the marker is gone: the data is the snapshot's
		case err != nil:
			return err // sealed or electing meanwhile: ask again
		}
		return errNotYet
	})
	if err != nil {
		return "", err
	}
	s.marker = vault.Token{}
	return "applied (the marker token is gone)", nil
}

func (s *restoreState) unseal(ctx context.Context) (string, error) {
	pods, err := s.env.openPods(ctx)
	if err != nil {
		return "", err
	}
	for _, p := range pods {
		if err := s.env.unsealPod(ctx, p, s.kf.Keyset, s.env.Waits.Join); err != nil {
			return "", err
		}
	}
	if _, err := s.env.waitActive(ctx, s.active.API); err != nil {
		if _, _, err2 := findActive(ctx, s.env); err2 != nil {
			return "", err
		}
	}
	return fmt.Sprintf("%d pod(s) unsealed", len(pods)), nil
}

func (s *restoreState) tokens(ctx context.Context) (string, error) {
	leader, _, err := findActive(ctx, s.env)
	if err != nil {
		return "", err
	}
	return ensureTokens(ctx, s.env, leader, s.kf, s.opts.AuthTokenFile)
}
