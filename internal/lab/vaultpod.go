package lab

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// VaultPods runs the release's Vault server pods as real Vault processes, each behind a
// Gate that enforces Vault 2.x's rules: when the lab kubelet starts a server pod (its
// controller is the release's StatefulSet and it carries the chart's server labels),
// the Vault config the chart rendered (ConfigMap <release>-config) is read and started
// with only what cannot hold outside a pod rewritten — the listener binds the pod's
// loopback IP behind the gate, /vault/data becomes the pod's hostPath, and
// service_registration "kubernetes" is dropped. The env the real chart sets
// (VAULT_API_ADDR, VAULT_CLUSTER_ADDR, VAULT_RAFT_NODE_ID) is set the same way. Every
// other pod of the namespace (the chart's injector, a rogue pod) just runs, without a
// process, at Other's address (default 192.0.2.1, which routes nowhere).
type VaultPods struct {
	Bins     Bins
	Clients  kubernetes.Interface
	Release  string
	StateDir string
	// IP returns the loopback address of pod ordinal i (127.x.y.z); the chart's
	// <release>-i.<release>-internal names in the config (retry_join) resolve to it.
	IP func(ordinal int) string
	// DataDir returns the hostPath of a pod.
	DataDir func(pod *corev1.Pod) string
	// UID/GID the Vault processes run as (nil: the caller's).
	UID, GID *uint32
	// Netns, when set, runs pod ordinal i inside that node's network namespace.
	Netns func(ordinal int) *Netns
	// Other gives the IP of a pod that is not a Vault server pod (nil: 192.0.2.1).
	Other func(pod *corev1.Pod) string
	// DrillIP is the address of a restore-drill pod (nil: IP(90)); it runs in the
	// namespace of ordinal 0's node.
	DrillIP func() string

	mu     sync.Mutex
	vaults map[string]*Vault // pod name → process
	uids   map[string]string // pod name → the UID of the pod its process runs for
}

// Hooks are the PodHooks for StartKubelet.
func (vp *VaultPods) Hooks() PodHooks {
	return PodHooks{Start: vp.start, Stop: vp.stop}
}

// Vault returns the process of a pod (nil when not running).
func (vp *VaultPods) Vault(pod string) *Vault {
	vp.mu.Lock()
	defer vp.mu.Unlock()
	return vp.vaults[pod]
}

// Close stops every Vault.
func (vp *VaultPods) Close() {
	vp.mu.Lock()
	defer vp.mu.Unlock()
	for _, v := range vp.vaults {
		v.Close()
	}
	vp.vaults = nil
}

// The ports of a lab pod: the gate on the chart's API port, Vault behind it.
const (
	podAPIPort     = 8200
	podBackendPort = 18200
	podClusterPort = 8201
)

var (
	listenRe  = regexp.MustCompile(`"\[::\]:(\d+)"`)
	svcRegRe  = regexp.MustCompile(`(?m)^\s*service_registration\s+"kubernetes"\s*\{\s*\}\s*$`)
	dataDirRe = regexp.MustCompile(`"/vault/data"`)
)

// PodConfig rewrites a chart-rendered Vault config for a pod running on the host: the
// API listener moves behind the gate (port 8200 → 18200 on the pod's IP), the cluster
// listener binds the pod's IP; hosts maps the pods' DNS names to their IPs.
func PodConfig(rendered, ip, dataDir string, hosts map[string]string) string {
	c := listenRe.ReplaceAllStringFunc(rendered, func(m string) string {
		port := listenRe.FindStringSubmatch(m)[1]
		if port == strconv.Itoa(podAPIPort) {
			port = strconv.Itoa(podBackendPort)
		}
		return `"` + ip + `:` + port + `"`
	})
	for name, addr := range hosts {
		c = strings.ReplaceAll(c, "://"+name+":", "://"+addr+":")
	}
	c = dataDirRe.ReplaceAllString(c, fmt.Sprintf("%q", dataDir))
	return svcRegRe.ReplaceAllString(c, "")
}

// IsServerPod reports whether the kubelet runs pod as a Vault server of the release.
func (vp *VaultPods) IsServerPod(pod *corev1.Pod) bool {
	owner := metav1.GetControllerOf(pod)
	return owner != nil && owner.Kind == "StatefulSet" && owner.Name == vp.Release &&
		pod.Labels["component"] == "server" && pod.Labels["app.kubernetes.io/instance"] == vp.Release
}

// IsDrillPod reports whether pod is one of the agent's restore-drill pods (its labels,
// managed by the agent): the kubelet runs those as real Vaults too, from their own
// ConfigMap and TLS Secret.
func (vp *VaultPods) IsDrillPod(pod *corev1.Pod) bool {
	return pod.Labels["pva.io/drill"] != "" && pod.Labels["pva.io/release"] == vp.Release &&
		pod.Labels["app.kubernetes.io/managed-by"] == "pve-vault-agent"
}

func (vp *VaultPods) start(ctx context.Context, pod *corev1.Pod) (string, error) {
	if vp.IsDrillPod(pod) {
		return vp.startDrill(ctx, pod)
	}
	if !vp.IsServerPod(pod) {
		if vp.Other != nil {
			return vp.Other(pod), nil
		}
		return "192.0.2.1", nil
	}
	cm, err := vp.Clients.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, vp.Release+"-config", metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read the rendered config: %w", err)
	}
	var rendered string
	for _, v := range cm.Data {
		rendered = v
	}
	ord := ordinal(pod.Name)
	ip, data := vp.IP(ord), vp.DataDir(pod)
	hosts := map[string]string{}
	for i := 0; i < 10; i++ {
		hosts[fmt.Sprintf("%s-%d.%s-internal", vp.Release, i, vp.Release)] = vp.IP(i)
	}
	env := []string{fmt.Sprintf("VAULT_API_ADDR=http://%s:%d", ip, podAPIPort), fmt.Sprintf("VAULT_CLUSTER_ADDR=https://%s:%d", ip, podClusterPort), "HOSTNAME=" + pod.Name}
	if strings.Contains(podEnv(pod), "VAULT_RAFT_NODE_ID") {
		env = append(env, "VAULT_RAFT_NODE_ID="+pod.Name)
	}
	v, err := StartVault(ctx, vp.Bins, VaultOptions{
		DataDir: data, StateDir: filepath.Join(vp.StateDir, pod.Name+"-"+string(pod.UID)[:8]),
		IP: ip, Port: podAPIPort, BackendPort: podBackendPort, ClusterPort: podClusterPort, NodeID: pod.Name, UID: vp.UID, GID: vp.GID,
		Config: PodConfig(rendered, ip, data, hosts), Env: env, Netns: vp.netns(ord),
	})
	if err != nil {
		return "", err
	}
	vp.mu.Lock()
	defer vp.mu.Unlock()
	if vp.vaults == nil {
		vp.vaults = map[string]*Vault{}
	}
	vp.vaults[pod.Name] = v
	vp.setUID(pod)
	return ip, nil
}

// setUID records which incarnation of a pod runs (vp.mu held): stop acts only on that.
func (vp *VaultPods) setUID(pod *corev1.Pod) {
	if vp.uids == nil {
		vp.uids = map[string]string{}
	}
	vp.uids[pod.Name] = string(pod.UID)
}

var tlsFileRe = regexp.MustCompile(`(?m)^\s*tls_(cert|key)_file\s*=\s*"([^"]+)"\s*$`)

// startDrill runs a drill pod: its config from the ConfigMap its config volume names,
// its listener's certificate from the Secret mounted where the config points; the gate
// serves that TLS and Vault behind it listens plain. The data directory is a fresh one
// (an emptyDir).
func (vp *VaultPods) startDrill(ctx context.Context, pod *corev1.Pod) (string, error) {
	mounts := map[string]string{} // mount path → volume name
	for _, m := range pod.Spec.Containers[0].VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	source := func(path string) (corev1.VolumeSource, bool) {
		for dir := path; dir != "/" && dir != "."; dir = filepath.Dir(dir) {
			if name, ok := mounts[dir]; ok {
				for _, v := range pod.Spec.Volumes {
					if v.Name == name {
						return v.VolumeSource, true
					}
				}
			}
		}
		return corev1.VolumeSource{}, false
	}
	var cmdConfig string
	for _, a := range pod.Spec.Containers[0].Command {
		if c, ok := strings.CutPrefix(a, "-config="); ok {
			cmdConfig = c
		}
	}
	src, ok := source(cmdConfig)
	if !ok || src.ConfigMap == nil {
		return "", fmt.Errorf("drill pod %s: no ConfigMap mounted at its -config %q", pod.Name, cmdConfig)
	}
	cm, err := vp.Clients.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, src.ConfigMap.Name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("drill pod %s: %w", pod.Name, err)
	}
	config := cm.Data[filepath.Base(cmdConfig)]
	var tlsCfg *tls.Config
	files := map[string]string{}
	for _, m := range tlsFileRe.FindAllStringSubmatch(config, -1) {
		files[m[1]] = m[2]
	}
	if len(files) == 2 {
		sec, ok := source(files["cert"])
		if !ok || sec.Secret == nil {
			return "", fmt.Errorf("drill pod %s: no Secret mounted at %s", pod.Name, files["cert"])
		}
		s, err := vp.Clients.CoreV1().Secrets(pod.Namespace).Get(ctx, sec.Secret.SecretName, metav1.GetOptions{})
		if err != nil {
			return "", fmt.Errorf("drill pod %s: %w", pod.Name, err)
		}
		pair, err := tls.X509KeyPair(s.Data[filepath.Base(files["cert"])], s.Data[filepath.Base(files["key"])])
		if err != nil {
			return "", fmt.Errorf("drill pod %s: its TLS pair: %w", pod.Name, err)
		}
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
		config = tlsFileRe.ReplaceAllString(config, "")
		config = strings.Replace(config, "listener \"tcp\" {", "listener \"tcp\" {\n  tls_disable = 1", 1)
	}
	ip := vp.IP(90)
	if vp.DrillIP != nil {
		ip = vp.DrillIP()
	}
	state := filepath.Join(vp.StateDir, pod.Name+"-"+string(pod.UID)[:8])
	data := filepath.Join(state, "data")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return "", err
	}
	if vp.UID != nil {
		gid := *vp.UID
		if vp.GID != nil {
			gid = *vp.GID
		}
		if err := os.Chown(data, int(*vp.UID), int(gid)); err != nil {
			return "", err
		}
	}
	v, err := StartVault(ctx, vp.Bins, VaultOptions{
		DataDir: data, StateDir: state, IP: ip, Port: podAPIPort, BackendPort: podBackendPort, ClusterPort: podClusterPort,
		NodeID: "drill", UID: vp.UID, GID: vp.GID, Config: PodConfig(config, ip, data, nil), Netns: vp.netns(0), TLS: tlsCfg,
	})
	if err != nil {
		return "", err
	}
	vp.mu.Lock()
	defer vp.mu.Unlock()
	if vp.vaults == nil {
		vp.vaults = map[string]*Vault{}
	}
	vp.vaults[pod.Name] = v
	vp.setUID(pod)
	return ip, nil
}

func (vp *VaultPods) netns(ord int) *Netns {
	if vp.Netns == nil {
		return nil
	}
	return vp.Netns(ord)
}

// stop stops the process of exactly this incarnation of the pod: a newer pod of the same
// name keeps running.
func (vp *VaultPods) stop(pod *corev1.Pod) {
	vp.mu.Lock()
	var v *Vault
	if vp.uids[pod.Name] == string(pod.UID) {
		v = vp.vaults[pod.Name]
		delete(vp.vaults, pod.Name)
		delete(vp.uids, pod.Name)
	}
	vp.mu.Unlock()
	if v != nil {
		v.Close()
	}
}

func podEnv(pod *corev1.Pod) string {
	var names []string
	for _, c := range pod.Spec.Containers {
		for _, e := range c.Env {
			names = append(names, e.Name)
		}
	}
	return strings.Join(names, " ")
}

func ordinal(pod string) int {
	i := strings.LastIndexByte(pod, '-')
	n := 0
	for _, r := range pod[i+1:] {
		if r < '0' || r > '9' {
			return 0
		}
		n = n*10 + int(r-'0')
	}
	return n
}

// LoopbackBase picks a random 127.a.b.0 network for one test's pods, so tests running
// in parallel never share an address and port.
func LoopbackBase() func(ordinal int) string {
	var b [2]byte
	_, _ = rand.Read(b[:])
	a, c := 10+int(b[0])%240, int(b[1])
	return func(i int) string { return fmt.Sprintf("127.%d.%d.%d", a, c, 10+i) }
}
