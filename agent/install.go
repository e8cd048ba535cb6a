package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// ErrChartValues wraps a chart values problem the operator must fix in their files (one
// that cannot be read, or a value that contradicts what the agent enforces); the CLI
// treats it as a configuration error.
var ErrChartValues = errors.New("chart values")

// InstallOptions tune an install run.
type InstallOptions struct {
	// DryRun renders and compares with the deployed release; changes nothing.
	DryRun bool
	// RequireRelease refuses to install a release that does not exist yet (upgrade).
	RequireRelease bool
	// NoSnapshot skips the snapshot before a roll (recover: Vault's data is coming back
	// from a snapshot anyway).
	NoSnapshot bool
}

// InstallReport is what Install did.
type InstallReport struct {
	k8s.InstallResult
	Values   map[string]any `json:"values,omitempty"` // merged values (dry run)
	Volumes  []string       `json:"persistent_volumes,omitempty"`
	Snapshot string         `json:"snapshot,omitempty"` // taken before rolling pods
	Pods     []k8s.Pod      `json:"pods,omitempty"`
	Roll     *RollReport    `json:"roll,omitempty"`
	Steps    []StepResult   `json:"steps"`
}

// installState is what the install steps share.
type installState struct {
	env      *Env
	opts     InstallOptions
	cluster  *k8s.Cluster
	chart    *k8s.Chart
	values   map[string]any
	existing bool
	roll     bool // the upgrade changes the pods: snapshot first, then roll
	rep      *InstallReport
}

// ErrImmutable means install would have to change a field of the live StatefulSet that
// Kubernetes forbids changing.
var ErrImmutable = errors.New("refusing to install: immutable fields would change")

// installSteps are install's steps. An install over an existing release that changes
// the pods is an upgrade, done the way Vault's documentation asks: snapshot and verify
// first, then standbys one at a time, the active node last (roll.go).
var installSteps = []step[installState]{
	{"connect", "connect to the Kubernetes API server", (*installState).connect},
	{"owner", "who owns the release: refuse when Flux, Argo CD or another tool does (install.managed_by, the live objects' marks)", (*installState).owner},
	{"chart", "load the chart (downloaded once into the cache; digest checked when pinned)", (*installState).loadChart},
	{"values", "merge your values files under the values the agent enforces", (*installState).mergeValues},
	{"plan", "compare with the deployed release: does the upgrade change the pods?", (*installState).plan},
	{"snapshot", "when pods will be rolled: take and verify a Raft snapshot first", (*installState).snapshot},
	{"storage", "apply the StorageClass and one local PersistentVolume per node; the drill's PriorityClass", (*installState).storage},
	{"release", "helm upgrade --install", (*installState).release},
	{"pods", "wait until every server pod runs", (*installState).pods},
	{"roll", "roll pods left on the old revision: standbys one at a time, the active node last", (*installState).rollPods},
}

// InstallPlan is install's plan, for printing.
func InstallPlan() []PlanStep { return planOf(installSteps) }

// Install installs or upgrades the Vault chart. Each step checks state first, so a
// re-run with nothing changed makes no new revision and rolls nothing.
func Install(ctx context.Context, env *Env, opts InstallOptions) (*InstallReport, error) {
	s := &installState{env: env, opts: opts, rep: &InstallReport{}}
	steps := installSteps
	if opts.DryRun {
		steps = steps[:5]
	}
	err := runSteps(ctx, env, "install", steps, s, &s.rep.Steps)
	if opts.DryRun && err == nil {
		s.rep.Values = s.values
		s.rep.DryRun = true
	}
	return s.rep, err
}

func (s *installState) connect(ctx context.Context) (string, error) {
	env := s.env
	cl, err := env.InstallCluster(ctx)
	if err != nil {
		return "", err
	}
	s.cluster = cl
	return "namespace " + env.Config.Chart.Namespace, nil
}

func (s *installState) owner(ctx context.Context) (string, error) {
	o, err := checkHelmOwner(ctx, s.env, s.cluster)
	if err != nil {
		return "", err
	}
	return o.String(), nil
}

func (s *installState) loadChart(context.Context) (string, error) {
	env := s.env
	c := env.Config.Chart
	ch, err := k8s.LoadChart(k8s.ChartSource{Repository: c.Repository, Name: c.Name, Version: c.Version, Path: c.Path, Digest: c.Digest, CacheDir: c.CacheDir})
	if err != nil {
		return "", err
	}
	s.chart = ch
	return fmt.Sprintf("%s %s (app %s)", ch.Metadata.Name, ch.Metadata.Version, ch.Metadata.AppVersion), nil
}

func (s *installState) mergeValues(ctx context.Context) (string, error) {
	env := s.env
	cfg := env.Config
	user, err := k8s.ReadValuesFiles(cfg.Chart.ValuesFiles)
	if err != nil {
		return "", fmt.Errorf("%w: chart.values_files: %v", ErrChartValues, err)
	}
	schedulable, err := s.cluster.SchedulableNodes(ctx)
	if err != nil {
		return "", err
	}
	enforced, err := EnforcedValues(cfg, user, schedulable)
	if err != nil {
		return "", err
	}
	if schedulable < len(cfg.Nodes) {
		env.Log.Warn("fewer schedulable nodes than Vault replicas: dropping the chart's required pod anti-affinity", "nodes", schedulable, "replicas", len(cfg.Nodes))
	}
	if s.values, err = k8s.MergeValues(user, enforced); err != nil {
		return "", fmt.Errorf("%w: %w", ErrChartValues, err)
	}
	return fmt.Sprintf("%d values file(s) under the enforced values", len(user)), nil
}

func (s *installState) spec(env *Env, dryRun bool) k8s.InstallSpec {
	return k8s.InstallSpec{Release: env.Config.Chart.Release, Chart: s.chart, Values: s.values, Timeout: env.Config.Chart.Timeout, DryRun: dryRun, Now: env.Clock.Now}
}

func (s *installState) plan(ctx context.Context) (string, error) {
	env := s.env
	info, err := s.cluster.Release(env.Config.Chart.Release)
	s.existing = err == nil && info != nil
	if !s.existing && s.opts.RequireRelease {
		return "", hintf("run `pve-vault-agent install` first", "release %s does not exist in namespace %s: nothing to upgrade", env.Config.Chart.Release, env.Config.Chart.Namespace)
	}
	res, err := s.cluster.Install(ctx, s.spec(env, true))
	if err != nil {
		return "", fmt.Errorf("release: %w", err)
	}
	if s.opts.DryRun {
		s.rep.InstallResult = *res
	}
	if len(res.Immutable) > 0 {
		return "", withHint(fmt.Errorf("%w: the StatefulSet %s exists and these values would change fields Kubernetes does not let change (nothing was applied): %s",
			ErrImmutable, env.Config.Chart.Release, strings.Join(res.Immutable, "; ")),
			"the release was installed another way, on volumes of its own: keep upgrading it that way (helm, Flux); adopt, unseal, backups and drills need no install. To move it onto the agent's volumes instead: backup-now, delete the StatefulSet and its claims, install, and restore the backup")
	}
	if !s.existing || res.Action == k8s.Unchanged {
		return string(res.Action), nil
	}
	for _, c := range res.Changes {
		if strings.HasPrefix(c.Object, "StatefulSet/") || strings.HasPrefix(c.Object, "ConfigMap/") {
			s.roll = true
		}
	}
	if s.roll {
		return fmt.Sprintf("upgrade %s → chart %s changes the pods: they will be rolled", info.ChartVersion, s.chart.Metadata.Version), nil
	}
	return fmt.Sprintf("upgrade %s → chart %s without changes to the pods", info.ChartVersion, s.chart.Metadata.Version), nil
}

func (s *installState) snapshot(ctx context.Context) (string, error) {
	env := s.env
	switch {
	case !s.roll:
		return "skipped: no pod will be rolled", nil
	case s.opts.NoSnapshot:
		return "skipped: recover restores Vault's data anyway", nil
	case !env.Keyfile.Exists():
		return "skipped: Vault was not initialised by the agent (no keyfile): nothing to back up", nil
	}
	rep, err := BackupNow(ctx, env, BackupOptions{})
	if err != nil {
		return "", withHint(fmt.Errorf("no verified snapshot, so no pod is rolled: %w", err), "fix the backup (pve-vault-agent backup-now) and run the upgrade again; nothing was changed")
	}
	s.rep.Snapshot = rep.Snapshot.Path
	return rep.Snapshot.Path, nil
}

func (s *installState) storage(ctx context.Context) (string, error) {
	env := s.env
	var vols []k8s.Volume
	for _, n := range env.Config.Nodes {
		vols = append(vols, k8s.Volume{Node: n.Name, Path: env.Config.NodeHostPath(n)})
	}
	names, err := s.cluster.EnsureStorage(ctx, k8s.StorageSpec{Release: env.Config.Chart.Release, Size: dataSize(s.values), Volumes: vols})
	if err != nil {
		return "", err
	}
	if err := s.cluster.EnsureDrillPriorityClass(ctx); err != nil {
		return "", fmt.Errorf("the restore drill's PriorityClass %s: %w", k8s.DrillPriorityClass, err)
	}
	s.rep.Volumes = names
	return fmt.Sprintf("%d volume(s)", len(names)), nil
}

func (s *installState) release(ctx context.Context) (string, error) {
	env := s.env
	res, err := s.cluster.Install(ctx, s.spec(env, false))
	if err != nil {
		return "", err
	}
	s.rep.InstallResult = *res
	return fmt.Sprintf("%s: revision %d, chart %s", res.Action, res.Revision, res.ChartVersion), nil
}

func (s *installState) pods(ctx context.Context) (string, error) {
	env := s.env
	pods, err := s.cluster.WaitRunning(ctx, env.Config.Chart.Release, len(env.Config.Nodes), env.Config.Chart.Timeout)
	if err != nil {
		return "", err
	}
	s.rep.Pods = pods
	return fmt.Sprintf("%d pod(s) running", len(pods)), nil
}

func (s *installState) rollPods(ctx context.Context) (string, error) {
	env := s.env
	rr, err := Roll(ctx, env, s.cluster)
	s.rep.Roll = rr
	if err != nil {
		return "", err
	}
	if len(rr.Rolled) == 0 {
		return "nothing to roll", nil
	}
	if s.rep.Pods, _, err = s.cluster.ServerPods(ctx, env.Config.Chart.Release); err != nil {
		return "", err
	}
	return fmt.Sprintf("rolled %s", strings.Join(rr.Rolled, ", ")), nil
}

// EnforcedValues are the chart values the agent owns, derived from its configuration,
// typed as a values file types them (k8s.AsValuesFile): Raft HA with one replica per
// configured node and node ids from pod names, names fixed to the release
// (fullnameOverride), data on the agent's StorageClass (bound to the provisioned
// hostPaths), the pod running as vault.uid/vault.gid (the same numbers the hostPath is
// chowned to), OnDelete updates (the agent rolls pods itself), and no required
// anti-affinity when the cluster has fewer schedulable nodes than replicas. The Raft
// stanza (performance_multiplier 1, a retry_join per pod) is generated unless the
// user's values carry their own server.ha.raft.config, which must then use Raft storage
// (and retry_join, for more than one node).
func EnforcedValues(cfg *configs.Config, user []k8s.ValuesFile, schedulable int) (map[string]any, error) {
	replicas := len(cfg.Nodes)
	uid, gid := cfg.Vault.UID, cfg.Vault.GID
	raft := map[string]any{"enabled": true, "setNodeId": true}
	config, file := userString(user, "server", "ha", "raft", "config")
	if config != "" {
		if !strings.Contains(config, `storage "raft"`) || (replicas > 1 && !strings.Contains(config, "retry_join")) {
			return nil, fmt.Errorf("%w: %s: server.ha.raft.config must use storage \"raft\" with a retry_join per pod for %d nodes; remove it to let the agent generate it", ErrChartValues, file, replicas)
		}
	} else {
		config = raftConfig(cfg.Chart.Release, replicas, tlsEnabled(user))
		raft["config"] = config
	}
	if s, file := userString(user, "server", "annotations"); s != "" {
		return nil, fmt.Errorf("%w: %s: write server.annotations as a map, so the agent's config checksum can join it", ErrChartValues, file)
	}
	// The chart's pod template does not checksum the server config it keeps in a
	// ConfigMap: without this a config change would restart no pod.
	sum := sha256.Sum256([]byte(config))
	server := map[string]any{
		"uid": uid, "gid": gid,
		"updateStrategyType": "OnDelete",
		"statefulSet": map[string]any{"securityContext": map[string]any{"pod": map[string]any{
			"runAsNonRoot": true, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
		}}},
		"dataStorage": map[string]any{"enabled": true, "mountPath": "/vault/data", "accessMode": "ReadWriteOnce",
			"storageClass": k8s.StorageClassName(cfg.Chart.Namespace, cfg.Chart.Release)},
		"standalone":  map[string]any{"enabled": false},
		"ha":          map[string]any{"enabled": true, "replicas": replicas, "raft": raft},
		"annotations": map[string]any{"pva.io/config-sha256": hex.EncodeToString(sum[:8])},
	}
	if schedulable < replicas {
		server["affinity"] = ""
	}
	return k8s.AsValuesFile(map[string]any{"fullnameOverride": cfg.Chart.Release, "server": server})
}

// raftConfig is the chart's Raft server config: performance_multiplier 1 (Vault's
// production advice: elections in about a second instead of five) and a retry_join per
// pod, so followers find the leader through the headless <release>-internal Service.
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
	b.WriteString("storage \"raft\" {\n  path = \"/vault/data\"\n  performance_multiplier = 1\n")
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

// ValuesWarnings are what the user's values files do that will hurt (not errors: the
// agent works with them): a liveness probe that restarts a sealed Vault.
func ValuesWarnings(cfg *configs.Config) []string {
	files, err := k8s.ReadValuesFiles(cfg.Chart.ValuesFiles)
	if err != nil {
		return nil // config check and install report the file itself
	}
	if path, file := k8s.UserLivenessPath(files); path != "" {
		if w := k8s.LivenessWarning(path); w != "" {
			return []string{file + ": server.livenessProbe: " + w}
		}
	}
	return nil
}
