// Package vault owns the Vault side: the API of each Vault server pod through
// github.com/hashicorp/vault/api (seal status, init, unseal, generate-root, the
// least-privilege snapshot token), and the sealed keyfile that holds the unseal shares.
//
// Invariants: unseal shares and tokens live only in Key and Token values, whose every
// printed form is redacted; the keyfile is never written in plaintext (systemd-creds or
// age seal it on the way to disk, written atomically with mode 0600 in a 0700
// directory); shares from another cluster are detected at the threshold, progress is
// reset and the keyset is not retried. Every call takes a context.
//
// It imports only the standard library, Vault's API module and age; never the agent or
// another domain package (enforced by internal/deptest).
package vault
