// Package safefile holds the file rules every package that keeps secrets or snapshots
// on the host follows: private directories that are created 0700 and never re-moded,
// secret files opened without following symlinks and checked on the open descriptor,
// and directory fsync after a rename. It imports only the standard library, so the
// domain packages may use it (internal/deptest allows exactly this one).
package safefile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
)

// ErrInsecure is wrapped when a secret file or directory is open to others or owned
// by someone else.
var ErrInsecure = errors.New("insecure permissions")

// PrivateDir makes sure dir exists for secrets or snapshots: a missing directory is
// created with mode 0700 (and so are missing parents); an existing one is never
// re-moded, and is refused when group or others can enter it.
func PrivateDir(dir string) error {
	fi, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return os.MkdirAll(dir, 0o700)
	}
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s has mode %04o: %w: others could reach what the agent keeps there, and the agent does not change an existing directory's mode; use a dedicated directory, or chmod 700 %s", dir, perm, ErrInsecure, dir)
	}
	return nil
}

// ReadSecret reads a secret file: opened without following a symlink, then checked on
// the open descriptor (no race with a rename): a regular file, owned by root or by the
// user the agent runs as, with no permission for group or others. At most max bytes.
func ReadSecret(path string, max int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symbolic link: point the configuration at the file itself", path)
		}
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %04o: %w (fix: chmod 600 %s)", path, perm, ErrInsecure, path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("%s is owned by uid %d: %w: a secret must belong to root (fix: chown root: %s)", path, st.Uid, ErrInsecure, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		clear(b)
		return nil, fmt.Errorf("%s is larger than %d bytes: not the secret the configuration expects", path, max)
	}
	return b, nil
}

// SyncDir fsyncs a directory, so a rename inside it survives a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// SyncFile fsyncs the file at p.
func SyncFile(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// WriteFile writes p atomically: a temporary file in the same directory, fsynced and
// renamed over p, then the directory fsynced. A reader sees the old file or the new one,
// never half of it; a failure leaves the old one.
func WriteFile(p string, data []byte, mode os.FileMode) (err error) {
	dir := filepath.Dir(p)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(p)+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	if err = os.Rename(tmp.Name(), p); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return SyncDir(dir)
}
