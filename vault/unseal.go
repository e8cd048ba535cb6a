package vault

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/hashicorp/vault/api"
)

// UnsealResult says what Unseal did on one node.
type UnsealResult struct {
	Node        string `json:"node"`
	WasSealed   bool   `json:"was_sealed"`
	Sealed      bool   `json:"sealed"`
	SharesUsed  int    `json:"shares_submitted"`
	ResetStale  bool   `json:"reset_stale_progress,omitempty"`
	Initialized bool   `json:"initialized"`
	// Joining: the threshold was met without an error but Vault is still sealed: a Raft
	// follower answers its leader's challenge and unseals a moment later. The caller
	// polls SealStatus.
	Joining bool `json:"joining,omitempty"`
}

// Unseal brings n out of the sealed state with ks, submitting shares one by one until
// Vault reports unsealed. Several agents may unseal the same pod at once (an agent on
// every Proxmox host): Vault keeps one unseal progress per node, ignores a share it
// already holds and forgets the progress once the threshold is met, so a progress
// someone else made is built on, never reset first (a reset would throw away a racing
// agent's shares and could leave both short of the threshold). Only a progress that
// fails at the threshold is reset: when the progress was not all ours (a share someone
// typed and left, or a racing agent with another keyset) the shares are submitted once
// more from a clean start. Shares of another cluster fail there again: that is
// ErrWrongKeys, with the progress reset so no half-unseal remains. Only share indexes
// are logged.
func (n *Node) Unseal(ctx context.Context, ks Keyset, log *slog.Logger) (UnsealResult, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	res := UnsealResult{Node: n.Name}
	st, err := n.SealStatus(ctx)
	if err != nil {
		return res, err
	}
	res.Initialized, res.WasSealed, res.Sealed = st.Initialized, st.Sealed, st.Sealed
	if !st.Sealed {
		return res, nil
	}
	if st.Removed {
		return res, fmt.Errorf("%s: %w: it sealed itself and will not rejoin while it holds data", n.Name, ErrRemoved)
	}
	if st.Threshold != 0 && st.Threshold != ks.Threshold {
		return res, fmt.Errorf("%s: %w: vault wants %d shares, the keyfile's threshold is %d", n.Name, ErrWrongKeys, st.Threshold, ks.Threshold)
	}
	for attempt := 0; ; attempt++ {
		foreign, err := n.submit(ctx, ks, log, &res, st.Progress)
		if err == nil || attempt > 0 {
			return res, err
		}
		switch {
		case errors.Is(err, errCombineFailed) && foreign:
			// Vault forgot the failed progress itself; the reset makes sure.
			if err := n.reset(ctx); err != nil {
				return res, err
			}
			res.ResetStale = true
			log.Warn("an unseal progress that was not only the agent's failed at the threshold: reset, submitting the shares again", "pod", n.Name)
		case errors.Is(err, errStillSealed):
			// Another agent's reset or a completed threshold in between: look again.
		default:
			return res, err
		}
		if st, err = n.SealStatus(ctx); err != nil {
			return res, err
		}
		if res.Sealed = st.Sealed; !st.Sealed {
			return res, nil
		}
	}
}

var (
	errCombineFailed = errors.New("vault rejected the combined shares at the threshold")
	errStillSealed   = errors.New("still sealed")
)

// submit sends each share once. foreign says whether the progress Vault reported was
// ever not the agent's own count (a share already there, or one that arrived between
// the agent's). A combine failure is ErrWrongKeys wrapped around errCombineFailed.
func (n *Node) submit(ctx context.Context, ks Keyset, log *slog.Logger, res *UnsealResult, progress int) (foreign bool, err error) {
	foreign = progress > 0
	for _, k := range ks.Keys {
		resp, err := n.client.Sys().UnsealWithContext(ctx, k.value)
		res.SharesUsed++
		if err != nil {
			if isAuthFailure(err) {
				_ = n.reset(ctx)
				return foreign, fmt.Errorf("%s: %w (%w: the keyfile is not this cluster's); progress reset", n.Name, ErrWrongKeys, errCombineFailed)
			}
			return foreign, fmt.Errorf("%s: submit share #%d: %w", n.Name, k.Index, scrub(err, ks))
		}
		log.Debug("submitted unseal share", "pod", n.Name, "share", k.Index, "progress", resp.Progress, "threshold", resp.T)
		if !resp.Sealed {
			res.Sealed = false
			return foreign, nil
		}
		if resp.Progress != 0 && resp.Progress != progress+1 {
			foreign = true // a share that was already there, or another agent's in between
		}
		if resp.Progress == 0 && res.SharesUsed >= ks.Threshold {
			// The threshold was met without an error: a follower joining a Raft cluster
			// answers the leader's challenge now and unseals a moment later.
			res.Joining = true
			return foreign, nil
		}
		progress = resp.Progress
	}
	return foreign, fmt.Errorf("%s: %w after all %d shares", n.Name, errStillSealed, len(ks.Keys))
}

func (n *Node) reset(ctx context.Context) error {
	if _, err := n.client.Sys().ResetUnsealProcessWithContext(ctx); err != nil {
		return fmt.Errorf("%s: reset unseal progress: %w", n.Name, err)
	}
	return nil
}

func isAuthFailure(err error) bool {
	var re *api.ResponseError
	if errors.As(err, &re) {
		for _, e := range re.Errors {
			if strings.Contains(e, "message authentication failed") {
				return true
			}
		}
	}
	return strings.Contains(err.Error(), "message authentication failed")
}

// scrub removes any share value from an error text (Vault may echo a malformed key).
func scrub(err error, ks Keyset) error {
	msg := err.Error()
	changed := false
	for _, k := range ks.Keys {
		if k.value != "" && strings.Contains(msg, k.value) {
			msg = strings.ReplaceAll(msg, k.value, redacted)
			changed = true
		}
	}
	if changed {
		return errors.New(msg)
	}
	return err
}
