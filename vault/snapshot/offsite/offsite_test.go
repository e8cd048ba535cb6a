package offsite

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/minio/minio-go/v7"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/provision"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

func TestMain(m *testing.M) { os.Exit(lab.RunTests(m)) }

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// targets starts one of each kind on real servers: a directory, OpenSSH's chrooted
// internal-sftp for a non-root account, SeaweedFS's S3; and the directory and SFTP
// kinds again with their root a symbolic link to the real directory (a mount point
// reached through a link, as /mnt/backup often is).
func targets(t *testing.T) (map[string]Target, *lab.SSHD) {
	t.Helper()
	bins := lab.Need(t)
	ctx := ctxFor(t, 2*time.Minute)
	out := map[string]Target{"dir": &Dir{Root: t.TempDir()}}
	linked := filepath.Join(t.TempDir(), "backup")
	if err := os.Symlink(t.TempDir(), linked); err != nil {
		t.Fatal(err)
	}
	out["dir-linked-root"] = &Dir{Root: linked}

	user, err := lab.NewUser("pvasftpo", false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(user.Close)
	chroot := lab.TestDataDir(t)
	os.Chmod(chroot, 0o755)
	for _, d := range []string{"vault", "vault2"} {
		share := filepath.Join(chroot, d)
		os.Mkdir(share, 0o700)
		if err := chownTo(share, user.Name); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("vault2", filepath.Join(chroot, "vault-link")); err != nil {
		t.Fatal(err)
	}
	srv, err := lab.StartSFTP(ctx, bins, t.TempDir(), user, chroot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	kh := filepath.Join(t.TempDir(), "known_hosts")
	srv.WriteKnownHosts(kh)
	key, _ := os.ReadFile(srv.ClientKeyPath)
	conn, err := provision.Dial(ctx, srv.Host, provision.SSHConfig{User: user.Name, Port: srv.Port, Key: key, KnownHosts: kh, ConnectTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	sf, err := NewSFTP(conn.Client(), "/vault", user.Name+"@"+srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sf.Close() })
	out["sftp"] = sf
	sl, err := NewSFTP(conn.Client(), "/vault-link", user.Name+"@"+srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sl.Close() })
	out["sftp-linked-root"] = sl

	s3srv, err := lab.StartS3(ctx, bins, t.TempDir(), "vault-copies")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s3srv.Close)
	s3, err := NewS3(S3Config{Endpoint: s3srv.Endpoint, Bucket: s3srv.Bucket, Prefix: "pve1", AccessKey: s3srv.AccessKey, SecretKey: s3srv.SecretKey, AllowHTTP: true, PartSize: 5 << 20})
	if err != nil {
		t.Fatal(err)
	}
	out["s3"] = s3
	return out, srv
}

// failingReader fails after n bytes, as a killed or broken upload source.
type failingReader struct {
	r io.Reader
	n int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, errors.New("source broke")
	}
	if len(p) > f.n {
		p = p[:f.n]
	}
	n, err := f.r.Read(p)
	f.n -= n
	return n, err
}

// Every target stores atomically: a Put that fails part-way shows nothing (not even a
// temporary name), the object appears whole only when complete, and a name cannot
// leave the target's root.
func TestTargetsAreAtomic(t *testing.T) {
	ctx := ctxFor(t, 3*time.Minute)
	tgs, sftpd := targets(t)
	for kind, tg := range tgs {
		t.Run(kind, func(t *testing.T) {
			big := make([]byte, 12<<20) // more than one S3 part
			rand.Read(big)
			err := tg.Put(ctx, "snapshots/broken.snap.age", &failingReader{r: bytes.NewReader(big), n: 7 << 20}, -1)
			if err == nil {
				t.Fatal("a broken source was stored")
			}
			if objs, err := tg.List(ctx, ""); err != nil || len(objs) != 0 {
				t.Fatalf("after a broken Put: %v %v", objs, err)
			}
			if err := tg.Clean(ctx); err != nil {
				t.Fatal(err)
			}
			fsyncs := func() int {
				// sftp-server logs each fsync@openssh.com request at DEBUG3.
				log, _ := os.ReadFile(sftpd.SFTPLog)
				return strings.Count(string(log), ": fsync (handle ")
			}
			before := fsyncs()
			if err := tg.Put(ctx, "snapshots/whole.snap.age", bytes.NewReader(big), -1); err != nil {
				t.Fatal(err)
			}
			objs, err := tg.List(ctx, "snapshots/")
			if err != nil || len(objs) != 1 || objs[0].Name != "snapshots/whole.snap.age" || objs[0].Size != int64(len(big)) {
				t.Fatalf("list %+v %v", objs, err)
			}
			if err := checkObject(ctx, tg, "snapshots/whole.snap.age", int64(len(big)), sha(big)); err != nil {
				t.Fatal(err)
			}
			if s, ok := tg.(*SFTP); ok && (!s.CanSync() || fsyncs() != before+1) {
				log, _ := os.ReadFile(sftpd.SFTPLog)
				t.Fatalf("the server was not asked to flush the upload (fsync@openssh.com offered: %v, requests %d → %d)\n%s", s.CanSync(), before, fsyncs(), lastLines(string(log), 30))
			}
			if _, err := tg.Open(ctx, "snapshots/none"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("missing object: %v", err)
			}
			if err := tg.Put(ctx, "../escape", bytes.NewReader(nil), 0); err == nil {
				t.Fatal("a name outside the root was accepted")
			}
			if err := tg.Remove(ctx, "snapshots/whole.snap.age"); err != nil {
				t.Fatal(err)
			}
			if err := tg.Remove(ctx, "snapshots/whole.snap.age"); err != nil {
				t.Fatalf("removing a missing object: %v", err)
			}
		})
	}
}

// store holds n real snapshots of a lab Vault, a second apart.
func store(t *testing.T, n int) (*snapshot.Store, []snapshot.Entry) {
	t.Helper()
	ctx := ctxFor(t, 2*time.Minute)
	v := lab.TestVault(t)
	node, err := vault.NewNode("v", v.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := node.Init(ctx, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := node.Unseal(ctx, res.Keyset, nil); err != nil {
		t.Fatal(err)
	}
	st := &snapshot.Store{Dir: filepath.Join(t.TempDir(), "snaps")}
	at := time.Date(2026, 11, 1, 3, 0, 0, 0, time.UTC)
	for i := 0; i < n; i++ {
		err := lab.WaitFor(ctx, 30*time.Second, "snapshot", func(ctx context.Context) error {
			_, err := st.Save(ctx, at.Add(time.Duration(i)*time.Hour), snapshot.Manifest{ClusterID: "cluster-7f3a9c2e51", KeysetFingerprint: "k1"}, func(w io.Writer) error {
				_, err := node.StreamSnapshot(ctx, res.RootToken, time.Minute, w)
				return err
			})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	es, err := st.List()
	if err != nil || len(es) != n {
		t.Fatalf("%d snapshots %v", len(es), err)
	}
	return st, es
}

func keys(t *testing.T) (Keys, []age.Identity) {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	mk := make([]byte, 32)
	rand.Read(mk)
	return Keys{Recipients: []age.Recipient{id.Recipient()}, MAC: mk}, []age.Identity{id}
}

// Copies round-trip, and a copy swapped, edited or rolled back on the target is refused
// with the problem named; force takes the newest authentic copy.
func TestPushChooseFetchAndTampering(t *testing.T) {
	ctx := ctxFor(t, 3*time.Minute)
	_, es := store(t, 3)
	k, ids := keys(t)
	fresh := func() *Dir {
		d := &Dir{Root: t.TempDir()}
		for i, e := range es {
			if _, err := Push(ctx, d, e, k, e.Time, i == len(es)-1); err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	d := fresh()
	ch, err := Choose(ctx, d, ids, k.MAC, false)
	if err != nil || ch.Signed.Copy != CopyName(es[2].Path) || len(ch.Problems) != 0 {
		t.Fatalf("choose: %+v %v", ch, err)
	}
	got, err := Fetch(ctx, d, ch.Signed, ids, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(es[2].Path)
	b, _ := os.ReadFile(got)
	if !bytes.Equal(a, b) {
		t.Fatal("the fetched snapshot differs from the one pushed")
	}
	// Nothing in clear on the target.
	objs, _ := d.List(ctx, "")
	for _, o := range objs {
		raw, _ := os.ReadFile(filepath.Join(d.Root, o.Name))
		if bytes.Contains(raw, []byte("cluster-7f3a9c2e51")) || bytes.Contains(raw, a[:64]) {
			t.Fatalf("%s holds plaintext", o.Name)
		}
	}
	// Another key does not authenticate anything.
	other, _ := keys(t)
	if _, err := Choose(ctx, d, ids, other.MAC, true); err == nil || !strings.Contains(err.Error(), "no copy") {
		t.Fatalf("wrong manifest key: %v", err)
	}

	newest, older := CopyName(es[2].Path), CopyName(es[1].Path)
	file := func(d *Dir, name string) string { return filepath.Join(d.Root, filepath.FromSlash(name)) }
	for _, tc := range []struct {
		name   string
		tamper func(d *Dir)
		want   error
		fetch  bool // the problem shows only when the object is fetched
	}{
		{"edited manifest", func(d *Dir) {
			p := file(d, snapDir+newest+manifestExt)
			raw, _ := os.ReadFile(p)
			raw[len(raw)-20] ^= 1
			os.WriteFile(p, raw, 0o600)
		}, ErrEdited, false},
		{"manifest rewritten and encrypted again to the public recipient", func(d *Dir) {
			p := file(d, snapDir+newest+manifestExt)
			f, _ := os.Open(p)
			r, err := age.Decrypt(f, ids...)
			if err != nil {
				t.Fatal(err)
			}
			plain, _ := io.ReadAll(r)
			f.Close()
			var env envelope
			if err := json.Unmarshal(plain, &env); err != nil {
				t.Fatal(err)
			}
			env.Payload = bytes.Replace(env.Payload, []byte(`"size":`), []byte(`"size": `), 1)
			eb, _ := json.Marshal(env)
			var buf bytes.Buffer
			w, _ := age.Encrypt(&buf, k.Recipients...)
			w.Write(eb)
			w.Close()
			os.WriteFile(p, buf.Bytes(), 0o600)
		}, ErrEdited, false},
		{"swapped manifest", func(d *Dir) {
			raw, _ := os.ReadFile(file(d, snapDir+older+manifestExt))
			os.WriteFile(file(d, snapDir+newest+manifestExt), raw, 0o600)
		}, ErrSwapped, false},
		{"rolled back", func(d *Dir) {
			os.Remove(file(d, snapDir+newest+manifestExt))
			os.Remove(file(d, snapDir+newest+snapExt))
		}, ErrRolledBack, false},
		{"head removed", func(d *Dir) { os.Remove(file(d, headName)) }, ErrNoHead, false},
		{"swapped snapshot object", func(d *Dir) {
			raw, _ := os.ReadFile(file(d, snapDir+older+snapExt))
			os.WriteFile(file(d, snapDir+newest+snapExt), raw, 0o600)
		}, ErrEdited, true},
		{"edited snapshot object", func(d *Dir) {
			p := file(d, snapDir+newest+snapExt)
			raw, _ := os.ReadFile(p)
			raw[len(raw)/2] ^= 1
			os.WriteFile(p, raw, 0o600)
		}, ErrEdited, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := fresh()
			tc.tamper(d)
			ch, err := Choose(ctx, d, ids, k.MAC, false)
			if tc.fetch {
				if err != nil {
					t.Fatalf("choose: %v", err)
				}
				_, err = Fetch(ctx, d, ch.Signed, ids, t.TempDir())
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err %v; want %v", err, tc.want)
			}
			if !tc.fetch {
				ch, err = Choose(ctx, d, ids, k.MAC, true)
				if err != nil || ch.Signed.Copy == newest && tc.want != ErrNoHead || len(ch.Problems) == 0 {
					t.Fatalf("forced: %+v %v", ch, err)
				}
				t.Logf("%s: %s", tc.name, ch.Problems[0])
			}
		})
	}
}

// Retention on a target keeps the newest and drops the rest by the same planner;
// incomplete copies older than an hour go.
func TestPrune(t *testing.T) {
	ctx := ctxFor(t, 2*time.Minute)
	_, es := store(t, 3)
	k, _ := keys(t)
	d := &Dir{Root: t.TempDir()}
	for i, e := range es {
		if _, err := Push(ctx, d, e, k, e.Time, i == 2); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(d.Root, "snapshots", "vault-20200101T000000.000Z.snap.age"), []byte("orphan"), 0o600)
	removed, err := Prune(ctx, d, snapshot.Policy{KeepLast: 1}, es[2].Time.Add(time.Hour))
	if err != nil || len(removed) != 3 {
		t.Fatalf("removed %v %v", removed, err)
	}
	cs, _ := Copies(ctx, d)
	if len(cs) != 1 || cs[0].Name != CopyName(es[2].Path) || !cs[0].Complete {
		t.Fatalf("left %+v", cs)
	}
}

func sha(b []byte) string { return fmt.Sprintf("%x", sha256Sum(b)) }

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }

// chownTo gives path to the account name.
func chownTo(path, name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return os.Chown(path, uid, gid)
}

// On S3 (no read-back, no ciphertext hash) a snapshot object swapped for another copy's
// still fails the fetch: the plaintext is not what the authentic manifest describes.
func TestS3SwappedObjectRefused(t *testing.T) {
	bins := lab.Need(t)
	ctx := ctxFor(t, 2*time.Minute)
	srv, err := lab.StartS3(ctx, bins, t.TempDir(), "copies")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	tg, err := NewS3(S3Config{Endpoint: srv.Endpoint, Bucket: srv.Bucket, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey, AllowHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	_, es := store(t, 2)
	k, ids := keys(t)
	for i, e := range es {
		if _, err := Push(ctx, tg, e, k, e.Time, i == 1); err != nil {
			t.Fatal(err)
		}
	}
	ch, err := Choose(ctx, tg, ids, k.MAC, false)
	if err != nil || ch.Signed.SHA256 != "" {
		t.Fatalf("choose: %+v %v (an S3 copy carries no ciphertext hash)", ch.Signed, err)
	}
	if _, err := Fetch(ctx, tg, ch.Signed, ids, t.TempDir()); err != nil {
		t.Fatalf("fetch of an intact copy: %v", err)
	}
	c, _ := srv.Client()
	older, newest := CopyName(es[0].Path), CopyName(es[1].Path)
	if _, err := c.CopyObject(ctx, minio.CopyDestOptions{Bucket: srv.Bucket, Object: snapDir + newest + snapExt},
		minio.CopySrcOptions{Bucket: srv.Bucket, Object: snapDir + older + snapExt}); err != nil {
		t.Fatal(err)
	}
	if _, err := Fetch(ctx, tg, ch.Signed, ids, t.TempDir()); !errors.Is(err, ErrEdited) {
		t.Fatalf("fetch of a swapped object: %v", err)
	}
}

// endless is a hostile target: every object it opens is an endless stream, and it
// counts what was read from it.
type endless struct {
	*Dir
	read int64
}

func (e *endless) Open(context.Context, string) (io.ReadCloser, error) {
	return io.NopCloser(readerFunc(func(p []byte) (int, error) {
		rand.Read(p)
		e.read += int64(len(p))
		return len(p), nil
	})), nil
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// Reads of remote data are bounded by what the agent expects there: a copy by its
// authentic manifest's size (+1), a recovery copy by 1 MiB; a target that streams
// without end fills neither the disk nor the memory.
func TestRemoteReadsAreBounded(t *testing.T) {
	ctx := ctxFor(t, time.Minute)
	_, ids := keys(t)
	tg := &endless{Dir: &Dir{Root: t.TempDir()}}
	dir := t.TempDir()
	s := Signed{Copy: "vault-20261203T000000Z", Size: 64 << 10, Manifest: snapshot.Manifest{Size: 60 << 10}}
	if _, err := Fetch(ctx, tg, s, ids, dir); err == nil {
		t.Fatal("an endless object was fetched")
	}
	if tg.read > s.Size+1 {
		t.Fatalf("fetched %d bytes of a copy whose manifest says %d", tg.read, s.Size)
	}
	tg.read = 0
	dst := filepath.Join(dir, "recovery")
	if err := Download(ctx, tg, "keyfile/recovery-x.age", dst, MaxRecoveryCopy); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("endless recovery copy: %v", err)
	}
	if tg.read > MaxRecoveryCopy+1 {
		t.Fatalf("downloaded %d bytes of a recovery copy", tg.read)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
