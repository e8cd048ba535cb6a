package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// PodUnseal is the outcome for one pod.
type PodUnseal struct {
	vault.UnsealResult
	Error string `json:"error,omitempty"`
}

// Unseal unseals every sealed Vault pod now with the keyfile's shares. A pod that
// reports uninitialised while no other pod is initialised means the data is gone (or the
// wrong node answered): it is reported, never initialised. Safe to re-run.
func Unseal(ctx context.Context, cfg *configs.Config, log *slog.Logger) ([]PodUnseal, error) {
	log = log.With("component", "unseal")
	kf, err := readKeyfile(ctx, cfg)
	if err != nil {
		return nil, err
	}
	acc, pods, err := openPods(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	defer acc.Close()
	anyInit := false
	for _, p := range pods {
		if st, err := p.API.SealStatus(ctx); err == nil && st.Initialized {
			anyInit = true
		}
	}
	var out []PodUnseal
	var errs []error
	for _, p := range pods {
		res, err := unsealPod(ctx, p, kf, anyInit, log)
		pu := PodUnseal{UnsealResult: res}
		pu.Node = p.Name
		if err != nil {
			pu.Error = err.Error()
			errs = append(errs, err)
		} else if res.WasSealed {
			log.Info("unsealed", "pod", p.Name, "shares", res.SharesUsed)
		}
		out = append(out, pu)
	}
	return out, errors.Join(errs...)
}

// unsealPod unseals one pod. clusterInitialised says whether this pod or a peer reports
// initialised: an uninitialised pod is then a follower waiting to join; otherwise its
// data is lost and it is reported, never initialised.
func unsealPod(ctx context.Context, p vaultPod, kf *vault.Keyfile, clusterInitialised bool, log *slog.Logger) (vault.UnsealResult, error) {
	if !clusterInitialised {
		return vault.UnsealResult{Node: p.Name, Sealed: true, WasSealed: true}, fmt.Errorf("pod %s: %w (cluster %s, keyset %s): its data directory is empty or another Vault answered. The agent never initialises over a keyfile; run `pve-vault-agent recover` to restore the latest snapshot",
			p.Name, ErrDataGone, kf.ClusterID, kf.Keyset.Fingerprint())
	}
	return p.API.Unseal(ctx, kf.Keyset, log)
}
