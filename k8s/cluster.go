package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Errors a caller can tell apart.
var (
	ErrNoKubeconfig = errors.New("kubeconfig not usable")
	ErrUnreachable  = errors.New("kubernetes API server unreachable")
)

// ClusterConfig says how to reach the cluster and where the release lives.
type ClusterConfig struct {
	// Kubeconfig is the kubeconfig's content (a secret: it is never logged); Source
	// names where it came from, for messages.
	Kubeconfig []byte
	Source     string
	Context    string
	Namespace  string
	// Timeout bounds each API request (default 30s).
	Timeout time.Duration
}

// Cluster is a connection to the API server for one namespace.
type Cluster struct {
	cfg     ClusterConfig
	getter  *restGetter
	rest    *rest.Config
	Clients kubernetes.Interface
	log     *slog.Logger
	// Pins are the nodes adopt recorded for pods on hostPath volumes without node
	// affinity (pod name → node).
	Pins map[string]string
}

// Connect parses the kubeconfig and checks that the API server answers.
func Connect(ctx context.Context, cfg ClusterConfig, log *slog.Logger) (*Cluster, error) {
	if len(cfg.Kubeconfig) == 0 {
		return nil, fmt.Errorf("%w: %s is empty; copy the cluster's admin kubeconfig there (kubernetes.kubeconfig)", ErrNoKubeconfig, cfg.Source)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	raw, err := clientcmd.Load(cfg.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a kubeconfig: %v", ErrNoKubeconfig, cfg.Source, err)
	}
	overrides := &clientcmd.ConfigOverrides{Context: clientcmdapi.Context{Namespace: cfg.Namespace}, Timeout: cfg.Timeout.String()}
	if cfg.Context != "" {
		overrides.CurrentContext = cfg.Context
	}
	cc := clientcmd.NewNonInteractiveClientConfig(*raw, cfg.Context, overrides, nil)
	rc, err := cc.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoKubeconfig, cfg.Source, err)
	}
	rc.Timeout = cfg.Timeout
	// client-go's default 5 requests/s throttles the pod waits (a few requests every
	// 200 ms) into 200 ms pauses on every later call.
	rc.QPS, rc.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoKubeconfig, cfg.Source, err)
	}
	c := &Cluster{cfg: cfg, getter: &restGetter{cc: cc, rc: rc}, rest: rc, Clients: cs, log: log.With("component", "k8s")}
	vctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	if _, err := cs.Discovery().RESTClient().Get().AbsPath("/version").Do(vctx).Raw(); err != nil {
		return nil, fmt.Errorf("%w at %s: %v; check that the cluster is up and kubernetes.kubeconfig/context point at it", ErrUnreachable, rc.Host, err)
	}
	return c, nil
}

// Namespace is the release namespace.
func (c *Cluster) Namespace() string { return c.cfg.Namespace }

// helm returns a Helm action configuration for the namespace (Secrets storage).
func (c *Cluster) helm() (*action.Configuration, error) {
	cfg := new(action.Configuration)
	debug := func(format string, v ...any) { c.log.Debug(fmt.Sprintf(format, v...), "source", "helm") }
	if err := cfg.Init(c.getter, c.cfg.Namespace, "secret", debug); err != nil {
		return nil, fmt.Errorf("helm: %w", err)
	}
	return cfg, nil
}

// restGetter hands Helm the parsed kubeconfig, so the kubeconfig never has to be a
// plain file on disk (it can be a systemd credential).
type restGetter struct {
	cc clientcmd.ClientConfig
	rc *rest.Config
}

func (g *restGetter) ToRESTConfig() (*rest.Config, error) { return rest.CopyConfig(g.rc), nil }

func (g *restGetter) ToDiscoveryClient() (discovery.CachedDiscoveryInterface, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(rest.CopyConfig(g.rc))
	if err != nil {
		return nil, err
	}
	return memory.NewMemCacheClient(dc), nil
}

func (g *restGetter) ToRESTMapper() (meta.RESTMapper, error) {
	dc, err := g.ToDiscoveryClient()
	if err != nil {
		return nil, err
	}
	m := restmapper.NewDeferredDiscoveryRESTMapper(dc)
	return restmapper.NewShortcutExpander(m, dc, nil), nil
}

func (g *restGetter) ToRawKubeConfigLoader() clientcmd.ClientConfig { return g.cc }
