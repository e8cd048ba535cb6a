package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// podAPI is what a watcher needs of a Vault pod: a *vault.Node, or a fake in tests.
type podAPI interface {
	SealStatus(ctx context.Context) (vault.SealState, error)
	Unseal(ctx context.Context, ks vault.Keyset, log *slog.Logger) (vault.UnsealResult, error)
}

type watcher struct {
	key    string // the pod incarnation it watches
	cancel context.CancelFunc
	done   chan struct{}
}

// rejection remembers a keyset Vault rejected on one pod incarnation (the map key): in
// that seal state and for that keyset it is not tried again before next; any change
// retries at once.
type rejection struct {
	seal    string
	keyset  string
	backoff time.Duration
	next    time.Time
}

// sealSig summarises what a sealed Vault says about its seal: a restarted or
// re-initialised Vault answers differently.
func sealSig(st vault.SealState) string {
	return fmt.Sprintf("init=%v t=%d n=%d v=%s", st.Initialized, st.Threshold, st.Shares, st.Version)
}

// watch keeps one pod unsealed until ctx ends: its status every IdleInterval while
// unsealed, every PollInterval while sealed, with capped back-off while unreachable.
func (d *daemon) watch(ctx context.Context, name, key string, api podAPI) {
	env := d.currentEnv()
	clock := env.Clock
	log := d.log.With("pod", name)
	// Every series the alert rules and the dashboard read exists from the start, at 0.
	d.metrics.attempts.WithLabelValues(name)
	for _, reason := range []string{"wrong_keys", "uninitialised", "error"} {
		d.metrics.failures.WithLabelValues(name, reason)
	}
	backoff := time.Duration(0)
	lastReport := ""
	var joiningUntil, sealedSince time.Time
	for {
		state, err := d.check(ctx, log, clock, name, key, api, &joiningUntil)
		if ctx.Err() != nil {
			return
		}
		sealedSince = d.sealedFor(env, name, state, err, sealedSince)
		wait := d.opts.PollInterval
		if state == "unsealed" {
			wait = d.opts.IdleInterval
		}
		if err != nil {
			if backoff == 0 {
				backoff = min(250*time.Millisecond, d.opts.MaxBackoff)
			} else {
				backoff = min(2*backoff, d.opts.MaxBackoff)
			}
			wait = backoff
			if msg := err.Error(); msg != lastReport {
				log.Warn("pod needs attention", "state", state, "err", err)
				lastReport = msg
			}
		} else {
			backoff, lastReport = 0, ""
		}
		d.setState(name, state)
		if sleep(ctx, clock, wait) != nil {
			return
		}
	}
}

// check reads one pod's state and unseals it when needed.
func (d *daemon) check(ctx context.Context, log *slog.Logger, clock Clock, name, key string, api podAPI, joiningUntil *time.Time) (string, error) {
	st, err := api.SealStatus(ctx)
	if err != nil {
		d.metrics.reachable.WithLabelValues(name).Set(0)
		return "unreachable", err
	}
	d.metrics.reachable.WithLabelValues(name).Set(1)
	d.metrics.sealed.WithLabelValues(name).Set(b2f(st.Sealed))
	d.metrics.removed.WithLabelValues(name).Set(b2f(st.Removed))
	switch {
	case st.Removed:
		return "removed from the raft cluster", withHint(fmt.Errorf("%s: %w", name, vault.ErrRemoved), "run `pve-vault-agent recover`: it wipes the node's data and lets it rejoin")
	case !st.Sealed:
		*joiningUntil = time.Time{}
		return "unsealed", nil
	case clock.Now().Before(*joiningUntil):
		return "joining", nil // the shares went in; the follower answers its leader's challenge
	}
	d.mu.Lock()
	kf := d.keyfile
	rej := d.rejected[key]
	env := d.env
	d.mu.Unlock()
	if kf == nil {
		return "sealed (no keyfile)", nil
	}
	if holder, busy := env.Busy(); busy {
		return "sealed (left to " + holder + ")", nil
	}
	fp, sig := kf.Keyset.Fingerprint(), sealSig(st)
	if rej != nil && rej.seal == sig && rej.keyset == fp && clock.Now().Before(rej.next) {
		return "sealed (keyfile rejected)", nil
	}
	clusterInit := st.Initialized || d.peerInitialised(ctx, name)
	t0 := clock.Now()
	d.metrics.attempts.WithLabelValues(name).Inc()
	res, err := unsealOnce(ctx, log, name, api, kf, clusterInit)
	if err != nil {
		reason := "error"
		switch {
		case errors.Is(err, vault.ErrWrongKeys):
			reason = "wrong_keys"
			d.reject(key, sig, fp, clock.Now())
			d.alerts.Failing("unseal_refused", name, fmt.Sprintf("Vault refused the keyfile's shares (keyset %s): %v. The keyfile is not this cluster's, or the pod's data was replaced.", fp, err))
			log.Error("the keyfile's shares do not unseal this pod; trying again later, or at once when the pod or keyfile changes", "keyset", fp, "err", err)
		case errors.Is(err, ErrDataGone):
			reason = "uninitialised"
		}
		d.metrics.failures.WithLabelValues(name, reason).Inc()
		return "sealed", err
	}
	d.mu.Lock()
	delete(d.rejected, key)
	d.mu.Unlock()
	if res.Joining {
		*joiningUntil = clock.Now().Add(10 * time.Second)
		return "joining", nil
	}
	if !res.Sealed {
		d.alerts.OK("unseal_refused", name, "the keyfile's shares unsealed the pod")
		d.metrics.sealed.WithLabelValues(name).Set(0)
		d.metrics.lastUnseal.WithLabelValues(name).SetToCurrentTime()
		// At least this unseal's own time; the watcher that saw the pod go down makes it
		// the whole time since (sealedFor).
		d.metrics.unsealLatency.WithLabelValues(name).Set(clock.Now().Sub(t0).Seconds())
		log.Info("unsealed", "shares", res.SharesUsed, "reset_stale", res.ResetStale, "took", clock.Now().Sub(t0).Round(time.Millisecond))
		return "unsealed", nil
	}
	return "sealed", nil
}

// reject records (or extends) the back-off of a keyset Vault rejected on a pod
// incarnation.
func (d *daemon) reject(key, sig, fp string, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.rejected[key]
	if r != nil && r.seal == sig && r.keyset == fp {
		r.backoff = min(2*r.backoff, 10*time.Minute)
	} else {
		r = &rejection{seal: sig, keyset: fp, backoff: d.opts.RejectedBackoff}
		d.rejected[key] = r
	}
	r.next = now.Add(r.backoff)
}

// peerInitialised reports whether another pod is initialised (so an uninitialised pod
// is a follower waiting to join, not a lost one).
func (d *daemon) peerInitialised(ctx context.Context, self string) bool {
	acc, err := d.currentEnv().Pods()
	if err != nil {
		return false
	}
	pods, err := acc.Pods(ctx)
	if err != nil {
		return false
	}
	for _, q := range pods {
		if q.Name == self {
			continue
		}
		if st, err := q.API.SealStatus(ctx); err == nil && st.Initialized {
			return true
		}
	}
	return false
}

// sealedFor reports a pod that stays sealed (or unreachable while sealed) longer than
// notify.sealed_after, and its unsealing after; it returns since when the pod has been
// sealed (zero while unsealed).
func (d *daemon) sealedFor(env *Env, name, state string, err error, since time.Time) time.Time {
	now := env.Clock.Now()
	if state == "unsealed" {
		if !since.IsZero() {
			d.metrics.unsealLatency.WithLabelValues(name).Set(now.Sub(since).Seconds())
		}
		// Also after a reload or a new discovery, whose new watcher never saw it sealed.
		d.alerts.OK("sealed", name, "the pod is unsealed again")
		return time.Time{}
	}
	if since.IsZero() {
		return now
	}
	if limit := env.Config.Notify.SealedAfter; limit > 0 && now.Sub(since) >= limit {
		why := state
		if err != nil {
			why += ": " + firstLine(err.Error())
		}
		d.alerts.Failing("sealed", name, fmt.Sprintf("the pod has been sealed for %s (%s); while it is, it serves nothing", now.Sub(since).Round(time.Second), why))
	}
	return since
}
