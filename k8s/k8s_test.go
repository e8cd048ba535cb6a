package k8s

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
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
	ns = strings.TrimRight(ns, "-")
	c, err := Connect(ctx, ClusterConfig{Kubeconfig: cp.Kubeconfig, Namespace: ns}, quiet)
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
	ch, err := LoadChart(ChartSource{Path: "testdata/vault-chart"})
	if err != nil {
		t.Fatal(err)
	}
	return &env{cp: cp, c: c, ns: ns, nodes: nodes, chart: ch}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// values is what the agent enforces for a Raft cluster on e's nodes, plus extra.
func (e *env) values(replicas int, extra map[string]any) map[string]any {
	v := map[string]any{"server": map[string]any{
		"uid": 100, "gid": 100,
		"dataStorage": map[string]any{"storageClass": StorageClassName(e.ns, "vault"), "size": "1Gi"},
		"ha":          map[string]any{"enabled": true, "replicas": replicas, "raft": map[string]any{"enabled": true, "setNodeId": true}},
		"statefulSet": map[string]any{"securityContext": map[string]any{"pod": map[string]any{"runAsUser": 100, "runAsGroup": 100, "fsGroup": 100, "runAsNonRoot": true}}},
	}}
	return mergeMaps(v, extra)
}

func (e *env) storage(t *testing.T, ctx context.Context, replicas int) {
	t.Helper()
	var vols []Volume
	for i := 0; i < replicas; i++ {
		vols = append(vols, Volume{Node: e.nodes[i], Path: "/srv/vault"})
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
	res, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(3, nil), Timeout: time.Minute})
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
	if err != nil || pv.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimRetain || pv.Spec.Local == nil || pv.Spec.Local.Path != "/srv/vault" {
		t.Fatalf("pv %+v %v", pv.Spec, err)
	}

	t0 = time.Now()
	res, err = e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(3, nil), Timeout: time.Minute})
	if err != nil || res.Action != Unchanged || res.Revision != 1 {
		t.Fatalf("re-run: %+v %v", res, err)
	}
	t.Logf("no-op re-run took %s", time.Since(t0).Round(time.Millisecond))
	if _, err := e.c.Roll(ctx, "vault", time.Minute, func(context.Context, Pod) error { return errors.New("nothing should roll") }); err != nil {
		t.Fatalf("roll with nothing to do: %v", err)
	}

	// A value that changes the pod template: upgrade, then roll one pod at a time.
	changed := e.values(3, map[string]any{"server": map[string]any{"resources": map[string]any{"requests": map[string]any{"cpu": "100m", "memory": "256Mi"}}}})
	res, err = e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: changed, Timeout: time.Minute})
	if err != nil || res.Action != Upgraded || res.Revision != 2 {
		t.Fatalf("upgrade: %+v %v", res, err)
	}
	if !reflect.DeepEqual(res.Changes, []ObjectChange{{"StatefulSet/vault", "changed"}}) {
		t.Fatalf("changes %+v", res.Changes)
	}
	var mu sync.Mutex
	var order []string
	rolled, err := e.c.Roll(ctx, "vault", time.Minute, func(ctx context.Context, p Pod) error {
		mu.Lock()
		defer mu.Unlock()
		order = append(order, p.Name)
		// One at a time: every other pod is running while this one is handed over.
		all, err := e.c.Pods(ctx, "vault")
		if err != nil {
			return err
		}
		running := 0
		for _, q := range all {
			if q.Phase == "Running" {
				running++
			}
		}
		if running != 3 {
			return errors.New("another pod is down during the roll")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"vault-2", "vault-1", "vault-0"}; !reflect.DeepEqual(rolled, want) || !reflect.DeepEqual(order, want) {
		t.Fatalf("rolled %v, callbacks %v", rolled, order)
	}
	again, err := e.c.Roll(ctx, "vault", time.Minute, nil)
	if err != nil || len(again) != 0 {
		t.Fatalf("second roll %v %v", again, err)
	}
}

func TestDryRunChangesNothing(t *testing.T) {
	e := newEnv(t)
	ctx := ctxFor(t, 2*time.Minute)
	e.storage(t, ctx, 1)
	res, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(1, nil), Timeout: time.Minute, DryRun: true})
	if err != nil || res.Action != Installed || !res.DryRun {
		t.Fatalf("dry-run install %+v %v", res, err)
	}
	if _, err := e.c.Clients.AppsV1().StatefulSets(e.ns).Get(ctx, "vault", metav1.GetOptions{}); err == nil {
		t.Fatal("dry run created the StatefulSet")
	}
	if _, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(1, nil), Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	res, err = e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(1, map[string]any{"server": map[string]any{"ha": map[string]any{"raft": map[string]any{"config": "storage \"raft\" {}\n"}}}}), Timeout: time.Minute, DryRun: true})
	if err != nil || res.Action != Upgraded {
		t.Fatalf("dry-run upgrade %+v %v", res, err)
	}
	want := []ObjectChange{{"ConfigMap/vault-config", "changed"}, {"StatefulSet/vault", "changed"}}
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
	spec := InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(1, nil), Timeout: time.Minute}
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
	spec.Values = e.values(1, map[string]any{"server": map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "512Mi"}}}})
	if _, err := e.c.Install(ctx, spec); err != nil {
		t.Fatal(err)
	}
	mark(release.StatusPendingUpgrade)
	spec.Values = e.values(1, map[string]any{"server": map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "1Gi"}}}})
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
	_, err := Connect(ctx, ClusterConfig{Kubeconfig: filepath.Join(t.TempDir(), "missing"), Namespace: "vault"}, quiet)
	if !errors.Is(err, ErrNoKubeconfig) || !strings.Contains(err.Error(), "kubernetes.kubeconfig") {
		t.Fatalf("missing kubeconfig: %v", err)
	}
	b, err := os.ReadFile(cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	dead := filepath.Join(t.TempDir(), "kubeconfig")
	os.WriteFile(dead, []byte(strings.Replace(string(b), cp.Server, "https://127.0.0.1:1", 1)), 0o600)
	_, err = Connect(ctx, ClusterConfig{Kubeconfig: dead, Namespace: "vault", Timeout: 3 * time.Second}, quiet)
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "https://127.0.0.1:1") {
		t.Fatalf("unreachable: %v", err)
	}
	_, err = Connect(ctx, ClusterConfig{Kubeconfig: cp.Kubeconfig, Context: "nope", Namespace: "vault"}, quiet)
	if err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("unknown context: %v", err)
	}
}

// A chart repository on loopback serves the chart like helm.releases.hashicorp.com does;
// the pinned version is downloaded once and then used from the cache.
func TestLoadChartFromRepositoryAndCache(t *testing.T) {
	ch, err := LoadChart(ChartSource{Path: "testdata/vault-chart"})
	if err != nil {
		t.Fatal(err)
	}
	repoDir := t.TempDir()
	archive, err := chartutil.Save(ch, repoDir)
	if err != nil {
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
	src := ChartSource{Repository: srv.URL, Name: "vault", Version: "0.0.1-lab", CacheDir: cache}
	got, err := LoadChart(src)
	if err != nil {
		t.Fatal(err)
	}
	if got.Metadata.Version != "0.0.1-lab" {
		t.Fatalf("version %s", got.Metadata.Version)
	}
	srv.Close()
	if _, err := LoadChart(src); err != nil {
		t.Fatalf("cached chart with the repository gone: %v", err)
	}
	_ = archive

	for _, bad := range []ChartSource{
		{Path: filepath.Join(t.TempDir(), "nope")},
		{Repository: srv.URL, Name: "vault", Version: "9.9.9", CacheDir: t.TempDir()},
		{Repository: "https://127.0.0.1:1/charts", Name: "vault", Version: "0.0.1-lab", CacheDir: t.TempDir()},
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
	if _, err := e.c.Install(ctx, InstallSpec{Release: "vault", Chart: e.chart, Values: e.values(1, nil), Timeout: time.Minute}); err != nil {
		t.Fatal(err)
	}
	_, err := e.c.WaitRunning(ctx, "vault", 1, 3*time.Second)
	if !errors.Is(err, ErrPodsNotRunning) || !strings.Contains(err.Error(), "vault-0") || !strings.Contains(err.Error(), "PVC data-vault-0 is Pending") {
		t.Fatalf("err %v", err)
	}
}
