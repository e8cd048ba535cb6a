package main

import (
	"context"
	crand "crypto/rand"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/minio/minio-go/v7"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot/offsite"
)

// offsiteLab is a static lab Vault initialised by the binary, with three targets on
// real servers: a directory, a chrooted OpenSSH internal-sftp account and SeaweedFS S3,
// the last two reached through SlowLinks a test can slow down or make hang.
type offsiteLab struct {
	*backupLab
	dir      string
	identity string // the operator's offline age identity file
	s3       *lab.S3
	link     *lab.SlowLink // to S3
	sftpLink *lab.SlowLink // to the SFTP server
	usb      string
}

func newOffsiteLab(t *testing.T) *offsiteLab {
	t.Helper()
	bins := lab.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	ol := &offsiteLab{dir: dir, identity: filepath.Join(dir, "operator.agekey"), usb: filepath.Join(dir, "usb")}
	os.WriteFile(ol.identity, []byte(id.String()+"\n"), 0o600)

	u, err := lab.NewUser("pvasftpc", false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	chroot := lab.TestDataDir(t)
	os.Chmod(chroot, 0o755)
	share := filepath.Join(chroot, "vault")
	os.Mkdir(share, 0o700)
	pw, _ := user.Lookup(u.Name)
	uid, _ := strconv.Atoi(pw.Uid)
	gid, _ := strconv.Atoi(pw.Gid)
	os.Chown(share, uid, gid)
	sftp, err := lab.StartSFTP(ctx, bins, filepath.Join(dir, "sftpd"), u, chroot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sftp.Close)
	ol.sftpLink = lab.StartSlowLink(t, sftp.Addr())
	kh := filepath.Join(dir, "known_hosts")
	// The server is known under the link's address, where the agent reaches it.
	os.WriteFile(kh, []byte(knownhosts.Line([]string{knownhosts.Normalize(ol.sftpLink.Addr)}, sftp.HostKey)+"\n"), 0o600)

	if ol.s3, err = lab.StartS3(ctx, bins, filepath.Join(dir, "s3"), "vault-copies"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ol.s3.Close)
	ol.link = lab.StartSlowLink(t, ol.s3.Endpoint)
	// The S3 keys are systemd credentials, as the example configuration has them: every
	// verb the tests run by hand decrypts them from credentials_dir itself.
	creds := filepath.Join(dir, "credentials")
	os.Mkdir(creds, 0o700)
	for name, secret := range map[string]string{"s3-access-key": ol.s3.AccessKey, "s3-secret-key": ol.s3.SecretKey} {
		cmd := exec.Command("systemd-creds", "encrypt", "--name="+name, "--with-key=host", "-", filepath.Join(creds, name+".cred"))
		cmd.Stdin = strings.NewReader(secret + "\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("systemd-creds encrypt %s: %v %s", name, err, out)
		}
	}

	v := lab.TestVault(t)
	targets := fmt.Sprintf(`  schedule: ""
  retention: {keep_last: 10, daily: 0, weekly: 0, monthly: 0}
  targets:
    - {name: usb, type: dir, path: %s}
    - {name: nas, type: sftp, address: %s, user: %s, path: /vault, identity: {file: %s}, known_hosts: %s}
    - {name: s3, type: s3, endpoint: %s, bucket: %s, prefix: pve1, access_key: {credential: s3-access-key}, secret_key: {credential: s3-secret-key}, allow_http: true}
`, ol.usb, ol.sftpLink.Addr, u.Name, sftp.ClientKeyPath, kh, ol.link.Addr, ol.s3.Bucket)
	cfg, keyfile, err := lab.StaticAgentConfig(dir, v.Addr, targets)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(cfg)
	b = []byte(strings.Replace(string(b), "vault:\n", "vault:\n  recovery_recipient: "+id.Recipient().String()+"\n", 1) + "credentials_dir: " + creds + "\n")
	os.WriteFile(cfg, b, 0o600)
	r := runBinary(t, nil, "init", "--config", cfg)
	if r.code != 0 || !strings.Contains(r.stdout, "manifest key sha256:") {
		t.Fatalf("init: %d %s %s", r.code, r.stdout, r.stderr)
	}
	kf, err := vault.ReadKeyfile(context.Background(), keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		t.Fatal(err)
	}
	n, err := vault.NewNode("v", v.Addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	ol.backupLab = &backupLab{v: v, cfg: cfg, keyfile: keyfile, node: n, kf: kf}
	return ol
}

type offsiteReport struct {
	Offsite []struct {
		Target string
		Pushed []string
		Error  string
	}
}

func (ol *offsiteLab) backup(t *testing.T) offsiteReport {
	t.Helper()
	r := runBinary(t, nil, "backup-now", "-o", "json", "--config", ol.cfg)
	if r.code != 0 {
		t.Fatalf("backup-now: %d %s", r.code, r.stderr)
	}
	var rep offsiteReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

func (ol *offsiteLab) copies(t *testing.T, target string) []struct {
	Name     string
	Complete bool
} {
	t.Helper()
	r := runBinary(t, nil, "snapshots", "list", "--target", target, "-o", "json", "--config", ol.cfg)
	if r.code != 0 {
		t.Fatalf("list --target %s: %d %s", target, r.code, r.stderr)
	}
	var cs []struct {
		Name     string
		Complete bool
	}
	json.Unmarshal([]byte(r.stdout), &cs)
	return cs
}

// Each backup lands locally and on every target, encrypted and verifiable with the
// offline identity; a target that is down does not fail the backup and catches up on
// the next run; status shows it; a host without state can fetch from any target and a
// swapped copy is refused.
func TestOffsiteCopies(t *testing.T) {
	ol := newOffsiteLab(t)
	rep := ol.backup(t)
	if len(rep.Offsite) != 3 {
		t.Fatalf("offsite report %+v", rep)
	}
	for _, o := range rep.Offsite {
		if o.Error != "" || len(o.Pushed) != 1 {
			t.Fatalf("target %s: %+v", o.Target, o)
		}
	}
	for _, target := range []string{"usb", "nas", "s3"} {
		r := runBinary(t, nil, "snapshots", "verify", "--target", target, "--identity", ol.identity, "--config", ol.cfg)
		if r.code != 0 || !strings.HasPrefix(r.stdout, "ok   "+target+":vault-") {
			t.Fatalf("verify --target %s: %d %s %s", target, r.code, r.stdout, r.stderr)
		}
	}

	// S3 down: the local backup lands, the push fails and is reported, then catches up.
	ol.s3.Stop()
	rep = ol.backup(t)
	var s3err string
	for _, o := range rep.Offsite {
		if o.Target == "s3" {
			s3err = o.Error
		} else if o.Error != "" || len(o.Pushed) != 1 {
			t.Fatalf("target %s while s3 was down: %+v", o.Target, o)
		}
	}
	if s3err == "" || len(ol.list(t)) != 2 {
		t.Fatalf("s3 down: error %q, %d local snapshots", s3err, len(ol.list(t)))
	}
	r := runBinary(t, nil, "status", "--config", ol.cfg)
	if !strings.Contains(r.stdout, "off-host target s3 failing since") {
		t.Fatalf("status while s3 is down:\n%s", r.stdout)
	}
	if err := ol.s3.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	rep = ol.backup(t)
	for _, o := range rep.Offsite {
		want := 1
		if o.Target == "s3" {
			want = 2 // the one it missed and the new one
		}
		if o.Error != "" || len(o.Pushed) != want {
			t.Fatalf("catch-up on %s: %+v", o.Target, o)
		}
	}
	if cs := ol.copies(t, "s3"); len(cs) != 3 {
		t.Fatalf("s3 copies after catching up: %+v", cs)
	}
	r = runBinary(t, nil, "status", "-o", "json", "--config", ol.cfg)
	if strings.Contains(r.stdout, "failing since") || strings.Contains(r.stdout, `"behind": true`) {
		t.Fatalf("status after catching up:\n%s", r.stdout)
	}

	// A new host: same configuration, empty state directory. A dry run fetches nothing
	// but authenticates; a swapped copy is refused, and --force names the problem.
	host2 := strings.Replace(mustRead(t, ol.cfg), filepath.Join(ol.dir, "state"), filepath.Join(ol.dir, "state2"), 1)
	cfg2 := filepath.Join(ol.dir, "config2.yaml")
	os.WriteFile(cfg2, []byte(host2), 0o600)
	r = runBinary(t, nil, "recover", "--from", "usb", "--identity", ol.identity, "--dry-run", "--config", cfg2)
	if r.code != 0 || !strings.Contains(r.stdout, "manifest key sha256:") || !strings.Contains(r.stdout, "cluster "+ol.kf.ClusterID) {
		t.Fatalf("recover --from --dry-run: %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	cs := ol.copies(t, "usb")
	newest, older := cs[len(cs)-1].Name, cs[len(cs)-2].Name
	old, _ := os.ReadFile(filepath.Join(ol.usb, "snapshots", older+".manifest.age"))
	os.WriteFile(filepath.Join(ol.usb, "snapshots", newest+".manifest.age"), old, 0o600)
	r = runBinary(t, nil, "recover", "--from", "usb", "--identity", ol.identity, "--dry-run", "--config", cfg2)
	if r.code != 1 || !strings.Contains(r.stderr, "swapped") || !strings.Contains(r.stderr, newest) {
		t.Fatalf("swapped copy: %d\n%s", r.code, r.stderr)
	}
	r = runBinary(t, nil, "recover", "--from", "usb", "--identity", ol.identity, "--dry-run", "--force", "--config", cfg2)
	if r.code != 0 || !strings.Contains(r.stdout, "problem: ") || !strings.Contains(r.stdout, "copy "+older) {
		t.Fatalf("forced: %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(ol.dir, "state2", "unseal.cred")); err == nil {
		t.Fatal("a dry run wrote a keyfile")
	}
	all := r.stdout + r.stderr
	if vault.ContainsAny(all, ol.kf.Keyset, ol.kf.Tokens()...) || strings.Contains(all, "AGE-SECRET-KEY") {
		t.Fatal("output carries a secret")
	}
}

// uploadsBegun is closed when an incomplete multipart upload not in seen appears.
func uploadsBegun(c *minio.Client, ol *offsiteLab, seen map[string]bool) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch) // begun, or a minute passed: the kill goes in either way
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// A 5 ms tick, finer than lab.WaitFor's: an upload can be short.
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			for u := range c.ListIncompleteUploads(ctx, ol.s3.Bucket, "pve1", true) {
				if u.Err == nil && !seen[u.UploadID] {
					return
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return ch
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// An upload killed with SIGKILL at random points, twenty times: no partial object is
// ever listed, every complete copy verifies, and the next run completes. Every other
// kill lands at a random point once an S3 multipart upload has begun (the push to S3
// comes after the local backup and the other targets, whose time varies with the
// machine's load); the rest anywhere in the first two seconds.
func TestOffsiteUploadKilled(t *testing.T) {
	ol := newOffsiteLab(t)
	ol.load(t, 4)
	ol.backup(t)
	ol.link.SetRate(4 << 20) // 4 MiB/s: a push takes about a second
	rng := mrand.New(mrand.NewPCG(1, 2))
	c, err := ol.s3.Client()
	if err != nil {
		t.Fatal(err)
	}
	killed, midUpload := 0, 0
	seen := map[string]bool{}
	for i := 0; i < 20; i++ {
		cmd := exec.Command(binary, "backup-now", "--config", ol.cfg)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		after := time.Duration(rng.IntN(1800)) * time.Millisecond
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		if i%2 == 1 {
			// Wait for an upload of this run to begin, then kill within its first 300 ms.
			begun := uploadsBegun(c, ol, seen)
			after = time.Duration(rng.IntN(300)) * time.Millisecond
			select {
			case <-done:
				done <- nil
			case <-begun:
			case <-time.After(time.Minute):
				t.Fatal("no S3 upload began within a minute")
			}
		}
		select {
		case <-done:
		case <-time.After(after):
			cmd.Process.Kill()
			<-done
			killed++
		}
		for u := range c.ListIncompleteUploads(context.Background(), ol.s3.Bucket, "pve1", true) {
			if u.Err == nil && !seen[u.UploadID] {
				seen[u.UploadID] = true
				midUpload++ // a multipart upload this kill cut: on the server, never an object
			}
		}
		for _, c := range ol.copies(t, "s3") {
			if !c.Complete {
				t.Logf("run %d (killed after %s): %s has no manifest yet: listed as incomplete, never chosen", i, after, c.Name)
			}
		}
	}
	ol.link.SetRate(0)
	t.Logf("%d of 20 runs killed, %d of them in the middle of an S3 multipart upload", killed, midUpload)
	if midUpload == 0 {
		t.Fatal("no kill landed in an upload: the test proves nothing")
	}
	ol.backup(t)
	r := runBinary(t, nil, "snapshots", "verify", "--target", "s3", "--identity", ol.identity, "-o", "json", "--config", ol.cfg)
	var res []struct {
		Path  string
		Error string
	}
	json.Unmarshal([]byte(r.stdout), &res)
	complete := 0
	for _, x := range res {
		switch {
		case x.Error == "":
			complete++
		case strings.HasPrefix(x.Error, "incomplete"):
		default:
			t.Errorf("copy %s: %s", x.Path, x.Error)
		}
	}
	if complete < 2 {
		t.Fatalf("%d complete copies after the kills: %s %s", complete, r.stdout, r.stderr)
	}
	n := 0
	for u := range c.ListIncompleteUploads(context.Background(), ol.s3.Bucket, "pve1", true) {
		if u.Err == nil {
			n++
		}
	}
	if n != 0 {
		t.Fatalf("%d incomplete multipart uploads left after the last run cleaned", n)
	}
	var objs []string
	for o := range c.ListObjects(context.Background(), ol.s3.Bucket, minio.ListObjectsOptions{Prefix: "pve1/", Recursive: true}) {
		objs = append(objs, o.Key)
	}
	t.Logf("objects after 20 kills and a clean run: %d (%d complete copies)", len(objs), complete)
}

// setIdleTimeout rewrites the configuration's snapshots.idle_timeout.
func (ol *offsiteLab) setIdleTimeout(t *testing.T, d time.Duration) {
	t.Helper()
	b := mustRead(t, ol.cfg)
	os.WriteFile(ol.cfg, []byte(strings.Replace(b, "snapshots:\n", fmt.Sprintf("snapshots:\n  idle_timeout: %s\n", d), 1)), 0o600)
}

// Off-host targets that stop reading after the handshake (an SFTP server and an S3
// endpoint behind links that go deaf) never hold the backups: backup-now returns within
// the idle deadlines with the local snapshot stored and reports both targets failing;
// the daemon's next slots run, its main loop keeps its watchdog pings, and a SIGHUP in
// the middle of a hung push is answered at once.
func TestHungTargetsDoNotStallBackups(t *testing.T) {
	ol := newOffsiteLab(t)
	ol.load(t, 1) // a snapshot larger than what passes before the links go deaf
	const idle = 2 * time.Second
	ol.setIdleTimeout(t, idle)
	ol.link.StopReadingAfter(32 << 10)
	ol.sftpLink.StopReadingAfter(32 << 10)

	t0 := time.Now()
	rep := ol.backup(t)
	took := time.Since(t0)
	// Per hung target: three attempts, each ended by the idle deadline (plus the 1 s and
	// 2 s pauses between them); generous slack for a loaded machine.
	if bound := 2*(3*(idle+5*time.Second)+3*time.Second) + 15*time.Second; took > bound {
		t.Fatalf("backup-now took %s with two hung targets (bound %s)", took, bound)
	}
	t.Logf("backup-now with two hung targets returned in %s", took.Round(100*time.Millisecond))
	for _, o := range rep.Offsite {
		switch o.Target {
		case "usb":
			if o.Error != "" || len(o.Pushed) != 1 {
				t.Fatalf("usb: %+v", o)
			}
		default:
			if !strings.Contains(o.Error, "stopped answering") {
				t.Fatalf("%s: want an idle deadline error, got %+v", o.Target, o)
			}
		}
	}
	if es := ol.list(t); len(es) != 1 || !es[0].Verified {
		t.Fatalf("local snapshots: %+v", es)
	}

	// The daemon: a slot every 2 s, a watchdog of 2 s (a ping every second).
	b := mustRead(t, ol.cfg)
	os.WriteFile(ol.cfg, []byte(strings.Replace(b, `  schedule: ""`, `  schedule: "@every 2s"`, 1)), 0o600)
	d := startDaemon(t, ol.cfg, 2*time.Second)
	d.waitLogged(t, "retrying", 1, time.Minute) // a push hangs now
	hup := time.Now()
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLogged(t, "configuration and keyfile reloaded", 1, 10*time.Second)
	t.Logf("SIGHUP during a hung push answered in %s", time.Since(hup).Round(100*time.Millisecond))
	d.waitLogged(t, "snapshot stored", 2, 3*time.Minute) // later slots ran
	d.stop(t)
	if gap := maxGap(d.notify.Pings(hup.Add(-time.Second), time.Now().Add(-time.Second))); gap > 2*time.Second {
		t.Fatalf("the main loop held its watchdog ping for %s", gap)
	}
	if n := len(ol.list(t)); n < 3 {
		t.Fatalf("%d local snapshots after the daemon's slots", n)
	}
}

func maxGap(ts []time.Time) time.Duration {
	var g time.Duration
	for i := 1; i < len(ts); i++ {
		g = max(g, ts[i].Sub(ts[i-1]))
	}
	return g
}

// Anyone who can write to a target can plant a keyfile encrypted to the public recovery
// recipient, with a manifest key and copies of their own. recover --from pinned to the
// fingerprint init printed refuses such a set before it fetches anything; without the
// pin, it shows the fingerprint it found and will not go on unasked, --yes or not.
func TestRecoverFromPinsTheManifestKey(t *testing.T) {
	ol := newOffsiteLab(t)
	ol.backup(t)
	legit := ol.kf.Meta().ManifestKey
	if r := runBinary(t, nil, "status", "--config", ol.cfg); !strings.Contains(r.stdout, "manifest key "+legit) {
		t.Fatalf("status does not show the manifest key %s:\n%s", legit, r.stdout)
	}
	if r := runBinary(t, nil, "keyfile", "check", "--config", ol.cfg); !strings.Contains(r.stdout, "manifest key "+legit) {
		t.Fatalf("keyfile check does not show the manifest key %s:\n%s", legit, r.stdout)
	}

	// The forger's set: their own keyfile (another cluster's shares, their manifest key)
	// sealed to the operator's public recipient, and a copy authenticated by it.
	planted := filepath.Join(ol.dir, "planted")
	tg := &offsite.Dir{Root: planted}
	mk := make([]byte, 32)
	crand.Read(mk)
	recipient, _ := age.ParseX25519Recipient(strings.TrimSpace(strings.Split(strings.Split(mustRead(t, ol.cfg), "recovery_recipient: ")[1], "\n")[0]))
	forged := &vault.Keyfile{Keyset: ol.kf.Keyset, ManifestKey: mk, ClusterID: "forged", Created: time.Now()}
	fk := filepath.Join(ol.dir, "forger", "forged.age")
	if err := vault.WriteKeyfile(context.Background(), fk, forged, vault.Age{Recipient: recipient}, true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := offsite.PushFile(context.Background(), tg, fk); err != nil {
		t.Fatal(err)
	}
	es := ol.list(t)
	if _, err := offsite.Push(context.Background(), tg, es[len(es)-1], offsite.Keys{Recipients: []age.Recipient{recipient}, MAC: mk}, time.Now(), true); err != nil {
		t.Fatal(err)
	}
	host2 := strings.Replace(mustRead(t, ol.cfg), filepath.Join(ol.dir, "state"), filepath.Join(ol.dir, "state2"), 1)
	host2 = strings.Replace(host2, filepath.Join(ol.dir, "snaps"), filepath.Join(ol.dir, "snaps2"), 1)
	host2 = strings.Replace(host2, "  targets:\n", fmt.Sprintf("  targets:\n    - {name: planted, type: dir, path: %s}\n", planted), 1)
	cfg2 := filepath.Join(ol.dir, "config2.yaml")
	os.WriteFile(cfg2, []byte(host2), 0o600)
	nothingFetched := func(what string) {
		t.Helper()
		for _, p := range []string{filepath.Join(ol.dir, "snaps2"), filepath.Join(ol.dir, "state2", "unseal.cred")} {
			if ents, err := os.ReadDir(p); err == nil && len(ents) > 0 {
				t.Fatalf("%s: %s holds %v", what, p, ents)
			} else if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
				t.Fatalf("%s: %s was written", what, p)
			}
		}
	}

	r := runBinary(t, nil, "recover", "--from", "planted", "--identity", ol.identity, "--manifest-key", legit, "--yes", "--config", cfg2)
	if r.code != 1 || !strings.Contains(r.stderr, "no recovery copy under the pinned manifest key") {
		t.Fatalf("pinned recover from a planted set: %d\n%s", r.code, r.stderr)
	}
	nothingFetched("pinned")
	r = runBinary(t, nil, "recover", "--from", "planted", "--identity", ol.identity, "--yes", "--config", cfg2)
	if r.code != 2 || !strings.Contains(r.stderr, "found manifest key "+vault.ManifestKeyFingerprint(mk)) {
		t.Fatalf("unpinned, unattended recover from a planted set: %d\n%s", r.code, r.stderr)
	}
	nothingFetched("unpinned")
	// The operator's own copies pass the pin (a dry run: this lab has no cluster).
	r = runBinary(t, nil, "recover", "--from", "usb", "--identity", ol.identity, "--manifest-key", legit, "--dry-run", "--config", cfg2)
	if r.code != 0 || !strings.Contains(r.stdout, "manifest key "+legit) {
		t.Fatalf("pinned recover from the operator's copies: %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	r = runBinary(t, nil, "recover", "--from", "usb", "--identity", ol.identity, "--manifest-key", "sha256:nothex", "--dry-run", "--config", cfg2)
	if r.code != 2 {
		t.Fatalf("a malformed --manifest-key: %d %s", r.code, r.stderr)
	}
}

// The operator replaces the offline key (or ran init with another --recovery-recipient
// than the configuration names): status says the recovery copy is sealed to the old
// key, the next backup seals it again to the configured one and pushes it, and a host
// that lost everything recovers with the new identity alone.
func TestRecoveryCopyFollowsTheRecipient(t *testing.T) {
	ol := newOffsiteLab(t)
	ol.backup(t)
	old := strings.TrimSpace(strings.Split(strings.Split(mustRead(t, ol.cfg), "recovery_recipient: ")[1], "\n")[0])
	id, _ := age.GenerateX25519Identity()
	newKey := filepath.Join(ol.dir, "new-offline.agekey")
	os.WriteFile(newKey, []byte(id.String()+"\n"), 0o600)
	os.WriteFile(ol.cfg, []byte(strings.Replace(mustRead(t, ol.cfg), old, id.Recipient().String(), 1)), 0o600)
	r := runBinary(t, nil, "status", "--config", ol.cfg)
	if !strings.Contains(r.stdout, "offline recovery copy is sealed to "+old) {
		t.Fatalf("status after the key changed:\n%s", r.stdout)
	}
	ol.backup(t)
	r = runBinary(t, nil, "status", "-o", "json", "--config", ol.cfg)
	if strings.Contains(r.stdout, "sealed to "+old) || !strings.Contains(r.stdout, `"current": true`) {
		t.Fatalf("status after the backup:\n%s", r.stdout)
	}
	host2 := strings.Replace(mustRead(t, ol.cfg), filepath.Join(ol.dir, "state"), filepath.Join(ol.dir, "state2"), 1)
	cfg2 := filepath.Join(ol.dir, "config2.yaml")
	os.WriteFile(cfg2, []byte(host2), 0o600)
	for _, target := range []string{"usb", "nas", "s3"} {
		r = runBinary(t, nil, "recover", "--from", target, "--identity", newKey, "--manifest-key", ol.kf.Meta().ManifestKey, "--dry-run", "--config", cfg2)
		if r.code != 0 || !strings.Contains(r.stdout, "cluster "+ol.kf.ClusterID) {
			t.Fatalf("recover --from %s with only the new identity: %d\n%s\n%s", target, r.code, r.stdout, r.stderr)
		}
	}
}
