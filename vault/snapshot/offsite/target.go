// Package offsite keeps encrypted, authenticated copies of verified snapshots off the
// Proxmox host: in a directory (an NFS/CIFS mount), over SFTP, or in an S3-compatible
// bucket. Every object is encrypted to the operator's age recipients before it leaves
// the host; each copy's manifest carries an HMAC under the keyfile's manifest key, so a
// copy that was swapped, edited or rolled back is refused when it is read.
package offsite

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"path"
	"strings"
	"time"
)

// Target is an off-host store of objects named by slash paths ("snapshots/…").
type Target interface {
	// Put stores r (size bytes, or -1 when not known in advance) under name atomically:
	// a reader never sees a partial object, and a killed Put leaves nothing List shows.
	Put(ctx context.Context, name string, r io.Reader, size int64) error
	// Open reads an object.
	Open(ctx context.Context, name string) (io.ReadCloser, error)
	// List lists the complete objects whose names start with prefix.
	List(ctx context.Context, prefix string) ([]Object, error)
	// Check confirms an object just Put is what was sent: size bytes with that SHA-256.
	// A directory or SFTP target reads it back; S3 had the server verify a checksum of
	// every part while receiving it, and checks the stored size (reading back from a
	// remote bucket would double the transfer and its egress fees).
	Check(ctx context.Context, name string, size int64, sha256hex string) error
	// ReadsBack reports whether Check reads the object back, and so needs its SHA-256
	// (computed while sending; skipped otherwise: the manifest's SHA-256 of the
	// plaintext authenticates the content at every fetch).
	ReadsBack() bool
	// Remove deletes an object (a missing one is not an error).
	Remove(ctx context.Context, name string) error
	// Clean removes what interrupted Puts left (temporary files, incomplete uploads).
	Clean(ctx context.Context) error
	Close() error
	// String names the target for messages (never with a credential).
	String() string
}

// Object is one stored object.
type Object struct {
	Name     string    `json:"name"`
	Size     int64     `json:"size"`
	Modified time.Time `json:"modified"`
}

// ErrNotFound is an object the target does not have.
var ErrNotFound = errors.New("no such object")

// tmpPrefix marks the temporary name of a Put in progress (directory and SFTP targets).
const tmpPrefix = ".pva-tmp-"

func tmpName(name string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return path.Join(path.Dir(name), tmpPrefix+hex.EncodeToString(b[:])+"-"+path.Base(name))
}

func isTmp(name string) bool { return strings.HasPrefix(path.Base(name), tmpPrefix) }

// cleanName refuses names that would leave the target's root.
func cleanName(name string) (string, error) {
	c := path.Clean("/" + name)[1:]
	if c == "" || c != name || strings.HasPrefix(c, "../") {
		return "", errors.New("offsite: bad object name " + name)
	}
	return c, nil
}
