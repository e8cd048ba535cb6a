package agent

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Clock is time as the agent sees it: the real one in the binary, a fake one in tests
// that compress hours into milliseconds.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

// RealClock is the wall clock.
type RealClock struct{}

// Now is time.Now.
func (RealClock) Now() time.Time { return time.Now() }

// After is time.After.
func (RealClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Waits are how long flows wait for Vault and Kubernetes to reach a state. Tests
// shorten them; operators never need to.
type Waits struct {
	// Active: an unsealed node becomes active (60s).
	Active time.Duration
	// Join: a follower joins through retry_join and unseals (90s).
	Join time.Duration
	// Election: unsealed standbys elect a leader (30s).
	Election time.Duration
	// Restore: a restored snapshot shows (Vault 2.x applies it after the upload returns) (90s).
	Restore time.Duration
	// Poll is the pause between two checks (100ms).
	Poll time.Duration
}

// DefaultWaits are the waits of the binary.
func DefaultWaits() Waits {
	return Waits{Active: 60 * time.Second, Join: 90 * time.Second, Election: 30 * time.Second, Restore: 90 * time.Second, Poll: 100 * time.Millisecond}
}

// errPermanent marks a condition error polling cannot fix.
type errPermanent struct{ err error }

func (e errPermanent) Error() string { return e.err.Error() }
func (e errPermanent) Unwrap() error { return e.err }

// permanent stops a poll at once with err.
func permanent(err error) error { return errPermanent{err} }

// errNotYet is what a condition returns while it waits without an error to report.
var errNotYet = errors.New("not yet")

// poll calls cond every interval on clock until it returns nil, returns a permanent
// error, ctx ends, or timeout passes; the error says what was awaited, for how long, and
// the condition's last complaint.
func poll(ctx context.Context, clock Clock, interval, timeout time.Duration, what string, cond func(context.Context) error) error {
	start := clock.Now()
	for {
		err := cond(ctx)
		if err == nil {
			return nil
		}
		var perm errPermanent
		if errors.As(err, &perm) {
			return perm.err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if clock.Now().Sub(start) >= timeout {
			if errors.Is(err, errNotYet) {
				return fmt.Errorf("%s: not after %s", what, timeout)
			}
			return fmt.Errorf("%s: not after %s: %w", what, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-clock.After(interval):
		}
	}
}

// sleep waits d on clock, or until ctx ends.
func sleep(ctx context.Context, clock Clock, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-clock.After(d):
		return nil
	}
}
