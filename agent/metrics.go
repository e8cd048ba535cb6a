package agent

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

type metrics struct {
	reg                *prometheus.Registry
	backupLastSuccess  prometheus.Gauge
	backupNext         prometheus.Gauge
	backupLastSize     prometheus.Gauge
	backupFailures     prometheus.Counter
	backupDuration     prometheus.Gauge
	reloadFailures     prometheus.Counter
	discoveryFailures  prometheus.Counter
	sealed             *prometheus.GaugeVec
	removed            *prometheus.GaugeVec
	reachable          *prometheus.GaugeVec
	attempts           *prometheus.CounterVec
	failures           *prometheus.CounterVec
	lastUnseal         *prometheus.GaugeVec
	tokenTTL           *prometheus.GaugeVec
	tokenRenewed       *prometheus.GaugeVec
	tokenRenewFailures *prometheus.CounterVec
	leader             prometheus.Gauge
	backupPeriod       prometheus.Gauge
	drillPeriod        prometheus.Gauge
	unsealLatency      *prometheus.GaugeVec
	leaderChanges      prometheus.Counter
	leaderSeen         *prometheus.GaugeVec
	leaderMu           sync.Mutex
	leaderLast         string
}

// newMetrics registers the daemon's metrics; the drill's are read from the drill record
// at each scrape, so a drill run by the verb shows too.
func newMetrics(version string, drills func() DrillRecord, extra ...prometheus.Collector) *metrics {
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	gv := func(name, help string, labels ...string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
	}
	cv := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	}
	m := &metrics{
		reg:                prometheus.NewRegistry(),
		backupLastSuccess:  g("pva_backup_last_success_timestamp_seconds", "When the newest scheduled snapshot was taken."),
		backupNext:         g("pva_backup_next_timestamp_seconds", "When the next scheduled snapshot is due."),
		backupLastSize:     g("pva_backup_last_size_bytes", "Size of the last stored snapshot."),
		backupFailures:     c("pva_backup_failures_total", "Scheduled backups that stored nothing."),
		backupDuration:     g("pva_backup_duration_seconds", "How long the last scheduled backup took."),
		reloadFailures:     c("pva_reload_failures_total", "Reloads refused (the running configuration was kept)."),
		discoveryFailures:  c("pva_discovery_failures_total", "Pod listings that failed or timed out."),
		sealed:             gv("pva_vault_sealed", "1 when the Vault pod is sealed.", "pod"),
		removed:            gv("pva_vault_removed", "1 when the Vault pod was removed from the Raft cluster.", "pod"),
		reachable:          gv("pva_vault_reachable", "1 when the agent reached the Vault pod.", "pod"),
		attempts:           cv("pva_unseal_attempts_total", "Unseal attempts per pod.", "pod"),
		failures:           cv("pva_unseal_failures_total", "Failed unseal attempts per pod and reason.", "pod", "reason"),
		lastUnseal:         gv("pva_last_unseal_timestamp_seconds", "When the agent last unsealed the pod.", "pod"),
		tokenTTL:           gv("pva_token_ttl_seconds", "Remaining TTL of the agent's token after its last renewal.", "token"),
		tokenRenewed:       gv("pva_token_last_renewal_timestamp_seconds", "When the token was last renewed.", "token"),
		tokenRenewFailures: cv("pva_token_renewal_failures_total", "Failed token renewals.", "token"),
		backupPeriod:       g("pva_backup_schedule_period_seconds", "The backup schedule's period (0: no schedule, a timer runs backup-now)."),
		drillPeriod:        g("pva_drill_schedule_period_seconds", "The drill schedule's period (0: no scheduled drills)."),
		unsealLatency:      gv("pva_unseal_latency_seconds", "From the agent first seeing the pod sealed (a restart) to the pod unsealed, at the last unseal.", "pod"),
		leader:             g("pva_leader", "1 while this agent leads (takes the backups, drills, renews the tokens); always 1 without cluster.hosts."),
		leaderChanges:      c("pva_leader_acquired_total", "Times this agent became the leader."),
		leaderSeen:         gv("pva_leader_observed", "1 for the agent this one last saw holding the Lease.", "identity"),
	}
	drill := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pva_drill_last_success_timestamp_seconds", Help: "When the last restore drill that passed started (0: none yet)."},
			func() float64 {
				if t := drills().LastSuccess; !t.IsZero() {
					return float64(t.Unix())
				}
				return 0
			}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pva_drill_failures_total", Help: "Restore drills that failed (daemon and verb), as recorded in the state directory."},
			func() float64 { return float64(drills().Failures) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pva_drill_last_failed", Help: "1 when the last restore drill failed, 0 when it passed or none ran."},
			func() float64 {
				if l := drills().Last; l != nil && !l.Passed {
					return 1
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pva_drill_duration_seconds", Help: "How long the last restore drill took."},
			func() float64 {
				if l := drills().Last; l != nil {
					return l.DurationSecs
				}
				return 0
			}),
	}
	m.reg.MustRegister(drill...)
	m.reg.MustRegister(extra...)
	build := gv("pva_build_info", "Build of the running agent.", "version", "goversion")
	build.WithLabelValues(version, runtime.Version()).Set(1)
	m.reg.MustRegister(m.backupLastSuccess, m.backupNext, m.backupLastSize, m.backupFailures, m.backupDuration, m.reloadFailures,
		m.discoveryFailures, m.sealed, m.removed, m.reachable, m.attempts, m.failures, m.lastUnseal, m.tokenTTL, m.tokenRenewed,
		m.tokenRenewFailures, m.leader, m.leaderChanges, m.leaderSeen, m.backupPeriod, m.drillPeriod, m.unsealLatency, build)
	return m
}

// leaderObserved records the holder the election last saw.
func (m *metrics) leaderObserved(holder string) {
	m.leaderMu.Lock()
	defer m.leaderMu.Unlock()
	if m.leaderLast != "" {
		m.leaderSeen.DeleteLabelValues(m.leaderLast)
	}
	m.leaderLast = holder
	m.leaderSeen.WithLabelValues(holder).Set(1)
}

func (m *metrics) forget(pod string) {
	m.sealed.DeleteLabelValues(pod)
	m.removed.DeleteLabelValues(pod)
	m.reachable.DeleteLabelValues(pod)
	m.unsealLatency.DeleteLabelValues(pod)
	m.attempts.DeletePartialMatch(prometheus.Labels{"pod": pod})
	m.failures.DeletePartialMatch(prometheus.Labels{"pod": pod})
}

// schedulePeriod is the spacing of a schedule's next two slots (0: no schedule).
func schedulePeriod(spec string) float64 {
	if spec == "" {
		return 0
	}
	s, err := configs.ParseSchedule(spec)
	if err != nil {
		return 0
	}
	return periodOf(s, time.Now()).Seconds()
}

// metricsMaxConns bounds concurrent scrapes: idle or slow clients cannot exhaust the
// daemon's file descriptors.
const metricsMaxConns = 16

// serveMetrics serves /metrics on listen (loopback unless metrics.allow_remote) with
// read, write and idle timeouts and a connection limit.
func (d *daemon) serveMetrics(listen string) (func(), error) {
	if listen == "" {
		return func() {}, nil
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, withHint(fmt.Errorf("metrics listener %s: %w", listen, err), `set metrics.listen to a free loopback address, or "" to disable`)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{Timeout: 10 * time.Second}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 15 * time.Second, IdleTimeout: 30 * time.Second, MaxHeaderBytes: 16 << 10}
	go func() { _ = srv.Serve(limitListener(l, metricsMaxConns)) }()
	if d.opts.MetricsReady != nil {
		d.opts.MetricsReady(l.Addr().String())
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		_ = srv.Close()
	}, nil
}

// limitListener accepts at most n connections at once; the next waits for one to close.
func limitListener(l net.Listener, n int) net.Listener {
	return &limited{Listener: l, sem: make(chan struct{}, n)}
}

type limited struct {
	net.Listener
	sem chan struct{}
}

func (l *limited) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitedConn{Conn: c, release: func() { <-l.sem }}, nil
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// background are the daemon's scheduled jobs of one configuration.
type background struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startBackground starts the leader's jobs of the current configuration: at once for a
// lone agent, while it holds the Lease for one of a Proxmox cluster's agents.
func (d *daemon) startBackground(ctx context.Context) {
	env := d.currentEnv()
	bctx, cancel := context.WithCancel(ctx)
	bg := &background{cancel: cancel}
	bg.wg.Add(1)
	if env.Config.Cluster.Enabled() {
		go func() {
			defer bg.wg.Done()
			d.elect(bctx, env, func(ctx context.Context, f fence) { d.lead(ctx, env, f) })
		}()
	} else {
		d.metrics.leader.Set(1)
		go func() { defer bg.wg.Done(); d.lead(bctx, env, nil) }()
	}
	d.mu.Lock()
	d.bg = bg
	d.mu.Unlock()
}

func (d *daemon) stopBackground() {
	d.mu.Lock()
	bg := d.bg
	d.bg = nil
	d.mu.Unlock()
	if bg != nil {
		bg.cancel()
		bg.wg.Wait()
	}
}
