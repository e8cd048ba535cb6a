package lab

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// VaultPods runs the chart's Vault pods as real Vault processes: when the lab kubelet
// starts a pod, the Vault config the chart rendered (ConfigMap <release>-config) is read
// and started with only what cannot hold outside a pod rewritten — the listener and
// cluster addresses become the pod's loopback IP, /vault/data becomes the pod's
// hostPath, and service_registration "kubernetes" is dropped. The env the real chart
// sets (VAULT_API_ADDR, VAULT_CLUSTER_ADDR, VAULT_RAFT_NODE_ID) is set the same way.
type VaultPods struct {
	Bins     Bins
	Clients  kubernetes.Interface
	Release  string
	StateDir string
	// IP returns the loopback address of a pod (127.0.0.x), DataDir its hostPath.
	IP      func(pod *corev1.Pod) string
	DataDir func(pod *corev1.Pod) string
	// UID/GID the Vault processes run as (nil: the caller's).
	UID, GID *uint32

	mu     sync.Mutex
	vaults map[string]*Vault // pod name → process
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

var (
	listenRe  = regexp.MustCompile(`"\[::\]:(\d+)"`)
	svcRegRe  = regexp.MustCompile(`(?m)^\s*service_registration\s+"kubernetes"\s*\{\s*\}\s*$`)
	dataDirRe = regexp.MustCompile(`"/vault/data"`)
)

// PodConfig rewrites a chart-rendered Vault config for a pod running on the host.
func PodConfig(rendered, ip, dataDir string) string {
	c := listenRe.ReplaceAllString(rendered, `"`+ip+`:$1"`)
	c = dataDirRe.ReplaceAllString(c, fmt.Sprintf("%q", dataDir))
	return svcRegRe.ReplaceAllString(c, "")
}

func (vp *VaultPods) start(ctx context.Context, pod *corev1.Pod) (string, error) {
	cm, err := vp.Clients.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, vp.Release+"-config", metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read the rendered config: %w", err)
	}
	var rendered string
	for _, v := range cm.Data {
		rendered = v
	}
	ip, data := vp.IP(pod), vp.DataDir(pod)
	env := []string{"VAULT_API_ADDR=http://" + ip + ":8200", "VAULT_CLUSTER_ADDR=https://" + ip + ":8201", "HOSTNAME=" + pod.Name}
	if strings.Contains(podEnv(pod), "VAULT_RAFT_NODE_ID") {
		env = append(env, "VAULT_RAFT_NODE_ID="+pod.Name)
	}
	v, err := StartVault(ctx, vp.Bins, VaultOptions{
		DataDir: data, StateDir: filepath.Join(vp.StateDir, pod.Name+"-"+string(pod.UID)[:8]),
		IP: ip, Port: 8200, ClusterPort: 8201, NodeID: pod.Name, UID: vp.UID, GID: vp.GID,
		Config: PodConfig(rendered, ip, data), Env: env,
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
	return ip, nil
}

func (vp *VaultPods) stop(pod *corev1.Pod) {
	vp.mu.Lock()
	v := vp.vaults[pod.Name]
	delete(vp.vaults, pod.Name)
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
