// Package lab runs the real servers that the tests and `make demo` use, all on
// loopback: a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager),
// OpenSSH sshd "node VMs", Vault servers with Raft storage, and a fake Proxmox VE API
// (the one stand-in: it answers with the real API's JSON shapes and status lines).
//
// Every Start function waits for its server to answer (a condition with a deadline,
// never a fixed sleep) and returns a value whose Close stops it and removes nothing the
// caller owns. The binaries are built by scripts/lab-bins.sh into a cache outside the
// repository; Need reports them missing as a skip on a laptop and a failure under CI=true.
package lab

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Versions of the lab binaries, read from versions.env, the one place they are set;
// scripts/lab-bins.sh builds exactly these.
var (
	VaultVersion = version("VAULT_VERSION")
	KubeVersion  = version("KUBE_VERSION")
	EtcdVersion  = version("ETCD_VERSION")
	// SeaweedFSVersion is the S3-compatible server's module version.
	SeaweedFSVersion = version("SEAWEEDFS_VERSION")
	MailpitVersion   = version("MAILPIT_VERSION")
	// Flux 2.7's controllers (the GitOps tests).
	FluxHelmControllerVersion   = version("FLUX_HELM_CONTROLLER_VERSION")
	FluxSourceControllerVersion = version("FLUX_SOURCE_CONTROLLER_VERSION")
)

//go:embed versions.env
var versionsEnv string

func version(key string) string {
	for _, line := range strings.Split(versionsEnv, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && k == key {
			return v
		}
	}
	panic("internal/lab/versions.env lacks " + key)
}

// SkipOrFail ends a test whose prerequisite is missing: a failure under CI=true (where
// nothing may skip silently), a skip with the reason on a developer's machine.
func SkipOrFail(t testing.TB, format string, a ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true: "+format, a...)
	}
	t.Skipf("skipped outside CI: "+format, a...)
}

// Bins are the absolute paths of the lab's server binaries.
type Bins struct {
	Vault                 string
	Etcd                  string
	KubeAPIServer         string
	KubeControllerManager string
	SSHD                  string
	Weed                  string // SeaweedFS, the lab's S3 server
	Mailpit               string // the lab's SMTP server
	Promtool              string // Prometheus' rule checker and rule unit tests (Debian's prometheus package)
	HelmController        string // Flux's helm-controller
	SourceController      string // Flux's source-controller
	FluxCRDs              string // the directory of both controllers' CRDs
	SSHKeygen             string
	SystemdCreds          string
	IP                    string // iproute2, for network namespaces
}

// CacheDir is where scripts/lab-bins.sh keeps the binaries: $PVA_LAB_CACHE, else
// /var/cache/pve-vault-agent-lab for root (readable by the uid-100 Vault the tests run),
// else $XDG_CACHE_HOME/pve-vault-agent-lab.
func CacheDir() string {
	if d := os.Getenv("PVA_LAB_CACHE"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/cache/pve-vault-agent-lab"
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "pve-vault-agent-lab")
	}
	return filepath.Join(os.TempDir(), "pve-vault-agent-lab")
}

// FindBins locates every lab binary and reports all that are missing at once.
func FindBins() (Bins, error) {
	c := CacheDir()
	b := Bins{
		Vault:                 filepath.Join(c, "vault-"+VaultVersion, "vault"),
		Etcd:                  filepath.Join(c, "etcd-"+EtcdVersion, "etcd"),
		KubeAPIServer:         filepath.Join(c, "kube-"+KubeVersion, "kube-apiserver"),
		KubeControllerManager: filepath.Join(c, "kube-"+KubeVersion, "kube-controller-manager"),
		SSHD:                  "/usr/sbin/sshd",
		Weed:                  filepath.Join(c, "seaweedfs-"+SeaweedFSVersion, "weed"),
		Mailpit:               filepath.Join(c, "mailpit-"+MailpitVersion, "mailpit"),
		Promtool:              filepath.Join(c, "promtool", "promtool"),
	}
	flux := filepath.Join(c, "flux-"+FluxHelmControllerVersion+"-"+FluxSourceControllerVersion)
	b.HelmController, b.SourceController, b.FluxCRDs = filepath.Join(flux, "helm-controller"), filepath.Join(flux, "source-controller"), filepath.Join(flux, "crds")
	var missing []string
	for _, p := range []string{b.Vault, b.Etcd, b.KubeAPIServer, b.KubeControllerManager, b.SSHD, b.Weed, b.Mailpit, b.Promtool, b.HelmController, b.SourceController} {
		if fi, err := os.Stat(p); err != nil || fi.Mode()&0o111 == 0 {
			missing = append(missing, p)
		}
	}
	for name, dst := range map[string]*string{"ssh-keygen": &b.SSHKeygen, "systemd-creds": &b.SystemdCreds, "ip": &b.IP, "sudo": new(string), "useradd": new(string)} {
		p, err := exec.LookPath(name)
		if err != nil {
			missing = append(missing, name)
		}
		*dst = p
	}
	if len(missing) > 0 {
		return b, fmt.Errorf("lab prerequisites missing: %s; run `make lab-bins` (installs openssh-server and promtool, builds Vault %s, etcd %s, Kubernetes %s, SeaweedFS %s, Mailpit %s, Flux helm-controller %s and source-controller %s into %s)",
			strings.Join(missing, ", "), VaultVersion, EtcdVersion, KubeVersion, SeaweedFSVersion, MailpitVersion, FluxHelmControllerVersion, FluxSourceControllerVersion, c)
	}
	return b, nil
}

// InCI reports whether missing prerequisites must fail rather than skip (CI=true).
func InCI() bool {
	v := strings.ToLower(os.Getenv("CI"))
	return v == "true" || v == "1"
}

// Need returns the lab binaries, or ends the test: a failure under CI=true, a skip
// (with the reason and the fix) on a developer's machine.
func Need(t testing.TB) Bins {
	t.Helper()
	if testing.Short() {
		t.Skip("lab test: skipped with -short")
	}
	b, err := FindBins()
	if err != nil {
		SkipOrFail(t, "%v", err)
	}
	return b
}

// FreePort returns a TCP port on ip that was free a moment ago, for a server the lab
// starts and that binds it itself. It is chosen at random outside the kernel's
// ephemeral range (net.ipv4.ip_local_port_range): a port from that range, free when
// asked, can be taken a moment later as the local port of any outgoing connection
// (the Flux controllers, the agents and the API server make many), and a server then
// fails to bind it (seen: SeaweedFS's S3 gRPC port, "address already in use").
func FreePort(ip string) (int, error) {
	lo, hi := portsOutsideEphemeral()
	var err error
	for range 500 {
		port := lo + mrand.IntN(hi-lo+1)
		var l net.Listener
		if l, err = net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port))); err == nil {
			l.Close()
			return port, nil
		}
	}
	return 0, fmt.Errorf("find a free port on %s in %d-%d: %w", ip, lo, hi, err)
}

// portsOutsideEphemeral is the widest range of ports above 10000 that the kernel never
// hands out as local ports of outgoing connections.
func portsOutsideEphemeral() (lo, hi int) {
	elo, ehi := 32768, 60999 // Linux's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if a, err1 := strconv.Atoi(f[0]); err1 == nil {
				if z, err2 := strconv.Atoi(f[1]); err2 == nil {
					elo, ehi = a, z
				}
			}
		}
	}
	if elo-1-10000 >= 65535-ehi {
		return 10000, elo - 1
	}
	return ehi + 1, 65535
}

// Permanent marks a condition error that polling cannot fix (the server exited):
// WaitFor returns it at once instead of waiting out its timeout.
func Permanent(err error) error { return &permanentError{err} }

type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// WaitFor polls cond every 25ms until it returns nil, the timeout passes, ctx ends or
// cond returns a Permanent error; the error says what was awaited and why it failed.
func WaitFor(ctx context.Context, timeout time.Duration, what string, cond func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if last = cond(ctx); last == nil {
			return nil
		}
		var perm *permanentError
		if errors.As(last, &perm) {
			return fmt.Errorf("%s: %w", what, perm.err)
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%s: not ready after %s: %w", what, timeout, last)
			}
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// RunID is a short name for one run of a test on the shared control plane, new on every
// call: a repeated test (-count=N, a re-run) never meets the namespaces, releases or
// PersistentVolumes of an earlier run, which may still be terminating.
func RunID() string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

// DataRoot holds the lab nodes' Vault data directories. It is not under /tmp: the agent
// refuses a hostPath there (cleaned at boot, writable by everyone), as it would on a
// real node.
const DataRoot = "/var/lib/pva-lab"

// NewDataDir creates a fresh directory under DataRoot for one test or demo (the
// caller removes it) and makes DataRoot traversable for the uid-100 Vault.
func NewDataDir(name string) (string, error) {
	if err := os.MkdirAll(DataRoot, 0o711); err != nil {
		return "", err
	}
	if err := os.Chmod(DataRoot, 0o711); err != nil {
		return "", err
	}
	return os.MkdirTemp(DataRoot, name+"-")
}

// TestDataDir is NewDataDir for a test, removed by t.Cleanup.
func TestDataDir(t testing.TB) string {
	t.Helper()
	name := strings.NewReplacer("/", "-", " ", "-").Replace(t.Name())
	if len(name) > 40 {
		name = name[:40]
	}
	d, err := NewDataDir(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// MakeTraversable adds search (o+x) permission to every ancestor of dir below the
// system temp directory or DataRoot, so a server running as another uid (Vault as 100)
// can reach dir. dir itself is left alone: its owner and mode are what the test is about.
func MakeTraversable(dir string) error {
	for _, root := range []string{filepath.Clean(os.TempDir()), DataRoot} {
		for p := filepath.Dir(filepath.Clean(dir)); strings.HasPrefix(p, root+string(os.PathSeparator)); p = filepath.Dir(p) {
			fi, err := os.Stat(p)
			if err != nil {
				return err
			}
			if fi.Mode().Perm()&0o001 == 0 {
				if err := os.Chmod(p, fi.Mode().Perm()|0o011); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// Chart returns the absolute path of the real hashicorp/vault chart archive of that
// version kept under internal/lab/testdata/charts (0.33.0 or 0.34.1).
func Chart(version string) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "testdata", "charts", "vault-"+version+".tgz")
}
