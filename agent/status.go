package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot/offsite"
)

// Status is one screen of everything the agent looks after. Attention lists what needs
// the operator; empty means all is well.
type Status struct {
	Nodes        []NodeStatus     `json:"nodes"`
	Release      *k8s.ReleaseInfo `json:"release,omitempty"`
	Pods         []PodStatus      `json:"pods"`
	Rejected     []k8s.Rejected   `json:"rejected_pods,omitempty"`
	Keyfile      *vault.Meta      `json:"keyfile,omitempty"`
	Tokens       []TokenStatus    `json:"tokens,omitempty"`
	LastSnapshot *SnapshotStatus  `json:"last_snapshot,omitempty"`
	NextBackup   time.Time        `json:"next_backup,omitzero"`
	LastDrill    *DrillStatus     `json:"last_drill,omitempty"`
	Offsite      []OffsiteStatus  `json:"offsite,omitempty"`
	Warnings     []string         `json:"warnings"`
	Attention    []string         `json:"attention"`
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
	cfg, now := env.Config, env.Clock.Now()
	st := &Status{Attention: []string{}, Warnings: []string{}, Pods: []PodStatus{}}
	attn := func(format string, a ...any) { st.Attention = append(st.Attention, fmt.Sprintf(format, a...)) }
	if cfg.Vault.TLSCAFile == "" {
		st.Warnings = append(st.Warnings, tlsOffWarning)
	}

	// Nodes: VM state and address, hostPath owner and mode over SSH.
	for _, n := range cfg.Nodes {
		ns := NodeStatus{Name: n.Name, HostPath: cfg.NodeHostPath(n)}
		conn, loc, err := env.dial(ctx, n)
		ns.Address, ns.VMStatus = loc.Address, loc.Status
		if err != nil {
			attn("%v", err)
			st.Nodes = append(st.Nodes, ns)
			continue
		}
		uid, gid, mode, err := conn.Stat(ctx, ns.HostPath)
		conn.Close()
		if err != nil {
			attn("node %s: %s: %v (run provision)", n.Name, ns.HostPath, err)
		} else {
			ns.Owner, ns.Mode = fmt.Sprintf("%d:%d", uid, gid), mode
			if uid != cfg.Vault.UID || gid != cfg.Vault.GID || mode != cfg.Vault.DataMode.String() {
				attn("node %s: %s is %d:%d %s, want %d:%d %s (run provision)", n.Name, ns.HostPath, uid, gid, mode, cfg.Vault.UID, cfg.Vault.GID, cfg.Vault.DataMode)
			}
		}
		st.Nodes = append(st.Nodes, ns)
	}

	// Release and pods.
	if cfg.Vault.PodAccess != "static" {
		if cl, err := env.Cluster(ctx); err != nil {
			attn("kubernetes: %v", err)
		} else if st.Release, err = cl.Release(cfg.Chart.Release); err != nil {
			attn("helm: %v (run install)", err)
		} else if st.Release.Status != "deployed" {
			attn("helm release %s is %s (run install)", st.Release.Name, st.Release.Status)
		}
	}
	var active vaultPod
	if acc, err := env.Pods(); err != nil {
		attn("vault pods: %v", err)
	} else {
		pods, err := acc.Pods(ctx)
		if err != nil {
			attn("vault pods: %v", err)
		}
		st.Rejected = acc.Rejected()
		for _, r := range st.Rejected {
			attn("pod %s carries the Vault server labels but is not a server pod of the release (%s): it gets no shares; find out who created it", r.Name, r.Reason)
		}
		for _, p := range pods {
			ps := PodStatus{Name: p.Name, Node: p.Node}
			h, err := p.API.Health(ctx)
			if err != nil {
				attn("pod %s unreachable: %v", p.Name, err)
				st.Pods = append(st.Pods, ps)
				continue
			}
			ps.Initialized, ps.Sealed, ps.Active, ps.Version, ps.Health = h.Initialized, h.Sealed, h.Active, h.Version, h.Code()
			if h.Active {
				active = p
			}
			switch {
			case h.Removed:
				attn("pod %s was removed from the Raft cluster (530): it sealed itself; run recover to wipe and rejoin it", p.Name)
			case !h.Initialized:
				attn("pod %s is not initialised", p.Name)
			case h.Sealed:
				attn("pod %s is sealed (is the daemon running? pve-vault-agent unseal)", p.Name)
			case h.HAUnhealthy:
				attn("pod %s is a standby that cannot reach the active node (474)", p.Name)
			}
			st.Pods = append(st.Pods, ps)
		}
		if len(pods) > 0 && active.API == nil {
			attn("no active Vault node")
		}
	}

	// Keyfile and tokens.
	if kf, err := env.Keyfile.Read(ctx); err != nil {
		attn("keyfile: %v", err)
	} else {
		m := kf.Meta()
		st.Keyfile = &m
		if active.API != nil {
			for _, t := range []struct {
				name string
				tok  vault.Token
			}{{"snapshot", kf.SnapshotToken}, {"operator", kf.OperatorToken}} {
				ts := lookupToken(ctx, env, active.API, t.name, t.tok)
				st.Tokens = append(st.Tokens, ts)
				switch {
				case ts.Error != "":
					attn("%s token: %s (pve-vault-agent token rotate)", t.name, ts.Error)
				case ts.Warning != "":
					attn("%s", ts.Warning)
				}
			}
		}
		if env.Keyfile.Modified() {
			attn("the keyfile on disk changed after the service loaded it (a rotation): restart the service (systemctl restart pve-vault-agent)")
		}
	}

	// Snapshots and the schedule.
	var sched configs.Schedule
	if cfg.Snapshots.Schedule != "" {
		sched, _ = configs.ParseSchedule(cfg.Snapshots.Schedule) // validated at load
	}
	store, es, err := Snapshots(ctx, env)
	resolved := ""
	if err == nil && cfg.Snapshots.ProxmoxStorage != "" {
		resolved = store.Dir
	}
	writable, _ := UnitWritable(ctx)
	st.Warnings = append(st.Warnings, WritablePathWarnings(cfg, writable, resolved)...)
	if err != nil {
		attn("snapshots: %v", err)
	} else if newest, ok := newestVerified(es); !ok {
		attn("no verified snapshot yet (pve-vault-agent backup-now)")
	} else {
		age := now.Sub(newest.Time)
		st.LastSnapshot = &SnapshotStatus{Path: newest.Path, Age: age.Round(time.Second).String(), AgeSecs: age.Seconds(), Verified: newest.Verified}
		if sched != nil {
			st.NextBackup = NextRun(sched, newest.Time, now)
			if now.After(sched.Next(sched.Next(newest.Time))) {
				attn("the newest snapshot is %s old: more than two backup periods", age.Round(time.Minute))
			}
		}
	}
	drillStatus(env, st, now, attn)
	newest := ""
	if e, ok := newestVerified(es); ok && err == nil {
		newest = offsite.CopyName(e.Path)
	}
	if sts, err := offsiteStatus(env, newest); err != nil {
		attn("off-host records: %v", err)
	} else {
		st.Offsite = sts
		for _, s := range sts {
			switch {
			case s.LastError != "" && s.LastErrorAt.After(s.LastSuccess):
				attn("off-host target %s failing since %s: %s", s.Target, s.LastErrorAt.Format(time.RFC3339), s.LastError)
			case s.Behind:
				attn("off-host target %s lacks the newest snapshot (its newest: %q); the next backup pushes it", s.Target, s.Newest)
			}
		}
	}
	return st
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
