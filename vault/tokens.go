package vault

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/hashicorp/vault/api"
)

// The agent's least-privilege policies. Neither token has the default policy, so each
// policy lists the token paths its holder needs to look up, renew and revoke itself:
// Vault never renews a token because it was used.
const (
	SnapshotPolicyName = "pve-vault-agent-snapshot"
	SnapshotPolicy     = `# Managed by pve-vault-agent: take Raft snapshots and keep this token alive.
path "sys/storage/raft/snapshot" {
  capabilities = ["read"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
`
	OperatorPolicyName = "pve-vault-agent-operator"
	OperatorPolicy     = `# Managed by pve-vault-agent: restore, recover, upgrade and token rotation.
# Restore a snapshot (restore, recover, drill).
path "sys/storage/raft/snapshot" {
  capabilities = ["update"]
}
path "sys/storage/raft/snapshot-force" {
  capabilities = ["update"]
}
# Raft membership: stale peers after a node rebuild, voters during an upgrade.
path "sys/storage/raft/configuration" {
  capabilities = ["read"]
}
path "sys/storage/raft/remove-peer" {
  capabilities = ["update"]
}
path "sys/storage/raft/autopilot/state" {
  capabilities = ["read"]
}
# Step the active node down before rolling it last (upgrade).
path "sys/step-down" {
  capabilities = ["update", "sudo"]
}
# Vault 2.x gates generate-root behind a token (CVE-2026-5807): token rotate mints new
# agent tokens from the shares with it.
path "sys/generate-root/attempt" {
  capabilities = ["read", "update", "delete", "sudo"]
}
path "sys/generate-root/update" {
  capabilities = ["update", "sudo"]
}
# A short-lived marker token proves when a restore has been applied (Vault 2.x restores
# in the background after the upload returns).
path "auth/token/create" {
  capabilities = ["update"]
}
# The canary written at init, read back by a restore drill.
path "pve-vault-agent/canary" {
  capabilities = ["read"]
}
# Ask what this token may do (no default policy to grant it).
path "sys/capabilities-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
`
)

// CanaryMount and CanaryPath are where init writes the canary a drill reads back.
const (
	CanaryMount = "pve-vault-agent"
	CanaryPath  = CanaryMount + "/canary"
)

// ErrTokenRefused means Vault rejected the agent's token (403): revoked, expired, or
// missing a capability.
var ErrTokenRefused = errors.New("token refused")

// AgentTokens are the periodic orphan tokens the agent keeps in its keyfile.
type AgentTokens struct {
	Snapshot Token
	Operator Token
}

// Setup is what init (and token rotate) put into Vault with a root token: the two
// policies, a kv mount holding the canary, and two periodic orphan tokens.
type Setup struct {
	Period time.Duration
	// Canary is written at CanaryPath when not empty (init only).
	Canary string
}

// CreateAgentTokens writes the agent's policies (and the canary when asked) and creates
// its periodic orphan tokens, using root.
func (n *Node) CreateAgentTokens(ctx context.Context, root Token, s Setup) (AgentTokens, error) {
	c, err := n.withToken(root)
	if err != nil {
		return AgentTokens{}, err
	}
	for name, body := range map[string]string{SnapshotPolicyName: SnapshotPolicy, OperatorPolicyName: OperatorPolicy} {
		if err := c.Sys().PutPolicyWithContext(ctx, name, body); err != nil {
			return AgentTokens{}, fmt.Errorf("%s: write policy %s: %w", n.Name, name, err)
		}
	}
	if s.Canary != "" {
		mounts, err := c.Sys().ListMountsWithContext(ctx)
		if err != nil {
			return AgentTokens{}, fmt.Errorf("%s: list mounts: %w", n.Name, err)
		}
		if _, ok := mounts[CanaryMount+"/"]; !ok {
			if err := c.Sys().MountWithContext(ctx, CanaryMount, &api.MountInput{Type: "kv", Description: canaryDescription}); err != nil {
				return AgentTokens{}, fmt.Errorf("%s: mount %s: %w", n.Name, CanaryMount, err)
			}
		}
		if _, err := c.Logical().WriteWithContext(ctx, CanaryPath, map[string]any{"value": s.Canary}); err != nil {
			return AgentTokens{}, fmt.Errorf("%s: write the canary: %w", n.Name, err)
		}
	}
	var out AgentTokens
	for _, t := range []struct {
		dst    *Token
		policy string
	}{{&out.Snapshot, SnapshotPolicyName}, {&out.Operator, OperatorPolicyName}} {
		sec, err := c.Auth().Token().CreateOrphanWithContext(ctx, &api.TokenCreateRequest{
			Policies:        []string{t.policy},
			NoDefaultPolicy: true,
			Period:          s.Period.String(),
			DisplayName:     t.policy,
			Metadata:        map[string]string{"managed-by": "pve-vault-agent"},
		})
		if err != nil {
			return AgentTokens{}, fmt.Errorf("%s: create the %s token: %w", n.Name, t.policy, err)
		}
		*t.dst = Token{sec.Auth.ClientToken}
	}
	return out, nil
}

// canaryDescription marks the canary mount as the agent's own.
const canaryDescription = "pve-vault-agent: restore drill canary"

// ForeignAgentObjects lists what already sits in Vault under the names
// CreateAgentTokens writes and is not what it would write: a policy of the agent's name
// with another body, a mount at CanaryMount the agent did not make. Adopting a Vault
// the agent did not initialise must not overwrite them.
func (n *Node) ForeignAgentObjects(ctx context.Context, tok Token) ([]string, error) {
	c, err := n.withToken(tok)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, p := range []struct{ name, body string }{{SnapshotPolicyName, SnapshotPolicy}, {OperatorPolicyName, OperatorPolicy}} {
		got, err := c.Sys().GetPolicyWithContext(ctx, p.name)
		if err != nil {
			return nil, fmt.Errorf("%s: read policy %s: %w", n.Name, p.name, err)
		}
		if got != "" && got != p.body {
			out = append(out, "policy "+p.name+" (another body)")
		}
	}
	mounts, err := c.Sys().ListMountsWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: list mounts: %w", n.Name, err)
	}
	if m, ok := mounts[CanaryMount+"/"]; ok && m.Description != canaryDescription {
		out = append(out, fmt.Sprintf("mount %s/ (type %s, %q)", CanaryMount, m.Type, m.Description))
	}
	return out, nil
}

// TokenInfo is the non-secret part of auth/token/lookup-self.
type TokenInfo struct {
	Accessor   string        `json:"accessor"`
	TTL        time.Duration `json:"ttl"`
	Period     time.Duration `json:"period"`
	ExpireTime time.Time     `json:"expire_time"`
	Policies   []string      `json:"policies"`
}

// LookupSelf reads t's own metadata. A refused token is ErrTokenRefused.
func (n *Node) LookupSelf(ctx context.Context, t Token) (TokenInfo, error) {
	c, err := n.withToken(t)
	if err != nil {
		return TokenInfo{}, err
	}
	sec, err := c.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		return TokenInfo{}, n.tokenError("token lookup", err)
	}
	return tokenInfo(sec)
}

// RenewSelf renews t for its period and returns what Vault then reports.
func (n *Node) RenewSelf(ctx context.Context, t Token) (TokenInfo, error) {
	c, err := n.withToken(t)
	if err != nil {
		return TokenInfo{}, err
	}
	if _, err := c.Auth().Token().RenewSelfWithContext(ctx, 0); err != nil {
		return TokenInfo{}, n.tokenError("token renew", err)
	}
	return n.LookupSelf(ctx, t)
}

func (n *Node) tokenError(op string, err error) error {
	if IsPermissionDenied(err) {
		return fmt.Errorf("%s: %s: %w (revoked or expired)", n.Name, op, ErrTokenRefused)
	}
	return fmt.Errorf("%s: %s: %w", n.Name, op, err)
}

func tokenInfo(sec *api.Secret) (TokenInfo, error) {
	if sec == nil || sec.Data == nil {
		return TokenInfo{}, errors.New("empty token lookup")
	}
	var ti TokenInfo
	ti.Accessor, _ = sec.Data["accessor"].(string)
	ti.TTL = seconds(sec.Data["ttl"])
	ti.Period = seconds(sec.Data["period"])
	if s, ok := sec.Data["expire_time"].(string); ok && s != "" {
		ti.ExpireTime, _ = time.Parse(time.RFC3339Nano, s)
	}
	if ps, ok := sec.Data["policies"].([]any); ok {
		for _, p := range ps {
			if s, ok := p.(string); ok {
				ti.Policies = append(ti.Policies, s)
			}
		}
	}
	return ti, nil
}

func seconds(v any) time.Duration {
	switch n := v.(type) {
	case json.Number:
		f, _ := n.Float64()
		return time.Duration(f * float64(time.Second))
	case float64:
		return time.Duration(n * float64(time.Second))
	case int64:
		return time.Duration(n) * time.Second
	}
	return 0
}

// RevokeSelf revokes t (the initial root token once setup is done, a generated root
// token after use, an old agent token after rotation).
func (n *Node) RevokeSelf(ctx context.Context, t Token) error {
	c, err := n.withToken(t)
	if err != nil {
		return err
	}
	if err := c.Auth().Token().RevokeSelfWithContext(ctx, ""); err != nil {
		return fmt.Errorf("%s: revoke token: %w", n.Name, err)
	}
	return nil
}

// CreateMarker creates a short-lived child of op. It exists only in the running data:
// once a restore has been applied, Vault no longer knows it.
func (n *Node) CreateMarker(ctx context.Context, op Token) (Token, error) {
	c, err := n.withToken(op)
	if err != nil {
		return Token{}, err
	}
	sec, err := c.Auth().Token().CreateWithContext(ctx, &api.TokenCreateRequest{
		Policies: []string{OperatorPolicyName}, NoDefaultPolicy: true, TTL: "15m", DisplayName: "pve-vault-agent-restore-marker",
	})
	if err != nil {
		return Token{}, n.tokenError("create a restore marker token", err)
	}
	return Token{sec.Auth.ClientToken}, nil
}

// ErrGenerateRootInProgress means someone else's generate-root attempt is running; the
// agent never cancels it.
var ErrGenerateRootInProgress = errors.New("a generate-root attempt is already in progress")

// GenerateRootOptions authorise and identify a generate-root attempt.
type GenerateRootOptions struct {
	// Auth is the token sent with every sys/generate-root call: Vault 2.x refuses them
	// without one (CVE-2026-5807). The agent uses its operator token.
	Auth Token
	// OwnNonce is the nonce of an attempt this agent started and did not finish (a
	// killed run); only that attempt is cancelled. Any other attempt in progress is an
	// operator's and is refused with ErrGenerateRootInProgress.
	OwnNonce string
	// Started, when set, records the nonce before the first share is sent.
	Started func(nonce string) error
}

// GenerateRoot creates a short-lived root token from the unseal keys (sys/generate-root
// with a one-time pad), for token rotation. The caller revokes it right after use.
func (n *Node) GenerateRoot(ctx context.Context, ks Keyset, o GenerateRootOptions) (Token, error) {
	c, err := n.withToken(o.Auth)
	if err != nil {
		return Token{}, err
	}
	sys := c.Sys()
	st, err := sys.GenerateRootStatusWithContext(ctx)
	if err != nil {
		return Token{}, n.tokenError("generate-root status", err)
	}
	if st.Started {
		if o.OwnNonce == "" || st.Nonce != o.OwnNonce {
			return Token{}, fmt.Errorf("%s: %w (nonce %s, progress %d/%d): the agent does not cancel another's attempt", n.Name, ErrGenerateRootInProgress, st.Nonce, st.Progress, st.Required)
		}
		if err := sys.GenerateRootCancelWithContext(ctx); err != nil {
			return Token{}, fmt.Errorf("%s: cancel the agent's own interrupted generate-root: %w", n.Name, err)
		}
	}
	otp, err := randomOTP(st.OTPLength)
	if err != nil {
		return Token{}, err
	}
	st, err = sys.GenerateRootInitWithContext(ctx, otp, "")
	if err != nil {
		return Token{}, n.tokenError("generate-root init", err)
	}
	if o.Started != nil {
		if err := o.Started(st.Nonce); err != nil {
			_ = sys.GenerateRootCancelWithContext(ctx)
			return Token{}, err
		}
	}
	for _, k := range ks.Keys[:min(len(ks.Keys), max(st.Required, ks.Threshold))] {
		st, err = sys.GenerateRootUpdateWithContext(ctx, k.value, st.Nonce)
		if err != nil {
			_ = sys.GenerateRootCancelWithContext(ctx)
			if isAuthFailure(err) {
				return Token{}, fmt.Errorf("%s: generate-root: %w", n.Name, ErrWrongKeys)
			}
			return Token{}, fmt.Errorf("%s: generate-root with share #%d: %w", n.Name, k.Index, scrub(err, ks))
		}
		if st.Complete {
			break
		}
	}
	if !st.Complete {
		_ = sys.GenerateRootCancelWithContext(ctx)
		return Token{}, fmt.Errorf("%s: generate-root did not complete with %d shares", n.Name, ks.Threshold)
	}
	enc := st.EncodedToken
	if enc == "" {
		enc = st.EncodedRootToken
	}
	raw, err := base64.RawStdEncoding.DecodeString(enc)
	if err != nil {
		return Token{}, fmt.Errorf("%s: decode generated token: %w", n.Name, err)
	}
	if len(raw) != len(otp) {
		return Token{}, fmt.Errorf("%s: generated token length %d does not match the one-time pad", n.Name, len(raw))
	}
	tok := make([]byte, len(raw))
	for i := range raw {
		tok[i] = raw[i] ^ otp[i]
	}
	return Token{string(tok)}, nil
}

// GenerateRootStatus reports whether an attempt is in progress and its nonce.
func (n *Node) GenerateRootStatus(ctx context.Context, auth Token) (started bool, nonce string, err error) {
	c, err := n.withToken(auth)
	if err != nil {
		return false, "", err
	}
	st, err := c.Sys().GenerateRootStatusWithContext(ctx)
	if err != nil {
		return false, "", n.tokenError("generate-root status", err)
	}
	return st.Started, st.Nonce, nil
}

const otpAlphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

func randomOTP(n int) (string, error) {
	if n <= 0 {
		n = 28
	}
	b := make([]byte, n)
	for i := range b {
		v, err := rand.Int(rand.Reader, big.NewInt(int64(len(otpAlphabet))))
		if err != nil {
			return "", err
		}
		b[i] = otpAlphabet[v.Int64()]
	}
	return string(b), nil
}

// Write writes data at path with tok (tests and the agent's own checks).
func (n *Node) Write(ctx context.Context, tok Token, path string, data map[string]any) error {
	c, err := n.withToken(tok)
	if err != nil {
		return err
	}
	if _, err := c.Logical().WriteWithContext(ctx, path, data); err != nil {
		return fmt.Errorf("%s: write %s: %w", n.Name, path, err)
	}
	return nil
}

// Read returns the "value" field at path.
func (n *Node) Read(ctx context.Context, tok Token, path string) (string, error) {
	c, err := n.withToken(tok)
	if err != nil {
		return "", err
	}
	sec, err := c.Logical().ReadWithContext(ctx, path)
	if err != nil {
		return "", n.tokenError("read "+path, err)
	}
	if sec == nil {
		return "", fmt.Errorf("%s: %s not found", n.Name, path)
	}
	v, _ := sec.Data["value"].(string)
	return v, nil
}

// List returns the keys at path with tok (tests count token accessors with it).
func (n *Node) List(ctx context.Context, tok Token, path string) ([]string, error) {
	c, err := n.withToken(tok)
	if err != nil {
		return nil, err
	}
	sec, err := c.Logical().ListWithContext(ctx, path)
	if err != nil {
		return nil, n.tokenError("list "+path, err)
	}
	if sec == nil || sec.Data == nil {
		return nil, nil
	}
	raw, _ := sec.Data["keys"].([]any)
	out := make([]string, 0, len(raw))
	for _, k := range raw {
		if s, ok := k.(string); ok {
			out = append(out, s)
		}
	}
	return out, nil
}
