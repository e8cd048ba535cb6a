package k8s

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/cli"
	"helm.sh/helm/v3/pkg/registry"
)

// Chart is a loaded chart.
type Chart = chart.Chart

// ErrChart means the chart could not be found or loaded.
var ErrChart = errors.New("chart not available")

// ChartSource is where the Vault chart comes from: a local directory or archive (Path),
// or Name at an exact Version from Repository (https chart repository or oci://).
type ChartSource struct {
	Repository string
	Name       string
	Version    string
	Path       string
	// Digest, when set ("sha256:<hex>"), is the chart archive's digest: a download, a
	// cached copy or a local .tgz that does not match is refused.
	Digest string
	// CacheDir keeps downloaded archives; a cached version is used without network.
	CacheDir string
}

// chartNameRe is what a chart name may be: it becomes a file name in the cache.
var chartNameRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

func (s ChartSource) String() string {
	if s.Path != "" {
		return s.Path
	}
	return fmt.Sprintf("%s %s %s", s.Repository, s.Name, s.Version)
}

// LoadChart returns the chart, downloading it into the cache on first use.
func LoadChart(src ChartSource) (*chart.Chart, error) {
	path := src.Path
	if path == "" {
		if !chartNameRe.MatchString(src.Name) || strings.Contains(src.Name, "..") {
			return nil, fmt.Errorf("%w: chart name %q is not a plain name", ErrChart, src.Name)
		}
		var err error
		if path, err = fetchChart(src); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrChart, src, err)
		}
	}
	if src.Digest != "" {
		if err := checkDigest(path, src.Digest); err != nil {
			if src.Path == "" {
				_ = os.Remove(path) // a bad download or a tampered cache entry is not kept
			}
			return nil, fmt.Errorf("%w: %v", ErrChart, err)
		}
	}
	ch, err := loader.Load(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrChart, path, err)
	}
	if src.Path == "" && ch.Metadata.Version != strings.TrimPrefix(src.Version, "v") {
		return nil, fmt.Errorf("%w: %s holds version %s, want %s", ErrChart, path, ch.Metadata.Version, src.Version)
	}
	return ch, nil
}

// checkDigest compares a chart archive's sha256 with want ("sha256:<hex>").
func checkDigest(path, want string) error {
	hexWant, ok := strings.CutPrefix(want, "sha256:")
	if !ok {
		return fmt.Errorf("chart digest %q: write it as sha256:<hex>", want)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s is a directory: a digest can only check a chart archive (.tgz)", path)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(got, hexWant) {
		return fmt.Errorf("%s has digest sha256:%s, chart.digest pins %s: refusing a chart that is not the one pinned", path, got, want)
	}
	return nil
}

func fetchChart(src ChartSource) (string, error) {
	sum := sha256.Sum256([]byte(src.Repository))
	dir := filepath.Join(src.CacheDir, hex.EncodeToString(sum[:6]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	cached := filepath.Join(dir, src.Name+"-"+strings.TrimPrefix(src.Version, "v")+".tgz")
	if _, err := os.Stat(cached); err == nil {
		return cached, nil
	}
	settings := cli.New()
	settings.RepositoryCache = dir
	settings.RepositoryConfig = filepath.Join(dir, "repositories.yaml")
	settings.RegistryConfig = filepath.Join(dir, "registry.json")

	opts := action.ChartPathOptions{Version: src.Version}
	name := src.Name
	if registry.IsOCI(src.Repository) {
		rc, err := registry.NewClient(registry.ClientOptWriter(io.Discard), registry.ClientOptCredentialsFile(settings.RegistryConfig))
		if err != nil {
			return "", err
		}
		inst := action.NewInstall(&action.Configuration{RegistryClient: rc})
		inst.ChartPathOptions.Version = src.Version
		name = strings.TrimRight(src.Repository, "/") + "/" + src.Name
		return inst.ChartPathOptions.LocateChart(name, settings)
	}
	opts.RepoURL = src.Repository
	got, err := opts.LocateChart(name, settings)
	if err != nil {
		return "", err
	}
	if got != cached {
		if err := os.Rename(got, cached); err != nil {
			return "", err
		}
	}
	return cached, nil
}
