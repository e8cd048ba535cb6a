package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// KeyfileSource is where the agent's keyfile is read from and written to: the sealed
// file at Path, or, when the service manager decrypted it at start
// (LoadCredentialEncrypted=pve-vault-agent-unseal:PATH), that credential. Writes always
// go to Path. When Path was written after the credential was loaded (a token rotation
// or a recover run by hand while the service runs), the credential is stale: Path is
// read from then on, decrypted by this process, so a running daemon uses the rotated
// tokens at its next backup or renewal without a restart. Where this process cannot
// decrypt it (a TPM2 seal inside the service's sandbox, which has no devices), the
// credential stays in use and Stale says why: the service must be restarted.
type KeyfileSource struct {
	Path string
	// Credential is the decrypted credential file, or "".
	Credential string

	cfg     *configs.Config
	mu      sync.Mutex
	written bool  // Path is the source (written or found newer than the credential)
	stale   error // why a newer Path could not be read
	sealer  vault.Sealer
}

// NewKeyfileSource chooses the keyfile's source for cfg: the credential
// pve-vault-agent-unseal in credentialsDir ($CREDENTIALS_DIRECTORY of a systemd
// service) when it is there, else vault.keyfile.
func NewKeyfileSource(cfg *configs.Config, credentialsDir string) *KeyfileSource {
	k := &KeyfileSource{Path: cfg.Vault.Keyfile, cfg: cfg}
	if credentialsDir != "" {
		p := filepath.Join(credentialsDir, vault.CredentialName)
		if _, err := os.Lstat(p); err == nil {
			k.Credential = p
		}
	}
	return k
}

// String says where the keyfile comes from.
func (k *KeyfileSource) String() string {
	if k.fromCredential() {
		return fmt.Sprintf("%s (credential %s, loaded by the service manager)", k.Path, vault.CredentialName)
	}
	return k.Path
}

func (k *KeyfileSource) fromCredential() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.Credential != "" && !k.written
}

// Sealer is the keyfile's sealing method from the configuration.
func (k *KeyfileSource) Sealer() (vault.Sealer, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.sealer != nil {
		return k.sealer, nil
	}
	if k.cfg.Vault.Seal == "age" {
		sec, err := k.cfg.Vault.AgeIdentity.Read()
		if err != nil {
			return nil, fmt.Errorf("vault.age_identity: %w", err)
		}
		s, err := parseAgeSealer(sec)
		if err != nil {
			return nil, err
		}
		k.sealer = s
	} else {
		k.sealer = vault.SystemdCreds{WithKey: k.cfg.Vault.SystemdCredsKey}
	}
	return k.sealer, nil
}

// Read opens the keyfile.
func (k *KeyfileSource) Read(ctx context.Context) (*vault.Keyfile, error) {
	if k.fromCredential() && k.pathNewer() {
		kf, err := k.readPath(ctx)
		k.mu.Lock()
		k.stale = err
		if err == nil {
			k.written = true
		}
		k.mu.Unlock()
		if err == nil {
			return kf, nil
		}
	}
	if k.fromCredential() {
		b, err := safefile.ReadSecret(k.Credential, 1<<20)
		if err != nil {
			return nil, fmt.Errorf("keyfile credential: %w", err)
		}
		defer clear(b)
		kf, err := vault.ParseKeyfile(b)
		if err != nil {
			return nil, fmt.Errorf("keyfile credential %s: %w", k.Credential, err)
		}
		return kf, nil
	}
	return k.readPath(ctx)
}

func (k *KeyfileSource) readPath(ctx context.Context) (*vault.Keyfile, error) {
	s, err := k.Sealer()
	if err != nil {
		return nil, err
	}
	kf, err := vault.ReadKeyfile(ctx, k.Path, s)
	if errors.Is(err, vault.ErrNoKeyfile) {
		return nil, withHint(err, "run `pve-vault-agent init` on a new cluster; if this host lost it, put the keyfile back: `pve-vault-agent recover --from TARGET --identity FILE`, or decrypt the offline .recovery.age copy and seal it again (README, recovery runbook)")
	}
	if err != nil {
		return nil, fmt.Errorf("keyfile: %w", err)
	}
	return kf, nil
}

// Write seals kf to Path atomically (exclusive: never over an existing keyfile).
func (k *KeyfileSource) Write(ctx context.Context, kf *vault.Keyfile, exclusive bool) error {
	s, err := k.Sealer()
	if err != nil {
		return err
	}
	if err := vault.WriteKeyfile(ctx, k.Path, kf, s, exclusive); err != nil {
		return err
	}
	k.mu.Lock()
	k.written = true
	k.mu.Unlock()
	return nil
}

// prepare seals kf into a temporary file beside Path (see writeKeyfileFor).
func (k *KeyfileSource) prepare(ctx context.Context, kf *vault.Keyfile) (*vault.PendingKeyfile, error) {
	s, err := k.Sealer()
	if err != nil {
		return nil, err
	}
	return vault.PrepareKeyfile(ctx, k.Path, kf, s)
}

// commit puts a prepared keyfile in place; this process reads Path from then on.
func (k *KeyfileSource) commit(p *vault.PendingKeyfile, exclusive bool) error {
	if exclusive && vault.KeyfileExists(k.Path) {
		return fmt.Errorf("%w: %s", vault.ErrKeyfileExists, k.Path)
	}
	if err := p.Commit(exclusive); err != nil {
		return err
	}
	k.mu.Lock()
	k.written = true
	k.mu.Unlock()
	return nil
}

// Exists reports whether a keyfile is at Path (or in the credential).
func (k *KeyfileSource) Exists() bool {
	return vault.KeyfileExists(k.Path) || k.fromCredential()
}

// pathNewer reports whether the file at Path was written after the credential was
// loaded.
func (k *KeyfileSource) pathNewer() bool {
	a, err1 := os.Stat(k.Path)
	b, err2 := os.Stat(k.Credential)
	return err1 == nil && err2 == nil && a.ModTime().After(b.ModTime())
}

// Stale says why this process still reads a credential older than the keyfile at Path
// (nil when it does not): the service must be restarted to load the new one.
func (k *KeyfileSource) Stale() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.written || k.stale == nil {
		return nil
	}
	return withHint(fmt.Errorf("the keyfile at %s was rewritten after the service loaded it, and this process cannot decrypt it: %w", k.Path, k.stale),
		"restart the service to load it: systemctl restart pve-vault-agent")
}

// parseAgeSealer reads an age X25519 identity: it opens the keyfile and, through its
// recipient, seals it.
func parseAgeSealer(sec configs.Secret) (vault.Sealer, error) {
	ids, err := age.ParseIdentities(bytes.NewReader(sec.Bytes()))
	if err != nil {
		return nil, fmt.Errorf("vault.age_identity is not an age identity file (age-keygen output)")
	}
	x, ok := ids[0].(*age.X25519Identity)
	if !ok {
		return nil, fmt.Errorf("vault.age_identity: only X25519 identities (AGE-SECRET-KEY-1…) are supported")
	}
	return vault.Age{Recipient: x.Recipient(), Identity: x}, nil
}

// recoverySealer seals the offline recovery copy to an age public key.
func recoverySealer(recipient string) (vault.Sealer, error) {
	r, err := age.ParseX25519Recipient(recipient)
	if err != nil {
		return nil, fmt.Errorf("recovery recipient %q is not an age public key (age1…): %v", recipient, err)
	}
	return vault.Age{Recipient: r}, nil
}
