package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// runDaemon starts the daemon on vl's configuration and stops it at cleanup; it returns
// the metrics address.
func runDaemon(t *testing.T, ctx context.Context, vl *vaultLab, opts DaemonOptions) (string, func()) {
	t.Helper()
	dctx, stop := context.WithCancel(ctx)
	metrics := make(chan string, 1)
	done := make(chan error, 1)
	if opts.Load == nil {
		opts.Load = func() (*Env, error) { return vl.newEnv(), nil }
	}
	opts.MetricsReady = func(a string) { metrics <- a }
	go func() { done <- Run(dctx, opts) }()
	var addr string
	select {
	case addr = <-metrics:
	case err := <-done:
		t.Fatalf("daemon: %v", err)
	}
	stopped := false
	shutdown := func() {
		if stopped {
			return
		}
		stopped = true
		stop()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v", err)
		}
	}
	t.Cleanup(shutdown)
	return addr, shutdown
}

func TestInitUnsealAndDaemonSingleNode(t *testing.T) {
	vl := newVaultLab(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pod := vl.pod(0)

	rep, err := Init(ctx, vl.env, InitOptions{})
	if err != nil {
		t.Fatalf("init: %v\n%s", err, vl.logs.String())
	}
	if rep.Meta.Shares != 5 || rep.Meta.Threshold != 3 || !rep.Meta.HasToken || !rep.Meta.HasOperatorToken || !rep.Meta.HasCanary || rep.Meta.ClusterID == "" {
		t.Fatalf("init report %+v", rep)
	}
	kf := vl.keyfile(t)
	if fi, err := os.Stat(vl.cfg.Vault.Keyfile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("keyfile mode: %v", err)
	}
	if _, err := Init(ctx, vl.env, InitOptions{}); !errors.Is(err, ErrInitKeyfileExists) {
		t.Fatalf("second init: %v", err)
	}
	if sealed, _ := vl.sealed(t, pod); sealed {
		t.Fatal("sealed after init")
	}
	// The initial root token is gone: Vault lists exactly the agent's two tokens.
	withRoot(t, ctx, vl.node(t, pod), kf, func(root vault.Token) {
		if n := accessors(t, ctx, vl.node(t, pod), root); n != 3 { // the agent's two + this generated one
			t.Fatalf("%d token accessors after init, want the agent's 2 and this root", n)
		}
	})

	// The daemon keeps it unsealed through kill -9 and restarts.
	addr, stop := runDaemon(t, ctx, vl, DaemonOptions{})
	v := vl.pods.Vault(pod)
	var worst time.Duration
	const restarts = 30
	for i := 0; i < restarts; i++ {
		v.Kill()
		if err := v.Start(ctx); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		if err := lab.WaitFor(ctx, 30*time.Second, fmt.Sprintf("restart %d unsealed", i), func(context.Context) error {
			if sealed, _ := vl.sealed(t, pod); sealed {
				return errors.New("sealed")
			}
			return nil
		}); err != nil {
			t.Fatalf("%v\n%s", err, tail(vl.logs.String(), 20))
		}
		worst = max(worst, time.Since(t0))
	}
	t.Logf("%d restarts unsealed by the daemon; slowest listening → unsealed %s", restarts, worst.Round(time.Millisecond))
	// Renewals failed while the pod kept restarting; once it stays up they succeed.
	var body []byte
	_ = lab.WaitFor(ctx, 30*time.Second, "token renewals in the metrics", func(context.Context) error {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return err
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), `pva_token_ttl_seconds{token="operator"}`) {
			return errors.New("no renewal yet")
		}
		return nil
	})
	for _, want := range []string{fmt.Sprintf(`pva_vault_sealed{pod=%q} 0`, pod), fmt.Sprintf(`pva_unseal_attempts_total{pod=%q}`, pod), `pva_build_info{`,
		`pva_token_ttl_seconds{token="operator"}`, `pva_token_ttl_seconds{token="snapshot"}`, "pva_backup_next_timestamp_seconds"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	stop()

	// Another cluster's keyfile: detected at the threshold, progress reset, clear error.
	other := t.TempDir()
	foreign := *vl.cfg
	foreign.Vault.Keyfile = filepath.Join(other, "foreign", "unseal.cred")
	fk := &vault.Keyfile{Keyset: fakeKeyset(t, ctx), Created: time.Now()}
	if err := vault.WriteKeyfile(ctx, foreign.Vault.Keyfile, fk, vault.SystemdCreds{WithKey: "host"}, true); err != nil {
		t.Fatal(err)
	}
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	fenv := NewEnv(&foreign, vl.log, EnvOptions{Waits: testWaits()})
	defer fenv.Close()
	if _, err := Unseal(ctx, fenv); !errors.Is(err, vault.ErrWrongKeys) {
		t.Fatalf("foreign keyfile: %v", err)
	}
	if sealed, progress := vl.sealed(t, pod); !sealed || progress != 0 {
		t.Fatalf("after the foreign keyfile: sealed %v progress %d", sealed, progress)
	}

	// Our own keyfile, corrupted: a clear error naming the keyfile.
	bad := *vl.cfg
	bad.Vault.Keyfile = filepath.Join(other, "foreign", "corrupt.cred")
	b, _ := os.ReadFile(vl.cfg.Vault.Keyfile)
	os.WriteFile(bad.Vault.Keyfile, b[:len(b)/3], 0o600)
	benv := NewEnv(&bad, vl.log, EnvOptions{Waits: testWaits()})
	defer benv.Close()
	if _, err := Unseal(ctx, benv); !errors.Is(err, vault.ErrKeyfileCorrupt) {
		t.Fatalf("corrupt keyfile: %v", err)
	}
	if res, err := Unseal(ctx, vl.env); err != nil || res[0].Sealed {
		t.Fatalf("own keyfile: %+v %v", res, err)
	}

	// The data is wiped (node rebuilt): uninitialised Vault + a keyfile → no init, no unseal.
	v.Kill()
	if err := os.RemoveAll(vl.cfg.Nodes[0].HostPath); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(vl.cfg.Nodes[0].HostPath, 0o700)
	os.Chown(vl.cfg.Nodes[0].HostPath, 100, 100)
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := Unseal(ctx, vl.env); !errors.Is(err, ErrDataGone) || !strings.Contains(strings.Join(Hints(err), " "), "recover") {
		t.Fatalf("unseal on wiped data: %v", err)
	}
	if _, err := Init(ctx, vl.env, InitOptions{}); !errors.Is(err, ErrInitKeyfileExists) || !strings.Contains(strings.Join(Hints(err), " "), "recover") {
		t.Fatalf("init over a keyfile: %v", err)
	}
	vl.assertNoSecrets(t, kf)
}

// accessors counts the tokens Vault knows (auth/token/accessors, root only).
func accessors(t *testing.T, ctx context.Context, n *vault.Node, root vault.Token) int {
	t.Helper()
	out, err := n.List(ctx, root, "auth/token/accessors")
	if err != nil {
		t.Fatal(err)
	}
	return len(out)
}

func TestInitUnsealHA(t *testing.T) {
	vl := newVaultLab(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := Init(ctx, vl.env, InitOptions{})
	if err != nil {
		t.Fatalf("init: %v\n%s", err, tail(vl.logs.String(), 30))
	}
	if len(rep.Unsealed) != 3 {
		t.Fatalf("unsealed %v", rep.Unsealed)
	}
	kf := vl.keyfile(t)

	_, stop := runDaemon(t, ctx, vl, DaemonOptions{})
	// Reboot of the whole host: every Vault killed and started again.
	for i := 0; i < 3; i++ {
		for p := 0; p < 3; p++ {
			vl.pods.Vault(vl.pod(p)).Kill()
		}
		for p := 0; p < 3; p++ {
			if err := vl.pods.Vault(vl.pod(p)).Start(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if err := lab.WaitFor(ctx, 60*time.Second, "all three unsealed", func(context.Context) error {
			for p := 0; p < 3; p++ {
				if sealed, _ := vl.sealed(t, vl.pod(p)); sealed {
					return fmt.Errorf("%s sealed", vl.pod(p))
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("%v\n%s", err, tail(vl.logs.String(), 30))
		}
	}
	stop()

	// Backups come from the active node, whichever the configuration lists first.
	brep, err := BackupNow(ctx, vl.env, BackupOptions{})
	if err != nil {
		t.Fatalf("backup through the tunnels: %v", err)
	}
	leader := vl.leader(t, ctx)
	if brep.Pod != leader.Name || brep.Snapshot.Manifest.KeysetFingerprint != kf.Keyset.Fingerprint() {
		t.Fatalf("backup from %s (leader %s), manifest %+v", brep.Pod, leader.Name, brep.Snapshot.Manifest)
	}
	vl.assertNoSecrets(t, kf)
}

// A pod that copies the chart's server labels (anyone who can create a pod in the
// namespace can) gets nothing: no share, no token, not a single request of the agent's,
// through init, unseal, backup and the daemon. Its "Vault" answers sealed, to lure.
func TestRoguePodGetsNothing(t *testing.T) {
	var mu sync.Mutex
	var calls []string
	rogueIP := lab.LoopbackBase()(200)
	l, err := net.Listen("tcp", rogueIP+":8200")
	if err != nil {
		t.Fatal(err)
	}
	fake := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		calls = append(calls, fmt.Sprintf("%s %s token=%v", r.Method, r.URL.Path, r.Header.Get("X-Vault-Token") != ""))
		mu.Unlock()
		_ = json.NewEncoder(w).Encode(map[string]any{"initialized": true, "sealed": true, "t": 3, "n": 5, "progress": 0, "version": "2.0.4"})
	})}
	go fake.Serve(l)
	defer fake.Close()
	vl := newVaultLabWith(t, labOptions{nodes: 1, other: func(*corev1.Pod) string { return rogueIP }})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rogue := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: vl.release + "-rogue",
		Labels: map[string]string{"app.kubernetes.io/name": "vault", "app.kubernetes.io/instance": vl.release, "component": "server"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "vault", Image: "hashicorp/vault:2.0.4"}}}}
	if _, err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Create(ctx, rogue, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(ctx, time.Minute, "the rogue pod running at its IP", func(ctx context.Context) error {
		p, err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Get(ctx, rogue.Name, metav1.GetOptions{})
		if err != nil || p.Status.PodIP != rogueIP {
			return errors.New("not yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatalf("init: %v", err)
	}
	_, stop := runDaemon(t, ctx, vl, DaemonOptions{DiscoverInterval: 200 * time.Millisecond})
	v := vl.pods.Vault(vl.pod(0))
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(ctx, 30*time.Second, "the real pod unsealed", func(context.Context) error {
		if sealed, _ := vl.sealed(t, vl.pod(0)); sealed {
			return errors.New("sealed")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := Unseal(ctx, vl.env); err != nil {
		t.Fatal(err)
	}
	if _, err := BackupNow(ctx, vl.env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	st := GetStatus(ctx, vl.env)
	stop()
	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 0 {
		t.Fatalf("the rogue pod received %d request(s): %v", len(calls), calls)
	}
	if len(st.Rejected) != 1 || !strings.Contains(strings.Join(st.Attention, "\n"), rogue.Name) {
		t.Fatalf("status does not report the rogue pod: %+v %v", st.Rejected, st.Attention)
	}
	if !strings.Contains(vl.logs.String(), "gets nothing") {
		t.Fatal("the agent did not log the rogue pod")
	}
}
