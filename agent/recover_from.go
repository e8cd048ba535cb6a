package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot/offsite"
)

// RecoverFromOptions bring a host that lost everything back from an off-host target.
type RecoverFromOptions struct {
	Target string
	// IdentityFile holds the operator's offline age identity (AGE-SECRET-KEY-1…).
	IdentityFile string
	// Force accepts the newest authentic copy although a newer one is edited or
	// swapped, the head is missing, or copies look rolled back.
	Force  bool
	DryRun bool
	// ManifestKey pins the recovery to the manifest key init printed (sha256:…): a
	// recovery copy under any other key is ignored, and none left is a refusal, before
	// any snapshot copy is fetched. Anyone who can write to the store can plant a
	// keyfile encrypted to the public recipient, with its own manifest key and copies.
	ManifestKey string
	// Confirm, when no ManifestKey pins the recovery, is asked whether the fingerprint
	// found is the one init printed, before anything is fetched; an error stops.
	Confirm func(found string) error
}

// ErrManifestKey refuses a recovery whose recovery copies carry another manifest key
// than the operator pinned.
var ErrManifestKey = errors.New("no recovery copy under the pinned manifest key")

// RecoverFromReport says which copy and keyfile were fetched, then the recover.
type RecoverFromReport struct {
	Target string `json:"target"`
	Copy   string `json:"copy"`
	// KeyfileCopy is the recovery copy whose manifest key authenticated the copy;
	// ManifestKey is that key's fingerprint, for the operator to compare with the one
	// init printed.
	KeyfileCopy string         `json:"keyfile_copy"`
	ManifestKey string         `json:"manifest_key"`
	ClusterID   string         `json:"cluster_id"`
	Problems    []string       `json:"problems"`
	Snapshot    string         `json:"snapshot"`
	Recover     *RecoverReport `json:"recover,omitempty"`
}

// RecoverFrom fetches the newest authentic copy and the keyfile's recovery copy from a
// target on a host whose state directory is empty, decrypts both with the operator's
// offline identity, seals the keyfile with this host's key, and runs recover with that
// snapshot. A copy that was swapped, edited or rolled back is refused with the problem
// named, unless Force.
func RecoverFrom(ctx context.Context, env *Env, opts RecoverFromOptions) (*RecoverFromReport, error) {
	rep := &RecoverFromReport{Target: opts.Target, Problems: []string{}}
	if env.Keyfile.Exists() {
		return nil, hintf("without --from, recover uses the keyfile this host has; move it away only if it is not this cluster's",
			"recover --from is for a host that lost its state, but a keyfile exists at %s", env.Keyfile)
	}
	t, ids, stateDir, err := env.openWithIdentity(ctx, opts.Target, opts.IdentityFile)
	if err != nil {
		return nil, err
	}
	defer t.Close()

	// The recovery copies, newest first: the first whose manifest key authenticates a
	// copy is the cluster's keyfile.
	rcs, err := offsite.RecoveryCopies(ctx, t)
	if err != nil {
		return nil, err
	}
	if len(rcs) == 0 {
		return nil, fmt.Errorf("%s holds no keyfile recovery copy (keyfile/recovery-*.age): it was never pushed there", t)
	}
	var kf *vault.Keyfile
	var choice offsite.Choice
	var lastErr error
	var other []string // manifest keys of recovery copies the pin ruled out
	for _, o := range rcs {
		k, err := openRecoveryCopy(ctx, t, o.Name, stateDir, ids)
		if err != nil {
			rep.Problems = append(rep.Problems, err.Error())
			continue
		}
		if fp := vault.ManifestKeyFingerprint(k.ManifestKey); opts.ManifestKey != "" && fp != opts.ManifestKey {
			env.Log.Warn("ignoring a recovery copy under another manifest key than the one pinned", "copy", o.Name, "manifest_key", fp, "pinned", opts.ManifestKey)
			other = append(other, o.Name+" ("+fp+")")
			continue
		}
		ch, err := offsite.Choose(ctx, t, ids, k.ManifestKey, opts.Force)
		if err != nil && ch.Signed.Copy == "" {
			lastErr = err // no copy under this key: try an older keyfile
			continue
		}
		if err != nil {
			return nil, withHint(fmt.Errorf("copies on %s: %w", t, err), "find out who changed the store; --force recovers from the newest authentic copy regardless")
		}
		kf, choice, rep.KeyfileCopy = k, ch, o.Name
		break
	}
	if kf == nil && opts.ManifestKey != "" {
		return nil, withHint(fmt.Errorf("%w %s on %s (recovery copies under other keys: %v); nothing was fetched", ErrManifestKey, opts.ManifestKey, t, other),
			"compare --manifest-key with the fingerprint init printed; a recovery copy under another key was written by someone else than this cluster's agent")
	}
	if kf == nil {
		return nil, fmt.Errorf("no keyfile recovery copy on %s authenticates a snapshot copy there: %v", t, errors.Join(lastErr, errors.New(fmt.Sprint(rep.Problems))))
	}
	rep.Problems = append(rep.Problems, choice.Problems...)
	rep.Copy, rep.ManifestKey, rep.ClusterID = choice.Signed.Copy, vault.ManifestKeyFingerprint(kf.ManifestKey), kf.ClusterID
	for _, p := range choice.Problems {
		env.Log.Warn("recovering despite a problem with the copies (--force)", "target", opts.Target, "problem", p)
	}
	if opts.DryRun {
		return rep, nil
	}
	if opts.ManifestKey == "" {
		if opts.Confirm == nil {
			return rep, hintf("pass --manifest-key with the fingerprint init printed", "recover --from found manifest key %s and has no way to ask whether it is this cluster's", rep.ManifestKey)
		}
		if err := opts.Confirm(rep.ManifestKey); err != nil {
			return rep, err
		}
	}

	store, err := snapshotStore(ctx, env)
	if err != nil {
		return rep, err
	}
	if err := safefile.PrivateDir(store.Dir); err != nil {
		return rep, storeError(store, err)
	}
	if rep.Snapshot, err = offsite.Fetch(ctx, t, choice.Signed, ids, store.Dir); err != nil {
		return rep, withHint(fmt.Errorf("%w (swapped for another copy's, or edited)", err), "find out who changed the store; drop the copy and recover from an older one")
	}
	env.Log.Info("copy fetched and verified", "target", opts.Target, "copy", rep.Copy, "file", rep.Snapshot)
	if err := env.Keyfile.Write(ctx, kf, true); err != nil {
		return rep, fmt.Errorf("seal the keyfile with this host's key: %w", err)
	}
	env.Log.Info("keyfile restored and sealed with this host's key", "keyfile", env.Keyfile.String(), "cluster", kf.ClusterID, "manifest_key", rep.ManifestKey)
	if _, err := env.recoveryCopy(ctx, kf); err != nil {
		env.Log.Warn("could not write the local recovery copy", "err", err)
	}
	rep.Recover, err = Recover(ctx, env, RecoverOptions{Snapshot: rep.Snapshot})
	return rep, err
}

// readIdentities reads an age identity file (never logged).
func readIdentities(path string) ([]age.Identity, error) {
	if path == "" {
		return nil, errors.New("--identity FILE is required: the operator's offline age identity that opens the copies")
	}
	b, err := safefile.ReadSecret(path, 64<<10)
	if err != nil {
		return nil, fmt.Errorf("identity %s: %w", path, err)
	}
	ids, err := age.ParseIdentities(bytesReader(b))
	if err != nil {
		return nil, fmt.Errorf("identity %s is not an age identity file (age-keygen output)", path)
	}
	return ids, nil
}

// openRecoveryCopy downloads a recovery copy into the state directory (0600, removed
// after) and decrypts it.
func openRecoveryCopy(ctx context.Context, t offsite.Target, name, dir string, ids []age.Identity) (*vault.Keyfile, error) {
	tmp := filepath.Join(dir, ".recovery-copy.tmp")
	defer os.Remove(tmp)
	if err := offsite.Download(ctx, t, name, tmp, offsite.MaxRecoveryCopy); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	var lastErr error
	for _, id := range ids {
		x, ok := id.(*age.X25519Identity)
		if !ok {
			continue
		}
		kf, err := vault.ReadKeyfile(ctx, tmp, vault.Age{Recipient: x.Recipient(), Identity: x})
		if err == nil {
			return kf, nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("%s does not open with the identity: %v", name, lastErr)
}

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }
