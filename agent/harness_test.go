package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

func TestMain(m *testing.M) { os.Exit(lab.RunTests(m)) }

// testWaits are the flows' waits in the lab: long enough for a loaded CI machine.
func testWaits() Waits {
	w := DefaultWaits()
	w.Poll = 50 * time.Millisecond
	return w
}

// vaultLab is a namespace with the real hashicorp/vault chart installed by the agent,
// its server pods run as real Vault processes behind the lab's Vault 2.x gate on
// 127.x.y.z, every node reached through a real sshd on loopback, and a configuration
// and environment for all of it.
type vaultLab struct {
	cfg     *configs.Config
	env     *Env
	cs      kubernetes.Interface
	pods    *lab.VaultPods
	kubelet *lab.Kubelet
	dir     string
	logs    *lab.LogBuffer
	log     *slog.Logger
	nodes   int
	release string
}

type labOptions struct {
	nodes        int
	chartVersion string
	tokenPeriod  time.Duration
	noInstall    bool
	// other gives the IP of a pod that is not a server pod (a rogue one).
	other func(*corev1.Pod) string
	// valuesFiles come before the lab's own values file (injector off, TLS off).
	valuesFiles []string
	// podData, by ordinal, is where a pod's Vault keeps its data when not on the
	// configured host_path (a volume the operator wrote elsewhere).
	podData map[int]string
	// configure changes the configuration before the agent's accounts are made for it.
	configure func(*configs.Config)
}

func newVaultLab(t *testing.T, nodes int) *vaultLab {
	return newVaultLabWith(t, labOptions{nodes: nodes})
}

func newVaultLabWith(t *testing.T, o labOptions) *vaultLab {
	t.Helper()
	bins := lab.Need(t)
	cp := lab.SharedControlPlane(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if o.chartVersion == "" {
		o.chartVersion = "0.34.1"
	}
	dir := t.TempDir()
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	rc.QPS, rc.Burst = 50, 100
	cs := kubernetes.NewForConfigOrDie(rc)
	id := lab.RunID()
	ns := "lc-" + id
	// Each test its own release name: the chart's cluster-scoped objects (the server's
	// auth-delegator ClusterRoleBinding) are named after the release.
	release := "vault-" + id

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
	// The lab has no cluster DNS for the injector's webhook (see the demo).
	if err := os.WriteFile(values, []byte("injector: {enabled: false}\nglobal: {tlsDisable: true}\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	cfg := configs.Defaults()
	cfg.SSH.Port = sshd.Port
	cfg.SSH.Identity = configs.SecretRef{File: sshd.ClientKeyPath}
	cfg.SSH.KnownHosts = known
	cfg.Kubernetes.Kubeconfig = configs.SecretRef{File: cp.Kubeconfig}
	cfg.Chart.Path = lab.Chart(o.chartVersion)
	cfg.Chart.Release = release
	cfg.Chart.Namespace = ns
	cfg.Chart.ValuesFiles = append(append([]string(nil), o.valuesFiles...), values)
	cfg.Chart.CacheDir = filepath.Join(dir, "charts")
	cfg.Chart.Timeout = 90 * time.Second
	cfg.Vault.Keyfile = filepath.Join(dir, "state", "unseal.cred")
	cfg.Vault.SystemdCredsKey = "host"
	cfg.Snapshots.Dir = filepath.Join(dir, "snaps")
	cfg.Metrics.Listen = "127.0.0.1:0"
	if o.tokenPeriod > 0 {
		cfg.Vault.TokenPeriod = o.tokenPeriod
	}
	var names []string
	dataDirs := map[string]string{}
	for i := 0; i < o.nodes; i++ {
		name := fmt.Sprintf("%s-n%d", ns, i)
		names = append(names, name)
		cfg.Nodes = append(cfg.Nodes, configs.Node{Name: name, Address: "127.0.0.1", HostPath: filepath.Join(data, fmt.Sprintf("node%d", i), "vault")})
		dataDirs[fmt.Sprintf("%s-%d", release, i)] = cfg.Nodes[i].HostPath
		if d, ok := o.podData[i]; ok {
			dataDirs[fmt.Sprintf("%s-%d", release, i)] = d
		}
	}
	if err := lab.RegisterNodes(ctx, cs, names...); err != nil {
		t.Fatal(err)
	}
	if o.configure != nil {
		o.configure(&cfg)
	}
	// The agent talks to Kubernetes as its own accounts, bound to exactly the roles
	// `pve-vault-agent rbac` prints; the lab's admin only sets them up.
	useAgentAccounts(t, ctx, &cfg, cp.Kubeconfig, cs, dir)
	pods := &lab.VaultPods{Bins: bins, Clients: cs, Release: release, StateDir: filepath.Join(dir, "pods"), IP: lab.LoopbackBase(),
		DataDir: func(p *corev1.Pod) string { return dataDirs[p.Name] }, Other: o.other}
	t.Cleanup(pods.Close)
	k := lab.StartKubelet(cs, ns, pods.Hooks())
	t.Cleanup(k.Stop)
	t.Cleanup(func() {
		for i := 0; i < o.nodes; i++ {
			_ = cs.CoreV1().PersistentVolumes().Delete(context.Background(), fmt.Sprintf("pva-%s-%s-%d", ns, release, i), metav1.DeleteOptions{})
		}
	})
	logs := &lab.LogBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	vl := &vaultLab{cfg: &cfg, cs: cs, pods: pods, kubelet: k, dir: dir, logs: logs, log: log, nodes: o.nodes, release: release}
	vl.env = vl.newEnv()
	t.Cleanup(vl.env.Close)
	if !o.noInstall {
		if _, err := Provision(ctx, vl.env, ProvisionOptions{}); err != nil {
			t.Fatalf("provision: %v\n%s", err, logs.String())
		}
		if _, err := Install(ctx, vl.env, InstallOptions{}); err != nil {
			t.Fatalf("install: %v\n%s", err, tail(logs.String(), 30))
		}
	}
	return vl
}

// useAgentAccounts applies the agent's RBAC manifests for cfg as the lab's admin and
// points cfg at the operate and install accounts' kubeconfigs.
func useAgentAccounts(t *testing.T, ctx context.Context, cfg *configs.Config, adminKubeconfig string, cs kubernetes.Interface, dir string) {
	t.Helper()
	spec, err := RBACSpecFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.Apply(ctx, cs, k8s.RBACObjects(spec)); err != nil {
		t.Fatal(err)
	}
	admin, err := os.ReadFile(adminKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, role := range []string{k8s.RoleOperate, k8s.RoleInstall} {
		kc, err := ServiceAccountKubeconfig(ctx, cfg, admin, role)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, role+".kubeconfig")
		if err := os.WriteFile(p, kc, 0o600); err != nil {
			t.Fatal(err)
		}
		if role == k8s.RoleOperate {
			cfg.Kubernetes.Kubeconfig = configs.SecretRef{File: p}
		} else {
			cfg.Kubernetes.InstallKubeconfig = configs.SecretRef{File: p}
		}
	}
}

// newEnv is a fresh environment for vl's configuration (the daemon builds its own).
func (vl *vaultLab) newEnv() *Env {
	return NewEnv(vl.cfg, vl.log, EnvOptions{Waits: testWaits(), Version: "test"})
}

// pod is pod ordinal i's name.
func (vl *vaultLab) pod(i int) string { return fmt.Sprintf("%s-%d", vl.release, i) }

func (vl *vaultLab) keyfile(t *testing.T) *vault.Keyfile {
	t.Helper()
	kf, err := vault.ReadKeyfile(context.Background(), vl.cfg.Vault.Keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	return kf
}

// node is a client straight to a pod's Vault (through its gate, not the agent).
func (vl *vaultLab) node(t *testing.T, pod string) *vault.Node {
	t.Helper()
	v := vl.pods.Vault(pod)
	if v == nil {
		t.Fatalf("no vault process for %s", pod)
	}
	n, err := vault.NewNode(pod, v.Addr, &http.Client{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sealed reads a pod's seal status directly (not through the agent).
func (vl *vaultLab) sealed(t *testing.T, pod string) (bool, int) {
	t.Helper()
	st, err := vl.node(t, pod).SealStatus(context.Background())
	if err != nil {
		return true, -1
	}
	return st.Sealed, st.Progress
}

// leader waits for the active pod and returns a client to it.
func (vl *vaultLab) leader(t *testing.T, ctx context.Context) *vault.Node {
	t.Helper()
	var n *vault.Node
	if err := lab.WaitFor(ctx, 60*time.Second, "an active node", func(ctx context.Context) error {
		for i := 0; i < vl.nodes; i++ {
			if vl.pods.Vault(vl.pod(i)) == nil {
				continue
			}
			c := vl.node(t, vl.pod(i))
			if h, err := c.Health(ctx); err == nil && h.Active {
				n = c
				return nil
			}
		}
		return errors.New("no active node yet")
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// withRoot runs f with a root token generated from the keyfile's shares, authorised by
// the operator token as Vault 2.x (the lab's gate) requires, and revokes it after.
func withRoot(t *testing.T, ctx context.Context, n *vault.Node, kf *vault.Keyfile, f func(root vault.Token)) {
	t.Helper()
	root, err := n.GenerateRoot(ctx, kf.Keyset, vault.GenerateRootOptions{Auth: kf.OperatorToken})
	if err != nil {
		t.Fatal(err)
	}
	defer n.RevokeSelf(ctx, root)
	f(root)
}

func writeSecret(t *testing.T, ctx context.Context, n *vault.Node, kf *vault.Keyfile, value string) {
	t.Helper()
	withRoot(t, ctx, n, kf, func(root vault.Token) {
		_ = n.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"})
		if err := n.Write(ctx, root, "kv/probe", map[string]any{"value": value}); err != nil {
			t.Fatal(err)
		}
	})
}

func readSecret(t *testing.T, ctx context.Context, n *vault.Node, kf *vault.Keyfile) string {
	t.Helper()
	var v string
	withRoot(t, ctx, n, kf, func(root vault.Token) {
		var err error
		if v, err = n.Read(ctx, root, "kv/probe"); err != nil {
			t.Fatal(err)
		}
	})
	return v
}

// assertNoSecrets scans the logs and every file of the lab for a share or token.
func (vl *vaultLab) assertNoSecrets(t *testing.T, kf *vault.Keyfile, extra ...string) {
	t.Helper()
	all := vl.logs.String() + strings.Join(extra, "\n")
	if vault.ContainsAny(all, kf.Keyset, kf.Tokens()...) {
		t.Fatal("a share or token reached the output")
	}
	_ = filepath.WalkDir(vl.dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil && fi.Size() < 64<<20 && !strings.HasSuffix(p, ".snap") {
			b, _ := os.ReadFile(p)
			if vault.ContainsAny(string(b), kf.Keyset, kf.Tokens()...) {
				t.Errorf("%s holds a plaintext share or token", p)
			}
		}
		return nil
	})
}

// rebuild plays a node rebuild: Vault gone, its data directory emptied, the pod deleted.
func (vl *vaultLab) rebuild(t *testing.T, ctx context.Context, i int) {
	t.Helper()
	if v := vl.pods.Vault(vl.pod(i)); v != nil {
		v.Kill()
	}
	if err := os.RemoveAll(vl.cfg.Nodes[i].HostPath); err != nil {
		t.Fatal(err)
	}
	if err := vl.cs.CoreV1().Pods(vl.cfg.Chart.Namespace).Delete(ctx, vl.pod(i), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
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

// cancelOn cancels when a log record says the given step of a flow finished: an
// interruption at a step boundary, like an operator's Ctrl-C or a killed process.
type cancelOn struct {
	slog.Handler
	flow, step string
	cancel     context.CancelFunc
}

func (c cancelOn) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "step done" {
		var flow, step string
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "flow":
				flow = a.Value.String()
			case "step":
				step = a.Value.String()
			}
			return true
		})
		if flow == c.flow && step == c.step {
			c.cancel()
		}
	}
	return c.Handler.Handle(ctx, r)
}

func (c cancelOn) WithAttrs(as []slog.Attr) slog.Handler {
	return cancelOn{c.Handler.WithAttrs(as), c.flow, c.step, c.cancel}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

var _ = io.Discard

// stepNamed is the flow's step of that name.
func stepNamed[S any](t *testing.T, steps []step[S], name string) step[S] {
	t.Helper()
	for _, st := range steps {
		if st.name == name {
			return st
		}
	}
	t.Fatalf("no step %q", name)
	return step[S]{}
}

// resultNamed is the result of the step of that name.
func resultNamed(t *testing.T, steps []StepResult, name string) StepResult {
	t.Helper()
	for _, st := range steps {
		if st.Name == name {
			return st
		}
	}
	t.Fatalf("no step %q in %+v", name, steps)
	return StepResult{}
}
