package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// renewEvery is how often the daemon renews the agent's tokens: a third of their
// period, so two renewals can fail before one lapses.
func renewEvery(period time.Duration) time.Duration { return period / 3 }

// runRenewals keeps the agent's tokens alive: Vault never renews a token because it
// was used, so a periodic token nobody renews lapses after its period even while
// backups use it every day.
func (d *daemon) runRenewals(ctx context.Context, env *Env) {
	clock := env.Clock
	every := renewEvery(env.Config.Vault.TokenPeriod)
	var retry time.Duration
	for {
		wait := every
		if d.renewTokens(ctx, env) {
			retry = 0
		} else {
			// Vault sealed or electing, a pod restarting: try again soon, backing off to
			// 15 seconds, and never later than the regular renewal.
			retry = min(max(2*retry, time.Second), 15*time.Second, every)
			wait = retry
		}
		if sleep(ctx, clock, wait) != nil {
			return
		}
	}
}

// renewTokens renews both tokens on the active node; false when one could not be.
func (d *daemon) renewTokens(ctx context.Context, env *Env) bool {
	d.mu.Lock()
	kf := d.keyfile
	d.mu.Unlock()
	if kf == nil {
		return true // nothing to renew before init
	}
	// The last discovery's pods: a hung API server must not let the tokens lapse.
	rctx, cancel := context.WithTimeout(ctx, d.opts.DiscoverTimeout+env.Waits.Election)
	defer cancel()
	active, _, err := findActiveIn(rctx, env, d.knownPods(env))
	if err != nil {
		if ctx.Err() == nil {
			d.log.Warn("token renewal postponed: no active node", "err", err)
		}
		return false
	}
	ok := true
	for _, t := range []struct {
		name string
		tok  vault.Token
	}{{"snapshot", kf.SnapshotToken}, {"operator", kf.OperatorToken}} {
		if t.tok.Empty() {
			continue
		}
		st := renewToken(rctx, env, active.API, t.name, t.tok)
		if st.Error != "" {
			ok = false
			d.metrics.tokenRenewFailures.WithLabelValues(t.name).Inc()
			d.log.Error("token renewal failed", "token", t.name, "err", st.Error)
			d.alerts.Failing("token", t.name, fmt.Sprintf("the agent's %s token could not be renewed: %s. Backups and drills stop when it lapses: `pve-vault-agent token rotate`.", t.name, st.Error))
			d.tokenRefused(ctx, env, kf)
			continue
		}
		if below := env.Config.Notify.TokenTTLBelow; st.TTL < below {
			d.alerts.Failing("token", t.name, fmt.Sprintf("the agent's %s token has %s left after its renewal (notify.token_ttl_below %s): `pve-vault-agent token rotate` mints fresh ones", t.name, st.TTL.Round(time.Second), below))
		} else {
			d.alerts.OK("token", t.name, fmt.Sprintf("the agent's %s token renews again (%s left)", t.name, st.TTL.Round(time.Second)))
		}
		d.metrics.tokenTTL.WithLabelValues(t.name).Set(st.TTLSeconds)
		d.metrics.tokenRenewed.WithLabelValues(t.name).SetToCurrentTime()
		d.log.Debug("token renewed", "token", t.name, "ttl", st.TTL.Round(time.Second))
	}
	return ok
}

// tokenRefused looks for a newer keyfile (a rotation) when Vault refuses a token.
func (d *daemon) tokenRefused(ctx context.Context, env *Env, kf *vault.Keyfile) {
	fresh, err := env.Keyfile.Read(ctx)
	if stale := env.Keyfile.Stale(); stale != nil {
		d.log.Error("the keyfile was rotated but cannot be loaded", "err", stale, "hint", Hints(stale))
		return
	}
	if err != nil || fresh.OperatorToken == kf.OperatorToken && fresh.SnapshotToken == kf.SnapshotToken {
		return
	}
	d.mu.Lock()
	if d.keyfile == kf {
		d.keyfile = fresh
	}
	d.mu.Unlock()
	d.log.Info("keyfile re-read: its tokens were rotated")
}
