package snapshot

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// realSnapshot takes a snapshot of a lab Vault holding a little data.
func realSnapshot(t *testing.T) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v := lab.TestVault(t)
	n, err := vault.NewNode("v", v.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := n.Init(ctx, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.Unseal(ctx, res.Keyset, nil); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := lab.WaitFor(ctx, 30*time.Second, "snapshot", func(ctx context.Context) error {
		buf.Reset()
		_, err := n.StreamSnapshot(ctx, res.RootToken, time.Minute, &buf)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type member struct {
	name string
	data []byte
}

func unpack(t *testing.T, b []byte) []member {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var out []member
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		d, _ := io.ReadAll(tr)
		out = append(out, member{h.Name, d})
	}
}

func pack(ms []member) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, m := range ms {
		tw.WriteHeader(&tar.Header{Name: m.name, Mode: 0o600, Size: int64(len(m.data))})
		tw.Write(m.data)
	}
	tw.Close()
	zw.Close()
	return buf.Bytes()
}

func TestVerifyCatchesEveryCorruption(t *testing.T) {
	snap := realSnapshot(t)
	info, err := Verify(bytes.NewReader(snap))
	if err != nil {
		t.Fatalf("a real snapshot fails: %v", err)
	}
	if info.Index == 0 || info.Size == 0 {
		t.Fatalf("info %+v", info)
	}
	ms := unpack(t, snap)
	if len(ms) != 4 {
		t.Fatalf("members %d", len(ms))
	}
	if _, err := Verify(bytes.NewReader(pack(ms))); err != nil {
		t.Fatalf("repacked real members fail: %v", err)
	}
	flipped := bytes.Clone(snap)
	flipped[len(flipped)/2] ^= 0x01
	wrongSums := append([]member(nil), ms...)
	for i, m := range wrongSums {
		if m.name == "SHA256SUMS" {
			wrongSums[i].data = []byte(strings.Replace(string(m.data), string(m.data[:8]), "00000000", 1))
		}
	}
	changedState := append([]member(nil), ms...)
	for i, m := range changedState {
		if m.name == "state.bin" {
			changedState[i].data = append(bytes.Clone(m.data), 'x')
		}
	}
	sum := sha256.Sum256([]byte("x"))
	for name, bad := range map[string][]byte{
		"flipped byte":     flipped,
		"truncated":        snap[:len(snap)*2/3],
		"truncated gzip":   snap[:len(snap)-4],
		"extra member":     pack(append(append([]member(nil), ms...), member{"extra", []byte("x")})),
		"missing member":   pack(ms[:3]),
		"wrong SHA256SUMS": pack(wrongSums),
		"state changed":    pack(changedState),
		"trailing bytes":   append(bytes.Clone(snap), []byte("garbage")...),
		"symlink member":   packTyped(ms, "meta.json", tar.TypeSymlink),
		"directory member": packTyped(ms, "state.bin", tar.TypeDir),
		"duplicate member": pack(append(append([]member(nil), ms...), ms[0])),
		"huge meta.json":   pack(append(withoutMember(ms, "meta.json"), member{"meta.json", bytes.Repeat([]byte(" "), 2<<20)})),
		"not gzip":         []byte(hex.EncodeToString(sum[:])),
		"empty":            nil,
	} {
		if _, err := Verify(bytes.NewReader(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// packTyped packs ms with name's header of the given type (no data for non-files).
func packTyped(ms []member, name string, typ byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, m := range ms {
		if m.name == name {
			tw.WriteHeader(&tar.Header{Name: m.name, Typeflag: typ, Linkname: "/etc/shadow", Mode: 0o600})
			continue
		}
		tw.WriteHeader(&tar.Header{Name: m.name, Mode: 0o600, Size: int64(len(m.data))})
		tw.Write(m.data)
	}
	tw.Close()
	zw.Close()
	return buf.Bytes()
}

func withoutMember(ms []member, name string) []member {
	var out []member
	for _, m := range ms {
		if m.name != name {
			out = append(out, m)
		}
	}
	return out
}

// A stream being saved and a file on disk are judged by the same rules: what backup
// stores, restore accepts, and trailing bytes after the gzip stream fail both.
func TestStreamAndFileVerifiersAgree(t *testing.T) {
	snap := realSnapshot(t)
	s := &Store{Dir: filepath.Join(t.TempDir(), "snaps")}
	bad := append(bytes.Clone(snap), []byte("trailing garbage")...)
	if _, err := s.Save(context.Background(), time.Now(), Manifest{}, func(w io.Writer) error { _, err := w.Write(bad); return err }); !errors.Is(err, ErrInvalid) {
		t.Fatalf("the streaming verifier accepted trailing bytes: %v", err)
	}
	f := filepath.Join(t.TempDir(), "bad.snap")
	os.WriteFile(f, bad, 0o600)
	if _, err := VerifyFile(f); !errors.Is(err, ErrInvalid) {
		t.Fatalf("the file verifier accepted trailing bytes: %v", err)
	}
}

// helperVerify is the child side of TestHostileArchiveStaysSmall: it verifies the file
// in $PVA_VERIFY_FILE and prints the error.
func TestMain(m *testing.M) {
	if f := os.Getenv("PVA_VERIFY_FILE"); f != "" {
		_, err := VerifyFile(f)
		fmt.Printf("%v", err)
		os.Exit(0)
	}
	os.Exit(lab.RunTests(m))
}

// A crafted archive (hundreds of thousands of member names in a few hundred KiB of
// gzip) once took the heap to 301 MiB and produced a ~300 MB error. Verification now
// stops at the first header that is not one of the four members: the child process that
// verifies it grows less than 32 MiB over one that verifies a one-member archive (the
// test binary's own size, and the race detector's, are the same in both) and the error
// is short.
func TestHostileArchiveStaysSmall(t *testing.T) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for i := 0; i < 100000; i++ {
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("%s-%08d", strings.Repeat("x", 80), i), Mode: 0o600, Typeflag: tar.TypeReg})
	}
	tw.Close()
	zw.Close()
	verify := func(archive []byte) (string, int64) {
		path := filepath.Join(t.TempDir(), "crafted.snap")
		os.WriteFile(path, archive, 0o600)
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "PVA_VERIFY_FILE="+path)
		out, err := cmd.Output()
		if err != nil {
			t.Fatal(err)
		}
		return string(out), cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss >> 10
	}
	var one bytes.Buffer
	zw1 := gzip.NewWriter(&one)
	tw1 := tar.NewWriter(zw1)
	tw1.WriteHeader(&tar.Header{Name: "unexpected", Mode: 0o600, Typeflag: tar.TypeReg})
	tw1.Close()
	zw1.Close()
	_, base := verify(one.Bytes())
	out, peak := verify(buf.Bytes())
	t.Logf("crafted archive %d KiB: verifier peak RSS %d MiB (%d MiB for a one-member archive), error %d bytes: %s", buf.Len()>>10, peak, base, len(out), out)
	if peak-base >= 32 || len(out) > 300 || !strings.Contains(out, "unexpected member") {
		t.Fatalf("peak RSS %d MiB over %d, error %d bytes: %.300s", peak, base, len(out), out)
	}
	// A header claiming an enormous member is refused before a byte of it is read.
	buf.Reset()
	zw = gzip.NewWriter(&buf)
	tw = tar.NewWriter(zw)
	tw.WriteHeader(&tar.Header{Name: "state.bin", Mode: 0o600, Size: MaxStateSize + 1})
	zw.Close()
	if _, err := Verify(bytes.NewReader(buf.Bytes())); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "claims") {
		t.Fatalf("an oversized member: %v", err)
	}
}

// Snapshots are ordered by the time their manifest recorded when they were verified,
// then the Raft index; a file name is whatever a writer chose, and an unverified file
// cannot claim to be newer than it is.
func TestListOrdersByManifestNotFileName(t *testing.T) {
	snap := realSnapshot(t)
	s := &Store{Dir: filepath.Join(t.TempDir(), "snaps")}
	base := time.Date(2026, 11, 27, 3, 0, 0, 0, time.UTC)
	a, err := s.Save(context.Background(), base, Manifest{}, func(w io.Writer) error { _, err := w.Write(snap); return err })
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Save(context.Background(), base.Add(time.Hour), Manifest{}, func(w io.Writer) error { _, err := w.Write(snap); return err })
	if err != nil {
		t.Fatal(err)
	}
	// Rename the older one to a name that claims the future; its manifest still says.
	future := filepath.Join(s.Dir, "vault-20991231T000000.000Z.snap")
	os.Rename(a.Path, future)
	m, _ := ReadManifest(a.Path)
	m.File = filepath.Base(future)
	raw, _ := json.Marshal(m)
	os.WriteFile(future+".json", raw, 0o600)
	os.Remove(a.Path + ".json")
	// And an unverified file with a future name.
	os.WriteFile(filepath.Join(s.Dir, "vault-20991231T000001.000Z.snap"), snap, 0o600)
	es, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, e := range es {
		order = append(order, filepath.Base(e.Path))
	}
	if len(es) != 3 || es[0].Path != future || es[1].Path != b.Path || es[2].Verified {
		t.Fatalf("order %v", order)
	}
}

func TestSavePublishesAtomicallyAndNeverPartially(t *testing.T) {
	snap := realSnapshot(t)
	dir := filepath.Join(t.TempDir(), "snaps")
	s := &Store{Dir: dir}
	now := time.Date(2026, 11, 27, 3, 0, 0, 0, time.UTC)
	e, err := s.Save(context.Background(), now, Manifest{ClusterID: "c1", KeysetFingerprint: "sha256:abc"}, func(w io.Writer) error {
		_, err := w.Write(snap)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	m, err := ReadManifest(e.Path)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(snap)
	if m.SHA256 != hex.EncodeToString(want[:]) || m.Size != int64(len(snap)) || m.RaftIndex == 0 || m.ClusterID != "c1" || !m.Created.Equal(now) {
		t.Fatalf("manifest %+v", m)
	}
	if fi, _ := os.Stat(e.Path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("snapshot mode %o", fi.Mode().Perm())
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %o", di.Mode().Perm())
	}
	if _, err := CheckFile(e.Path); err != nil {
		t.Fatal(err)
	}

	// A stream that breaks, or bytes that do not verify: nothing published.
	for name, fill := range map[string]func(io.Writer) error{
		"stream error": func(w io.Writer) error { w.Write(snap[:len(snap)/2]); return errors.New("connection reset") },
		"corrupt":      func(w io.Writer) error { c := bytes.Clone(snap); c[len(c)/3] ^= 0xff; _, err := w.Write(c); return err },
	} {
		if _, err := s.Save(context.Background(), now.Add(time.Hour), Manifest{}, fill); err == nil {
			t.Fatalf("%s: saved", name)
		}
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, x := range ents {
		names = append(names, x.Name())
	}
	if len(names) != 2 { // the snapshot and its manifest
		t.Fatalf("directory holds %v", names)
	}
	// Manifest tampering is caught by CheckFile.
	os.WriteFile(e.Path+".json", []byte(strings.Replace(mustRead(t, e.Path+".json"), m.SHA256, strings.Repeat("0", 64), 1)), 0o600)
	if _, err := CheckFile(e.Path); !errors.Is(err, ErrInvalid) {
		t.Fatalf("manifest mismatch: %v", err)
	}
}

func mustRead(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A disk that fills up mid-stream: a clear error, nothing partial, the older snapshot intact.
func TestDiskFull(t *testing.T) {
	lab.Need(t)
	snap := realSnapshot(t)
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", mnt).CombinedOutput(); err != nil {
		lab.SkipOrFail(t, "cannot mount a tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	s := &Store{Dir: mnt, MinFree: 1}
	old, err := s.Save(context.Background(), time.Unix(1e9, 0), Manifest{}, func(w io.Writer) error { _, err := w.Write(snap); return err })
	if err != nil {
		t.Fatalf("first snapshot must fit: %v", err)
	}
	big := make([]byte, 1<<20)
	_, err = s.Save(context.Background(), time.Unix(2e9, 0), Manifest{}, func(w io.Writer) error {
		if _, err := w.Write(snap[:len(snap)/2]); err != nil {
			return err
		}
		_, err := w.Write(big)
		return err
	})
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "nothing was kept") {
		t.Fatalf("disk full: %v", err)
	}
	es, _ := s.List()
	if len(es) != 1 || es[0].Path != old.Path {
		t.Fatalf("entries after disk full %+v", es)
	}
	if _, err := CheckFile(old.Path); err != nil {
		t.Fatalf("older snapshot damaged: %v", err)
	}
	ents, _ := os.ReadDir(mnt)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			t.Fatalf("partial file left: %s", e.Name())
		}
	}
	s.MinFree = 1 << 30
	if err := s.CheckSpace(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("free-space check: %v", err)
	}
}

// An imported snapshot is unpaired until Pair records the keyset a drill opened it
// with; a second snapshot of the same millisecond never replaces the first.
func TestImportedPairAndNoReplace(t *testing.T) {
	snap := realSnapshot(t)
	s := &Store{Dir: filepath.Join(t.TempDir(), "snaps")}
	at := time.Date(2026, 11, 15, 2, 0, 0, 0, time.UTC)
	fill := func(w io.Writer) error { _, err := w.Write(snap); return err }
	e, err := s.Save(context.Background(), at, Manifest{Source: "import", Imported: &Import{From: "manual.snap", At: at}}, fill)
	if err != nil {
		t.Fatal(err)
	}
	if !e.Manifest.Unpaired() {
		t.Fatal("an import without a keyset is not unpaired")
	}
	if _, err := s.Save(context.Background(), at, Manifest{KeysetFingerprint: "sha256:other"}, fill); err == nil || !strings.Contains(err.Error(), "is not replaced") {
		t.Fatalf("same millisecond: %v", err)
	}
	if err := Pair(e.Path, "sha256:abc", "cluster-1"); err != nil {
		t.Fatal(err)
	}
	m, err := ReadManifest(e.Path)
	if err != nil || m.Unpaired() || m.KeysetFingerprint != "sha256:abc" || m.ClusterID != "cluster-1" || m.Imported == nil {
		t.Fatalf("after Pair: %+v %v", m, err)
	}
	if _, err := CheckFile(e.Path); err != nil {
		t.Fatalf("a paired manifest still checks: %v", err)
	}
	if (*Manifest)(nil).Unpaired() {
		t.Fatal("no manifest is not an unpaired import")
	}
}
