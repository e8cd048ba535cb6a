package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

// daemonProc is `pve-vault-agent run` started as the unit starts it (NOTIFY_SOCKET,
// WATCHDOG_USEC), with its log kept for the test to wait on.
type daemonProc struct {
	cmd    *exec.Cmd
	notify *lab.NotifySocket
	mu     sync.Mutex
	logs   strings.Builder
	done   chan struct{}
}

// startDaemon runs the daemon on cfg with a watchdog of watchdog (0: none) until the
// test ends.
func startDaemon(t *testing.T, cfg string, watchdog time.Duration, env ...string) *daemonProc {
	t.Helper()
	d := &daemonProc{notify: listenNotify(t), done: make(chan struct{})}
	d.cmd = exec.Command(binary, "run", "--config", cfg, "--log-level", "debug")
	d.cmd.Env = append(append(os.Environ(), "NOTIFY_SOCKET="+d.notify.Path), env...)
	if watchdog > 0 {
		d.cmd.Env = append(d.cmd.Env, fmt.Sprintf("WATCHDOG_USEC=%d", watchdog.Microseconds()))
	}
	stderr, _ := d.cmd.StderrPipe()
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(d.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			d.mu.Lock()
			d.logs.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		d.cmd.Wait()
	})
	return d
}

// Logs is everything the daemon logged so far.
func (d *daemonProc) Logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logs.String()
}

// count is how many log lines contain want.
func (d *daemonProc) count(want string) int { return strings.Count(d.Logs(), want) }

// waitLogged waits until n log lines contain want; the test fails with the log tail.
func (d *daemonProc) waitLogged(t *testing.T, want string, n int, timeout time.Duration) {
	t.Helper()
	err := lab.WaitFor(context.Background(), timeout, fmt.Sprintf("%d× %q in the daemon's log", n, want), func(context.Context) error {
		if d.count(want) >= n {
			return nil
		}
		return errors.New("not yet")
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, tailLines(d.Logs(), 40))
	}
}

// stop sends SIGTERM and waits for the exit status. The log is read to its end first:
// Wait closes the stderr pipe once the process has exited, dropping whatever the reader
// had not read yet (seen: the daemon's last line, "daemon stopped", lost in a CI run).
func (d *daemonProc) stop(t *testing.T) {
	t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done: // EOF: the daemon has exited and everything it wrote was read
	case <-time.After(2 * time.Minute):
		d.cmd.Process.Kill()
		<-d.done
		t.Fatalf("the daemon did not stop within 2 minutes of SIGTERM\n%s", tailLines(d.Logs(), 40))
	}
	err := d.cmd.Wait()
	if err != nil {
		t.Fatalf("daemon exit: %v\n%s", err, tailLines(d.Logs(), 40))
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// useAgentAccounts sets up the agent's Kubernetes accounts for the configuration at
// cfgPath as a cluster administrator would: the manifests `rbac` prints, applied with the
// admin kubeconfig, and the kubeconfigs `rbac kubeconfig` prints written beside the
// configuration, which is rewritten to use them.
func useAgentAccounts(t *testing.T, cfgPath, adminKubeconfig string, cs kubernetes.Interface) {
	t.Helper()
	r := runBinary(t, nil, "rbac", "--config", cfgPath)
	if r.code != 0 || !strings.Contains(r.stdout, "kind: ClusterRole") {
		t.Fatalf("rbac: %d %s", r.code, r.stderr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := lab.ApplyYAML(ctx, cs, r.stdout); err != nil {
		t.Fatal(err)
	}
	body := mustRead(t, cfgPath)
	for _, role := range []string{"operate", "install"} {
		r := runBinary(t, nil, "rbac", "kubeconfig", role, "--admin-kubeconfig", adminKubeconfig, "--config", cfgPath)
		if r.code != 0 {
			t.Fatalf("rbac kubeconfig %s: %d %s", role, r.code, r.stderr)
		}
		p := filepath.Join(filepath.Dir(cfgPath), role+".kubeconfig")
		os.WriteFile(p, []byte(r.stdout), 0o600)
		key := map[string]string{"operate": "kubeconfig", "install": "install_kubeconfig"}[role]
		line := fmt.Sprintf("  %s: {file: %s}\n", key, p)
		if role == "operate" {
			body = strings.Replace(body, fmt.Sprintf("  kubeconfig: {file: %s}\n", adminKubeconfig), line, 1)
		} else {
			body = strings.Replace(body, "kubernetes:\n", "kubernetes:\n"+line, 1)
		}
	}
	if !strings.Contains(body, "operate.kubeconfig") || !strings.Contains(body, "install.kubeconfig") {
		t.Fatalf("the configuration does not take the accounts' kubeconfigs:\n%s", body)
	}
	os.WriteFile(cfgPath, []byte(body), 0o600)
}
