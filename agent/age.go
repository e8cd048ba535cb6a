package agent

import (
	"bytes"
	"fmt"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

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
