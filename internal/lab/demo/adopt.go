package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/k8s"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

// adoptionLab is what the adoption demo shares with the setup steps (filled in as they
// run, hence the functions).
type adoptionLab struct {
	bins      lab.Bins
	cp        func() *lab.ControlPlane
	pods      func() *lab.VaultPods
	hostPath  string
	chart     string
	cfgPath   string
	daemonLog *lab.LogBuffer
	printed   *lab.LogBuffer // all the demo printed
}

// operatorValues are the write-up's values with what it describes in words: Raft (one
// node) and the hand-written volume's StorageClass for the data claim.
const operatorValues = `
server:
  ha:
    enabled: true
    replicas: 1
    raft:
      enabled: true
      setNodeId: true
  dataStorage:
    storageClass: manual
`

// adoption is the second demo: it starts where the deployment write-up ends (the chart
// installed with Helm by the operator on a hand-written hostPath volume, `vault operator
// init` and a manual snapshot through the vault CLI) and takes that Vault over.
func (d *demo) adoption(ctx context.Context, l adoptionLab, kubelet, daemon, reboot step) []step {
	pm := filepath.Join(d.dir, "password-manager") // the operator's, off the agent's paths
	initOut, rootFile := filepath.Join(pm, "vault-init.json"), filepath.Join(pm, "root-token")
	manual := filepath.Join(pm, "vault-manual.snap")
	var stored, root string
	var shares []string
	var rebuilt time.Time
	vaultCLI := func(args ...string) (string, error) {
		v := l.pods().Vault("vault-0")
		if v == nil {
			return "", errors.New("no Vault process for pod vault-0")
		}
		shown := append([]string(nil), args...)
		for i, a := range shown {
			if slices.Contains(shares, a) {
				shown[i] = "<a share from the password manager>" // as the operator pastes it
			}
		}
		fmt.Fprintf(d.out, "      $ vault %s\n", strings.Join(shown, " "))
		cmd := exec.CommandContext(ctx, l.bins.Vault, args...)
		cmd.Env = append(os.Environ(), "VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+root)
		out, err := cmd.Output()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return string(out), err
	}
	return []step{
		{"the write-up's storage, by hand: the data directory on the node (root's, mode 0777, as guides often leave it), a hostPath PersistentVolume without node affinity, and the data claim bound to it", func() error {
			if err := os.MkdirAll(l.hostPath, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(l.hostPath, 0o777); err != nil {
				return err
			}
			cs, err := kubeClient(l.cp().Kubeconfig)
			if err != nil {
				return err
			}
			size, sc := resource.MustParse("10Gi"), "manual"
			pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "vault-data"},
				Spec: corev1.PersistentVolumeSpec{StorageClassName: sc, Capacity: corev1.ResourceList{corev1.ResourceStorage: size},
					AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}, PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
					PersistentVolumeSource: corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: l.hostPath}}}}
			if _, err := cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
				return err
			}
			pvc := &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: "data-vault-0", Namespace: "vault"},
				Spec: corev1.PersistentVolumeClaimSpec{StorageClassName: &sc, VolumeName: "vault-data", AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
					Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: size}}}}
			_, err = cs.CoreV1().PersistentVolumeClaims("vault").Create(ctx, pvc, metav1.CreateOptions{})
			return err
		}},
		kubelet,
		{"helm upgrade --install, as the operator ran it: the real chart 0.34.1 with the write-up's values (and the Raft it describes) through the Helm SDK, not the agent", func() error {
			kc, err := os.ReadFile(l.cp().Kubeconfig)
			if err != nil {
				return err
			}
			cl, err := k8s.Connect(ctx, k8s.ClusterConfig{Kubeconfig: kc, Source: "the operator's kubeconfig", Namespace: "vault"}, slog.New(slog.DiscardHandler))
			if err != nil {
				return err
			}
			ch, err := k8s.LoadChart(k8s.ChartSource{Path: l.chart})
			if err != nil {
				return err
			}
			values := map[string]any{}
			for _, y := range []string{seedValues, operatorValues} {
				var v map[string]any
				if err := yaml.Unmarshal([]byte(y), &v); err != nil {
					return err
				}
				values = mergeYAML(values, v)
			}
			res, err := cl.Install(ctx, k8s.InstallSpec{Release: "vault", Chart: ch, Values: values, Timeout: 2 * time.Minute})
			if err != nil {
				return err
			}
			d.say("release vault %s: revision %d", res.Action, res.Revision)
			return lab.WaitFor(ctx, 90*time.Second, "vault-0 running", func(context.Context) error {
				if l.pods().Vault("vault-0") == nil {
					return errors.New("no Vault process yet")
				}
				return nil
			})
		}},
		{"vault operator init -format=json through the vault CLI; the output goes to the operator's password manager", func() error {
			if err := os.MkdirAll(pm, 0o700); err != nil {
				return err
			}
			var out string
			err := lab.WaitFor(ctx, 60*time.Second, "vault-0 to answer init", func(context.Context) error {
				var err error
				out, err = vaultCLI("operator", "init", "-format=json", "-key-shares=5", "-key-threshold=3")
				return err
			})
			if err != nil {
				return err
			}
			var res struct {
				Keys []string `json:"unseal_keys_b64"`
				Root string   `json:"root_token"`
			}
			if err := json.Unmarshal([]byte(out), &res); err != nil {
				return err
			}
			root, shares = res.Root, res.Keys
			if err := os.WriteFile(initOut, []byte(out), 0o600); err != nil {
				return err
			}
			if err := os.WriteFile(rootFile, []byte(root+"\n"), 0o600); err != nil {
				return err
			}
			for _, k := range res.Keys[:3] {
				if _, err := vaultCLI("operator", "unseal", k); err != nil {
					return err
				}
			}
			d.say("5 shares, threshold 3, kept in %s; unsealed by hand with three of them", initOut)
			return nil
		}},
		{"the operator's secret and the write-up's manual backup: vault secrets enable kv, vault write kv/demo, vault operator raft snapshot save", func() error {
			if err := lab.WaitFor(ctx, 60*time.Second, "vault-0 active", func(context.Context) error {
				_, err := vaultCLI("secrets", "enable", "-path=kv", "kv")
				return err
			}); err != nil {
				return err
			}
			if _, err := vaultCLI("write", "kv/demo", "value=written by hand before the agent came"); err != nil {
				return err
			}
			_, err := vaultCLI("operator", "raft", "snapshot", "save", manual)
			return err
		}},
		{"pve-vault-agent config check: the write-up's liveness probe restarts a sealed Vault, and it says so", func() error {
			return d.agentCmd(ctx, "config", "check", "--config", l.cfgPath)
		}},
		{"pve-vault-agent provision: the directory the hand-written volume names becomes the container's (100:100, 0700)", func() error {
			return d.agentCmd(ctx, "provision", "--config", l.cfgPath)
		}},
		{"pve-vault-agent adopt --init-output … --auth-token-file … --yes: prove the shares on a snapshot in a drill pod, then the agent's tokens, the keyfile, the first backup", func() error {
			var rep struct {
				Adopted bool `json:"adopted"`
				Drill   struct {
					Passed  bool    `json:"passed"`
					Seconds float64 `json:"duration_seconds"`
				} `json:"drill"`
				Backup struct {
					Path string `json:"path"`
				} `json:"first_backup"`
			}
			t0 := time.Now()
			if err := d.agentJSON(ctx, &rep, "adopt", "--init-output", initOut, "--auth-token-file", rootFile, "--yes", "-o", "json", "--config", l.cfgPath); err != nil {
				return err
			}
			if !rep.Adopted || !rep.Drill.Passed || rep.Backup.Path == "" {
				return fmt.Errorf("adopt did not prove and back up: %+v", rep)
			}
			d.say("adopted; the proof drill took %.1fs; adopt → first verified, drilled backup in %s (%s)", rep.Drill.Seconds, time.Since(t0).Round(time.Millisecond), filepath.Base(rep.Backup.Path))
			return nil
		}},
		{"pve-vault-agent snapshots import: the manual snapshot, verified and stored as imported", func() error {
			var res []struct {
				Stored string `json:"stored"`
			}
			if err := d.agentJSON(ctx, &res, "snapshots", "import", manual, "-o", "json", "--config", l.cfgPath); err != nil {
				return err
			}
			if len(res) != 1 || res[0].Stored == "" {
				return fmt.Errorf("import stored nothing: %+v", res)
			}
			stored = res[0].Stored
			return d.agentCmd(ctx, "snapshots", "list", "--config", l.cfgPath)
		}},
		{"pve-vault-agent drill --snapshot <the import>: the keyfile's shares open it, so it is paired with their keyset", func() error {
			return d.agentCmd(ctx, "drill", "--snapshot", stored, "--config", l.cfgPath)
		}},
		daemon,
		reboot,
		{"\"node rebuild\": Vault gone, the data directory wiped, the pod deleted (the hand-written volume and its claim stay)", func() error {
			if v := l.pods().Vault("vault-0"); v != nil {
				v.Kill()
			}
			if err := os.RemoveAll(l.hostPath); err != nil {
				return err
			}
			cs, err := kubeClient(l.cp().Kubeconfig)
			if err != nil {
				return err
			}
			rebuilt = time.Now()
			return cs.CoreV1().Pods("vault").Delete(ctx, "vault-0", metav1.DeleteOptions{})
		}},
		{"pve-vault-agent recover --snapshot <the import> --auth-token-file … --yes: the release stays the operator's; the manual snapshot comes back, and the agent's tokens (which it predates) are minted with the operator's token", func() error {
			var rep struct {
				Opened   string `json:"opened"`
				Restored bool   `json:"restored"`
			}
			if err := d.agentJSON(ctx, &rep, "recover", "--snapshot", stored, "--auth-token-file", rootFile, "--yes", "-o", "json", "--config", l.cfgPath); err != nil {
				return err
			}
			if !rep.Restored {
				return fmt.Errorf("recover did not restore the import (opened %q)", rep.Opened)
			}
			d.say("node rebuilt → unsealed with the manual snapshot's data in %s", time.Since(rebuilt).Round(time.Millisecond))
			return nil
		}},
		{"read the operator's secret back", func() error {
			v := l.pods().Vault("vault-0")
			if v == nil {
				return errors.New("no Vault process for pod vault-0")
			}
			n, err := vault.NewNode("vault-0", v.Addr, nil)
			if err != nil {
				return err
			}
			got, err := n.Read(ctx, vault.NewToken(root), "kv/demo")
			if err == nil {
				d.say("kv/demo = %q (from the manual snapshot)", got)
			}
			return err
		}},
		{"pve-vault-agent status", func() error { return d.agentCmd(ctx, "status", "--config", l.cfgPath) }},
		{"nothing printed above (the agent's output, the daemon's log, the operator's commands) holds a share or the root token", func() error {
			all := l.printed.String() + l.daemonLog.String()
			for i, s := range append([]string{root}, shares...) {
				if s != "" && strings.Contains(all, s) {
					return fmt.Errorf("secret #%d of the init output was printed", i)
				}
			}
			d.say("scanned %d bytes: none of the 5 shares and not the root token", len(all))
			return nil
		}},
	}
}

// mergeYAML merges src over dst (maps recursively), as Helm merges values files.
func mergeYAML(dst, src map[string]any) map[string]any {
	for k, v := range src {
		if m, ok := v.(map[string]any); ok {
			if d, ok := dst[k].(map[string]any); ok {
				dst[k] = mergeYAML(d, m)
				continue
			}
		}
		dst[k] = v
	}
	return dst
}
