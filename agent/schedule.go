package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// NextRun is when the next scheduled run is due, anchored to the newest verified
// snapshot on disk (or drill): the first slot after it. A slot already past (the host
// was suspended, the agent down or restarted) is due now, so restarts never postpone a
// backup and a missed one runs at once.
func NextRun(s configs.Schedule, newest, now time.Time) time.Time {
	if newest.IsZero() {
		return now
	}
	next := s.Next(newest)
	if next.IsZero() || next.Before(now) {
		return now
	}
	return next
}

// newestVerified is the newest verified snapshot of es (sorted oldest first).
func newestVerified(es []snapshot.Entry) (snapshot.Entry, bool) {
	for i := len(es) - 1; i >= 0; i-- {
		if es[i].Verified {
			return es[i], true
		}
	}
	return snapshot.Entry{}, false
}

// retryBackoff is the wait before retrying a failed scheduled run: a quarter of the
// schedule's period (at least a second, at most a minute), doubling to 15 minutes.
func retryBackoff(s configs.Schedule, now time.Time, prev time.Duration) time.Duration {
	if prev > 0 {
		return min(2*prev, 15*time.Minute)
	}
	return min(max(periodOf(s, now)/4, time.Second), time.Minute)
}

// periodOf is the spacing of a schedule's next two slots after now.
func periodOf(s configs.Schedule, now time.Time) time.Duration {
	next := s.Next(now)
	return s.Next(next).Sub(next)
}

// runBackups is the daemon's backup schedule: it sleeps until NextRun, takes a backup,
// and computes the next due time from the disk again.
func (d *daemon) runBackups(ctx context.Context, env *Env, f fence) {
	sched, err := configs.ParseSchedule(env.Config.Snapshots.Schedule)
	if err != nil {
		d.log.Error("backup schedule unusable", "err", err) // validated at load: not expected
		return
	}
	clock := env.Clock
	var backoff time.Duration
	var failedAt time.Time
	for {
		var newest time.Time
		if _, es, err := Snapshots(ctx, env); err != nil {
			d.log.Warn("list snapshots for the schedule", "err", err)
		} else if e, ok := newestVerified(es); ok {
			newest = e.Time
			// From the disk: a restarted daemon (or a new leader) does not report 0.
			d.metrics.backupLastSuccess.Set(float64(e.Time.Unix()))
		}
		now := clock.Now()
		due := NextRun(sched, newest, now)
		if backoff > 0 && failedAt.Add(backoff).After(due) {
			due = failedAt.Add(backoff)
		}
		d.metrics.backupNext.Set(float64(due.Unix()))
		if sleep(ctx, clock, due.Sub(now)) != nil {
			return
		}
		t0 := clock.Now()
		rep, err := BackupNow(ctx, env, BackupOptions{pods: d.knownPods(env), fence: f})
		d.metrics.backupDuration.Set(clock.Now().Sub(t0).Seconds())
		if ctx.Err() != nil {
			return
		}
		if rep == nil {
			backoff, failedAt = retryBackoff(sched, clock.Now(), backoff), clock.Now()
			d.metrics.backupFailures.Inc()
			d.log.Error("scheduled backup failed; retrying", "due", due, "retry_in", backoff, "err", err)
			if !errors.Is(err, ErrNotLeader) {
				d.alerts.Failing("backup", "scheduled backup", fmt.Sprintf("the scheduled backup stored nothing: %v. Retrying in %s.", err, backoff))
			}
			continue
		}
		backoff = 0
		d.alerts.OK("backup", "scheduled backup", fmt.Sprintf("a scheduled backup was stored again: %s (%d bytes)", rep.Snapshot.Path, rep.Snapshot.Size))
		for _, t := range rep.Offsite {
			if t.Error != "" {
				d.alerts.Failing("offsite", t.Target, fmt.Sprintf("the push to off-host target %s failed: %s. It is behind: the next backup pushes what it lacks.", t.Target, t.Error))
			} else {
				d.alerts.OK("offsite", t.Target, fmt.Sprintf("off-host target %s caught up (newest copy %s)", t.Target, t.Newest))
			}
		}
		d.metrics.backupLastSuccess.Set(float64(rep.Snapshot.Time.Unix()))
		d.metrics.backupLastSize.Set(float64(rep.Snapshot.Size))
		if rep.Token != nil {
			d.metrics.tokenTTL.WithLabelValues("snapshot").Set(rep.Token.TTLSeconds)
		}
		if err != nil {
			d.log.Warn("backup stored; retention failed", "err", err)
		}
	}
}

// runDrills is the daemon's drill schedule: the next drill is the first slot after the
// last one (passed or not: a failing snapshot is reported, not hammered), a slot missed
// while the agent was down runs at once, and a drill waits while a mutating verb runs.
func (d *daemon) runDrills(ctx context.Context, env *Env) {
	sched, err := configs.ParseSchedule(env.Config.Snapshots.DrillSchedule)
	if err != nil {
		d.log.Error("drill schedule unusable", "err", err) // validated at load: not expected
		return
	}
	clock := env.Clock
	for {
		var last time.Time
		if rec, err := LastDrill(env); err != nil {
			d.log.Warn("read the drill record for the schedule", "err", err)
		} else if rec.Last != nil {
			last = rec.Last.Started
		}
		// The drills recorded in the snapshots' manifests count too: in a Proxmox
		// cluster another agent may have led, and drilled, before this one.
		if _, es, err := Snapshots(ctx, env); err == nil {
			for _, e := range es {
				if e.Manifest != nil && e.Manifest.Drill != nil && e.Manifest.Drill.At.After(last) {
					last = e.Manifest.Drill.At
				}
			}
		}
		now := clock.Now()
		if sleep(ctx, clock, NextRun(sched, last, now).Sub(now)) != nil {
			return
		}
		if holder, busy := env.Busy(); busy {
			d.log.Info("drill postponed: a mutating verb runs", "holder", holder)
			if sleep(ctx, clock, time.Minute) != nil {
				return
			}
			continue
		}
		rep, err := Drill(ctx, env, DrillOptions{})
		switch {
		case ctx.Err() != nil:
			return
		case rep == nil:
			// Nothing to drill yet, or another drill runs: try again in a while.
			d.log.Info("scheduled drill did not run; trying again in a while", "err", err)
			if sleep(ctx, clock, retryBackoff(sched, clock.Now(), 0)) != nil {
				return
			}
		case err != nil:
			d.log.Error("scheduled restore drill FAILED", "snapshot", rep.Snapshot, "err", err)
			d.alerts.Failing("drill", "restore drill", fmt.Sprintf("the restore drill of %s FAILED: %v. The snapshot may not restore: run `pve-vault-agent drill --latest` and read its steps.", rep.Snapshot, err))
		default:
			d.log.Info("scheduled restore drill passed", "snapshot", rep.Snapshot, "seconds", rep.DurationSecs)
			d.alerts.OK("drill", "restore drill", fmt.Sprintf("the restore drill of %s passed (%.1f s)", rep.Snapshot, rep.DurationSecs))
		}
	}
}
