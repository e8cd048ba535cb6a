package agent

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// An upgrade rolls the pods the way Vault's documentation asks. Three pods on the real
// chart 0.33.0 are upgraded to 0.34.1 while a writer writes all along: a verified
// snapshot is taken first, the standbys are rolled one at a time, the active node steps
// down and goes last; leadership moves exactly once and writes fail in no more than
// that one election (a lone failed write elsewhere is logged with its cause: on a
// loaded CI machine one health or write call can miss its 1 s deadline); and at every
// moment at least two pods are unsealed voters.
func TestUpgradeRollsStandbysFirstAndTheActiveLast(t *testing.T) {
	vl := newVaultLabWith(t, labOptions{nodes: 3, chartVersion: "0.33.0"})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	kf := vl.keyfile(t)
	leader := vl.leader(t, ctx)
	root, err := leader.GenerateRoot(ctx, kf.Keyset, vault.GenerateRootOptions{Auth: kf.OperatorToken})
	if err != nil {
		t.Fatal(err)
	}
	if err := leader.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"}); err != nil {
		t.Fatal(err)
	}

	clients := func() []*vault.Node {
		var out []*vault.Node
		for i := 0; i < 3; i++ {
			if v := vl.pods.Vault(vl.pod(i)); v != nil {
				n, err := vault.NewNode(vl.pod(i), v.Addr, nil)
				if err == nil {
					out = append(out, n)
				}
			}
		}
		return out
	}
	type sample struct {
		at     time.Time
		ok     bool
		voters int
		active string
		detail string
	}
	var mu sync.Mutex
	var writes, health []sample
	upgrading := false
	wctx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // the writer: one write every 50 ms to whichever node leads
		defer wg.Done()
		for i := 0; wctx.Err() == nil; i++ {
			ok, why := false, "no pod answered active:"
			for _, n := range clients() {
				cctx, c := context.WithTimeout(wctx, time.Second)
				h, err := n.Health(cctx)
				why += fmt.Sprintf(" %s %+v %v;", n.Name, h, err)
				if err == nil && h.Active {
					err = n.Write(cctx, root, fmt.Sprintf("kv/w%d", i), map[string]any{"value": "x"})
					ok, why = err == nil, strings.Join(strings.Fields(fmt.Sprintf("write to %s: %v", n.Name, err)), " ")
					c()
					break
				}
				c()
			}
			mu.Lock()
			writes = append(writes, sample{at: time.Now(), ok: ok, detail: why})
			mu.Unlock()
			_ = sleep(wctx, RealClock{}, 50*time.Millisecond)
		}
	}()
	go func() { // the watcher: unsealed pods that autopilot counts as voters
		defer wg.Done()
		for wctx.Err() == nil {
			unsealed := map[string]bool{}
			var ap vault.Autopilot
			active := ""
			for _, n := range clients() {
				cctx, c := context.WithTimeout(wctx, time.Second)
				if h, err := n.Health(cctx); err == nil && h.Initialized && !h.Sealed {
					unsealed[n.Name] = true
					if h.Active {
						if active == "" {
							active = n.Name
						} else {
							active = "two at once" // counted as a change, never skipped
						}
						ap, _ = n.Autopilot(cctx, kf.OperatorToken)
					}
				}
				c()
			}
			voters := 0
			for name := range unsealed {
				if s, ok := ap.Servers[name]; ok && s.Voter {
					voters++
				}
			}
			mu.Lock()
			measure := upgrading
			mu.Unlock()
			if wctx.Err() == nil && ap.Servers != nil && measure {
				mu.Lock()
				health = append(health, sample{at: time.Now(), voters: voters, active: active, detail: fmt.Sprintf("unsealed %v autopilot %+v", unsealed, ap)})
				mu.Unlock()
			}
			_ = sleep(wctx, RealClock{}, 100*time.Millisecond)
		}
	}()
	// Right after init autopilot has not promoted the followers yet (the upgrade itself
	// waits for that before deleting anything); count voters from a whole cluster on.
	if err := pollTest(ctx, time.Minute, func() error {
		ap, err := vl.leader(t, ctx).Autopilot(ctx, kf.OperatorToken)
		if err != nil {
			return err
		}
		for _, s := range ap.Servers {
			if !s.Voter || !s.Healthy {
				return errNotYet
			}
		}
		if len(ap.Servers) != 3 {
			return errNotYet
		}
		mu.Lock()
		defer mu.Unlock()
		upgrading = true
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	vl.cfg.Chart.Path = lab.Chart("0.34.1")
	t0 := time.Now()
	rep, err := Install(ctx, vl.newEnv(), InstallOptions{RequireRelease: true})
	took := time.Since(t0)
	// Keep watching a moment after the roll.
	_ = sleep(ctx, RealClock{}, time.Second)
	stopWatch()
	wg.Wait()
	if err != nil {
		t.Fatalf("upgrade: %v\n%s", err, tail(vl.logs.String(), 40))
	}
	if rep.Roll == nil || len(rep.Roll.Rolled) != 3 || rep.Roll.Rolled[2] != rep.Roll.Active || rep.Roll.Active == "" {
		t.Fatalf("roll %+v: want all three, the active one (%v) last", rep.Roll, rep.Roll)
	}
	if rep.ChartVersion != "0.34.1" || rep.Snapshot == "" {
		t.Fatalf("release %+v", rep.InstallResult)
	}
	_, es, err := Snapshots(ctx, vl.env)
	if err != nil || len(es) != 1 || es[0].Path != rep.Snapshot || !es[0].Verified {
		t.Fatalf("the pre-upgrade snapshot is not listed verified: %+v %v", es, err)
	}
	// Leadership moves once: from the old active to one of the rolled standbys. A sweep
	// reads the pods one after another, so a handover between two of its reads shows as
	// "two at once" between the old leader and the new one: that sample is the
	// handover, not a second leader. Two pods claiming active in consecutive sweeps, or
	// around a leader that did not change, would be a split brain, and fail.
	var leaders []string
	gaps, last := 0, ""
	for i, h := range health {
		if h.active == "two at once" {
			prev, next := "", ""
			if i > 0 {
				prev = health[i-1].active
			}
			if i+1 < len(health) {
				next = health[i+1].active
			}
			if prev == "two at once" || next == "two at once" || prev == next {
				t.Fatalf("%s: two pods answered active around %q → %q: %s", h.at.Format("15:04:05.000"), prev, next, h.detail)
			}
			t.Logf("%s: a sweep saw the handover %s → %s", h.at.Format("15:04:05.000"), prev, next)
			continue
		}
		if h.active != "" && (len(leaders) == 0 || leaders[len(leaders)-1] != h.active) {
			leaders = append(leaders, h.active)
		}
		if h.active == "" && last != "" {
			gaps++
		}
		last = h.active
	}
	// A gap that ends with the same leader is a lease lapse (a starved CPU under the lab's
	// performance_multiplier 1), not a handover the roll caused: logged, not failed.
	t.Logf("leaders seen in order: %v; %d gap(s) with no active pod", leaders, gaps)
	// Failed writes: runs of more than one write come only from that election.
	runs, failed, longRuns := 0, 0, 0
	var longest, cur time.Duration
	var start time.Time
	for i, w := range writes {
		if !w.ok {
			failed++
			if i == 0 || writes[i-1].ok {
				runs++
				start = w.at
			}
			if i > 0 && !writes[i-1].ok && (i < 2 || writes[i-2].ok) {
				longRuns++
			}
			cur = w.at.Sub(start)
			longest = max(longest, cur)
			if (i == 0 || writes[i-1].ok) && (i+1 == len(writes) || writes[i+1].ok) {
				t.Logf("%s: a lone failed write: %s", w.at.Format("15:04:05.000"), w.detail)
			}
		}
	}
	minVoters := 3
	for _, h := range health {
		if h.voters < 2 && minVoters >= 2 {
			t.Logf("%s: %s", h.at.Format("15:04:05.000"), h.detail)
		}
		minVoters = min(minVoters, h.voters)
	}
	t.Logf("upgrade 0.33.0 → 0.34.1 of 3 pods: %s; %d writes, %d failed in %d run(s), longest %s; fewest unsealed voters seen %d (%d samples); order %v, active was %s",
		took.Round(time.Millisecond), len(writes), failed, runs, longest.Round(time.Millisecond), minVoters, len(health), rep.Roll.Rolled, rep.Roll.Active)
	if len(leaders) != 2 || leaders[0] != rep.Roll.Active {
		t.Fatalf("leaders seen %v: want %s then exactly one other (one election)", leaders, rep.Roll.Active)
	}
	if longRuns > 1 {
		t.Fatalf("writes failed in %d separate multi-write windows: more than one leader election", longRuns)
	}
	if longest > 10*time.Second {
		t.Fatalf("writes failed for %s in a row: the election took too long", longest)
	}
	if minVoters < 2 {
		t.Fatalf("at one moment only %d unsealed voter(s)", minVoters)
	}
	// Every pod on the new revision and unsealed; a re-run rolls nothing.
	rep2, err := Install(ctx, vl.newEnv(), InstallOptions{RequireRelease: true})
	if err != nil || rep2.Action != "unchanged" || (rep2.Roll != nil && len(rep2.Roll.Rolled) != 0) {
		t.Fatalf("re-run: %+v %v", rep2, err)
	}
	for i := 0; i < 3; i++ {
		if sealed, _ := vl.sealed(t, vl.pod(i)); sealed {
			t.Fatalf("%s sealed after the upgrade", vl.pod(i))
		}
	}
	_ = leader.RevokeSelf(ctx, root)
}

// A pod that does not come back healthy stops the roll: the error says which and what
// is left, and no other pod is deleted.
func TestUpgradeStopsAtAPodThatDoesNotComeBack(t *testing.T) {
	vl := newVaultLabWith(t, labOptions{nodes: 3, chartVersion: "0.33.0"})
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	if _, err := Init(ctx, vl.env, InitOptions{}); err != nil {
		t.Fatal(err)
	}
	before := map[string]int{}
	for i := 0; i < 3; i++ {
		before[vl.pod(i)] = vl.pods.Vault(vl.pod(i)).Process().PID()
	}
	// The first standby to be rolled will not start: its data directory is gone and a
	// plain file sits where it was.
	leader := vl.leader(t, ctx)
	victim := 0
	if leader.Name == vl.pod(0) {
		victim = 1
	}
	vl.cfg.Chart.Path = lab.Chart("0.34.1")
	env := vl.newEnv()
	env.Waits.Join = 20 * time.Second
	vl.cfg.Chart.Timeout = 20 * time.Second
	breakNode(t, vl, victim)
	rep, err := Install(ctx, env, InstallOptions{RequireRelease: true})
	if err == nil || rep.Roll == nil || len(rep.Roll.Rolled) != 0 || len(rep.Roll.Left) != 3 || rep.Roll.Left[0] != vl.pod(victim) {
		t.Fatalf("a broken pod: %v, roll %+v", err, rep.Roll)
	}
	if len(Hints(err)) == 0 {
		t.Fatalf("no hint on what is left: %v", err)
	}
	for i := 0; i < 3; i++ {
		if i == victim {
			continue
		}
		if v := vl.pods.Vault(vl.pod(i)); v == nil || v.Process().PID() != before[vl.pod(i)] {
			t.Fatalf("%s was replaced after the roll stopped", vl.pod(i))
		}
	}
}

// breakNode makes pod i's data directory unusable (a file where the directory was), so
// its next Vault cannot start.
func breakNode(t *testing.T, vl *vaultLab, i int) {
	t.Helper()
	p := vl.cfg.Nodes[i].HostPath
	if err := removeAll(p); err != nil {
		t.Fatal(err)
	}
	if err := writeFile(p, "not a directory"); err != nil {
		t.Fatal(err)
	}
}
