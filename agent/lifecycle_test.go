package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

func TestMain(m *testing.M) { os.Exit(lab.RunTests(m)) }

// syncBuffer is a log sink safe for the daemon's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// vaultLab is a namespace with the Vault-shaped chart installed by the agent, pods run
// as real Vault processes on 127.x.y.z by the lab kubelet, every node reached through a
// real sshd on loopback, and a configuration for all of it.
type vaultLab struct {
	cfg   *configs.Config
	cs    kubernetes.Interface
	pods  *lab.VaultPods
	dir   string
	logs  *syncBuffer
	log   *slog.Logger
	nodes int
}

func newVaultLab(t *testing.T, nodes int) *vaultLab {
	t.Helper()
	bins := lab.Need(t)
	cp := lab.SharedControlPlane(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(rc)
	ns := fmt.Sprintf("lc-%d-%d", nodes, time.Now().UnixNano()%1e6)

	sshd, err := lab.StartSSHD(ctx, bins, filepath.Join(dir, "sshd"), "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sshd.Close)
	known := filepath.Join(dir, "known_hosts")
	if err := sshd.WriteKnownHosts(known); err != nil {
		t.Fatal(err)
	}

	cfg := configs.Defaults()
	cfg.SSH.Port = sshd.Port
	cfg.SSH.Identity = configs.SecretRef{File: sshd.ClientKeyPath}
	cfg.SSH.KnownHosts = known
	cfg.Kubernetes.Kubeconfig = cp.Kubeconfig
	cfg.Chart.Path, _ = filepath.Abs("../k8s/testdata/vault-chart")
	cfg.Chart.Namespace = ns
	cfg.Chart.CacheDir = filepath.Join(dir, "charts")
	cfg.Chart.Timeout = 90 * time.Second
	cfg.Vault.Keyfile = filepath.Join(dir, "state", "unseal.cred")
	cfg.Vault.SystemdCredsKey = "host"
	cfg.Metrics.Listen = "127.0.0.1:0"
	var names []string
	dataDirs := map[string]string{}
	for i := 0; i < nodes; i++ {
		name := fmt.Sprintf("%s-n%d", ns, i)
		names = append(names, name)
		cfg.Nodes = append(cfg.Nodes, configs.Node{Name: name, Address: "127.0.0.1", HostPath: filepath.Join(dir, fmt.Sprintf("node%d", i), "vault")})
		dataDirs[fmt.Sprintf("vault-%d", i)] = cfg.Nodes[i].HostPath
		if err := os.MkdirAll(cfg.Nodes[i].HostPath, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := lab.RegisterNodes(ctx, cs, names...); err != nil {
		t.Fatal(err)
	}
	pods := &lab.VaultPods{Bins: bins, Clients: cs, Release: "vault", StateDir: filepath.Join(dir, "pods"), IP: lab.LoopbackBase(),
		DataDir: func(p *corev1.Pod) string { return dataDirs[p.Name] }}
	t.Cleanup(pods.Close)
	k := lab.StartKubelet(cs, ns, pods.Hooks())
	t.Cleanup(k.Stop)
	t.Cleanup(func() {
		for i := 0; i < nodes; i++ {
			_ = cs.CoreV1().PersistentVolumes().Delete(context.Background(), fmt.Sprintf("pva-%s-vault-%d", ns, i), metav1.DeleteOptions{})
		}
	})
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs), &slog.HandlerOptions{Level: slog.LevelDebug}))
	vl := &vaultLab{cfg: &cfg, cs: cs, pods: pods, dir: dir, logs: logs, log: log, nodes: nodes}
	if _, err := Install(ctx, vl.cfg, InstallOptions{}, log); err != nil {
		t.Fatalf("install: %v\n%s", err, logs.String())
	}
	return vl
}

func (vl *vaultLab) keyfile(t *testing.T) *vault.Keyfile {
	t.Helper()
	kf, err := vault.ReadKeyfile(context.Background(), vl.cfg.Vault.Keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	return kf
}

// sealed reads a pod's seal status directly (not through the agent).
func (vl *vaultLab) sealed(t *testing.T, pod string) (bool, int) {
	t.Helper()
	v := vl.pods.Vault(pod)
	if v == nil {
		t.Fatalf("no vault process for %s", pod)
	}
	n, err := vault.NewNode(pod, v.Addr, &http.Client{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	st, err := n.SealStatus(context.Background())
	if err != nil {
		return true, -1
	}
	return st.Sealed, st.Progress
}

// assertNoSecrets scans the logs and every file under the lab directory.
func (vl *vaultLab) assertNoSecrets(t *testing.T, kf *vault.Keyfile, extra ...string) {
	t.Helper()
	all := vl.logs.String() + strings.Join(extra, "\n")
	if vault.ContainsAny(all, kf.Keyset, kf.SnapshotToken) {
		t.Fatal("a share or token reached the output")
	}
	_ = filepath.WalkDir(vl.dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil && fi.Size() < 64<<20 {
			b, _ := os.ReadFile(p)
			if vault.ContainsAny(string(b), kf.Keyset, kf.SnapshotToken) {
				t.Errorf("%s holds a plaintext share or token", p)
			}
		}
		return nil
	})
}

func TestInitUnsealAndDaemonSingleNode(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	rep, err := Init(ctx, vl.cfg, InitOptions{}, vl.log)
	if err != nil {
		t.Fatalf("init: %v\n%s", err, vl.logs.String())
	}
	if rep.Meta.Shares != 5 || rep.Meta.Threshold != 3 || !rep.Meta.HasToken || rep.Meta.ClusterID == "" {
		t.Fatalf("init report %+v", rep)
	}
	kf := vl.keyfile(t)
	if fi, err := os.Stat(vl.cfg.Vault.Keyfile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("keyfile mode: %v", err)
	}
	if _, err := Init(ctx, vl.cfg, InitOptions{}, vl.log); !errors.Is(err, ErrInitKeyfileExists) {
		t.Fatalf("second init: %v", err)
	}
	if sealed, _ := vl.sealed(t, "vault-0"); sealed {
		t.Fatal("sealed after init")
	}

	// The daemon keeps it unsealed through kill -9 and restarts.
	dctx, stop := context.WithCancel(ctx)
	metricsAddr := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(dctx, DaemonOptions{Load: func() (*configs.Config, error) { return vl.cfg, nil }, Version: "test",
			MetricsReady: func(a string) { metricsAddr <- a }}, vl.log)
	}()
	addr := <-metricsAddr
	v := vl.pods.Vault("vault-0")
	var worst time.Duration
	const restarts = 50
	for i := 0; i < restarts; i++ {
		v.Kill()
		if err := v.Start(ctx); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		if err := lab.WaitFor(ctx, 30*time.Second, fmt.Sprintf("restart %d unsealed", i), func(context.Context) error {
			if sealed, _ := vl.sealed(t, "vault-0"); sealed {
				return errors.New("sealed")
			}
			return nil
		}); err != nil {
			t.Fatalf("%v\n%s", err, tail(vl.logs.String(), 20))
		}
		worst = max(worst, time.Since(t0))
	}
	t.Logf("%d restarts unsealed by the daemon; slowest listening → unsealed %s", restarts, worst.Round(time.Millisecond))
	if _, progress := vl.sealed(t, "vault-0"); progress != 0 {
		t.Fatalf("unseal progress left at %d", progress)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`pva_vault_sealed{pod="vault-0"} 0`, `pva_unseal_attempts_total{pod="vault-0"}`, `pva_build_info{`, `pva_last_unseal_timestamp_seconds{pod="vault-0"}`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	stop()
	if err := <-done; err != nil {
		t.Fatalf("daemon: %v", err)
	}

	// Another cluster's keyfile: detected at the threshold, progress reset, clear error.
	other := t.TempDir()
	foreign := *vl.cfg
	foreign.Vault.Keyfile = filepath.Join(other, "foreign.cred")
	fk := &vault.Keyfile{Keyset: fakeKeyset(t, ctx), Created: time.Now()}
	if err := vault.WriteKeyfile(ctx, foreign.Vault.Keyfile, fk, vault.SystemdCreds{WithKey: "host"}, true); err != nil {
		t.Fatal(err)
	}
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = Unseal(ctx, &foreign, vl.log)
	if !errors.Is(err, vault.ErrWrongKeys) {
		t.Fatalf("foreign keyfile: %v", err)
	}
	if sealed, progress := vl.sealed(t, "vault-0"); !sealed || progress != 0 {
		t.Fatalf("after the foreign keyfile: sealed %v progress %d", sealed, progress)
	}
	// The daemon with the foreign keyfile tries once, then leaves the pod alone.
	d2ctx, stop2 := context.WithCancel(ctx)
	done2 := make(chan error, 1)
	go func() {
		done2 <- Run(d2ctx, DaemonOptions{Load: func() (*configs.Config, error) { return &foreign, nil }, PollInterval: 50 * time.Millisecond}, vl.log)
	}()
	if err := lab.WaitFor(ctx, 20*time.Second, "the daemon to give up on the foreign keyset", func(context.Context) error {
		if !strings.Contains(vl.logs.String(), "not retrying until the pod or keyfile changes") {
			return errors.New("not yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	before := strings.Count(vl.logs.String(), "submitted unseal share")
	if err := lab.WaitFor(ctx, 5*time.Second, "more polls", func(context.Context) error {
		if strings.Count(vl.logs.String(), "pod needs attention") < 1 {
			return errors.New("no poll yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	stop2()
	<-done2
	if after := strings.Count(vl.logs.String(), "submitted unseal share"); after != before {
		t.Fatalf("the daemon kept submitting a rejected keyset: %d → %d shares", before, after)
	}

	// Our own keyfile, corrupted: a clear error naming the keyfile.
	bad := *vl.cfg
	bad.Vault.Keyfile = filepath.Join(other, "corrupt.cred")
	b, _ := os.ReadFile(vl.cfg.Vault.Keyfile)
	os.WriteFile(bad.Vault.Keyfile, b[:len(b)/3], 0o600)
	if _, err := Unseal(ctx, &bad, vl.log); !errors.Is(err, vault.ErrKeyfileCorrupt) {
		t.Fatalf("corrupt keyfile: %v", err)
	}
	if res, err := Unseal(ctx, vl.cfg, vl.log); err != nil || res[0].Sealed {
		t.Fatalf("own keyfile: %+v %v", res, err)
	}

	// The data is wiped (node rebuilt): uninitialised Vault + a keyfile → no init, no unseal.
	v.Kill()
	if err := os.RemoveAll(vl.cfg.Nodes[0].HostPath); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(vl.cfg.Nodes[0].HostPath, 0o700)
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := Unseal(ctx, vl.cfg, vl.log); !errors.Is(err, ErrDataGone) || !strings.Contains(err.Error(), "recover") {
		t.Fatalf("unseal on wiped data: %v", err)
	}
	if _, err := Init(ctx, vl.cfg, InitOptions{}, vl.log); !errors.Is(err, ErrInitKeyfileExists) || !strings.Contains(err.Error(), "recover") {
		t.Fatalf("init over a keyfile: %v", err)
	}
	vl.assertNoSecrets(t, kf)
}

// fakeKeyset initialises a throwaway Vault to get a real keyset of another cluster.
func fakeKeyset(t *testing.T, ctx context.Context) vault.Keyset {
	t.Helper()
	v := lab.TestVault(t)
	n, err := vault.NewNode("other", v.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := n.Init(ctx, 5, 3)
	if err != nil {
		t.Fatal(err)
	}
	return res.Keyset
}

func TestInitUnsealHA(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := Init(ctx, vl.cfg, InitOptions{}, vl.log)
	if err != nil {
		t.Fatalf("init: %v\n%s", err, tail(vl.logs.String(), 30))
	}
	if len(rep.Unsealed) != 3 {
		t.Fatalf("unsealed %v", rep.Unsealed)
	}
	kf := vl.keyfile(t)

	dctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- Run(dctx, DaemonOptions{Load: func() (*configs.Config, error) { return vl.cfg, nil }}, vl.log)
	}()
	// Reboot of the whole host: every Vault killed and started again.
	for i := 0; i < 3; i++ {
		for p := 0; p < 3; p++ {
			vl.pods.Vault(fmt.Sprintf("vault-%d", p)).Kill()
		}
		for p := 0; p < 3; p++ {
			if err := vl.pods.Vault(fmt.Sprintf("vault-%d", p)).Start(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if err := lab.WaitFor(ctx, 60*time.Second, "all three unsealed", func(context.Context) error {
			for p := 0; p < 3; p++ {
				if sealed, _ := vl.sealed(t, fmt.Sprintf("vault-%d", p)); sealed {
					return fmt.Errorf("vault-%d sealed", p)
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("%v\n%s", err, tail(vl.logs.String(), 30))
		}
	}
	stop()
	<-done

	// Backups come from the active node, whichever the configuration lists first.
	vl.cfg.Snapshots.Dir = filepath.Join(vl.dir, "snaps")
	brep, err2 := BackupNow(ctx, vl.cfg, BackupOptions{Version: "test"}, vl.log)
	if err2 != nil {
		t.Fatalf("backup through the tunnels: %v", err2)
	}
	var leader string
	var standbys []string
	for p := 0; p < 3; p++ {
		name := fmt.Sprintf("vault-%d", p)
		n, _ := vault.NewNode(name, vl.pods.Vault(name).Addr, nil)
		h, err := n.Health(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if h.Active {
			leader = name
		} else {
			standbys = append(standbys, vl.pods.Vault(name).Addr)
		}
	}
	if brep.Pod != leader || brep.Snapshot.Manifest.KeysetFingerprint != kf.Keyset.Fingerprint() {
		t.Fatalf("backup from %s (leader %s), manifest %+v", brep.Pod, leader, brep.Snapshot.Manifest)
	}
	static := *vl.cfg
	static.Vault.PodAccess = "static"
	static.Vault.Addresses = append(standbys, vl.pods.Vault(leader).Addr)
	brep, err2 = BackupNow(ctx, &static, BackupOptions{Now: func() time.Time { return time.Now().Add(time.Second) }}, vl.log)
	if err2 != nil || !strings.Contains(vl.pods.Vault(leader).Addr, brep.Pod) {
		t.Fatalf("backup with standbys listed first: from %v, %v", brep, err2)
	}
	if _, err := snapshot.CheckFile(brep.Snapshot.Path); err != nil {
		t.Fatal(err)
	}
	vl.assertNoSecrets(t, kf)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
