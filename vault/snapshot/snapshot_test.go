package snapshot

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
		_, err := n.StreamSnapshot(ctx, res.RootToken, &buf)
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
		"not gzip":         []byte(hex.EncodeToString(sum[:])),
		"empty":            nil,
	} {
		if _, err := Verify(bytes.NewReader(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
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
		if lab.InCI() {
			t.Fatalf("CI=true: mount a tmpfs: %v %s", err, out)
		}
		t.Skipf("skipped outside CI: cannot mount a tmpfs: %s", out)
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
