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

// Unseal brings n out of the sealed state with ks: a stale unseal in progress (someone
// typed a share and left) is reset first, then shares are submitted one by one until
// Vault reports unsealed. Shares of another cluster are each accepted and fail only at
// the threshold ("cipher: message authentication failed"): that is ErrWrongKeys, with
// the progress reset so no half-unseal remains. Only share indexes are logged.
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
	if st.Progress > 0 {
		if err := n.reset(ctx); err != nil {
			return res, err
		}
		res.ResetStale = true
		log.Warn("reset a stale unseal in progress", "pod", n.Name, "progress", st.Progress)
	}
	for _, k := range ks.Keys {
		resp, err := n.client.Sys().UnsealWithContext(ctx, k.value)
		res.SharesUsed++
		if err != nil {
			if isAuthFailure(err) {
				_ = n.reset(ctx)
				return res, fmt.Errorf("%s: %w (vault rejected the combined shares at the threshold: the keyfile is not this cluster's); progress reset", n.Name, ErrWrongKeys)
			}
			return res, fmt.Errorf("%s: submit share #%d: %w", n.Name, k.Index, scrub(err, ks))
		}
		log.Debug("submitted unseal share", "pod", n.Name, "share", k.Index, "progress", resp.Progress, "threshold", resp.T)
		if !resp.Sealed {
			res.Sealed = false
			return res, nil
		}
		if resp.Progress == 0 && res.SharesUsed >= ks.Threshold {
			// The threshold was met without an error: a follower joining a Raft cluster
			// answers the leader's challenge now and unseals a moment later.
			res.Joining = true
			return res, nil
		}
	}
	return res, fmt.Errorf("%s: still sealed after all %d shares", n.Name, len(ks.Keys))
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
