package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// ErrNoValidToken means none of the agent's operator tokens is valid on the cluster:
// under Vault 2.x the shares alone can no longer mint new ones.
var ErrNoValidToken = errors.New("no valid operator token")

// TokenStatus is what the agent knows of one of its tokens. Never the token itself.
type TokenStatus struct {
	Name       string        `json:"name"`
	Accessor   string        `json:"accessor,omitempty"`
	TTL        time.Duration `json:"-"`
	TTLSeconds float64       `json:"ttl_seconds"`
	Period     time.Duration `json:"-"`
	Expires    time.Time     `json:"expires,omitzero"`
	Renewed    bool          `json:"renewed,omitempty"`
	Warning    string        `json:"warning,omitempty"`
	Error      string        `json:"error,omitempty"`
}

func tokenStatus(env *Env, name string, ti vault.TokenInfo, err error) TokenStatus {
	st := TokenStatus{Name: name, Accessor: ti.Accessor, TTL: ti.TTL, TTLSeconds: ti.TTL.Seconds(), Period: ti.Period}
	if err != nil {
		st.Error = err.Error()
		return st
	}
	st.Expires = env.Clock.Now().Add(ti.TTL).UTC().Truncate(time.Second)
	period := ti.Period
	if period <= 0 {
		period = env.Config.Vault.TokenPeriod
	}
	if ti.TTL < period/3 {
		st.Warning = fmt.Sprintf("the %s token expires in %s (period %s): renewals are failing; is the daemon running?", name, ti.TTL.Round(time.Second), period)
	}
	return st
}

// lookupToken reads a token's TTL without renewing it.
func lookupToken(ctx context.Context, env *Env, n *vault.Node, name string, t vault.Token) TokenStatus {
	if t.Empty() {
		return TokenStatus{Name: name, Error: "the keyfile holds no " + name + " token"}
	}
	ti, err := n.LookupSelf(ctx, t)
	return tokenStatus(env, name, ti, err)
}

// renewToken renews a token for its period and reports its new TTL.
func renewToken(ctx context.Context, env *Env, n *vault.Node, name string, t vault.Token) TokenStatus {
	if t.Empty() {
		return TokenStatus{Name: name, Error: "the keyfile holds no " + name + " token"}
	}
	ti, err := n.RenewSelf(ctx, t)
	st := tokenStatus(env, name, ti, err)
	st.Renewed = err == nil
	return st
}

func tokenRefusedError(name string, st TokenStatus) error {
	return withHint(fmt.Errorf("the %s token: %s", name, st.Error),
		"the token expired or was revoked (a restored snapshot older than its period brings it back expired): run `pve-vault-agent token rotate`")
}

// TokenRotateOptions tune a rotation.
type TokenRotateOptions struct {
	// AuthTokenFile holds a token (with generate-root capability, e.g. an operator's own
	// admin token) that authorises generate-root when none of the agent's is valid.
	AuthTokenFile string
}

// TokenReport is what a rotation did.
type TokenReport struct {
	Pod     string        `json:"pod"`
	Rotated bool          `json:"rotated"`
	Tokens  []TokenStatus `json:"tokens"`
	Steps   []StepResult  `json:"steps"`
}

type rotateState struct {
	env  *Env
	opts TokenRotateOptions
	kf   *vault.Keyfile
	pod  vaultPod
	auth vault.Token
	root vault.Token
	old  []vault.Token
	rep  *TokenReport
}

var rotateSteps = []step[rotateState]{
	{"keyfile", "read the keyfile and find the active node", (*rotateState).open},
	{"authorise", "find a valid token to authorise generate-root (Vault 2.x refuses it without one)", (*rotateState).authorise},
	{"root", "generate a short-lived root token from the shares", (*rotateState).generateRoot},
	{"mint", "write the agent's policies and mint fresh periodic tokens", (*rotateState).mint},
	{"hosts", "seal the new keyfile on every other host in cluster.hosts (keyfile enroll)", (*rotateState).enrollHosts},
	{"revoke", "revoke the replaced tokens", (*rotateState).revokeOld},
}

// RotateTokens mints fresh agent tokens from the shares and rewrites the keyfile
// atomically; the root token it generates is revoked on every path.
func RotateTokens(ctx context.Context, env *Env, opts TokenRotateOptions) (*TokenReport, error) {
	s := &rotateState{env: env, opts: opts, rep: &TokenReport{}}
	defer s.revokeRoot(ctx)
	err := runSteps(ctx, env, "token rotate", rotateSteps, s, &s.rep.Steps)
	return s.rep, err
}

func (s *rotateState) open(ctx context.Context) (string, error) {
	kf, err := s.env.Keyfile.Read(ctx)
	if err != nil {
		return "", err
	}
	s.kf = kf
	if s.pod, _, err = findActive(ctx, s.env); err != nil {
		return "", err
	}
	s.rep.Pod = s.pod.Name
	return s.pod.Name, nil
}

func (s *rotateState) authorise(ctx context.Context) (string, error) {
	if s.opts.AuthTokenFile != "" {
		var err error
		if s.auth, err = readTokenFile(s.opts.AuthTokenFile); err != nil {
			return "", err
		}
		if _, err := s.pod.API.LookupSelf(ctx, s.auth); err != nil {
			return "", fmt.Errorf("--auth-token-file: %w", err)
		}
		return "the token of --auth-token-file", nil
	}
	tok, which, err := validOperatorToken(ctx, s.pod, s.kf)
	if err != nil {
		return "", err
	}
	s.auth = tok
	return which, nil
}

// validOperatorToken finds an operator token valid on the cluster: the current one, or
// one a rotation retired (a restored snapshot brings back the token it had).
func validOperatorToken(ctx context.Context, p vaultPod, kf *vault.Keyfile) (vault.Token, string, error) {
	cands := append([]vault.Token{kf.OperatorToken}, kf.RetiredOperatorTokens...)
	var last error
	for i, t := range cands {
		if t.Empty() {
			continue
		}
		if _, err := p.API.LookupSelf(ctx, t); err != nil {
			last = err
			continue
		}
		if i == 0 {
			return t, "the current operator token", nil
		}
		return t, fmt.Sprintf("retired operator token #%d (the cluster's data predates a rotation)", i), nil
	}
	return vault.Token{}, "", withHint(fmt.Errorf("%w on %s (last: %v)", ErrNoValidToken, p.Name, last),
		"every agent token is expired or revoked: a restored snapshot older than the tokens' period (vault.token_period) brings them back expired. Vault 2.x refuses generate-root without a token: pass --auth-token-file FILE holding a token that may use sys/generate-root (any admin token), or let an operator start Vault once with enable_unauthenticated_access = [\"generate-root\"] and run token rotate; Vault stays unsealed meanwhile")
}

// nonceFile records the nonce of a generate-root attempt the agent started, so an
// interrupted attempt is recognised as its own and cancelled, never an operator's.
// readTokenFile reads an operator's token from a private file, once; an error names the
// flag, never the value.
func readTokenFile(path string) (vault.Token, error) {
	b, err := safefile.ReadSecret(path, 4096)
	if err != nil {
		return vault.Token{}, fmt.Errorf("--auth-token-file: %w", err)
	}
	defer clear(b)
	return vault.NewToken(strings.TrimSpace(string(b))), nil
}

func (e *Env) nonceFile() string {
	return filepath.Join(filepath.Dir(e.Config.Vault.Keyfile), ".generate-root-nonce")
}

func (s *rotateState) generateRoot(ctx context.Context) (string, error) {
	own, _ := os.ReadFile(s.env.nonceFile())
	root, err := s.pod.API.GenerateRoot(ctx, s.kf.Keyset, vault.GenerateRootOptions{
		Auth: s.auth, OwnNonce: strings.TrimSpace(string(own)),
		Started: func(nonce string) error { return os.WriteFile(s.env.nonceFile(), []byte(nonce+"\n"), 0o600) },
	})
	if errors.Is(err, vault.ErrGenerateRootInProgress) {
		return "", withHint(err, "an operator is generating a root token: let them finish or cancel it (vault operator generate-root -cancel), then run again")
	}
	if err != nil {
		return "", err
	}
	_ = os.Remove(s.env.nonceFile())
	s.root = root
	return "generated (revoked when rotation ends)", nil
}

func (s *rotateState) mint(ctx context.Context) (string, error) {
	toks, err := s.pod.API.CreateAgentTokens(ctx, s.root, vault.Setup{Period: s.env.Config.Vault.TokenPeriod})
	if err != nil {
		return "", err
	}
	kf := *s.kf
	s.old = []vault.Token{kf.SnapshotToken, kf.OperatorToken}
	kf.Retire()
	kf.SnapshotToken, kf.OperatorToken = toks.Snapshot, toks.Operator
	kf.Rotated = s.env.Clock.Now().UTC()
	if len(kf.ManifestKey) == 0 {
		// A keyfile from before off-host copies gets its manifest key here.
		kf.ManifestKey = make([]byte, 32)
		if _, err := rand.Read(kf.ManifestKey); err != nil {
			s.revokeQuietly(toks.Snapshot, toks.Operator)
			return "", err
		}
	}
	if err := s.env.writeKeyfile(ctx, &kf, false); errors.Is(err, errRecoveryBehind) {
		s.env.Log.Warn("tokens rotated; the offline recovery copy was not rewritten", "err", err)
	} else if err != nil {
		// Nothing was written: the new tokens exist in Vault only. Revoke them; the old
		// keyfile and its tokens stay as they were.
		s.revokeQuietly(toks.Snapshot, toks.Operator)
		return "", fmt.Errorf("write the keyfile (the old one is unchanged, its tokens still valid): %w", err)
	}
	s.kf = &kf
	s.rep.Rotated = true
	for _, t := range []struct {
		name string
		tok  vault.Token
	}{{"snapshot", kf.SnapshotToken}, {"operator", kf.OperatorToken}} {
		s.rep.Tokens = append(s.rep.Tokens, lookupToken(ctx, s.env, s.pod.API, t.name, t.tok))
	}
	return fmt.Sprintf("new snapshot and operator tokens, period %s; keyfile rewritten", s.env.Config.Vault.TokenPeriod), nil
}

// enrollHosts puts the rotated keyfile on the cluster's other hosts, so whichever agent
// leads next holds the new tokens. A host that cannot be reached keeps the replaced
// tokens valid: they are not revoked until every host has the new ones.
func (s *rotateState) enrollHosts(ctx context.Context) (string, error) {
	if !s.env.Config.Cluster.Enabled() {
		return "no cluster.hosts", nil
	}
	id, _ := s.env.Identity()
	var done, failed []string
	var errs []error
	for _, h := range s.env.Config.Cluster.Hosts {
		if h.Name == id {
			continue
		}
		if _, err := EnrollKeyfile(ctx, s.env, h.Name, EnrollOptions{}); err != nil {
			failed = append(failed, h.Name)
			errs = append(errs, err)
			continue
		}
		done = append(done, h.Name)
	}
	if len(failed) > 0 {
		return "", withHint(fmt.Errorf("the rotated keyfile is here and on [%s], not on [%s]: %w", strings.Join(done, " "), strings.Join(failed, " "), errors.Join(errs...)),
			"the replaced tokens were left valid so those hosts keep working (they lapse after vault.token_period once no agent renews them); when the hosts answer, run `pve-vault-agent keyfile enroll HOST` for each")
	}
	return fmt.Sprintf("sealed on %s", strings.Join(done, ", ")), nil
}

func (s *rotateState) revokeOld(ctx context.Context) (string, error) {
	n := 0
	for _, t := range s.old {
		if t.Empty() {
			continue
		}
		if err := s.pod.API.RevokeSelf(ctx, t); err == nil {
			n++
		}
	}
	return fmt.Sprintf("%d revoked (an expired one is gone already)", n), nil
}

// revokeRoot revokes the generated root token under a fresh short context, so an
// interruption (Ctrl-C, SIGTERM) never leaves it alive.
func (s *rotateState) revokeRoot(ctx context.Context) {
	if s.root.Empty() {
		return
	}
	revokeRoot(ctx, s.env, s.pod.API, s.root)
	s.root = vault.Token{}
}

func (s *rotateState) revokeQuietly(toks ...vault.Token) {
	for _, t := range toks {
		revokeRoot(context.Background(), s.env, s.pod.API, t)
	}
}

// revokeRoot revokes a privileged token under a fresh 15 s context that the caller's
// cancellation does not reach, and logs a failure (it never fails the flow: the token is
// short-lived and the error says which node holds it).
func revokeRoot(ctx context.Context, env *Env, n *vault.Node, t vault.Token) {
	if t.Empty() || n == nil {
		return
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if err := n.RevokeSelf(rctx, t); err != nil && !vault.IsPermissionDenied(errors.Unwrap(err)) {
		env.Log.Error("could not revoke a root token the agent generated; revoke it by hand (vault token revoke -self with it is impossible now: use vault list auth/token/accessors as an admin)", "pod", n.Name, "err", err)
	}
}

// ensureTokens checks the agent's tokens on the active node after a restore: valid ones
// are renewed (a snapshot brings back the expiry it had), and when one is refused, fresh
// ones are minted with whichever operator token the restored data still knows.
func ensureTokens(ctx context.Context, env *Env, p vaultPod, kf *vault.Keyfile, authTokenFile string) (string, error) {
	snap := renewToken(ctx, env, p.API, "snapshot", kf.SnapshotToken)
	op := renewToken(ctx, env, p.API, "operator", kf.OperatorToken)
	if snap.Error == "" && op.Error == "" {
		return fmt.Sprintf("both tokens valid, renewed (%s, %s left)", snap.TTL.Round(time.Second), op.TTL.Round(time.Second)), nil
	}
	env.Log.Warn("the restored data refuses an agent token: minting fresh ones", "snapshot", snap.Error, "operator", op.Error)
	rep, err := RotateTokens(ctx, env, TokenRotateOptions{AuthTokenFile: authTokenFile})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("tokens replaced (%d)", len(rep.Tokens)), nil
}

// KeyfileReport is what keyfile check found.
type KeyfileReport struct {
	Source string        `json:"source"`
	Meta   vault.Meta    `json:"meta"`
	Pod    string        `json:"checked_on,omitempty"`
	Tokens []TokenStatus `json:"tokens,omitempty"`
	Note   string        `json:"note,omitempty"`
}

// CheckKeyfile proves the keyfile decrypts and, when an active pod answers, looks up
// (never renews) the agent's tokens. A refused token is an error.
func CheckKeyfile(ctx context.Context, env *Env) (*KeyfileReport, error) {
	kf, err := env.Keyfile.Read(ctx)
	if err != nil {
		return nil, err
	}
	rep := &KeyfileReport{Source: env.Keyfile.String(), Meta: kf.Meta()}
	actx, cancel := context.WithTimeout(ctx, env.Waits.Election)
	defer cancel()
	active, _, err := activeOnce(actx, env)
	if err != nil || active.API == nil {
		rep.Note = "no active Vault pod answered: tokens not checked"
		return rep, nil
	}
	rep.Pod = active.Name
	var refused []string
	for _, t := range []struct {
		name string
		tok  vault.Token
	}{{"snapshot", kf.SnapshotToken}, {"operator", kf.OperatorToken}} {
		st := lookupToken(ctx, env, active.API, t.name, t.tok)
		rep.Tokens = append(rep.Tokens, st)
		if st.Error != "" {
			refused = append(refused, t.name)
		}
	}
	if len(refused) > 0 {
		return rep, withHint(fmt.Errorf("%s token(s) refused by %s", strings.Join(refused, " and "), active.Name), "run `pve-vault-agent token rotate`")
	}
	return rep, nil
}
