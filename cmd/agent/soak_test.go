package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// clusterLab is the real chart installed by the binary into the shared control plane,
// its server pods real Vault processes behind the lab's Vault 2.x gate, reached through
// a real sshd; config is the agent's configuration file for all of it.
type clusterLab struct {
	cp      *lab.ControlPlane
	cs      kubernetes.Interface
	pods    *lab.VaultPods
	release string
	config  string
	keyfile string
	snaps   string
	dir     string
}

func newClusterLab(t *testing.T, nodes int, vaultExtra, snapshotsExtra string) *clusterLab {
	t.Helper()
	bins := lab.Need(t)
	cp := lab.SharedControlPlane(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	rc.QPS, rc.Burst = 50, 100
	cs := kubernetes.NewForConfigOrDie(rc)
	id := lab.RunID()
	ns, release := "cl-"+id, "vault-"+id
	dir := t.TempDir()
	sshd, err := lab.StartSSHD(ctx, bins, filepath.Join(dir, "sshd"), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sshd.Close)
	known := filepath.Join(dir, "known_hosts")
	if err := sshd.WriteKnownHosts(known); err != nil {
		t.Fatal(err)
	}
	data := lab.TestDataDir(t)
	values := filepath.Join(dir, "values.yaml")
	os.WriteFile(values, []byte("injector: {enabled: false}\nglobal: {tlsDisable: true}\n"), 0o600)
	var nodeLines strings.Builder
	var names []string
	dataDirs := map[string]string{}
	for i := 0; i < nodes; i++ {
		name := fmt.Sprintf("%s-n%d", ns, i)
		names = append(names, name)
		hp := filepath.Join(data, fmt.Sprintf("node%d", i), "vault")
		dataDirs[fmt.Sprintf("%s-%d", release, i)] = hp
		fmt.Fprintf(&nodeLines, "  - {name: %s, address: 127.0.0.1, host_path: %s}\n", name, hp)
	}
	if err := lab.RegisterNodes(ctx, cs, names...); err != nil {
		t.Fatal(err)
	}
	pods := &lab.VaultPods{Bins: bins, Clients: cs, Release: release, StateDir: filepath.Join(dir, "pods"), IP: lab.LoopbackBase(),
		DataDir: func(p *corev1.Pod) string { return dataDirs[p.Name] }}
	t.Cleanup(pods.Close)
	k := lab.StartKubelet(cs, ns, pods.Hooks())
	t.Cleanup(k.Stop)
	cl := &clusterLab{cp: cp, cs: cs, pods: pods, release: release, dir: dir,
		config: filepath.Join(dir, "config.yaml"), keyfile: filepath.Join(dir, "state", "unseal.cred"), snaps: filepath.Join(dir, "snaps")}
	body := fmt.Sprintf(`nodes:
%sssh:
  port: %d
  identity: {file: %s}
  known_hosts: %s
kubernetes:
  kubeconfig: {file: %s}
chart:
  path: %s
  release: %s
  namespace: %s
  values_files: [%s]
  cache_dir: %s
  timeout: 90s
vault:
  keyfile: %s
  systemd_creds_key: host
%ssnapshots:
  dir: %s
%smetrics:
  listen: "127.0.0.1:0"
`, nodeLines.String(), sshd.Port, sshd.ClientKeyPath, known, cp.Kubeconfig, lab.Chart("0.34.1"), release, ns, values,
		filepath.Join(dir, "charts"), cl.keyfile, vaultExtra, cl.snaps, snapshotsExtra)
	if err := os.WriteFile(cl.config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	useAgentAccounts(t, cl.config, cp.Kubeconfig, cs)
	for _, verb := range [][]string{{"provision"}, {"install"}, {"init"}} {
		if r := runBinary(t, nil, append(verb, "--config", cl.config)...); r.code != 0 {
			t.Fatalf("%s: exit %d\n%s", verb[0], r.code, r.stderr)
		}
	}
	return cl
}

func (cl *clusterLab) pod(i int) string { return fmt.Sprintf("%s-%d", cl.release, i) }

// listenNotify listens where a daemon sends sd_notify until the test ends.
func listenNotify(t *testing.T) *lab.NotifySocket {
	t.Helper()
	ns, err := lab.ListenNotify(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Close)
	return ns
}

// soakDuration is the soak's length: short in make test, as long as asked for by
// scripts/soak.sh (PVA_SOAK_SECONDS). The token period and the schedule scale with it.
func soakDuration() time.Duration {
	if s, err := strconv.Atoi(os.Getenv("PVA_SOAK_SECONDS")); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	return 45 * time.Second
}

// The daemon over a compressed life: token periods of seconds and a backup slot every
// two seconds (test knobs), through Vault restarts, a SIGHUP with a bad configuration
// then a good one, a hung API server (SIGSTOP) for twice the watchdog interval, and
// the daemon killed -9 and started again. At the end: a verified snapshot for every
// schedule slot, every pod unsealed, every token valid, and no watchdog gap longer than
// the ping interval plus a second.
func TestSoak(t *testing.T) {
	duration := soakDuration()
	period := duration / 8 // ≥ 5 periods
	slot := 2 * time.Second
	if duration > 5*time.Minute {
		slot = duration / 100
	}
	cl := newClusterLab(t, 1, fmt.Sprintf("  token_period: %s\n", period), fmt.Sprintf("  schedule: '@every %s'\n  retention: {keep_last: 100000, daily: 0, weekly: 0, monthly: 0}\n", slot))
	ctx, cancel := context.WithTimeout(context.Background(), duration+5*time.Minute)
	defer cancel()
	notify := listenNotify(t)
	const watchdogUSec = 2_000_000 // WatchdogSec=2s: a ping every second
	ping := time.Duration(watchdogUSec/2) * time.Microsecond
	var mu sync.Mutex
	var logs strings.Builder
	type life struct{ from, to time.Time }
	var lives []life
	start := func() *exec.Cmd {
		cmd := exec.Command(binary, "run", "--config", cl.config)
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify.Path, fmt.Sprintf("WATCHDOG_USEC=%d", watchdogUSec))
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			sc := bufio.NewScanner(stderr)
			for sc.Scan() {
				mu.Lock()
				logs.WriteString(sc.Text() + "\n")
				mu.Unlock()
			}
		}()
		mu.Lock()
		lives = append(lives, life{from: time.Now()})
		mu.Unlock()
		return cmd
	}
	end := func(cmd *exec.Cmd, sig syscall.Signal) {
		cmd.Process.Signal(sig)
		cmd.Wait()
		mu.Lock()
		lives[len(lives)-1].to = time.Now()
		mu.Unlock()
	}
	t0 := time.Now()
	daemon := start()
	at := func(frac float64) { // sleep until frac of the soak has passed
		if d := time.Until(t0.Add(time.Duration(float64(duration) * frac))); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
	}
	var faults []fault
	mark := func(what string, f func()) {
		from := time.Now()
		f()
		faults = append(faults, fault{what, from, time.Now()})
	}
	restartVault := func() {
		v := cl.pods.Vault(cl.pod(0))
		v.Kill()
		if err := v.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	at(0.1)
	mark("vault restarted", restartVault)
	at(0.25)
	good, _ := os.ReadFile(cl.config)
	mark("reload with a bad configuration", func() {
		os.WriteFile(cl.config, []byte("nodes: []\n"), 0o600)
		daemon.Process.Signal(syscall.SIGHUP)
	})
	at(0.3)
	mark("reload with the good configuration", func() {
		os.WriteFile(cl.config, good, 0o600)
		daemon.Process.Signal(syscall.SIGHUP)
	})
	at(0.4)
	mark("kube-apiserver stopped", func() {
		if err := cl.cp.PauseAPIServer(); err != nil {
			t.Fatal(err)
		}
		<-time.After(2 * 2 * time.Duration(watchdogUSec) * time.Microsecond) // the fault itself: twice WatchdogSec
		if err := cl.cp.ResumeAPIServer(); err != nil {
			t.Fatal(err)
		}
	})
	at(0.55)
	mark("daemon killed -9 and started again", func() {
		end(daemon, syscall.SIGKILL)
		daemon = start()
	})
	at(0.7)
	mark("vault restarted", restartVault)
	at(1)
	stop := time.Now()
	end(daemon, syscall.SIGTERM)

	// Every slot of the schedule has a verified snapshot, taken in its slot or, when a
	// fault held it, as soon as the fault ended (a missed slot runs at once).
	var entries []struct {
		Path     string    `json:"path"`
		Time     time.Time `json:"time"`
		Verified bool      `json:"verified"`
	}
	r := runBinary(t, nil, "snapshots", "list", "-o", "json", "--config", cl.config)
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil {
		t.Fatalf("%v: %s", err, r.stderr)
	}
	var taken []time.Time
	for _, e := range entries {
		if e.Verified {
			taken = append(taken, e.Time)
		}
	}
	sort.Slice(taken, func(i, j int) bool { return taken[i].Before(taken[j]) })
	var slots []time.Time
	for s := t0.Truncate(slot).Add(slot); s.Add(slot).Before(stop); s = s.Add(slot) {
		slots = append(slots, s)
	}
	covered, late := 0, []string{}
	for _, s := range slots {
		deadline := s.Add(slot)
		for _, f := range faults {
			if f.to.After(s.Add(-slot)) && f.from.Before(deadline) && f.to.Add(slot).After(deadline) {
				deadline = f.to.Add(slot) // held by a fault: due right after it
			}
		}
		ok := false
		for _, tk := range taken {
			if !tk.Before(s) && tk.Before(deadline) {
				ok = true
				break
			}
		}
		if ok {
			covered++
		} else {
			late = append(late, s.Format("15:04:05.000"))
		}
	}
	t.Logf("soak %s: %d scheduled slots, %d covered by a verified snapshot, %d snapshots taken (taken/expected %d/%d); faults: %v",
		stop.Sub(t0).Round(time.Second), len(slots), covered, len(taken), len(taken), len(slots), faultNames(faults))
	if len(late) > 0 {
		t.Errorf("slots without a snapshot: %v", late)
	}
	if len(slots) < 20 {
		t.Errorf("only %d slots: the soak is too short for 20 scheduled backups", len(slots))
	}

	// Watchdog: within each life of the daemon, no gap between pings longer than the
	// ping interval plus a second, the hung API server included.
	var longest time.Duration
	for _, l := range lives {
		ps := notify.Pings(l.from, l.to)
		for i := 1; i < len(ps); i++ {
			longest = max(longest, ps[i].Sub(ps[i-1]))
		}
		if len(ps) == 0 {
			t.Errorf("no watchdog ping in a life of the daemon (%s)", l.to.Sub(l.from))
		}
	}
	t.Logf("longest watchdog gap %s (ping interval %s)", longest.Round(time.Millisecond), ping)
	if longest > ping+time.Second {
		t.Errorf("a watchdog gap of %s", longest)
	}

	// Every pod unsealed, every token valid, the bad reload refused and survived.
	kf, err := vault.ReadKeyfile(ctx, cl.keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	n, _ := vault.NewNode(cl.pod(0), cl.pods.Vault(cl.pod(0)).Addr, nil)
	if st, err := n.SealStatus(ctx); err != nil || st.Sealed {
		t.Errorf("%s sealed at the end: %v", cl.pod(0), err)
	}
	for name, tok := range map[string]vault.Token{"snapshot": kf.SnapshotToken, "operator": kf.OperatorToken} {
		if ti, err := n.LookupSelf(ctx, tok); err != nil || ti.TTL <= 0 {
			t.Errorf("the %s token at the end: %+v %v", name, ti, err)
		}
	}
	mu.Lock()
	all := logs.String()
	mu.Unlock()
	if !strings.Contains(all, "reload refused: keeping the running configuration") || !strings.Contains(all, "configuration and keyfile reloaded") {
		t.Errorf("the reloads are not in the log")
	}
	if vault.ContainsAny(all, kf.Keyset, kf.Tokens()...) {
		t.Error("a secret in the daemon's log")
	}
	if t.Failed() {
		os.WriteFile(filepath.Join(os.TempDir(), "pva-soak-daemon.log"), []byte(all), 0o600)
		t.Logf("the daemon's log: %s", filepath.Join(os.TempDir(), "pva-soak-daemon.log"))
	}
}

// fault is one injected failure and when it lasted.
type fault struct {
	what     string
	from, to time.Time
}

func faultNames(fs []fault) []string {
	var out []string
	for _, f := range fs {
		out = append(out, f.what)
	}
	return out
}
