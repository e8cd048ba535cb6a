// Command benchbackup measures backup-now against its physical limit and the anchor
// (issue 6): with Vault loaded with random KV data, side by side, curl of the snapshot
// endpoint to a file, `vault operator raft snapshot save`, and `pve-vault-agent
// backup-now` (streaming verification, fsync and manifest included); then the peak RSS of
// backup-now at two data sizes 4× apart. Run it with scripts/bench-backup.sh.
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

func main() {
	agent := flag.String("agent", "bin/pve-vault-agent", "the built agent")
	small := flag.Int("small-mib", 64, "data for the first RSS point")
	large := flag.Int("large-mib", 256, "data for the throughput run and the second RSS point")
	runs := flag.Int("runs", 3, "runs per tool (the median is printed)")
	flag.Parse()
	if err := run(*agent, *small, *large, *runs); err != nil {
		fmt.Fprintln(os.Stderr, "benchbackup:", err)
		os.Exit(1)
	}
}

type lab1 struct {
	dir, cfg string
	v        *lab.Vault
	node     *vault.Node
	kf       *vault.Keyfile
	bins     lab.Bins
	loaded   int
	agent    string
}

func run(agent string, small, large, runs int) error {
	ctx := context.Background()
	bins, err := lab.FindBins()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("/var/tmp", "pva-bench-backup-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	v, err := lab.StartFreshVault(ctx, bins, dir)
	if err != nil {
		return err
	}
	defer v.Close()
	l := &lab1{dir: dir, v: v, bins: bins, agent: agent}
	var keyfile string
	if l.cfg, keyfile, err = lab.StaticAgentConfig(dir, v.Addr, "  idle_timeout: 5m\n  retention: {keep_last: 2, daily: 0, weekly: 0, monthly: 0}\n"); err != nil {
		return err
	}
	if out, err := exec.Command(agent, "init", "--config", l.cfg).CombinedOutput(); err != nil {
		return fmt.Errorf("init: %v: %s", err, out)
	}
	if l.kf, err = vault.ReadKeyfile(ctx, keyfile, vault.SystemdCreds{WithKey: "host"}); err != nil {
		return err
	}
	if l.node, err = vault.NewNode("bench", v.Addr, &http.Client{Timeout: 10 * time.Minute}); err != nil {
		return err
	}

	if err := l.loadTo(ctx, small); err != nil {
		return err
	}
	_, rssSmall, sizeSmall, err := l.backupNow()
	if err != nil {
		return err
	}
	if err := l.loadTo(ctx, large); err != nil {
		return err
	}
	tok, err := l.benchToken(ctx)
	if err != nil {
		return err
	}
	hdr := filepath.Join(dir, "token-header")
	if err := os.WriteFile(hdr, []byte("X-Vault-Token: "+tok), 0o600); err != nil {
		return err
	}
	var curl, anchor, agentT []time.Duration
	var rssLarge, size int64
	for i := 0; i < runs; i++ {
		d, err := timed(exec.Command("curl", "-sS", "-f", "-H", "@"+hdr, "-o", filepath.Join(dir, "curl.snap"), v.Addr+"/v1/sys/storage/raft/snapshot"))
		if err != nil {
			return fmt.Errorf("curl: %w", err)
		}
		curl = append(curl, d)
		cmd := exec.Command(bins.Vault, "operator", "raft", "snapshot", "save", filepath.Join(dir, "anchor.snap"))
		cmd.Env = append(os.Environ(), "VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+tok)
		if d, err = timed(cmd); err != nil {
			return fmt.Errorf("vault operator raft snapshot save: %w", err)
		}
		anchor = append(anchor, d)
		d, rss, sz, err := l.backupNow()
		if err != nil {
			return err
		}
		agentT, rssLarge, size = append(agentT, d), max(rssLarge, rss), sz
	}
	mib := float64(size) / (1 << 20)
	c, a, b := median(curl), median(anchor), median(agentT)
	fmt.Printf("snapshot of %.0f MiB (Vault holding ~%d MiB of random KV data), median of %d runs:\n", mib, large, runs)
	fmt.Printf("  curl to a file (the physical limit)   %6.1f MiB/s  (%s)\n", mib/c.Seconds(), c.Round(time.Millisecond))
	fmt.Printf("  vault operator raft snapshot save     %6.1f MiB/s  (%s)\n", mib/a.Seconds(), a.Round(time.Millisecond))
	fmt.Printf("  pve-vault-agent backup-now            %6.1f MiB/s  (%s, verification + fsync + manifest included)\n", mib/b.Seconds(), b.Round(time.Millisecond))
	fmt.Printf("  ratio backup-now / curl               %6.2f  (target ≥ 0.9)\n", c.Seconds()/b.Seconds())
	fmt.Printf("peak RSS of backup-now: %.1f MiB at a %.0f MiB snapshot, %.1f MiB at a %.0f MiB snapshot (target: flat, ≤ 64 MiB)\n",
		float64(rssSmall)/1024, float64(sizeSmall)/(1<<20), float64(rssLarge)/1024, mib)
	return nil
}

// loadTo writes random KV data until about mib MiB are stored, with a generated root
// token revoked afterwards.
func (l *lab1) loadTo(ctx context.Context, mib int) error {
	root, err := l.node.GenerateRoot(ctx, l.kf.Keyset, vault.GenerateRootOptions{Auth: l.kf.OperatorToken})
	if err != nil {
		return err
	}
	defer l.node.RevokeSelf(ctx, root)
	if l.loaded == 0 {
		if err := l.node.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"}); err != nil {
			return err
		}
	}
	raw := make([]byte, 384<<10) // 512 KiB once base64-encoded: below Raft's 1 MiB entry limit
	for l.loaded < mib*2 {
		rand.Read(raw)
		if err := l.node.Write(ctx, root, fmt.Sprintf("kv/blob-%d", l.loaded), map[string]any{"v": base64.StdEncoding.EncodeToString(raw)}); err != nil {
			return err
		}
		l.loaded++
	}
	return nil
}

// backupNow runs the agent and returns its wall time, peak RSS (KiB) and the size stored.
func (l *lab1) backupNow() (time.Duration, int64, int64, error) {
	cmd := exec.Command(l.agent, "backup-now", "--config", l.cfg, "--log-level", "warn")
	out, err := os.CreateTemp(l.dir, "out")
	if err != nil {
		return 0, 0, 0, err
	}
	defer os.Remove(out.Name())
	cmd.Stdout = out
	d, err := timed(cmd)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("backup-now: %w", err)
	}
	b, _ := os.ReadFile(out.Name())
	fi, err := os.Stat(string(trim(b)))
	if err != nil {
		return 0, 0, 0, err
	}
	rss := cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss
	return d, rss, fi.Size(), nil
}

func timed(cmd *exec.Cmd) (time.Duration, error) {
	cmd.Stderr = os.Stderr
	t0 := time.Now()
	err := cmd.Run()
	return time.Since(t0), err
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func trim(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// benchToken creates a snapshot-policy token whose value the benchmark chose, for the
// side-by-side tools (curl, the vault CLI); the agent's own token never leaves the agent.
func (l *lab1) benchToken(ctx context.Context) (string, error) {
	root, err := l.node.GenerateRoot(ctx, l.kf.Keyset, vault.GenerateRootOptions{Auth: l.kf.OperatorToken})
	if err != nil {
		return "", err
	}
	defer l.node.RevokeSelf(ctx, root)
	b := make([]byte, 12)
	rand.Read(b)
	id := "bench-" + base64.RawURLEncoding.EncodeToString(b)
	err = l.node.Write(ctx, root, "auth/token/create-orphan", map[string]any{"id": id, "policies": []string{vault.SnapshotPolicyName}, "no_default_policy": true, "ttl": "2h"})
	return id, err
}
