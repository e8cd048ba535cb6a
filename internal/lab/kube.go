package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// ControlPlane is a real Kubernetes control plane on loopback: etcd, kube-apiserver and
// kube-controller-manager (StatefulSets, PV binding, service accounts, garbage
// collection). There is no kubelet: a test plays it by binding pods and writing status.
type ControlPlane struct {
	Dir string
	// Kubeconfig is an admin (system:masters) kubeconfig, mode 0600.
	Kubeconfig string
	// Server is the API URL, https://127.0.0.1:PORT.
	Server string
	// CAFile verifies the API server.
	CAFile  string
	etcd    *Process
	api     *Process
	kcm     *Process
	started time.Duration
}

// StartupTime is how long StartControlPlane took.
func (c *ControlPlane) StartupTime() time.Duration { return c.started }

// Close stops the control plane, apiserver and controller-manager before etcd.
func (c *ControlPlane) Close() {
	for _, p := range []*Process{c.kcm, c.api, c.etcd} {
		if p != nil {
			p.Stop()
		}
	}
}

// StartControlPlane brings up etcd, the API server (waits for /readyz) and the
// controller-manager (waits for its first leader-less sync: the default service
// account in "default"), with all state in dir.
func StartControlPlane(ctx context.Context, bins Bins, dir string) (_ *ControlPlane, err error) {
	t0 := time.Now()
	cp := &ControlPlane{Dir: dir}
	defer func() {
		if err != nil {
			cp.Close()
		}
	}()
	pki := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, err
	}
	ca, err := NewCA("pva-lab-kubernetes-ca")
	if err != nil {
		return nil, err
	}
	serving, err := ca.Issue("kube-apiserver", nil, []string{"127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "10.96.0.1"}, true)
	if err != nil {
		return nil, err
	}
	admin, err := ca.Issue("pva-lab-admin", []string{"system:masters"}, nil, false)
	if err != nil {
		return nil, err
	}
	// The lab runs every controller under one identity with full rights (no
	// --use-service-account-credentials), so it is a cluster admin.
	kcmCert, err := ca.Issue("system:kube-controller-manager", []string{"system:masters"}, nil, false)
	if err != nil {
		return nil, err
	}
	if err := writeFiles(pki, map[string][]byte{
		"ca.crt": ca.CertPEM, "apiserver.crt": serving.CertPEM, "apiserver.key": serving.KeyPEM,
	}); err != nil {
		return nil, err
	}
	if err := writeRSAKeyPair(filepath.Join(pki, "sa.key"), filepath.Join(pki, "sa.pub")); err != nil {
		return nil, err
	}
	cp.CAFile = filepath.Join(pki, "ca.crt")

	// etcd
	clientPort, err := FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	peerPort, err := FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(clientPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peerPort)
	cp.etcd, err = startProcess("etcd", filepath.Join(dir, "etcd.log"), bins.Etcd, []string{
		"--name=lab", "--data-dir=" + filepath.Join(dir, "etcd"),
		"--listen-client-urls=" + etcdURL, "--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL, "--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=lab=" + peerURL, "--unsafe-no-fsync", "--log-level=warn",
	}, nil, nil)
	if err != nil {
		return nil, err
	}
	plain := &http.Client{Timeout: time.Second}
	if err := WaitFor(ctx, 30*time.Second, "etcd", func(ctx context.Context) error {
		if err := cp.etcd.errIfExited(); err != nil {
			return err
		}
		return httpOK(ctx, plain, etcdURL+"/health")
	}); err != nil {
		return nil, err
	}

	// kube-apiserver
	apiPort, err := FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	cp.Server = "https://127.0.0.1:" + strconv.Itoa(apiPort)
	cp.api, err = startProcess("kube-apiserver", filepath.Join(dir, "kube-apiserver.log"), bins.KubeAPIServer, []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port=" + strconv.Itoa(apiPort),
		"--cert-dir=" + filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file=" + filepath.Join(pki, "apiserver.crt"), "--tls-private-key-file=" + filepath.Join(pki, "apiserver.key"),
		"--client-ca-file=" + cp.CAFile,
		"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(pki, "sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--authorization-mode=RBAC",
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	}, nil, nil)
	if err != nil {
		return nil, err
	}
	adminTLS, err := admin.TLS()
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.CertPEM)
	authed := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{adminTLS}, MinVersion: tls.VersionTLS12},
	}}
	if err := WaitFor(ctx, 60*time.Second, "kube-apiserver /readyz", func(ctx context.Context) error {
		if err := cp.api.errIfExited(); err != nil {
			return err
		}
		return httpOK(ctx, authed, cp.Server+"/readyz")
	}); err != nil {
		return nil, err
	}

	cp.Kubeconfig = filepath.Join(dir, "admin.kubeconfig")
	if err := os.WriteFile(cp.Kubeconfig, kubeconfig(cp.Server, ca.CertPEM, admin, "pva-lab-admin"), 0o600); err != nil {
		return nil, err
	}
	kcmConfig := filepath.Join(dir, "controller-manager.kubeconfig")
	if err := os.WriteFile(kcmConfig, kubeconfig(cp.Server, ca.CertPEM, kcmCert, "system:kube-controller-manager"), 0o600); err != nil {
		return nil, err
	}

	// kube-controller-manager
	cp.kcm, err = startProcess("kube-controller-manager", filepath.Join(dir, "kube-controller-manager.log"), bins.KubeControllerManager, []string{
		"--kubeconfig=" + kcmConfig,
		"--secure-port=0",
		"--leader-elect=false",
		"--controllers=*,-node-ipam-controller,-node-lifecycle-controller",
		"--service-account-private-key-file=" + filepath.Join(pki, "sa.key"),
		"--root-ca-file=" + cp.CAFile,
		"--use-service-account-credentials=false",
		"--concurrent-statefulset-syncs=5",
		"--profiling=false",
	}, nil, nil)
	if err != nil {
		return nil, err
	}
	if err := WaitFor(ctx, 60*time.Second, "kube-controller-manager (default service account)", func(ctx context.Context) error {
		if err := cp.kcm.errIfExited(); err != nil {
			return err
		}
		return httpOK(ctx, authed, cp.Server+"/api/v1/namespaces/default/serviceaccounts/default")
	}); err != nil {
		return nil, err
	}
	cp.started = time.Since(t0)
	return cp, nil
}

func httpOK(ctx context.Context, c *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

func kubeconfig(server string, caPEM []byte, user KeyPair, userName string) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: pva-lab
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: pva-lab
  context:
    cluster: pva-lab
    user: %s
current-context: pva-lab
`, server, b64(caPEM), userName, b64(user.CertPEM), b64(user.KeyPEM), userName)
}

// PauseAPIServer stops the API server with SIGSTOP: connections are accepted by the
// kernel and then nothing answers, like a hung control plane. ResumeAPIServer continues it.
func (c *ControlPlane) PauseAPIServer() error { return c.api.Signal(syscall.SIGSTOP) }

// ResumeAPIServer continues an API server paused by PauseAPIServer.
func (c *ControlPlane) ResumeAPIServer() error { return c.api.Signal(syscall.SIGCONT) }
