package lab

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is a lab server process with its output captured in a log file.
type Process struct {
	Name    string
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{}
	mu      sync.Mutex
	waitErr error
}

// startProcess starts bin with args, output appended to logPath. cred, when non-nil,
// runs it as another uid/gid.
func startProcess(name, logPath, bin string, args []string, cred *syscall.Credential, env []string) (*Process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), env...)
	// Own process group, so a signal to the test's terminal does not hit it first,
	// and Pdeathsig so a crashed test binary leaves no server behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: cred}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		logf.Close()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// Exited reports whether the process has ended, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		p.mu.Lock()
		defer p.mu.Unlock()
		return true, p.waitErr
	default:
		return false, nil
	}
}

// errIfExited turns an early exit into an error that quotes the end of the log, so a
// failed start explains itself.
func (p *Process) errIfExited() error {
	if gone, err := p.Exited(); gone {
		return Permanent(fmt.Errorf("%s exited (%v); last log lines:\n%s", p.Name, err, p.Tail(15)))
	}
	return nil
}

// Tail returns the last n lines of the log.
func (p *Process) Tail(n int) string {
	b, _ := os.ReadFile(p.LogPath)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Stop sends SIGTERM and waits up to 10s, then SIGKILL. Safe to call twice.
func (p *Process) Stop() {
	if gone, _ := p.Exited(); gone {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.Kill()
	}
}

// Kill sends SIGKILL (a crash, a pulled plug) and waits for the process to be gone.
func (p *Process) Kill() {
	if gone, _ := p.Exited(); gone {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// PID is the process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Signal sends sig to the process (SIGSTOP: a hung server that still holds its socket).
func (p *Process) Signal(sig syscall.Signal) error { return p.cmd.Process.Signal(sig) }
