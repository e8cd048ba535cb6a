package agent

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	helmv2 "github.com/fluxcd/helm-controller/api/v2"
	sourcev1 "github.com/fluxcd/source-controller/api/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	sigyaml "sigs.k8s.io/yaml"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// renderConfig is a Flux-managed configuration with a values file of the write-up's kind.
func renderConfig(t *testing.T) *configs.Config {
	t.Helper()
	cfg := cfgWithNodes(3)
	cfg.Install.ManagedBy = configs.ManagedByFlux
	cfg.Install.HelmRelease = "flux-system/vault"
	values := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(values, []byte("injector: {enabled: false}\nui: {enabled: true}\nserver:\n  dataStorage: {size: 2Gi}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Chart.ValuesFiles = []string{values}
	return cfg
}

func renderedFile(t *testing.T, files []RenderedFile, name string) []byte {
	t.Helper()
	for _, f := range files {
		if f.Name == name {
			return f.Content
		}
	}
	t.Fatalf("render wrote no %s", name)
	return nil
}

// What render --flux writes decodes strictly (no unknown field) into Flux's own API
// types, helm-controller v1.4 and source-controller v1.7, and carries exactly the
// values install would apply.
func TestRenderFluxDecodesIntoFluxTypes(t *testing.T) {
	cfg := renderConfig(t)
	files, err := Render(cfg, RenderOptions{Flux: true})
	if err != nil {
		t.Fatal(err)
	}
	// What install would apply: the same merge, every configured node schedulable.
	user, err := k8s.ReadValuesFiles(cfg.Chart.ValuesFiles)
	if err != nil {
		t.Fatal(err)
	}
	enforced, err := EnforcedValues(cfg, user, len(cfg.Nodes))
	if err != nil {
		t.Fatal(err)
	}
	want, err := k8s.MergeValues(user, enforced)
	if err != nil {
		t.Fatal(err)
	}

	var values map[string]any
	if err := sigyaml.Unmarshal(renderedFile(t, files, "values.yaml"), &values); err != nil {
		t.Fatal(err)
	}
	if d := k8s.Drift(values, want); len(d) > 0 || !reflect.DeepEqual(k8s.Drift(want, values), []k8s.ValueDrift(nil)) {
		t.Fatalf("values.yaml differs from what install applies: %v", d)
	}

	var hr helmv2.HelmRelease
	if err := sigyaml.UnmarshalStrict(renderedFile(t, files, "helmrelease.yaml"), &hr); err != nil {
		t.Fatalf("helmrelease.yaml is not a helm-controller v2 HelmRelease: %v", err)
	}
	if hr.APIVersion != helmv2.GroupVersion.String() || hr.Kind != helmv2.HelmReleaseKind || hr.Namespace != "flux-system" || hr.Name != "vault" {
		t.Fatalf("HelmRelease %s %s %s/%s", hr.APIVersion, hr.Kind, hr.Namespace, hr.Name)
	}
	s := hr.Spec
	if s.ReleaseName != cfg.Chart.Release || s.TargetNamespace != cfg.Chart.Namespace || s.StorageNamespace != cfg.Chart.Namespace {
		t.Fatalf("release %q in %q, stored in %q", s.ReleaseName, s.TargetNamespace, s.StorageNamespace)
	}
	c := s.Chart.Spec
	if c.Chart != "vault" || c.Version != cfg.Chart.Version || c.SourceRef.Kind != sourcev1.HelmRepositoryKind || c.SourceRef.Namespace != "flux-system" {
		t.Fatalf("chart %+v", c)
	}
	if s.Install == nil || !s.Install.DisableWait || s.Upgrade == nil || !s.Upgrade.DisableWait {
		t.Fatal("Helm's wait is on: a sealed Vault is never Ready, the install would time out and be remediated")
	}
	if s.DriftDetection == nil || s.DriftDetection.Mode != helmv2.DriftDetectionEnabled {
		t.Fatalf("drift detection %+v", s.DriftDetection)
	}
	if !reflect.DeepEqual(normaliseYAML(t, hr.GetValues()), normaliseYAML(t, values)) {
		t.Fatal("the HelmRelease's values are not values.yaml's")
	}

	var repo sourcev1.HelmRepository
	if err := sigyaml.UnmarshalStrict(renderedFile(t, files, "helmrepository.yaml"), &repo); err != nil {
		t.Fatalf("helmrepository.yaml is not a source-controller v1 HelmRepository: %v", err)
	}
	if repo.Kind != sourcev1.HelmRepositoryKind || repo.Name != c.SourceRef.Name || repo.Namespace != "flux-system" || repo.Spec.URL != cfg.Chart.Repository || repo.Spec.Type != "" {
		t.Fatalf("HelmRepository %+v", repo)
	}

	// storage.yaml: the StorageClass and one PV per node, as install applies them.
	docs := strings.Split(string(renderedFile(t, files, "storage.yaml")), "\n---\n")
	if len(docs) != 1+len(cfg.Nodes) {
		t.Fatalf("%d documents in storage.yaml", len(docs))
	}
	var sc storagev1.StorageClass
	if err := sigyaml.UnmarshalStrict([]byte(docs[0]), &sc); err != nil || sc.Name != k8s.StorageClassName(cfg.Chart.Namespace, cfg.Chart.Release) {
		t.Fatalf("StorageClass %s: %v", sc.Name, err)
	}
	for i, n := range cfg.Nodes {
		var pv corev1.PersistentVolume
		if err := sigyaml.UnmarshalStrict([]byte(docs[1+i]), &pv); err != nil {
			t.Fatal(err)
		}
		got := pv.Spec.NodeAffinity.Required.NodeSelectorTerms[0].MatchExpressions[0].Values
		if pv.Name != k8s.PVName(cfg.Chart.Namespace, cfg.Chart.Release, i) || pv.Spec.Local.Path != cfg.NodeHostPath(n) || !reflect.DeepEqual(got, []string{n.Name}) ||
			pv.Spec.ClaimRef.Name != k8s.ClaimName(cfg.Chart.Release, i) || pv.Spec.Capacity.Storage().String() != "2Gi" {
			t.Fatalf("PersistentVolume %d: %+v", i, pv)
		}
	}

	// An OCI chart: an OCI HelmRepository of the registry path.
	cfg.Chart.Repository = "oci://registry.example.lan/charts/vault"
	files, err = Render(cfg, RenderOptions{Flux: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := sigyaml.UnmarshalStrict(renderedFile(t, files, "helmrepository.yaml"), &repo); err != nil || repo.Spec.Type != sourcev1.HelmRepositoryTypeOCI || repo.Spec.URL != "oci://registry.example.lan/charts" {
		t.Fatalf("OCI HelmRepository %+v: %v", repo.Spec, err)
	}
	// A local chart cannot be fetched by Flux.
	cfg.Chart.Path = "/srv/charts/vault-0.34.1.tgz"
	if _, err := Render(cfg, RenderOptions{Flux: true}); err == nil || len(Hints(err)) == 0 || !strings.Contains(err.Error(), "local chart") {
		t.Fatalf("render --flux of a local chart: %v", err)
	}
}

func normaliseYAML(t *testing.T, v any) any {
	t.Helper()
	b, err := sigyaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := sigyaml.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// render -o never overwrites a file it did not write: the operator's own release.yaml
// (here under a name render uses) is left as it was and nothing at all is written; its
// own files are replaced atomically.
func TestRenderNeverOverwritesTheOperatorsFiles(t *testing.T) {
	cfg := renderConfig(t)
	files, err := Render(cfg, RenderOptions{Flux: true})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	theirs := []byte("# my own HelmRelease, written by hand\napiVersion: helm.toolkit.fluxcd.io/v2\n")
	if err := os.WriteFile(filepath.Join(dir, "helmrelease.yaml"), theirs, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := WriteRendered(dir, files); !errors.Is(err, ErrRenderTarget) || !strings.Contains(err.Error(), "helmrelease.yaml") || len(Hints(err)) == 0 {
		t.Fatalf("over the operator's file: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "helmrelease.yaml")); string(b) != string(theirs) {
		t.Fatal("the operator's file was changed")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("something was written beside the refusal: %v", ents)
	}

	os.Remove(filepath.Join(dir, "helmrelease.yaml"))
	if _, err := WriteRendered(dir, files); err != nil {
		t.Fatal(err)
	}
	// Its own files are replaced on the next render (a changed node here).
	cfg.Nodes[2].HostPath = "/srv/vault-2"
	files, err = Render(cfg, RenderOptions{Flux: true})
	if err != nil {
		t.Fatal(err)
	}
	written, err := WriteRendered(dir, files)
	if err != nil || len(written) != 4 {
		t.Fatalf("written %v: %v", written, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "storage.yaml")); !strings.Contains(string(b), "/srv/vault-2") {
		t.Fatal("storage.yaml was not rendered again")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Fatalf("temporary file left: %s", e.Name())
		}
	}
}
