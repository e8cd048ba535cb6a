package vault

import (
	"context"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestAgentsRaceToUnsealOnePod is an agent on every Proxmox host: two unseal the same
// sealed Vault at the same moment, each through its own client, one with its keyfile's
// shares in another order. Every round must end unsealed with no progress left, and
// neither agent may fail: Vault keeps one progress per node, so an agent that reset
// what it found would throw away the other's shares.
func TestAgentsRaceToUnsealOnePod(t *testing.T) {
	ctx := ctxFor(t, 4*time.Minute)
	log, logs := logBuffer()
	v, n := startVault(t)
	init, err := n.Init(ctx, 5, 3)
	if err != nil {
		t.Fatal(err)
	}
	racers := make([]*Node, 2)
	for i := range racers {
		if racers[i], err = NewNode(v.Opts.NodeID, v.Addr, &http.Client{Timeout: 10 * time.Second}); err != nil {
			t.Fatal(err)
		}
	}
	reversed := init.Keyset
	reversed.Keys = slices.Clone(init.Keyset.Keys)
	slices.Reverse(reversed.Keys)
	keysets := []Keyset{init.Keyset, reversed}
	const rounds = 25
	resets := 0
	for round := range rounds {
		if round > 0 {
			waitActive(t, ctx, n)
			rc, _ := n.withToken(init.RootToken)
			if err := rc.Sys().SealWithContext(ctx); err != nil {
				t.Fatalf("round %d: seal: %v", round, err)
			}
		}
		if st, err := n.SealStatus(ctx); err != nil || !st.Sealed {
			t.Fatalf("round %d: not sealed before the race: %+v %v", round, st, err)
		}
		start := make(chan struct{})
		var wg sync.WaitGroup
		results := make([]UnsealResult, len(racers))
		errs := make([]error, len(racers))
		for i, r := range racers {
			wg.Go(func() {
				<-start
				results[i], errs[i] = r.Unseal(ctx, keysets[i], log)
			})
		}
		close(start)
		wg.Wait()
		for i := range racers {
			if errs[i] != nil || results[i].Sealed {
				t.Fatalf("round %d: agent %d: %+v %v", round, i, results[i], errs[i])
			}
			if results[i].ResetStale {
				resets++
			}
		}
		st, err := n.SealStatus(context.Background())
		if err != nil || st.Sealed || st.Progress != 0 {
			t.Fatalf("round %d: after the race: sealed=%v progress=%d %v", round, st.Sealed, st.Progress, err)
		}
	}
	if resets != 0 {
		t.Fatalf("%d resets between agents holding the same keyset", resets)
	}
	if ContainsAny(logs.String(), init.Keyset, init.RootToken) {
		t.Fatal("a share or the root token reached the log")
	}
}
