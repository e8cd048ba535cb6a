package agent

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

// The next backup is anchored to the newest snapshot on disk: a restart never postpones
// one, and a slot missed while the host was off (or the agent down) runs at once.
func TestNextRun(t *testing.T) {
	six, _ := configs.ParseSchedule("6h")
	daily, _ := configs.ParseSchedule("CRON_TZ=UTC 0 3 * * *")
	for _, tc := range []struct {
		name        string
		s           configs.Schedule
		newest, now string
		want        string
	}{
		{"never backed up: now", six, "", "2026-11-27T10:00:00Z", "2026-11-27T10:00:00Z"},
		{"the next slot after the newest", six, "2026-11-27T07:13:00Z", "2026-11-27T08:00:00Z", "2026-11-27T12:00:00Z"},
		{"a restart at 11:59 does not postpone 12:00", six, "2026-11-27T06:00:01Z", "2026-11-27T11:59:00Z", "2026-11-27T12:00:00Z"},
		{"a missed slot runs at once", six, "2026-11-27T06:00:01Z", "2026-11-27T13:30:00Z", "2026-11-27T13:30:00Z"},
		{"daily, host off for three days", daily, "2026-11-24T03:00:02Z", "2026-11-27T09:00:00Z", "2026-11-27T09:00:00Z"},
		{"daily, taken today already", daily, "2026-11-27T03:00:02Z", "2026-11-27T09:00:00Z", "2026-11-28T03:00:00Z"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var newest time.Time
			if tc.newest != "" {
				newest = at(tc.newest)
			}
			if got := NextRun(tc.s, newest, at(tc.now)); !got.Equal(at(tc.want)) {
				t.Fatalf("NextRun = %s, want %s", got.Format(time.RFC3339), tc.want)
			}
		})
	}
}

// A SIGHUP with a bad configuration is refused and everything that ran keeps running:
// the schedule goes on (once, a failed reload stopped it until the next restart).
func TestFailedReloadKeepsTheSchedule(t *testing.T) {
	clock := newFakeClock(at("2026-11-27T00:00:00Z"))
	d := unitDaemon(t, clock) // for its configuration: an age keyfile, no pods
	cfg := *d.env.Config
	cfg.Snapshots.Schedule = "1m"
	cfg.Snapshots.Dir = t.TempDir() + "/snaps"
	cfg.Metrics.Listen = "127.0.0.1:0"
	cfg.Vault.Keyfile = t.TempDir() + "/state/unseal.age"
	cfg.Vault.AgeIdentity = configs.SecretRef{File: writeAgeIdentity(t)}
	cfg.Vault.Seal = "age"
	if err := NewEnv(&cfg, d.log, EnvOptions{}).Keyfile.Write(context.Background(), d.keyfile, true); err != nil {
		t.Fatal(err)
	}
	var loads atomic.Int32
	load := func() (*Env, error) {
		if loads.Add(1) == 2 {
			return nil, errors.New("config.yaml: 1 problem(s): nodes: at least one node is required")
		}
		return NewEnv(&cfg, d.log, EnvOptions{Clock: clock}), nil
	}
	reload := make(chan os.Signal, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	metrics := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, DaemonOptions{Load: load, Reload: reload, MetricsReady: func(a string) { metrics <- a }})
	}()
	var addr string
	select {
	case addr = <-metrics:
	case err := <-done:
		t.Fatalf("daemon: %v", err)
	}
	failures := func() int {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		m := regexp.MustCompile(`(?m)^pva_backup_failures_total (\d+)`).FindSubmatch(b)
		if m == nil {
			t.Fatal("no pva_backup_failures_total")
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	// Every scheduled attempt fails (no pod answers): each is counted, then retried.
	tickUntil := func(want int) {
		t.Helper()
		if err := poll(context.Background(), RealClock{}, 5*time.Millisecond, 10*time.Second, "scheduled attempts", func(context.Context) error {
			clock.Advance(time.Minute)
			if failures() < want {
				return errNotYet
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	tickUntil(2)
	reload <- os.Interrupt // the bad configuration
	if err := poll(context.Background(), RealClock{}, 5*time.Millisecond, 5*time.Second, "the reload", func(context.Context) error {
		if loads.Load() < 2 {
			return errNotYet
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	before := failures()
	tickUntil(before + 2)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
