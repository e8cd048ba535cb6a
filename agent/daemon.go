package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// Notifier is the service manager (sd_notify); a nil one is fine.
type Notifier interface {
	Notify(states ...string) error
}

// DaemonOptions wire the daemon to its process.
type DaemonOptions struct {
	// Load reads and validates the configuration and builds its environment, at start
	// and on every reload.
	Load func() (*Env, error)
	// Reload receives a value for every SIGHUP.
	Reload <-chan os.Signal
	Notify Notifier
	// WatchdogInterval sends WATCHDOG=1 this often while the main loop is alive (0: no
	// watchdog).
	WatchdogInterval time.Duration
	// PollInterval is how often a sealed pod's status is read (default 500ms), and
	// IdleInterval an unsealed one's (default 1s: a restart shows as a refused
	// connection or a sealed answer at the next read); DiscoverInterval is how often pods
	// are listed (default 5s), each listing bounded by DiscoverTimeout (default 10s);
	// MaxBackoff caps the wait after a pod could not be reached (default 2s).
	PollInterval, IdleInterval, DiscoverInterval, DiscoverTimeout, MaxBackoff time.Duration
	// RejectedBackoff is the first wait before a keyset Vault rejected is tried again on
	// the same pod incarnation (default 30s, doubling to 10m).
	RejectedBackoff time.Duration
	// MetricsReady, when set, receives the metrics address once it listens.
	MetricsReady func(addr string)
}

func (o *DaemonOptions) defaults() {
	if o.PollInterval <= 0 {
		o.PollInterval = 500 * time.Millisecond
	}
	if o.IdleInterval <= 0 {
		o.IdleInterval = max(time.Second, o.PollInterval)
	}
	if o.DiscoverInterval <= 0 {
		o.DiscoverInterval = 5 * time.Second
	}
	if o.DiscoverTimeout <= 0 {
		o.DiscoverTimeout = 10 * time.Second
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 2 * time.Second
	}
	if o.RejectedBackoff <= 0 {
		o.RejectedBackoff = 30 * time.Second
	}
}

// Run is the daemon: it keeps every Vault pod unsealed (a watcher per pod), renews the
// agent's tokens well within their period, takes scheduled snapshots anchored to the
// newest one on disk, serves metrics and speaks sd_notify. The main loop never waits on
// the network: discovery runs beside it with its own deadline, so the watchdog ping
// means the loop is alive. SIGHUP reloads configuration and keyfile; a reload that fails
// keeps everything that ran before running. It returns nil when ctx ends.
func Run(ctx context.Context, opts DaemonOptions) error {
	opts.defaults()
	env, err := opts.Load()
	if err != nil {
		return err
	}
	log := env.Log.With("component", "daemon")
	d := &daemon{opts: opts, log: log, watchers: map[string]*watcher{}, rejected: map[string]*rejection{}, state: map[string]string{}}
	am := newAlertMetrics()
	d.metrics = newMetrics(env.Version, func() DrillRecord {
		rec, _ := LastDrill(d.currentEnv())
		return rec
	}, newOffsiteCollector(d.currentEnv), am.sent, am.failed, am.dropped)
	stopAlerts := d.startAlerts(env, am)
	defer stopAlerts()
	if err := d.configure(ctx, env); err != nil {
		d.alerts.Failing("start", "daemon", "the daemon cannot start: "+err.Error())
		return err
	}
	d.noteUncleanExit(env)
	stopMetrics, err := d.serveMetrics(env.Config.Metrics.Listen)
	if err != nil {
		return err
	}
	defer stopMetrics()
	// Start-up garbage (Kubernetes and Helm type registries) goes back to the OS, so the
	// idle daemon stays small.
	debug.FreeOSMemory()
	d.beat()
	stopWatchdog := d.startWatchdog(ctx)
	defer stopWatchdog()
	d.notify("READY=1", "STATUS=watching Vault pods")
	log.Info("daemon started", "namespace", env.Config.Chart.Namespace, "release", env.Config.Chart.Release, "pod_access", env.Config.Vault.PodAccess, "keyfile", env.Keyfile.String())

	clock := env.Clock
	discovered := make(chan discovery, 1)
	discovering := false
	d.startBackground(ctx)
	cleaned := make(chan struct{})
	go func() { defer close(cleaned); d.cleanLeftoverDrills(ctx, env) }()
	defer func() { <-cleaned }()
	startDiscovery := func() {
		if discovering {
			return // the last one has not answered: never pile up behind a hung API server
		}
		discovering = true
		go d.discover(ctx, d.currentEnv(), discovered)
	}
	startDiscovery()
	nextDiscover := clock.Now().Add(opts.DiscoverInterval)
	for {
		d.beat()
		// Wake only when something is due: the next discovery, and with a watchdog a
		// beat every half interval (the pinger withholds its ping after two intervals
		// without one). An idle daemon without a watchdog sleeps until discovery.
		tick := max(nextDiscover.Sub(clock.Now()), time.Millisecond)
		if opts.WatchdogInterval > 0 {
			tick = min(tick, max(opts.WatchdogInterval/2, 10*time.Millisecond))
		}
		select {
		case <-ctx.Done():
			d.notify("STOPPING=1")
			d.stopBackground()
			d.stopAll()
			d.currentEnv().Close()
			d.currentEnv().clearRunning()
			log.Info("daemon stopped")
			return nil
		case res := <-discovered:
			discovering = false
			d.pickUpKeyfile(ctx)
			d.apply(ctx, res)
		case <-clock.After(tick):
			if !clock.Now().Before(nextDiscover) {
				nextDiscover = clock.Now().Add(opts.DiscoverInterval)
				startDiscovery()
			}
		case <-opts.Reload:
			d.reload(ctx)
			startDiscovery()
		}
	}
}

type daemon struct {
	opts     DaemonOptions
	log      *slog.Logger
	metrics  *metrics
	lastBeat atomic.Int64 // unix nanos of the main loop's last turn (wall clock)

	mu       sync.Mutex
	env      *Env
	keyfile  *vault.Keyfile
	pods     []vaultPod            // the last discovery's pods (backups and renewals use them: no API call)
	watchers map[string]*watcher   // pod name → watcher
	rejected map[string]*rejection // pod incarnation → the keyset Vault rejected there, and when to try again
	state    map[string]string     // pod name → last state, for STATUS
	bg       *background
	alerts   *alerter // nil without notify.targets
}

// knownPods lists the last discovery's pods, or asks Kubernetes when there is none yet.
func (d *daemon) knownPods(env *Env) podLister {
	return func(ctx context.Context) ([]vaultPod, error) {
		d.mu.Lock()
		pods := d.pods
		d.mu.Unlock()
		if len(pods) == 0 {
			return env.openPods(ctx)
		}
		return pods, nil
	}
}

func (d *daemon) currentEnv() *Env {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.env
}

func (d *daemon) beat() { d.lastBeat.Store(time.Now().UnixNano()) }

// startWatchdog pings WATCHDOG=1 every interval while the main loop has turned within
// the last two intervals; a stuck loop stops the pings and systemd restarts the daemon.
func (d *daemon) startWatchdog(ctx context.Context) func() {
	iv := d.opts.WatchdogInterval
	if iv <= 0 {
		return func() {}
	}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(iv)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
				if since := time.Since(time.Unix(0, d.lastBeat.Load())); since <= 2*iv {
					d.notify("WATCHDOG=1")
				} else {
					d.log.Error("the main loop has not turned: withholding the watchdog ping", "since", since.Round(time.Millisecond))
				}
			}
		}
	}()
	return func() { cancel(); <-done }
}

// configure loads the keyfile of env and makes env the daemon's environment. On error
// nothing changes.
func (d *daemon) configure(ctx context.Context, env *Env) error {
	kf, err := env.Keyfile.Read(ctx)
	if errors.Is(err, vault.ErrNoKeyfile) {
		d.log.Warn("no keyfile yet: pods are watched, and unsealed as soon as `init`, `adopt` or `keyfile enroll` from another host writes one", "keyfile", env.Keyfile.String())
		d.alerts.Failing("keyfile", env.Keyfile.String(), "there is no keyfile: no sealed pod can be unsealed until `pve-vault-agent init`, `adopt` or `keyfile enroll` from another host writes one")
		err = nil
	}
	if err != nil {
		return err
	}
	if _, err := env.Pods(); err != nil {
		return err
	}
	if kf != nil {
		d.alerts.OK("keyfile", env.Keyfile.String(), "the keyfile is there and opens (keyset "+kf.Keyset.Fingerprint()+")")
	}
	d.metrics.backupPeriod.Set(schedulePeriod(env.Config.Snapshots.Schedule))
	d.metrics.drillPeriod.Set(schedulePeriod(env.Config.Snapshots.DrillSchedule))
	d.mu.Lock()
	old := d.env
	d.env, d.keyfile = env, kf
	d.rejected = map[string]*rejection{}
	d.pods = nil
	d.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

// startAlerts starts the notifications of env's configuration (none without
// notify.targets). A target whose secret cannot be read is left out, loudly: nothing
// about notifications may keep the daemon from unsealing.
func (d *daemon) startAlerts(env *Env, am *alertMetrics) func() {
	if len(env.Config.Notify.Targets) == 0 {
		return func() {}
	}
	senders, err := NotifySenders(env.Config)
	if err != nil {
		d.log.Error("notifications are off: a target cannot be set up", "err", err, "hint", Hints(err))
		return func() {}
	}
	host, _ := env.Identity()
	a, stop := newAlerter(env.Config.Notify, host, env.Clock, d.log, am, senders)
	d.alerts = a
	return stop
}

// noteUncleanExit tells the operator when the last run of the daemon ended without
// stopping (a crash, the watchdog, the OOM killer, kill -9), and marks this run.
func (d *daemon) noteUncleanExit(env *Env) {
	unclean, since, err := env.markRunning()
	if err != nil {
		d.log.Warn("cannot mark the daemon as running (a crash will not be reported)", "err", err)
	}
	if unclean {
		d.log.Warn("the last run of the daemon did not stop cleanly", "started", since)
		d.alerts.Once("restarted", "daemon", fmt.Sprintf("the agent started again after its last run (started %s) ended without stopping: a crash, the watchdog, the out-of-memory killer or kill -9. `journalctl -u pve-vault-agent -b` shows why.", since.UTC().Format(time.RFC3339)))
	}
}

// pickUpKeyfile loads a keyfile that appeared since start (init, adopt, or keyfile
// enroll from another host of the cluster) without waiting for a SIGHUP.
func (d *daemon) pickUpKeyfile(ctx context.Context) {
	d.mu.Lock()
	env, have := d.env, d.keyfile != nil
	d.mu.Unlock()
	if have || !env.Keyfile.Exists() {
		return
	}
	kf, err := env.Keyfile.Read(ctx)
	if err != nil {
		d.log.Warn("a keyfile appeared but cannot be read yet", "err", err)
		return
	}
	d.mu.Lock()
	if d.env == env && d.keyfile == nil {
		d.keyfile = kf
		d.rejected = map[string]*rejection{}
		d.log.Info("keyfile found: unsealing with it", "keyfile", env.Keyfile.String(), "keyset", kf.Keyset.Fingerprint())
	}
	d.mu.Unlock()
	d.alerts.OK("keyfile", env.Keyfile.String(), "the keyfile is there and opens (keyset "+kf.Keyset.Fingerprint()+")")
}

// reload re-reads configuration and keyfile. A failure of either keeps everything that
// ran before running: watchers, schedule, renewals, the old keyfile.
func (d *daemon) reload(ctx context.Context) {
	env, err := d.opts.Load()
	if err == nil {
		_, err = env.Keyfile.Read(ctx)
		switch {
		case err == nil || errors.Is(err, vault.ErrNoKeyfile):
			err = nil
		default:
			d.alerts.Failing("keyfile", env.Keyfile.String(), "the keyfile cannot be opened: "+err.Error()+". The daemon keeps unsealing with the one it read before.")
		}
	}
	if err != nil {
		d.log.Error("reload refused: keeping the running configuration", "err", err)
		d.notify("STATUS=reload refused: " + firstLine(err.Error()))
		d.metrics.reloadFailures.Inc()
		return
	}
	d.stopBackground()
	d.stopAll()
	if err := d.configure(ctx, env); err != nil {
		// configure changes nothing on error: start again what ran before.
		d.log.Error("reload failed: keeping the running configuration", "err", err)
		d.metrics.reloadFailures.Inc()
	} else {
		d.log.Info("configuration and keyfile reloaded")
	}
	d.startBackground(ctx)
}

// cleanLeftoverDrills deletes what a drill killed with its process left in the cluster
// (a restored copy of the data, unsealed, until its deadline), once at start, trying
// again while the API server does not answer. A drill running now cleans up itself.
func (d *daemon) cleanLeftoverDrills(ctx context.Context, env *Env) {
	if env.Config.Vault.PodAccess == "static" {
		return
	}
	for {
		gone, err := CleanupDrills(ctx, env)
		switch {
		case err == nil:
			if len(gone) > 0 {
				d.log.Warn("deleted what an interrupted restore drill left", "objects", gone)
			}
			return
		case errors.Is(err, ErrBusy) || ctx.Err() != nil:
			return
		}
		d.log.Warn("could not look for what an interrupted drill left; trying again", "err", err)
		if sleep(ctx, env.Clock, 30*time.Second) != nil {
			return
		}
	}
}

func (d *daemon) notify(states ...string) {
	if d.opts.Notify != nil {
		if err := d.opts.Notify.Notify(states...); err != nil {
			d.log.Debug("sd_notify failed", "err", err)
		}
	}
}

// discovery is the answer of one pod listing.
type discovery struct {
	env  *Env
	pods []vaultPod
	err  error
}

// discover lists the pods with its own deadline, beside the main loop.
func (d *daemon) discover(ctx context.Context, env *Env, out chan<- discovery) {
	dctx, cancel := context.WithTimeout(ctx, d.opts.DiscoverTimeout)
	defer cancel()
	res := discovery{env: env}
	acc, err := env.Pods()
	if err == nil {
		res.pods, err = acc.Pods(dctx)
	}
	res.err = err
	select {
	case out <- res:
	case <-ctx.Done():
	}
}

// apply starts a watcher for each new pod (or pod incarnation) and stops the watchers of
// pods that are gone.
func (d *daemon) apply(ctx context.Context, res discovery) {
	if res.err != nil {
		if ctx.Err() == nil {
			d.log.Warn("list vault pods failed; retrying", "err", res.err)
			d.metrics.discoveryFailures.Inc()
		}
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if res.env != d.env {
		return // an answer for the configuration before a reload
	}
	d.pods = res.pods
	seen := map[string]bool{}
	for _, p := range res.pods {
		seen[p.Name] = true
		key := incarnation(p)
		if w, ok := d.watchers[p.Name]; ok {
			if w.key == key {
				continue
			}
			w.cancel()
			delete(d.rejected, w.key)
		}
		wctx, cancel := context.WithCancel(ctx)
		w := &watcher{key: key, cancel: cancel, done: make(chan struct{})}
		d.watchers[p.Name] = w
		go func(p vaultPod) {
			defer close(w.done)
			d.watch(wctx, p.Name, key, p.API)
		}(p)
	}
	for name, w := range d.watchers {
		if !seen[name] {
			w.cancel()
			delete(d.rejected, w.key)
			delete(d.watchers, name)
			delete(d.state, name)
			d.metrics.forget(name)
		}
	}
}

// incarnation names one life of a pod: a recreated pod (new UID) or a new IP is another.
func incarnation(p vaultPod) string { return p.Name + "/" + p.UID + "/" + p.IP }

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

func (d *daemon) setState(pod, state string) {
	d.mu.Lock()
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

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
