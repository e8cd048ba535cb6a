// Package snapshot owns Raft snapshot files on host storage: streaming one to a temp
// file in the target directory, verifying it offline, publishing it atomically with a
// JSON manifest beside it, listing, and the retention plan.
//
// Invariants: a reader never sees a half file (temp file → fsync → rename → directory
// fsync); a snapshot that fails verification is never published; retention runs only
// after a verified save and never drops the newest verified snapshot. Memory stays flat
// whatever the snapshot's size: everything streams.
//
// It imports only the standard library (enforced by internal/deptest as part of vault).
package snapshot

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// ErrInvalid is wrapped by every verification failure.
var ErrInvalid = errors.New("invalid raft snapshot")

// members are exactly the files of a Vault Raft snapshot archive.
var members = []string{"meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed"}

// Info is what verification learns of a snapshot.
type Info struct {
	Index uint64 `json:"raft_index"`
	Term  uint64 `json:"raft_term"`
	ID    string `json:"raft_id"`
	Size  int64  `json:"state_size"`
}

// raftMeta is the part of meta.json the agent checks.
type raftMeta struct {
	ID    string `json:"ID"`
	Index uint64 `json:"Index"`
	Term  uint64 `json:"Term"`
	Size  int64  `json:"Size"`
}

// VerifyFile checks a snapshot file offline.
func VerifyFile(path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return Info{}, err
	}
	defer f.Close()
	return Verify(bufio.NewReaderSize(f, 1<<20))
}

// Verify reads a snapshot archive to its end: gzip to EOF with nothing after it, tar
// members exactly meta.json, state.bin, SHA256SUMS and SHA256SUMS.sealed, SHA256SUMS
// matching the other two, meta.json parsing with a Size equal to state.bin's.
func Verify(r io.Reader) (Info, error) {
	zr, err := gzip.NewReader(r)
	if err != nil {
		return Info{}, fmt.Errorf("%w: not gzip: %v", ErrInvalid, err)
	}
	zr.Multistream(false)
	tr := tar.NewReader(zr)
	sums := map[string]string{}
	sizes := map[string]int64{}
	var metaRaw, sumsRaw []byte
	var order []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return Info{}, fmt.Errorf("%w: tar: %v", ErrInvalid, err)
		}
		if _, dup := sizes[h.Name]; dup {
			return Info{}, fmt.Errorf("%w: member %s appears twice", ErrInvalid, h.Name)
		}
		order = append(order, h.Name)
		hash := sha256.New()
		var buf strings.Builder
		w := io.Writer(hash)
		if h.Name == "meta.json" || h.Name == "SHA256SUMS" {
			w = io.MultiWriter(hash, &limitedBuilder{b: &buf, max: 1 << 20})
		}
		n, err := io.Copy(w, tr)
		if err != nil {
			return Info{}, fmt.Errorf("%w: member %s: %v", ErrInvalid, h.Name, err)
		}
		sizes[h.Name] = n
		sums[h.Name] = hex.EncodeToString(hash.Sum(nil))
		switch h.Name {
		case "meta.json":
			metaRaw = []byte(buf.String())
		case "SHA256SUMS":
			sumsRaw = []byte(buf.String())
		}
	}
	// Drain: the gzip stream must end cleanly (checksum and size trailer verified).
	if _, err := io.Copy(io.Discard, zr); err != nil {
		return Info{}, fmt.Errorf("%w: gzip: %v", ErrInvalid, err)
	}
	if err := zr.Close(); err != nil {
		return Info{}, fmt.Errorf("%w: gzip: %v", ErrInvalid, err)
	}
	if n, _ := io.Copy(io.Discard, r); n > 0 {
		return Info{}, fmt.Errorf("%w: %d bytes after the end of the archive", ErrInvalid, n)
	}
	got := append([]string(nil), order...)
	sort.Strings(got)
	want := append([]string(nil), members...)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		return Info{}, fmt.Errorf("%w: members %v, want exactly %v", ErrInvalid, order, members)
	}
	if sizes["SHA256SUMS.sealed"] == 0 {
		return Info{}, fmt.Errorf("%w: SHA256SUMS.sealed is empty (the seal failed mid-snapshot)", ErrInvalid)
	}
	listed := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(sumsRaw)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			return Info{}, fmt.Errorf("%w: SHA256SUMS line %q", ErrInvalid, line)
		}
		listed[f[1]] = f[0]
	}
	for _, name := range []string{"meta.json", "state.bin"} {
		if listed[name] != sums[name] {
			return Info{}, fmt.Errorf("%w: %s has sha256 %s, SHA256SUMS says %q", ErrInvalid, name, sums[name], listed[name])
		}
	}
	var m raftMeta
	if err := json.Unmarshal(metaRaw, &m); err != nil {
		return Info{}, fmt.Errorf("%w: meta.json: %v", ErrInvalid, err)
	}
	if m.Size != sizes["state.bin"] {
		return Info{}, fmt.Errorf("%w: meta.json says %d bytes of state, state.bin has %d", ErrInvalid, m.Size, sizes["state.bin"])
	}
	return Info{Index: m.Index, Term: m.Term, ID: m.ID, Size: m.Size}, nil
}

// limitedBuilder keeps at most max bytes (meta.json and SHA256SUMS are small; a huge
// one is a broken archive, not a reason to use memory).
type limitedBuilder struct {
	b   *strings.Builder
	max int
}

func (l *limitedBuilder) Write(p []byte) (int, error) {
	if l.b.Len()+len(p) > l.max {
		return 0, fmt.Errorf("%w: member larger than %d bytes", ErrInvalid, l.max)
	}
	return l.b.Write(p)
}
