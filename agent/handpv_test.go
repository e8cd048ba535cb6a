package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// The write-up's storage: a hand-written hostPath PersistentVolume without node
// affinity and a claim bound to it, the chart installed with Helm by the operator (the
// agent's chart and values, none of its storage). Before adopt the agent trusts no pod
// on it (nothing says which node holds the data) and says why; adopt records the node
// the pod runs on, and from then on every agent process finds the pod, unseals it after
// a restart and backs it up.
func TestAdoptOnAHandWrittenHostPathVolume(t *testing.T) {
	// The operator's directory, not the configured host_path: made by hand, root's,
	// open to all (so Vault could write it).
	theirs := filepath.Join(lab.TestDataDir(t), "srv", "vault-data")
	if err := os.MkdirAll(theirs, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(theirs, 0o777); err != nil {
		t.Fatal(err)
	}
	vl := newVaultLabWith(t, labOptions{nodes: 1, noInstall: true, podData: map[int]string{0: theirs}})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	ns, release := vl.cfg.Chart.Namespace, vl.release
	pvName := "vault-data-" + ns
	size := resource.MustParse("1Gi")
	pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: pvName},
		Spec: corev1.PersistentVolumeSpec{StorageClassName: "manual", Capacity: corev1.ResourceList{corev1.ResourceStorage: size},
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}, PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
			PersistentVolumeSource: corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: theirs}}}}
	if _, err := vl.cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = vl.cs.CoreV1().PersistentVolumes().Delete(context.Background(), pvName, metav1.DeleteOptions{})
	})
	sc := "manual"
	pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: k8s.ClaimName(release, 0), Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &sc, VolumeName: pvName, AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: size}}}}
	if _, err := vl.cs.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// helm install, as the operator ran it: no StorageClass or volume of the agent's.
	is := &installState{env: vl.env, rep: &InstallReport{}}
	var steps []StepResult
	theirValues := step[installState]{"their-values", "the operator's claim template: their StorageClass", func(s *installState, _ context.Context) (string, error) {
		s.values["server"].(map[string]any)["dataStorage"].(map[string]any)["storageClass"] = sc
		// A hostPath volume without node affinity follows the pod wherever the scheduler
		// puts it: the operator keeps the pod on the node with nodeSelector.
		s.values["server"].(map[string]any)["nodeSelector"] = map[string]any{"kubernetes.io/hostname": vl.cfg.Nodes[0].Name}
		return sc, nil
	}}
	helm := []step[installState]{stepNamed(t, installSteps, "connect"), stepNamed(t, installSteps, "chart"), stepNamed(t, installSteps, "values"), theirValues, stepNamed(t, installSteps, "release")}
	if err := runSteps(ctx, vl.env, "operator-helm", helm, is, &steps); err != nil {
		t.Fatal(err)
	}
	pod := vl.pod(0)
	if err := lab.WaitFor(ctx, 90*time.Second, pod+" running", func(ctx context.Context) error {
		p, err := vl.cs.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
		if err == nil && (p.Status.Phase != corev1.PodRunning || vl.pods.Vault(pod) == nil) {
			err = errors.New(string(p.Status.Phase))
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// provision finds the directory the operator's volume names and makes it the
	// container's, tight, as it does the configured host_path.
	res, err := Provision(ctx, vl.env, ProvisionOptions{})
	if err != nil || len(res) != 1 || res[0].Prepared.Path != theirs {
		t.Fatalf("provision: %+v %v", res, err)
	}
	if fi, err := os.Stat(theirs); err != nil || fi.Mode().Perm() != 0o700 || fi.Sys().(*syscall.Stat_t).Uid != 100 || fi.Sys().(*syscall.Stat_t).Gid != 100 {
		t.Fatalf("the operator's directory after provision: %v %v", fi.Mode(), err)
	}
	cl, err := vl.env.Cluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if pods, rejected, err := cl.ServerPods(ctx, release); err != nil || len(pods) != 0 || len(rejected) != 1 || !strings.Contains(rejected[0].Reason, "hostPath with no node affinity") {
		t.Fatalf("before adopt: pods %+v rejected %+v %v", pods, rejected, err)
	}
	if _, err := Unseal(ctx, vl.env); err == nil {
		t.Fatal("unseal found a pod it cannot place")
	}

	out, _, root := handInit(t, ctx, vl.pods.Vault(pod).Addr, 3, 2, true)
	ks, err := ReadShares(operatorFile(t, t.TempDir(), "init.json", out), nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := Adopt(ctx, vl.env, AdoptOptions{Keyset: ks, AuthToken: vault.NewToken(root)}); err != nil || !rep.Adopted {
		t.Fatalf("adopt: %v\n%s", err, tail(vl.logs.String(), 30))
	}
	b, err := os.ReadFile(vl.env.volumePinsPath())
	var pins map[string]string
	if err == nil {
		err = json.Unmarshal(b, &pins)
	}
	p, _ := vl.cs.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil || pins[pod] != p.Spec.NodeName {
		t.Fatalf("recorded pins %v (%v), pod on %s", pins, err, p.Spec.NodeName)
	}

	// install over it would have to change the claim template (the agent's own
	// StorageClass for the operator's "manual"): refused before anything is applied.
	if _, err := Install(ctx, vl.env, InstallOptions{}); !errors.Is(err, ErrImmutable) || !strings.Contains(err.Error(), `volumeClaimTemplates[data].storageClassName: live "manual"`) {
		t.Fatalf("install over the operator's release: %v", err)
	}
	if _, err := vl.cs.StorageV1().StorageClasses().Get(ctx, k8s.StorageClassName(ns, release), metav1.GetOptions{}); err == nil {
		t.Fatal("the refused install applied the agent's StorageClass")
	}
	if _, err := vl.cs.CoreV1().PersistentVolumes().Get(ctx, k8s.PVName(ns, release, 0), metav1.GetOptions{}); err == nil {
		t.Fatal("the refused install applied the agent's PersistentVolume")
	}
	icl, err := vl.env.InstallCluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := icl.Release(release); err != nil || info.Revision != 1 {
		t.Fatalf("the release after the refused install: %+v %v", info, err)
	}

	// A fresh agent process (the daemon after a host reboot) reads the pins: the
	// restarted Vault is unsealed and backed up.
	env := vl.newEnv()
	defer env.Close()
	v := vl.pods.Vault(pod)
	v.Kill()
	if err := v.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := Unseal(ctx, env); err != nil || len(res) != 1 || res[0].Sealed {
		t.Fatalf("unseal after a restart: %+v %v", res, err)
	}
	if _, err := BackupNow(ctx, env, BackupOptions{}); err != nil {
		t.Fatal(err)
	}

	// The node is rebuilt: the data gone, the pod deleted; the operator's claim and
	// volume stay. recover brings it back, leaving the release as the operator installed
	// it, and prepares the volume's directory again.
	vl.pods.Vault(pod).Kill()
	if err := os.RemoveAll(theirs); err != nil {
		t.Fatal(err)
	}
	if err := vl.cs.CoreV1().Pods(ns).Delete(ctx, pod, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	rep, err := Recover(ctx, env, RecoverOptions{})
	if err != nil || !rep.Restored {
		t.Fatalf("recover on the operator's volume: %v %+v\n%s", err, rep, tail(vl.logs.String(), 30))
	}
	if sealed, _ := vl.sealed(t, pod); sealed {
		t.Fatal("sealed after recover")
	}
	if info, err := icl.Release(release); err != nil || info.Revision != 1 {
		t.Fatalf("recover changed the operator's release: %+v %v", info, err)
	}
}
