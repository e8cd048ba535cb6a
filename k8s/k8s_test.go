package k8s

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/repo"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

func TestMain(m *testing.M) { os.Exit(lab.RunTests(m)) }

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type env struct {
	cp    *lab.ControlPlane
	c     *Cluster
	ns    string
	nodes []string
	chart *chart.Chart
	// hostPath is the directory the local volumes of storage name.
	hostPath string
}

// newEnv connects to the shared control plane with a fresh namespace and three
// registered nodes, and starts the lab kubelet for the namespace.
func newEnv(t *testing.T) *env {
	t.Helper()
	cp := lab.SharedControlPlane(t)
	ctx := ctxFor(t, time.Minute)
	ns := "t-" + strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
	if len(ns) > 50 {
		ns = ns[:50]
	}
	ns = strings.TrimRight(ns, "-") + "-" + lab.RunID()
	c, err := Connect(ctx, ClusterConfig{Kubeconfig: readFile(t, cp.Kubeconfig), Source: cp.Kubeconfig, Namespace: ns}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Clients.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	nodes := []string{ns + "-n0", ns + "-n1", ns + "-n2"}
	if err := lab.RegisterNodes(ctx, c.Clients, nodes...); err != nil {
		t.Fatal(err)
	}
	k := lab.StartKubelet(c.Clients, ns, lab.PodHooks{})
	t.Cleanup(func() {
		k.Stop()
		for _, err := range k.Errors() {
			t.Errorf("lab kubelet: %v", err)
		}
	})
	ch, err := LoadChart(ChartSource{Path: lab.Chart("0.34.1")})
	if err != nil {
		t.Fatal(err)
	}
	return &env{cp: cp, c: c, ns: ns, nodes: nodes, chart: ch}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// values is a Raft cluster on e's nodes as the real chart takes it (typed as a values
// file types it), plus extra. The chart's injector and its server auth-delegator
// ClusterRoleBinding are off: both are cluster-scoped objects named after the release,
// which would collide between the tests' namespaces, and none of these tests is about them.
func (e *env) values(t *testing.T, replicas int, extra map[string]any) map[string]any {
	t.Helper()
	v := map[string]any{"fullnameOverride": "vault", "injector": map[string]any{"enabled": false}, "server": map[string]any{
		"uid": 100, "gid": 100, "updateStrategyType": "OnDelete", "authDelegator": map[string]any{"enabled": false},
		"dataStorage": map[string]any{"storageClass": StorageClassName(e.ns, "vault"), "size": "1Gi"},
		"ha":          map[string]any{"enabled": true, "replicas": replicas, "raft": map[string]any{"enabled": true, "setNodeId": true}},
		"statefulSet": map[string]any{"securityContext": map[string]any{"pod": map[string]any{"runAsUser": 100, "runAsGroup": 100, "fsGroup": 100, "runAsNonRoot": true}}},
	}}
	typed, err := AsValuesFile(mergeMaps(v, extra))
	if err != nil {
		t.Fatal(err)
	}
	return typed
}

func (e *env) storage(t *testing.T, ctx context.Context, replicas int) {
	t.Helper()
	// The directory each local volume names, made as provisioning would: the kubelet
	// mounts no local volume whose path is missing.
	e.hostPath = filepath.Join(lab.TestDataDir(t), "vault")
	if err := os.MkdirAll(e.hostPath, 0o700); err != nil {
		t.Fatal(err)
	}
	var vols []Volume
	for i := 0; i < replicas; i++ {
		vols = append(vols, Volume{Node: e.nodes[i], Path: e.hostPath})
	}
	if _, err := e.c.EnsureStorage(ctx, StorageSpec{Release: "vault", Size: "1Gi", Volumes: vols}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for i := range vols {
			_ = e.c.Clients.CoreV1().PersistentVolumes().Delete(context.Background(), PVName(e.ns, "vault", i), metav1.DeleteOptions{})
		}
	})
}

func TestInstallFreshIdempotentUpgradeAndRoll(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 3*time.Minute)
	e.storage(t, ctx, 3)

	t0 := time.Now()
	res, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 3, nil), Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("install took %s", time.Since(t0).Round(time.Millisecond))
	if res.Action != Installed || res.Revision != 1 {
		t.Fatalf("first install %+v", res)
	}
	pods, err := e.c.WaitRunning(ctx, "vault", 3, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("install → 3 pods running took %s", time.Since(t0).Round(time.Millisecond))
	for i, p := range pods {
		if p.Node != e.nodes[i] {
			t.Errorf("pod %s on %s, want %s (where its data is)", p.Name, p.Node, e.nodes[i])
		}
		pvc, err := e.c.Clients.CoreV1().PersistentVolumeClaims(e.ns).Get(ctx, ClaimName("vault", i), metav1.GetOptions{})
		if err != nil || pvc.Spec.VolumeName != PVName(e.ns, "vault", i) {
			t.Errorf("claim %d bound to %v (%v)", i, pvc.Spec.VolumeName, err)
		}
	}
	sts, err := e.c.Clients.AppsV1().StatefulSets(e.ns).Get(ctx, "vault", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sc := sts.Spec.Template.Spec.SecurityContext
	if string(sts.Spec.UpdateStrategy.Type) != "OnDelete" || *sc.RunAsUser != 100 || *sc.FSGroup != 100 {
		t.Fatalf("statefulset strategy %s securityContext %+v", sts.Spec.UpdateStrategy.Type, sc)
	}
	internal, err := e.c.Clients.CoreV1().Services(e.ns).Get(ctx, "vault-internal", metav1.GetOptions{})
	if err != nil || !internal.Spec.PublishNotReadyAddresses {
		t.Fatalf("vault-internal %v", err)
	}
	pv, err := e.c.Clients.CoreV1().PersistentVolumes().Get(ctx, PVName(e.ns, "vault", 1), metav1.GetOptions{})
	if err != nil || pv.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimRetain || pv.Spec.Local == nil || pv.Spec.Local.Path != e.hostPath {
		t.Fatalf("pv %+v %v", pv.Spec, err)
	}

	t0 = time.Now()
	res, err = e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 3, nil), Timeout: time.Minute})
	if err != nil || res.Action != Unchanged || res.Revision != 1 {
		t.Fatalf("re-run: %+v %v", res, err)
	}
	t.Logf("no-op re-run took %s", time.Since(t0).Round(time.Millisecond))

	// A value that changes the pod template: a new revision; the pods (OnDelete) stay on
	// the old one until the agent replaces them, one at a time.
	changed := e.values(t, 3, map[string]any{"server": map[string]any{"resources": map[string]any{"requests": map[string]any{"cpu": "100m", "memory": "256Mi"}}}})
	res, err = e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: changed, Timeout: time.Minute})
	if err != nil || res.Action != Upgraded || res.Revision != 2 {
		t.Fatalf("upgrade: %+v %v", res, err)
	}
	if !reflect.DeepEqual(res.Changes, []ObjectChange{{"StatefulSet/vault", "changed"}}) {
		t.Fatalf("changes %+v", res.Changes)
	}
	target, err := e.c.UpdateRevision(ctx, "vault", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	before, _, err := e.c.ServerPods(ctx, "vault")
	if err != nil || len(before) != 3 {
		t.Fatalf("server pods %v %v", before, err)
	}
	for _, p := range before {
		if p.Revision == target {
			t.Fatalf("%s is on the new revision before it was replaced", p.Name)
		}
	}
	if err := e.c.DeletePod(ctx, before[2]); err != nil {
		t.Fatal(err)
	}
	np, err := e.c.WaitReplaced(ctx, "vault", before[2], time.Minute)
	if err != nil || np.Revision != target || np.UID == before[2].UID || np.Node != e.nodes[2] {
		t.Fatalf("replaced %+v %v", np, err)
	}
	// The UID precondition: deleting the old incarnation again leaves the new one alone.
	if err := e.c.DeletePod(ctx, before[2]); err != nil {
		t.Fatal(err)
	}
	after, _, _ := e.c.ServerPods(ctx, "vault")
	if len(after) != 3 || after[2].UID != np.UID || after[2].Terminating {
		t.Fatalf("a stale delete touched the new pod: %+v", after)
	}
}

// Labels prove nothing: only the release StatefulSet's own pods, named <release>-N
// below its replica count and on the node their volume pins, are server pods. Anyone who
// can create a pod in the namespace can copy the labels; that pod must get nothing.
func TestServerPodsIdentity(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 2*time.Minute)
	e.storage(t, ctx, 1)
	if _, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.WaitRunning(ctx, "vault", 1, time.Minute); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app.kubernetes.io/name": "vault", "app.kubernetes.io/instance": "vault", "component": "server"}
	rogue := func(name string) {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "vault", Image: "evil"}}}}
		if _, err := e.c.Clients.CoreV1().Pods(e.ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Unowned, not an ordinal name: once it sorted first (ordinal -1) and received the
	// shares. (An ordinal name like vault-7 would be adopted by the StatefulSet
	// controller and deleted as an excess replica before anything could talk to it.)
	rogue("vault-rogue")
	if err := lab.WaitFor(ctx, 30*time.Second, "rogue pods running", func(ctx context.Context) error {
		list, err := e.c.Clients.CoreV1().Pods(e.ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		running := 0
		var states []string
		for _, p := range list.Items {
			if p.Status.Phase == corev1.PodRunning {
				running++
			}
			states = append(states, fmt.Sprintf("%s %s on %q", p.Name, p.Status.Phase, p.Spec.NodeName))
		}
		if running != 2 {
			return fmt.Errorf("%d of 2 pods running: %v", running, states)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	pods, rejected, err := e.c.ServerPods(ctx, "vault")
	if err != nil {
		t.Fatal(err)
	}
	if len(pods) != 1 || pods[0].Name != "vault-0" || pods[0].ServerName != "vault-0.vault-internal" {
		t.Fatalf("server pods %+v", pods)
	}
	got := map[string]string{}
	for _, r := range rejected {
		got[r.Name] = r.Reason
	}
	if len(got) != 1 || !strings.Contains(got["vault-rogue"], "not controlled by StatefulSet vault") {
		t.Fatalf("rejected %v", got)
	}
}
func TestDryRunChangesNothing(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 2*time.Minute)
	e.storage(t, ctx, 1)
	res, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute, DryRun: true})
	if err != nil || res.Action != Installed || !res.DryRun {
		t.Fatalf("dry-run install %+v %v", res, err)
	}
	if _, err := e.c.Clients.AppsV1().StatefulSets(e.ns).Get(ctx, "vault", metav1.GetOptions{}); err == nil {
		t.Fatal("dry run created the StatefulSet")
	}
	if _, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	res, err = e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, map[string]any{"server": map[string]any{"ha": map[string]any{"raft": map[string]any{"config": "storage \"raft\" {}\n"}}}}), Timeout: time.Minute, DryRun: true})
	if err != nil || res.Action != Upgraded {
		t.Fatalf("dry-run upgrade %+v %v", res, err)
	}
	// The real chart puts the server config in a ConfigMap the pod template does not
	// checksum: only the ConfigMap changes (the agent adds a checksum annotation itself).
	want := []ObjectChange{{"ConfigMap/vault-config", "changed"}}
	if !reflect.DeepEqual(res.Changes, want) {
		t.Fatalf("changes %+v", res.Changes)
	}
	cfg, _ := e.c.helm()
	hist, err := action.NewHistory(cfg).Run("vault")
	if err != nil || len(hist) != 1 {
		t.Fatalf("history after dry run: %d revisions, %v", len(hist), err)
	}
}

func TestStuckReleasesAreRecovered(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 2*time.Minute)
	e.storage(t, ctx, 1)
	// Pending revisions here were abandoned long ago: nobody works on them any more.
	later := func() time.Time { return time.Now().Add(time.Hour) }
	spec := InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute, Now: later}
	cfg, err := e.c.helm()
	if err != nil {
		t.Fatal(err)
	}
	mark := func(status release.Status) {
		t.Helper()
		last, err := cfg.Releases.Last("vault")
		if err != nil {
			t.Fatal(err)
		}
		last.SetStatus(status, "interrupted by the test")
		if err := cfg.Releases.Update(last); err != nil {
			t.Fatal(err)
		}
	}

	// First install interrupted: nothing good to go back to.
	if _, err := e.c.Install(ctx, spec); err != nil {
		t.Fatal(err)
	}
	mark(release.StatusPendingInstall)
	res, err := e.c.Install(ctx, spec)
	if err != nil || res.Action != Installed || !strings.Contains(res.Recovered, "pending-install") {
		t.Fatalf("pending-install: %+v %v", res, err)
	}

	// An upgrade interrupted: roll back to the last good revision, then upgrade.
	spec.Values = e.values(t, 1, map[string]any{"server": map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "512Mi"}}}})
	if _, err := e.c.Install(ctx, spec); err != nil {
		t.Fatal(err)
	}
	mark(release.StatusPendingUpgrade)
	spec.Values = e.values(t, 1, map[string]any{"server": map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "1Gi"}}}})
	res, err = e.c.Install(ctx, spec)
	if err != nil || res.Action != Upgraded || !strings.Contains(res.Recovered, "rolled back to revision 1") {
		t.Fatalf("pending-upgrade: %+v %v", res, err)
	}
	last, err := cfg.Releases.Last("vault")
	if err != nil || last.Info.Status != release.StatusDeployed {
		t.Fatalf("after recovery: %v %v", last.Info.Status, err)
	}

	// A failed revision is upgraded over.
	mark(release.StatusFailed)
	res, err = e.c.Install(ctx, spec)
	if err != nil || res.Action != Upgraded || !strings.Contains(res.Recovered, "failed") {
		t.Fatalf("failed: %+v %v", res, err)
	}
}

func TestConnectErrors(t *testing.T) {
	cp := lab.SharedControlPlane(t)
	ctx := ctxFor(t, time.Minute)
	_, err := Connect(ctx, ClusterConfig{Source: "file /nowhere", Namespace: "vault"}, quiet)
	if !errors.Is(err, ErrNoKubeconfig) || !strings.Contains(err.Error(), "kubernetes.kubeconfig") {
		t.Fatalf("empty kubeconfig: %v", err)
	}
	if _, err := Connect(ctx, ClusterConfig{Kubeconfig: []byte("not: [a kubeconfig"), Source: "file /k", Namespace: "vault"}, quiet); !errors.Is(err, ErrNoKubeconfig) {
		t.Fatalf("garbage kubeconfig: %v", err)
	}
	b := readFile(t, cp.Kubeconfig)
	dead := []byte(strings.Replace(string(b), cp.Server, "https://127.0.0.1:1", 1))
	_, err = Connect(ctx, ClusterConfig{Kubeconfig: dead, Namespace: "vault", Timeout: 3 * time.Second}, quiet)
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "https://127.0.0.1:1") {
		t.Fatalf("unreachable: %v", err)
	}
	_, err = Connect(ctx, ClusterConfig{Kubeconfig: b, Context: "nope", Namespace: "vault"}, quiet)
	if err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("unknown context: %v", err)
	}
}

// A chart repository on loopback serves the real chart like
// helm.releases.hashicorp.com does; the pinned version is downloaded once and then used
// from the cache; a pinned digest refuses anything else.
func TestLoadChartFromRepositoryAndCache(t *testing.T) {
	repoDir := t.TempDir()
	archive := filepath.Join(repoDir, "vault-0.34.1.tgz")
	if err := os.WriteFile(archive, readFile(t, lab.Chart("0.34.1")), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.FileServer(http.Dir(repoDir)))
	defer srv.Close()
	idx, err := repo.IndexDirectory(repoDir, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if err := idx.WriteFile(filepath.Join(repoDir, "index.yaml"), 0o644); err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	const digest = "sha256:ccf77d0548030ed1e74b43ee46e0ca89966b782df012831c72118a96eb1508e4" // internal/lab/testdata/charts/README.md
	src := ChartSource{Repository: srv.URL, Name: "vault", Version: "0.34.1", Digest: digest, CacheDir: cache}
	got, err := LoadChart(src)
	if err != nil {
		t.Fatal(err)
	}
	if got.Metadata.Version != "0.34.1" || got.Metadata.AppVersion != "2.0.4" {
		t.Fatalf("version %s (app %s)", got.Metadata.Version, got.Metadata.AppVersion)
	}
	srv.Close()
	if _, err := LoadChart(src); err != nil {
		t.Fatalf("cached chart with the repository gone: %v", err)
	}
	// A tampered cache entry is refused and dropped.
	cached, _ := filepath.Glob(filepath.Join(cache, "*", "vault-0.34.1.tgz"))
	if len(cached) != 1 {
		t.Fatalf("cache holds %v", cached)
	}
	f, _ := os.OpenFile(cached[0], os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte("tampered"))
	f.Close()
	if _, err := LoadChart(src); !errors.Is(err, ErrChart) || !strings.Contains(err.Error(), "digest") {
		t.Fatalf("tampered cache: %v", err)
	}
	if _, err := os.Stat(cached[0]); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the tampered archive was kept")
	}

	for _, bad := range []ChartSource{
		{Path: filepath.Join(t.TempDir(), "nope")},
		{Repository: srv.URL, Name: "vault", Version: "9.9.9", CacheDir: t.TempDir()},
		{Repository: "https://127.0.0.1:1/charts", Name: "vault", Version: "0.34.1", CacheDir: t.TempDir()},
		{Repository: "https://127.0.0.1:1/charts", Name: "../../etc/vault", Version: "0.34.1", CacheDir: t.TempDir()},
		{Path: lab.Chart("0.33.0"), Digest: digest},
	} {
		if _, err := LoadChart(bad); !errors.Is(err, ErrChart) {
			t.Errorf("%s: %v, want ErrChart", bad, err)
		}
	}
}

func TestWaitRunningNamesTheStuckPod(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 2*time.Minute)
	// No storage applied: the PVC cannot bind and the pod is never scheduled.
	if _, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	_, err := e.c.WaitRunning(ctx, "vault", 1, 3*time.Second)
	if !errors.Is(err, ErrPodsNotRunning) || !strings.Contains(err.Error(), "vault-0") || !strings.Contains(err.Error(), "PVC data-vault-0 is Pending") {
		t.Fatalf("err %v", err)
	}
}

// A pending revision young enough that another operation may still be writing it is
// left alone; an old one is repaired.
func TestPendingReleaseNobodyWorksOnIsRepaired(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 2*time.Minute)
	e.storage(t, ctx, 1)
	spec := InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(t, 1, nil), Timeout: time.Minute}
	if _, err := e.c.Install(ctx, spec); err != nil {
		t.Fatal(err)
	}
	cfg, _ := e.c.helm()
	last, _ := cfg.Releases.Last("vault")
	last.SetStatus(release.StatusPendingUpgrade, "another install is working on it")
	if err := cfg.Releases.Update(last); err != nil {
		t.Fatal(err)
	}
	spec.Values = e.values(t, 1, map[string]any{"server": map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "1Gi"}}}})
	if _, err := e.c.Install(ctx, spec); !errors.Is(err, ErrReleaseBusy) {
		t.Fatalf("a young pending revision: %v", err)
	}
	spec.Now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	if res, err := e.c.Install(ctx, spec); err != nil || !strings.Contains(res.Recovered, "pending-upgrade") {
		t.Fatalf("an abandoned pending revision: %+v %v", res, err)
	}
}
