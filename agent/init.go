package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// Refusals of init; each says what to do instead.
var (
	ErrInitKeyfileExists = errors.New("refusing to initialise: a keyfile exists")
	ErrInitInitialised   = errors.New("refusing to initialise: vault is already initialised")
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
	// ManifestKey fingerprints the key that authenticates off-host copies: note it
	// with the offline identity; recover --from prints the one it found.
	ManifestKey string       `json:"manifest_key,omitempty"`
	Unsealed    []string     `json:"unsealed"`
	Steps       []StepResult `json:"steps"`
}

type initState struct {
	env       *Env
	opts      InitOptions
	recovery  vault.Sealer
	recipient string // what recovery seals to
	pods      []vaultPod
	root      vault.Token
	kf        *vault.Keyfile
	rep       *InitReport
}

// initSteps are init's steps in three parts: the checks (interruptible: nothing has
// happened yet), the setup from Vault's init to the revoked root token (one unit an
// interruption waits for: split anywhere, it would leave shares without the token Vault
// 2.x needs to mint one, or a root token alive), and the followers.
var (
	initCheck = []step[initState]{
		{"check", "check every precondition before Vault is touched: no keyfile, no recovery copy, the seal works, every pod uninitialised", (*initState).check},
	}
	initSetup = []step[initState]{
		{"init", "initialise the first pod and seal its shares into the keyfile at once", (*initState).initialise},
		{"recovery-copy", "write the offline recovery copy (age), when a recipient is set", (*initState).recoveryCopy},
		{"unseal", "unseal the first pod and wait until it is active", (*initState).unseal},
		{"tokens", "write the agent's policies and canary, mint its periodic tokens, record them in the keyfile", (*initState).tokens},
		{"revoke-root", "revoke the initial root token", (*initState).revokeRoot},
	}
	initFollowers = []step[initState]{
		{"followers", "unseal the other pods (they join through retry_join)", (*initState).followers},
	}
)

// setupTimeout bounds init's uninterruptible setup.
const setupTimeout = 2 * time.Minute

// Init initialises Vault once: only when no keyfile exists and every pod reports
// uninitialised. The shares go straight into the sealed keyfile; keys and tokens never
// reach logs or output; the initial root token is revoked on every path, an
// interruption included.
func Init(ctx context.Context, env *Env, opts InitOptions) (*InitReport, error) {
	s := &initState{env: env, opts: opts, rep: &InitReport{Keyfile: env.Config.Vault.Keyfile}}
	defer func() {
		if !s.root.Empty() && len(s.pods) > 0 {
			revokeRoot(ctx, env, s.pods[0].API, s.root)
		}
		if s.kf != nil {
			s.rep.Meta = s.kf.Meta()
			if len(s.kf.ManifestKey) > 0 {
				s.rep.ManifestKey = vault.ManifestKeyFingerprint(s.kf.ManifestKey)
			}
		}
	}()
	if err := runSteps(ctx, env, "init", initCheck, s, &s.rep.Steps); err != nil {
		return s.rep, err
	}
	if err := ctx.Err(); err != nil {
		return s.rep, err // interrupted before Vault was touched
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), setupTimeout)
	defer cancel()
	if err := runSteps(sctx, env, "init", initSetup, s, &s.rep.Steps); err != nil {
		if s.kf != nil && s.kf.OperatorToken.Empty() {
			err = withHint(err, "Vault is initialised but holds no data yet and the agent has no token for it (Vault 2.x needs one to mint more): empty the first pod's data directory, delete %s and the pod, and run init again", env.Config.Vault.Keyfile)
		}
		return s.rep, err
	}
	return s.rep, runSteps(ctx, env, "init", initFollowers, s, &s.rep.Steps)
}

func (s *initState) recoveryPath() string { return s.env.Config.Vault.Keyfile + ".recovery.age" }

func (s *initState) check(ctx context.Context) (string, error) {
	env := s.env
	path := env.Config.Vault.Keyfile
	if env.Keyfile.Exists() {
		return "", withHint(fmt.Errorf("%w at %s", ErrInitKeyfileExists, path),
			"this cluster was initialised by the agent before: use `pve-vault-agent unseal`; if Vault now reports uninitialised, its data is gone: use `pve-vault-agent recover`")
	}
	recipient := s.opts.RecoveryRecipient
	if recipient == "" {
		recipient = env.Config.Vault.RecoveryRecipient
	}
	if recipient != "" {
		var err error
		s.recipient = recipient
		if s.recovery, err = recoverySealer(recipient); err != nil {
			return "", err
		}
		if _, err := os.Lstat(s.recoveryPath()); err == nil {
			return "", hintf("move it away (it belongs to an earlier cluster) and run init again", "a recovery copy already exists at %s", s.recoveryPath())
		}
	}
	if err := probeSealer(ctx, env, path); err != nil {
		return "", fmt.Errorf("the keyfile could not be written, so Vault was not initialised: %w", err)
	}
	pods, err := env.openPods(ctx)
	if err != nil {
		return "", err
	}
	states, err := env.waitAnswering(ctx, pods)
	if err != nil {
		return "", err
	}
	for i, p := range pods {
		if states[i].Initialized {
			return "", withHint(fmt.Errorf("%w (pod %s) and the agent has no keyfile for it", ErrInitInitialised, p.Name),
				"the unseal keys are wherever it was initialised (`vault operator init` output, a password manager): to let the agent keep it unsealed and backed up, run `pve-vault-agent adopt` with them; init never touches it")
		}
	}
	s.pods = pods
	return fmt.Sprintf("%d pod(s) uninitialised", len(pods)), nil
}

// probeSealer seals a throwaway payload beside the keyfile, proving the directory is
// writable and the sealing method works before any key exists.
func probeSealer(ctx context.Context, env *Env, path string) error {
	dir := filepath.Dir(path)
	if err := safefile.PrivateDir(dir); err != nil {
		return err
	}
	s, err := env.Keyfile.Sealer()
	if err != nil {
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

// initialise runs Vault's init and writes the shares (under the setup's context, which
// an interruption does not cancel: between the two, the keys exist only here).
func (s *initState) initialise(ctx context.Context) (string, error) {
	env, first := s.env, s.pods[0]
	res, err := first.API.Init(ctx, env.Config.Vault.Shares, env.Config.Vault.Threshold)
	if err != nil {
		return "", err
	}
	s.root = res.RootToken
	mk := make([]byte, 32)
	if _, err := rand.Read(mk); err != nil {
		return "", err
	}
	s.kf = &vault.Keyfile{Keyset: res.Keyset, ManifestKey: mk, Created: env.Clock.Now().UTC()}
	if err := env.Keyfile.Write(ctx, s.kf, true); err != nil {
		return "", withHint(fmt.Errorf("CRITICAL: vault %s was initialised but its keys could not be stored (%w); they are lost", first.Name, err),
			"delete the pod's data (its hostPath) and run init again")
	}
	s.rep.Pod = first.Name
	env.Log.Info("initialised; keyfile written", "pod", first.Name, "keyfile", env.Config.Vault.Keyfile, "shares", len(res.Keyset.Keys), "threshold", res.Keyset.Threshold)
	return fmt.Sprintf("%d shares, threshold %d, keyset %s", len(res.Keyset.Keys), res.Keyset.Threshold, res.Keyset.Fingerprint()), nil
}

func (s *initState) recoveryCopy(ctx context.Context) (string, error) {
	if s.recovery == nil {
		return "skipped: no recovery recipient", nil
	}
	if err := vault.WriteKeyfile(ctx, s.recoveryPath(), s.kf, s.recovery, true); err != nil {
		return "", fmt.Errorf("write the recovery copy: %w", err)
	}
	if err := s.env.recordRecovery(s.recipient); err != nil {
		return "", fmt.Errorf("record the recovery copy's recipient: %w", err)
	}
	s.rep.RecoveryCopy = s.recoveryPath()
	return s.recoveryPath(), nil
}

func (s *initState) unseal(ctx context.Context) (string, error) {
	first := s.pods[0]
	if err := s.env.unsealPod(ctx, first, s.kf.Keyset, s.env.Waits.Join); err != nil {
		return "", err
	}
	h, err := s.env.waitActive(ctx, first.API)
	if err != nil {
		return "", err
	}
	s.kf.ClusterID, s.kf.ClusterName = h.ClusterID, h.ClusterName
	return first.Name + " active, cluster " + h.ClusterID, nil
}

func (s *initState) tokens(ctx context.Context) (string, error) {
	canary := make([]byte, 16)
	if _, err := rand.Read(canary); err != nil {
		return "", err
	}
	toks, err := s.pods[0].API.CreateAgentTokens(ctx, s.root, vault.Setup{Period: s.env.Config.Vault.TokenPeriod, Canary: hex.EncodeToString(canary)})
	if err != nil {
		return "", err
	}
	s.kf.SnapshotToken, s.kf.OperatorToken, s.kf.Canary = toks.Snapshot, toks.Operator, hex.EncodeToString(canary)
	if err := s.env.writeKeyfileFor(ctx, s.kf, false, s.recipient); err != nil {
		return "", fmt.Errorf("record the tokens in the keyfile: %w", err)
	}
	return fmt.Sprintf("snapshot and operator tokens, period %s", s.env.Config.Vault.TokenPeriod), nil
}

func (s *initState) revokeRoot(ctx context.Context) (string, error) {
	if err := s.pods[0].API.RevokeSelf(ctx, s.root); err != nil {
		return "", fmt.Errorf("revoke the initial root token: %w", err)
	}
	s.root = vault.Token{}
	s.rep.Unsealed = append(s.rep.Unsealed, s.pods[0].Name)
	return "revoked", nil
}

func (s *initState) followers(ctx context.Context) (string, error) {
	for _, p := range s.pods[1:] {
		if err := s.env.unsealPod(ctx, p, s.kf.Keyset, s.env.Waits.Join); err != nil {
			return "", fmt.Errorf("unseal follower %s: %w", p.Name, err)
		}
		s.rep.Unsealed = append(s.rep.Unsealed, p.Name)
	}
	return fmt.Sprintf("%d follower(s) unsealed", len(s.pods)-1), nil
}
