package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/internal/notify"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// notifyLab is a daemon on a static lab Vault with a schedule and an off-host dir
// target, telling a real mail server (Mailpit, STARTTLS and a login), a signed webhook
// and an ntfy endpoint through shoutrrr.
type notifyLab struct {
	v        *lab.Vault
	cfg      string
	keyfile  string
	snaps    string
	nas      string
	mail     *lab.Mailpit
	hook     *lab.Receiver
	hmacKey  string
	password string
	metrics  string // the daemon's metrics.listen
}

func newNotifyLab(t *testing.T) *notifyLab {
	t.Helper()
	bins := lab.Need(t)
	dir := t.TempDir()
	nl := &notifyLab{v: lab.TestVault(t), mail: lab.StartMailpit(t, bins, "starttls"), hook: lab.StartReceiver(t),
		nas: filepath.Join(dir, "nas"), hmacKey: "hmac-" + lab.RunID() + "-key"}
	nl.password = nl.mail.Password
	if err := os.MkdirAll(nl.nas, 0o700); err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{"smtp-password": nl.mail.Password, "hmac": nl.hmacKey,
		"ntfy-url": "ntfy://" + strings.TrimPrefix(nl.hook.URL, "http://") + "/pva-alerts?scheme=http"}
	for name, v := range secrets {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("PVA_VAULT_RECOVERY_RECIPIENT", id.Recipient().String())
	t.Setenv("PVA_PROXMOX_NODE", "pve1")
	port, err := lab.FreePort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	nl.metrics = fmt.Sprintf("127.0.0.1:%d", port)
	t.Setenv("PVA_METRICS_LISTEN", nl.metrics)
	extra := fmt.Sprintf(`  schedule: '@every 2s'
  retention: {keep_last: 100000, daily: 0, weekly: 0, monthly: 0}
  targets: [{name: nas, type: dir, path: %s}]
notify:
  sealed_after: 3s
  timeout: 3s
  targets:
    - {name: mail, type: smtp, host: 127.0.0.1, port: %d, tls: starttls, ca_file: %s, username: %s, password: {file: %s}, from: pve-vault-agent@lab.test, to: [ops@lab.test]}
    - {name: hook, type: webhook, url: "%s/hook", hmac_key: {file: %s}}
    - {name: phone, type: shoutrrr, service_url: {file: %s}}
`, nl.nas, nl.mail.Port, nl.mail.CAFile, nl.mail.User, filepath.Join(dir, "smtp-password"), nl.hook.URL, filepath.Join(dir, "hmac"), filepath.Join(dir, "ntfy-url"))
	nl.cfg, nl.keyfile, err = lab.StaticAgentConfig(dir, nl.v.Addr, extra)
	if err != nil {
		t.Fatal(err)
	}
	nl.snaps = filepath.Join(dir, "snaps")
	return nl
}

// told is one message as each channel received it: "kind event subject".
func (nl *notifyLab) mails(t *testing.T) []string {
	t.Helper()
	ms, err := nl.mail.Messages(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, m.Subject)
	}
	return out
}

// hooks are the webhook's messages, each signature checked.
func (nl *notifyLab) hooks(t *testing.T) []notify.Message {
	t.Helper()
	var out []notify.Message
	for _, r := range nl.hook.Requests() {
		if r.Path != "/hook" {
			continue
		}
		if got, want := r.Header.Get("X-PVA-Signature"), notify.Sign([]byte(nl.hmacKey), r.Header.Get("X-PVA-Timestamp"), r.Body); got != want {
			t.Fatalf("webhook signature %q, want %q", got, want)
		}
		var m notify.Message
		if err := json.Unmarshal(r.Body, &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

// count is how many mails whose subject holds want have arrived.
func (nl *notifyLab) count(t *testing.T, want string) int {
	t.Helper()
	k := 0
	for _, s := range nl.mails(t) {
		if strings.Contains(s, want) {
			k++
		}
	}
	return k
}

// waitMail waits until a mail whose subject holds want has arrived n times.
func (nl *notifyLab) waitMail(t *testing.T, d *daemonProc, want string, n int, timeout time.Duration) time.Time {
	t.Helper()
	var at time.Time
	err := lab.WaitFor(context.Background(), timeout, fmt.Sprintf("%d× mail %q", n, want), func(ctx context.Context) error {
		ms, err := nl.mail.Messages(ctx)
		if err != nil {
			return err
		}
		k := 0
		for _, m := range ms {
			if strings.Contains(m.Subject, want) {
				k++
				at = m.Created
			}
		}
		if k < n {
			return errors.New("not yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\nmails: %q\n%s", err, nl.mails(t), tailLines(d.Logs(), 40))
	}
	return at
}

// The daemon tells the operator, through a real mail server, a signed webhook and ntfy
// (shoutrrr): the keyfile missing and found, a pod sealed too long and unsealed, shares
// Vault refuses and the right ones again, an off-host target down and caught up, a
// backup failing and working again, and a restart after kill -9 — each exactly once per
// change of state on every channel, with no secret in any message. A hung mail server
// never delays an unseal.
func TestDaemonTellsTheOperator(t *testing.T) {
	nl := newNotifyLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if r := runBinary(t, nil, "notify", "test", "--config", nl.cfg); r.code != 0 || strings.Count(r.stdout, ": sent") != 3 {
		t.Fatalf("notify test: %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}

	// No keyfile yet: the daemon says so, and that the uninitialised pod stays sealed.
	d := startDaemon(t, nl.cfg, 0)
	nl.waitMail(t, d, "FAILING: keyfile", 1, 30*time.Second)
	nl.waitMail(t, d, "FAILING: sealed 127.0.0.1:", 1, 30*time.Second)
	if r := runBinary(t, nil, "init", "--config", nl.cfg); r.code != 0 {
		t.Fatalf("init: %s", r.stderr)
	}
	nl.waitMail(t, d, "recovered: keyfile", 1, 30*time.Second)
	nl.waitMail(t, d, "recovered: sealed 127.0.0.1:", 1, 30*time.Second)

	// Another cluster's keyfile: Vault refuses its shares, the pod stays sealed; the
	// right keyfile again: both recover.
	other := lab.TestVault(t)
	otherCfg, otherKeyfile, err := lab.StaticAgentConfig(t.TempDir(), other.Addr, "")
	if err != nil {
		t.Fatal(err)
	}
	if r := runBinary(t, nil, "init", "--config", otherCfg); r.code != 0 {
		t.Fatalf("init the other Vault: %s", r.stderr)
	}
	good, err := os.ReadFile(nl.keyfile)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := os.ReadFile(otherKeyfile)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(nl.keyfile, foreign, 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLogged(t, "configuration and keyfile reloaded", 1, 20*time.Second)
	restart := func() {
		nl.v.Kill()
		if err := nl.v.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	restart()
	nl.waitMail(t, d, "FAILING: unseal_refused 127.0.0.1:", 1, 30*time.Second)
	nl.waitMail(t, d, "FAILING: sealed 127.0.0.1:", 2, 30*time.Second)
	os.WriteFile(nl.keyfile, good, 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	nl.waitMail(t, d, "recovered: unseal_refused 127.0.0.1:", 1, 30*time.Second)
	nl.waitMail(t, d, "recovered: sealed 127.0.0.1:", 2, 30*time.Second)
	// The other cluster's keyfile may also have failed a backup or a token renewal
	// meanwhile: those recover too once the right keyfile is back (checked at the end).

	// The off-host target down (its mount gone, a file in its place), then back.
	d.waitLogged(t, "snapshot stored", 2, 60*time.Second)
	os.Rename(nl.nas, nl.nas+".away")
	os.WriteFile(nl.nas, []byte("not a directory"), 0o600)
	nl.waitMail(t, d, "FAILING: offsite nas", 1, 30*time.Second)
	stored := d.count("snapshot stored")
	d.waitLogged(t, "snapshot stored", stored+2, 30*time.Second) // failing pushes go on: no new message
	os.Remove(nl.nas)
	os.Rename(nl.nas+".away", nl.nas)
	nl.waitMail(t, d, "recovered: offsite nas", 1, 30*time.Second)

	// Backups failing (the snapshot directory gone, a file in its place), then working.
	failing, recovered := nl.count(t, "FAILING: backup scheduled backup"), nl.count(t, "recovered: backup scheduled backup")
	failed := d.count("scheduled backup failed")
	os.Rename(nl.snaps, nl.snaps+".away")
	os.WriteFile(nl.snaps, []byte("not a directory"), 0o600)
	nl.waitMail(t, d, "FAILING: backup scheduled backup", failing+1, 30*time.Second)
	d.waitLogged(t, "scheduled backup failed", failed+2, 30*time.Second) // still failing: no new message
	os.Remove(nl.snaps)
	os.Rename(nl.snaps+".away", nl.snaps)
	nl.waitMail(t, d, "recovered: backup scheduled backup", recovered+1, 60*time.Second)
	t.Logf("failed backup → mail taken by the server: %s", logGap(t, d.Logs(), `msg="scheduled backup failed`, `msg="notification sent"`, "target=mail event=backup", "kind=failing"))

	// kill -9: the next start says the last run did not stop.
	d.cmd.Process.Kill()
	d.cmd.Wait()
	d = startDaemon(t, nl.cfg, 0)
	nl.waitMail(t, d, "event: restarted daemon", 1, 30*time.Second)

	// Both channels have said everything so far (each target has its own worker).
	var hooksBefore []notify.Message
	var mailsBefore []lab.Mail
	if err := lab.WaitFor(ctx, 20*time.Second, "the mail server and the webhook to agree", func(ctx context.Context) error {
		hooksBefore = nl.hooks(t)
		var err error
		if mailsBefore, err = nl.mail.Messages(ctx); err != nil {
			return err
		}
		if len(mailsBefore) != len(hooksBefore) {
			return fmt.Errorf("%d mails, %d webhook calls", len(mailsBefore), len(hooksBefore))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	// A mail server that accepts and then says nothing: unsealing is not held up.
	nl.mail.Stop()
	hung := lab.ListenSilent(t, fmt.Sprintf("127.0.0.1:%d", nl.mail.Port))
	os.WriteFile(nl.keyfile, foreign, 0o600) // one more failure, so a mail is in flight
	d.cmd.Process.Signal(syscall.SIGHUP)
	restart()
	d.waitLogged(t, "notification not delivered", 1, 30*time.Second)
	os.WriteFile(nl.keyfile, good, 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	t0 := time.Now()
	n, _ := vault.NewNode("v", nl.v.Addr, nil)
	if err := lab.WaitFor(ctx, 20*time.Second, "unsealed", func(ctx context.Context) error {
		st, err := n.SealStatus(ctx)
		if err == nil && st.Sealed {
			err = errors.New("sealed")
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took > 3*time.Second {
		t.Fatalf("with the mail server hung, unsealing took %s", took)
	}
	hung.Close()
	scrape := scrapeMetrics(t, nl.metrics)
	d.stop(t)
	assertMonitoringReads(t, scrape)

	// One message per change of state: for every condition the messages alternate,
	// failing then recovered (no repeat while a failure lasts), every one of the
	// failures above was told and all were told recovered; the mail server and the
	// webhook got the same messages in the same order, and ntfy as many.
	var mails, hooks []string
	for _, m := range mailsBefore {
		mails = append(mails, m.Subject)
	}
	for _, m := range hooksBefore {
		hooks = append(hooks, m.Title())
	}
	if strings.Join(mails, "\n") != strings.Join(hooks, "\n") {
		t.Fatalf("mail and webhook differ:\n%s\n---\n%s", strings.Join(mails, "\n"), strings.Join(hooks, "\n"))
	}
	last := map[string]string{}
	for _, subj := range mails {
		kind, key, ok := strings.Cut(subj[strings.Index(subj, "] ")+2:], ": ")
		if !ok {
			t.Fatalf("subject %q", subj)
		}
		if kind == "test" || kind == "event" {
			last[key] = kind
			continue
		}
		if prev := last[key]; prev == kind || (prev == "" && kind != "FAILING") {
			t.Fatalf("%q after %q for %s: not one message per change of state\n%s", kind, prev, key, strings.Join(mails, "\n"))
		}
		last[key] = kind
	}
	for _, w := range []string{"keyfile " + nl.keyfile, "sealed " + strings.TrimPrefix(nl.v.Addr, "http://"), "unseal_refused " + strings.TrimPrefix(nl.v.Addr, "http://"),
		"offsite nas", "backup scheduled backup", "restarted daemon"} {
		if k, ok := last[w]; !ok || (k != "recovered" && k != "event") {
			t.Fatalf("%s: last told %q, want its failure and its recovery\n%s", w, k, strings.Join(mails, "\n"))
		}
	}
	for k, v := range last {
		if v == "FAILING" {
			t.Fatalf("%s was never told recovered\n%s", k, strings.Join(mails, "\n"))
		}
	}
	ntfy := 0
	for _, r := range nl.hook.Requests() {
		if r.Path == "/pva-alerts" {
			ntfy++
		}
	}
	if ntfy < len(mails) {
		t.Fatalf("ntfy got %d messages, the mail server %d", ntfy, len(mails))
	}
	t.Logf("%d messages on each channel: %s", len(mails), strings.Join(mails, "; "))

	// No share, token, password or key anywhere.
	var all strings.Builder
	for _, m := range mailsBefore {
		all.WriteString(m.Subject + m.Text)
	}
	for _, r := range nl.hook.Requests() {
		all.Write(r.Body)
	}
	all.WriteString(d.Logs())
	for _, f := range []string{nl.keyfile, otherKeyfile} {
		kf, err := vault.ReadKeyfile(ctx, f, vault.SystemdCreds{WithKey: "host"})
		if err != nil {
			t.Fatal(err)
		}
		if vault.ContainsAny(all.String(), kf.Keyset, kf.Tokens()...) {
			t.Fatal("a share or token reached a notification or the log")
		}
	}
	for _, s := range []string{nl.password, nl.hmacKey} {
		if strings.Contains(all.String(), s) {
			t.Fatal("the mail password or the webhook key reached a notification or the log")
		}
	}
}

// logGap is the time between the first log line holding from and the first after it
// holding to (slog's time= fields).
func logGap(t *testing.T, logs, from string, to ...string) time.Duration {
	t.Helper()
	var t0 time.Time
	for _, l := range strings.Split(logs, "\n") {
		if !strings.HasPrefix(l, "time=") {
			continue
		}
		ts, err := time.Parse(time.RFC3339Nano, strings.Fields(l)[0][len("time="):])
		if err != nil {
			continue
		}
		switch {
		case t0.IsZero() && strings.Contains(l, from):
			t0 = ts
		case !t0.IsZero() && containsAll(l, to):
			return ts.Sub(t0)
		}
	}
	t.Fatalf("no %q after %q in the log", to, from)
	return 0
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
