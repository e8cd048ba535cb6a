package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// Notifier is the service manager (sd_notify); a nil one is fine.
type Notifier interface {
	Notify(states ...string) error
}

// DaemonOptions wire the daemon to its process.
type DaemonOptions struct {
	// Load reads and validates the configuration (at start and on every reload).
	Load func() (*configs.Config, error)
	// Reload receives a value for every SIGHUP.
	Reload <-chan os.Signal
	Notify Notifier
	// WatchdogInterval sends WATCHDOG=1 this often (0: no watchdog).
	WatchdogInterval time.Duration
	Version          string
	// PollInterval is how often a sealed pod's status is read (default 500ms), and
	// IdleInterval an unsealed one's (default 1s: a restart shows as a refused
	// connection or a sealed answer at the next read); DiscoverInterval is how often pods
	// are listed (default 5s); MaxBackoff caps the wait after a pod could not be reached
	// (default 2s).
	PollInterval, IdleInterval, DiscoverInterval, MaxBackoff time.Duration
	// MetricsReady, when set, receives the metrics address once it listens.
	MetricsReady func(addr string)
	// Clock drives the backup schedule (default: the real one).
	Clock Clock
}

// Run is the daemon: it keeps every Vault pod unsealed. A watcher per pod reads its seal
// status every PollInterval and unseals it when sealed (a reboot of the host, the VM or
// the pod, or Vault restarting inside it); an unreachable pod is retried with capped
// back-off. A keyset Vault rejects at the threshold is not retried for that pod until
// the pod or the keyfile changes. SIGHUP reloads the configuration and keyfile (a bad
// new configuration is logged and the old one kept). It returns nil when ctx ends.
func Run(ctx context.Context, opts DaemonOptions, log *slog.Logger) error {
	log = log.With("component", "daemon")
	if opts.PollInterval <= 0 {
		opts.PollInterval = 500 * time.Millisecond
	}
	if opts.IdleInterval <= 0 {
		opts.IdleInterval = max(time.Second, opts.PollInterval)
	}
	if opts.DiscoverInterval <= 0 {
		opts.DiscoverInterval = 5 * time.Second
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 2 * time.Second
	}
	if opts.Clock == nil {
		opts.Clock = realClock{}
	}
	cfg, err := opts.Load()
	if err != nil {
		return err
	}
	m := newMetrics(opts.Version)
	d := &daemon{opts: opts, log: log, metrics: m, watchers: map[string]*watcher{}, badKeys: map[string]string{}}
	if err := d.configure(ctx, cfg); err != nil {
		return err
	}
	stopMetrics, err := d.serveMetrics(cfg.Metrics.Listen)
	if err != nil {
		return err
	}
	defer stopMetrics()
	// Start-up garbage (Kubernetes and Helm type registries) goes back to the OS, so the
	// idle daemon stays small.
	debug.FreeOSMemory()
	d.notify("READY=1", "STATUS=watching Vault pods")
	log.Info("daemon started", "namespace", cfg.Chart.Namespace, "release", cfg.Chart.Release, "pod_access", cfg.Vault.PodAccess)

	discover := time.NewTicker(opts.DiscoverInterval)
	defer discover.Stop()
	var watchdog <-chan time.Time
	if opts.WatchdogInterval > 0 {
		t := time.NewTicker(opts.WatchdogInterval)
		defer t.Stop()
		watchdog = t.C
	}
	d.discover(ctx)
	stopSchedule := d.startSchedule(ctx, cfg)
	for {
		select {
		case <-ctx.Done():
			d.notify("STOPPING=1")
			stopSchedule()
			d.stopAll()
			log.Info("daemon stopped")
			return nil
		case <-discover.C:
			d.discover(ctx)
		case <-watchdog:
			d.notify("WATCHDOG=1")
		case <-opts.Reload:
			newCfg, err := opts.Load()
			if err != nil {
				log.Error("reload refused: keeping the running configuration", "err", err)
				d.notify("STATUS=reload refused: " + firstLine(err.Error()))
				continue
			}
			stopSchedule()
			d.stopAll()
			if err := d.configure(ctx, newCfg); err != nil {
				log.Error("reload failed", "err", err)
				continue
			}
			log.Info("configuration and keyfile reloaded")
			d.discover(ctx)
			stopSchedule = d.startSchedule(ctx, newCfg)
		}
	}
}

type daemon struct {
	opts    DaemonOptions
	log     *slog.Logger
	metrics *metrics

	mu       sync.Mutex
	cfg      *configs.Config
	acc      *podAccess
	keyfile  *vault.Keyfile
	watchers map[string]*watcher // pod name → watcher
	badKeys  map[string]string   // pod UID → keyset fingerprint Vault rejected
	state    map[string]string   // pod name → last state, for STATUS
}

type watcher struct {
	key    string // name/uid/ip
	cancel context.CancelFunc
	done   chan struct{}
}

// configure (re)loads the keyfile and pod access for cfg.
func (d *daemon) configure(ctx context.Context, cfg *configs.Config) error {
	s, err := sealer(cfg)
	if err != nil {
		return err
	}
	kf, err := vault.ReadKeyfile(ctx, cfg.Vault.Keyfile, s)
	if errors.Is(err, vault.ErrNoKeyfile) {
		d.log.Warn("no keyfile yet: pods are watched but not unsealed until `pve-vault-agent init` writes one (then send SIGHUP)", "keyfile", cfg.Vault.Keyfile)
		err = nil
	}
	if err != nil {
		return fmt.Errorf("keyfile: %w", err)
	}
	acc, err := newPodAccess(ctx, cfg, d.log)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.acc != nil {
		d.acc.Close()
	}
	d.cfg, d.acc, d.keyfile = cfg, acc, kf
	d.badKeys = map[string]string{}
	d.state = map[string]string{}
	return nil
}

// startSchedule runs the backup schedule of cfg until the returned func is called.
func (d *daemon) startSchedule(ctx context.Context, cfg *configs.Config) func() {
	sched, err := ParseSchedule(cfg.Snapshots.Schedule)
	if err != nil {
		d.log.Error("no backup schedule", "err", err)
		return func() {}
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runSchedule(sctx, d.opts.Clock, sched, func(ctx context.Context, due time.Time) {
			t0 := time.Now()
			rep, err := BackupNow(ctx, cfg, BackupOptions{Now: d.opts.Clock.Now, Version: d.opts.Version}, d.log)
			d.metrics.backupDuration.Set(time.Since(t0).Seconds())
			if err != nil && rep == nil {
				d.metrics.backupFailures.Inc()
				if ctx.Err() == nil {
					d.log.Error("scheduled backup failed", "due", due, "err", err)
				}
				return
			}
			d.metrics.backupLastSuccess.SetToCurrentTime()
			d.metrics.backupLastSize.Set(float64(rep.Snapshot.Size))
			if err != nil {
				d.log.Warn("backup stored; retention failed", "err", err)
			}
		})
	}()
	return func() { cancel(); <-done }
}

func (d *daemon) notify(states ...string) {
	if d.opts.Notify != nil {
		if err := d.opts.Notify.Notify(states...); err != nil {
			d.log.Debug("sd_notify failed", "err", err)
		}
	}
}

// discover starts a watcher for each new pod (or pod incarnation) and stops the
// watchers of pods that are gone.
func (d *daemon) discover(ctx context.Context) {
	d.mu.Lock()
	acc := d.acc
	d.mu.Unlock()
	pods, err := acc.Pods(ctx)
	if err != nil {
		if ctx.Err() == nil {
			d.log.Warn("list vault pods failed; retrying", "err", err)
		}
		return
	}
	seen := map[string]bool{}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range pods {
		seen[p.Name] = true
		key := p.Name + "/" + p.UID + "/" + p.IP
		if w, ok := d.watchers[p.Name]; ok {
			if w.key == key {
				continue
			}
			w.cancel()
		}
		wctx, cancel := context.WithCancel(ctx)
		w := &watcher{key: key, cancel: cancel, done: make(chan struct{})}
		d.watchers[p.Name] = w
		go func(p vaultPod) {
			defer close(w.done)
			d.watch(wctx, p)
		}(p)
	}
	for name, w := range d.watchers {
		if !seen[name] {
			w.cancel()
			delete(d.watchers, name)
			delete(d.state, name)
			d.metrics.forget(name)
		}
	}
}

func (d *daemon) stopAll() {
	d.mu.Lock()
	ws := d.watchers
	d.watchers = map[string]*watcher{}
	d.mu.Unlock()
	for _, w := range ws {
		w.cancel()
		<-w.done
	}
}

// watch keeps one pod unsealed until ctx ends.
func (d *daemon) watch(ctx context.Context, p vaultPod) {
	log := d.log.With("pod", p.Name)
	backoff := time.Duration(0)
	lastReport := ""
	for {
		state, err := d.check(ctx, p, log)
		if ctx.Err() != nil {
			return
		}
		wait := d.opts.PollInterval
		if state == "unsealed" {
			wait = d.opts.IdleInterval
		}
		if err != nil {
			if backoff == 0 {
				backoff = 250 * time.Millisecond
			} else {
				backoff = min(2*backoff, d.opts.MaxBackoff)
			}
			wait = backoff
			if msg := err.Error(); msg != lastReport {
				log.Warn("pod needs attention", "state", state, "err", err)
				lastReport = msg
			}
		} else {
			backoff, lastReport = 0, ""
		}
		d.setState(p.Name, state)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// check reads one pod's state and unseals it when needed.
func (d *daemon) check(ctx context.Context, p vaultPod, log *slog.Logger) (string, error) {
	st, err := p.API.SealStatus(ctx)
	if err != nil {
		d.metrics.reachable.WithLabelValues(p.Name).Set(0)
		return "unreachable", err
	}
	d.metrics.reachable.WithLabelValues(p.Name).Set(1)
	d.metrics.sealed.WithLabelValues(p.Name).Set(b2f(st.Sealed))
	if !st.Sealed {
		return "unsealed", nil
	}
	d.mu.Lock()
	kf := d.keyfile
	bad := d.badKeys[p.UID]
	d.mu.Unlock()
	if kf == nil {
		return "sealed (no keyfile)", nil
	}
	fp := kf.Keyset.Fingerprint()
	if bad == fp {
		return "sealed (keyfile rejected)", nil
	}
	clusterInit := st.Initialized || d.peerInitialised(ctx, p.Name)
	t0 := time.Now()
	d.metrics.attempts.WithLabelValues(p.Name).Inc()
	res, err := unsealPod(ctx, p, kf, clusterInit, log)
	if err != nil {
		reason := "error"
		switch {
		case errors.Is(err, vault.ErrWrongKeys):
			reason = "wrong_keys"
			d.mu.Lock()
			d.badKeys[p.UID] = fp
			d.mu.Unlock()
			log.Error("the keyfile's shares do not unseal this pod; not retrying until the pod or keyfile changes", "keyset", fp, "err", err)
		case errors.Is(err, ErrDataGone):
			reason = "uninitialised"
		}
		d.metrics.failures.WithLabelValues(p.Name, reason).Inc()
		return "sealed", err
	}
	if !res.Sealed {
		d.metrics.sealed.WithLabelValues(p.Name).Set(0)
		d.metrics.lastUnseal.WithLabelValues(p.Name).SetToCurrentTime()
		log.Info("unsealed", "shares", res.SharesUsed, "reset_stale", res.ResetStale, "took", time.Since(t0).Round(time.Millisecond))
		return "unsealed", nil
	}
	return "sealed", nil
}

// peerInitialised reports whether another pod is initialised (so an uninitialised pod
// is a follower waiting to join, not a lost one).
func (d *daemon) peerInitialised(ctx context.Context, self string) bool {
	d.mu.Lock()
	acc := d.acc
	d.mu.Unlock()
	pods, err := acc.Pods(ctx)
	if err != nil {
		return false
	}
	for _, q := range pods {
		if q.Name == self {
			continue
		}
		if st, err := q.API.SealStatus(ctx); err == nil && st.Initialized {
			return true
		}
	}
	return false
}

func (d *daemon) setState(pod, state string) {
	d.mu.Lock()
	if d.state == nil {
		d.state = map[string]string{}
	}
	changed := d.state[pod] != state
	d.state[pod] = state
	var parts []string
	if changed {
		names := make([]string, 0, len(d.state))
		for n := range d.state {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			parts = append(parts, n+" "+d.state[n])
		}
	}
	d.mu.Unlock()
	if changed {
		d.notify("STATUS=" + strings.Join(parts, ", "))
	}
}

func (d *daemon) serveMetrics(listen string) (func(), error) {
	if listen == "" {
		return func() {}, nil
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("metrics listener %s: %w (set metrics.listen, or \"\" to disable)", listen, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	if d.opts.MetricsReady != nil {
		d.opts.MetricsReady(l.Addr().String())
	}
	return func() { _ = srv.Close() }, nil
}

type metrics struct {
	reg               *prometheus.Registry
	backupLastSuccess prometheus.Gauge
	backupLastSize    prometheus.Gauge
	backupFailures    prometheus.Counter
	backupDuration    prometheus.Gauge
	sealed            *prometheus.GaugeVec
	reachable         *prometheus.GaugeVec
	attempts          *prometheus.CounterVec
	failures          *prometheus.CounterVec
	lastUnseal        *prometheus.GaugeVec
}

func newMetrics(version string) *metrics {
	m := &metrics{
		reg:        prometheus.NewRegistry(),
		sealed:     prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pva_vault_sealed", Help: "1 when the Vault pod is sealed."}, []string{"pod"}),
		reachable:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pva_vault_reachable", Help: "1 when the agent reached the Vault pod."}, []string{"pod"}),
		attempts:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pva_unseal_attempts_total", Help: "Unseal attempts per pod."}, []string{"pod"}),
		failures:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "pva_unseal_failures_total", Help: "Failed unseal attempts per pod and reason."}, []string{"pod", "reason"}),
		lastUnseal: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pva_last_unseal_timestamp_seconds", Help: "When the agent last unsealed the pod."}, []string{"pod"}),
	}
	m.backupLastSuccess = prometheus.NewGauge(prometheus.GaugeOpts{Name: "pva_backup_last_success_timestamp_seconds", Help: "When the last scheduled snapshot was stored."})
	m.backupLastSize = prometheus.NewGauge(prometheus.GaugeOpts{Name: "pva_backup_last_size_bytes", Help: "Size of the last stored snapshot."})
	m.backupFailures = prometheus.NewCounter(prometheus.CounterOpts{Name: "pva_backup_failures_total", Help: "Scheduled backups that stored nothing."})
	m.backupDuration = prometheus.NewGauge(prometheus.GaugeOpts{Name: "pva_backup_duration_seconds", Help: "How long the last scheduled backup took."})
	m.reg.MustRegister(m.backupLastSuccess, m.backupLastSize, m.backupFailures, m.backupDuration)
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pva_build_info", Help: "Build of the running agent."}, []string{"version", "goversion"})
	build.WithLabelValues(version, runtime.Version()).Set(1)
	m.reg.MustRegister(m.sealed, m.reachable, m.attempts, m.failures, m.lastUnseal, build)
	return m
}

func (m *metrics) forget(pod string) {
	m.sealed.DeleteLabelValues(pod)
	m.reachable.DeleteLabelValues(pod)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
