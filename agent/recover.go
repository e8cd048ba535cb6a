package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// Refusals of recover and restore, made before anything changes.
var (
	ErrUnknownKeyset = errors.New("the keyfile does not hold this snapshot's keys")
	ErrOtherCluster  = errors.New("the pod holds another cluster's data")
)

// RecoverOptions choose the snapshot and what to do.
type RecoverOptions struct {
	// Snapshot is a file; empty means the newest verified one in the store.
	Snapshot string
	// DryRun checks the snapshot and keys and returns the plan; changes nothing.
	DryRun bool
	// AuthTokenFile authorises minting the agent's tokens when the snapshot brings back
	// none that is valid (one older than the tokens' period, or imported from before
	// adopt): a token valid in that snapshot.
	AuthTokenFile string
}

// RecoverReport is the plan and the steps taken.
type RecoverReport struct {
	Snapshot string             `json:"snapshot"`
	Manifest *snapshot.Manifest `json:"manifest"`
	Plan     []PlanStep         `json:"plan"`
	Opened   string             `json:"opened,omitempty"` // how the first pod was opened
	Restored bool               `json:"restored"`         // the snapshot was written into an empty node
	Steps    []StepResult       `json:"steps"`
}

type recoverState struct {
	env       *Env
	opts      RecoverOptions
	kf        *vault.Keyfile
	pods      []vaultPod
	first     vaultPod
	throwaway *vault.Keyfile // its OperatorToken field holds the throwaway's root token
	hold      *fluxHold      // the HelmRelease suspended while the data is restored (managed_by flux)
	restored  bool           // the data is the snapshot's (or was never lost): no restore
	rep       *RecoverReport
}

var recoverSteps = []step[recoverState]{
	{"check", "check the snapshot offline and that the keyfile holds its keys", (*recoverState).check},
	{"provision", "provision the hostPath on every node", (*recoverState).provision},
	{"suspend", "managed_by flux: suspend the HelmRelease while Vault's data is restored", (*recoverState).suspend},
	{"install", "install the chart and wait for the pods (managed_by flux, argocd, external: wait for the pods git brings back)", (*recoverState).install},
	{"open", "open the first pod: a throwaway init when its data is gone (resumes an interrupted recover)", (*recoverState).open},
	{"restore", "restore the snapshot into it (snapshot-force, with the throwaway's own root token)", (*recoverState).restore},
	{"unseal", "wait until the restore is applied, unseal with the snapshot's keys", (*recoverState).unseal},
	{"followers", "join and unseal the other pods (wiping a removed node first), remove stale Raft peers", (*recoverState).followers},
	{"tokens", "check the agent's tokens; replace any the snapshot brought back expired", (*recoverState).tokens},
	{"verify", "verify every pod is unsealed and one is active", (*recoverState).verify},
	{"resume", "managed_by flux: resume the HelmRelease and wait until it is Ready", (*recoverState).resume},
}

// RecoverPlan is recover's plan, for printing.
func RecoverPlan() []PlanStep { return planOf(recoverSteps) }

// Recover brings Vault back after a node rebuild. Every step checks state first, so a
// re-run after a failure or a kill continues where it stopped: a throwaway cluster's
// keys are sealed next to the keyfile until the restore is done. A snapshot whose keys
// the keyfile does not hold is refused before anything changes.
func Recover(ctx context.Context, env *Env, opts RecoverOptions) (*RecoverReport, error) {
	s := &recoverState{env: env, opts: opts, rep: &RecoverReport{Plan: RecoverPlan()}, hold: newFluxHold(env)}
	steps := recoverSteps
	if opts.DryRun {
		steps = steps[:1]
	}
	return s.rep, s.hold.failed(runSteps(ctx, env, "recover", steps, s, &s.rep.Steps))
}

func (s *recoverState) throwawayPath() string {
	return s.env.Config.Vault.Keyfile + ".recover-throwaway"
}
func (s *recoverState) pendingPath() string { return s.throwawayPath() + ".pending" }

// removeThrowaway deletes the throwaway files: in every branch that no longer needs them.
func (s *recoverState) removeThrowaway() error {
	for _, p := range []string{s.throwawayPath(), s.pendingPath()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

func (s *recoverState) check(ctx context.Context) (string, error) {
	path, m, err := chooseSnapshot(ctx, s.env, s.opts.Snapshot)
	if err != nil {
		return "", err
	}
	s.rep.Snapshot, s.rep.Manifest = path, m
	if s.kf, err = s.env.Keyfile.Read(ctx); err != nil {
		return "", err
	}
	if err := checkKeyset(s.env, path, m, s.kf); err != nil {
		return "", err
	}
	if age := s.env.Clock.Now().Sub(m.Created); age > s.env.Config.Vault.TokenPeriod {
		s.env.Log.Warn("the snapshot is older than the agent tokens' period: the tokens it brings back are expired; Vault will be restored and unsealed, but minting new tokens under Vault 2.x needs a valid token (see token rotate --auth-token-file)",
			"age", age.Round(time.Hour), "token_period", s.env.Config.Vault.TokenPeriod)
	}
	return fmt.Sprintf("%s (raft index %d, keyset %s)", path, m.RaftIndex, m.KeysetFingerprint), nil
}

func (s *recoverState) provision(ctx context.Context) (string, error) {
	res, err := Provision(ctx, s.env, ProvisionOptions{})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d node(s) ready", len(res)), nil
}

func (s *recoverState) suspend(ctx context.Context) (string, error) { return s.hold.suspend(ctx) }
func (s *recoverState) resume(ctx context.Context) (string, error)  { return s.hold.resume(ctx) }

func (s *recoverState) install(ctx context.Context) (string, error) {
	if s.env.Config.Install.ManagedBy != configs.ManagedByAgent {
		if err := s.waitGitRelease(ctx); err != nil {
			return "", err
		}
		return s.podsRunning(ctx, "release kept by "+managedBy(s.env.Config)+", not changed")
	}
	r, err := Install(ctx, s.env, InstallOptions{NoSnapshot: true})
	installed := ""
	switch {
	case errors.Is(err, ErrImmutable):
		// A release installed another way, on the operator's volumes (adopted): it stays
		// as it is; the StatefulSet brings the pods back by itself.
		s.env.Log.Info("the release was installed another way: recover leaves it as it is and waits for its pods", "release", s.env.Config.Chart.Release)
		cl, err := s.env.InstallCluster(ctx)
		if err != nil {
			return "", err
		}
		if _, err := cl.WaitRunning(ctx, s.env.Config.Chart.Release, len(s.env.Config.Nodes), s.env.Config.Chart.Timeout); err != nil {
			return "", err
		}
		installed = "release installed another way, left as it is"
	case err != nil:
		return "", err
	default:
		installed = fmt.Sprintf("release %s revision %d", r.Action, r.Revision)
	}
	return s.podsRunning(ctx, installed)
}

// podsRunning opens the running pods, the first of them the one recover opens.
func (s *recoverState) podsRunning(ctx context.Context, installed string) (string, error) {
	var err error
	if s.pods, err = s.env.openPods(ctx); err != nil {
		return "", err
	}
	s.first = s.pods[0]
	return fmt.Sprintf("%s, %d pod(s) running", installed, len(s.pods)), nil
}

// waitGitRelease is recover's install step for a release git or another tool keeps:
// the agent runs no Helm; the StatefulSet is there (else the owner has not brought it
// back yet) and its pods come back by themselves onto the provisioned hostPaths.
func (s *recoverState) waitGitRelease(ctx context.Context) error {
	cfg := s.env.Config
	cl, err := s.env.InstallCluster(ctx)
	if err != nil {
		return err
	}
	o, err := cl.ReleaseOwner(ctx, cfg.Chart.Release)
	if err != nil {
		return err
	}
	if o.Kind == k8s.OwnerNone {
		return hintf(fmt.Sprintf("install.managed_by is %s: let it install Vault first (for Flux: `flux reconcile helmrelease`), then run recover again", cfg.Install.ManagedBy),
			"no Vault StatefulSet in namespace %s: %s has not installed the release", cl.Namespace(), managedBy(cfg))
	}
	s.env.Log.Info("recover: the release is kept by its owner; waiting for its pods", "owner", o.String(), "evidence", o.Evidence)
	_, err = cl.WaitRunning(ctx, cfg.Chart.Release, len(cfg.Nodes), cfg.Chart.Timeout)
	return err
}

// facts reads what decideOpen needs.
func (s *recoverState) facts(ctx context.Context) (openFacts, error) {
	f := openFacts{KeyfileCluster: s.kf.ClusterID}
	st, err := s.first.API.SealStatus(ctx)
	if err != nil {
		return f, err
	}
	f.Initialized, f.Sealed, f.ClusterID = st.Initialized, st.Sealed, st.ClusterID
	for _, p := range s.pods {
		if h, err := p.API.Health(ctx); err == nil && h.Initialized && !h.Sealed && h.ClusterID != "" && h.ClusterID == s.kf.ClusterID {
			f.OursOpen = true
		}
	}
	if vault.KeyfileExists(s.throwawayPath()) {
		sealer, err := s.env.Keyfile.Sealer()
		if err != nil {
			return f, err
		}
		if s.throwaway, err = vault.ReadKeyfile(ctx, s.throwawayPath(), sealer); err != nil {
			return f, fmt.Errorf("throwaway keys of an interrupted recover: %w", err)
		}
		f.Throwaway, f.ThrowawayCluster = true, s.throwaway.ClusterID
	}
	_, err = os.Stat(s.pendingPath())
	f.PendingInit = err == nil
	return f, nil
}

func (s *recoverState) open(ctx context.Context) (string, error) {
	f, err := s.facts(ctx)
	if err != nil {
		return "", err
	}
	action, why := decideOpen(f)
	s.rep.Opened = string(action)
	s.env.Log.Info("recover: opening the first pod", "pod", s.first.Name, "action", action, "why", why)
	switch action {
	case openOurs:
		s.restored = true
		return why, s.removeThrowaway()
	case openRefuse:
		return "", withHint(fmt.Errorf("%w: %s: %s", ErrOtherCluster, s.first.Name, why), "recover will not overwrite it; point the configuration at the right node, or empty that node's data yourself")
	case openUnsealOurs:
		if err := s.env.unsealPod(ctx, s.first, s.kf.Keyset, s.env.Waits.Join); err != nil {
			if errors.Is(err, vault.ErrWrongKeys) {
				return "", withHint(fmt.Errorf("%w: %s is initialised and opens neither with the keyfile nor with throwaway keys", ErrOtherCluster, s.first.Name), "recover will not overwrite it")
			}
			return "", err
		}
		s.restored = true
		return "unsealed with the keyfile: the cluster's data is there, no restore needed", s.removeThrowaway()
	case openUnsealThrowaway:
		err := s.env.unsealPod(ctx, s.first, s.throwaway.Keyset, s.env.Waits.Join)
		if errors.Is(err, vault.ErrWrongKeys) {
			// The restore went through before the interruption: the data, and so the
			// keyring, are the snapshot's now. The unseal step opens it.
			s.restored = true
			s.rep.Restored = true
			return "the interrupted recover had restored the snapshot already", nil
		}
		if err != nil {
			return "", err
		}
		if _, err := s.env.waitActive(ctx, s.first.API); err != nil {
			return "", err
		}
		return "resumed the throwaway cluster of an interrupted recover", nil
	case openResume:
		return why, nil
	case openWipeLost:
		if err := s.wipeAndRestart(ctx, s.first); err != nil {
			return "", err
		}
		if err := os.Remove(s.pendingPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
		fallthrough
	case openThrowawayInit:
		if err := s.removeThrowaway(); err != nil {
			return "", err
		}
		return s.throwawayInit(ctx)
	}
	return "", fmt.Errorf("recover: unknown action %s", action)
}

// throwawayInit initialises the empty first pod with throwaway keys (the same shares and
// threshold as the keyfile: after snapshot-force Vault keeps the running seal
// configuration until it restarts, so the snapshot's keys must fit it). Init and the
// write of its keys run under a context an interruption does not cancel; a pending
// marker written before lets a re-run recognise the one case a kill -9 leaves.
func (s *recoverState) throwawayInit(ctx context.Context) (string, error) {
	if err := s.env.waitUninitialised(ctx, s.first); err != nil {
		return "", err
	}
	if err := os.WriteFile(s.pendingPath(), []byte(s.first.Name+" "+s.first.UID+"\n"), 0o600); err != nil {
		return "", err
	}
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	res, err := s.first.API.Init(uctx, len(s.kf.Keyset.Keys), s.kf.Keyset.Threshold)
	if err != nil {
		return "", err
	}
	s.throwaway = &vault.Keyfile{Keyset: res.Keyset, OperatorToken: res.RootToken, Created: s.env.Clock.Now().UTC()}
	sealer, err := s.env.Keyfile.Sealer()
	if err == nil {
		err = vault.WriteKeyfile(uctx, s.throwawayPath(), s.throwaway, sealer, true)
	}
	if err != nil {
		return "", fmt.Errorf("store the throwaway keys: %w", err)
	}
	if err := os.Remove(s.pendingPath()); err != nil {
		return "", err
	}
	if err := s.env.unsealPod(ctx, s.first, s.throwaway.Keyset, s.env.Waits.Join); err != nil {
		return "", err
	}
	h, err := s.env.waitActive(ctx, s.first.API)
	if err != nil {
		return "", err
	}
	s.throwaway.ClusterID = h.ClusterID
	if err := vault.WriteKeyfile(ctx, s.throwawayPath(), s.throwaway, sealer, false); err != nil {
		return "", fmt.Errorf("record the throwaway cluster: %w", err)
	}
	return "initialised a throwaway cluster on " + s.first.Name, nil
}

func (s *recoverState) restore(ctx context.Context) (string, error) {
	if s.restored {
		return "skipped: already restored", nil
	}
	f, err := os.Open(s.rep.Snapshot)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := s.first.API.RestoreSnapshot(ctx, s.throwaway.OperatorToken, f, true, s.env.Config.Snapshots.IdleTimeout); err != nil {
		return "", err
	}
	s.rep.Restored = true
	return fmt.Sprintf("uploaded %s into %s", s.rep.Snapshot, s.first.Name), nil
}

// unseal waits until the restore has been applied (Vault 2.x applies it after the upload
// returns; a forced restore then seals Vault) and unseals with the keyfile: done when
// the pod is active with the snapshot's cluster id.
func (s *recoverState) unseal(ctx context.Context) (string, error) {
	want := s.rep.Manifest.ClusterID
	if want == "" {
		want = s.kf.ClusterID
	}
	if s.restored && !s.rep.Restored {
		return "skipped: already open", nil
	}
	err := awaitRestored(ctx, s.env, s.first, s.kf, want, s.throwawayCluster())
	if err != nil {
		return "", err
	}
	if err := s.removeThrowaway(); err != nil {
		return "", err
	}
	return s.first.Name + " unsealed with the snapshot's keys, cluster " + want, nil
}

func (s *recoverState) throwawayCluster() string {
	if s.throwaway == nil {
		return ""
	}
	return s.throwaway.ClusterID
}

// awaitRestored waits until p serves the restored data: sealed by the forced restore and
// unsealed with the keyfile, or already unsealed (by the daemon) with the snapshot's
// cluster id. While it still answers as the old cluster, the restore is not applied yet.
func awaitRestored(ctx context.Context, env *Env, p vaultPod, kf *vault.Keyfile, wantCluster, oldCluster string) error {
	return poll(ctx, env.Clock, env.Waits.Poll, env.Waits.Restore, p.Name+" to serve the restored snapshot", func(ctx context.Context) error {
		st, err := p.API.SealStatus(ctx)
		if err != nil {
			return err
		}
		if st.Sealed {
			res, err := p.API.Unseal(ctx, kf.Keyset, env.Log)
			if err != nil {
				// Right after a restore Vault may still report the throwaway cluster's
				// seal configuration: keep trying until the restored one shows.
				return err
			}
			if res.Sealed {
				return errNotYet
			}
		}
		h, err := p.API.Health(ctx)
		switch {
		case err != nil:
			return err
		case h.Sealed:
			return errNotYet
		case h.ClusterID != "" && h.ClusterID == oldCluster && oldCluster != wantCluster:
			return fmt.Errorf("still the old cluster %s: the restore is not applied yet", oldCluster)
		case wantCluster != "" && h.ClusterID != wantCluster:
			return fmt.Errorf("cluster %s, want %s", h.ClusterID, wantCluster)
		case !h.Active:
			return errors.New("unsealed, not active yet")
		}
		return nil
	})
}

func (s *recoverState) followers(ctx context.Context) (string, error) {
	if len(s.pods) == 1 {
		return "single node: nothing to join", nil
	}
	env := s.env
	wiped := 0
	for _, p := range s.pods {
		st, err := p.API.SealStatus(ctx)
		if err == nil && st.Initialized && !st.Sealed {
			continue
		}
		if err == nil && st.Removed {
			// Vault 1.19+: a node removed from the Raft configuration refuses to rejoin
			// while it holds data. Empty it and let a fresh pod join.
			if err := s.wipeAndRestart(ctx, p); err != nil {
				return "", err
			}
			wiped++
			if p, err = env.podNamed(ctx, p.Name, ""); err != nil {
				return "", err
			}
		}
		if err := env.unsealPod(ctx, p, s.kf.Keyset, env.Waits.Join); err != nil {
			return "", fmt.Errorf("unseal follower %s: %w", p.Name, err)
		}
	}
	leader, _, err := findActive(ctx, env)
	if err != nil {
		return "", err
	}
	op, _, err := validOperatorToken(ctx, leader, s.kf)
	if err != nil {
		return "", err
	}
	peers, err := leader.API.RaftPeers(ctx, op)
	if err != nil {
		return "", err
	}
	live := map[string]bool{}
	for _, p := range s.pods {
		live[p.Name] = true
	}
	removed := 0
	for _, peer := range peers {
		if !live[peer.NodeID] {
			if err := leader.API.RemovePeer(ctx, op, peer.NodeID); err != nil {
				return "", err
			}
			env.Log.Info("removed a stale raft peer", "node_id", peer.NodeID, "address", peer.Address)
			removed++
		}
	}
	return fmt.Sprintf("%d follower(s) unsealed, %d wiped before rejoining, %d stale peer(s) removed", len(s.pods)-1, wiped, removed), nil
}

// wipeAndRestart empties a pod's data directory on its node and brings a fresh pod up on
// the empty directory. No Vault process may have the directory open while it is
// emptied, or start on it half-emptied: the directory is first set aside (renamed: from
// then on a pod cannot mount it), the pod is deleted and awaited until it is gone (its
// containers have stopped), then the data set aside is deleted and an empty directory
// made in its place. A replacement the StatefulSet created meanwhile (stuck on the
// missing directory) is deleted so it starts at once. The fresh first pod must answer as
// uninitialised; a fresh follower may already have joined through retry_join, but must
// not answer as the removed node.
func (s *recoverState) wipeAndRestart(ctx context.Context, p vaultPod) error {
	env := s.env
	n, ok := env.node(p.Node)
	if !ok {
		return fmt.Errorf("pod %s runs on node %s, which is not configured", p.Name, p.Node)
	}
	conn, _, err := env.dial(ctx, n)
	if err != nil {
		return err
	}
	defer conn.Close()
	cl, err := env.InstallCluster(ctx)
	if err != nil {
		return err
	}
	timeout := env.Config.Chart.Timeout
	if err := conn.SetAside(ctx, env.Config.NodeHostPath(n)); err != nil {
		if errors.Is(err, provision.ErrMountPoint) {
			return withHint(err, "the agent empties a Vault data directory only by moving it aside; with a mount point as the hostPath, delete the pod, empty the directory while no pod of it runs (kubectl get pod shows none), and run recover again")
		}
		return err
	}
	if err := cl.DeletePod(ctx, p.Pod); err != nil {
		return err
	}
	if err := cl.WaitGone(ctx, p.Pod, timeout); err != nil {
		return err
	}
	if _, err := conn.ReplaceEmpty(ctx, env.want(n)); err != nil {
		return err
	}
	env.Log.Warn("wiped a node's Vault data so it can start empty", "pod", p.Name, "node", p.Node)
	// A replacement created while the directory was away cannot start (a kubelet retries
	// a failed mount with a back-off of up to two minutes): start it again now.
	if cur, ok, err := cl.PodNamed(ctx, env.Config.Chart.Release, p.Name); err != nil {
		return err
	} else if ok && cur.UID != p.UID {
		if err := cl.DeletePod(ctx, cur); err != nil {
			return err
		}
		if err := cl.WaitGone(ctx, cur, timeout); err != nil {
			return err
		}
	}
	np, err := cl.WaitReplaced(ctx, env.Config.Chart.Release, p.Pod, timeout)
	if err != nil {
		return err
	}
	fresh, err := env.podNamed(ctx, np.Name, np.UID)
	if err != nil {
		return err
	}
	if fresh.Name == s.first.Name {
		err = env.waitUninitialised(ctx, fresh)
	} else {
		err = env.waitNotRemoved(ctx, fresh)
	}
	if err != nil {
		return err
	}
	for i := range s.pods {
		if s.pods[i].Name == fresh.Name {
			s.pods[i] = fresh
		}
	}
	if s.first.Name == fresh.Name {
		s.first = fresh
	}
	return nil
}

// waitNotRemoved waits until p's Vault answers and requires it not to be a node removed
// from the Raft configuration (the data a wipe should have emptied).
func (e *Env) waitNotRemoved(ctx context.Context, p vaultPod) error {
	return poll(ctx, e.Clock, e.Waits.Poll, e.Waits.Join, p.Name+" to answer", func(ctx context.Context) error {
		st, err := p.API.SealStatus(ctx)
		switch {
		case err != nil:
			return err
		case st.Removed:
			return permanent(fmt.Errorf("%s still answers as the node removed from the cluster after its data was emptied", p.Name))
		}
		return nil
	})
}

// waitUninitialised waits until p's Vault answers and requires it to be uninitialised:
// what a throwaway init or a wiped node's rejoin must start from.
func (e *Env) waitUninitialised(ctx context.Context, p vaultPod) error {
	return poll(ctx, e.Clock, e.Waits.Poll, e.Waits.Join, p.Name+" to answer as uninitialised", func(ctx context.Context) error {
		st, err := p.API.SealStatus(ctx)
		switch {
		case err != nil:
			return err
		case st.Initialized:
			return permanent(fmt.Errorf("%w: %s is initialised (cluster %q): refusing to initialise it again", ErrOtherCluster, p.Name, st.ClusterID))
		}
		return nil
	})
}

func (s *recoverState) tokens(ctx context.Context) (string, error) {
	leader, _, err := findActive(ctx, s.env)
	if err != nil {
		return "", err
	}
	return ensureTokens(ctx, s.env, leader, s.kf, s.opts.AuthTokenFile)
}

func (s *recoverState) verify(ctx context.Context) (string, error) {
	if _, _, err := findActive(ctx, s.env); err != nil {
		return "", err
	}
	pods, err := s.env.openPods(ctx)
	if err != nil {
		return "", err
	}
	for _, p := range pods {
		st, err := p.API.SealStatus(ctx)
		switch {
		case err != nil:
			return "", err
		case st.Sealed:
			return "", fmt.Errorf("%s is still sealed", p.Name)
		}
	}
	return fmt.Sprintf("%d pod(s) unsealed, one active", len(pods)), nil
}
