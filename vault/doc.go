// Package vault owns the Vault side: the API of each Vault server pod through
// github.com/hashicorp/vault/api (seal status, health, init, unseal, the agent's
// least-privilege periodic tokens, generate-root, Raft snapshots and membership), and
// the sealed keyfile that holds the unseal shares and tokens.
//
// Invariants: unseal shares and tokens live only in Key and Token values, whose every
// printed form is redacted; the keyfile is never written in plaintext (systemd-creds or
// age seal it on the way to disk, written atomically with mode 0600 in a 0700
// directory that is never re-moded); shares from another cluster are detected at the
// threshold and progress is reset. Nothing of the process environment (VAULT_*) reaches
// a client. Small calls carry a 15 s timeout; snapshot streams only their context and an
// idle deadline. No generate-root call goes out without a token (Vault 2.x), and an
// operator's attempt in progress is never cancelled. Waiting is the caller's business:
// this package polls nothing.
//
// It imports only the standard library, Vault's API module and age; never the agent or
// another domain package (enforced by internal/deptest).
package vault
