package agent

import (
	"context"
	"sync"
	"testing"
	"time"
)

func TestCronNext(t *testing.T) {
	at := func(s string) time.Time {
		v, err := time.Parse("2006-01-02 15:04", s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct{ expr, after, want string }{
		{"0 3 * * *", "2026-11-27 02:59", "2026-11-27 03:00"},
		{"0 3 * * *", "2026-11-27 03:00", "2026-11-28 03:00"},
		{"*/15 * * * *", "2026-11-27 10:07", "2026-11-27 10:15"},
		{"30 1 1 * *", "2026-11-27 00:00", "2026-12-01 01:30"},
		{"0 0 * * 0", "2026-11-27 12:00", "2026-11-29 00:00"}, // Sunday
		{"0 0 * * 7", "2026-11-27 12:00", "2026-11-29 00:00"},
		{"0 12 13 * 5", "2026-11-01 00:00", "2026-11-06 12:00"}, // Friday or the 13th
		{"5,35 8-9 * * 1-5", "2026-11-27 09:35", "2026-11-30 08:05"},
		{"0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"},
	} {
		s, err := ParseSchedule(tc.expr)
		if err != nil {
			t.Fatalf("%s: %v", tc.expr, err)
		}
		if got := s.Next(at(tc.after)); !got.Equal(at(tc.want)) {
			t.Errorf("%q after %s: %s, want %s", tc.expr, tc.after, got.Format("2006-01-02 15:04 Mon"), tc.want)
		}
	}
	for _, bad := range []string{"", "30s", "* * * *", "61 * * * *", "*/0 * * * *", "a b c d e", "5-1 * * * *"} {
		if _, err := ParseSchedule(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if s, _ := ParseSchedule("6h"); !s.Next(at("2026-11-27 00:00")).Equal(at("2026-11-27 06:00")) {
		t.Error("interval")
	}
}

// fakeClock moves only when the test says so.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

func (f *fakeClock) Now() time.Time { f.mu.Lock(); defer f.mu.Unlock(); return f.now }

func (f *fakeClock) After(d time.Duration) <-chan time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan time.Time, 1)
	f.waiters = append(f.waiters, waiter{f.now.Add(d), ch})
	return ch
}

func (f *fakeClock) pending() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.waiters) }

// advance moves time to t and fires the timers due.
func (f *fakeClock) advance(t time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = t
	var keep []waiter
	for _, w := range f.waiters {
		if !w.at.After(t) {
			w.ch <- t
		} else {
			keep = append(keep, w)
		}
	}
	f.waiters = keep
}

func TestRunScheduleUnderFakeClock(t *testing.T) {
	start := time.Date(2026, 11, 27, 2, 0, 0, 0, time.UTC)
	clock := &fakeClock{now: start}
	s, _ := ParseSchedule("0 3 * * *")
	ran := make(chan time.Time, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go runSchedule(ctx, clock, s, func(_ context.Context, due time.Time) { ran <- due })

	waitPending := func() {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for clock.pending() == 0 {
			if time.Now().After(deadline) {
				t.Fatal("scheduler never waited")
			}
			<-time.After(time.Millisecond)
		}
	}
	waitPending()
	clock.advance(start.Add(59 * time.Minute))
	select {
	case d := <-ran:
		t.Fatalf("ran early at %s", d)
	default:
	}
	waitPending()
	clock.advance(start.Add(time.Hour))
	if d := <-ran; !d.Equal(start.Add(time.Hour)) {
		t.Fatalf("ran for %s", d)
	}
	// Three days pass at once (host suspended): one run, then back on schedule.
	waitPending()
	clock.advance(start.Add(75 * time.Hour))
	if d := <-ran; !d.Equal(start.Add(25 * time.Hour)) {
		t.Fatalf("catch-up run for %s", d)
	}
	waitPending()
	clock.advance(start.Add(97 * time.Hour))
	if d := <-ran; !d.Equal(start.Add(97 * time.Hour)) {
		t.Fatalf("next run for %s, want the 03:00 after the catch-up", d)
	}
}
