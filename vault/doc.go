// Package vault owns the Vault API side (github.com/hashicorp/vault/api): health, init,
// unseal, Raft snapshots and restore, and the sealed keyfile that holds the unseal
// shares. It imports only the standard library and Vault's API module; never the agent
// or another domain package (enforced by internal/deptest).
package vault
