package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"filippo.io/age"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot/offsite"
)

// TargetResult is what one push to an off-host target did.
type TargetResult struct {
	Target   string   `json:"target"`
	Pushed   []string `json:"pushed"`
	Bytes    int64    `json:"bytes"`
	Recovery string   `json:"recovery_copy,omitempty"` // uploaded by this push
	// RecoveryOnTarget is the newest recovery copy the target holds after the push, and
	// RecoveryRecipient what it is sealed to.
	RecoveryOnTarget  string   `json:"recovery_on_target,omitempty"`
	RecoveryRecipient string   `json:"recovery_recipient,omitempty"`
	Pruned            []string `json:"pruned"`
	Newest            string   `json:"newest_remote,omitempty"`
	Error             string   `json:"error,omitempty"`
}

// targetConfig finds a configured target by name.
func (e *Env) targetConfig(name string) (configs.Target, error) {
	for _, t := range e.Config.Snapshots.Targets {
		if t.Name == name {
			return t, nil
		}
	}
	var names []string
	for _, t := range e.Config.Snapshots.Targets {
		names = append(names, t.Name)
	}
	return configs.Target{}, hintf(fmt.Sprintf("configured targets: %v (snapshots.targets)", names), "no target named %q", name)
}

// openTarget connects to a target. For SFTP the server's host key is checked against
// known_hosts exactly as for node VMs. a (nil: none) counts the target's progress for
// an attempt's idle deadline; abort closes its connection.
func (e *Env) openTarget(ctx context.Context, t configs.Target, a *offsite.Activity) (tg offsite.Target, abort func(), err error) {
	switch t.Type {
	case "dir":
		return &offsite.Dir{Root: t.Path}, nil, nil
	case "sftp":
		cfg, err := e.SSH(false)
		if err != nil && !t.Identity.IsSet() {
			return nil, nil, err
		}
		if t.Identity.IsSet() {
			key, err := t.Identity.Read()
			if err != nil {
				return nil, nil, fmt.Errorf("snapshots.targets %s identity: %w", t.Name, err)
			}
			cfg.Key = key.Bytes()
		}
		if t.KnownHosts != "" {
			cfg.KnownHosts = t.KnownHosts
		}
		if cfg.KnownHosts == "" {
			cfg.KnownHosts = e.Config.SSH.KnownHosts
		}
		if cfg.ConnectTimeout == 0 {
			cfg.ConnectTimeout = e.Config.SSH.ConnectTimeout
		}
		if cfg.KeepaliveInterval == 0 {
			cfg.KeepaliveInterval = e.Config.SSH.KeepaliveInterval
		}
		host, port := t.Address, 22
		if h, p, err := net.SplitHostPort(t.Address); err == nil {
			host = h
			if port, err = strconv.Atoi(p); err != nil {
				return nil, nil, fmt.Errorf("snapshots.targets %s address %q: bad port", t.Name, t.Address)
			}
		}
		cfg.User, cfg.Port, cfg.Sudo = t.User, port, "never"
		conn, err := provision.Dial(ctx, host, cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("target %s: %w", t.Name, err)
		}
		// The SFTP subsystem's start is bounded like the SSH handshake.
		hung := time.AfterFunc(cfg.ConnectTimeout, func() { conn.Close() })
		s, err := offsite.NewSFTP(conn.Client(), t.Path, t.User+"@"+t.Address)
		if !hung.Stop() && err == nil {
			err = fmt.Errorf("target %s: the SFTP subsystem did not start within %s", t.Name, cfg.ConnectTimeout)
		}
		if err != nil {
			conn.Close()
			return nil, nil, err
		}
		if !s.CanSync() {
			e.Log.Warn("the SFTP server does not offer fsync@openssh.com: copies are renamed into place without being flushed to its disk", "target", t.Name)
		}
		return closeAlso{s, func() { conn.Close() }}, func() { conn.Close() }, nil
	case "s3":
		ak, err := t.AccessKey.Read()
		if err != nil {
			return nil, nil, fmt.Errorf("snapshots.targets %s access_key: %w", t.Name, err)
		}
		sk, err := t.SecretKey.Read()
		if err != nil {
			return nil, nil, fmt.Errorf("snapshots.targets %s secret_key: %w", t.Name, err)
		}
		s3, err := offsite.NewS3(offsite.S3Config{Endpoint: t.Endpoint, Bucket: t.Bucket, Prefix: t.Prefix, Region: t.Region,
			AccessKey: ak.Trimmed(), SecretKey: sk.Trimmed(), CAFile: t.CAFile, AllowHTTP: t.AllowHTTP, Activity: a})
		if err != nil {
			return nil, nil, err
		}
		return s3, s3.Abort, nil
	}
	return nil, nil, fmt.Errorf("target %s: unknown type %q", t.Name, t.Type)
}

// closeAlso closes the SSH connection under an SFTP target with it.
type closeAlso struct {
	offsite.Target
	also func()
}

func (c closeAlso) Close() error {
	err := c.Target.Close()
	c.also()
	return err
}

// offsiteKeys are the recipients (vault.recovery_recipient) and the keyfile's manifest
// key.
func (e *Env) offsiteKeys(kf *vault.Keyfile) (offsite.Keys, error) {
	r, err := age.ParseX25519Recipient(e.Config.Vault.RecoveryRecipient)
	if err != nil {
		return offsite.Keys{}, fmt.Errorf("vault.recovery_recipient: %w", err)
	}
	if len(kf.ManifestKey) < 32 {
		return offsite.Keys{}, hintf("run `pve-vault-agent token rotate`: it adds one to the keyfile", "the keyfile has no manifest key (it predates off-host copies)")
	}
	return offsite.Keys{Recipients: []age.Recipient{r}, MAC: kf.ManifestKey}, nil
}

// PushOffsite copies to every target the verified local snapshots it lacks that are
// newer than its newest copy (all of them after an outage; only the newest on a new
// target), the keyfile's recovery copy, and applies the target's retention. Each push is
// tried three times with a doubling pause. A target that fails is reported and
// recorded; the others go on, and nothing here fails the local backup.
func PushOffsite(ctx context.Context, env *Env, kf *vault.Keyfile, store *snapshot.Store) []TargetResult {
	var out []TargetResult
	for _, t := range env.Config.Snapshots.Targets {
		res := pushTarget(ctx, env, kf, store, t)
		if res.Error != "" {
			env.Log.Error("off-host copy failed; the next run catches up", "target", t.Name, "err", res.Error)
		} else if len(res.Pushed) > 0 {
			env.Log.Info("off-host copy done", "target", t.Name, "pushed", res.Pushed, "bytes", res.Bytes)
		}
		if err := env.recordOffsite(res); err != nil {
			env.Log.Warn("could not record the off-host result", "target", t.Name, "err", err)
		}
		out = append(out, res)
	}
	return out
}

func pushTarget(ctx context.Context, env *Env, kf *vault.Keyfile, store *snapshot.Store, tc configs.Target) TargetResult {
	res := TargetResult{Target: tc.Name, Pushed: []string{}, Pruned: []string{}}
	fail := func(err error) TargetResult { res.Error = err.Error(); return res }
	keys, err := env.offsiteKeys(kf)
	if err != nil {
		return fail(err)
	}
	local, err := store.List()
	if err != nil {
		return fail(err)
	}
	var todo []snapshot.Entry
	err = env.withTarget(ctx, tc, "connect to "+tc.Name, func(ctx context.Context, t offsite.Target) error {
		todo, err = missingCopies(ctx, env, t, local)
		return err
	})
	if err != nil {
		return fail(err)
	}
	for i, e := range todo {
		var n int64
		err := env.withTarget(ctx, tc, "push "+offsite.CopyName(e.Path)+" to "+tc.Name, func(ctx context.Context, t offsite.Target) (err error) {
			n, err = offsite.Push(ctx, t, e, keys, env.Clock.Now(), i == len(todo)-1)
			return err
		})
		if err != nil {
			return fail(err)
		}
		res.Pushed = append(res.Pushed, offsite.CopyName(e.Path))
		res.Bytes += n
	}
	err = env.withTarget(ctx, tc, "recovery copy and retention on "+tc.Name, func(ctx context.Context, t offsite.Target) error {
		return finishTarget(ctx, env, t, tc, kf, &res)
	})
	if err != nil {
		return fail(err)
	}
	return res
}

// withTarget connects to the target and runs f, the whole tried three times. Each
// attempt has an idle deadline (snapshots.idle_timeout): when nothing moves on the
// target for that long its connection is closed and the attempt ends, so a hung server
// never holds a backup (and the snapshot lock) for longer.
func (e *Env) withTarget(ctx context.Context, tc configs.Target, what string, f func(context.Context, offsite.Target) error) error {
	return e.retry(ctx, what, func(ctx context.Context) error {
		a := offsite.NewActivity()
		t, abort, err := e.openTarget(ctx, tc, a)
		if err != nil {
			return err
		}
		defer t.Close()
		return offsite.Attempt(ctx, t, a, e.Config.Snapshots.IdleTimeout, abort, f)
	})
}

// missingCopies cleans what an interrupted push left and returns the verified local
// snapshots the target lacks that are newer than its newest copy, oldest first (only
// the newest for a target that has none).
func missingCopies(ctx context.Context, env *Env, t offsite.Target, local []snapshot.Entry) ([]snapshot.Entry, error) {
	if err := t.Clean(ctx); err != nil {
		env.Log.Warn("could not clean what an interrupted push left", "target", t.String(), "err", err)
	}
	copies, err := offsite.Copies(ctx, t)
	if err != nil {
		return nil, err
	}
	var newest time.Time
	for _, c := range copies {
		if c.Complete && c.Time.After(newest) {
			newest = c.Time
		}
	}
	var todo []snapshot.Entry
	for _, e := range local {
		// An imported snapshot no drill has paired has no keys a recover could use.
		if e.Verified && !e.Manifest.Unpaired() && e.Time.After(newest) && !offsite.HasCopy(copies, e.Path) {
			todo = append(todo, e)
		}
	}
	if newest.IsZero() && len(todo) > 1 {
		todo = todo[len(todo)-1:]
	}
	return todo, nil
}

// finishTarget pushes the keyfile's recovery copy when it changed, applies the target's
// retention and records its newest copy.
func finishTarget(ctx context.Context, env *Env, t offsite.Target, tc configs.Target, kf *vault.Keyfile, res *TargetResult) error {
	rc, err := env.recoveryCopy(ctx, kf)
	if err != nil {
		return err
	}
	name, uploaded, err := offsite.PushFile(ctx, t, rc)
	if err != nil {
		return err
	}
	if uploaded {
		res.Recovery = name
	}
	res.RecoveryOnTarget, res.RecoveryRecipient = name, RecoveryRecordOf(env).Recipient
	r := tc.Retention
	if res.Pruned, err = offsite.Prune(ctx, t, snapshot.Policy{KeepLast: r.KeepLast, Hourly: r.Hourly, Daily: r.Daily, Weekly: r.Weekly, Monthly: r.Monthly}, env.Clock.Now()); err != nil {
		return err
	}
	copies, err := offsite.Copies(ctx, t)
	if err != nil {
		return err
	}
	for i := len(copies) - 1; i >= 0; i-- {
		if copies[i].Complete {
			res.Newest = copies[i].Name
			break
		}
	}
	return nil
}

// retry runs f up to three times, pausing 1 s then 2 s (Waits.Poll×10, ×20 in tests).
func (e *Env) retry(ctx context.Context, what string, f func(context.Context) error) error {
	pause := 10 * e.Waits.Poll
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		if err = f(ctx); err == nil || ctx.Err() != nil {
			return err
		}
		if attempt < 3 {
			e.Log.Warn("retrying", "what", what, "attempt", attempt, "err", err)
			if serr := sleep(ctx, e.Clock, pause); serr != nil {
				return err
			}
			pause *= 2
		}
	}
	return err
}

// OffsiteRecord is the last push to each target, kept in the state directory for
// status and metrics.
type OffsiteRecord struct {
	Target      string    `json:"target"`
	LastSuccess time.Time `json:"last_success"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at"`
	Failures    int       `json:"failures"`
	Bytes       int64     `json:"bytes"`
	Newest      string    `json:"newest_remote,omitempty"`
	// RecoveryCopy is the recovery copy last pushed (or found) there and
	// RecoveryRecipient the key it is sealed to.
	RecoveryCopy      string `json:"recovery_copy,omitempty"`
	RecoveryRecipient string `json:"recovery_recipient,omitempty"`
}

var offsiteRecordMu sync.Mutex

func (e *Env) offsiteRecordPath() string {
	return filepath.Join(filepath.Dir(e.Config.Vault.Keyfile), "offsite.json")
}

// OffsiteRecords reads the per-target records.
func OffsiteRecords(env *Env) (map[string]OffsiteRecord, error) {
	recs := map[string]OffsiteRecord{}
	b, err := os.ReadFile(env.offsiteRecordPath())
	if errors.Is(err, os.ErrNotExist) {
		return recs, nil
	}
	if err != nil {
		return recs, err
	}
	return recs, json.Unmarshal(b, &recs)
}

func (e *Env) recordOffsite(res TargetResult) error {
	offsiteRecordMu.Lock()
	defer offsiteRecordMu.Unlock()
	recs, err := OffsiteRecords(e)
	if err != nil {
		recs = map[string]OffsiteRecord{}
	}
	r := recs[res.Target]
	r.Target = res.Target
	now := e.Clock.Now().UTC()
	if res.Error != "" {
		r.LastError, r.LastErrorAt = res.Error, now
		r.Failures++
	} else {
		r.LastSuccess, r.LastError = now, ""
		r.Bytes += res.Bytes
		if res.Newest != "" {
			r.Newest = res.Newest
		}
		if res.RecoveryOnTarget != "" {
			r.RecoveryCopy, r.RecoveryRecipient = res.RecoveryOnTarget, res.RecoveryRecipient
		}
	}
	recs[res.Target] = r
	return writeJSONAtomic(e.offsiteRecordPath(), recs)
}

// TargetCopies lists the snapshot copies on a target, oldest first.
func TargetCopies(ctx context.Context, env *Env, name string) ([]offsite.Copy, error) {
	tc, err := env.targetConfig(name)
	if err != nil {
		return nil, err
	}
	var copies []offsite.Copy
	err = env.withTarget(ctx, tc, "list the copies on "+name, func(ctx context.Context, t offsite.Target) (err error) {
		copies, err = offsite.Copies(ctx, t)
		return err
	})
	return copies, err
}

// VerifyTarget downloads every complete copy on a target, authenticates its manifest,
// checks the object against it, decrypts it with the operator's identity and verifies
// the snapshot offline. The manifest key comes from this host's keyfile, or, on a host
// without one, from the target's newest recovery copy that opens with the identity.
func VerifyTarget(ctx context.Context, env *Env, name, identityFile string) ([]VerifyResult, error) {
	t, ids, stateDir, err := env.openWithIdentity(ctx, name, identityFile)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	var key []byte
	if env.Keyfile.Exists() {
		kf, err := env.Keyfile.Read(ctx)
		if err != nil {
			return nil, err
		}
		key = kf.ManifestKey
	} else {
		rcs, err := offsite.RecoveryCopies(ctx, t)
		if err != nil {
			return nil, err
		}
		for _, o := range rcs {
			if kf, err := openRecoveryCopy(ctx, t, o.Name, stateDir, ids); err == nil {
				key = kf.ManifestKey
				break
			}
		}
		if key == nil {
			return nil, fmt.Errorf("no keyfile on this host and no recovery copy on %s opens with the identity", t)
		}
	}
	cs, err := offsite.Copies(ctx, t)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(stateDir, ".verify-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	var out []VerifyResult
	failed := 0
	for _, c := range cs {
		r := VerifyResult{Path: name + ":" + c.Name}
		if !c.Complete {
			r.Error = "incomplete: its manifest is missing (an interrupted push; pruned after an hour)"
			out = append(out, r)
			continue
		}
		s, err := offsite.ReadManifest(ctx, t, c.Name, ids, key)
		if err == nil {
			var file string
			if file, err = offsite.Fetch(ctx, t, s, ids, tmp); err == nil {
				r.Info, err = snapshot.VerifyFile(file)
				os.Remove(file)
				os.Remove(file + ".json")
			}
		}
		if err != nil {
			r.Error = err.Error()
			failed++
		}
		out = append(out, r)
	}
	if failed > 0 {
		return out, fmt.Errorf("%d of %d copies on %s failed verification", failed, len(cs), name)
	}
	return out, nil
}

// OffsiteStatus is a target's state for status.
type OffsiteStatus struct {
	OffsiteRecord
	NewestLocal string `json:"newest_local,omitempty"`
	Behind      bool   `json:"behind"`
}

// offsiteStatus joins the records with the newest local snapshot.
func offsiteStatus(env *Env, newestLocal string) ([]OffsiteStatus, error) {
	recs, err := OffsiteRecords(env)
	if err != nil {
		return nil, err
	}
	var out []OffsiteStatus
	for _, t := range env.Config.Snapshots.Targets {
		r := recs[t.Name]
		r.Target = t.Name
		out = append(out, OffsiteStatus{OffsiteRecord: r, NewestLocal: newestLocal, Behind: newestLocal != "" && r.Newest != newestLocal})
	}
	return out, nil
}

// offsiteCollector exports the per-target records at each scrape, so a push by the
// backup unit's run shows in the daemon's metrics too.
type offsiteCollector struct {
	env                                  func() *Env
	lastSuccess, failures, bytes, behind *prometheus.Desc
}

func newOffsiteCollector(env func() *Env) *offsiteCollector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, []string{"target"}, nil)
	}
	return &offsiteCollector{env: env,
		lastSuccess: d("pva_offsite_last_success_timestamp_seconds", "When the last push to the target succeeded (0: never)."),
		failures:    d("pva_offsite_failures_total", "Pushes to the target that failed."),
		bytes:       d("pva_offsite_bytes_total", "Bytes of encrypted snapshots pushed to the target."),
		behind:      d("pva_offsite_behind", "1 when the target's newest copy is not the newest local snapshot."),
	}
}

func (c *offsiteCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.lastSuccess
	ch <- c.failures
	ch <- c.bytes
	ch <- c.behind
}

func (c *offsiteCollector) Collect(ch chan<- prometheus.Metric) {
	env := c.env()
	newest := ""
	if _, es, err := Snapshots(context.Background(), env); err == nil {
		if e, ok := newestVerified(es); ok {
			newest = offsite.CopyName(e.Path)
		}
	}
	sts, err := offsiteStatus(env, newest)
	if err != nil {
		return
	}
	for _, s := range sts {
		ts := 0.0
		if !s.LastSuccess.IsZero() {
			ts = float64(s.LastSuccess.Unix())
		}
		ch <- prometheus.MustNewConstMetric(c.lastSuccess, prometheus.GaugeValue, ts, s.Target)
		ch <- prometheus.MustNewConstMetric(c.failures, prometheus.CounterValue, float64(s.Failures), s.Target)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(s.Bytes), s.Target)
		ch <- prometheus.MustNewConstMetric(c.behind, prometheus.GaugeValue, b2f(s.Behind), s.Target)
	}
}

// openWithIdentity reads the operator's identity, connects to the named target (every
// call on it under the idle deadline, snapshots.idle_timeout) and makes sure the state
// directory (where downloads land, 0700) exists.
func (e *Env) openWithIdentity(ctx context.Context, name, identityFile string) (offsite.Target, []age.Identity, string, error) {
	ids, err := readIdentities(identityFile)
	if err != nil {
		return nil, nil, "", err
	}
	tc, err := e.targetConfig(name)
	if err != nil {
		return nil, nil, "", err
	}
	stateDir := filepath.Dir(e.Config.Vault.Keyfile)
	if err := safefile.PrivateDir(stateDir); err != nil {
		return nil, nil, "", fmt.Errorf("state directory: %w", err)
	}
	a := offsite.NewActivity()
	t, abort, err := e.openTarget(ctx, tc, a)
	if err != nil {
		return nil, nil, "", err
	}
	w, stop := offsite.Watch(t, a, e.Config.Snapshots.IdleTimeout, abort)
	return closeAlso{w, stop}, ids, stateDir, nil
}
