package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

type installLab struct {
	cp     *lab.ControlPlane
	cs     kubernetes.Interface
	ns     string
	dir    string
	values string
	config string
}

// baseValues turn off what collides between the tests' namespaces (cluster-scoped
// objects named after the release) and needs cluster DNS (the injector's webhook).
const baseValues = "injector: {enabled: false}\n"

// newInstallLab writes a config for one node registered in the shared control plane,
// with the real hashicorp/vault chart, a values file, and the lab kubelet running pods.
func newInstallLab(t *testing.T, ns string) *installLab {
	t.Helper()
	ns += "-" + lab.RunID() // a repeated run never meets an earlier one's objects
	cp := lab.SharedControlPlane(t)
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(rc)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	node := ns + "-node"
	if err := lab.RegisterNodes(ctx, cs, node); err != nil {
		t.Fatal(err)
	}
	k := lab.StartKubelet(cs, ns, lab.PodHooks{})
	t.Cleanup(k.Stop)
	t.Cleanup(func() {
		_ = cs.CoreV1().PersistentVolumes().Delete(context.Background(), "pva-"+ns+"-vault-0", metav1.DeleteOptions{})
	})
	chart := lab.Chart("0.34.1")
	dir := t.TempDir()
	il := &installLab{cp: cp, cs: cs, ns: ns, dir: dir, values: filepath.Join(dir, "values.yaml"), config: filepath.Join(dir, "config.yaml")}
	il.writeValues(t, baseValues+"server:\n  resources:\n    requests: {cpu: 100m, memory: 256Mi}\n")
	key := filepath.Join(dir, "id")
	os.WriteFile(key, []byte("unused"), 0o600)
	// The local volume's directory, made as provisioning would: the kubelet mounts no
	// local volume whose path is missing.
	hostPath := filepath.Join(lab.TestDataDir(t), "vault")
	os.MkdirAll(hostPath, 0o700)
	os.WriteFile(il.config, fmt.Appendf(nil, `
nodes:
  - name: %s
    address: 192.0.2.10
    host_path: %s
ssh:
  identity: {file: %s}
kubernetes:
  kubeconfig: {file: %s}
chart:
  path: %s
  namespace: %s
  values_files: [%s]
  cache_dir: %s
  timeout: 1m
`, node, hostPath, key, cp.Kubeconfig, chart, ns, il.values, filepath.Join(dir, "cache")), 0o600)
	useAgentAccounts(t, il.config, cp.Kubeconfig, cs)
	return il
}

func (il *installLab) writeValues(t *testing.T, body string) {
	t.Helper()
	if err := os.WriteFile(il.values, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

func (il *installLab) revisions(t *testing.T) int {
	t.Helper()
	secrets, err := il.cs.CoreV1().Secrets(il.ns).List(context.Background(), metav1.ListOptions{LabelSelector: "owner=helm,name=vault"})
	if err != nil {
		t.Fatal(err)
	}
	return len(secrets.Items)
}

func TestInstallVerb(t *testing.T) {
	il := newInstallLab(t, "cli-install")
	r := runBinary(t, nil, "install", "--config", il.config, "-o", "json")
	if r.code != 0 {
		t.Fatalf("exit %d\n%s", r.code, r.stderr)
	}
	var rep struct {
		Action, Namespace string
		Revision          int
		Pods              []struct{ Name, Node, Phase string }
		Volumes           []string `json:"persistent_volumes"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	if rep.Action != "installed" || rep.Revision != 1 || len(rep.Pods) != 1 || rep.Pods[0].Phase != "Running" || rep.Pods[0].Node != il.ns+"-node" || len(rep.Volumes) != 1 {
		t.Fatalf("report %+v", rep)
	}

	r = runBinary(t, nil, "install", "--config", il.config)
	if r.code != 0 || !strings.Contains(r.stdout, "unchanged: revision 1") {
		t.Fatalf("re-run: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}

	il.writeValues(t, baseValues+"server:\n  resources:\n    requests: {cpu: 200m, memory: 256Mi}\n")
	r = runBinary(t, nil, "install", "--config", il.config, "--dry-run")
	if r.code != 0 || !strings.Contains(r.stdout, "would be upgraded") || !strings.Contains(r.stdout, "changed  StatefulSet/vault") || !strings.Contains(r.stdout, "cpu: 200m") {
		t.Fatalf("dry run: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	if n := il.revisions(t); n != 1 {
		t.Fatalf("dry run made a revision: %d", n)
	}

	r = runBinary(t, nil, "install", "--config", il.config)
	if r.code != 0 || !strings.Contains(r.stdout, "upgraded: revision 2") || !strings.Contains(r.stdout, "rolled vault-0") {
		t.Fatalf("upgrade: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	pod, err := il.cs.CoreV1().Pods(il.ns).Get(context.Background(), "vault-0", metav1.GetOptions{})
	if err != nil || pod.Spec.Containers[0].Resources.Requests.Cpu().String() != "200m" || pod.Status.Phase != corev1.PodRunning {
		t.Fatalf("rolled pod %v", err)
	}
}

func TestInstallVerbErrors(t *testing.T) {
	il := newInstallLab(t, "cli-install-errors")
	il.writeValues(t, "server:\n  ha:\n    raft:\n      enabled: false\n  uid: 1000\n")
	r := runBinary(t, nil, "install", "--config", il.config)
	if r.code != 78 || !strings.Contains(r.stderr, "server.ha.raft.enabled is false, but the agent sets true") || !strings.Contains(r.stderr, "server.uid is 1000, but the agent sets 100") {
		t.Fatalf("conflict: exit %d\n%s", r.code, r.stderr)
	}
	if n := il.revisions(t); n != 0 {
		t.Fatal("a conflicting install made a release")
	}
	il.writeValues(t, baseValues)

	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"PVA_KUBERNETES_INSTALL_KUBECONFIG_FILE=" + filepath.Join(il.dir, "absent")}, "kubernetes.install_kubeconfig"},
		{[]string{"PVA_CHART_PATH=" + filepath.Join(il.dir, "no-chart")}, "chart not available"},
	} {
		r := runBinary(t, tc.env, "install", "--config", il.config)
		if r.code != 1 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%v: exit %d\n%s", tc.env, r.code, r.stderr)
		}
	}
	kc, _ := os.ReadFile(il.cp.Kubeconfig)
	dead := filepath.Join(il.dir, "dead.kubeconfig")
	os.WriteFile(dead, []byte(strings.Replace(string(kc), il.cp.Server, "https://127.0.0.1:1", 1)), 0o600)
	r = runBinary(t, []string{"PVA_KUBERNETES_INSTALL_KUBECONFIG_FILE=" + dead}, "install", "--config", il.config)
	if r.code != 1 || !strings.Contains(r.stderr, "unreachable at https://127.0.0.1:1") {
		t.Fatalf("unreachable: exit %d\n%s", r.code, r.stderr)
	}
}

// config check asks the API server what the configured accounts may do: everything
// their roles need passes; a rule taken away is named, and it fails.
func TestConfigCheckKubernetesAccess(t *testing.T) {
	il := newInstallLab(t, "cli-access")
	r := runBinary(t, nil, "config", "check", "--config", il.config)
	if r.code != 0 || !strings.Contains(r.stderr, "the operate account may do everything its role needs") || !strings.Contains(r.stderr, "the install account may do everything its role needs") {
		t.Fatalf("config check with the roles in place: %d\n%s", r.code, r.stderr)
	}
	// The administrator's roles lose "get,list pods" from operate.
	manifests := runBinary(t, nil, "rbac", "--config", il.config).stdout
	cut := strings.Replace(manifests, "  - \"\"\n  resources:\n  - pods\n  verbs:\n  - get\n  - list\n", "  - \"\"\n  resources:\n  - pods\n  verbs:\n  - create\n", 1)
	if cut == manifests {
		t.Fatal("the manifests have no get,list pods rule to take away")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := lab.ApplyYAML(ctx, il.cs, cut); err != nil {
		t.Fatal(err)
	}
	err := lab.WaitFor(ctx, 30*time.Second, "config check to see the missing rule", func(context.Context) error {
		r = runBinary(t, nil, "config", "check", "--config", il.config)
		if r.code != 1 || !strings.Contains(r.stderr, "error: the operate account may not: get,list pods (Role) (refused: get pods)") {
			return fmt.Errorf("exit %d\n%s", r.code, r.stderr)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
