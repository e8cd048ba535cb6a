package agent

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/notify"
)

// recordSender keeps what it was given; with block set it hangs until its context ends.
type recordSender struct {
	name  string
	block bool
	mu    sync.Mutex
	got   []notify.Message
	done  chan struct{}
}

func (r *recordSender) Name() string { return r.name }

func (r *recordSender) Send(ctx context.Context, m notify.Message) error {
	if r.block {
		<-ctx.Done()
		return ctx.Err()
	}
	r.mu.Lock()
	r.got = append(r.got, m)
	r.mu.Unlock()
	r.done <- struct{}{}
	return nil
}

func (r *recordSender) messages() []notify.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]notify.Message(nil), r.got...)
}

func alertCfg() configs.Notify {
	c := configs.Defaults().Notify
	c.Reminder, c.MaxPerHour, c.Timeout = time.Hour, 5, 200*time.Millisecond
	return c
}

// One message when a condition starts failing, none while it goes on, a reminder after
// notify.reminder, one when it recovers, nothing for a condition that never failed; a
// rate limit that drops and says so; and a target that hangs delays neither the caller
// nor the other target.
func TestAlerterStateChanges(t *testing.T) {
	clock := newFakeClock(time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC))
	mail := &recordSender{name: "mail", done: make(chan struct{}, 64)}
	hung := &recordSender{name: "hung", block: true}
	m := newAlertMetrics()
	a, stop := newAlerter(alertCfg(), "pve1", clock, slog.New(slog.DiscardHandler), m, []notify.Sender{hung, mail})
	wait := func(n int) {
		t.Helper()
		for range n {
			select {
			case <-mail.done:
			case <-time.After(5 * time.Second):
				t.Fatalf("mail got %d messages, want more", len(mail.messages()))
			}
		}
	}
	kinds := func() string {
		var ks []string
		for _, m := range mail.messages() {
			ks = append(ks, string(m.Kind)+" "+m.Event+"/"+m.Subject)
		}
		return strings.Join(ks, ", ")
	}

	t0 := time.Now()
	a.OK("backup", "scheduled backup", "fine") // never failed: nothing
	a.Failing("backup", "scheduled backup", "disk full")
	for range 10 {
		a.Failing("backup", "scheduled backup", "disk full")
	}
	if d := time.Since(t0); d > 100*time.Millisecond {
		t.Fatalf("the caller waited %s with a hung target", d)
	}
	wait(1)
	clock.Advance(59 * time.Minute)
	a.Failing("backup", "scheduled backup", "disk full")
	clock.Advance(2 * time.Minute)
	a.Failing("backup", "scheduled backup", "still full")
	wait(1)
	a.OK("backup", "scheduled backup", "stored again")
	a.OK("backup", "scheduled backup", "stored again")
	wait(1)
	a.Once("restarted", "daemon", "crashed")
	wait(1)
	if got, want := kinds(), "failing backup/scheduled backup, reminder backup/scheduled backup, recovered backup/scheduled backup, event restarted/daemon"; got != want {
		t.Fatalf("messages: %s\nwant:     %s", got, want)
	}
	rec := mail.messages()[2]
	if !rec.Since.Equal(mail.messages()[0].At) || rec.Host != "pve1" || !strings.Contains(rec.Body(), "failing since") {
		t.Fatalf("recovery message: %+v\n%s", rec, rec.Body())
	}

	// max_per_hour 5: three went out this hour (the first is an hour old); two more go,
	// the next two are dropped, and the first one after the hour says so.
	a.Failing("drill", "restore drill", "x")
	a.Failing("token", "snapshot", "x")
	wait(2)
	a.Failing("token", "operator", "x")
	a.Failing("token", "other", "x")
	if n := testutil.ToFloat64(m.dropped.WithLabelValues("mail", "max_per_hour")); n != 2 {
		t.Fatalf("dropped %v, want 2", n)
	}
	clock.Advance(61 * time.Minute)
	a.OK("drill", "restore drill", "passed")
	wait(1)
	last := mail.messages()[len(mail.messages())-1]
	if last.Dropped != 2 || !strings.Contains(last.Body(), "2 earlier message(s) were dropped") {
		t.Fatalf("the message after the drops: %+v", last)
	}

	// The hung target: every delivery ended at notify.timeout and was counted as failed;
	// its queue filled and dropped rather than blocking.
	stop()
	if f := testutil.ToFloat64(m.failed.WithLabelValues("hung")); f < 1 {
		t.Fatalf("hung target failures %v", f)
	}
	if s := testutil.ToFloat64(m.sent.WithLabelValues("mail")); s != float64(len(mail.messages())) {
		t.Fatalf("sent %v, got %d", s, len(mail.messages()))
	}
	var nilAlerter *alerter
	nilAlerter.Failing("backup", "x", "y") // no targets: a no-op
}
