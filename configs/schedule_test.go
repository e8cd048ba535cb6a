package configs

import (
	"testing"
	"time"
)

// The one schedule parser: what config check accepts is what the daemon runs, so
// expressions that could never fire are refused here (the daemon once logged "no backup
// schedule" for them and ran without backups).
func TestParseSchedule(t *testing.T) {
	for _, bad := range []string{"0 25 * * *", "61 * * * *", "*/0 * * * *", "5-1 * * * *", "every day", "0 3 * *", "0 3 30 2 *", "500ms", "@every 0s", "@yearly-ish"} {
		if _, err := ParseSchedule(bad); err == nil {
			t.Errorf("ParseSchedule(%q) accepted", bad)
		}
	}
	utc := func(s string) time.Time {
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct {
		expr, after, next string
	}{
		{"CRON_TZ=UTC 0 3 * * *", "2026-11-27T02:00:00Z", "2026-11-27T03:00:00Z"},
		{"CRON_TZ=UTC 0 3 * * *", "2026-11-27T03:00:00Z", "2026-11-28T03:00:00Z"},
		{"CRON_TZ=UTC @daily", "2026-11-27T12:00:00Z", "2026-11-28T00:00:00Z"},
		{"CRON_TZ=UTC @hourly", "2026-11-27T12:30:00Z", "2026-11-27T13:00:00Z"},
		{"CRON_TZ=UTC 0 3 * * MON-FRI", "2026-11-27T04:00:00Z", "2026-11-30T03:00:00Z"}, // Friday → Monday
		{"CRON_TZ=Europe/Berlin 0 3 * * *", "2026-11-27T00:00:00Z", "2026-11-27T02:00:00Z"},
		// Intervals run on fixed slots, whatever time the last run had.
		{"6h", "2026-11-27T07:13:00Z", "2026-11-27T12:00:00Z"},
		{"@every 6h", "2026-11-27T18:00:00Z", "2026-11-28T00:00:00Z"},
		{"2s", "2026-11-27T07:13:01.5Z", "2026-11-27T07:13:02Z"},
	} {
		s, err := ParseSchedule(tc.expr)
		if err != nil {
			t.Errorf("%q: %v", tc.expr, err)
			continue
		}
		if got := s.Next(utc(tc.after)); !got.Equal(utc(tc.next)) {
			t.Errorf("%q after %s = %s, want %s", tc.expr, tc.after, got.UTC().Format(time.RFC3339), tc.next)
		}
	}
}
