package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/notify"
)

// NotifySenders builds a sender per notify target, reading their secrets.
func NotifySenders(cfg *configs.Config) ([]notify.Sender, error) {
	var out []notify.Sender
	for i, t := range cfg.Notify.Targets {
		at := fmt.Sprintf("notify.targets[%d]", i)
		switch t.Type {
		case "smtp":
			s := &notify.SMTP{Target: t.Name, Host: t.Host, Port: t.Port, TLS: t.TLS, Username: t.Username, From: t.From, To: t.To, CAFile: t.CAFile}
			if t.Password.IsSet() {
				sec, err := t.Password.Read()
				if err != nil {
					return nil, fmt.Errorf("%s.password: %w", at, err)
				}
				s.Password = sec.Trimmed()
			}
			out = append(out, s)
		case "webhook":
			w := &notify.Webhook{Target: t.Name, URL: t.URL, CAFile: t.CAFile}
			if t.HMACKey.IsSet() {
				sec, err := t.HMACKey.Read()
				if err != nil {
					return nil, fmt.Errorf("%s.hmac_key: %w", at, err)
				}
				w.Key = []byte(sec.Trimmed())
			}
			out = append(out, w)
		case "shoutrrr":
			sec, err := t.ServiceURL.Read()
			if err != nil {
				return nil, fmt.Errorf("%s.service_url: %w", at, err)
			}
			s := &notify.Shoutrrr{Target: t.Name, URL: sec.Trimmed()}
			if err := s.Check(); err != nil {
				return nil, withHint(fmt.Errorf("%s.service_url: %w", at, err), "a shoutrrr URL, e.g. ntfy://ntfy.sh/TOPIC or gotify://HOST/TOKEN (containrrr.dev/shoutrrr services)")
			}
			out = append(out, s)
		}
	}
	return out, nil
}

// alerter tells the operator when a condition starts failing, reminds while it lasts
// (notify.reminder) and says when it works again: one message per change of state. It
// never blocks its caller: each target has its own queue and worker, a full queue
// drops (logged, counted), and a slow or hung target delays only its own messages.
type alerter struct {
	cfg     configs.Notify
	host    string
	clock   Clock
	log     *slog.Logger
	metrics *alertMetrics

	mu      sync.Mutex
	states  map[string]*alertState
	workers []*alertWorker
}

type alertState struct {
	failing bool
	since   time.Time
	told    time.Time
}

type alertWorker struct {
	sender  notify.Sender
	queue   chan notify.Message
	sent    []time.Time // within the last hour, for max_per_hour
	dropped int         // since the last message that went out
}

type alertMetrics struct {
	sent, failed, dropped *prometheus.CounterVec
}

func newAlertMetrics() *alertMetrics {
	return &alertMetrics{
		sent:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pva_notify_sent_total", Help: "Notifications delivered, per target."}, []string{"target"}),
		failed:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pva_notify_failures_total", Help: "Notifications a target did not take (down, refused, timed out)."}, []string{"target"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pva_notify_dropped_total", Help: "Notifications dropped by notify.max_per_hour or a full queue."}, []string{"target", "reason"}),
	}
}

const alertQueue = 32

// newAlerter starts a worker per sender; stop ends them once their queues are drained
// (each delivery bounded by notify.timeout).
func newAlerter(cfg configs.Notify, host string, clock Clock, log *slog.Logger, m *alertMetrics, senders []notify.Sender) (*alerter, func()) {
	a := &alerter{cfg: cfg, host: host, clock: clock, log: log.With("component", "notify"), metrics: m, states: map[string]*alertState{}}
	var wg sync.WaitGroup
	for _, s := range senders {
		w := &alertWorker{sender: s, queue: make(chan notify.Message, alertQueue)}
		a.workers = append(a.workers, w)
		m.sent.WithLabelValues(s.Name())
		m.failed.WithLabelValues(s.Name())
		wg.Go(func() { a.work(w) })
	}
	return a, func() {
		a.mu.Lock()
		for _, w := range a.workers {
			close(w.queue)
		}
		a.workers = nil
		a.mu.Unlock()
		// What is queued gets a few seconds to go out; a stop never waits on a target
		// that is down (systemd's TimeoutStopSec is 30 s).
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(stopGrace):
			a.log.Warn("stopping with notifications still queued: a target is slow or down")
		}
	}
}

// stopGrace bounds how long a stopping daemon waits for queued notifications.
const stopGrace = 5 * time.Second

func (a *alerter) work(w *alertWorker) {
	for m := range w.queue {
		ctx, cancel := context.WithTimeout(context.Background(), a.cfg.Timeout)
		t0 := time.Now()
		err := w.sender.Send(ctx, m)
		cancel()
		if err != nil {
			a.metrics.failed.WithLabelValues(w.sender.Name()).Inc()
			a.log.Warn("notification not delivered", "target", w.sender.Name(), "event", m.Event, "subject", m.Subject, "kind", m.Kind, "took", time.Since(t0).Round(time.Millisecond), "err", err)
			continue
		}
		a.metrics.sent.WithLabelValues(w.sender.Name()).Inc()
		a.log.Info("notification sent", "target", w.sender.Name(), "event", m.Event, "subject", m.Subject, "kind", m.Kind, "took", time.Since(t0).Round(time.Millisecond))
	}
}

// Failing reports that event/subject fails now, with text saying why. The first report
// of a failure is sent; later ones only as a reminder once notify.reminder has passed.
func (a *alerter) Failing(event, subject, text string) {
	if a == nil {
		return
	}
	now := a.clock.Now()
	a.mu.Lock()
	key := event + "\x00" + subject
	st := a.states[key]
	kind := notify.Failing
	switch {
	case st == nil || !st.failing:
		st = &alertState{failing: true, since: now, told: now}
		a.states[key] = st
	case a.cfg.Reminder > 0 && now.Sub(st.told) >= a.cfg.Reminder:
		st.told = now
		kind = notify.Reminder
	default:
		a.mu.Unlock()
		return
	}
	since := st.since
	a.mu.Unlock()
	a.enqueue(notify.Message{Event: event, Subject: subject, Kind: kind, Text: text, Since: since})
}

// OK reports that event/subject works; after a failure that is a recovery message.
func (a *alerter) OK(event, subject, text string) {
	if a == nil {
		return
	}
	a.mu.Lock()
	key := event + "\x00" + subject
	st := a.states[key]
	if st == nil || !st.failing {
		a.mu.Unlock()
		return
	}
	delete(a.states, key)
	a.mu.Unlock()
	a.enqueue(notify.Message{Event: event, Subject: subject, Kind: notify.Recovered, Text: text, Since: st.since})
}

// Once sends a message about something that happened (no state, no recovery).
func (a *alerter) Once(event, subject, text string) {
	if a == nil {
		return
	}
	a.enqueue(notify.Message{Event: event, Subject: subject, Kind: notify.Event, Text: text})
}

// enqueue hands m to every target's queue without waiting, under its hourly cap.
func (a *alerter) enqueue(m notify.Message) {
	m.Host, m.At = a.host, a.clock.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.workers {
		name := w.sender.Name()
		hourAgo := m.At.Add(-time.Hour)
		for len(w.sent) > 0 && w.sent[0].Before(hourAgo) {
			w.sent = w.sent[1:]
		}
		if len(w.sent) >= a.cfg.MaxPerHour {
			w.dropped++
			a.metrics.dropped.WithLabelValues(name, "max_per_hour").Inc()
			a.log.Warn("notification dropped: notify.max_per_hour reached", "target", name, "event", m.Event, "subject", m.Subject, "kind", m.Kind)
			continue
		}
		mm := m
		mm.Dropped = w.dropped
		select {
		case w.queue <- mm:
			w.sent = append(w.sent, m.At)
			w.dropped = 0
		default:
			w.dropped++
			a.metrics.dropped.WithLabelValues(name, "queue_full").Inc()
			a.log.Warn("notification dropped: the target's queue is full (it is slow or down)", "target", name, "event", m.Event, "subject", m.Subject)
		}
	}
}

// runMarker is the file a running daemon keeps in its state directory: found at start,
// the last run did not stop cleanly (a crash, the watchdog, the OOM killer, kill -9).
func (e *Env) runMarker() string {
	return filepath.Join(filepath.Dir(e.Config.Vault.Keyfile), ".daemon-running")
}

// markRunning reports whether the last run ended uncleanly, and marks this one.
func (e *Env) markRunning() (unclean bool, since time.Time, err error) {
	p := e.runMarker()
	if fi, err := os.Stat(p); err == nil {
		unclean, since = true, fi.ModTime()
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return unclean, since, err
	}
	err = os.WriteFile(p, []byte(fmt.Sprintf("pid %d\n", os.Getpid())), 0o600)
	return unclean, since, err
}

func (e *Env) clearRunning() {
	if err := os.Remove(e.runMarker()); err != nil && !errors.Is(err, os.ErrNotExist) {
		e.Log.Warn("remove the daemon's run marker", "err", err)
	}
}

// NotifyResult is what one target did with the test message.
type NotifyResult struct {
	Target  string  `json:"target"`
	OK      bool    `json:"ok"`
	Seconds float64 `json:"seconds"`
	Error   string  `json:"error,omitempty"`
}

// NotifyTest sends a test message to every notify target, each bounded by
// notify.timeout, and reports each; an error when any failed.
func NotifyTest(ctx context.Context, env *Env) ([]NotifyResult, error) {
	if len(env.Config.Notify.Targets) == 0 {
		return nil, hintf("add notify.targets to the configuration (README, Being told)", "no notify targets")
	}
	senders, err := NotifySenders(env.Config)
	if err != nil {
		return nil, err
	}
	host, _ := env.Identity()
	m := notify.Message{Event: "test", Subject: "notify test", Kind: notify.Test, Host: host, At: env.Clock.Now(),
		Text: "This is a test message from pve-vault-agent: the target works. Failures and recoveries of backups, off-host copies, drills, tokens and unsealing come this way."}
	out := make([]NotifyResult, len(senders))
	var wg sync.WaitGroup
	for i, s := range senders {
		wg.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, env.Config.Notify.Timeout)
			defer cancel()
			t0 := time.Now()
			err := s.Send(sctx, m)
			out[i] = NotifyResult{Target: s.Name(), OK: err == nil, Seconds: time.Since(t0).Seconds()}
			if err != nil {
				out[i].Error = err.Error()
			}
		})
	}
	wg.Wait()
	var failed []string
	for _, r := range out {
		if !r.OK {
			failed = append(failed, r.Target)
		}
	}
	if len(failed) > 0 {
		return out, fmt.Errorf("%d of %d targets did not take the test message: %v", len(failed), len(out), failed)
	}
	return out, nil
}
