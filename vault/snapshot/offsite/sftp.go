package offsite

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// SFTP is a target on an SFTP server (a NAS's chrooted account), over an SSH
// connection whose host key the caller verified.
type SFTP struct {
	Root   string // directory on the server, e.g. /vault
	Label  string // for messages: user@host
	client *sftp.Client
}

// NewSFTP speaks SFTP over conn.
func NewSFTP(conn *ssh.Client, root, label string) (*SFTP, error) {
	c, err := sftp.NewClient(conn, sftp.UseConcurrentWrites(true), sftp.MaxConcurrentRequestsPerFile(16))
	if err != nil {
		return nil, fmt.Errorf("sftp %s: %w", label, err)
	}
	return &SFTP{Root: root, Label: label, client: c}, nil
}

// CanSync reports whether the server offers fsync@openssh.com (OpenSSH does since 6.5);
// without it an upload is renamed into place unflushed.
func (s *SFTP) CanSync() bool {
	v, ok := s.client.HasExtension("fsync@openssh.com")
	return ok && v == "1"
}

func (s *SFTP) String() string { return "sftp " + s.Label + ":" + s.Root }

func (s *SFTP) path(name string) (string, error) {
	c, err := cleanName(name)
	if err != nil {
		return "", err
	}
	return path.Join(s.Root, c), nil
}

// Put writes a temporary file, has the server flush it to stable storage (OpenSSH's
// fsync@openssh.com, when the server offers it), then renames it over the final name
// with OpenSSH's posix-rename (atomic on the server's file system): a crash of the
// server after the rename leaves the whole object or none, as on a directory target.
func (s *SFTP) Put(ctx context.Context, name string, r io.Reader, _ int64) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if err := s.client.MkdirAll(path.Dir(p)); err != nil {
		return fmt.Errorf("%s: mkdir %s: %w", s, path.Dir(p), err)
	}
	tmp := path.Join(path.Dir(p), path.Base(tmpName(name)))
	f, err := s.client.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY)
	if err != nil {
		return fmt.Errorf("%s: create %s: %w", s, tmp, err)
	}
	_, err = f.ReadFrom(ctxReader{ctx, r})
	if err == nil && s.CanSync() {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = s.client.PosixRename(tmp, p)
	}
	if err != nil {
		_ = s.client.Remove(tmp)
		return fmt.Errorf("%s: put %s: %w", s, name, err)
	}
	return nil
}

func (s *SFTP) Open(_ context.Context, name string) (io.ReadCloser, error) {
	p, err := s.path(name)
	if err != nil {
		return nil, err
	}
	f, err := s.client.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %s: %w", s, name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: open %s: %w", s, name, err)
	}
	return f, nil
}

// root is the target's directory as the server resolves it (SSH_FXP_REALPATH follows
// symbolic links): a walk Lstats its root, so a root that is a link would list as one
// entry and hide every copy, while Put follows the link.
func (s *SFTP) root() (string, error) {
	r, err := s.client.RealPath(s.Root)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return s.Root, nil
		}
		return "", fmt.Errorf("%s: resolve the root: %w", s, err)
	}
	return r, nil
}

func (s *SFTP) List(_ context.Context, prefix string) ([]Object, error) {
	root, err := s.root()
	if err != nil {
		return nil, err
	}
	var out []Object
	w := s.client.Walk(root)
	for w.Step() {
		if err := w.Err(); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("%s: list: %w", s, err)
		}
		fi := w.Stat()
		if fi.IsDir() || isTmp(w.Path()) {
			continue
		}
		rel := strings.TrimPrefix(strings.TrimPrefix(w.Path(), root), "/")
		if strings.HasPrefix(rel, prefix) {
			out = append(out, Object{Name: rel, Size: fi.Size(), Modified: fi.ModTime()})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (s *SFTP) Remove(_ context.Context, name string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if err := s.client.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: remove %s: %w", s, name, err)
	}
	return nil
}

func (s *SFTP) Clean(context.Context) error {
	root, err := s.root()
	if err != nil {
		return err
	}
	w := s.client.Walk(root)
	for w.Step() {
		if w.Err() == nil && !w.Stat().IsDir() && isTmp(w.Path()) {
			_ = s.client.Remove(w.Path())
		}
	}
	return nil
}

func (s *SFTP) Close() error { return s.client.Close() }

// Check reads the object back and compares its size and SHA-256.
func (s *SFTP) Check(ctx context.Context, name string, size int64, sum string) error {
	return checkObject(ctx, s, name, size, sum)
}

// ReadsBack: see Target.
func (s *SFTP) ReadsBack() bool { return true }
