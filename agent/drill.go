package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/safefile"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
	"github.com/pve-vault-agent/pve-vault-agent/vault/snapshot"
)

// ErrDrillFailed means the snapshot did not come back whole in the throwaway Vault.
var ErrDrillFailed = errors.New("restore drill failed")

// DrillOptions choose what a drill restores: a file, or ("") the newest verified
// snapshot.
type DrillOptions struct {
	Snapshot string
}

// DrillCheck is one check of a drill and what it found.
type DrillCheck struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// DrillReport is a drill's result.
type DrillReport struct {
	Snapshot     string       `json:"snapshot"`
	Pod          string       `json:"pod,omitempty"`
	Node         string       `json:"node,omitempty"`
	Image        string       `json:"image,omitempty"`
	Started      time.Time    `json:"started"`
	DurationSecs float64      `json:"duration_seconds"`
	Passed       bool         `json:"passed"`
	Reason       string       `json:"reason,omitempty"`
	Checks       []DrillCheck `json:"checks"`
	Cleaned      []string     `json:"cleaned"`
	Steps        []StepResult `json:"steps"`
}

type drillState struct {
	env       *Env
	opts      DrillOptions
	rep       *DrillReport
	kf        *vault.Keyfile
	manifest  *snapshot.Manifest
	id        string
	podUID    string
	certPEM   []byte
	keyPEM    []byte
	roots     *x509.CertPool
	pod       vaultPod
	throwaway *vault.InitResult
	cluster   string // the throwaway cluster's id
	restored  string // the restored cluster's id
	pair      bool   // an imported snapshot: pair it with the keyset when the drill passes
}

var drillSteps = []step[drillState]{
	{"snapshot", "choose the snapshot, verify it offline, match its keyset with the keyfile", (*drillState).snapshot},
	{"leftovers", "delete what an interrupted drill left in the cluster", (*drillState).leftovers},
	{"pod", "start a throwaway Vault pod (the release's image, no volume, no chart labels, lowest priority, TLS with a one-off certificate)", (*drillState).startPod},
	{"init", "initialise it with the keyfile's shares and threshold (throwaway keys, kept in memory)", (*drillState).init},
	{"restore", "restore the snapshot into it with snapshot-force", (*drillState).restore},
	{"unseal", "unseal the restored data with the keyfile's shares", (*drillState).unseal},
	{"checks", "compare the Raft index with the manifest's and read the canary back", (*drillState).checks},
}

// DrillPlan lists the steps a drill takes.
func DrillPlan() []PlanStep { return planOf(drillSteps) }

// Drill restores a snapshot into a throwaway Vault pod and checks it came back whole:
// unsealed by the keyfile's shares, the Raft index at least the manifest's, the canary
// init wrote reading back equal. Production pods, volumes, release and keyfile are
// never touched; everything the drill creates is deleted on every path. The result is
// recorded in the state directory (status, metrics) and, when the snapshot has a
// manifest, in it. A failed drill returns the report and an error wrapping
// ErrDrillFailed.
func Drill(ctx context.Context, env *Env, opts DrillOptions) (*DrillReport, error) {
	if env.Config.Vault.PodAccess == "static" {
		return nil, hintf("a drill runs a throwaway pod in the cluster", "drill: vault.pod_access is static: the agent has no Kubernetes cluster to run the drill pod in")
	}
	unlock, err := env.drillLock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	// No snapshot yet is no drill (and no failure to record).
	if opts.Snapshot, err = snapshotOrLatest(ctx, env, opts.Snapshot); err != nil {
		return nil, err
	}
	s := &drillState{env: env, opts: opts, rep: newDrillReport(env, "")}
	runErr := s.run(ctx, "drill", drillSteps)
	if err := s.record(); err != nil {
		env.Log.Warn("could not record the drill's result", "err", err)
	}
	if runErr != nil {
		if ctx.Err() != nil {
			return s.rep, runErr
		}
		return s.rep, fmt.Errorf("%w: %w", ErrDrillFailed, runErr)
	}
	return s.rep, nil
}

// proveKeyset opens the snapshot at path in a throwaway drill pod with ks: adopt's
// proof that shares typed or kept elsewhere are this Vault's, before anything is
// written. The drill's steps from "leftovers" on; no canary to read back yet, and
// nothing recorded (adopt records it in the first backup's manifest).
func proveKeyset(ctx context.Context, env *Env, path string, ks vault.Keyset, index uint64) (*DrillReport, error) {
	if env.Config.Vault.PodAccess == "static" {
		return nil, hintf("adopt proves the shares in a throwaway pod in the cluster", "vault.pod_access is static: the agent has no Kubernetes cluster to run the drill pod in")
	}
	unlock, err := env.drillLock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	s := &drillState{env: env, kf: &vault.Keyfile{Keyset: ks}, manifest: &snapshot.Manifest{RaftIndex: index}, rep: newDrillReport(env, path)}
	return s.rep, s.run(ctx, "adopt-drill", drillSteps[1:])
}

func newDrillReport(env *Env, snapshot string) *DrillReport {
	return &DrillReport{Snapshot: snapshot, Started: env.Clock.Now().UTC(), Checks: []DrillCheck{}, Cleaned: []string{}}
}

// run runs steps, deletes what they made in the cluster whatever happened, and fills
// in the report's outcome.
func (s *drillState) run(ctx context.Context, flow string, steps []step[drillState]) error {
	err := runSteps(ctx, s.env, flow, steps, s, &s.rep.Steps)
	if s.podUID != "" {
		s.cleanup(ctx)
	}
	s.rep.DurationSecs = s.env.Clock.Now().Sub(s.rep.Started).Seconds()
	s.rep.Passed = err == nil
	if err != nil {
		s.rep.Reason = err.Error()
	}
	return err
}

// CleanupDrills deletes every drill object of the release: what a killed drill left.
func CleanupDrills(ctx context.Context, env *Env) ([]string, error) {
	unlock, err := env.drillLock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	cl, err := env.Cluster(ctx)
	if err != nil {
		return nil, err
	}
	return cl.CleanupDrills(ctx, env.Config.Chart.Release, env.Waits.Active)
}

// drillLock keeps two drills (the daemon's and a verb's) apart, so a drill's cleanup
// of leftovers never deletes a running drill's pod. It is not the agent's lock: a drill
// changes nothing of production, and the daemon keeps unsealing during one.
func (e *Env) drillLock() (func(), error) {
	dir := filepath.Dir(e.Config.Vault.Keyfile)
	if err := safefile.PrivateDir(dir); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ".drill.lock"), os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("drill lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, hintf("wait for it to finish", "%w: a restore drill is running", ErrBusy)
		}
		return nil, fmt.Errorf("drill lock: %w", err)
	}
	return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

func (s *drillState) check(name string, ok bool, format string, a ...any) error {
	c := DrillCheck{Name: name, OK: ok, Detail: fmt.Sprintf(format, a...)}
	s.rep.Checks = append(s.rep.Checks, c)
	if !ok {
		return permanentCheck{c: c}
	}
	return nil
}

// permanentCheck is a failed check as an error, wrapping what failed it when known.
type permanentCheck struct {
	c     DrillCheck
	cause error
}

func (e permanentCheck) Error() string { return e.c.Name + ": " + e.c.Detail }
func (e permanentCheck) Unwrap() error { return e.cause }

func (s *drillState) snapshot(ctx context.Context) (string, error) {
	path, err := snapshotOrLatest(ctx, s.env, s.opts.Snapshot)
	if err != nil {
		return "", err
	}
	s.rep.Snapshot = path
	info, err := snapshot.CheckFile(path)
	if err := s.check("offline", err == nil, "%s", verdict(err, fmt.Sprintf("archive whole, sums match, raft index %d", info.Index))); err != nil {
		return "", err
	}
	if s.manifest, err = readManifest(path); err != nil {
		return "", err
	}
	m := s.manifest
	if s.kf, err = s.env.Keyfile.Read(ctx); err != nil {
		return "", err
	}
	fp := s.kf.Keyset.Fingerprint()
	if m.Unpaired() {
		s.pair = true
		s.rep.Checks = append(s.rep.Checks, DrillCheck{Name: "keyset", OK: true, Detail: fmt.Sprintf("imported from %s, no keyset yet: paired with keyset %s if its shares open it", m.Imported.From, fp)})
		return path, nil
	}
	if err := s.check("keyset", m.KeysetFingerprint == fp, "snapshot keyset %s, keyfile keyset %s", m.KeysetFingerprint, fp); err != nil {
		return "", withHint(err, "the keyfile's shares cannot unseal it: a snapshot of another Vault, or from before a rekey")
	}
	return path, nil
}

func verdict(err error, ok string) string {
	if err != nil {
		return err.Error()
	}
	return ok
}

func (s *drillState) leftovers(ctx context.Context) (string, error) {
	cl, err := s.env.Cluster(ctx)
	if err != nil {
		return "", err
	}
	gone, err := cl.CleanupDrills(ctx, s.env.Config.Chart.Release, s.env.Waits.Active)
	s.rep.Cleaned = append(s.rep.Cleaned, gone...)
	if err != nil {
		return "", err
	}
	if len(gone) == 0 {
		return "none", nil
	}
	s.env.Log.Warn("deleted what an interrupted drill left", "objects", gone)
	return fmt.Sprintf("deleted %d objects", len(gone)), nil
}

func (s *drillState) startPod(ctx context.Context) (string, error) {
	env := s.env
	cl, err := env.Cluster(ctx)
	if err != nil {
		return "", err
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	s.id = hex.EncodeToString(b[:])
	name := env.Config.Chart.Release + "-drill-" + s.id
	if s.certPEM, s.keyPEM, s.roots, err = drillCertificate(name, env.Clock.Now()); err != nil {
		return "", err
	}
	var nodes []string
	for _, n := range env.Config.Nodes {
		nodes = append(nodes, n.Name)
	}
	podName, uid, image, err := cl.StartDrill(ctx, k8s.DrillSpec{Release: env.Config.Chart.Release, ID: s.id, Nodes: nodes,
		Config: drillConfig(), TLSCert: s.certPEM, TLSKey: s.keyPEM, Deadline: env.Config.Snapshots.DrillDeadline})
	if uid != "" {
		s.podUID = uid
	}
	if err != nil {
		s.podUID = "?" // objects may exist: clean up by label
		return "", err
	}
	s.rep.Pod, s.rep.Image = podName, image
	dp, err := cl.WaitDrill(ctx, env.Config.Chart.Release, podName, uid, env.Waits.Join)
	if err != nil {
		return "", err
	}
	s.rep.Node = dp.Node
	acc, err := env.Pods()
	if err != nil {
		return "", err
	}
	pod := k8s.Pod{Name: dp.Name, Node: dp.Node, IP: dp.IP, UID: dp.UID, ServerName: dp.ServerName, Phase: "Running", Ordinal: -1}
	api, err := acc.clientVia(pod, s.roots, drillPort)
	if err != nil {
		return "", err
	}
	s.pod = vaultPod{Pod: pod, API: api}
	return fmt.Sprintf("%s on %s (%s)", dp.Name, dp.Node, image), nil
}

func (s *drillState) init(ctx context.Context) (string, error) {
	env := s.env
	err := poll(ctx, env.Clock, env.Waits.Poll, env.Waits.Active, s.pod.Name+" to answer", func(ctx context.Context) error {
		_, err := s.pod.API.SealStatus(ctx)
		return err
	})
	if err != nil {
		return "", err
	}
	if s.throwaway, err = s.pod.API.Init(ctx, len(s.kf.Keyset.Keys), s.kf.Keyset.Threshold); err != nil {
		return "", err
	}
	if err := env.unsealPod(ctx, s.pod, s.throwaway.Keyset, env.Waits.Join); err != nil {
		return "", err
	}
	h, err := env.waitActive(ctx, s.pod.API)
	if err != nil {
		return "", err
	}
	s.cluster = h.ClusterID
	return fmt.Sprintf("throwaway cluster %s, %d shares, threshold %d", h.ClusterID, len(s.kf.Keyset.Keys), s.kf.Keyset.Threshold), nil
}

func (s *drillState) restore(ctx context.Context) (string, error) {
	f, err := os.Open(s.rep.Snapshot)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := s.pod.API.RestoreSnapshot(ctx, s.throwaway.RootToken, f, true, s.env.Config.Snapshots.IdleTimeout); err != nil {
		return "", err
	}
	return "accepted", nil
}

// unseal waits for the forced restore to seal the throwaway Vault, then unseals it with
// the keyfile. Vault rejecting the keyfile's shares three times once the restored seal
// shows is a failed drill, not something to wait out.
func (s *drillState) unseal(ctx context.Context) (string, error) {
	env := s.env
	wrong := 0
	var h vault.Health
	err := poll(ctx, env.Clock, env.Waits.Poll, env.Waits.Restore, s.pod.Name+" to open the restored data", func(ctx context.Context) error {
		st, err := s.pod.API.SealStatus(ctx)
		if err != nil {
			return err
		}
		if st.Sealed {
			res, err := s.pod.API.Unseal(ctx, s.kf.Keyset, env.Log)
			if errors.Is(err, vault.ErrWrongKeys) {
				if wrong++; wrong >= 3 {
					return permanent(err)
				}
				return err
			}
			if err != nil {
				return err
			}
			if res.Sealed {
				return errNotYet
			}
		}
		if h, err = s.pod.API.Health(ctx); err != nil {
			return err
		}
		switch {
		case h.Sealed:
			return errNotYet
		case h.ClusterID == s.cluster:
			return errors.New("still the throwaway cluster: the restore is not applied yet")
		case !h.Active:
			return errors.New("unsealed, not active yet")
		}
		return nil
	})
	if cerr := s.check("unseal", err == nil, "%s", verdict(err, "unsealed by the keyfile's shares")); cerr != nil {
		return "", permanentCheck{c: cerr.(permanentCheck).c, cause: err}
	}
	want := s.manifest.ClusterID
	if err := s.check("cluster", want == "" || h.ClusterID == want, "cluster %s, manifest %s", h.ClusterID, want); err != nil {
		return "", err
	}
	s.restored = h.ClusterID
	return "unsealed, cluster " + h.ClusterID, nil
}

func (s *drillState) checks(ctx context.Context) (string, error) {
	idx, err := s.pod.API.RaftIndex(ctx)
	if err != nil {
		return "", err
	}
	if err := s.check("raft index", idx >= s.manifest.RaftIndex, "applied %d, manifest %d", idx, s.manifest.RaftIndex); err != nil {
		return "", err
	}
	if s.kf.Canary == "" {
		s.rep.Checks = append(s.rep.Checks, DrillCheck{Name: "canary", OK: true, Detail: "not checked: no canary in this keyset's keyfile (an older agent's init, or adopt's proof before it writes one)"})
		return "raft index ok; no canary", nil
	}
	if s.manifest.Imported != nil {
		s.rep.Checks = append(s.rep.Checks, DrillCheck{Name: "canary", OK: true, Detail: "not checked: an imported snapshot may predate the agent's canary and tokens"})
		return "raft index ok; imported, no canary", nil
	}
	tok, which, err := validOperatorToken(ctx, s.pod, s.kf)
	if err != nil {
		return "", s.check("canary", false, "no operator token of the keyfile is valid in the restored data (a snapshot older than vault.token_period brings its tokens back expired): %v", errors.Unwrap(err))
	}
	got, err := s.pod.API.Read(ctx, tok, vault.CanaryPath)
	if err != nil {
		return "", s.check("canary", false, "read %s with %s: %v", vault.CanaryPath, which, err)
	}
	if err := s.check("canary", got == s.kf.Canary, "%s reads back %s", vault.CanaryPath, map[bool]string{true: "equal", false: "different from the keyfile's"}[got == s.kf.Canary]); err != nil {
		return "", err
	}
	return "raft index and canary match", nil
}

// cleanup deletes the drill's objects with a context an interruption does not cancel.
func (s *drillState) cleanup(ctx context.Context) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.env.Waits.Active)
	defer cancel()
	cl, err := s.env.Cluster(cctx)
	if err == nil {
		var gone []string
		gone, err = cl.CleanupDrills(cctx, s.env.Config.Chart.Release, s.env.Waits.Active)
		s.rep.Cleaned = append(s.rep.Cleaned, gone...)
	}
	if err != nil {
		s.env.Log.Error("drill cleanup failed: run `pve-vault-agent drill --cleanup`", "err", err)
		s.rep.Checks = append(s.rep.Checks, DrillCheck{Name: "cleanup", OK: false, Detail: err.Error()})
	}
}

// drillPort is the drill pod's API port.
const drillPort = 8200

// drillConfig is the throwaway Vault's configuration: Raft on the pod's emptyDir, one
// node that joins nobody, TLS with the drill's one-off certificate.
func drillConfig() string {
	return fmt.Sprintf(`disable_mlock = true
ui = false
listener "tcp" {
  address         = "[::]:%d"
  cluster_address = "[::]:8201"
  tls_cert_file   = "%s/tls.crt"
  tls_key_file    = "%s/tls.key"
}
storage "raft" {
  path    = "%s"
  node_id = "drill"
  performance_multiplier = 1
}
api_addr     = "https://127.0.0.1:%d"
cluster_addr = "https://127.0.0.1:8201"
`, drillPort, k8s.DrillTLSDir, k8s.DrillTLSDir, k8s.DrillDataDir, drillPort)
}

// drillCertificate makes a self-signed certificate for the drill pod's name, valid for
// two hours, and the pool that trusts exactly it: the unseal shares sent to the drill
// pod cross the network encrypted whatever the production listener does.
func drillCertificate(name string, now time.Time) (certPEM, keyPEM []byte, roots *x509.CertPool, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(2 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, nil, err
	}
	roots = x509.NewCertPool()
	roots.AddCert(cert)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), roots, nil
}

// DrillRecord is the last drill, kept in the state directory for status and metrics.
type DrillRecord struct {
	Last        *DrillReport `json:"last"`
	LastSuccess time.Time    `json:"last_success"`
	Failures    int          `json:"failures"`
}

func (e *Env) drillRecordPath() string {
	return filepath.Join(filepath.Dir(e.Config.Vault.Keyfile), "drill.json")
}

// LastDrill reads the drill record ({} when no drill ran yet).
func LastDrill(env *Env) (DrillRecord, error) {
	var r DrillRecord
	b, err := os.ReadFile(env.drillRecordPath())
	if errors.Is(err, os.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return r, err
	}
	return r, json.Unmarshal(b, &r)
}

// record writes the result into the state directory and the snapshot's manifest.
func (s *drillState) record() error {
	r, err := LastDrill(s.env)
	if err != nil {
		s.env.Log.Warn("the drill record was unreadable; starting it again", "err", err)
		r = DrillRecord{}
	}
	r.Last = s.rep
	if s.rep.Passed {
		r.LastSuccess = s.rep.Started
	} else {
		r.Failures++
	}
	if err := writeJSONAtomic(s.env.drillRecordPath(), r); err != nil {
		return err
	}
	if s.manifest == nil {
		return nil
	}
	if err := snapshot.RecordDrill(s.rep.Snapshot, snapshot.DrillResult{At: s.rep.Started, Passed: s.rep.Passed, Reason: s.rep.Reason,
		DurationSecs: s.rep.DurationSecs}); err != nil {
		return err
	}
	if s.pair && s.rep.Passed {
		if err := snapshot.Pair(s.rep.Snapshot, s.kf.Keyset.Fingerprint(), s.restored); err != nil {
			return fmt.Errorf("pair the imported snapshot with the keyset: %w", err)
		}
		s.env.Log.Info("imported snapshot paired with the keyfile's keyset", "snapshot", s.rep.Snapshot, "keyset", s.kf.Keyset.Fingerprint())
	}
	return nil
}

// writeJSONAtomic writes v to path through a synced temporary file and a rename.
func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	if err := safefile.SyncFile(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return safefile.SyncDir(filepath.Dir(path))
}
