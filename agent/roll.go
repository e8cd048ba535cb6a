package agent

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// ErrRollStopped means a roll stopped at a pod that did not come back healthy; the
// report lists what is left, and nothing more was deleted.
var ErrRollStopped = errors.New("roll stopped")

// RollReport is what a roll did and what it left.
type RollReport struct {
	Target string   `json:"target_revision"`
	Active string   `json:"active_before,omitempty"`
	Rolled []string `json:"rolled"`
	Left   []string `json:"left,omitempty"`
}

// Roll replaces every server pod not on the StatefulSet's update revision (the chart's
// OnDelete strategy restarts nothing by itself), the way Vault's documentation asks:
// every pod unsealed first; standbys one at a time, lowest ordinal first (delete, wait
// until it runs, unseal it, wait until it has rejoined and autopilot counts it a
// healthy voter); then the active node steps down and is rolled last. A pod that does
// not come back healthy within the wait stops the roll: the error says which, the
// report what is left, and no other pod is deleted. Before Vault is initialised (no
// keyfile) pods are simply replaced one at a time.
func Roll(ctx context.Context, env *Env, cl *k8s.Cluster) (*RollReport, error) {
	release := env.Config.Chart.Release
	rep := &RollReport{}
	target, err := cl.UpdateRevision(ctx, release, env.Config.Chart.Timeout)
	if err != nil {
		return rep, err
	}
	rep.Target = target
	pods, err := env.openPods(ctx)
	if err != nil {
		return rep, err
	}
	var old []vaultPod
	for _, p := range pods {
		if p.Revision != target {
			old = append(old, p)
		}
	}
	if len(old) == 0 {
		return rep, nil
	}
	var kf *vault.Keyfile
	if env.Keyfile.Exists() {
		if kf, err = env.Keyfile.Read(ctx); err != nil {
			return rep, err
		}
		// Every pod open and a healthy voter before anything goes down: rolling beside
		// a sealed pod, or one autopilot has not promoted yet (right after a join), would
		// take the cluster below quorum.
		for _, p := range pods {
			err := env.unsealPod(ctx, p, kf.Keyset, env.Waits.Join)
			if err == nil && len(pods) > 1 {
				err = env.waitHealthyMember(ctx, p, kf)
			}
			if err != nil {
				return rep, withHint(fmt.Errorf("%w before it began: %s: %w", ErrRollStopped, p.Name, err), "bring every pod back unsealed and voting (pve-vault-agent unseal, status), then run it again; nothing was deleted")
			}
		}
	}
	// Order: standbys by ordinal, the active node last.
	active := ""
	if kf != nil {
		if a, _, err := findActive(ctx, env); err == nil {
			active = a.Name
		}
	}
	rep.Active = active
	sort.SliceStable(old, func(i, j int) bool {
		if (old[i].Name == active) != (old[j].Name == active) {
			return old[j].Name == active
		}
		return old[i].Ordinal < old[j].Ordinal
	})
	for i, p := range old {
		if p.Name == active && len(pods) > 1 {
			if err := env.stepDown(ctx, p, kf); err != nil {
				rep.Left = names(old[i:])
				return rep, withHint(fmt.Errorf("%w: %s would not hand over leadership: %w", ErrRollStopped, p.Name, err), "nothing more was deleted; check the cluster (pve-vault-agent status) and run it again (pve-vault-agent roll rolls what is left)")
			}
		}
		env.Log.Info("rolling pod to the new revision", "pod", p.Name, "from", p.Revision, "to", target, "active", p.Name == active)
		if err := rollOne(ctx, env, cl, p, kf); err != nil {
			rep.Left = names(old[i:])
			return rep, withHint(fmt.Errorf("%w at %s: %w", ErrRollStopped, p.Name, err),
				"nothing more was deleted; still on the old revision: %s. Fix %s (pve-vault-agent status, kubectl describe pod), then run pve-vault-agent roll", strings.Join(rep.Left, ", "), p.Name)
		}
		rep.Rolled = append(rep.Rolled, p.Name)
	}
	return rep, nil
}

// RollPodsReport is what `roll` did.
type RollPodsReport struct {
	Snapshot string `json:"snapshot,omitempty"` // taken and verified before the first pod went down
	RollReport
}

// RollPods rolls the pods a change of the StatefulSet left on the old revision: an
// upgrade Flux, Argo CD or helm by hand applied (the chart's OnDelete strategy, which
// the agent's values set, restarts nothing by itself). As install does after its own
// upgrades: a verified snapshot first (when the agent holds the keyfile), then Roll.
// Nothing to roll: nothing is done. Safe to re-run after a stop.
func RollPods(ctx context.Context, env *Env) (*RollPodsReport, error) {
	rep := &RollPodsReport{}
	cl, err := env.InstallCluster(ctx)
	if err != nil {
		return rep, err
	}
	target, err := cl.UpdateRevision(ctx, env.Config.Chart.Release, env.Config.Chart.Timeout)
	if err != nil {
		return rep, err
	}
	pods, err := env.openPods(ctx)
	if err != nil {
		return rep, err
	}
	rep.Target = target
	var old []string
	for _, p := range pods {
		if p.Revision != target {
			old = append(old, p.Name)
		}
	}
	if len(old) == 0 {
		return rep, nil
	}
	if env.Keyfile.Exists() {
		b, err := BackupNow(ctx, env, BackupOptions{})
		if err != nil {
			return rep, withHint(fmt.Errorf("no verified snapshot, so no pod is rolled: %w", err), "fix the backup (pve-vault-agent backup-now) and run roll again; nothing was changed")
		}
		rep.Snapshot = b.Snapshot.Path
	}
	env.Log.Info("rolling the pods left on the old revision", "pods", strings.Join(old, ","), "to", target)
	rr, err := Roll(ctx, env, cl)
	rep.RollReport = *rr
	return rep, err
}

// rollOne replaces one pod and waits until its successor is a healthy member again.
func rollOne(ctx context.Context, env *Env, cl *k8s.Cluster, p vaultPod, kf *vault.Keyfile) error {
	if err := cl.DeletePod(ctx, p.Pod); err != nil {
		return err
	}
	np, err := cl.WaitReplaced(ctx, env.Config.Chart.Release, p.Pod, env.Config.Chart.Timeout)
	if err != nil {
		return err
	}
	if kf == nil {
		return nil
	}
	pod, err := env.podNamed(ctx, np.Name, np.UID)
	if err != nil {
		return err
	}
	if err := env.unsealPod(ctx, pod, kf.Keyset, env.Waits.Join); err != nil {
		return err
	}
	return env.waitHealthyMember(ctx, pod, kf)
}

// waitHealthyMember waits until p answers as an unsealed member of a cluster with an
// active node and, with the operator token, autopilot counts it a healthy voter.
func (e *Env) waitHealthyMember(ctx context.Context, p vaultPod, kf *vault.Keyfile) error {
	return poll(ctx, e.Clock, e.Waits.Poll, e.Waits.Join, p.Name+" to rejoin as a healthy voter", func(ctx context.Context) error {
		h, err := p.API.Health(ctx)
		switch {
		case err != nil:
			return err
		case h.Removed:
			return permanent(fmt.Errorf("%s: %w", p.Name, vault.ErrRemoved))
		case h.Sealed || !h.Initialized:
			return fmt.Errorf("sealed=%v initialised=%v", h.Sealed, h.Initialized)
		case h.HAUnhealthy:
			return errors.New("standby cannot reach the active node (474)")
		}
		if kf.OperatorToken.Empty() {
			return nil
		}
		leader, _, err := findActive(ctx, e)
		if err != nil {
			return err
		}
		ap, err := leader.API.Autopilot(ctx, kf.OperatorToken)
		if err != nil {
			return err
		}
		s, ok := ap.Servers[p.Name]
		switch {
		case !ok:
			return fmt.Errorf("autopilot does not list %s yet", p.Name)
		case !s.Healthy || !s.Voter:
			return fmt.Errorf("autopilot: healthy=%v voter=%v (%s)", s.Healthy, s.Voter, s.Status)
		}
		return nil
	})
}

// stepDown makes the active pod hand leadership to another node and waits until one
// has it.
func (e *Env) stepDown(ctx context.Context, p vaultPod, kf *vault.Keyfile) error {
	if kf == nil || kf.OperatorToken.Empty() {
		return hintf("run `pve-vault-agent token rotate` to mint one", "the keyfile holds no operator token to step %s down with", p.Name)
	}
	if err := p.API.StepDown(ctx, kf.OperatorToken); err != nil {
		return err
	}
	return poll(ctx, e.Clock, e.Waits.Poll, e.Waits.Election, "another node to become active", func(ctx context.Context) error {
		a, _, err := activeOnce(ctx, e)
		if err != nil {
			return err
		}
		if a.API == nil || a.Name == p.Name {
			return errNotYet
		}
		return nil
	})
}

// podNamed finds the running server pod of that name (and UID, when given).
func (e *Env) podNamed(ctx context.Context, name, uid string) (vaultPod, error) {
	var found vaultPod
	err := poll(ctx, e.Clock, e.Waits.Poll, e.Waits.Join, "pod "+name+" to be reachable", func(ctx context.Context) error {
		pods, err := e.openPods(ctx)
		if err != nil {
			return err
		}
		for _, p := range pods {
			if p.Name == name && (uid == "" || p.UID == uid) {
				found = p
				return nil
			}
		}
		return errNotYet
	})
	return found, err
}

func names(ps []vaultPod) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.Name
	}
	return out
}
