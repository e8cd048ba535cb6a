package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/repo"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"
)

// Flux is the real Flux source-controller and helm-controller (the pair Flux 2.7
// ships), run against the lab's API server as their own processes, watching one
// namespace (RUNTIME_NAMESPACE, as Flux's own manifests set it), with source-controller
// serving its artifacts on loopback. ChartRepo is an HTTP Helm chart repository on
// loopback (an index.yaml and the real chart archives), what helm.releases.hashicorp.com
// is to a real cluster.
type Flux struct {
	Namespace string
	ChartRepo string
	Source    *Process
	Helm      *Process
	dir       string
	repo      *http.Server
}

// fluxCRDs records the API servers Flux's CRDs were installed into.
var fluxCRDs struct {
	sync.Mutex
	done map[string]bool
}

// StartFlux installs Flux's CRDs into cp (once per control plane), creates namespace ns,
// and starts the chart repository and both controllers until the test ends.
func StartFlux(t testing.TB, bins Bins, cp *ControlPlane, ns string) *Flux {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f, err := startFlux(ctx, bins, cp, ns, t.TempDir())
	if f != nil {
		t.Cleanup(f.Close)
	}
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func startFlux(ctx context.Context, bins Bins, cp *ControlPlane, ns, dir string) (*Flux, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		return nil, err
	}
	if err := installFluxCRDs(ctx, rc, bins.FluxCRDs); err != nil {
		return nil, err
	}
	nsDoc := fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n", ns)
	if err := ApplyManifests(ctx, rc, nsDoc); err != nil {
		return nil, err
	}
	f := &Flux{Namespace: ns, dir: dir}
	if err := f.serveCharts(); err != nil {
		return f, err
	}
	var ports [5]int // source: storage, metrics, health; helm: metrics, health
	for i := range ports {
		if ports[i], err = FreePort("127.0.0.1"); err != nil {
			return f, err
		}
	}
	addr := func(i int) string { return "127.0.0.1:" + strconv.Itoa(ports[i]) }
	env := []string{"KUBECONFIG=" + cp.Kubeconfig, "RUNTIME_NAMESPACE=" + ns}
	srcHealth, helmHealth := addr(2), addr(4)
	if err := os.MkdirAll(filepath.Join(dir, "artifacts"), 0o700); err != nil {
		return f, err
	}
	f.Source, err = startProcess("source-controller", filepath.Join(dir, "source-controller.log"), bins.SourceController, []string{
		"--watch-all-namespaces=false", "--storage-path=" + filepath.Join(dir, "artifacts"),
		"--storage-addr=" + addr(0), "--storage-adv-addr=" + addr(0),
		"--metrics-addr=" + addr(1), "--health-addr=" + srcHealth, "--log-level=debug",
	}, nil, env)
	if err != nil {
		return f, err
	}
	f.Helm, err = startProcess("helm-controller", filepath.Join(dir, "helm-controller.log"), bins.HelmController, []string{
		"--watch-all-namespaces=false", "--metrics-addr=" + addr(3), "--health-addr=" + helmHealth, "--log-level=debug",
	}, nil, env)
	if err != nil {
		return f, err
	}
	for _, c := range []struct {
		p      *Process
		health string
	}{{f.Source, srcHealth}, {f.Helm, helmHealth}} {
		err := WaitFor(ctx, 90*time.Second, c.p.Name+" ready", func(ctx context.Context) error {
			if err := c.p.errIfExited(); err != nil {
				return Permanent(fmt.Errorf("%w\n%s", err, c.p.Tail(20)))
			}
			return httpOK(ctx, http.DefaultClient, "http://"+c.health+"/readyz")
		})
		if err != nil {
			return f, err
		}
	}
	return f, nil
}

// serveCharts serves the lab's real chart archives with an index.yaml on loopback.
func (f *Flux) serveCharts() error {
	dir := filepath.Join(f.dir, "charts")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, v := range []string{"0.33.0", "0.34.1"} {
		b, err := os.ReadFile(Chart(v))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "vault-"+v+".tgz"), b, 0o644); err != nil {
			return err
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	f.ChartRepo = "http://" + l.Addr().String()
	idx, err := repo.IndexDirectory(dir, f.ChartRepo)
	if err != nil {
		l.Close()
		return err
	}
	if err := idx.WriteFile(filepath.Join(dir, "index.yaml"), 0o644); err != nil {
		l.Close()
		return err
	}
	f.repo = &http.Server{Handler: http.FileServer(http.Dir(dir)), ReadHeaderTimeout: 10 * time.Second}
	go f.repo.Serve(l)
	return nil
}

// Close stops both controllers and the chart repository.
func (f *Flux) Close() {
	for _, p := range []*Process{f.Helm, f.Source} {
		if p != nil {
			p.Stop()
		}
	}
	if f.repo != nil {
		f.repo.Close()
	}
}

// Logs is the tail of both controllers' logs, for a failing test.
func (f *Flux) Logs(n int) string {
	var b strings.Builder
	for _, p := range []*Process{f.Source, f.Helm} {
		if p != nil {
			fmt.Fprintf(&b, "--- %s\n%s\n", p.Name, p.Tail(n))
		}
	}
	return b.String()
}

// HelmControllerLog is helm-controller's whole log.
func (f *Flux) HelmControllerLog() string {
	b, _ := os.ReadFile(f.Helm.LogPath)
	return string(b)
}

// installFluxCRDs applies every CRD in dir once per API server and waits until each is
// Established.
func installFluxCRDs(ctx context.Context, rc *rest.Config, dir string) error {
	fluxCRDs.Lock()
	defer fluxCRDs.Unlock()
	if fluxCRDs.done[rc.Host] {
		return nil
	}
	if err := applyCRDs(ctx, rc, dir); err != nil {
		return err
	}
	if fluxCRDs.done == nil {
		fluxCRDs.done = map[string]bool{}
	}
	fluxCRDs.done[rc.Host] = true
	return nil
}

func applyCRDs(ctx context.Context, rc *rest.Config, dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no Flux CRDs in %s (make lab-bins): %v", dir, err)
	}
	dc, err := dynamic.NewForConfig(rc)
	if err != nil {
		return err
	}
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		var obj map[string]any
		if err := yaml.Unmarshal(b, &obj); err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		u := &unstructured.Unstructured{Object: obj}
		body, err := u.MarshalJSON()
		if err != nil {
			return err
		}
		force := true
		if _, err := dc.Resource(crdGVR).Patch(ctx, u.GetName(), types.ApplyPatchType, body, metav1.PatchOptions{FieldManager: "pva-lab", Force: &force}); err != nil {
			return fmt.Errorf("apply CRD %s: %w", u.GetName(), err)
		}
		err = WaitFor(ctx, 60*time.Second, "CRD "+u.GetName()+" established", func(ctx context.Context) error {
			cur, err := dc.Resource(crdGVR).Get(ctx, u.GetName(), metav1.GetOptions{})
			if err != nil {
				return err
			}
			conds, _, _ := unstructured.NestedSlice(cur.Object, "status", "conditions")
			for _, c := range conds {
				if m, _ := c.(map[string]any); m["type"] == "Established" && m["status"] == "True" {
					return nil
				}
			}
			return errors.New("not established yet")
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// ApplyManifests server-side applies a YAML stream as kubectl apply --server-side
// --field-manager=kustomize-controller would (the lab's stand-in for Flux's
// kustomize-controller applying a git directory): every document, with the API
// server's strict field validation, so an unknown or misspelt field is refused.
func ApplyManifests(ctx context.Context, rc *rest.Config, stream string) error {
	dc, err := dynamic.NewForConfig(rc)
	if err != nil {
		return err
	}
	disc, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disc))
	for _, doc := range strings.Split(stream, "\n---\n") {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			return fmt.Errorf("decode a manifest: %w", err)
		}
		u := &unstructured.Unstructured{Object: obj}
		gvk := u.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("%s %s: %w", gvk.Kind, u.GetName(), err)
		}
		var ri dynamic.ResourceInterface = dc.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dc.Resource(m.Resource).Namespace(u.GetNamespace())
		}
		body, err := u.MarshalJSON()
		if err != nil {
			return err
		}
		force := true
		if _, err := ri.Patch(ctx, u.GetName(), types.ApplyPatchType, body, metav1.PatchOptions{FieldManager: "kustomize-controller", Force: &force, FieldValidation: "Strict"}); err != nil {
			return fmt.Errorf("apply %s %s/%s: %w", gvk.Kind, u.GetNamespace(), u.GetName(), err)
		}
	}
	return nil
}
