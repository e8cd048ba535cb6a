package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vaultapi "github.com/hashicorp/vault/api"
	proxmox "github.com/luthermonson/go-proxmox"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func TestMain(m *testing.M) { os.Exit(RunTests(m)) }

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func kubeClient(t *testing.T, cp *ControlPlane) *kubernetes.Clientset {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func newNamespace(ctx context.Context, t *testing.T, cs *kubernetes.Clientset) string {
	t.Helper()
	ns, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "lab-"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ns.Name
}

// The API server reports the pinned version, and the controller-manager really runs:
// a StatefulSet gets its pod and a PVC binds to a matching PV.
func TestControlPlaneIsRealAndReconciles(t *testing.T) {
	cp := SharedControlPlane(t)
	t.Logf("control plane started in %s", cp.StartupTime().Round(time.Millisecond))
	ctx := testCtx(t, 2*time.Minute)
	cs := kubeClient(t, cp)

	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != "v"+KubeVersion {
		t.Fatalf("server version %q, want v%s (ldflags not applied?)", v.GitVersion, KubeVersion)
	}
	ns := newNamespace(ctx, t, cs)

	one := int32(1)
	labels := map[string]string{"app": "probe"}
	_, err = cs.AppsV1().StatefulSets(ns).Create(ctx, &appsv1.StatefulSet{
		ObjectMeta: metav1.ObjectMeta{Name: "probe"},
		Spec: appsv1.StatefulSetSpec{
			Replicas: &one, ServiceName: "probe",
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "example.invalid/none"}}},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := WaitFor(ctx, 30*time.Second, "statefulset pod probe-0", func(ctx context.Context) error {
		_, err := cs.CoreV1().Pods(ns).Get(ctx, "probe-0", metav1.GetOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}

	sc := "lab-" + ns
	_, err = cs.CoreV1().PersistentVolumes().Create(ctx, &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "pv-" + ns},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			StorageClassName:              sc,
			PersistentVolumeSource:        corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/srv/vault"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cs.CoreV1().PersistentVolumes().Delete(context.Background(), "pv-"+ns, metav1.DeleteOptions{})
	})
	_, err = cs.CoreV1().PersistentVolumeClaims(ns).Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "data"},
		Spec: corev1.PersistentVolumeClaimSpec{
			StorageClassName: &sc,
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := WaitFor(ctx, 60*time.Second, "PVC data bound", func(ctx context.Context) error {
		pvc, err := cs.CoreV1().PersistentVolumeClaims(ns).Get(ctx, "data", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if pvc.Status.Phase != corev1.ClaimBound {
			return errors.New(string(pvc.Status.Phase))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// The Helm SDK installs a chart with a kubeVersion constraint against the lab: this
// fails if the API server reports v0.0.0-master.
func TestControlPlaneTakesHelmInstall(t *testing.T) {
	cp := SharedControlPlane(t)
	ctx := testCtx(t, time.Minute)
	cs := kubeClient(t, cp)
	ns := newNamespace(ctx, t, cs)

	flags := genericclioptions.NewConfigFlags(false)
	flags.KubeConfig = &cp.Kubeconfig
	flags.Namespace = &ns
	cfg := new(action.Configuration)
	if err := cfg.Init(flags, ns, "secret", t.Logf); err != nil {
		t.Fatal(err)
	}
	ch, err := loader.Load(filepath.Join("testdata", "hello"))
	if err != nil {
		t.Fatal(err)
	}
	inst := action.NewInstall(cfg)
	inst.ReleaseName = "hello"
	inst.Namespace = ns
	inst.Timeout = 30 * time.Second
	rel, err := inst.RunWithContext(ctx, ch, map[string]any{"greeting": "from the lab"})
	if err != nil {
		t.Fatalf("helm install: %v", err)
	}
	if rel.Info.Status != "deployed" {
		t.Fatalf("release status %s", rel.Info.Status)
	}
	cm, err := cs.CoreV1().ConfigMaps(ns).Get(ctx, "hello-greeting", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data["greeting"] != "from the lab" || cm.Data["kubeVersion"] != "v"+KubeVersion {
		t.Fatalf("rendered configmap %v", cm.Data)
	}
}

// sshd accepts the lab client key, is verified through known_hosts, and runs commands
// as root; a different host key is refused.
func TestSSHDAcceptsKeyAndVerifiesHost(t *testing.T) {
	bins := Need(t)
	ctx := testCtx(t, 30*time.Second)
	dir := t.TempDir()
	s, err := StartSSHD(ctx, bins, dir, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)

	kh := filepath.Join(dir, "known_hosts")
	if err := s.WriteKnownHosts(kh); err != nil {
		t.Fatal(err)
	}
	cb, err := knownhosts.New(kh)
	if err != nil {
		t.Fatal(err)
	}
	client, err := ssh.Dial("tcp", s.Addr(), &ssh.ClientConfig{
		User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(s.ClientSigner)}, HostKeyCallback: cb, Timeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh: %v\n%s", err, s.Process().Tail(10))
	}
	defer client.Close()
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	out, err := sess.CombinedOutput("id -u && stat -c %u /")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if strings.TrimSpace(string(out)) != "0\n0" {
		t.Fatalf("id -u && stat: %q", out)
	}

	// Another server's key under the same name must be refused.
	other, err := NewKey(filepath.Join(dir, "other"))
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "known_hosts.bad")
	if err := os.WriteFile(bad, []byte(knownhosts.Line([]string{knownhosts.Normalize(s.Addr())}, other.PublicKey())+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	badCB, err := knownhosts.New(bad)
	if err != nil {
		t.Fatal(err)
	}
	_, err = ssh.Dial("tcp", s.Addr(), &ssh.ClientConfig{
		User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(s.ClientSigner)}, HostKeyCallback: badCB, Timeout: 5 * time.Second,
	})
	var ke *knownhosts.KeyError
	if !errors.As(err, &ke) || len(ke.Want) == 0 {
		t.Fatalf("dial with a wrong known host key: %v, want a knownhosts mismatch", err)
	}
}

// A node VM in its own network namespace: sshd listens on the node address, port 22,
// reached from the host over the veth pair.
func TestSSHDInNetns(t *testing.T) {
	bins := Need(t)
	ctx := testCtx(t, 30*time.Second)
	ns, err := NewNetns(ctx, bins)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Close)
	s, err := StartSSHDIn(ctx, bins, t.TempDir(), ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if s.Addr() != ns.NodeIP+":22" {
		t.Fatalf("sshd on %s, want %s:22", s.Addr(), ns.NodeIP)
	}
	client, err := ssh.Dial("tcp", s.Addr(), &ssh.ClientConfig{
		User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(s.ClientSigner)}, HostKeyCallback: ssh.FixedHostKey(s.HostKey), Timeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatalf("ssh into the namespace: %v\n%s", err, s.Process().Tail(10))
	}
	defer client.Close()
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	out, err := sess.Output("ip -4 -o addr show")
	if err != nil || !strings.Contains(string(out), ns.NodeIP+"/30") {
		t.Fatalf("the session does not run in the namespace: %v %s", err, out)
	}
}

func vaultClient(t *testing.T, addr string) *vaultapi.Client {
	t.Helper()
	cfg := vaultapi.DefaultConfig()
	cfg.Address = addr
	c, err := vaultapi.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	return c
}

// A lab Vault with Raft storage initialises, unseals, stores a secret, comes back
// sealed after kill -9 and has its data after unsealing again.
func TestVaultRaftLifecycle(t *testing.T) {
	bins := Need(t)
	ctx := testCtx(t, time.Minute)
	dir := t.TempDir()
	v, err := StartVault(ctx, bins, VaultOptions{DataDir: filepath.Join(dir, "data"), StateDir: filepath.Join(dir, "state"), IP: "127.0.0.1"})
	if err == nil || !strings.Contains(err.Error(), "no such file or directory") {
		t.Fatalf("vault without its data directory: %v; want a failure naming it", err)
	}
	if err := os.Mkdir(filepath.Join(dir, "data"), 0o700); err != nil {
		t.Fatal(err)
	}
	v, err = StartVault(ctx, bins, VaultOptions{DataDir: filepath.Join(dir, "data"), StateDir: filepath.Join(dir, "state"), IP: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)

	c := vaultClient(t, v.Addr)
	h, err := c.Sys().HealthWithContext(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h.Initialized {
		t.Fatal("fresh vault reports initialised")
	}
	t0 := time.Now()
	init, err := c.Sys().InitWithContext(ctx, &vaultapi.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("raft init took %s", time.Since(t0).Round(time.Millisecond))
	unseal := func() {
		t.Helper()
		st, err := c.Sys().UnsealWithContext(ctx, init.KeysB64[0])
		if err != nil || st.Sealed {
			t.Fatalf("unseal: %v %+v", err, st)
		}
	}
	unseal()
	c.SetToken(init.RootToken)
	if err := WaitFor(ctx, 30*time.Second, "vault active", func(ctx context.Context) error {
		_, err := c.Logical().WriteWithContext(ctx, "sys/mounts/kv", map[string]any{"type": "kv", "options": map[string]any{"version": "1"}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Logical().WriteWithContext(ctx, "kv/probe", map[string]any{"v": "42"}); err != nil {
		t.Fatal(err)
	}

	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := c.Sys().SealStatusWithContext(ctx)
	if err != nil || !st.Sealed || !st.Initialized {
		t.Fatalf("after kill -9 and restart: %v %+v, want initialised and sealed", err, st)
	}
	unseal()
	var sec *vaultapi.Secret
	if err := WaitFor(ctx, 30*time.Second, "kv/probe readable", func(ctx context.Context) error {
		sec, err = c.Logical().ReadWithContext(ctx, "kv/probe")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if sec == nil || sec.Data["v"] != "42" {
		t.Fatalf("kv/probe after restart: %+v", sec)
	}
}

// Vault run as uid 100 initialises only on a directory that uid can write.
func TestVaultRunsAsUID100(t *testing.T) {
	bins := Need(t)
	if os.Geteuid() != 0 {
		SkipOrFail(t, "needs root to start Vault as uid 100")
	}
	ctx := testCtx(t, time.Minute)
	uid, gid := uint32(100), uint32(100)
	for _, tc := range []struct {
		name    string
		chown   bool
		wantErr bool
	}{
		{"owned by 100", true, false},
		{"root owned 0700", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			if err := os.Mkdir(data, 0o700); err != nil {
				t.Fatal(err)
			}
			if tc.chown {
				if err := os.Chown(data, int(uid), int(gid)); err != nil {
					t.Fatal(err)
				}
			}
			v, err := StartVault(ctx, bins, VaultOptions{DataDir: data, StateDir: filepath.Join(dir, "state"), IP: "127.0.0.1", UID: &uid, GID: &gid})
			if err != nil {
				if tc.wantErr && strings.Contains(err.Error(), "permission denied") {
					return // Vault could not open its Raft store: the failure the product prevents
				}
				t.Fatal(err)
			}
			t.Cleanup(v.Close)
			_, err = vaultClient(t, v.Addr).Sys().InitWithContext(ctx, &vaultapi.InitRequest{SecretShares: 1, SecretThreshold: 1})
			if tc.wantErr != (err != nil) {
				t.Fatalf("init: %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

// The fake Proxmox API answers go-proxmox with the real shapes and fails like the real one.
func TestPVEFakeAnswersGoProxmox(t *testing.T) {
	ctx := testCtx(t, 30*time.Second)
	dir := t.TempDir()
	const tokenID, secret = "agent@pve!lab", "1f0e9c4a-2b7d-4d7e-9a51-3c2b1a0f9e8d"
	p, err := StartPVE(dir, tokenID, secret)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	p.PutVM(FakeVM{VMID: 201, Name: "k8s-worker-1", Status: "running", Agent: true,
		Interfaces: []FakeIface{{Name: "eth0", MAC: "bc:24:11:00:00:01", Addrs: []string{"192.168.10.21/24", "fe80::be24:11ff:fe00:1/64"}}}})
	p.PutVM(FakeVM{VMID: 202, Name: "k8s-worker-2", Status: "stopped", Agent: true})
	p.PutVM(FakeVM{VMID: 203, Name: "k8s-worker-3", Status: "running", Agent: false})
	p.PutStorage(FakeStorage{ID: "backup", Type: "dir", Path: dir, Content: "backup", Total: 100 << 30, Used: 40 << 30, Active: true})
	if err := p.Pveum("pveum acl modify / --users agent@pve --tokens 'agent@pve!lab' --roles Administrator"); err != nil {
		t.Fatal(err)
	}

	client := proxmox.NewClient(p.URL, proxmox.WithAPIToken(tokenID, secret), proxmox.WithRootCAFile(p.CAFile))
	ver, err := client.Version(ctx)
	if err != nil {
		t.Fatalf("version over verified TLS: %v", err)
	}
	if ver.Release != "8.3" {
		t.Fatalf("version %+v", ver)
	}
	cl, err := client.Cluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := cl.Resources(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 3 || res[0].VMID != 201 || res[0].Name != "k8s-worker-1" || res[0].Node != "pve1" || res[0].Status != "running" {
		t.Fatalf("cluster resources %+v", res[0])
	}
	node, err := client.Node(ctx, "pve1")
	if err != nil {
		t.Fatal(err)
	}
	vm, err := node.VirtualMachine(ctx, 201)
	if err != nil {
		t.Fatal(err)
	}
	if vm.Status != "running" || vm.Name != "k8s-worker-1" {
		t.Fatalf("vm %+v", vm)
	}
	ifaces, err := vm.AgentGetNetworkIFaces(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ifaces) != 1 || ifaces[0].IPAddresses[0].IPAddress != "192.168.10.21" || ifaces[0].IPAddresses[0].Prefix != 24 {
		t.Fatalf("guest interfaces %+v", ifaces[0])
	}
	st, err := node.Storage(ctx, "backup")
	if err != nil {
		t.Fatal(err)
	}
	if st.Avail != 60<<30 || st.Active != 1 {
		t.Fatalf("storage %+v", st)
	}

	for _, tc := range []struct {
		vmid int
		want string
	}{
		{202, "VM 202 is not running"},
		{203, "QEMU guest agent is not running"},
	} {
		vm, err := node.VirtualMachine(ctx, tc.vmid)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := vm.AgentGetNetworkIFaces(ctx); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("vm %d agent: %v, want %q", tc.vmid, err, tc.want)
		}
	}
	if _, err := node.VirtualMachine(ctx, 999); err == nil || !strings.Contains(err.Error(), "999.conf' does not exist") {
		t.Errorf("unknown vmid: %v", err)
	}
	bad := proxmox.NewClient(p.URL, proxmox.WithAPIToken(tokenID, "wrong"), proxmox.WithRootCAFile(p.CAFile))
	if _, err := bad.Version(ctx); !errors.Is(err, proxmox.ErrNotAuthorized) {
		t.Errorf("bad token: %v, want ErrNotAuthorized", err)
	}
	untrusted := proxmox.NewClient(p.URL, proxmox.WithAPIToken(tokenID, secret))
	if _, err := untrusted.Version(ctx); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("without the CA: %v, want a certificate error", err)
	}
	for _, r := range p.Requests() {
		if strings.Contains(r, secret) {
			t.Errorf("request line carries the token secret: %s", r)
		}
	}
}

// systemd-creds really seals and opens a credential with the host key.
func TestSystemdCredsRoundTrip(t *testing.T) {
	bins := Need(t)
	ctx := testCtx(t, 30*time.Second)
	dir := t.TempDir()
	out := filepath.Join(dir, "probe.cred")
	enc := exec.CommandContext(ctx, bins.SystemdCreds, "encrypt", "--with-key=host", "--name=probe", "-", out)
	enc.Stdin = strings.NewReader("lab-secret")
	if b, err := enc.CombinedOutput(); err != nil {
		t.Fatalf("systemd-creds encrypt: %v: %s", err, b)
	}
	sealed, err := os.ReadFile(out)
	if err != nil || strings.Contains(string(sealed), "lab-secret") {
		t.Fatalf("sealed file: %v (contains plaintext: %v)", err, strings.Contains(string(sealed), "lab-secret"))
	}
	got, err := exec.CommandContext(ctx, bins.SystemdCreds, "decrypt", "--name=probe", out, "-").Output()
	if err != nil || string(got) != "lab-secret" {
		t.Fatalf("systemd-creds decrypt: %v %q", err, got)
	}
	if err := exec.CommandContext(ctx, bins.SystemdCreds, "decrypt", "--name=other", out, "-").Run(); err == nil {
		t.Fatal("decrypt under another name succeeded")
	}
}

func TestFreePortIsLoopback(t *testing.T) {
	p, err := FreePort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		t.Fatalf("port %d not free: %v", p, err)
	}
	l.Close()
}

// The stand-in says no as Proxmox does: 403 naming the path and privilege the endpoint
// checks (which differs between PVE 8 and 9), 595 with no body for an offline node, and
// an LXC container whose fractional maxcpu go-proxmox v0.8.2 cannot decode.
func TestPVEFakeRefusesLikeProxmox(t *testing.T) {
	ctx := testCtx(t, 30*time.Second)
	const tokenID, secret = "agent@pve!lab", "1f0e9c4a-2b7d-4d7e-9a51-3c2b1a0f9e8d"
	p, err := StartPVE(t.TempDir(), tokenID, secret)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	p.AddNode("pve2")
	p.PutVM(FakeVM{VMID: 201, Name: "k8s-worker-1", Status: "running", Agent: true})
	p.PutVM(FakeVM{VMID: 202, Name: "k8s-worker-2", Node: "pve2", Status: "running", Agent: true})
	if err := p.Pveum("pveum acl modify /vms --users agent@pve --tokens 'agent@pve!lab' --roles PVEAuditor"); err != nil {
		t.Fatal(err)
	}
	get := func(path string) (int, string, string) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.URL+path, nil)
		req.Header.Set("Authorization", "PVEAPIToken="+tokenID+"="+secret)
		pool := x509.NewCertPool()
		pem, _ := os.ReadFile(p.CAFile)
		pool.AppendCertsFromPEM(pem)
		res, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, res.Status, string(b)
	}
	for _, tc := range []struct {
		major      int
		path, want string
	}{
		{8, "/nodes/pve1/qemu/201/agent/network-get-interfaces", "403 Permission check failed (/vms/201, VM.Monitor)"},
		{8, "/nodes/pve1/qemu/201/status/current", "200 OK"},
		{8, "/cluster/status", "403 Permission check failed (/, Sys.Audit)"},
		{8, "/storage/backup", "403 Permission check failed (/storage/backup, Datastore.Allocate)"},
		{8, "/nodes/pve1/storage/backup/status", "403 Permission check failed (/storage/backup, Datastore.Audit|Datastore.AllocateSpace)"},
		{9, "/nodes/pve1/qemu/201/agent/network-get-interfaces", "200 OK"},
		{9, "/nodes/pve1/qemu/999/status/current", "500 Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist"},
	} {
		p.SetMajor(tc.major)
		if _, status, _ := get(tc.path); status != tc.want {
			t.Errorf("PVE %d GET %s: %q; want %q", tc.major, tc.path, status, tc.want)
		}
	}
	p.SetNodeOnline("pve2", false)
	if code, status, body := get("/nodes/pve2/qemu/202/status/current"); code != 595 || body != "" {
		t.Errorf("offline node: %q body %q; want 595 and no body", status, body)
	}
	if _, _, body := get("/cluster/resources?type=vm"); !strings.Contains(body, `"status":"unknown"`) || strings.Contains(body, "k8s-worker-2") {
		t.Errorf("a guest of the offline node keeps its name or status: %s", body)
	}
	p.PutContainer(FakeCT{VMID: 150, Name: "dns", CPULimit: 0.5})
	client := proxmox.NewClient(p.URL, proxmox.WithAPIToken(tokenID, secret), proxmox.WithRootCAFile(p.CAFile))
	var raw []map[string]any
	if err := client.Get(ctx, "/cluster/resources?type=vm", &raw); err != nil || raw[0]["maxcpu"] != 0.5 {
		t.Fatalf("container entry %v %v; want maxcpu 0.5", raw, err)
	}
	var typed proxmox.ClusterResources
	if err := client.Get(ctx, "/cluster/resources?type=vm", &typed); err == nil {
		t.Fatal("go-proxmox decoded maxcpu 0.5: the reason the resolver decodes cluster resources itself is gone")
	}
}

// The lab kubelet probes as the kubelet does: readiness sets Ready; a liveness probe
// failing failureThreshold times restarts the container in the same pod (same UID and
// IP, restartCount + 1), the first restart at once, the next after a 10 s back-off shown
// as CrashLoopBackOff.
func TestKubeletProbes(t *testing.T) {
	cp := SharedControlPlane(t)
	ctx := testCtx(t, 2*time.Minute)
	cs := kubeClient(t, cp)
	ns := newNamespace(ctx, t, cs)
	if err := RegisterNodes(ctx, cs, ns+"-n0"); err != nil {
		t.Fatal(err)
	}
	var code atomic.Int32
	code.Store(200)
	var mu sync.Mutex
	var srv *http.Server
	starts := 0
	ip := LoopbackBase()(0)
	hooks := PodHooks{
		Start: func(ctx context.Context, p *corev1.Pod) (string, error) {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, "18080"))
			if err != nil {
				return "", err
			}
			mu.Lock()
			defer mu.Unlock()
			starts++
			srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.RawQuery != "standbyok=true" {
					w.WriteHeader(400) // the query must arrive as the probe wrote it
					return
				}
				w.WriteHeader(int(code.Load()))
			})}
			go srv.Serve(l)
			return ip, nil
		},
		Stop: func(*corev1.Pod) {
			mu.Lock()
			defer mu.Unlock()
			if srv != nil {
				srv.Close()
			}
		},
	}
	k := StartKubelet(cs, ns, hooks)
	t.Cleanup(k.Stop)
	probe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/v1/sys/health?standbyok=true", Port: intstr.FromString("http")}},
		PeriodSeconds: 1, FailureThreshold: 2}
	pod, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "vault-0"}, Spec: corev1.PodSpec{
		Containers: []corev1.Container{{Name: "vault", Image: "example.invalid/vault", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 18080}},
			LivenessProbe: probe, ReadinessProbe: probe}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	state := func(ctx context.Context) (*corev1.Pod, error) {
		p, err := cs.CoreV1().Pods(ns).Get(ctx, "vault-0", metav1.GetOptions{})
		if err == nil && (p.UID != pod.UID || len(p.Status.ContainerStatuses) == 0) {
			err = errors.New("not running yet")
		}
		return p, err
	}
	ready := func(p *corev1.Pod) bool {
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady {
				return c.Status == corev1.ConditionTrue
			}
		}
		return false
	}
	if err := WaitFor(ctx, 30*time.Second, "Ready", func(ctx context.Context) error {
		p, err := state(ctx)
		if err != nil || !ready(p) {
			return errors.New("not ready")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	code.Store(503)
	var firstIP string
	t0 := time.Now()
	if err := WaitFor(ctx, 30*time.Second, "a restart after the liveness probe failed", func(ctx context.Context) error {
		p, err := state(ctx)
		if err != nil || p.Status.ContainerStatuses[0].RestartCount != 1 || ready(p) {
			return errors.New("not restarted")
		}
		firstIP = p.Status.PodIP
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	first := time.Since(t0)
	if err := WaitFor(ctx, 60*time.Second, "the second restart, after a back-off", func(ctx context.Context) error {
		p, err := state(ctx)
		if err != nil {
			return err
		}
		if w := p.Status.ContainerStatuses[0].State.Waiting; w != nil && w.Reason == "CrashLoopBackOff" && p.Status.ContainerStatuses[0].RestartCount == 2 {
			return nil
		}
		return errors.New("no back-off yet")
	}); err != nil {
		t.Fatal(err)
	}
	code.Store(200)
	if err := WaitFor(ctx, 60*time.Second, "Ready again after the back-off", func(ctx context.Context) error {
		p, err := state(ctx)
		if err != nil || !ready(p) || p.Status.PodIP != firstIP || p.Status.ContainerStatuses[0].State.Running == nil {
			return errors.New("not ready")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if starts != 3 || k.Restarts("vault-0") != 2 {
		t.Fatalf("%d starts, %d restarts: want 3 and 2", starts, k.Restarts("vault-0"))
	}
	t.Logf("first restart %s after the probe began failing (2 × 1 s), the second after a 10 s back-off", first.Round(100*time.Millisecond))
}
