package vault

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
)

// Keyfile errors a caller branches on.
var (
	ErrNoKeyfile      = errors.New("no keyfile")
	ErrKeyfileExists  = errors.New("keyfile already exists")
	ErrKeyfileCorrupt = errors.New("keyfile cannot be opened")
)

// CredentialName is the systemd credential name of the keyfile: systemd-creds binds a
// sealed file to it, and the unit loads it with LoadCredentialEncrypted=<name>:<path>.
const CredentialName = "pve-vault-agent-unseal"

// keyfileVersion is written; version 1 (no operator token) is still read.
const keyfileVersion = 2

// maxRetired bounds how many earlier operator tokens a keyfile remembers.
const maxRetired = 4

// Keyfile is what the agent keeps of a Vault cluster: the unseal shares, its tokens, and
// metadata that tells one cluster's keyfile from another's.
type Keyfile struct {
	Version     int
	ClusterID   string
	ClusterName string
	Keyset      Keyset
	// SnapshotToken reads Raft snapshots; OperatorToken restores them, manages Raft peers
	// and authorises generate-root (Vault 2.x). Both are periodic and renewed by the daemon.
	SnapshotToken Token
	OperatorToken Token
	// RetiredOperatorTokens are operator tokens replaced by a rotation, newest first: a
	// snapshot taken before the rotation brings its token back when restored, and the
	// agent can use it to mint fresh ones.
	RetiredOperatorTokens []Token
	// Canary is the value init wrote at CanaryPath, read back by a restore drill.
	Canary string
	// ManifestKey authenticates off-host snapshot manifests (HMAC-SHA256).
	ManifestKey []byte
	Created     time.Time
	Rotated     time.Time
}

// Meta is the non-secret part, for `keyfile check` and status.
type Meta struct {
	Version          int       `json:"version"`
	ClusterID        string    `json:"cluster_id"`
	ClusterName      string    `json:"cluster_name"`
	Shares           int       `json:"shares"`
	Threshold        int       `json:"threshold"`
	Fingerprint      string    `json:"keyset_fingerprint"`
	HasToken         bool      `json:"snapshot_token"`
	HasOperatorToken bool      `json:"operator_token"`
	RetiredTokens    int       `json:"retired_operator_tokens,omitempty"`
	HasCanary        bool      `json:"canary"`
	Created          time.Time `json:"created"`
	Rotated          time.Time `json:"rotated,omitzero"`
	// ManifestKey is the fingerprint of the key off-host manifests are authenticated
	// with: what an operator writes down to pin a host-lost recovery to (recover --from
	// --manifest-key).
	ManifestKey string `json:"manifest_key,omitempty"`
}

// ManifestKeyFingerprint identifies a manifest key without revealing it.
func ManifestKeyFingerprint(key []byte) string {
	if len(key) == 0 {
		return ""
	}
	h := sha256.Sum256(append([]byte("pve-vault-agent manifest key\n"), key...))
	return "sha256:" + hex.EncodeToString(h[:8])
}

// Meta returns the non-secret metadata.
func (k *Keyfile) Meta() Meta {
	return Meta{Version: k.Version, ClusterID: k.ClusterID, ClusterName: k.ClusterName, Shares: len(k.Keyset.Keys),
		Threshold: k.Keyset.Threshold, Fingerprint: k.Keyset.Fingerprint(), HasToken: !k.SnapshotToken.Empty(),
		HasOperatorToken: !k.OperatorToken.Empty(), RetiredTokens: len(k.RetiredOperatorTokens), HasCanary: k.Canary != "",
		Created: k.Created, Rotated: k.Rotated, ManifestKey: ManifestKeyFingerprint(k.ManifestKey)}
}

// Retire records the current operator token as retired (newest first, bounded) before a
// rotation replaces it.
func (k *Keyfile) Retire() {
	if k.OperatorToken.Empty() {
		return
	}
	k.RetiredOperatorTokens = append([]Token{k.OperatorToken}, k.RetiredOperatorTokens...)
	if len(k.RetiredOperatorTokens) > maxRetired {
		k.RetiredOperatorTokens = k.RetiredOperatorTokens[:maxRetired]
	}
}

// Tokens lists every secret token value the keyfile holds, for leak scanners.
func (k *Keyfile) Tokens() []Token {
	return append([]Token{k.SnapshotToken, k.OperatorToken}, k.RetiredOperatorTokens...)
}

// payload is the sealed JSON; it exists only in memory and inside the sealed file.
type payload struct {
	Version       int       `json:"version"`
	ClusterID     string    `json:"cluster_id"`
	ClusterName   string    `json:"cluster_name"`
	Threshold     int       `json:"threshold"`
	Shares        []string  `json:"shares_b64"`
	Fingerprint   string    `json:"keyset_fingerprint"`
	SnapshotToken string    `json:"snapshot_token"`
	OperatorToken string    `json:"operator_token,omitempty"`
	Retired       []string  `json:"retired_operator_tokens,omitempty"`
	Canary        string    `json:"canary,omitempty"`
	ManifestKey   []byte    `json:"manifest_key,omitempty"`
	Created       time.Time `json:"created"`
	Rotated       time.Time `json:"rotated,omitzero"`
}

func (k *Keyfile) marshal() ([]byte, error) {
	p := payload{Version: keyfileVersion, ClusterID: k.ClusterID, ClusterName: k.ClusterName, Threshold: k.Keyset.Threshold,
		Fingerprint: k.Keyset.Fingerprint(), SnapshotToken: k.SnapshotToken.value, OperatorToken: k.OperatorToken.value,
		Canary: k.Canary, ManifestKey: k.ManifestKey, Created: k.Created.UTC(), Rotated: k.Rotated.UTC()}
	for _, s := range k.Keyset.Keys {
		p.Shares = append(p.Shares, s.value)
	}
	for _, t := range k.RetiredOperatorTokens {
		p.Retired = append(p.Retired, t.value)
	}
	return json.Marshal(p)
}

// Plaintext is the payload that is sealed, for sealing it on another host (keyfile
// enroll). The caller clears it after use.
func (k *Keyfile) Plaintext() ([]byte, error) { return k.marshal() }

// Digest identifies the keyfile's whole payload (shares, tokens, keys) without revealing
// it: two hosts hold the same keyfile when their digests match. It is the SHA-256 of
// Plaintext in hex, so a host can compute it from its own sealed copy
// (systemd-creds decrypt … | sha256sum) without the plaintext leaving it.
func (k *Keyfile) Digest() (string, error) {
	b, err := k.marshal()
	if err != nil {
		return "", err
	}
	defer clear(b)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:]), nil
}

// ParseKeyfile reads a decrypted keyfile payload (a systemd credential the service
// manager decrypted, or Open's output).
func ParseKeyfile(b []byte) (*Keyfile, error) {
	var p payload
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("%w: payload is not a keyfile: %v", ErrKeyfileCorrupt, err)
	}
	if p.Version < 1 || p.Version > keyfileVersion {
		return nil, fmt.Errorf("%w: version %d, this agent reads versions 1 to %d", ErrKeyfileCorrupt, p.Version, keyfileVersion)
	}
	if p.Threshold < 1 || len(p.Shares) < p.Threshold {
		return nil, fmt.Errorf("%w: %d shares for threshold %d", ErrKeyfileCorrupt, len(p.Shares), p.Threshold)
	}
	k := &Keyfile{Version: p.Version, ClusterID: p.ClusterID, ClusterName: p.ClusterName, SnapshotToken: Token{p.SnapshotToken},
		OperatorToken: Token{p.OperatorToken}, Canary: p.Canary, ManifestKey: p.ManifestKey, Created: p.Created, Rotated: p.Rotated}
	for _, t := range p.Retired {
		k.RetiredOperatorTokens = append(k.RetiredOperatorTokens, Token{t})
	}
	k.Keyset.Threshold = p.Threshold
	for i, s := range p.Shares {
		k.Keyset.Keys = append(k.Keyset.Keys, Key{Index: i + 1, value: s})
	}
	if fp := k.Keyset.Fingerprint(); p.Fingerprint != fp {
		return nil, fmt.Errorf("%w: keyset fingerprint %s does not match its shares (%s)", ErrKeyfileCorrupt, p.Fingerprint, fp)
	}
	return k, nil
}

// Sealer encrypts the keyfile on its way to disk and decrypts it on the way back.
type Sealer interface {
	Seal(ctx context.Context, plain []byte, out string) error
	Open(ctx context.Context, path string) ([]byte, error)
}

// SystemdCreds seals with `systemd-creds encrypt` (the host key, a TPM2, or both).
type SystemdCreds struct {
	// WithKey is --with-key: auto, host, tpm2 or host+tpm2.
	WithKey string
	// Bin is the systemd-creds binary (default: from PATH).
	Bin string
}

func (s SystemdCreds) bin() string {
	if s.Bin != "" {
		return s.Bin
	}
	return "systemd-creds"
}

// Seal writes the credential to out; the plaintext goes through a pipe only.
func (s SystemdCreds) Seal(ctx context.Context, plain []byte, out string) error {
	key := s.WithKey
	if key == "" {
		key = "auto"
	}
	cmd := exec.CommandContext(ctx, s.bin(), "encrypt", "--name="+CredentialName, "--with-key="+key, "-", out)
	cmd.Stdin = bytes.NewReader(plain)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("systemd-creds encrypt --with-key=%s: %v: %s", key, err, credsMessage(stderr.String()))
	}
	return nil
}

// Open decrypts path; a wrong name or another host's key is an error, never garbage.
func (s SystemdCreds) Open(ctx context.Context, path string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, s.bin(), "decrypt", "--name="+CredentialName, path, "-")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%w: systemd-creds decrypt %s: %v: %s (was it sealed on this host, under the name %s?)", ErrKeyfileCorrupt, path, err, credsMessage(stderr.String()), CredentialName)
	}
	return stdout.Bytes(), nil
}

// credsMessage keeps systemd-creds' errors and drops its routine warning about the host
// secret on unencrypted media.
func credsMessage(s string) string {
	var keep []string
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if l != "" && !strings.Contains(l, "not on encrypted media") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "; ")
}

// Age seals with age: to Recipient, opened with Identity (either may be nil for a
// one-way use such as the offline recovery copy).
type Age struct {
	Recipient age.Recipient
	Identity  age.Identity
}

// Seal encrypts to the recipient and writes out.
func (a Age) Seal(_ context.Context, plain []byte, out string) error {
	if a.Recipient == nil {
		return errors.New("age: no recipient to seal to")
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	w, err := age.Encrypt(f, a.Recipient)
	if err == nil {
		_, err = w.Write(plain)
		if cerr := w.Close(); err == nil {
			err = cerr
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Open decrypts path with the identity.
func (a Age) Open(_ context.Context, path string) ([]byte, error) {
	if a.Identity == nil {
		return nil, errors.New("age: no identity to open the keyfile with (vault.age_identity)")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r, err := age.Decrypt(io.LimitReader(f, maxKeyfile+1), a.Identity)
	if err != nil {
		return nil, fmt.Errorf("%w: age: %v (is vault.age_identity the key it was sealed to?)", ErrKeyfileCorrupt, err)
	}
	b, err := io.ReadAll(io.LimitReader(r, maxKeyfile+1))
	if err == nil && len(b) > maxKeyfile {
		clear(b)
		return nil, fmt.Errorf("%w: %s decrypts to more than %d bytes: not a keyfile", ErrKeyfileCorrupt, path, maxKeyfile)
	}
	return b, err
}

// maxKeyfile bounds a keyfile's plaintext (a few KiB: shares, tokens, keys).
const maxKeyfile = 1 << 20

// WriteKeyfile seals k into path atomically: a temp file in the same directory (0700,
// created if missing) receives the sealed bytes, is fsynced, renamed over path, and the
// directory is fsynced. With exclusive, an existing path is an error (init never
// overwrites keys).
func WriteKeyfile(ctx context.Context, path string, k *Keyfile, s Sealer, exclusive bool) error {
	if exclusive {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("%w: %s", ErrKeyfileExists, path)
		}
	}
	p, err := PrepareKeyfile(ctx, path, k, s)
	if err != nil {
		return err
	}
	if err := p.Commit(exclusive); err != nil {
		p.Abort()
		return err
	}
	return nil
}

// PendingKeyfile is a keyfile sealed and flushed into a temporary file beside its path,
// not yet in place: several are prepared, then committed together, so a failure to seal
// any of them changes nothing.
type PendingKeyfile struct {
	path, tmp string
}

// PrepareKeyfile seals k into a temporary file beside path (0600, fsynced).
func PrepareKeyfile(ctx context.Context, path string, k *Keyfile, s Sealer) (*PendingKeyfile, error) {
	dir := filepath.Dir(path)
	if err := safefile.PrivateDir(dir); err != nil {
		return nil, fmt.Errorf("keyfile directory: %w", err)
	}
	plain, err := k.marshal()
	if err != nil {
		return nil, err
	}
	defer clear(plain)
	tmp, err := os.CreateTemp(dir, ".keyfile-*.tmp")
	if err != nil {
		return nil, err
	}
	p := &PendingKeyfile{path: path, tmp: tmp.Name()}
	tmp.Close()
	if err := s.Seal(ctx, plain, p.tmp); err != nil {
		p.Abort()
		return nil, fmt.Errorf("seal %s: %w", filepath.Base(path), err)
	}
	if err := os.Chmod(p.tmp, 0o600); err != nil {
		p.Abort()
		return nil, err
	}
	if err := safefile.SyncFile(p.tmp); err != nil {
		p.Abort()
		return nil, err
	}
	return p, nil
}

// Commit puts the keyfile in place (exclusive: never over an existing one) and fsyncs
// the directory.
func (p *PendingKeyfile) Commit(exclusive bool) error {
	if exclusive {
		// Link fails if path appeared meanwhile: never replace another init's keys.
		if err := os.Link(p.tmp, p.path); err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("%w: %s", ErrKeyfileExists, p.path)
			}
			return err
		}
		_ = os.Remove(p.tmp)
	} else if err := os.Rename(p.tmp, p.path); err != nil {
		return err
	}
	return safefile.SyncDir(filepath.Dir(p.path))
}

// Abort removes the temporary file.
func (p *PendingKeyfile) Abort() { _ = os.Remove(p.tmp) }

// ReadKeyfile decrypts the keyfile at path with s. It reads exactly that path: where a
// service reads a credential the service manager decrypted instead, the caller says so
// (ParseKeyfile), never the environment.
func ReadKeyfile(ctx context.Context, path string, s Sealer) (*Keyfile, error) {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w at %s", ErrNoKeyfile, path)
	}
	b, err := s.Open(ctx, path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	return ParseKeyfile(b)
}

// KeyfileExists reports whether a keyfile is at path.
func KeyfileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
