package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// ErrChartValues wraps a chart values problem the operator must fix in their files (one
// that cannot be read, or a value that contradicts what the agent enforces); the CLI
// treats it as a configuration error (exit 2).
var ErrChartValues = errors.New("chart values")

// InstallOptions tune an install run.
type InstallOptions struct {
	// DryRun renders and compares with the deployed release; changes nothing.
	DryRun bool
	// AfterRoll is called for each pod rolled onto a new revision (Vault: unseal it).
	AfterRoll k8s.RollFunc
}

// InstallReport is what Install did.
type InstallReport struct {
	k8s.InstallResult
	Values  map[string]any `json:"values,omitempty"` // merged values (dry run)
	Volumes []string       `json:"persistent_volumes,omitempty"`
	Pods    []k8s.Pod      `json:"pods,omitempty"`
	Rolled  []string       `json:"rolled,omitempty"`
}

// Install runs the install flow: connect → load chart → merge values (user files under
// the enforced ones; a contradiction stops here) → apply storage → helm upgrade --install
// → wait for every pod Running → roll pods left on an old revision one at a time.
// Each step checks state first, so a re-run with nothing changed makes no new revision.
func Install(ctx context.Context, cfg *configs.Config, opts InstallOptions, log *slog.Logger) (*InstallReport, error) {
	log = log.With("component", "install")
	cl, err := k8s.Connect(ctx, k8s.ClusterConfig{Kubeconfig: cfg.Kubernetes.Kubeconfig, Context: cfg.Kubernetes.Context, Namespace: cfg.Chart.Namespace}, log)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	ch, err := k8s.LoadChart(k8s.ChartSource{Repository: cfg.Chart.Repository, Name: cfg.Chart.Name, Version: cfg.Chart.Version, Path: cfg.Chart.Path, CacheDir: cfg.Chart.CacheDir})
	if err != nil {
		return nil, fmt.Errorf("load chart: %w", err)
	}
	user, err := k8s.ReadValuesFiles(cfg.Chart.ValuesFiles)
	if err != nil {
		return nil, fmt.Errorf("%w: chart.values_files: %v", ErrChartValues, err)
	}
	schedulable, err := cl.SchedulableNodes(ctx)
	if err != nil {
		return nil, err
	}
	enforced, err := EnforcedValues(cfg, user, schedulable)
	if err != nil {
		return nil, err
	}
	if schedulable < len(cfg.Nodes) {
		log.Warn("fewer schedulable nodes than Vault replicas: dropping the chart's required pod anti-affinity", "nodes", schedulable, "replicas", len(cfg.Nodes))
	}
	values, err := k8s.MergeValues(user, enforced)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrChartValues, err)
	}
	rep := &InstallReport{}
	if !opts.DryRun {
		var vols []k8s.Volume
		for _, n := range cfg.Nodes {
			vols = append(vols, k8s.Volume{Node: n.Name, Path: cfg.NodeHostPath(n)})
		}
		if rep.Volumes, err = cl.EnsureStorage(ctx, k8s.StorageSpec{Release: cfg.Chart.Release, Size: dataSize(values), Volumes: vols}); err != nil {
			return nil, fmt.Errorf("storage: %w", err)
		}
	}
	res, err := cl.Install(ctx, k8s.InstallSpec{Release: cfg.Chart.Release, Chart: ch, Values: values, Timeout: cfg.Chart.Timeout, DryRun: opts.DryRun})
	if err != nil {
		return nil, fmt.Errorf("release: %w", err)
	}
	rep.InstallResult = *res
	if opts.DryRun {
		rep.Values = values
		return rep, nil
	}
	log.Info("release "+string(res.Action), "release", res.Release, "namespace", res.Namespace, "revision", res.Revision, "chart", res.ChartVersion)
	if rep.Pods, err = cl.WaitRunning(ctx, cfg.Chart.Release, len(cfg.Nodes), cfg.Chart.Timeout); err != nil {
		return rep, fmt.Errorf("wait for pods: %w", err)
	}
	if rep.Rolled, err = cl.Roll(ctx, cfg.Chart.Release, cfg.Chart.Timeout, opts.AfterRoll); err != nil {
		return rep, fmt.Errorf("roll pods: %w", err)
	}
	if len(rep.Rolled) > 0 {
		if rep.Pods, err = cl.Pods(ctx, cfg.Chart.Release); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// EnforcedValues are the chart values the agent owns, derived from its configuration:
// Raft HA with one replica per configured node and node ids from pod names, data on the
// agent's StorageClass (bound to the provisioned hostPaths), the pod running as
// vault.uid/vault.gid (the same numbers the hostPath is chowned to), OnDelete updates
// (the agent rolls pods itself), and no required anti-affinity when the cluster has
// fewer schedulable nodes than replicas. The Raft stanza with a retry_join per pod is
// generated unless the user's values carry their own server.ha.raft.config, which must
// then use Raft storage (and retry_join, for more than one node).
func EnforcedValues(cfg *configs.Config, user []k8s.ValuesFile, schedulable int) (map[string]any, error) {
	replicas := len(cfg.Nodes)
	uid, gid := cfg.Vault.UID, cfg.Vault.GID
	raft := map[string]any{"enabled": true, "setNodeId": true}
	if own, file := userString(user, "server", "ha", "raft", "config"); own != "" {
		if !strings.Contains(own, `storage "raft"`) || (replicas > 1 && !strings.Contains(own, "retry_join")) {
			return nil, fmt.Errorf("%w: %s: server.ha.raft.config must use storage \"raft\" with a retry_join per pod for %d nodes; remove it to let the agent generate it", ErrChartValues, file, replicas)
		}
	} else {
		raft["config"] = raftConfig(cfg.Chart.Release, replicas, tlsEnabled(user))
	}
	server := map[string]any{
		"uid": uid, "gid": gid,
		"updateStrategyType": "OnDelete",
		"statefulSet": map[string]any{"securityContext": map[string]any{"pod": map[string]any{
			"runAsNonRoot": true, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
		}}},
		"dataStorage": map[string]any{"enabled": true, "mountPath": "/vault/data", "accessMode": "ReadWriteOnce",
			"storageClass": k8s.StorageClassName(cfg.Chart.Namespace, cfg.Chart.Release)},
		"standalone": map[string]any{"enabled": false},
		"ha":         map[string]any{"enabled": true, "replicas": replicas, "raft": raft},
	}
	if schedulable < replicas {
		server["affinity"] = ""
	}
	return map[string]any{"server": server}, nil
}

// raftConfig is the chart's Raft server config with a retry_join per pod, so followers
// find the leader through the headless <release>-internal Service.
func raftConfig(release string, replicas int, tls bool) string {
	scheme, listener := "http", "  tls_disable = 1\n"
	if tls {
		scheme = "https"
		listener = "  tls_cert_file = \"/vault/userconfig/vault-server-tls/tls.crt\"\n" +
			"  tls_key_file = \"/vault/userconfig/vault-server-tls/tls.key\"\n" +
			"  tls_client_ca_file = \"/vault/userconfig/vault-server-tls/ca.crt\"\n"
	}
	var b strings.Builder
	b.WriteString("ui = true\n\nlistener \"tcp\" {\n" + listener + "  address = \"[::]:8200\"\n  cluster_address = \"[::]:8201\"\n}\n\n")
	b.WriteString("storage \"raft\" {\n  path = \"/vault/data\"\n")
	for i := 0; i < replicas && replicas > 1; i++ {
		fmt.Fprintf(&b, "\n  retry_join {\n    leader_api_addr = \"%s://%s-%d.%s-internal:8200\"\n", scheme, release, i, release)
		if tls {
			fmt.Fprintf(&b, "    leader_ca_cert_file = \"/vault/userconfig/vault-server-tls/ca.crt\"\n    leader_tls_servername = \"%s-%d.%s-internal\"\n", release, i, release)
		}
		b.WriteString("  }\n")
	}
	b.WriteString("}\n\nservice_registration \"kubernetes\" {}\n")
	return b.String()
}

// tlsEnabled reads global.tlsDisable from the user's values; the chart's default is
// TLS off (true).
func tlsEnabled(user []k8s.ValuesFile) bool {
	disabled := true
	for _, f := range user {
		if g, ok := f.Values["global"].(map[string]any); ok {
			if v, ok := g["tlsDisable"].(bool); ok {
				disabled = v
			}
		}
	}
	return !disabled
}

// userString returns the last user value at path and the file it came from.
func userString(user []k8s.ValuesFile, path ...string) (string, string) {
	val, file := "", ""
	for _, f := range user {
		var cur any = f.Values
		for _, k := range path {
			m, ok := cur.(map[string]any)
			if !ok {
				cur = nil
				break
			}
			cur = m[k]
		}
		if s, ok := cur.(string); ok && s != "" {
			val, file = s, f.Name
		}
	}
	return val, file
}

// dataSize is server.dataStorage.size of the merged values (the chart's default 10Gi).
func dataSize(values map[string]any) string {
	if s, ok := values["server"].(map[string]any); ok {
		if d, ok := s["dataStorage"].(map[string]any); ok {
			if v, ok := d["size"].(string); ok && v != "" {
				return v
			}
		}
	}
	return "10Gi"
}
