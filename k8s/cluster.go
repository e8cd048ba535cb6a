package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Errors a caller can tell apart.
var (
	ErrNoKubeconfig = errors.New("kubeconfig not found")
	ErrUnreachable  = errors.New("kubernetes API server unreachable")
)

// ClusterConfig says how to reach the cluster and where the release lives.
type ClusterConfig struct {
	Kubeconfig string
	Context    string
	Namespace  string
	// Timeout bounds each API request (default 30s).
	Timeout time.Duration
}

// Cluster is a connection to the API server for one namespace.
type Cluster struct {
	cfg     ClusterConfig
	flags   *genericclioptions.ConfigFlags
	rest    *rest.Config
	Clients kubernetes.Interface
	log     *slog.Logger
}

// Connect loads the kubeconfig and checks that the API server answers.
func Connect(ctx context.Context, cfg ClusterConfig, log *slog.Logger) (*Cluster, error) {
	if _, err := os.Stat(cfg.Kubeconfig); err != nil {
		return nil, fmt.Errorf("%w: %s (%v); copy the cluster's admin kubeconfig there (kubernetes.kubeconfig)", ErrNoKubeconfig, cfg.Kubeconfig, errors.Unwrap(err))
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	flags := genericclioptions.NewConfigFlags(false)
	flags.KubeConfig = &cfg.Kubeconfig
	flags.Namespace = &cfg.Namespace
	if cfg.Context != "" {
		flags.Context = &cfg.Context
	}
	timeout := cfg.Timeout.String()
	flags.Timeout = &timeout
	rc, err := flags.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", cfg.Kubeconfig, err)
	}
	rc.Timeout = cfg.Timeout
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", cfg.Kubeconfig, err)
	}
	c := &Cluster{cfg: cfg, flags: flags, rest: rc, Clients: cs, log: log.With("component", "k8s")}
	if _, err := cs.Discovery().ServerVersion(); err != nil {
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
	if err := cfg.Init(c.flags, c.cfg.Namespace, "secret", debug); err != nil {
		return nil, fmt.Errorf("helm: %w", err)
	}
	return cfg, nil
}
