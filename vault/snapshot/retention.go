package snapshot

import (
	"fmt"
	"sort"
	"time"
)

// Policy keeps the newest KeepLast snapshots plus, per tier, the newest snapshot of each
// hour/day/week/month within that many periods back from now. Zero disables a tier.
type Policy struct {
	KeepLast, Hourly, Daily, Weekly, Monthly int
}

// Decision is one snapshot's fate with the reasons for it.
type Decision struct {
	Entry   Entry    `json:"entry"`
	Keep    bool     `json:"keep"`
	Reasons []string `json:"reasons"`
}

// Plan decides which snapshots retention keeps. It is pure: the same inputs give the
// same plan. Unverified snapshots (no manifest) are never dropped and never counted; the
// newest verified snapshot is always kept. Decisions come newest first.
func Plan(now time.Time, entries []Entry, p Policy) []Decision {
	es := append([]Entry(nil), entries...)
	sort.Slice(es, func(i, j int) bool { return es[i].Time.After(es[j].Time) })
	ds := make([]Decision, len(es))
	for i, e := range es {
		ds[i] = Decision{Entry: e}
	}
	keep := func(i int, why string) {
		ds[i].Keep = true
		ds[i].Reasons = append(ds[i].Reasons, why)
	}
	newest := true
	last := 0
	for i, e := range es {
		if !e.Verified {
			keep(i, "unverified: never removed automatically (run snapshots verify)")
			continue
		}
		if newest {
			keep(i, "newest verified")
			newest = false
		}
		if last < p.KeepLast {
			last++
			keep(i, fmt.Sprintf("last %d", p.KeepLast))
		}
	}
	tiers := []struct {
		name   string
		n      int
		bucket func(time.Time) string
		start  func(time.Time, int) time.Time
	}{
		{"hourly", p.Hourly, func(t time.Time) string { return t.Format("2006-01-02T15") },
			func(t time.Time, n int) time.Time { return t.Truncate(time.Hour).Add(-time.Duration(n-1) * time.Hour) }},
		{"daily", p.Daily, func(t time.Time) string { return t.Format("2006-01-02") },
			func(t time.Time, n int) time.Time { return day(t).AddDate(0, 0, -(n - 1)) }},
		{"weekly", p.Weekly, func(t time.Time) string { y, w := t.ISOWeek(); return fmt.Sprintf("%d-W%02d", y, w) },
			func(t time.Time, n int) time.Time { return monday(t).AddDate(0, 0, -7*(n-1)) }},
		{"monthly", p.Monthly, func(t time.Time) string { return t.Format("2006-01") },
			func(t time.Time, n int) time.Time {
				return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC).AddDate(0, -(n - 1), 0)
			}},
	}
	now = now.UTC()
	for _, tier := range tiers {
		if tier.n <= 0 {
			continue
		}
		from := tier.start(now, tier.n)
		seen := map[string]bool{}
		for i, e := range es {
			t := e.Time.UTC()
			if !e.Verified || t.Before(from) || t.After(now) {
				continue
			}
			b := tier.bucket(t)
			if seen[b] {
				continue
			}
			seen[b] = true
			keep(i, tier.name+" "+b)
		}
	}
	for i := range ds {
		if !ds[i].Keep {
			ds[i].Reasons = []string{"outside every retention rule"}
		}
	}
	return ds
}

func day(t time.Time) time.Time { return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC) }

func monday(t time.Time) time.Time {
	d := day(t)
	return d.AddDate(0, 0, -((int(d.Weekday()) + 6) % 7))
}
