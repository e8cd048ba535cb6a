package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// Refusals of adopt; each says what to do instead.
var (
	ErrAdoptKeyfileExists = errors.New("refusing to adopt: a keyfile of another keyset exists")
	ErrAdoptUninitialised = errors.New("refusing to adopt: vault is not initialised")
	ErrAdoptSharesRefused = errors.New("refusing to adopt: the shares do not open this Vault")
)

// AdoptOptions are what the operator hands adopt once; none of it is stored but the
// keyset itself, sealed into the keyfile.
type AdoptOptions struct {
	// Keyset is the unseal shares (all of them, or at least the threshold), read by the
	// caller from `vault operator init` output or a prompt.
	Keyset vault.Keyset
	// AuthToken may read a Raft snapshot, write policies and a mount, and create orphan
	// tokens (a root token, or an admin's): used for this run only.
	AuthToken vault.Token
	// RecoveryRecipient (age1…) gets an offline copy of the keyfile; overrides the config.
	RecoveryRecipient string
}

// AdoptReport is the non-secret outcome of adopt.
type AdoptReport struct {
	// Already is set when the keyfile held this keyset before: nothing was done.
	Already bool `json:"already_adopted,omitempty"`
	// Adopted is set once the keyfile holds the shares and the agent's tokens.
	Adopted      bool           `json:"adopted"`
	Pod          string         `json:"pod,omitempty"`
	Keyfile      string         `json:"keyfile"`
	RecoveryCopy string         `json:"recovery_copy,omitempty"`
	Meta         vault.Meta     `json:"keyfile_meta"`
	ManifestKey  string         `json:"manifest_key,omitempty"`
	Drill        *DrillReport   `json:"drill,omitempty"`
	Backup       snapshot.Entry `json:"first_backup,omitzero"`
	Offsite      []TargetResult `json:"offsite,omitempty"`
	Unsealed     []string       `json:"unsealed,omitempty"`
	Steps        []StepResult   `json:"steps"`
}

type adoptState struct {
	env       *Env
	opts      AdoptOptions
	rep       *AdoptReport
	recipient string
	pods      []vaultPod
	active    vaultPod
	health    vault.Health
	proof     string // the proof snapshot, a 0600 temp file beside the keyfile
	index     uint64
	kf        *vault.Keyfile
	minted    []vault.Token // revoked again when adopt fails after minting them
	// pins are the nodes of pods on hostPath volumes without node affinity (the
	// operator's), recorded with the keyfile.
	pins map[string]string
}

// adoptSteps take over a Vault initialised by hand. Nothing is written before "prove"
// has shown, in a throwaway pod, that the shares open this Vault's data; the
// production pods are not restarted and the active one is only read from until then.
var adoptSteps = []step[adoptState]{
	{"check", "check every precondition: no keyfile (or this keyset's: nothing to do), the seal works, every pod answers and is initialised, one is active, the shares meet its threshold, the token is valid, nothing of the agent's name in Vault is someone else's", (*adoptState).check},
	{"snapshot", "take a Raft snapshot from the active pod with the given token, verified, into a private temporary file", (*adoptState).snapshot},
	{"prove", "open that snapshot in a throwaway drill pod with the shares (production untouched): the shares unseal it and its Raft index is whole", (*adoptState).prove},
	{"tokens", "write the agent's policies and canary, mint its periodic tokens", (*adoptState).tokens},
	{"keyfile", "record the node of each pod on a hostPath volume without node affinity; seal the shares and tokens into the keyfile (and the offline recovery copy)", (*adoptState).keyfile},
	{"first-backup", "store the proven snapshot as the first backup, its drill recorded, and push it to the off-host targets", (*adoptState).firstBackup},
	{"unseal", "unseal every sealed pod with the keyfile (a follower that never joined joins through retry_join)", (*adoptState).unseal},
}

// AdoptPlan lists the steps adopt takes.
func AdoptPlan() []PlanStep { return planOf(adoptSteps) }

// errAlreadyAdopted ends adopt early, successfully: the keyfile holds this keyset.
var errAlreadyAdopted = errors.New("already adopted")

// Adopt takes over a Vault the operator initialised by hand: without re-initialising or
// restarting it, it proves the shares open it, gives the agent its own tokens, and
// seals shares and tokens into the keyfile. Wrong or too few shares, a foreign object
// under the agent's names, or any failure before the keyfile step leave no keyfile;
// tokens minted before a failure are revoked again.
func Adopt(ctx context.Context, env *Env, opts AdoptOptions) (*AdoptReport, error) {
	s := &adoptState{env: env, opts: opts, rep: &AdoptReport{Keyfile: env.Config.Vault.Keyfile}}
	defer func() {
		if s.proof != "" {
			_ = os.Remove(s.proof)
		}
		if s.kf != nil {
			s.rep.Meta = s.kf.Meta()
			if len(s.kf.ManifestKey) > 0 {
				s.rep.ManifestKey = vault.ManifestKeyFingerprint(s.kf.ManifestKey)
			}
		}
	}()
	err := runSteps(ctx, env, "adopt", adoptSteps, s, &s.rep.Steps)
	if errors.Is(err, errAlreadyAdopted) {
		s.rep.Already = true
		return s.rep, nil
	}
	if err != nil && len(s.minted) > 0 {
		s.revokeMinted(ctx)
	}
	return s.rep, err
}

func (s *adoptState) check(ctx context.Context) (string, error) {
	env, ks := s.env, s.opts.Keyset
	path := env.Config.Vault.Keyfile
	if len(ks.Keys) == 0 {
		return "", hintf("give the output of `vault operator init` with --init-output, or type the shares at the prompt", "no unseal shares given")
	}
	if env.Keyfile.Exists() {
		kf, err := env.Keyfile.Read(ctx)
		if err != nil {
			return "", withHint(fmt.Errorf("a keyfile exists at %s and cannot be read: %w", path, err),
				"adopt never overwrites a keyfile: run `pve-vault-agent keyfile check`, and if it belongs to nothing any more, move it away and adopt again")
		}
		if kf.Keyset.Fingerprint() == ks.Fingerprint() {
			return "", errAlreadyAdopted
		}
		return "", withHint(fmt.Errorf("%w at %s (keyset %s, given %s)", ErrAdoptKeyfileExists, path, kf.Keyset.Fingerprint(), ks.Fingerprint()),
			"adopt never overwrites a keyfile: if this Vault was re-initialised and the keyfile's shares open nothing any more, move %s (and %s) away, keep them until the new keyfile is proven, and adopt again", path, env.recoveryPath())
	}
	s.recipient = s.opts.RecoveryRecipient
	if s.recipient == "" {
		s.recipient = env.Config.Vault.RecoveryRecipient
	}
	if s.recipient != "" {
		if _, err := recoverySealer(s.recipient); err != nil {
			return "", err
		}
		if _, err := os.Lstat(env.recoveryPath()); err == nil {
			return "", hintf("move it away (it belongs to an earlier keyfile) and adopt again", "a recovery copy already exists at %s", env.recoveryPath())
		}
	}
	if s.opts.AuthToken.Empty() {
		return "", hintf("give a token that may take a Raft snapshot, write policies and create tokens (the initial root token, or an admin's) with --auth-token-file; it is used for this run only", "no token to set the agent up with")
	}
	if err := probeSealer(ctx, env, path); err != nil {
		return "", fmt.Errorf("the keyfile could not be written, so nothing was changed: %w", err)
	}
	if err := s.volumeNodes(ctx); err != nil {
		return "", err
	}
	pods, err := env.openPods(ctx)
	if err != nil {
		return "", err
	}
	states, err := env.waitAnswering(ctx, pods)
	if err != nil {
		return "", err
	}
	threshold, initialised := 0, 0
	for i := range pods {
		if states[i].Initialized {
			initialised++
		}
		if states[i].Threshold > threshold {
			threshold = states[i].Threshold
		}
	}
	if initialised == 0 {
		return "", withHint(fmt.Errorf("%w (%d pod(s), none initialised)", ErrAdoptUninitialised, len(pods)),
			"a Vault nobody initialised is init's job: `pve-vault-agent init`")
	}
	if ks.Threshold != 0 && threshold != 0 && ks.Threshold != threshold {
		return "", hintf("the shares are from another initialisation or a rekey: give the current ones",
			"%w: the init output says threshold %d, Vault says %d", ErrAdoptSharesRefused, ks.Threshold, threshold)
	}
	if len(ks.Keys) < threshold {
		return "", hintf(fmt.Sprintf("give at least %d shares", threshold), "%w: %d share(s) given, this Vault needs %d", ErrAdoptSharesRefused, len(ks.Keys), threshold)
	}
	s.opts.Keyset.Threshold = threshold
	s.pods = pods
	if s.active, s.health, err = findActiveIn(ctx, env, func(context.Context) ([]vaultPod, error) { return pods, nil }); err != nil {
		return "", withHint(err, "adopt proves the shares on a snapshot of the running Vault, so one pod must be unsealed: unseal one by hand (`vault operator unseal`, threshold shares) and adopt again")
	}
	if _, err := s.active.API.LookupSelf(ctx, s.opts.AuthToken); err != nil {
		return "", fmt.Errorf("--auth-token-file: %w", err)
	}
	foreign, err := s.active.API.ForeignAgentObjects(ctx, s.opts.AuthToken)
	if err != nil {
		return "", err
	}
	if len(foreign) > 0 {
		return "", hintf("they are not the agent's: rename or remove them in Vault, then adopt again (the agent never overwrites what it did not create)",
			"Vault already holds %s under the names the agent writes", strings.Join(foreign, " and "))
	}
	s.rep.Pod = s.active.Name
	return fmt.Sprintf("%d of %d pod(s) initialised, %s active, threshold %d, %d share(s) given", initialised, len(pods), s.active.Name, threshold, len(ks.Keys)), nil
}

// volumeNodes finds the pods whose hostPath volumes (the operator's) have no node
// affinity and the nodes they run on now: where their data is. The pod list trusts them
// from here on; the keyfile step records them.
func (s *adoptState) volumeNodes(ctx context.Context) error {
	if s.env.Config.Vault.PodAccess == "static" {
		return nil
	}
	cl, err := s.env.Cluster(ctx)
	if err != nil {
		return err
	}
	found, err := cl.VolumeNodes(ctx, s.env.Config.Chart.Release)
	if err != nil {
		return err
	}
	for pod, node := range found {
		s.env.Log.Info("a hostPath volume without node affinity: its pod's data is on the node it runs on now", "pod", pod, "node", node)
	}
	s.env.addPins(found)
	s.pins = found
	return nil
}

func (s *adoptState) snapshot(ctx context.Context) (string, error) {
	env := s.env
	f, err := os.CreateTemp(filepath.Dir(env.Config.Vault.Keyfile), ".adopt-*.snap")
	if err != nil {
		return "", err
	}
	s.proof = f.Name()
	n, err := s.active.API.StreamSnapshot(ctx, s.opts.AuthToken, env.Config.Snapshots.IdleTimeout, f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("snapshot from %s: %w", s.active.Name, err)
	}
	info, err := snapshot.VerifyFile(s.proof)
	if err != nil {
		return "", fmt.Errorf("the snapshot from %s does not verify: %w", s.active.Name, err)
	}
	s.index = info.Index
	return fmt.Sprintf("%d bytes from %s, raft index %d", n, s.active.Name, info.Index), nil
}

func (s *adoptState) prove(ctx context.Context) (string, error) {
	rep, err := proveKeyset(ctx, s.env, s.proof, s.opts.Keyset, s.index)
	s.rep.Drill = rep
	if err != nil {
		if errors.Is(err, vault.ErrWrongKeys) {
			return "", withHint(fmt.Errorf("%w: %w", ErrAdoptSharesRefused, err), "nothing was written: give this Vault's current shares (from its `vault operator init` output, or after a rekey the new ones)")
		}
		return "", fmt.Errorf("the proof drill: %w", err)
	}
	return fmt.Sprintf("%s opened the snapshot with the shares (raft index %d)", rep.Pod, s.index), nil
}

func (s *adoptState) tokens(ctx context.Context) (string, error) {
	env := s.env
	canary := make([]byte, 16)
	mk := make([]byte, 32)
	if _, err := rand.Read(canary); err != nil {
		return "", err
	}
	if _, err := rand.Read(mk); err != nil {
		return "", err
	}
	toks, err := s.active.API.CreateAgentTokens(ctx, s.opts.AuthToken, vault.Setup{Period: env.Config.Vault.TokenPeriod, Canary: hex.EncodeToString(canary)})
	if err != nil {
		return "", err
	}
	s.minted = []vault.Token{toks.Snapshot, toks.Operator}
	s.kf = &vault.Keyfile{Keyset: s.opts.Keyset, ClusterID: s.health.ClusterID, ClusterName: s.health.ClusterName,
		SnapshotToken: toks.Snapshot, OperatorToken: toks.Operator, Canary: hex.EncodeToString(canary), ManifestKey: mk, Created: env.Clock.Now().UTC()}
	return fmt.Sprintf("snapshot and operator tokens, period %s", env.Config.Vault.TokenPeriod), nil
}

func (s *adoptState) keyfile(ctx context.Context) (string, error) {
	if err := s.recordPins(); err != nil {
		return "", fmt.Errorf("record the nodes of the hostPath volumes: %w", err)
	}
	if err := s.env.writeKeyfileFor(ctx, s.kf, true, s.recipient); err != nil {
		if errors.Is(err, errRecoveryBehind) {
			s.minted = nil // the keyfile holds them
			s.rep.Adopted = true
			s.env.Log.Warn("adopted; the offline recovery copy is written at the next backup", "err", err)
			return s.env.Config.Vault.Keyfile, nil
		}
		return "", err
	}
	s.minted = nil
	s.rep.Adopted = true
	if s.recipient != "" {
		s.rep.RecoveryCopy = s.env.recoveryPath()
	}
	s.env.Log.Info("adopted; keyfile written", "keyfile", s.env.Config.Vault.Keyfile, "shares", len(s.kf.Keyset.Keys), "threshold", s.kf.Keyset.Threshold, "cluster", s.kf.ClusterID)
	return fmt.Sprintf("%s: %d shares, threshold %d, keyset %s", s.env.Config.Vault.Keyfile, len(s.kf.Keyset.Keys), s.kf.Keyset.Threshold, s.kf.Keyset.Fingerprint()), nil
}

// recordPins adds the nodes found to the recorded ones.
func (s *adoptState) recordPins() error {
	if len(s.pins) == 0 {
		return nil
	}
	pins, err := s.env.volumePins()
	if err != nil {
		return err
	}
	maps.Copy(pins, s.pins)
	return writeJSONAtomic(s.env.volumePinsPath(), pins)
}

// firstBackup stores the snapshot the drill opened: the first backup is verified and
// drilled before adopt returns. A failure here leaves the adoption in place; the
// daemon's schedule takes the next one.
func (s *adoptState) firstBackup(ctx context.Context) (string, error) {
	env := s.env
	store, err := snapshotStore(ctx, env)
	if err == nil {
		var unlock func()
		if unlock, err = store.Lock(ctx); err == nil {
			defer unlock()
			m := snapshot.Manifest{VaultVersion: s.health.Version, ClusterID: s.health.ClusterID, KeysetFingerprint: s.kf.Keyset.Fingerprint(),
				AgentVersion: env.Version, Source: s.active.Name}
			s.rep.Backup, err = store.Save(ctx, env.Clock.Now(), m, func(w io.Writer) error {
				f, err := os.Open(s.proof)
				if err != nil {
					return err
				}
				defer f.Close()
				_, err = io.Copy(w, f)
				return err
			})
		}
	}
	if err != nil {
		env.Log.Warn("adopted, but the proven snapshot could not be stored: run `pve-vault-agent backup-now`", "err", err)
		return "not stored: " + err.Error(), nil
	}
	d := s.rep.Drill
	if err := snapshot.RecordDrill(s.rep.Backup.Path, snapshot.DrillResult{At: d.Started, Passed: true, DurationSecs: d.DurationSecs}); err != nil {
		env.Log.Warn("could not record the proof drill in the first backup's manifest", "err", err)
	}
	if len(env.Config.Snapshots.Targets) == 0 {
		return s.rep.Backup.Path, nil
	}
	// As backup-now does: off-host copies (and the recovery copy) now, not at the next
	// scheduled backup; a target that fails is retried then.
	s.rep.Offsite = PushOffsite(ctx, env, s.kf, store)
	failed := 0
	for _, r := range s.rep.Offsite {
		if r.Error != "" {
			failed++
		}
	}
	return fmt.Sprintf("%s; %d of %d off-host target(s) up to date", s.rep.Backup.Path, len(s.rep.Offsite)-failed, len(s.rep.Offsite)), nil
}

func (s *adoptState) unseal(ctx context.Context) (string, error) {
	for _, p := range s.pods {
		st, err := p.API.SealStatus(ctx)
		if err != nil || !st.Sealed {
			continue
		}
		if err := s.env.unsealPod(ctx, p, s.kf.Keyset, s.env.Waits.Join); err != nil {
			return "", withHint(fmt.Errorf("adopted, but %s did not unseal: %w", p.Name, err), "the daemon retries it; `pve-vault-agent status` shows it")
		}
		s.rep.Unsealed = append(s.rep.Unsealed, p.Name)
	}
	return fmt.Sprintf("%d sealed pod(s) unsealed", len(s.rep.Unsealed)), nil
}

// revokeMinted revokes the agent tokens a failed adopt minted (the policies and the
// canary stay: they are the agent's, and a re-run writes the same).
func (s *adoptState) revokeMinted(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.env.Waits.Active)
	defer cancel()
	for _, t := range s.minted {
		if err := s.active.API.RevokeSelf(cctx, t); err != nil {
			s.env.Log.Warn("could not revoke a token the failed adopt minted; it expires after vault.token_period unless renewed", "err", err)
		}
	}
}

// ReadShares reads unseal shares from `vault operator init` output in a file (or "-",
// standard input), once; the path is not kept.
func ReadShares(path string, stdin io.Reader) (vault.Keyset, error) {
	var b []byte
	var err error
	if path == "-" {
		b, err = io.ReadAll(io.LimitReader(stdin, 64<<10))
	} else {
		b, err = safefile.ReadSecret(path, 64<<10)
	}
	if err != nil {
		return vault.Keyset{}, err
	}
	defer clear(b)
	return vault.ParseInitOutput(b)
}

// AdoptInputs reads what the operator hands adopt: the shares from sharesFile ("-":
// stdin) or, when it is empty, the typed ones; the token from tokenFile. Errors name
// the flag, never a value.
func AdoptInputs(sharesFile string, stdin io.Reader, typed []string, tokenFile string) (AdoptOptions, error) {
	var o AdoptOptions
	var err error
	if sharesFile != "" {
		if o.Keyset, err = ReadShares(sharesFile, stdin); err != nil {
			return o, fmt.Errorf("--init-output: %w", err)
		}
	} else if o.Keyset, err = vault.KeysetFromShares(0, typed); err != nil {
		return o, err
	}
	o.AuthToken, err = readTokenFile(tokenFile)
	return o, err
}
