package configs

import (
	"fmt"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// Schedule says when the next run is due after a given time.
type Schedule interface {
	Next(after time.Time) time.Time
}

// cronParser reads what Kubernetes CronJobs take (Kubernetes uses this same library):
// five fields, names (MON-FRI, JAN), descriptors (@daily, @hourly, @every 6h) and a
// CRON_TZ= or TZ= prefix. Local time unless a zone is given.
var cronParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// ParseSchedule reads snapshots.schedule and snapshots.drill_schedule: an interval
// ("6h") or a cron expression. The one parser of the agent: config check, the daemon and
// status all use it, so a schedule that validates is one that runs. Intervals under a
// minute are a test knob (the lab's compressed-time soak).
func ParseSchedule(s string) (Schedule, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("empty schedule")
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d < time.Second {
			return nil, fmt.Errorf("interval %s is shorter than a second", d)
		}
		return Interval(d), nil
	}
	if strings.HasPrefix(s, "@every ") {
		d, err := time.ParseDuration(strings.TrimPrefix(s, "@every "))
		if err != nil || d < time.Second {
			return nil, fmt.Errorf("%q: @every takes an interval, e.g. @every 6h", s)
		}
		return Interval(d), nil
	}
	sched, err := cronParser.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%q is neither an interval nor a valid cron expression: %v", s, err)
	}
	// A valid expression can still never fire (30 February): say so now.
	probe := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if sched.Next(probe).IsZero() {
		return nil, fmt.Errorf("%q never fires", s)
	}
	return sched, nil
}

// Interval runs at every multiple of itself since midnight UTC, 1 January of year 1
// (6h: 00:00, 06:00, 12:00 and 18:00 UTC), so its slots are fixed: a restart or a manual
// backup never shifts them.
type Interval time.Duration

// Next is the first slot after after.
func (i Interval) Next(after time.Time) time.Time {
	d := time.Duration(i)
	return after.UTC().Truncate(d).Add(d)
}
