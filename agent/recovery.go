package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// The keyfile's offline recovery copy (<keyfile>.recovery.age) is the keyfile sealed to
// an age public key whose private half the operator keeps off the host. Which key it
// was sealed to is recorded beside it (<keyfile>.recovery.json, public data), so a
// recipient changed in the configuration (a replaced offline key, or init run with
// another --recovery-recipient) re-seals the copy, and the next push sends it off-host.

// RecoveryRecord says what the local recovery copy was sealed to.
type RecoveryRecord struct {
	Recipient string `json:"recipient"`
	SHA256    string `json:"sha256"` // of the sealed copy: off-host it is keyfile/recovery-<sha256[:24]>.age
}

func (e *Env) recoveryPath() string       { return e.Config.Vault.Keyfile + ".recovery.age" }
func (e *Env) recoveryRecordPath() string { return e.Config.Vault.Keyfile + ".recovery.json" }

// RecoveryRecordOf reads what the local recovery copy was sealed to (zero: unknown, a
// copy written before the agent recorded it, or none).
func RecoveryRecordOf(e *Env) RecoveryRecord {
	var r RecoveryRecord
	b, err := os.ReadFile(e.recoveryRecordPath())
	if err == nil {
		_ = json.Unmarshal(b, &r)
	}
	return r
}

// recoveryRecipient is the key the recovery copy must be sealed to: the configured
// vault.recovery_recipient, else the one init was given.
func (e *Env) recoveryRecipient() string {
	if r := e.Config.Vault.RecoveryRecipient; r != "" {
		return r
	}
	return RecoveryRecordOf(e).Recipient
}

// sameRecipient compares two age public keys as keys (a case or spacing difference in
// the configuration is the same key).
func sameRecipient(a, b string) bool {
	ra, err1 := age.ParseX25519Recipient(strings.TrimSpace(a))
	rb, err2 := age.ParseX25519Recipient(strings.TrimSpace(b))
	return err1 == nil && err2 == nil && ra.String() == rb.String()
}

// writeKeyfile rewrites the keyfile and, when a recipient is known, its offline recovery
// copy, all or nothing: both are sealed into temporary files first; only when both
// sealed (a bad recipient, a full disk fail here) do they go in place, keyfile first.
func (e *Env) writeKeyfile(ctx context.Context, kf *vault.Keyfile, exclusive bool) error {
	return e.writeKeyfileFor(ctx, kf, exclusive, e.recoveryRecipient())
}

func (e *Env) writeKeyfileFor(ctx context.Context, kf *vault.Keyfile, exclusive bool, recipient string) error {
	main, err := e.Keyfile.prepare(ctx, kf)
	if err != nil {
		return err
	}
	var rec *vault.PendingKeyfile
	if recipient != "" {
		rs, err := recoverySealer(recipient)
		if err == nil {
			rec, err = vault.PrepareKeyfile(ctx, e.recoveryPath(), kf, rs)
		}
		if err != nil {
			main.Abort()
			return fmt.Errorf("the offline recovery copy (nothing was written): %w", err)
		}
	}
	if err := e.Keyfile.commit(main, exclusive); err != nil {
		main.Abort()
		if rec != nil {
			rec.Abort()
		}
		return err
	}
	if rec == nil {
		return nil
	}
	if err := rec.Commit(false); err != nil {
		rec.Abort()
		return fmt.Errorf("%w (the next backup writes it): %v", errRecoveryBehind, err)
	}
	if err := e.recordRecovery(recipient); err != nil {
		return fmt.Errorf("%w: %v", errRecoveryBehind, err)
	}
	return nil
}

// errRecoveryBehind: the keyfile went in place, its recovery copy (or the record of it)
// did not. The keyfile is the truth; the copy is written again at the next backup.
var errRecoveryBehind = errors.New("the keyfile is written but its offline recovery copy is not")

// recordRecovery notes what the local recovery copy is sealed to.
func (e *Env) recordRecovery(recipient string) error {
	b, err := os.ReadFile(e.recoveryPath())
	if err != nil {
		return err
	}
	sum := sha256.Sum256(b)
	return writeJSONAtomic(e.recoveryRecordPath(), RecoveryRecord{Recipient: strings.TrimSpace(recipient), SHA256: hex.EncodeToString(sum[:])})
}

// recoveryCopy is the local path of the keyfile's recovery copy, sealed to the configured
// recipient: written now when missing, sealed again when the configuration names
// another key than the copy was sealed to (or the copy predates the record).
func (e *Env) recoveryCopy(ctx context.Context, kf *vault.Keyfile) (string, error) {
	p := e.recoveryPath()
	want := e.Config.Vault.RecoveryRecipient
	_, statErr := os.Stat(p)
	if statErr == nil && (want == "" || sameRecipient(RecoveryRecordOf(e).Recipient, want)) {
		return p, nil
	}
	if want == "" {
		return "", errors.New("no recovery copy and no vault.recovery_recipient to seal one to")
	}
	rs, err := recoverySealer(want)
	if err != nil {
		return "", err
	}
	if statErr == nil {
		e.Log.Warn("the recovery copy was sealed to another key than vault.recovery_recipient: sealing it again", "was", RecoveryRecordOf(e).Recipient, "now", want)
	}
	if err := vault.WriteKeyfile(ctx, p, kf, rs, false); err != nil {
		return "", fmt.Errorf("write the recovery copy: %w", err)
	}
	return p, e.recordRecovery(want)
}
