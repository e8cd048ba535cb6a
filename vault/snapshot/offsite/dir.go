package offsite

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
)

// Dir is a directory target: a mount of a NAS, a USB disk, a Proxmox storage.
type Dir struct {
	Root string
}

func (d *Dir) String() string { return "dir " + d.Root }

func (d *Dir) path(name string) (string, error) {
	c, err := cleanName(name)
	if err != nil {
		return "", err
	}
	return filepath.Join(d.Root, filepath.FromSlash(c)), nil
}

// Put writes a temporary file beside the final one, fsyncs it and renames it.
func (d *Dir) Put(ctx context.Context, name string, r io.Reader, _ int64) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(p), filepath.Base(tmpName(name)))
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, ctxReader{ctx, r})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return safefile.SyncDir(filepath.Dir(p))
}

func (d *Dir) Open(_ context.Context, name string) (io.ReadCloser, error) {
	p, err := d.path(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %s: %w", d, name, ErrNotFound)
	}
	return f, err
}

// root is the target's directory with symbolic links resolved: a walk Lstats its root,
// so a root that is a link (/mnt/backup → the mount) would list as one entry and hide
// every copy, while Put follows the link.
func (d *Dir) root() (string, error) {
	r, err := filepath.EvalSymlinks(d.Root)
	if errors.Is(err, fs.ErrNotExist) {
		return d.Root, nil // nothing stored yet: the walk finds nothing
	}
	return r, err
}

func (d *Dir) List(_ context.Context, prefix string) ([]Object, error) {
	root, err := d.root()
	if err != nil {
		return nil, err
	}
	var out []Object
	err = filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if e.IsDir() || isTmp(p) {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		if !strings.HasPrefix(rel, prefix) {
			return nil
		}
		fi, err := e.Info()
		if err != nil {
			return nil
		}
		out = append(out, Object{Name: rel, Size: fi.Size(), Modified: fi.ModTime()})
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

func (d *Dir) Remove(_ context.Context, name string) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func (d *Dir) Clean(context.Context) error {
	root, err := d.root()
	if err != nil {
		return err
	}
	return filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() && isTmp(p) {
			os.Remove(p)
		}
		return nil
	})
}

func (d *Dir) Close() error { return nil }

// ctxReader stops a copy when ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// Check reads the object back and compares its size and SHA-256.
func (d *Dir) Check(ctx context.Context, name string, size int64, sum string) error {
	return checkObject(ctx, d, name, size, sum)
}

// ReadsBack: see Target.
func (d *Dir) ReadsBack() bool { return true }
