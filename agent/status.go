package agent

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// Status is one screen of everything the agent looks after. Attention lists what needs
// the operator; empty means all is well.
type Status struct {
	Nodes        []NodeStatus     `json:"nodes"`
	Release      *k8s.ReleaseInfo `json:"release,omitempty"`
	Pods         []PodStatus      `json:"pods"`
	Keyfile      *vault.Meta      `json:"keyfile,omitempty"`
	LastSnapshot *SnapshotStatus  `json:"last_snapshot,omitempty"`
	NextBackup   time.Time        `json:"next_backup"`
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
	Version     string `json:"version,omitempty"`
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
func GetStatus(ctx context.Context, cfg *configs.Config, now time.Time, log *slog.Logger) *Status {
	st := &Status{Attention: []string{}, Pods: []PodStatus{}}
	attn := func(format string, a ...any) { st.Attention = append(st.Attention, fmt.Sprintf(format, a...)) }

	// Nodes: VM state and address, hostPath owner and mode over SSH.
	resolver, err := newResolver(cfg, cfg.Nodes, log)
	if err != nil {
		attn("proxmox: %v", err)
	}
	var sshCfg provision.SSHConfig
	if key, err := cfg.SSH.Identity.Read(); err != nil {
		attn("ssh.identity: %v", err)
	} else {
		sshCfg = provision.SSHConfig{User: cfg.SSH.User, Port: cfg.SSH.Port, Key: key.Bytes(), KnownHosts: cfg.SSH.KnownHosts, Sudo: cfg.SSH.Sudo,
			ConnectTimeout: cfg.SSH.ConnectTimeout, CommandTimeout: cfg.SSH.CommandTimeout}
	}
	for _, n := range cfg.Nodes {
		ns := NodeStatus{Name: n.Name, HostPath: cfg.NodeHostPath(n)}
		loc, err := resolver.Resolve(ctx, provision.Target{Name: n.Name, Address: n.Address, VMID: n.VMID, VMName: n.VMName})
		if err != nil {
			attn("%v", err)
			st.Nodes = append(st.Nodes, ns)
			continue
		}
		ns.Address, ns.VMStatus = loc.Address, loc.Status
		if sshCfg.Key != nil {
			if c, err := provision.Dial(ctx, loc.Address, sshCfg); err != nil {
				attn("node %s: %v", n.Name, err)
			} else {
				uid, gid, mode, err := c.Stat(ctx, ns.HostPath)
				c.Close()
				if err != nil {
					attn("node %s: %s: %v (run provision)", n.Name, ns.HostPath, err)
				} else {
					ns.Owner, ns.Mode = fmt.Sprintf("%d:%d", uid, gid), mode
					if uid != cfg.Vault.UID || gid != cfg.Vault.GID || mode != cfg.Vault.DataMode.String() {
						attn("node %s: %s is %d:%d %s, want %d:%d %s (run provision)", n.Name, ns.HostPath, uid, gid, mode, cfg.Vault.UID, cfg.Vault.GID, cfg.Vault.DataMode)
					}
				}
			}
		}
		st.Nodes = append(st.Nodes, ns)
	}

	// Release and pods.
	if cfg.Vault.PodAccess != "static" {
		cl, err := k8s.Connect(ctx, k8s.ClusterConfig{Kubeconfig: cfg.Kubernetes.Kubeconfig, Context: cfg.Kubernetes.Context, Namespace: cfg.Chart.Namespace}, log)
		if err != nil {
			attn("kubernetes: %v", err)
		} else if st.Release, err = cl.Release(cfg.Chart.Release); err != nil {
			attn("helm: %v (run install)", err)
		} else if st.Release.Status != "deployed" {
			attn("helm release %s is %s (run install)", st.Release.Name, st.Release.Status)
		}
	}
	if acc, err := newPodAccess(ctx, cfg, log); err != nil {
		attn("vault pods: %v", err)
	} else {
		pods, err := acc.Pods(ctx)
		if err != nil {
			attn("vault pods: %v", err)
		}
		active := false
		for _, p := range pods {
			ps := PodStatus{Name: p.Name, Node: p.Node}
			h, err := p.API.Health(ctx)
			if err != nil {
				attn("pod %s unreachable: %v", p.Name, err)
			} else {
				ps.Initialized, ps.Sealed, ps.Active, ps.Version = h.Initialized, h.Sealed, h.Active, h.Version
				active = active || h.Active
				switch {
				case !h.Initialized:
					attn("pod %s is not initialised", p.Name)
				case h.Sealed:
					attn("pod %s is sealed (is the daemon running? pve-vault-agent unseal)", p.Name)
				}
			}
			st.Pods = append(st.Pods, ps)
		}
		acc.Close()
		if len(pods) > 0 && !active {
			attn("no active Vault node")
		}
	}

	// Keyfile and snapshots.
	if s, err := sealer(cfg); err != nil {
		attn("keyfile: %v", err)
	} else if kf, err := vault.ReadKeyfile(ctx, cfg.Vault.Keyfile, s); err != nil {
		attn("keyfile: %v", err)
	} else {
		m := kf.Meta()
		st.Keyfile = &m
	}
	sched, _ := ParseSchedule(cfg.Snapshots.Schedule)
	if _, es, err := Snapshots(ctx, cfg, log); err != nil {
		attn("snapshots: %v", err)
	} else if len(es) == 0 {
		attn("no snapshot yet (pve-vault-agent backup-now)")
	} else {
		last := es[len(es)-1]
		age := now.Sub(last.Time)
		st.LastSnapshot = &SnapshotStatus{Path: last.Path, Age: age.Round(time.Second).String(), AgeSecs: age.Seconds(), Verified: last.Verified}
		if !last.Verified {
			attn("the newest snapshot has no manifest (snapshots verify)")
		}
		if sched != nil && now.After(sched.Next(sched.Next(last.Time))) {
			attn("the newest snapshot is %s old: more than two backup periods", age.Round(time.Minute))
		}
		if sched != nil {
			st.NextBackup = sched.Next(last.Time)
			if st.NextBackup.Before(now) {
				st.NextBackup = sched.Next(now)
			}
		}
	}
	return st
}
