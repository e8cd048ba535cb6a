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

// KeyfileSource is where the agent's keyfile is read from and written to. The choice is
// made once, where the binary is wired: the sealed file at Path, or, when the service
// manager decrypted it (LoadCredentialEncrypted=pve-vault-agent-unseal:PATH), that
// credential. Only the main keyfile ever comes from a credential; writes always go to
// Path, and after a write this process reads Path too.
type KeyfileSource struct {
	Path string
	// Credential is the decrypted credential file, or "".
	Credential string

	cfg     *configs.Config
	mu      sync.Mutex
	written bool
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

// Exists reports whether a keyfile is at Path (or in the credential).
func (k *KeyfileSource) Exists() bool {
	return vault.KeyfileExists(k.Path) || k.fromCredential()
}

// Modified reports whether the file at Path changed after the credential was loaded:
// a rotation wrote it and the service must be restarted to load it.
func (k *KeyfileSource) Modified() bool {
	if !k.fromCredential() {
		return false
	}
	a, err1 := os.Stat(k.Path)
	b, err2 := os.Stat(k.Credential)
	return err1 == nil && err2 == nil && a.ModTime().After(b.ModTime())
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
