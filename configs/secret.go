package configs

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
)

// SecretRef names where a secret lives: a file (mode 0600 or tighter) or a systemd
// credential (read from $CREDENTIALS_DIRECTORY, as loaded by LoadCredentialEncrypted=).
// It never holds the secret itself, so printing a Config is always safe.
type SecretRef struct {
	File       string `mapstructure:"file" json:"file,omitempty"`
	Credential string `mapstructure:"credential" json:"credential,omitempty"`
	// sealed is the credential's encrypted file (credentials_dir/NAME.cred), set by
	// Load: a verb run by hand, outside the unit, decrypts it with systemd-creds.
	sealed string
}

// IsSet reports whether the reference names a source.
func (r SecretRef) IsSet() bool { return r.File != "" || r.Credential != "" }

// String describes the source, never the value.
func (r SecretRef) String() string {
	switch {
	case r.Credential != "":
		return "credential " + r.Credential
	case r.File != "":
		return "file " + r.File
	}
	return "unset"
}

// ErrInsecureSecretFile is wrapped when a secret file is open to group or others, or
// owned by another user.
var ErrInsecureSecretFile = safefile.ErrInsecure

// maxSecret bounds a secret file (a kubeconfig is a few KiB).
const maxSecret = 1 << 20

// Read loads the secret. A file is opened without following a symlink and checked on
// the open descriptor: a regular file owned by root (or the agent's user) with no
// permission for group or others. A credential is read the same way from
// $CREDENTIALS_DIRECTORY under the unit; a verb run by hand (no such directory)
// decrypts the credential's file in credentials_dir with systemd-creds, as the unit's
// LoadCredentialEncrypted= does. Errors name the source and the fix, never the content.
func (r SecretRef) Read() (Secret, error) {
	switch {
	case r.Credential != "":
		if dir := os.Getenv("CREDENTIALS_DIRECTORY"); dir != "" {
			b, err := safefile.ReadSecret(filepath.Join(dir, r.Credential), maxSecret)
			if errors.Is(err, os.ErrNotExist) {
				return Secret{}, fmt.Errorf("credential %q: the service does not load it: add LoadCredentialEncrypted=%s:%s to the unit (`pve-vault-agent config check` prints the drop-in)", r.Credential, r.Credential, r.sealedOr())
			}
			if err != nil {
				return Secret{}, fmt.Errorf("credential %q: %w", r.Credential, err)
			}
			return Secret{b: b}, nil
		}
		if r.sealed == "" {
			return Secret{}, fmt.Errorf("credential %q: $CREDENTIALS_DIRECTORY is not set and no credentials_dir is known; run under systemd with LoadCredentialEncrypted=%s:… or use a file reference", r.Credential, r.Credential)
		}
		b, err := decryptCredential(r.Credential, r.sealed)
		if err != nil {
			return Secret{}, err
		}
		return Secret{b: b}, nil
	case r.File != "":
		b, err := safefile.ReadSecret(r.File, maxSecret)
		if err != nil {
			return Secret{}, fmt.Errorf("secret file: %w", err)
		}
		return Secret{b: b}, nil
	}
	return Secret{}, errors.New("secret reference is empty: set file or credential")
}

func (r SecretRef) sealedOr() string {
	if r.sealed != "" {
		return r.sealed
	}
	return "/etc/pve-vault-agent/credentials/" + r.Credential + ".cred"
}

// decryptCredential decrypts an encrypted credential file as the service manager would,
// the plaintext through a pipe only.
func decryptCredential(name, path string) ([]byte, error) {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("credential %q: %s does not exist; create it with `systemd-creds encrypt --name=%s - %s` (the secret on stdin)", name, path, name, path)
	}
	cmd := exec.Command("systemd-creds", "decrypt", "--name="+name, path, "-")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &limitWriter{w: &out, n: maxSecret}, &stderr
	if err := cmd.Run(); err != nil {
		clear(out.Bytes())
		return nil, fmt.Errorf("credential %q: systemd-creds decrypt %s: %v: %s (was it sealed on this host, with --name=%s?)", name, path, err, strings.TrimSpace(lastLine(stderr.String())), name)
	}
	return out.Bytes(), nil
}

// limitWriter fails a write beyond n bytes: a credential larger than any secret.
type limitWriter struct {
	w *bytes.Buffer
	n int
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.w.Len()+len(p) > l.n {
		return 0, errors.New("credential too large")
	}
	return l.w.Write(p)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// NamedRef is a secret reference with its key path.
type NamedRef struct {
	Key string
	Ref *SecretRef
}

// SecretRefs lists every secret reference that is set, with its key path.
func (c *Config) SecretRefs() []NamedRef {
	all := []NamedRef{{"proxmox.token_secret", &c.Proxmox.TokenSecret}, {"ssh.identity", &c.SSH.Identity},
		{"kubernetes.kubeconfig", &c.Kubernetes.Kubeconfig}, {"kubernetes.install_kubeconfig", &c.Kubernetes.InstallKubeconfig},
		{"vault.age_identity", &c.Vault.AgeIdentity}}
	for i := range c.Snapshots.Targets {
		t := &c.Snapshots.Targets[i]
		at := fmt.Sprintf("snapshots.targets[%d]", i)
		all = append(all, NamedRef{at + ".identity", &t.Identity}, NamedRef{at + ".access_key", &t.AccessKey}, NamedRef{at + ".secret_key", &t.SecretKey})
	}
	for i := range c.Notify.Targets {
		t := &c.Notify.Targets[i]
		at := fmt.Sprintf("notify.targets[%d]", i)
		all = append(all, NamedRef{at + ".password", &t.Password}, NamedRef{at + ".hmac_key", &t.HMACKey}, NamedRef{at + ".service_url", &t.ServiceURL})
	}
	var out []NamedRef
	for _, r := range all {
		if r.Ref.IsSet() {
			out = append(out, r)
		}
	}
	return out
}

// SealedCredential is where credential name's encrypted file is.
func (c *Config) SealedCredential(name string) string {
	return filepath.Join(c.CredentialsDir, name+".cred")
}

// Secret holds secret bytes. Every way of printing it redacts.
type Secret struct{ b []byte }

// NewSecret wraps b; the caller gives up ownership.
func NewSecret(b []byte) Secret { return Secret{b: b} }

// Bytes returns the secret for handing to an SDK. Do not log or wrap it in errors.
func (s Secret) Bytes() []byte { return s.b }

// Trimmed returns the secret without surrounding whitespace (files often end in "\n").
func (s Secret) Trimmed() string { return strings.TrimSpace(string(s.b)) }

// Empty reports whether the secret has no content.
func (s Secret) Empty() bool { return len(strings.TrimSpace(string(s.b))) == 0 }

const redacted = "[redacted]"

func (Secret) String() string                { return redacted }
func (Secret) GoString() string              { return redacted }
func (Secret) LogValue() slog.Value          { return slog.StringValue(redacted) }
func (Secret) MarshalJSON() ([]byte, error)  { return []byte(strconv.Quote(redacted)), nil }
func (Secret) MarshalText() ([]byte, error)  { return []byte(redacted), nil }
func (Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(redacted)) }

// Mode is a file mode written in the config as a quoted octal string ("0700").
type Mode uint32

// String renders the mode as four octal digits.
func (m Mode) String() string { return fmt.Sprintf("%04o", uint32(m)) }

// MarshalJSON renders the mode as the same string the config takes.
func (m Mode) MarshalJSON() ([]byte, error) { return []byte(strconv.Quote(m.String())), nil }

// MarshalYAML renders the mode as the same string the config takes.
func (m Mode) MarshalYAML() (any, error) { return m.String(), nil }

// ParseMode parses an octal mode such as "0700" or "750".
func ParseMode(s string) (Mode, error) {
	s = strings.TrimPrefix(strings.TrimSpace(s), "0o")
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o7777 {
		return 0, fmt.Errorf("%q is not an octal file mode like \"0700\"", s)
	}
	return Mode(v), nil
}
