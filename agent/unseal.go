package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// ErrDataGone means a pod is uninitialised while the agent holds the keyfile and no
// other pod is initialised: the node's data is gone (or the wrong Vault answered).
var ErrDataGone = errors.New("vault is uninitialised but the agent holds its keyfile")

// PodUnseal is the outcome for one pod.
type PodUnseal struct {
	vault.UnsealResult
	Error string `json:"error,omitempty"`
}

// Unseal unseals every sealed Vault pod now with the keyfile's shares. A pod that
// reports uninitialised while no other pod is initialised means the data is gone (or the
// wrong node answered): it is reported, never initialised. Safe to re-run.
func Unseal(ctx context.Context, env *Env) ([]PodUnseal, error) {
	kf, err := env.Keyfile.Read(ctx)
	if err != nil {
		return nil, err
	}
	pods, err := env.openPods(ctx)
	if err != nil {
		return nil, err
	}
	anyInit := false
	for _, p := range pods {
		if st, err := p.API.SealStatus(ctx); err == nil && st.Initialized {
			anyInit = true
		}
	}
	var out []PodUnseal
	var errs []error
	for _, p := range pods {
		res, err := unsealOnce(ctx, env.Log, p.Name, p.API, kf, anyInit)
		if err == nil && res.Joining {
			err = env.awaitUnsealed(ctx, p, kf.Keyset, env.Waits.Join)
			res.Sealed = err != nil
		}
		pu := PodUnseal{UnsealResult: res}
		pu.Node = p.Name
		if err != nil {
			pu.Error = err.Error()
			errs = append(errs, err)
		} else if res.WasSealed {
			env.Log.Info("unsealed", "pod", p.Name, "shares", res.SharesUsed)
		}
		out = append(out, pu)
	}
	return out, errors.Join(errs...)
}

// unsealOnce unseals one pod. clusterInitialised says whether this pod or a peer
// reports initialised: an uninitialised pod is then a follower waiting to join;
// otherwise its data is lost and it is reported, never initialised.
func unsealOnce(ctx context.Context, log *slog.Logger, name string, api podAPI, kf *vault.Keyfile, clusterInitialised bool) (vault.UnsealResult, error) {
	if !clusterInitialised {
		return vault.UnsealResult{Node: name, Sealed: true, WasSealed: true}, withHint(
			fmt.Errorf("pod %s: %w (cluster %s, keyset %s): its data directory is empty or another Vault answered", name, ErrDataGone, kf.ClusterID, kf.Keyset.Fingerprint()),
			"the agent never initialises over a keyfile; run `pve-vault-agent recover` to restore the latest snapshot")
	}
	res, err := api.Unseal(ctx, kf.Keyset, log)
	if errors.Is(err, vault.ErrRemoved) {
		err = withHint(err, "the node was removed from the Raft cluster; `pve-vault-agent recover` wipes its data and lets it rejoin")
	}
	return res, err
}

// unsealPod unseals p and waits until it reports unsealed: a Raft follower joins its
// leader after the threshold is met, which takes a moment (or, right after a restart,
// until retry_join reaches the leader).
func (e *Env) unsealPod(ctx context.Context, p vaultPod, ks vault.Keyset, timeout time.Duration) error {
	return e.unsealUntil(ctx, p, ks, timeout, time.Time{})
}

// awaitUnsealed waits for a pod whose threshold was just met to report unsealed.
func (e *Env) awaitUnsealed(ctx context.Context, p vaultPod, ks vault.Keyset, timeout time.Duration) error {
	return e.unsealUntil(ctx, p, ks, timeout, e.Clock.Now())
}

func (e *Env) unsealUntil(ctx context.Context, p vaultPod, ks vault.Keyset, timeout time.Duration, joiningSince time.Time) error {
	return poll(ctx, e.Clock, e.Waits.Poll, timeout, "unseal "+p.Name, func(ctx context.Context) error {
		if !joiningSince.IsZero() && e.Clock.Now().Sub(joiningSince) < 10*time.Second {
			// The shares went in: give the join time before submitting them again.
			st, err := p.API.SealStatus(ctx)
			if err != nil {
				return err
			}
			if !st.Sealed {
				return nil
			}
			return errNotYet
		}
		res, err := p.API.Unseal(ctx, ks, e.Log)
		switch {
		case errors.Is(err, vault.ErrWrongKeys), errors.Is(err, vault.ErrRemoved):
			return permanent(err)
		case err != nil:
			return err
		case !res.Sealed:
			return nil
		case res.Joining:
			joiningSince = e.Clock.Now()
		}
		return errNotYet
	})
}

// waitActive waits until n is unsealed and active.
func (e *Env) waitActive(ctx context.Context, n *vault.Node) (vault.Health, error) {
	var h vault.Health
	err := poll(ctx, e.Clock, e.Waits.Poll, e.Waits.Active, n.Name+" to become active", func(ctx context.Context) error {
		var err error
		h, err = n.Health(ctx)
		switch {
		case err != nil:
			return err
		case h.Active:
			return nil
		}
		return fmt.Errorf("sealed=%v standby=%v", h.Sealed, h.Standby)
	})
	return h, err
}

// answerWait bounds how long a flow waits for pods to answer at all: a container a
// liveness probe restarted answers again after the kubelet's back-off, which grows to
// five minutes.
const answerWait = 6 * time.Minute

// waitAnswering waits until every pod answers sys/seal-status and returns what each
// said. A pod that does not (its container restarting, in CrashLoopBackOff after a
// liveness probe that fails while Vault is sealed or uninitialised) is waited for, with
// a log line, rather than failing the flow.
func (e *Env) waitAnswering(ctx context.Context, pods []vaultPod) ([]vault.SealState, error) {
	out := make([]vault.SealState, len(pods))
	for i, p := range pods {
		said := false
		err := poll(ctx, e.Clock, e.Waits.Poll, answerWait, p.Name+" to answer", func(ctx context.Context) error {
			st, err := p.API.SealStatus(ctx)
			if errors.Is(err, ErrUnknownNode) {
				return permanent(err)
			}
			if err != nil {
				if !said {
					e.Log.Warn("a pod does not answer; waiting (a liveness probe may be restarting its container)", "pod", p.Name, "err", err)
					said = true
				}
				return err
			}
			out[i] = st
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}
