package vault

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"

	"github.com/hashicorp/vault/api"
)

// SnapshotPolicy is the least privilege the agent's daemon token holds: reading a Raft
// snapshot (and looking after its own token).
const (
	SnapshotPolicyName = "pve-vault-agent-snapshot"
	SnapshotPolicy     = `# Managed by pve-vault-agent: take Raft snapshots, nothing else.
path "sys/storage/raft/snapshot" {
  capabilities = ["read"]
}
`
)

// CreateSnapshotToken writes the snapshot policy and creates a periodic orphan token
// holding only it (renewed by use, never expiring while the agent runs), using admin.
func (n *Node) CreateSnapshotToken(ctx context.Context, admin Token) (Token, error) {
	c, err := n.withToken(admin)
	if err != nil {
		return Token{}, err
	}
	if err := c.Sys().PutPolicyWithContext(ctx, SnapshotPolicyName, SnapshotPolicy); err != nil {
		return Token{}, fmt.Errorf("%s: write policy %s: %w", n.Name, SnapshotPolicyName, err)
	}
	sec, err := c.Auth().Token().CreateOrphanWithContext(ctx, &api.TokenCreateRequest{
		Policies:        []string{SnapshotPolicyName},
		NoDefaultPolicy: true,
		Period:          "768h",
		DisplayName:     "pve-vault-agent-snapshot",
		Metadata:        map[string]string{"managed-by": "pve-vault-agent"},
	})
	if err != nil {
		return Token{}, fmt.Errorf("%s: create the snapshot token: %w", n.Name, err)
	}
	return Token{sec.Auth.ClientToken}, nil
}

// RevokeSelf revokes t (the initial root token once setup is done, a generated root
// token after use).
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

// LookupSelf reports whether t is valid (for checks of the snapshot token).
func (n *Node) LookupSelf(ctx context.Context, t Token) error {
	c, err := n.withToken(t)
	if err != nil {
		return err
	}
	if _, err := c.Auth().Token().LookupSelfWithContext(ctx); err != nil {
		return fmt.Errorf("%s: token lookup: %w", n.Name, err)
	}
	return nil
}

// GenerateRoot creates a short-lived root token from the unseal keys (sys/generate-root
// with a one-time pad), for the rare operations that need one (restore). The caller
// revokes it right after with RevokeSelf.
func (n *Node) GenerateRoot(ctx context.Context, ks Keyset) (Token, error) {
	sys := n.client.Sys()
	st, err := sys.GenerateRootStatusWithContext(ctx)
	if err != nil {
		return Token{}, fmt.Errorf("%s: generate-root status: %w", n.Name, err)
	}
	if st.Started {
		if err := sys.GenerateRootCancelWithContext(ctx); err != nil {
			return Token{}, fmt.Errorf("%s: cancel a stale generate-root: %w", n.Name, err)
		}
	}
	otp, err := randomOTP(st.OTPLength)
	if err != nil {
		return Token{}, err
	}
	st, err = sys.GenerateRootInitWithContext(ctx, otp, "")
	if err != nil {
		return Token{}, fmt.Errorf("%s: generate-root init: %w", n.Name, err)
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

// StreamSnapshot streams GET sys/storage/raft/snapshot with tok into w. Vault sends the
// archive chunked, without a length; nothing is buffered here. The caller gives ctx a
// deadline.
func (n *Node) StreamSnapshot(ctx context.Context, tok Token, w io.Writer) (int64, error) {
	c, err := n.withToken(tok)
	if err != nil {
		return 0, err
	}
	resp, err := c.Logical().ReadRawWithContext(ctx, "sys/storage/raft/snapshot")
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		var re *api.ResponseError
		if errors.As(err, &re) && re.StatusCode == http.StatusForbidden {
			return 0, fmt.Errorf("%s: %w: the snapshot token was refused (revoked or expired?): %v", n.Name, ErrTokenRefused, err)
		}
		return 0, fmt.Errorf("%s: snapshot: %w", n.Name, err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s: snapshot: HTTP %d", n.Name, resp.StatusCode)
	}
	written, err := io.Copy(w, resp.Body)
	if err != nil {
		return written, fmt.Errorf("%s: snapshot stream after %d bytes: %w", n.Name, written, err)
	}
	return written, nil
}

// ErrTokenRefused means Vault rejected the agent's token.
var ErrTokenRefused = errors.New("token refused")

// Write writes data at path with tok (tests and the recover flow's checks).
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

// RevokeToken revokes another token with admin.
func (n *Node) RevokeToken(ctx context.Context, admin, t Token) error {
	c, err := n.withToken(admin)
	if err != nil {
		return err
	}
	if err := c.Auth().Token().RevokeTreeWithContext(ctx, t.value); err != nil {
		return fmt.Errorf("%s: revoke token: %w", n.Name, err)
	}
	return nil
}
