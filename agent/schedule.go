package agent

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Schedule says when the next backup is due.
type Schedule interface {
	Next(after time.Time) time.Time
}

// ParseSchedule reads snapshots.schedule: an interval ("6h") or a five-field cron
// expression ("0 3 * * *": minute hour day-of-month month day-of-week, in UTC, with *,
// lists, ranges and steps).
func ParseSchedule(s string) (Schedule, error) {
	if d, err := time.ParseDuration(s); err == nil {
		if d < time.Minute {
			return nil, fmt.Errorf("schedule %q: shorter than a minute", s)
		}
		return interval(d), nil
	}
	f := strings.Fields(s)
	if len(f) != 5 {
		return nil, fmt.Errorf("schedule %q: neither an interval nor a five-field cron expression", s)
	}
	var c cron
	var err error
	bounds := [5][2]int{{0, 59}, {0, 23}, {1, 31}, {1, 12}, {0, 7}}
	for i, dst := range []*[]bool{&c.min, &c.hour, &c.dom, &c.month, &c.dow} {
		if *dst, err = cronField(f[i], bounds[i][0], bounds[i][1]); err != nil {
			return nil, fmt.Errorf("schedule %q field %d: %w", s, i+1, err)
		}
	}
	if c.dow[7] {
		c.dow[0] = true // 7 is Sunday too
	}
	c.domAny, c.dowAny = f[2] == "*", f[4] == "*"
	return c, nil
}

type interval time.Duration

func (i interval) Next(after time.Time) time.Time { return after.Add(time.Duration(i)) }

type cron struct {
	min, hour, dom, month, dow []bool
	domAny, dowAny             bool
}

// Next returns the first minute after `after` that matches, in UTC.
func (c cron) Next(after time.Time) time.Time {
	t := after.UTC().Truncate(time.Minute).Add(time.Minute)
	limit := t.AddDate(5, 0, 0)
	for t.Before(limit) {
		switch {
		case !c.month[int(t.Month())]:
			t = time.Date(t.Year(), t.Month()+1, 1, 0, 0, 0, 0, time.UTC)
		case !c.dayMatches(t):
			t = time.Date(t.Year(), t.Month(), t.Day()+1, 0, 0, 0, 0, time.UTC)
		case !c.hour[t.Hour()]:
			t = time.Date(t.Year(), t.Month(), t.Day(), t.Hour()+1, 0, 0, 0, time.UTC)
		case !c.min[t.Minute()]:
			t = t.Add(time.Minute)
		default:
			return t
		}
	}
	return limit // an impossible date such as 30 February
}

// dayMatches follows cron: when both day fields are restricted, either may match.
func (c cron) dayMatches(t time.Time) bool {
	dom, dow := c.dom[t.Day()], c.dow[int(t.Weekday())]
	switch {
	case c.domAny && c.dowAny:
		return true
	case c.domAny:
		return dow
	case c.dowAny:
		return dom
	}
	return dom || dow
}

func cronField(s string, lo, hi int) ([]bool, error) {
	set := make([]bool, hi+1)
	for _, part := range strings.Split(s, ",") {
		rng, step := part, 1
		if i := strings.IndexByte(part, '/'); i >= 0 {
			n, err := strconv.Atoi(part[i+1:])
			if err != nil || n < 1 {
				return nil, fmt.Errorf("bad step in %q", part)
			}
			rng, step = part[:i], n
		}
		from, to := lo, hi
		if rng != "*" {
			a, b, isRange := strings.Cut(rng, "-")
			var err error
			if from, err = strconv.Atoi(a); err != nil {
				return nil, fmt.Errorf("bad value %q", part)
			}
			to = from
			if isRange {
				if to, err = strconv.Atoi(b); err != nil {
					return nil, fmt.Errorf("bad range %q", part)
				}
			} else if step > 1 {
				to = hi
			}
		}
		if from < lo || to > hi || from > to {
			return nil, fmt.Errorf("%q is outside %d-%d", part, lo, hi)
		}
		for v := from; v <= to; v += step {
			set[v] = true
		}
	}
	return set, nil
}

// Clock is time as the scheduler sees it; tests inject a fake one.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// runSchedule calls job at every time the schedule gives, until ctx ends. A job that
// overruns its next slot makes the scheduler skip to the following one (no pile-up).
func runSchedule(ctx context.Context, clock Clock, s Schedule, job func(ctx context.Context, due time.Time)) {
	next := s.Next(clock.Now())
	for {
		select {
		case <-ctx.Done():
			return
		case <-clock.After(max(0, next.Sub(clock.Now()))):
		}
		job(ctx, next)
		now := clock.Now()
		next = s.Next(next)
		for !next.After(now) {
			next = s.Next(next)
		}
	}
}
