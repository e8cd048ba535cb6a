package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
)

// ErrBusy means another mutating run holds the agent's lock.
var ErrBusy = errors.New("another pve-vault-agent operation is running")

// Lock takes the agent's host-wide lock for a mutating verb: provision, install,
// upgrade, init, restore, recover, drill and token rotate never interleave (two
// recovers would initialise two throwaway clusters; an install would repair a Helm
// release another install is still writing). It fails at once, naming the holder; the
// lock dies with its process, so a killed run never leaves it held.
func (e *Env) Lock(verb string) (func(), error) {
	dir := filepath.Dir(e.Config.Vault.Keyfile)
	if err := safefile.PrivateDir(dir); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	path := e.lockPath()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("agent lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, hintf("wait for it to finish, then run "+verb+" again",
				"%w: %s holds %s", ErrBusy, strings.TrimSpace(string(holder)), path)
		}
		return nil, fmt.Errorf("agent lock %s: %w", path, err)
	}
	_ = f.Truncate(0)
	_, _ = fmt.Fprintf(f, "%s (pid %d, since %s)\n", verb, os.Getpid(), e.Clock.Now().UTC().Format("2006-01-02 15:04:05Z"))
	return func() {
		_ = f.Truncate(0)
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

func (e *Env) lockPath() string {
	return filepath.Join(filepath.Dir(e.Config.Vault.Keyfile), ".agent.lock")
}

// Busy reports whether a mutating verb holds the agent's lock, and which: the daemon
// steps aside (submits no share) while one runs, so a recover's throwaway keys and the
// keyfile's never meet in one unseal.
func (e *Env) Busy() (string, bool) {
	f, err := os.OpenFile(e.lockPath(), os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return "", false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(e.lockPath())
		return strings.TrimSpace(string(holder)), true
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return "", false
}
