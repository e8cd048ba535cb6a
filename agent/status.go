package agent

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot/offsite"
)

// Status is one screen of everything the agent looks after. Attention lists what needs
// the operator; empty means all is well.
type Status struct {
	Nodes        []NodeStatus          `json:"nodes"`
	Release      *k8s.ReleaseInfo      `json:"release,omitempty"`
	Owner        *k8s.Owner            `json:"release_owner,omitempty"`
	ManagedBy    string                `json:"managed_by"`
	HelmRelease  *k8s.HelmReleaseState `json:"helmrelease,omitempty"`
	Drift        *DriftStatus          `json:"values_drift,omitempty"`
	Pods         []PodStatus           `json:"pods"`
	Rejected     []k8s.Rejected        `json:"rejected_pods,omitempty"`
	Keyfile      *vault.Meta           `json:"keyfile,omitempty"`
	Tokens       []TokenStatus         `json:"tokens,omitempty"`
	LastSnapshot *SnapshotStatus       `json:"last_snapshot,omitempty"`
	NextBackup   time.Time             `json:"next_backup,omitzero"`
	LastDrill    *DrillStatus          `json:"last_drill,omitempty"`
	Offsite      []OffsiteStatus       `json:"offsite,omitempty"`
	RecoveryCopy *RecoveryStatus       `json:"recovery_copy,omitempty"`
	Cluster      *ClusterStatus        `json:"cluster,omitempty"`
	Warnings     []string              `json:"warnings"`
	Attention    []string              `json:"attention"`
}

// DriftStatus compares the live release's values with what the agent requires.
type DriftStatus struct {
	Checked bool             `json:"checked"`
	Why     string           `json:"why_not,omitempty"` // why it was not checked
	Keys    []k8s.ValueDrift `json:"keys"`
}

// NodeStatus is a node VM and its hostPath.
type NodeStatus struct {
	Name     string `json:"name"`
	VMStatus string `json:"vm_status,omitempty"`
	Address  string `json:"address,omitempty"`
	HostPath string `json:"host_path"`
	Owner    string `json:"owner,omitempty"`
	Mode     string `json:"mode,omitempty"`
}

// PodStatus is a Vault pod's state.
type PodStatus struct {
	Name        string `json:"name"`
	Node        string `json:"node"`
	Initialized bool   `json:"initialized"`
	Sealed      bool   `json:"sealed"`
	Active      bool   `json:"active"`
	Health      int    `json:"health_code,omitempty"`
	Version     string `json:"version,omitempty"`
}

// DrillStatus is the last restore drill.
type DrillStatus struct {
	Snapshot     string    `json:"snapshot"`
	At           time.Time `json:"at"`
	Age          string    `json:"age"`
	Passed       bool      `json:"passed"`
	Reason       string    `json:"reason,omitempty"`
	DurationSecs float64   `json:"duration_seconds"`
	LastSuccess  time.Time `json:"last_success,omitzero"`
}

// SnapshotStatus is the newest snapshot.
type SnapshotStatus struct {
	Path     string  `json:"path"`
	Age      string  `json:"age"`
	AgeSecs  float64 `json:"age_seconds"`
	Verified bool    `json:"verified"`
}

// GetStatus gathers the status; a part that cannot be read becomes an attention line,
// never an abort.
func GetStatus(ctx context.Context, env *Env) *Status {
	sb := &statusBuilder{env: env, now: env.Clock.Now(), st: &Status{Attention: []string{}, Warnings: []string{}, Pods: []PodStatus{}, ManagedBy: env.Config.Install.ManagedBy}}
	if env.Config.Vault.TLSCAFile == "" {
		sb.st.Warnings = append(sb.st.Warnings, tlsOffWarning)
	}
	sb.nodes(ctx)
	sb.release(ctx)
	active := sb.pods(ctx)
	sb.keyfile(ctx, active)
	es := sb.snapshots(ctx)
	drillStatus(env, sb.st, sb.now, sb.attn)
	sb.offsite(es)
	sb.recovery()
	sb.cluster(ctx)
	return sb.st
}

// ClusterStatus is the agents of a Proxmox cluster: who leads, and which hosts hold
// the current keyfile.
type ClusterStatus struct {
	Identity  string        `json:"identity"`
	Leader    string        `json:"leader"`
	Renewed   time.Time     `json:"lease_renewed,omitzero"`
	Keyfiles  []HostKeyfile `json:"keyfiles"`
	LeaseName string        `json:"lease"`
}

// cluster reads the Lease and asks every host for its keyfile's digest.
func (sb *statusBuilder) cluster(ctx context.Context) {
	cl := sb.env.Config.Cluster
	if !cl.Enabled() {
		return
	}
	cs := &ClusterStatus{LeaseName: cl.Lease}
	sb.st.Cluster = cs
	id, err := sb.env.clusterIdentity()
	if err != nil {
		sb.attn("%v", err)
	}
	cs.Identity = id
	if c, err := sb.env.Cluster(ctx); err != nil {
		sb.attn("the leadership Lease cannot be read: %v", firstLine(err.Error()))
	} else if l, err := c.Lease(ctx, cl.Lease); err != nil {
		sb.attn("the leadership Lease %s cannot be read: %v (no agent has led yet, or the operate role lacks it: `pve-vault-agent rbac`)", cl.Lease, err)
	} else {
		cs.Leader, cs.Renewed = l.Holder, l.Renewed
		if sb.now.Sub(cs.Renewed) > 2*l.Duration {
			sb.attn("no agent leads: the Lease %s was last renewed by %q %s ago; no backup, drill or token renewal runs", cl.Lease, cs.Leader, sb.now.Sub(cs.Renewed).Round(time.Second))
		}
	}
	kfs, err := HostKeyfiles(ctx, sb.env)
	if err != nil {
		sb.attn("the hosts' keyfiles were not compared: %v", firstLine(err.Error()))
		return
	}
	cs.Keyfiles = kfs
	for _, k := range kfs {
		if !k.Current {
			sb.attn("host %s: keyfile %s%s: run `pve-vault-agent keyfile enroll %s` (until then its agent cannot unseal, or leads with replaced tokens)", k.Host, k.State, errSuffix(k.Error), k.Host)
		}
	}
}

func errSuffix(e string) string {
	if e == "" {
		return ""
	}
	return " (" + e + ")"
}

// statusBuilder gathers one status: each part adds what it found and what needs
// attention, and never aborts the others.
type statusBuilder struct {
	env *Env
	now time.Time
	st  *Status
}

func (sb *statusBuilder) attn(format string, a ...any) {
	sb.st.Attention = append(sb.st.Attention, fmt.Sprintf(format, a...))
}

// nodes: VM state and address, hostPath owner and mode over SSH.
func (sb *statusBuilder) nodes(ctx context.Context) {
	cfg := sb.env.Config
	for _, n := range cfg.Nodes {
		ns := NodeStatus{Name: n.Name, HostPath: cfg.NodeHostPath(n)}
		conn, loc, err := sb.env.dial(ctx, n)
		ns.Address, ns.VMStatus = loc.Address, loc.Status
		if err != nil {
			sb.attn("%v", err)
			sb.st.Nodes = append(sb.st.Nodes, ns)
			continue
		}
		uid, gid, mode, err := conn.Stat(ctx, ns.HostPath)
		conn.Close()
		if err != nil {
			sb.attn("node %s: %s: %v (run provision)", n.Name, ns.HostPath, err)
		} else {
			ns.Owner, ns.Mode = fmt.Sprintf("%d:%d", uid, gid), mode
			if uid != cfg.Vault.UID || gid != cfg.Vault.GID || mode != cfg.Vault.DataMode.String() {
				sb.attn("node %s: %s is %d:%d %s, want %d:%d %s (run provision)", n.Name, ns.HostPath, uid, gid, mode, cfg.Vault.UID, cfg.Vault.GID, cfg.Vault.DataMode)
			}
		}
		sb.st.Nodes = append(sb.st.Nodes, ns)
	}
}

func (sb *statusBuilder) release(ctx context.Context) {
	cfg := sb.env.Config
	if cfg.Vault.PodAccess == "static" {
		return
	}
	cl, err := sb.env.Cluster(ctx)
	switch {
	case err != nil:
		sb.attn("kubernetes: %v", err)
	default:
		if sb.st.Release, err = cl.Release(cfg.Chart.Release); err != nil {
			sb.attn("helm: %v (run install)", err)
		} else if sb.st.Release.Status != "deployed" && !sb.st.Release.FromStatefulSet {
			sb.attn("helm release %s is %s (run install)", sb.st.Release.Name, sb.st.Release.Status)
		}
		if sb.st.Release != nil {
			sb.owner(ctx, cl)
		}
		if path, err := cl.LivenessPath(ctx, cfg.Chart.Release); err == nil {
			if w := k8s.LivenessWarning(path); w != "" {
				sb.st.Warnings = append(sb.st.Warnings, "StatefulSet "+cfg.Chart.Release+": "+w)
			}
		}
	}
}

// owner says who owns the release, whether that is what install.managed_by says, how
// the HelmRelease is, and which required values the live release lacks.
func (sb *statusBuilder) owner(ctx context.Context, cl *k8s.Cluster) {
	cfg := sb.env.Config
	o, err := cl.ReleaseOwner(ctx, cfg.Chart.Release)
	if err != nil {
		sb.attn("release owner: %v", err)
		return
	}
	sb.st.Owner = o
	for _, p := range ownerProblems(cfg, o) {
		sb.attn("%s", p)
	}
	if cfg.Install.ManagedBy == configs.ManagedByFlux {
		ns, name := cfg.FluxHelmRelease()
		hr, err := cl.HelmRelease(ctx, ns, name)
		switch {
		case err != nil:
			sb.attn("flux: %v", err)
		case hr.Suspended:
			sb.attn("HelmRelease %s/%s is suspended: a recover or restore that did not finish leaves it so; run it again, or `flux resume helmrelease -n %s %s`", ns, name, ns, name)
		case hr.Ready != "True":
			sb.attn("HelmRelease %s/%s is not Ready: %s: %s", ns, name, hr.Reason, hr.Message)
		}
		sb.st.HelmRelease = hr
	}
	d := &DriftStatus{Keys: []k8s.ValueDrift{}}
	sb.st.Drift = d
	keys, err := ValuesDrift(ctx, sb.env, cl, o.Release)
	if _, refused := k8s.ParseForbidden(err); refused {
		d.Why = "the operate account reads no Helm records: `pve-vault-agent config check` compares them with the install account"
		return
	}
	if err != nil {
		d.Why = err.Error()
		return
	}
	d.Checked, d.Keys = true, keys
	if cfg.Install.ManagedBy == configs.ManagedByAgent {
		return // the next install applies them; an adopted release keeps its own until then
	}
	for _, k := range keys {
		sb.attn("values drift: %s (put it in git: pve-vault-agent render)", k)
	}
}

// pods reads every pod's health and returns the active one (API nil when none).
func (sb *statusBuilder) pods(ctx context.Context) vaultPod {
	var active vaultPod
	acc, err := sb.env.Pods()
	if err != nil {
		sb.attn("vault pods: %v", err)
		return active
	}
	pods, err := acc.Pods(ctx)
	if err != nil {
		sb.attn("vault pods: %v", err)
	}
	sb.st.Rejected = acc.Rejected()
	for _, r := range sb.st.Rejected {
		sb.attn("pod %s carries the Vault server labels but is not a server pod of the release (%s): it gets no shares; find out who created it", r.Name, r.Reason)
	}
	for _, p := range pods {
		ps := PodStatus{Name: p.Name, Node: p.Node}
		h, err := p.API.Health(ctx)
		if err != nil {
			sb.attn("pod %s unreachable: %v", p.Name, err)
			sb.st.Pods = append(sb.st.Pods, ps)
			continue
		}
		ps.Initialized, ps.Sealed, ps.Active, ps.Version, ps.Health = h.Initialized, h.Sealed, h.Active, h.Version, h.Code()
		if h.Active {
			active = p
		}
		switch {
		case h.Removed:
			sb.attn("pod %s was removed from the Raft cluster (530): it sealed itself; run recover to wipe and rejoin it", p.Name)
		case !h.Initialized:
			sb.attn("pod %s is not initialised", p.Name)
		case h.Sealed:
			sb.attn("pod %s is sealed (is the daemon running? pve-vault-agent unseal)", p.Name)
		case h.HAUnhealthy:
			sb.attn("pod %s is a standby that cannot reach the active node (474)", p.Name)
		}
		sb.st.Pods = append(sb.st.Pods, ps)
	}
	if len(pods) > 0 && active.API == nil {
		sb.attn("no active Vault node")
	}
	return active
}

// keyfile: its metadata, and the agent's tokens as the active node sees them.
func (sb *statusBuilder) keyfile(ctx context.Context, active vaultPod) {
	kf, err := sb.env.Keyfile.Read(ctx)
	if err != nil {
		sb.attn("keyfile: %v", err)
		return
	}
	m := kf.Meta()
	sb.st.Keyfile = &m
	if active.API != nil {
		for _, t := range []struct {
			name string
			tok  vault.Token
		}{{"snapshot", kf.SnapshotToken}, {"operator", kf.OperatorToken}} {
			ts := lookupToken(ctx, sb.env, active.API, t.name, t.tok)
			sb.st.Tokens = append(sb.st.Tokens, ts)
			switch {
			case ts.Error != "":
				sb.attn("%s token: %s (pve-vault-agent token rotate)", t.name, ts.Error)
			case ts.Warning != "":
				sb.attn("%s", ts.Warning)
			}
		}
	}
	if err := sb.env.Keyfile.Stale(); err != nil {
		sb.attn("%v (%s)", err, strings.Join(Hints(err), "; "))
	}
}

// snapshots: the newest verified one, the schedule, and whether the unit may write the
// directory; it returns the stored snapshots (nil when unreadable).
func (sb *statusBuilder) snapshots(ctx context.Context) []snapshot.Entry {
	cfg, now := sb.env.Config, sb.now
	store, es, err := Snapshots(ctx, sb.env)
	resolved := ""
	if err == nil && cfg.Snapshots.ProxmoxStorage != "" {
		resolved = store.Dir
	}
	writable, _ := UnitWritable(ctx)
	sb.st.Warnings = append(sb.st.Warnings, WritablePathWarnings(cfg, writable, resolved)...)
	if err != nil {
		sb.attn("snapshots: %v", err)
		return nil
	}
	newest, ok := newestVerified(es)
	if !ok {
		sb.attn("no verified snapshot yet (pve-vault-agent backup-now)")
		return es
	}
	age := now.Sub(newest.Time)
	sb.st.LastSnapshot = &SnapshotStatus{Path: newest.Path, Age: age.Round(time.Second).String(), AgeSecs: age.Seconds(), Verified: newest.Verified}
	if cfg.Snapshots.Schedule != "" {
		sched, _ := configs.ParseSchedule(cfg.Snapshots.Schedule) // validated at load
		sb.st.NextBackup = NextRun(sched, newest.Time, now)
		if now.After(sched.Next(sched.Next(newest.Time))) {
			sb.attn("the newest snapshot is %s old: more than two backup periods", age.Round(time.Minute))
		}
	}
	return es
}

// offsite: each target's last push, and whether it has the newest snapshot.
func (sb *statusBuilder) offsite(es []snapshot.Entry) {
	newest := ""
	if e, ok := newestVerified(es); ok {
		newest = offsite.CopyName(e.Path)
	}
	sts, err := offsiteStatus(sb.env, newest)
	if err != nil {
		sb.attn("off-host records: %v", err)
		return
	}
	sb.st.Offsite = sts
	for _, s := range sts {
		switch {
		case s.LastError != "" && s.LastErrorAt.After(s.LastSuccess):
			sb.attn("off-host target %s failing since %s: %s", s.Target, s.LastErrorAt.Format(time.RFC3339), s.LastError)
		case s.Behind:
			sb.attn("off-host target %s lacks the newest snapshot (its newest: %q); the next backup pushes it", s.Target, s.Newest)
		}
		if want := sb.env.Config.Vault.RecoveryRecipient; s.RecoveryCopy != "" && !sameRecipient(s.RecoveryRecipient, want) {
			sb.attn("the recovery copy on %s (%s) is sealed to %s, not to vault.recovery_recipient %s: the offline key in the configuration cannot open it; the next backup pushes one that it can", s.Target, s.RecoveryCopy, orUnknown(s.RecoveryRecipient), want)
		}
	}
}

// recovery: what the local recovery copy is sealed to, against the configuration.
func (sb *statusBuilder) recovery() {
	want := sb.env.Config.Vault.RecoveryRecipient
	rec := RecoveryRecordOf(sb.env)
	st := &RecoveryStatus{Path: sb.env.recoveryPath(), Recipient: rec.Recipient, Configured: want}
	if _, err := os.Stat(st.Path); err != nil {
		if want != "" && sb.env.Keyfile.Exists() {
			sb.attn("no offline recovery copy of the keyfile at %s: the next backup writes it, sealed to vault.recovery_recipient", st.Path)
		}
		return
	}
	sb.st.RecoveryCopy = st
	st.Current = want == "" || sameRecipient(rec.Recipient, want)
	if !st.Current {
		sb.attn("the offline recovery copy is sealed to %s, not to vault.recovery_recipient %s: the next backup seals it again and pushes it", orUnknown(rec.Recipient), want)
	}
}

// RecoveryStatus says which key can open the keyfile's offline recovery copy.
type RecoveryStatus struct {
	Path       string `json:"path"`
	Recipient  string `json:"recipient"`  // what it is sealed to ("" before the agent recorded it)
	Configured string `json:"configured"` // vault.recovery_recipient
	Current    bool   `json:"current"`    // the configured key opens it
}

func orUnknown(s string) string {
	if s == "" {
		return "an unrecorded key"
	}
	return s
}

// drillStatus adds the last drill, and attention when it failed or, with a drill
// schedule, when the last one that passed is older than two periods.
func drillStatus(env *Env, st *Status, now time.Time, attn func(string, ...any)) {
	rec, err := LastDrill(env)
	if err != nil {
		attn("drill record: %v", err)
		return
	}
	if l := rec.Last; l != nil {
		st.LastDrill = &DrillStatus{Snapshot: l.Snapshot, At: l.Started, Age: now.Sub(l.Started).Round(time.Second).String(),
			Passed: l.Passed, Reason: l.Reason, DurationSecs: l.DurationSecs, LastSuccess: rec.LastSuccess}
		if !l.Passed {
			attn("the last restore drill failed (%s): %s", l.Started.Format(time.RFC3339), l.Reason)
		}
	}
	if env.Config.Snapshots.DrillSchedule == "" {
		return
	}
	sched, err := configs.ParseSchedule(env.Config.Snapshots.DrillSchedule)
	if err != nil {
		return // validated at load
	}
	switch {
	case rec.LastSuccess.IsZero():
		attn("no restore drill has passed yet (pve-vault-agent drill)")
	case now.After(sched.Next(sched.Next(rec.LastSuccess))):
		attn("the last restore drill that passed is %s old: more than two drill periods", now.Sub(rec.LastSuccess).Round(time.Minute))
	}
}
