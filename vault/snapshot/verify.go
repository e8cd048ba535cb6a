// Package snapshot owns Raft snapshot files on host storage: streaming one to a temp
// file in the target directory, verifying it offline, publishing it atomically with a
// JSON manifest beside it, listing (ordered by the manifest's time and Raft index, not
// by file names), and the retention plan.
//
// Invariants: a reader never sees a half file (temp file → fsync → rename → directory
// fsync); a snapshot that fails verification is never published; retention runs only
// after a verified save and never drops the newest verified snapshot. Memory stays flat
// and errors short whatever the input: everything streams, and verification takes
// exactly the four regular-file members within fixed size caps, the same rules for a
// stream being saved and a file on disk. The directory is created 0700 and never
// re-moded.
//
// It imports the standard library, golang.org/x/sys/unix and internal/safefile
// (enforced by internal/deptest).
package snapshot

import (
	"archive/tar"
	"bufio"
	"bytes"
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

// members are exactly the files of a Vault Raft snapshot archive, with the largest size
// each may have: verification reads the archive with flat memory and rejects anything
// else at its header, before reading a byte of it.
var members = map[string]int64{
	"meta.json":         1 << 20,
	"state.bin":         MaxStateSize,
	"SHA256SUMS":        4 << 10,
	"SHA256SUMS.sealed": 64 << 10,
}

// MaxStateSize caps state.bin (256 GiB: far beyond any Vault that fits a homelab).
const MaxStateSize int64 = 256 << 30

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
	return Verify(f)
}

// Verify reads a snapshot archive to its end: gzip to EOF with nothing after it; tar
// members exactly meta.json, state.bin, SHA256SUMS and SHA256SUMS.sealed, each a regular
// file within its size cap, each once; SHA256SUMS matching the first two; meta.json
// parsing with a Size equal to state.bin's. The same rules apply to a stream being
// saved and to a file on disk. Memory stays flat and errors short, whatever the input.
func Verify(r io.Reader) (Info, error) {
	br := bufio.NewReaderSize(r, 1<<20) // gzip reads through it: trailing bytes stay visible below
	zr, err := gzip.NewReader(br)
	if err != nil {
		return Info{}, fmt.Errorf("%w: not gzip: %v", ErrInvalid, err)
	}
	zr.Multistream(false)
	tr := tar.NewReader(zr)
	sums := map[string]string{}
	sizes := map[string]int64{}
	var metaRaw, sumsRaw []byte
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return Info{}, fmt.Errorf("%w: tar: %v", ErrInvalid, err)
		}
		limit, known := members[h.Name]
		switch {
		case !known:
			return Info{}, fmt.Errorf("%w: unexpected member %.64q (a Raft snapshot holds exactly %s)", ErrInvalid, h.Name, memberList())
		case h.Typeflag != tar.TypeReg && h.Typeflag != tar.TypeRegA: //nolint:staticcheck // TypeRegA: old writers
			return Info{}, fmt.Errorf("%w: member %s is not a regular file (type %q)", ErrInvalid, h.Name, h.Typeflag)
		case h.Size < 0 || h.Size > limit:
			return Info{}, fmt.Errorf("%w: member %s claims %d bytes, more than the %d allowed", ErrInvalid, h.Name, h.Size, limit)
		}
		if _, dup := sizes[h.Name]; dup {
			return Info{}, fmt.Errorf("%w: member %s appears twice", ErrInvalid, h.Name)
		}
		hash := sha256.New()
		var buf bytes.Buffer
		w := io.Writer(hash)
		if h.Name == "meta.json" || h.Name == "SHA256SUMS" {
			w = io.MultiWriter(hash, &buf) // bounded by the member's cap
		}
		n, err := io.Copy(w, io.LimitReader(tr, limit+1))
		if err != nil {
			return Info{}, fmt.Errorf("%w: member %s: %v", ErrInvalid, h.Name, err)
		}
		if n > limit {
			return Info{}, fmt.Errorf("%w: member %s is larger than the %d bytes allowed", ErrInvalid, h.Name, limit)
		}
		sizes[h.Name] = n
		sums[h.Name] = hex.EncodeToString(hash.Sum(nil))
		switch h.Name {
		case "meta.json":
			metaRaw = buf.Bytes()
		case "SHA256SUMS":
			sumsRaw = buf.Bytes()
		}
	}
	// Drain: the gzip stream must end cleanly (checksum and size trailer verified); a
	// tar archive ends with at most a few KiB of padding.
	if n, err := io.Copy(io.Discard, io.LimitReader(zr, 1<<20+1)); err != nil {
		return Info{}, fmt.Errorf("%w: gzip: %v", ErrInvalid, err)
	} else if n > 1<<20 {
		return Info{}, fmt.Errorf("%w: more than 1 MiB of data after the tar archive", ErrInvalid)
	}
	if err := zr.Close(); err != nil {
		return Info{}, fmt.Errorf("%w: gzip: %v", ErrInvalid, err)
	}
	if n, _ := io.Copy(io.Discard, br); n > 0 {
		return Info{}, fmt.Errorf("%w: %d bytes after the end of the archive", ErrInvalid, n)
	}
	if len(sizes) != len(members) {
		var missing []string
		for name := range members {
			if _, ok := sizes[name]; !ok {
				missing = append(missing, name)
			}
		}
		sort.Strings(missing)
		return Info{}, fmt.Errorf("%w: members missing: %s (a Raft snapshot holds exactly %s)", ErrInvalid, strings.Join(missing, ", "), memberList())
	}
	if sizes["SHA256SUMS.sealed"] == 0 {
		return Info{}, fmt.Errorf("%w: SHA256SUMS.sealed is empty (the seal failed mid-snapshot)", ErrInvalid)
	}
	listed := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(sumsRaw)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			return Info{}, fmt.Errorf("%w: SHA256SUMS line %.80q", ErrInvalid, line)
		}
		listed[f[1]] = f[0]
	}
	for _, name := range []string{"meta.json", "state.bin"} {
		if listed[name] != sums[name] {
			return Info{}, fmt.Errorf("%w: %s has sha256 %s, SHA256SUMS says %.80q", ErrInvalid, name, sums[name], listed[name])
		}
	}
	var m raftMeta
	if err := json.Unmarshal(metaRaw, &m); err != nil {
		return Info{}, fmt.Errorf("%w: meta.json: %.200v", ErrInvalid, err)
	}
	if m.Size != sizes["state.bin"] {
		return Info{}, fmt.Errorf("%w: meta.json says %d bytes of state, state.bin has %d", ErrInvalid, m.Size, sizes["state.bin"])
	}
	return Info{Index: m.Index, Term: m.Term, ID: m.ID, Size: m.Size}, nil
}

func memberList() string {
	names := make([]string, 0, len(members))
	for n := range members {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}
