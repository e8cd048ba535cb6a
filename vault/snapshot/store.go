package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
)

// Errors a caller branches on.
var (
	ErrNoSpace = errors.New("not enough free space for a snapshot")
)

const (
	ext         = ".snap"
	manifestExt = ".snap.json"
	tmpPrefix   = ".incoming-"
	lockName    = ".lock"
	timeLayout  = "20060102T150405.000Z"
)

// Manifest is written beside each published snapshot.
type Manifest struct {
	File              string    `json:"file"`
	SHA256            string    `json:"sha256"`
	Size              int64     `json:"size"`
	RaftIndex         uint64    `json:"raft_index"`
	RaftTerm          uint64    `json:"raft_term"`
	VaultVersion      string    `json:"vault_version"`
	ClusterID         string    `json:"cluster_id"`
	KeysetFingerprint string    `json:"keyset_fingerprint"`
	Created           time.Time `json:"created"`
	AgentVersion      string    `json:"agent_version"`
	Source            string    `json:"source"`
	// Drill is the last restore drill of this snapshot.
	Drill *DrillResult `json:"drill,omitempty"`
	// Imported is set on a snapshot taken by hand (`vault operator raft snapshot save`)
	// and brought in with `snapshots import`. Its KeysetFingerprint stays empty until a
	// drill opens it with the keyfile's shares (Pair).
	Imported *Import `json:"imported,omitempty"`
	// LeaseHolder is the agent that held the leadership Lease when the snapshot was
	// committed (a Proxmox cluster's agents; empty for a lone agent or a verb).
	LeaseHolder string `json:"lease_holder,omitempty"`
}

// Import says where an imported snapshot came from.
type Import struct {
	From string    `json:"from"` // the file's base name
	At   time.Time `json:"at"`
}

// Unpaired reports an imported snapshot no drill has paired with a keyset yet: restore
// and recover cannot know its keys.
func (m *Manifest) Unpaired() bool { return m != nil && m.Imported != nil && m.KeysetFingerprint == "" }

// DrillResult is a restore drill's outcome, recorded in the drilled snapshot's manifest.
type DrillResult struct {
	At           time.Time `json:"at"`
	Passed       bool      `json:"passed"`
	Reason       string    `json:"reason,omitempty"`
	DurationSecs float64   `json:"duration_seconds"`
}

// Entry is one snapshot in a directory.
type Entry struct {
	Path     string    `json:"path"`
	Time     time.Time `json:"time"`
	Size     int64     `json:"size"`
	Verified bool      `json:"verified"` // a manifest is present: it passed verification when saved
	Manifest *Manifest `json:"manifest,omitempty"`
}

// Store is a snapshot directory on the host.
type Store struct {
	Dir string
	// MinFree is the free space required before a snapshot starts (default: twice the
	// newest snapshot, at least 64 MiB).
	MinFree int64
	// BeforeCommit, when set, runs after the snapshot is verified and flushed and before
	// it is renamed into place; an error there publishes nothing. It may fill in the
	// manifest (a cluster's leader proves it still holds the Lease, and records so).
	BeforeCommit func(ctx context.Context, m *Manifest) error
}

// Lock takes the directory's exclusive lock (flock), waiting until ctx ends: backup-now
// and the daemon's schedule never write at the same time. Unlock with the returned func.
func (s *Store) Lock(ctx context.Context) (func(), error) {
	if err := s.ensureDir(); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(s.Dir, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", s.Dir, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("another backup holds %s: %w", filepath.Join(s.Dir, lockName), ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (s *Store) ensureDir() error {
	if err := safefile.PrivateDir(s.Dir); err != nil {
		return fmt.Errorf("snapshot directory: %w", err)
	}
	return nil
}

// CheckSpace refuses to start when the filesystem has less free space than needed.
func (s *Store) CheckSpace() error {
	if err := s.ensureDir(); err != nil {
		return err
	}
	need := s.MinFree
	if need <= 0 {
		need = 64 << 20
		if es, err := s.List(); err == nil && len(es) > 0 {
			need = max(need, 2*es[len(es)-1].Size)
		}
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.Dir, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", s.Dir, err)
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	if free < need {
		return fmt.Errorf("%w: %s has %d MiB free, a snapshot needs about %d MiB; free space or point snapshots.dir elsewhere", ErrNoSpace, s.Dir, free>>20, need>>20)
	}
	return nil
}

// Save streams a snapshot from fill into a temp file in the directory while verifying
// the same bytes, then fsyncs, writes the manifest and renames both into place and
// fsyncs the directory. On any failure the temp file is removed and nothing is
// published. The caller holds the lock.
func (s *Store) Save(ctx context.Context, now time.Time, m Manifest, fill func(w io.Writer) error) (Entry, error) {
	if err := s.ensureDir(); err != nil {
		return Entry{}, err
	}
	s.removeStale()
	tmp, err := os.CreateTemp(s.Dir, tmpPrefix+"*"+ext)
	if err != nil {
		return Entry{}, err
	}
	published := false
	defer func() {
		if !published {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	hash := sha256.New()
	counter := &countWriter{}
	// The verifier reads the same bytes through a small buffered pipe, so a momentary
	// stall of either side does not hold the other up; memory stays bounded.
	pipe := newChunkPipe(32)
	verified := make(chan verifyResult, 1)
	go func() {
		info, err := Verify(pipe)
		_, _ = io.Copy(io.Discard, pipe) // keep the writer unblocked whatever happened
		verified <- verifyResult{info, err}
	}()
	// Writeback starts while the stream is still arriving, so the final fsync is short.
	fillErr := fill(io.MultiWriter(&writeback{f: tmp}, hash, counter, pipe))
	pipe.CloseWrite()
	vr := <-verified
	if fillErr != nil {
		if errors.Is(fillErr, syscall.ENOSPC) {
			return Entry{}, fmt.Errorf("%w: the disk filled up after %d bytes (%v); nothing was kept", ErrNoSpace, counter.n, fillErr)
		}
		return Entry{}, fmt.Errorf("stream snapshot: %w", fillErr)
	}
	if vr.err != nil {
		return Entry{}, fmt.Errorf("verify snapshot (%d bytes received): %w", counter.n, vr.err)
	}
	if err := tmp.Sync(); err != nil {
		return Entry{}, fmt.Errorf("fsync snapshot: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return Entry{}, err
	}
	name := "vault-" + now.UTC().Format(timeLayout) + ext
	final := filepath.Join(s.Dir, name)
	if _, err := os.Lstat(final); err == nil {
		return Entry{}, fmt.Errorf("%s exists already: a snapshot of the same millisecond is not replaced", final)
	}
	m.File, m.SHA256, m.Size = name, hex.EncodeToString(hash.Sum(nil)), counter.n
	m.RaftIndex, m.RaftTerm, m.Created = vr.info.Index, vr.info.Term, now.UTC()
	if s.BeforeCommit != nil {
		if err := s.BeforeCommit(ctx, &m); err != nil {
			return Entry{}, fmt.Errorf("snapshot not committed: %w", err)
		}
	}
	if err := writeJSONAtomic(filepath.Join(s.Dir, name+".json.tmp"), &m); err != nil {
		return Entry{}, err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return Entry{}, err
	}
	published = true
	if err := os.Rename(filepath.Join(s.Dir, name+".json.tmp"), final+".json"); err != nil {
		return Entry{}, err
	}
	if err := safefile.SyncDir(s.Dir); err != nil {
		return Entry{}, err
	}
	return Entry{Path: final, Time: m.Created, Size: m.Size, Verified: true, Manifest: &m}, nil
}

type verifyResult struct {
	info Info
	err  error
}

// writeback writes to f and asks the kernel to start writing each 16 MiB to disk
// (sync_file_range), without waiting: the fsync at the end then finds little to do.
type writeback struct {
	f       *os.File
	off     int64
	flushed int64
}

func (w *writeback) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.off += int64(n)
	if w.off-w.flushed >= 16<<20 {
		_ = unix.SyncFileRange(int(w.f.Fd()), w.flushed, w.off-w.flushed, unix.SYNC_FILE_RANGE_WRITE)
		w.flushed = w.off
	}
	return n, err
}

// chunkPipe is an io.Pipe with a bounded buffer of copied chunks.
// The reader (the verifier) always drains to EOF, so a write never blocks for good.
type chunkPipe struct {
	ch  chan []byte
	cur []byte
}

func newChunkPipe(chunks int) *chunkPipe { return &chunkPipe{ch: make(chan []byte, chunks)} }

func (p *chunkPipe) Write(b []byte) (int, error) {
	c := make([]byte, len(b))
	copy(c, b)
	p.ch <- c
	return len(b), nil
}

// CloseWrite ends the stream: the reader sees EOF after the buffered chunks.
func (p *chunkPipe) CloseWrite() { close(p.ch) }

func (p *chunkPipe) Read(b []byte) (int, error) {
	for len(p.cur) == 0 {
		c, ok := <-p.ch
		if !ok {
			return 0, io.EOF
		}
		p.cur = c
	}
	n := copy(b, p.cur)
	p.cur = p.cur[n:]
	return n, nil
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// removeStale deletes temp files left by a killed backup (the lock proves nobody is
// writing them).
func (s *Store) removeStale() {
	ents, _ := os.ReadDir(s.Dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) || strings.HasSuffix(e.Name(), ".json.tmp") {
			os.Remove(filepath.Join(s.Dir, e.Name()))
		}
	}
}

// List returns the published snapshots, oldest first. Temp files are never listed; a
// snapshot without its manifest (a crash between the two renames) is listed unverified.
func (s *Store) List() ([]Entry, error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "vault-") || !strings.HasSuffix(name, ext) {
			continue
		}
		ts, err := time.Parse(timeLayout, strings.TrimSuffix(strings.TrimPrefix(name, "vault-"), ext))
		if err != nil {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		en := Entry{Path: filepath.Join(s.Dir, name), Time: ts, Size: fi.Size()}
		if m, err := ReadManifest(en.Path); err == nil && m.Size == fi.Size() && m.File == name {
			// The manifest's time, recorded when the snapshot was verified, orders it:
			// a file name is whatever a writer chose.
			en.Verified, en.Manifest, en.Time = true, m, m.Created
		} else if ts.After(fi.ModTime()) {
			en.Time = fi.ModTime() // an unverified file cannot claim to be newer than it is
		}
		out = append(out, en)
	}
	SortEntries(out)
	return out, nil
}

// SortEntries orders snapshots oldest first: by time, then Raft index.
func SortEntries(es []Entry) {
	sort.SliceStable(es, func(i, j int) bool {
		if !es[i].Time.Equal(es[j].Time) {
			return es[i].Time.Before(es[j].Time)
		}
		return es[i].raftIndex() < es[j].raftIndex()
	})
}

func (e Entry) raftIndex() uint64 {
	if e.Manifest == nil {
		return 0
	}
	return e.Manifest.RaftIndex
}

// ReadManifest reads the manifest beside a snapshot.
func ReadManifest(snapshot string) (*Manifest, error) {
	b, err := os.ReadFile(snapshot + ".json")
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("manifest %s.json: %w", snapshot, err)
	}
	return &m, nil
}

// CheckFile verifies a snapshot file offline and, when it has a manifest, that the
// file's sha256 and size are the manifest's.
func CheckFile(path string) (Info, error) {
	info, err := VerifyFile(path)
	if err != nil {
		return info, err
	}
	m, err := ReadManifest(path)
	if errors.Is(err, os.ErrNotExist) {
		return info, nil
	}
	if err != nil {
		return info, err
	}
	f, err := os.Open(path)
	if err != nil {
		return info, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return info, err
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != m.SHA256 || n != m.Size {
		return info, fmt.Errorf("%w: %s does not match its manifest (sha256 %s, %d bytes; manifest %s, %d bytes)", ErrInvalid, path, sum, n, m.SHA256, m.Size)
	}
	return info, nil
}

// RecordDrill writes a drill's result into the snapshot's manifest (a temporary file
// renamed over it: a crash leaves the old manifest or the new one).
func RecordDrill(snapshot string, r DrillResult) error {
	return updateManifest(snapshot, func(m *Manifest) { m.Drill = &r })
}

// Pair records the keyset (and cluster) a drill opened an imported snapshot with.
func Pair(snapshot, keysetFingerprint, clusterID string) error {
	return updateManifest(snapshot, func(m *Manifest) {
		m.KeysetFingerprint = keysetFingerprint
		if m.ClusterID == "" {
			m.ClusterID = clusterID
		}
	})
}

// updateManifest rewrites a snapshot's manifest atomically with change applied.
func updateManifest(snapshot string, change func(*Manifest)) error {
	m, err := ReadManifest(snapshot)
	if err != nil {
		return err
	}
	change(m)
	tmp := snapshot + ".json.tmp"
	if err := writeJSONAtomic(tmp, m); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, snapshot+".json"); err != nil {
		return err
	}
	return safefile.SyncDir(filepath.Dir(snapshot))
}

// Remove deletes a snapshot and its manifest.
func (s *Store) Remove(e Entry) error {
	if err := os.Remove(e.Path + ".json"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(e.Path); err != nil {
		return err
	}
	return safefile.SyncDir(s.Dir)
}

func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
