package configs

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
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
// $CREDENTIALS_DIRECTORY. Errors name the source and the fix, never the content.
func (r SecretRef) Read() (Secret, error) {
	switch {
	case r.Credential != "":
		dir := os.Getenv("CREDENTIALS_DIRECTORY")
		if dir == "" {
			return Secret{}, fmt.Errorf("credential %q: $CREDENTIALS_DIRECTORY is not set; run under systemd with LoadCredentialEncrypted=%s:… or use a file reference", r.Credential, r.Credential)
		}
		b, err := safefile.ReadSecret(filepath.Join(dir, r.Credential), maxSecret)
		if err != nil {
			return Secret{}, fmt.Errorf("credential %q: %w", r.Credential, err)
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
