package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// fakePod is a Vault pod for the daemon's watchers: sealed or not, reachable or not,
// with an unseal that succeeds or rejects the keyset. It counts what it is asked.
type fakePod struct {
	mu        sync.Mutex
	st        vault.SealState
	down      bool
	wrongKeys bool
	unseals   int
}

func (p *fakePod) SealStatus(context.Context) (vault.SealState, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return vault.SealState{}, errors.New("connection refused")
	}
	return p.st, nil
}

func (p *fakePod) Unseal(_ context.Context, ks vault.Keyset, _ *slog.Logger) (vault.UnsealResult, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.unseals++
	if p.wrongKeys {
		return vault.UnsealResult{Sealed: true, WasSealed: true, SharesUsed: ks.Threshold}, vault.ErrWrongKeys
	}
	p.st.Sealed = false
	return vault.UnsealResult{WasSealed: true, SharesUsed: ks.Threshold}, nil
}

func (p *fakePod) set(f func(*fakePod)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p)
}

func (p *fakePod) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.unseals
}

// unitDaemon is a daemon on a fake clock with an age-sealed keyfile and no lab.
func unitDaemon(t *testing.T, clock Clock) *daemon {
	t.Helper()
	dir := t.TempDir()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	cfg := configs.Defaults()
	cfg.Vault.Keyfile = filepath.Join(dir, "state", "unseal.age")
	cfg.Vault.PodAccess = "static"
	kf := &vault.Keyfile{Keyset: vault.NewKeyset(3, "s1", "s2", "s3", "s4", "s5"), Created: time.Now()}
	if err := vault.WriteKeyfile(context.Background(), cfg.Vault.Keyfile, kf, vault.Age{Recipient: id.Recipient()}, true); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	env := NewEnv(&cfg, log, EnvOptions{Clock: clock})
	opts := DaemonOptions{}
	opts.defaults()
	d := &daemon{opts: opts, log: log, metrics: newMetrics("test", func() DrillRecord { return DrillRecord{} }), watchers: map[string]*watcher{}, rejected: map[string]*rejection{}, state: map[string]string{},
		env: env, keyfile: kf}
	return d
}

// waitPending waits (in real time, briefly) until the watcher sleeps on the fake clock.
func waitPending(t *testing.T, c *fakeClock, n int) {
	t.Helper()
	if err := poll(context.Background(), RealClock{}, time.Millisecond, 5*time.Second, "the watcher to wait", func(context.Context) error {
		if c.Pending() < n {
			return errNotYet
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// An unreachable pod is retried with capped, doubling back-off; once it answers, the
// watcher goes back to its idle pace.
func TestWatcherBacksOff(t *testing.T) {
	clock := newFakeClock(time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC))
	d := unitDaemon(t, clock)
	pod := &fakePod{down: true}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); d.watch(ctx, "vault-0", "vault-0/u1/ip", pod) }()
	for i := 0; i < 6; i++ {
		waitPending(t, clock, 1)
		if i == 5 {
			// Up before the sixth wait ends: set while the watcher sleeps, so its next
			// check sees it (set after the Advance, the check could run first).
			pod.set(func(p *fakePod) { p.down = false })
		}
		clock.Advance(d.opts.MaxBackoff)
	}
	waitPending(t, clock, 1)
	cancel()
	<-done
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 2 * time.Second, 2 * time.Second, d.opts.IdleInterval}
	if got := clock.Waits(); !reflect.DeepEqual(got[:len(want)], want) {
		t.Fatalf("waits %v, want %v", got, want)
	}
}

// A keyset Vault rejected at the threshold is not submitted again to the same pod
// incarnation in the same seal state until its back-off has passed (30 s, doubling);
// a new incarnation of the pod (a restart with a new UID or IP) or a changed seal state
// is tried at once. One bad pod never stops the others.
func TestRejectedKeysetIsRememberedPerIncarnation(t *testing.T) {
	clock := newFakeClock(time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC))
	d := unitDaemon(t, clock)
	bad := &fakePod{st: vault.SealState{Initialized: true, Sealed: true, Threshold: 3, Shares: 5, Version: "2.0.4"}, wrongKeys: true}
	good := &fakePod{st: vault.SealState{Initialized: true, Sealed: true, Threshold: 3, Shares: 5, Version: "2.0.4"}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	start := func(name, key string, p *fakePod) context.CancelFunc {
		wctx, wcancel := context.WithCancel(ctx)
		wg.Add(1)
		go func() { defer wg.Done(); d.watch(wctx, name, key, p) }()
		return wcancel
	}
	stopBad := start("vault-1", "vault-1/uid-a/10.0.0.2", bad)
	stopGood := start("vault-0", "vault-0/uid-g/10.0.0.1", good)
	advance := func(total time.Duration) {
		for step := time.Duration(0); step < total; step += d.opts.PollInterval {
			waitPending(t, clock, 2)
			clock.Advance(d.opts.PollInterval)
		}
	}
	advance(2 * time.Second)
	if good.count() != 1 || bad.count() != 1 {
		t.Fatalf("first round: good pod %d unseal(s), bad pod %d", good.count(), bad.count())
	}
	advance(25 * time.Second) // inside the 30 s back-off: not again
	if bad.count() != 1 {
		t.Fatalf("the rejected keyset was submitted %d times within its back-off", bad.count())
	}
	advance(6 * time.Second) // past it: once more, then 60 s
	if bad.count() != 2 {
		t.Fatalf("after the back-off: %d submissions, want 2", bad.count())
	}
	advance(45 * time.Second)
	if bad.count() != 2 {
		t.Fatalf("the doubled back-off was not kept: %d submissions", bad.count())
	}
	// The seal state changes (Vault restarted with another version): at once.
	bad.set(func(p *fakePod) { p.st.Version = "2.0.5" })
	advance(time.Second)
	if bad.count() != 3 {
		t.Fatalf("a new seal state was not tried at once: %d submissions", bad.count())
	}
	// A new incarnation of the pod: at once.
	stopBad()
	stopBad = start("vault-1", "vault-1/uid-b/10.0.0.3", bad)
	advance(time.Second)
	if bad.count() != 4 {
		t.Fatalf("a new incarnation was not tried at once: %d submissions", bad.count())
	}
	stopBad()
	stopGood()
	cancel()
	wg.Wait()
}

// While a mutating verb holds the agent's lock (a recover initialising a throwaway
// cluster), the daemon submits no share: its keys and the throwaway's never meet.
func TestDaemonStepsAsideWhileAVerbRuns(t *testing.T) {
	clock := newFakeClock(time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC))
	d := unitDaemon(t, clock)
	unlock, err := d.env.Lock("recover")
	if err != nil {
		t.Fatal(err)
	}
	pod := &fakePod{st: vault.SealState{Initialized: true, Sealed: true, Threshold: 3, Shares: 5}}
	var joining time.Time
	state, err := d.check(context.Background(), d.log, clock, "vault-0", "k", pod, &joining)
	if err != nil || pod.count() != 0 || state != fmt.Sprintf("sealed (left to %s)", "recover (pid "+itoa(pidOf())+", since 2026-11-27 00:00:00Z)") {
		t.Fatalf("with the lock held: state %q, %d unseal(s), %v", state, pod.count(), err)
	}
	unlock()
	if state, err := d.check(context.Background(), d.log, clock, "vault-0", "k", pod, &joining); err != nil || state != "unsealed" || pod.count() != 1 {
		t.Fatalf("after the lock: state %q, %d unseal(s), %v", state, pod.count(), err)
	}
}

func itoa(i int) string { return fmt.Sprint(i) }

func pidOf() int { return osGetpid() }

func writeAgeIdentity(t *testing.T) string {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "age.key")
	if err := os.WriteFile(p, []byte(id.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
