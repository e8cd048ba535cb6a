package offsite

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"filippo.io/age"

	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// The layout of a target:
//
//	snapshots/vault-<time>.snap.age      the snapshot, encrypted
//	snapshots/vault-<time>.manifest.age  its authenticated manifest, encrypted; written
//	                                     after the snapshot: a copy exists once this does
//	head.age                             the newest copy, authenticated, encrypted
//	keyfile/recovery-<sha256>.age        the keyfile's recovery copy, by content
const (
	snapDir      = "snapshots/"
	snapExt      = ".snap.age"
	manifestExt  = ".manifest.age"
	headName     = "head.age"
	keyfileDir   = "keyfile/"
	formatV1     = 1
	macContext   = "pve-vault-agent offsite v1\n"
	maxEnvelope  = 1 << 20
	verifyBuffer = 1 << 20
)

// Errors a reader tells apart; each is wrapped with the copy's name.
var (
	// ErrEdited: the manifest's MAC does not verify, or the object's content is not what
	// its manifest says.
	ErrEdited = errors.New("edited: it does not match what the agent wrote")
	// ErrSwapped: an authentic manifest or object, but of another copy.
	ErrSwapped = errors.New("swapped: it is another copy's")
	// ErrRolledBack: the head names a newer copy than the newest one present.
	ErrRolledBack = errors.New("rolled back: newer copies are missing")
	// ErrNoHead: the head is missing or unreadable.
	ErrNoHead = errors.New("no authentic head")
)

// Keys are what writing a copy needs: the age recipients (the operator's offline keys)
// and the manifest key (HMAC-SHA256) from the keyfile.
type Keys struct {
	Recipients []age.Recipient
	MAC        []byte
}

// Copy is a snapshot copy on a target.
type Copy struct {
	Name     string    `json:"name"` // vault-<time>
	Time     time.Time `json:"time"`
	Size     int64     `json:"size"`     // the encrypted snapshot's size
	Complete bool      `json:"complete"` // its manifest is there too
}

// Signed is a copy's manifest as authenticated on the target.
type Signed struct {
	Format   int               `json:"format"`
	Copy     string            `json:"copy"`             // vault-<time>: the object names it must sit under
	Size     int64             `json:"size"`             // of the encrypted snapshot object
	SHA256   string            `json:"sha256,omitempty"` // of the encrypted object, when the target reads back
	Manifest snapshot.Manifest `json:"manifest"`
	Uploaded time.Time         `json:"uploaded"`
}

// Head names the newest copy at the time it was written.
type Head struct {
	Format int       `json:"format"`
	Copy   string    `json:"copy"`
	Time   time.Time `json:"time"` // the copy's snapshot time
}

type envelope struct {
	Kind    string `json:"kind"`
	Payload []byte `json:"payload"`
	MAC     []byte `json:"mac"`
}

func mac(key []byte, kind string, payload []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(macContext + kind + "\n"))
	h.Write(payload)
	return h.Sum(nil)
}

// CopyName is the copy name of a local snapshot file (vault-<time>.snap → vault-<time>).
func CopyName(snapshotPath string) string {
	return strings.TrimSuffix(filepath.Base(snapshotPath), ".snap")
}

func copyTime(name string) (time.Time, bool) {
	t, err := time.Parse("20060102T150405.000Z", strings.TrimPrefix(name, "vault-"))
	return t, err == nil && strings.HasPrefix(name, "vault-")
}

// Copies lists the copies on t, oldest first; Complete ones have their manifest.
func Copies(ctx context.Context, t Target) ([]Copy, error) {
	objs, err := t.List(ctx, snapDir)
	if err != nil {
		return nil, err
	}
	by := map[string]*Copy{}
	for _, o := range objs {
		base := strings.TrimPrefix(o.Name, snapDir)
		var name string
		switch {
		case strings.HasSuffix(base, snapExt):
			name = strings.TrimSuffix(base, snapExt)
		case strings.HasSuffix(base, manifestExt):
			name = strings.TrimSuffix(base, manifestExt)
		default:
			continue
		}
		ts, ok := copyTime(name)
		if !ok {
			continue
		}
		c := by[name]
		if c == nil {
			c = &Copy{Name: name, Time: ts}
			by[name] = c
		}
		if strings.HasSuffix(base, snapExt) {
			c.Size = o.Size
		} else {
			c.Complete = true
		}
	}
	var out []Copy
	for _, c := range by {
		if c.Size == 0 {
			c.Complete = false // a manifest without its snapshot is no copy
		}
		out = append(out, *c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Time.Before(out[j].Time) })
	return out, nil
}

// Push copies a verified local snapshot to t: the snapshot encrypted and streamed (flat
// memory), read back and checked against the size and SHA-256 computed while sending,
// then its authenticated manifest, then (when head: it is the newest copy) the head. It
// returns the bytes stored.
func Push(ctx context.Context, t Target, e snapshot.Entry, k Keys, now time.Time, head bool) (int64, error) {
	if e.Manifest == nil || !e.Verified {
		return 0, fmt.Errorf("offsite: %s is not a verified snapshot", e.Path)
	}
	name := CopyName(e.Path)
	f, err := os.Open(e.Path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	size, sum, err := putEncrypted(ctx, t, snapDir+name+snapExt, f, k.Recipients)
	if err != nil {
		return 0, err
	}
	payload, err := json.Marshal(Signed{Format: formatV1, Copy: name, Size: size, SHA256: sum, Manifest: *e.Manifest, Uploaded: now.UTC()})
	if err != nil {
		return 0, err
	}
	if err := putEnvelope(ctx, t, snapDir+name+manifestExt, "manifest", payload, k); err != nil {
		return 0, err
	}
	if !head {
		return size, nil
	}
	hb, err := json.Marshal(Head{Format: formatV1, Copy: name, Time: e.Time.UTC()})
	if err != nil {
		return 0, err
	}
	return size, putEnvelope(ctx, t, headName, "head", hb, k)
}

// putEncrypted encrypts r to the recipients while uploading it, then reads the object
// back and compares size and SHA-256.
func putEncrypted(ctx context.Context, t Target, name string, r io.Reader, rs []age.Recipient) (int64, string, error) {
	pr, pw := io.Pipe()
	var h hash.Hash
	var out io.Writer = pw
	if t.ReadsBack() {
		h = sha256.New()
		out = io.MultiWriter(pw, h)
	}
	var n int64
	go func() {
		cw := &countWriter{w: out, n: &n}
		w, err := age.Encrypt(cw, rs...)
		if err == nil {
			_, err = io.Copy(w, r)
			if cerr := w.Close(); err == nil {
				err = cerr
			}
		}
		pw.CloseWithError(err)
	}()
	err := t.Put(ctx, name, pr, -1)
	pr.CloseWithError(errors.New("upload ended")) // the encrypting goroutine stops
	if err != nil {
		return 0, "", err
	}
	sum := ""
	if h != nil {
		sum = hex.EncodeToString(h.Sum(nil))
	}
	if err := t.Check(ctx, name, n, sum); err != nil {
		return 0, "", err
	}
	return n, sum, nil
}

// checkObject reads an object back and compares its size and SHA-256 (the Check of the
// directory and SFTP targets).
func checkObject(ctx context.Context, t Target, name string, size int64, sum string) error {
	rc, err := t.Open(ctx, name)
	if err != nil {
		return fmt.Errorf("read back %s: %w", name, err)
	}
	defer rc.Close()
	h := sha256.New()
	got, err := io.CopyBuffer(h, ctxReader{ctx, rc}, make([]byte, verifyBuffer))
	if err != nil {
		return fmt.Errorf("read back %s: %w", name, err)
	}
	if got != size || hex.EncodeToString(h.Sum(nil)) != sum {
		return fmt.Errorf("%s on %s: %d bytes, sha256 %s after upload; sent %d bytes, sha256 %s", name, t, got, hex.EncodeToString(h.Sum(nil)), size, sum)
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n *int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	*c.n += int64(n)
	return n, err
}

// putEnvelope encrypts a small envelope in memory and stores it with its size known.
func putEnvelope(ctx context.Context, t Target, name, kind string, payload []byte, k Keys) error {
	env, err := json.Marshal(envelope{Kind: kind, Payload: payload, MAC: mac(k.MAC, kind, payload)})
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	w, err := age.Encrypt(&buf, k.Recipients...)
	if err != nil {
		return err
	}
	if _, err := w.Write(env); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	sum := sha256.Sum256(buf.Bytes())
	if err := t.Put(ctx, name, bytes.NewReader(buf.Bytes()), int64(buf.Len())); err != nil {
		return err
	}
	return t.Check(ctx, name, int64(buf.Len()), hex.EncodeToString(sum[:]))
}

// readEnvelope downloads, decrypts and authenticates an envelope of kind.
func readEnvelope(ctx context.Context, t Target, name, kind string, ids []age.Identity, key []byte) ([]byte, error) {
	rc, err := t.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	r, err := age.Decrypt(io.LimitReader(rc, maxEnvelope), ids...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (%v)", name, ErrEdited, err)
	}
	b, err := io.ReadAll(io.LimitReader(r, maxEnvelope))
	if err != nil {
		return nil, fmt.Errorf("%s: %w (%v)", name, ErrEdited, err)
	}
	var env envelope
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, fmt.Errorf("%s: %w (not an envelope: %v)", name, ErrEdited, err)
	}
	if !hmac.Equal(env.MAC, mac(key, env.Kind, env.Payload)) {
		return nil, fmt.Errorf("%s: %w (its MAC does not verify under the keyfile's manifest key)", name, ErrEdited)
	}
	if env.Kind != kind {
		return nil, fmt.Errorf("%s: %w (an authentic %s where a %s belongs)", name, ErrSwapped, env.Kind, kind)
	}
	return env.Payload, nil
}

// ReadHead reads and authenticates the head.
func ReadHead(ctx context.Context, t Target, ids []age.Identity, key []byte) (Head, error) {
	var h Head
	b, err := readEnvelope(ctx, t, headName, "head", ids, key)
	if err != nil {
		return h, fmt.Errorf("%w: %v", ErrNoHead, err)
	}
	if err := json.Unmarshal(b, &h); err != nil {
		return h, fmt.Errorf("%w: %v", ErrNoHead, err)
	}
	return h, nil
}

// ReadManifest reads and authenticates a copy's manifest; a manifest of another copy
// (moved under this name) is ErrSwapped.
func ReadManifest(ctx context.Context, t Target, name string, ids []age.Identity, key []byte) (Signed, error) {
	var s Signed
	b, err := readEnvelope(ctx, t, snapDir+name+manifestExt, "manifest", ids, key)
	if err != nil {
		return s, fmt.Errorf("copy %s: %w", name, err)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("copy %s: %w (%v)", name, ErrEdited, err)
	}
	if s.Copy != name {
		return s, fmt.Errorf("copy %s: %w (its authentic manifest is copy %s's)", name, ErrSwapped, s.Copy)
	}
	return s, nil
}

// Fetch downloads a copy whose manifest authenticated, checks the encrypted object
// against it (size and SHA-256: another copy's object under this name is ErrSwapped or
// ErrEdited), decrypts it into dir as vault-<time>.snap with its local manifest beside
// it, and verifies it offline. A file that fails is removed. Every read is bounded by
// the authentic manifest: at most one byte more than its size is downloaded, and at most
// one byte more than the snapshot's size decrypted, so a hostile or broken target
// cannot fill the disk.
func Fetch(ctx context.Context, t Target, s Signed, ids []age.Identity, dir string) (string, error) {
	rc, err := t.Open(ctx, snapDir+s.Copy+snapExt)
	if err != nil {
		return "", err
	}
	defer rc.Close()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	dst := filepath.Join(dir, s.Copy+".snap")
	tmp := filepath.Join(dir, ".fetch-"+s.Copy)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp)
	h := sha256.New()
	var n int64
	src := io.TeeReader(io.LimitReader(ctxReader{ctx, rc}, s.Size+1), &countWriter{w: h, n: &n})
	dec, err := age.Decrypt(src, ids...)
	if err == nil {
		var plain int64
		plain, err = io.Copy(f, io.LimitReader(dec, s.Manifest.Size+1))
		if err == nil && plain > s.Manifest.Size {
			err = fmt.Errorf("copy %s: %w (it decrypts to more than the %d bytes its manifest says)", s.Copy, ErrEdited, s.Manifest.Size)
		}
	}
	if err == nil {
		_, err = io.Copy(io.Discard, src) // hash what age did not need to read
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	sum := hex.EncodeToString(h.Sum(nil))
	switch {
	case n != s.Size || (s.SHA256 != "" && sum != s.SHA256):
		return "", fmt.Errorf("copy %s: %w (the object holds %d bytes, sha256 %s; its manifest says %d bytes, sha256 %s)", s.Copy, ErrEdited, n, sum[:16], s.Size, s.SHA256[:min(16, len(s.SHA256))])
	case errors.Is(err, ErrEdited):
		return "", err
	case err != nil && s.SHA256 == "":
		return "", fmt.Errorf("copy %s: %w (it does not decrypt: %v)", s.Copy, ErrEdited, err)
	case err != nil:
		return "", fmt.Errorf("copy %s: decrypt: %w", s.Copy, err)
	}
	m := s.Manifest
	if m.File != s.Copy+".snap" {
		return "", fmt.Errorf("copy %s: %w (its manifest describes %s)", s.Copy, ErrSwapped, m.File)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", err
	}
	mj, err := json.MarshalIndent(m, "", "  ")
	if err == nil {
		err = os.WriteFile(dst+".json", append(mj, '\n'), 0o600)
	}
	if err != nil {
		os.Remove(dst)
		os.Remove(dst + ".json")
		return "", fmt.Errorf("copy %s: %w", s.Copy, err)
	}
	if _, err := snapshot.CheckFile(dst); err != nil {
		// The plaintext is not the one the authentic manifest describes: another copy's
		// object re-encrypted under this name, or an edit.
		os.Remove(dst)
		os.Remove(dst + ".json")
		return "", fmt.Errorf("copy %s: %w (%v)", s.Copy, ErrEdited, err)
	}
	return dst, nil
}

// PushFile uploads a file that is already encrypted (the keyfile's recovery copy) under
// keyfile/recovery-<sha256>.age unless that exact content is there, and reads it back.
func PushFile(ctx context.Context, t Target, file string) (string, bool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", false, err
	}
	sum := sha256.Sum256(b)
	name := keyfileDir + "recovery-" + hex.EncodeToString(sum[:12]) + ".age"
	objs, err := t.List(ctx, keyfileDir)
	if err != nil {
		return "", false, err
	}
	for _, o := range objs {
		if o.Name == name && o.Size == int64(len(b)) {
			return name, false, nil
		}
	}
	if err := t.Put(ctx, name, bytes.NewReader(b), int64(len(b))); err != nil {
		return "", false, err
	}
	return name, true, t.Check(ctx, name, int64(len(b)), hex.EncodeToString(sum[:]))
}

// RecoveryCopies lists the keyfile recovery copies, newest first.
func RecoveryCopies(ctx context.Context, t Target) ([]Object, error) {
	objs, err := t.List(ctx, keyfileDir)
	if err != nil {
		return nil, err
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Modified.After(objs[j].Modified) })
	return objs, nil
}

// ErrTooLarge is an object larger than anything the agent stores under its name.
var ErrTooLarge = errors.New("object larger than the agent ever writes there")

// MaxRecoveryCopy bounds a keyfile recovery copy (a few KiB in practice).
const MaxRecoveryCopy = 1 << 20

// Download copies an object of at most limit bytes into a local file (0600); a larger
// one is ErrTooLarge after limit+1 bytes, and the file is removed.
func Download(ctx context.Context, t Target, name, dst string, limit int64) error {
	rc, err := t.Open(ctx, name)
	if err != nil {
		return err
	}
	defer rc.Close()
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	n, err := io.Copy(f, io.LimitReader(ctxReader{ctx, rc}, limit+1))
	if err == nil && n > limit {
		err = fmt.Errorf("%s on %s: %w (more than %d bytes)", name, t, ErrTooLarge, limit)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

// Prune applies retention to the complete copies on t (the same planner as local
// snapshots) and never removes the newest; a copy goes manifest first, so a
// half-removed one is no copy. Orphans (a snapshot object whose manifest never came,
// from an interrupted push) older than an hour go too. It returns what it removed.
func Prune(ctx context.Context, t Target, p snapshot.Policy, now time.Time) ([]string, error) {
	cs, err := Copies(ctx, t)
	if err != nil {
		return nil, err
	}
	var entries []snapshot.Entry
	var removed []string
	for _, c := range cs {
		if c.Complete {
			entries = append(entries, snapshot.Entry{Path: c.Name, Time: c.Time, Size: c.Size, Verified: true})
			continue
		}
		if now.Sub(c.Time) > time.Hour {
			if err := t.Remove(ctx, snapDir+c.Name+snapExt); err != nil {
				return removed, err
			}
			if err := t.Remove(ctx, snapDir+c.Name+manifestExt); err != nil {
				return removed, err
			}
			removed = append(removed, c.Name+" (incomplete)")
		}
	}
	if len(entries) == 0 {
		return removed, nil
	}
	newest := entries[len(entries)-1].Path
	for _, d := range snapshot.Plan(now, entries, p) {
		if d.Keep || d.Entry.Path == newest {
			continue
		}
		if err := t.Remove(ctx, snapDir+d.Entry.Path+manifestExt); err != nil {
			return removed, err
		}
		if err := t.Remove(ctx, snapDir+d.Entry.Path+snapExt); err != nil {
			return removed, err
		}
		removed = append(removed, d.Entry.Path)
	}
	return removed, nil
}

// HasCopy reports whether t holds a complete copy of the local snapshot file.
func HasCopy(cs []Copy, snapshotPath string) bool {
	name := CopyName(snapshotPath)
	for _, c := range cs {
		if c.Name == name && c.Complete {
			return true
		}
	}
	return false
}

// Choice is the copy a recover uses, and what was wrong with the newer ones.
type Choice struct {
	Signed   Signed   `json:"manifest"`
	Head     *Head    `json:"head,omitempty"`
	Problems []string `json:"problems"`
}

// Choose picks the newest complete copy whose manifest authenticates under key. It
// refuses — unless force — when a newer copy is edited or swapped, when the head is
// missing or not authentic, or when the head names a newer copy than the chosen one (a
// roll-back: newer copies were deleted); the error names each problem. With force it
// returns the newest authentic copy and the problems in the Choice.
func Choose(ctx context.Context, t Target, ids []age.Identity, key []byte, force bool) (Choice, error) {
	var ch Choice
	ch.Problems = []string{}
	cs, err := Copies(ctx, t)
	if err != nil {
		return ch, err
	}
	var errs []error
	found := false
	for i := len(cs) - 1; i >= 0 && !found; i-- {
		c := cs[i]
		if !c.Complete {
			continue
		}
		s, err := ReadManifest(ctx, t, c.Name, ids, key)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ch.Signed, found = s, true
	}
	if !found {
		errs = append(errs, fmt.Errorf("no copy on %s authenticates under the keyfile's manifest key", t))
		return ch, errors.Join(errs...)
	}
	h, herr := ReadHead(ctx, t, ids, key)
	switch {
	case herr != nil:
		errs = append(errs, herr)
	case h.Time.After(ch.Signed.Manifest.Created) && h.Copy != ch.Signed.Copy:
		ch.Head = &h
		errs = append(errs, fmt.Errorf("%w: the head names copy %s (%s), the newest authentic copy present is %s",
			ErrRolledBack, h.Copy, h.Time.Format(time.RFC3339), ch.Signed.Copy))
	default:
		ch.Head = &h
	}
	for _, e := range errs {
		ch.Problems = append(ch.Problems, e.Error())
	}
	if len(errs) > 0 && !force {
		return ch, errors.Join(errs...)
	}
	return ch, nil
}
