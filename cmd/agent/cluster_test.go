package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// The lease timings of the cluster test: short, with room for a loaded CI machine.
const (
	testLeaseDuration = 6 * time.Second
	testRenewDeadline = 4 * time.Second
	testRetryPeriod   = time.Second
	testBackupSlot    = 3 * time.Second
)

// pveHost is one Proxmox host of the lab cluster: its own state directory, its own
// systemd-creds host secret, and an sshd that runs commands with that secret, as
// keyfile enroll and status reach another PVE node.
type pveHost struct {
	name    string
	dir     string
	secret  string
	keyfile string
	sshd    *lab.SSHD
	daemon  *daemonProc
}

// env is what the agent on the host runs with: its node name, its keyfile and its host
// key.
func (h *pveHost) env() []string {
	return []string{"PVA_PROXMOX_NODE=" + h.name, "PVA_VAULT_KEYFILE=" + h.keyfile, "SYSTEMD_CREDENTIAL_SECRET=" + h.secret}
}

// clusterOfHosts is three PVE hosts' agents keeping one 3-pod Vault, snapshots in one
// directory every host sees (a shared Proxmox storage's mount).
type clusterOfHosts struct {
	*clusterLab
	hosts []*pveHost
}

func newClusterOfHosts(t *testing.T) *clusterOfHosts {
	t.Helper()
	bins := lab.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	base := t.TempDir()
	var hosts []*pveHost
	var entries strings.Builder
	for _, name := range []string{"pve-a", "pve-b", "pve-c"} {
		h := &pveHost{name: name, dir: filepath.Join(base, name)}
		h.secret = filepath.Join(h.dir, "credential.secret")
		h.keyfile = filepath.Join(h.dir, "state", "unseal.cred")
		if err := os.MkdirAll(h.dir, 0o700); err != nil {
			t.Fatal(err)
		}
		var err error
		if h.sshd, err = lab.StartSSHDWith(ctx, bins, filepath.Join(h.dir, "sshd"), "127.0.0.1", "SetEnv SYSTEMD_CREDENTIAL_SECRET="+h.secret); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.sshd.Close)
		fmt.Fprintf(&entries, "    - {name: %s, address: 127.0.0.1, port: %d, keyfile: %s}\n", name, h.sshd.Port, h.keyfile)
		hosts = append(hosts, h)
	}
	extra := fmt.Sprintf("  schedule: '@every %s'\n  retention: {keep_last: 100000, daily: 0, weekly: 0, monthly: 0}\ncluster:\n  hosts:\n%s  lease_duration: %s\n  renew_deadline: %s\n  retry_period: %s\n",
		testBackupSlot, entries.String(), testLeaseDuration, testRenewDeadline, testRetryPeriod)
	// pve-a's agent provisions, installs and initialises (its keyfile sealed with its own
	// host secret); the others get theirs with keyfile enroll.
	t.Setenv("PVA_PROXMOX_NODE", hosts[0].name)
	t.Setenv("PVA_VAULT_KEYFILE", hosts[0].keyfile)
	t.Setenv("SYSTEMD_CREDENTIAL_SECRET", hosts[0].secret)
	cl := newClusterLab(t, 3, "", extra)
	// The hosts' sshds admit the agent's SSH key and are pinned in its known_hosts.
	key, err := os.ReadFile(filepath.Join(cl.dir, "sshd", "client_ed25519"))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	known, err := os.OpenFile(filepath.Join(cl.dir, "known_hosts"), os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer known.Close()
	for _, h := range hosts {
		if err := h.sshd.Authorize("root", signer.PublicKey()); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(known, h.sshd.KnownHostsLine())
	}
	return &clusterOfHosts{clusterLab: cl, hosts: hosts}
}

// run runs a verb as the agent on h.
func (c *clusterOfHosts) run(t *testing.T, h *pveHost, args ...string) result {
	t.Helper()
	return runBinary(t, h.env(), append(args, "--config", c.config)...)
}

// start starts the daemon on h.
func (c *clusterOfHosts) start(t *testing.T, h *pveHost) {
	t.Helper()
	h.daemon = startDaemon(t, c.config, 0, h.env()...)
}

// leaders are the hosts whose daemon leads now: its last leadership line is "leading".
func (c *clusterOfHosts) leaders() []*pveHost {
	var out []*pveHost
	for _, h := range c.hosts {
		if h.daemon == nil || h.daemon.cmd.ProcessState != nil {
			continue
		}
		logs := h.daemon.Logs()
		if i := strings.LastIndex(logs, `msg="leading:`); i >= 0 && !strings.Contains(logs[i:], `msg="stopped leading`) {
			out = append(out, h)
		}
	}
	return out
}

// waitLeader waits until exactly one host leads, other than not, and returns it.
func (c *clusterOfHosts) waitLeader(t *testing.T, not *pveHost, timeout time.Duration) *pveHost {
	t.Helper()
	var got *pveHost
	err := lab.WaitFor(context.Background(), timeout, "one leader", func(context.Context) error {
		ls := c.leaders()
		if len(ls) > 1 {
			t.Fatalf("%d agents lead at once: %s and %s", len(ls), ls[0].name, ls[1].name)
		}
		if len(ls) == 0 || ls[0] == not {
			return errors.New("no new leader yet")
		}
		got = ls[0]
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.allLogs())
	}
	return got
}

func (c *clusterOfHosts) allLogs() string {
	var b strings.Builder
	for _, h := range c.hosts {
		if h.daemon != nil {
			fmt.Fprintf(&b, "--- %s\n%s\n", h.name, tailLines(h.daemon.Logs(), 60))
		}
	}
	return b.String()
}

// snapshots lists the shared directory, oldest first.
func (c *clusterOfHosts) snapshots(t *testing.T) []snapshot.Entry {
	t.Helper()
	es, err := (&snapshot.Store{Dir: c.snaps}).List()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return es
}

// waitSnapshotsBy waits for n more snapshots than have stored, committed by holder.
func (c *clusterOfHosts) waitSnapshotsBy(t *testing.T, holder string, n int, timeout time.Duration) {
	t.Helper()
	count := func() int {
		k := 0
		for _, e := range c.snapshots(t) {
			if e.Manifest != nil && e.Manifest.LeaseHolder == holder {
				k++
			}
		}
		return k
	}
	want := count() + n
	err := lab.WaitFor(context.Background(), timeout, fmt.Sprintf("%d snapshots committed by %s", want, holder), func(context.Context) error {
		if count() < want {
			return errors.New("not yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.allLogs())
	}
}

// restartPod kills pod i's Vault (kill -9, its container restarted in place) and
// returns how long until it answered unsealed again.
func (c *clusterOfHosts) restartPod(t *testing.T, ctx context.Context, i int) time.Duration {
	t.Helper()
	v := c.pods.Vault(c.pod(i))
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	n, err := vault.NewNode(c.pod(i), v.Addr, &http.Client{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(ctx, 90*time.Second, c.pod(i)+" unsealed", func(ctx context.Context) error {
		st, err := n.SealStatus(ctx)
		if err == nil && st.Sealed {
			err = errors.New("sealed")
		}
		return err
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.allLogs())
	}
	return time.Since(t0)
}

// An agent on each of three Proxmox hosts keeps one 3-pod Vault: the keyfile enrolled
// on each host under its own key; one leader through the Lease, the others only
// unsealing; the leader killed -9 and another taking over within the lease; backups
// going on with no slot taken twice and no two agents ever writing the snapshot
// directory at once; two of three agents stopped and a restarted pod still unsealed;
// the API server hung and nobody taking the lead while pods keep being unsealed.
func TestThreeAgentsOneVault(t *testing.T) {
	c := newClusterOfHosts(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	a, b, cc := c.hosts[0], c.hosts[1], c.hosts[2]

	// The keyfile on every host, each sealed with that host's own key.
	if r := c.run(t, a, "keyfile", "enroll", a.name); r.code == 0 || !strings.Contains(r.stderr, "is this host") {
		t.Fatalf("enroll onto itself: %d %s", r.code, r.stderr)
	}
	if r := c.run(t, a, "keyfile", "enroll", "pve-x"); r.code == 0 || !strings.Contains(r.stderr, "one of: pve-a, pve-b, pve-c") {
		t.Fatalf("enroll an unknown host: %d %s", r.code, r.stderr)
	}
	// Never over a file enroll cannot prove is this Vault's keyfile: another Vault's
	// keyfile on pve-c (sealed with pve-c's key), something else on pve-b.
	os.MkdirAll(filepath.Dir(cc.keyfile), 0o700)
	seal := exec.Command("systemd-creds", "encrypt", "--name="+vault.CredentialName, "--with-key=host", "-", cc.keyfile)
	seal.Env = append(os.Environ(), "SYSTEMD_CREDENTIAL_SECRET="+cc.secret)
	seal.Stdin = strings.NewReader(`{"version":2,"keyset_fingerprint":"sha256:0123456789abcdef"}`)
	if out, err := seal.CombinedOutput(); err != nil {
		t.Fatalf("seal another Vault's keyfile on pve-c: %v %s", err, out)
	}
	os.MkdirAll(filepath.Dir(b.keyfile), 0o700)
	os.WriteFile(b.keyfile, []byte("the operator's own file\n"), 0o600)
	for h, want := range map[*pveHost]string{cc: "holds another Vault's keyfile", b: "does not open with this host's key"} {
		before, _ := os.ReadFile(h.keyfile)
		r := c.run(t, a, "keyfile", "enroll", h.name)
		after, _ := os.ReadFile(h.keyfile)
		if r.code == 0 || !strings.Contains(r.stderr, want) || !bytes.Equal(before, after) {
			t.Fatalf("enroll over what is at %s: %d, changed %v\n%s", h.keyfile, r.code, !bytes.Equal(before, after), r.stderr)
		}
		os.Remove(h.keyfile)
	}
	for _, h := range []*pveHost{b, cc} {
		if r := c.run(t, a, "keyfile", "enroll", h.name); r.code != 0 || !strings.Contains(r.stdout, "keyfile sealed on "+h.name) {
			t.Fatalf("enroll %s: %d\n%s\n%s", h.name, r.code, r.stdout, r.stderr)
		}
		// It opens with that host's secret, and not with pve-a's: sealed there, with its key.
		if out, err := exec.Command("systemd-creds", "decrypt", "--name="+vault.CredentialName, h.keyfile, "-").CombinedOutput(); err == nil {
			t.Fatalf("%s's keyfile opens with pve-a's host secret: %.40s", h.name, out)
		}
		if r := c.run(t, h, "keyfile", "check"); r.code != 0 {
			t.Fatalf("keyfile check on %s: %d %s", h.name, r.code, r.stderr)
		}
		left, _ := filepath.Glob(filepath.Join(filepath.Dir(h.keyfile), ".keyfile-enroll-*"))
		if len(left) > 0 {
			t.Fatalf("enroll left %v", left)
		}
	}

	// token rotate reaches every host's copy; a host that cannot seal it is named, and
	// the replaced tokens stay valid for it until it is enrolled again.
	if err := os.Rename(cc.secret, cc.secret+".away"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(cc.secret, 0o700); err != nil { // pve-c's systemd-creds cannot read its key
		t.Fatal(err)
	}
	r := c.run(t, a, "token", "rotate")
	if r.code == 0 || !strings.Contains(r.stderr, "not on [pve-c]") || !strings.Contains(r.stderr, "keyfile enroll HOST") {
		t.Fatalf("token rotate with pve-c unable to seal: %d\n%s", r.code, r.stderr)
	}
	if err := os.Remove(cc.secret); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(cc.secret+".away", cc.secret); err != nil {
		t.Fatal(err)
	}
	r = c.run(t, b, "status")
	for _, want := range []string{"keyfile on pve-a: current", "keyfile on pve-b: current", "keyfile on pve-c: stale"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("status after a rotation pve-c missed lacks %q:\n%s\n%s", want, r.stdout, r.stderr)
		}
	}
	if !strings.Contains(r.stdout+r.stderr, "run `pve-vault-agent keyfile enroll pve-c`") {
		t.Fatalf("status does not say to enroll pve-c:\n%s", r.stderr)
	}
	if r := c.run(t, cc, "keyfile", "check"); r.code != 0 {
		t.Fatalf("pve-c's replaced tokens were revoked: %d\n%s", r.code, r.stderr+r.stdout)
	}
	if r := c.run(t, a, "keyfile", "enroll", cc.name); r.code != 0 {
		t.Fatalf("enroll pve-c again: %d %s", r.code, r.stderr)
	}

	// config check says who this agent is and that a per-host directory splits the history.
	if r := c.run(t, b, "config", "check"); !strings.Contains(r.stderr, "cluster: this agent is pve-b of 3 hosts") ||
		!strings.Contains(r.stderr, "warning: cluster: snapshots.dir "+c.snaps+" is a directory of this host") {
		t.Fatalf("config check on pve-b:\n%s", r.stderr)
	}

	// Three daemons: exactly one leads.
	for _, h := range c.hosts {
		c.start(t, h)
	}
	first := c.waitLeader(t, nil, 30*time.Second)
	c.waitSnapshotsBy(t, first.name, 2, 60*time.Second)
	for _, h := range c.hosts {
		if h != first && h.daemon.count("snapshot stored") > 0 {
			t.Fatalf("%s, not leading, backed up:\n%s", h.name, h.daemon.Logs())
		}
	}
	// status on any host: the leader, and every host's keyfile current.
	r = c.run(t, b, "status")
	for _, want := range []string{"leader " + first.name, "keyfile on pve-a: current", "keyfile on pve-b: current", "keyfile on pve-c: current"} {
		if !strings.Contains(r.stdout, want) {
			t.Fatalf("status on pve-b lacks %q:\n%s\n%s", want, r.stdout, r.stderr)
		}
	}

	// kill -9 the leader: another takes over within the lease and backs up at once.
	killed := time.Now()
	first.daemon.cmd.Process.Kill()
	first.daemon.cmd.Wait()
	second := c.waitLeader(t, first, testLeaseDuration+3*testRetryPeriod+5*time.Second)
	takeover := time.Since(killed)
	t.Logf("leader %s killed -9: %s leads after %s (lease %s, retry %s)", first.name, second.name, takeover.Round(time.Millisecond), testLeaseDuration, testRetryPeriod)
	c.waitSnapshotsBy(t, second.name, 2, 60*time.Second)

	// Two of three agents stopped: the third leads at once (a stopping leader releases
	// the Lease) and unseals a restarted pod alone.
	var third *pveHost
	for _, h := range c.hosts {
		if h != first && h != second {
			third = h
		}
	}
	second.daemon.stop(t)
	if c.waitLeader(t, second, testLeaseDuration+5*time.Second) != third {
		t.Fatal("the third agent does not lead")
	}
	t.Logf("one agent of three: pod restarted → unsealed in %s", c.restartPod(t, ctx, 2).Round(time.Millisecond))

	// Back to three agents: every pod restart is unsealed (by whichever is first).
	first.daemon, second.daemon = nil, nil
	c.start(t, first)
	c.start(t, second)
	first.daemon.waitLogged(t, "another agent leads", 1, 30*time.Second)
	second.daemon.waitLogged(t, "another agent leads", 1, 30*time.Second)
	t.Logf("three agents: pod restarted → unsealed in %s", c.restartPod(t, ctx, 2).Round(time.Millisecond))

	// The API server hung: the leader stops leading after renew_deadline, no other agent
	// takes the Lease, nothing is committed, and a restarted pod is still unsealed.
	before := map[string]int{}
	for _, h := range c.hosts {
		before[h.name] = h.daemon.count(`msg="leading:`)
	}
	if err := c.cp.PauseAPIServer(); err != nil {
		t.Fatal(err)
	}
	paused := time.Now()
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			if err := c.cp.ResumeAPIServer(); err != nil {
				t.Error(err)
			}
		}
	}
	defer resume()
	third.daemon.waitLogged(t, "stopped leading", 1, testRenewDeadline+10*time.Second)
	t.Logf("API server hung: the leader stopped leading after %s", time.Since(paused).Round(time.Millisecond))
	committed := len(c.snapshots(t))
	t.Logf("API server hung: pod restarted → unsealed in %s", c.restartPod(t, ctx, 1).Round(time.Millisecond))
	// Past a whole lease after the leader's last renewal: nobody leads.
	if d := time.Until(paused.Add(testLeaseDuration + 3*testRetryPeriod)); d > 0 {
		<-time.After(d)
	}
	for _, h := range c.hosts {
		if n := h.daemon.count(`msg="leading:`); n != before[h.name] {
			t.Fatalf("%s took the lead while the API server was hung:\n%s", h.name, c.allLogs())
		}
	}
	if n := len(c.snapshots(t)); n != committed {
		t.Fatalf("%d snapshots committed while no agent could hold the Lease", n-committed)
	}
	resume()
	back := c.waitLeader(t, nil, testLeaseDuration+10*time.Second)
	t.Logf("API server back: %s leads", back.name)
	c.waitSnapshotsBy(t, back.name, 1, 60*time.Second)

	// The whole history: no schedule slot yields two snapshots, and no two agents'
	// writes overlap (from its start, the manifest's created, to its commit, the
	// file's modification time).
	es := c.snapshots(t)
	type span struct {
		from, to time.Time
		holder   string
	}
	var spans []span
	holders := map[string]int{}
	for _, e := range es {
		fi, err := os.Stat(e.Path)
		if err != nil {
			t.Fatal(err)
		}
		spans = append(spans, span{e.Manifest.Created, fi.ModTime(), e.Manifest.LeaseHolder})
		holders[e.Manifest.LeaseHolder]++
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].from.Before(spans[j].from) })
	sched, err := configs.ParseSchedule(fmt.Sprintf("@every %s", testBackupSlot))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(spans); i++ {
		// Each snapshot is due at the first slot after the one before it (the schedule
		// is anchored to the newest snapshot, whoever took it).
		if slot := sched.Next(spans[i-1].from); spans[i].from.Before(slot) {
			t.Errorf("snapshot of %s (%s) came before its slot %s after %s's of %s: one slot taken twice", spans[i].from.Format(time.StampMilli), spans[i].holder, slot.Format(time.StampMilli), spans[i-1].holder, spans[i-1].from.Format(time.StampMilli))
		}
		if spans[i].from.Before(spans[i-1].to) {
			t.Errorf("%s started writing at %s while %s's snapshot was committed only at %s", spans[i].holder, spans[i].from.Format(time.StampMilli), spans[i-1].holder, spans[i-1].to.Format(time.StampMilli))
		}
	}
	if holders[""] > 0 || len(holders) < 2 {
		t.Errorf("lease holders of the snapshots: %v", holders)
	}
	if t.Failed() {
		t.Log(c.allLogs())
	}
	left, _ := filepath.Glob(filepath.Join(c.snaps, ".incoming-*"))
	t.Logf("%d snapshots by %v, %d temp files left", len(es), holders, len(left))

	// No share, token or root token in any agent's log or output.
	var all strings.Builder
	for _, h := range c.hosts {
		all.WriteString(h.daemon.Logs())
	}
	kfr := c.run(t, a, "keyfile", "check")
	all.WriteString(kfr.stdout + kfr.stderr + r.stdout + r.stderr)
	c.assertNoSecrets(t, a, all.String())
}

// assertNoSecrets fails when text holds a share or token of the keyfile on h.
func (c *clusterOfHosts) assertNoSecrets(t *testing.T, h *pveHost, text string) {
	t.Helper()
	t.Setenv("SYSTEMD_CREDENTIAL_SECRET", h.secret)
	kf, err := vault.ReadKeyfile(context.Background(), h.keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	if vault.ContainsAny(text, kf.Keyset, kf.Tokens()...) {
		t.Fatal("a share or token of the keyfile was logged or printed")
	}
}
