// Command demo runs the pve-vault-agent lifecycle against the local lab (make demo):
// it brings up the lab on loopback (Kubernetes control plane, an sshd node, a Vault
// with Raft storage, the fake Proxmox API), writes an agent config for it, runs the
// agent's verbs step by step with timings, and tears everything down.
package main

import (
	"context"
	"encoding/json"
	"filippo.io/age"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout)
	stop()
	os.Exit(code)
}

// step is one narrated step of a demo.
type step struct {
	title string
	f     func() error
}

type demo struct {
	out   io.Writer
	agent string
	dir   string
	start time.Time
	step  int
}

func (d *demo) say(format string, a ...any) {
	fmt.Fprintf(d.out, "      "+format+"\n", a...)
}

// timed runs one narrated step.
func (d *demo) timed(title string, f func() error) error {
	d.step++
	fmt.Fprintf(d.out, "[%2d] %s\n", d.step, title)
	t0 := time.Now()
	err := f()
	if err != nil {
		fmt.Fprintf(d.out, "      FAILED after %s: %v\n", time.Since(t0).Round(time.Millisecond), err)
		return err
	}
	fmt.Fprintf(d.out, "      done in %s\n", time.Since(t0).Round(time.Millisecond))
	return nil
}

// agentCmd runs the built agent with the demo's config and shows its output.
func (d *demo) agentCmd(ctx context.Context, args ...string) error {
	fmt.Fprintf(d.out, "      $ pve-vault-agent %s\n", strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, d.agent, args...)
	var mu sync.Mutex
	cmd.Stdout = &prefixed{w: d.out, mu: &mu}
	cmd.Stderr = &prefixed{w: d.out, mu: &mu}
	return cmd.Run()
}

// agentJSON runs the agent with -o json, shows its stderr, and decodes its stdout.
func (d *demo) agentJSON(ctx context.Context, v any, args ...string) error {
	fmt.Fprintf(d.out, "      $ pve-vault-agent %s\n", strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, d.agent, args...)
	var mu sync.Mutex
	var stdout strings.Builder
	cmd.Stdout = &stdout
	cmd.Stderr = &prefixed{w: d.out, mu: &mu}
	err := cmd.Run()
	if jerr := json.Unmarshal([]byte(stdout.String()), v); jerr != nil && err == nil {
		err = fmt.Errorf("decode the agent's JSON: %w", jerr)
	}
	return err
}

// unsealedLines counts the daemon's "unsealed" log lines for pod.
func unsealedLines(log, pod string) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "msg=unsealed ") && strings.Contains(l, " pod="+pod+" ") {
			n++
		}
	}
	return n
}

// prefixed indents whole lines of a command's output; stdout and stderr share mu so
// their lines never interleave mid-line.
type prefixed struct {
	w   io.Writer
	mu  *sync.Mutex
	buf []byte
}

func (p *prefixed) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := strings.IndexByte(string(p.buf), '\n')
		if i < 0 {
			return len(b), nil
		}
		fmt.Fprint(p.w, "      | "+string(p.buf[:i+1]))
		p.buf = p.buf[i+1:]
	}
}

// syncWriter serialises writes: the narration and the background daemon's log share out.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func run(ctx context.Context, args []string, out io.Writer) int {
	printed := &lab.LogBuffer{} // everything the demo shows, scanned for secrets at the end
	out = &syncWriter{w: io.MultiWriter(out, printed)}
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	agent := fs.String("agent", "bin/pve-vault-agent", "the built pve-vault-agent binary")
	keep := fs.Bool("keep", false, "keep the lab directory after the demo")
	adopt := fs.Bool("adopt", false, "the second demo: start where the deployment write-up ends (a Vault initialised by hand on a hand-written volume) and adopt it")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	abs, err := filepath.Abs(*agent)
	if err != nil || !isExecutable(abs) {
		fmt.Fprintf(out, "demo: %s is not an executable; run `make build` first\n", *agent)
		return 2
	}
	bins, err := lab.FindBins()
	if err != nil {
		fmt.Fprintf(out, "demo: %v\n", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "pva-demo-")
	if err != nil {
		fmt.Fprintln(out, "demo:", err)
		return 1
	}
	d := &demo{out: out, agent: abs, dir: dir, start: time.Now()}
	var cleanup []func()
	defer func() {
		for i := len(cleanup) - 1; i >= 0; i-- {
			cleanup[i]()
		}
		if !*keep {
			os.RemoveAll(dir)
		} else {
			fmt.Fprintf(out, "lab directory kept: %s\n", dir)
		}
	}()

	fmt.Fprintf(out, "pve-vault-agent demo: the lab on loopback, state in %s\n\n", dir)
	var (
		cp      *lab.ControlPlane
		ns      *lab.Netns
		node    *lab.SSHD
		pve     *lab.PVE
		pods    *lab.VaultPods
		s3      *lab.S3
		mail    *lab.Mailpit
		daemon  *exec.Cmd
		rebuilt time.Time
		// manifestKey is the fingerprint init printed, as the operator wrote it down.
		manifestKey string
	)
	identity := filepath.Join(dir, "operator.agekey") // "offline": on the operator's USB stick
	cfgPath := filepath.Join(dir, "config.yaml")
	keyfile := filepath.Join(dir, "state", "unseal.cred")
	const tokenID, tokenSecret = "vault-agent@pve!demo", "5b0c1e2d-demo-4a7f-9e3b-0c1d2e3f4a5b"
	dataDir, err := lab.NewDataDir("demo")
	if err != nil {
		fmt.Fprintln(out, "demo:", err)
		return 1
	}
	defer os.RemoveAll(dataDir)
	hostPath := filepath.Join(dataDir, "node1", "vault")
	chart := lab.Chart("0.34.1")
	if _, err := os.Stat(chart); err != nil {
		fmt.Fprintf(out, "demo: the real Vault chart is missing (%v)\n", err)
		return 2
	}
	daemonLog := &lab.LogBuffer{}
	const kubeletTitle = "register the node in Kubernetes and let the lab play kubelet: pods run as real Vault processes (uid 100, data on the hostPath)"
	startKubelet := func() error {
		cs, err := kubeClient(cp.Kubeconfig)
		if err != nil {
			return err
		}
		if err := lab.RegisterNodes(ctx, cs, "k8s-node-1"); err != nil {
			return err
		}
		uid, gid := uint32(100), uint32(100)
		pods = &lab.VaultPods{Bins: bins, Clients: cs, Release: "vault", StateDir: filepath.Join(dir, "pods"), UID: &uid, GID: &gid,
			// The pod runs on the node: in its network namespace, at its address, and the
			// agent reaches it through an SSH tunnel to the node like any pod IP.
			IP:      func(int) string { return ns.NodeIP },
			Netns:   func(int) *lab.Netns { return ns },
			DataDir: func(*corev1.Pod) string { return hostPath },
			// A restore drill's pod runs on the same node, at another address there.
			DrillIP: func() string { return ns.PodIP }}
		cleanup = append(cleanup, pods.Close)
		k := lab.StartKubelet(cs, "vault", pods.Hooks())
		cleanup = append(cleanup, k.Stop)
		return nil
	}
	startDaemon := func() error {
		daemon = exec.CommandContext(ctx, d.agent, "run", "--config", filepath.Join(dir, "config.yaml"))
		var mu sync.Mutex
		daemon.Stderr = io.MultiWriter(&prefixed{w: d.out, mu: &mu}, daemonLog)
		if err := daemon.Start(); err != nil {
			return err
		}
		cleanup = append(cleanup, func() { _ = daemon.Process.Signal(os.Interrupt); _ = daemon.Wait() })
		return nil
	}
	const rebootTitle = "\"reboot\": kill -9 the pod's Vault and start it again; it comes back sealed and the daemon unseals it"
	reboot := func() error {
		v := pods.Vault("vault-0")
		if v == nil {
			return fmt.Errorf("no Vault process for pod vault-0")
		}
		if sealed, err := sealedAt(v.Addr); err != nil || sealed {
			return fmt.Errorf("vault-0 is not unsealed before the reboot (sealed %v, %v)", sealed, err)
		}
		before := unsealedLines(daemonLog.String(), "vault-0")
		v.Kill()
		if err := v.Start(ctx); err != nil {
			return err
		}
		t0 := time.Now()
		for {
			sealed, err := sealedAt(v.Addr)
			if err == nil && !sealed && unsealedLines(daemonLog.String(), "vault-0") > before {
				break
			}
			if gone, _ := v.Process().Exited(); gone {
				return fmt.Errorf("the restarted vault-0 exited:\n%s", v.Process().Tail(10))
			}
			if time.Since(t0) > 30*time.Second {
				return fmt.Errorf("vault-0 not unsealed by the daemon 30s after the restart (sealed %v, %v)", sealed, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		d.say("vault-0 came back sealed (pid %d) and the daemon's log shows it unsealed it: listening → unsealed in %s", v.Process().PID(), time.Since(t0).Round(time.Millisecond))
		return nil
	}
	setup := []step{
		{"start the Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)", func() (err error) {
			cp, err = lab.StartControlPlane(ctx, bins, filepath.Join(dir, "kube"))
			if err == nil {
				cleanup = append(cleanup, cp.Close)
				d.say("API server %s, kubeconfig %s", cp.Server, cp.Kubeconfig)
			}
			return err
		}},
		{"start the node VM: sshd on port 22 in its own network namespace", func() (err error) {
			if ns, err = lab.NewNetns(ctx, bins); err != nil {
				return err
			}
			cleanup = append(cleanup, ns.Close)
			node, err = lab.StartSSHDIn(ctx, bins, filepath.Join(dir, "node1"), ns)
			if err == nil {
				cleanup = append(cleanup, node.Close)
				d.say("node address %s, host key %s", node.Addr(), fingerprint(node))
			}
			return err
		}},
		{"start the fake Proxmox VE 9 API: VM 201 running, its guest agent reporting the node address; storage \"backup\" for snapshots; the token holds the README's role", func() (err error) {
			pve, err = lab.StartPVE(dir, tokenID, tokenSecret)
			if err == nil {
				cleanup = append(cleanup, pve.Close)
				pve.SetMajor(9)
				pve.PutStorage(lab.FakeStorage{ID: "backup", Type: "dir", Path: filepath.Join(dir, "pve-storage"), Content: "backup", Total: 64 << 30, Used: 1 << 30, Active: true})
				if err := pve.GrantREADMERole("backup"); err != nil {
					return err
				}
				pve.PutVM(lab.FakeVM{VMID: 201, Name: "k8s-node-1", Status: "running", Agent: true,
					Interfaces: []lab.FakeIface{{Name: "eth0", MAC: "bc:24:11:00:02:01", Addrs: []string{ns.NodeIP + "/30"}}}})
				d.say("API %s", pve.URL)
			}
			return err
		}},
		{"start an S3 server (SeaweedFS) for off-host copies, and make the operator's offline age key", func() (err error) {
			if s3, err = lab.StartS3(ctx, bins, filepath.Join(dir, "s3"), "vault-backups"); err != nil {
				return err
			}
			cleanup = append(cleanup, s3.Close)
			d.say("S3 endpoint %s, bucket %s", s3.Endpoint, s3.Bucket)
			return nil
		}},
		{"start a mail server (Mailpit: STARTTLS, a login) for the operator's notifications", func() (err error) {
			if mail, err = lab.NewMailpit(filepath.Join(dir, "mail"), bins, "starttls"); err == nil {
				cleanup = append(cleanup, mail.Stop)
			}
			return err
		}},
		{"write the agent's configuration for the lab (node = VMID 201, data in " + hostPath + ", the real hashicorp/vault chart 0.34.1, copies to S3, failures mailed)", func() error {
			return writeConfig(dir, hostPath, chart, cp, node, pve, s3, mail, identity, tokenID, tokenSecret)
		}},
		{"pve-vault-agent rbac: the Kubernetes accounts the agent needs (operate for the daemon, install for changing the release), applied once by the cluster's admin; the configuration takes their kubeconfigs (pve-vault-agent rbac kubeconfig)", func() error {
			return d.useAgentAccounts(ctx, cfgPath, cp.Kubeconfig)
		}},
		{"pve-vault-agent version", func() error { return d.agentCmd(ctx, "version") }},
	}
	lifecycle := []step{
		{"pve-vault-agent config check (validates, prints the effective config; secrets are references)", func() error {
			return d.agentCmd(ctx, "config", "check", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"pve-vault-agent provision: resolve VM 201 through Proxmox, SSH in, prepare the hostPath", func() error {
			return d.agentCmd(ctx, "provision", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"pve-vault-agent provision again: nothing to do", func() error {
			return d.agentCmd(ctx, "provision", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{kubeletTitle, startKubelet},
		{"pve-vault-agent install: the Vault chart via the Helm SDK, Raft on the provisioned hostPath", func() error {
			return d.agentCmd(ctx, "install", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"pve-vault-agent install again: same chart and values, no new revision", func() error {
			return d.agentCmd(ctx, "install", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"pve-vault-agent init: initialise Vault, seal the keys into the keyfile (systemd-creds), mint the snapshot and operator tokens, revoke root", func() error {
			var rep struct {
				Pod         string `json:"pod"`
				ManifestKey string `json:"manifest_key"`
			}
			if err := d.agentJSON(ctx, &rep, "init", "-o", "json", "--config", filepath.Join(dir, "config.yaml")); err != nil {
				return err
			}
			manifestKey = rep.ManifestKey
			d.say("initialised vault through pod %s", rep.Pod)
			d.say("manifest key %s: written down beside the offline age key (a host-lost recover is pinned to it)", manifestKey)
			return nil
		}},
		{"pve-vault-agent keyfile check: the keyfile decrypts; only metadata is shown", func() error {
			return d.agentCmd(ctx, "keyfile", "check", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"start the daemon (pve-vault-agent run), as the systemd service would", startDaemon},
		{rebootTitle, reboot},
		{"pve-vault-agent unseal: nothing to do, every pod is unsealed", func() error {
			return d.agentCmd(ctx, "unseal", "--config", cfgPath)
		}},
		{"write a secret (kv/demo) with a short-lived root token generated from the keyfile's shares", func() error {
			return withRoot(ctx, pods, keyfile, func(n *vault.Node, root vault.Token) error {
				_ = n.Write(ctx, root, "sys/mounts/kv", map[string]any{"type": "kv"})
				return n.Write(ctx, root, "kv/demo", map[string]any{"value": "written before the node was rebuilt"})
			})
		}},
		{"pve-vault-agent backup-now: snapshot from the active node, verified, stored with its manifest", func() error {
			return d.agentCmd(ctx, "backup-now", "--config", cfgPath)
		}},
		{"pve-vault-agent snapshots list", func() error { return d.agentCmd(ctx, "snapshots", "list", "--config", cfgPath) }},
		{"pve-vault-agent drill: restore that snapshot into a throwaway Vault pod, unseal it with the keyfile, check index and canary, delete the pod", func() error {
			return d.agentCmd(ctx, "drill", "--config", cfgPath)
		}},
		{"\"node rebuild\": Vault gone, the data directory wiped, pod and claim deleted (the PV is left Released)", func() error {
			if v := pods.Vault("vault-0"); v != nil {
				v.Kill()
			}
			if err := os.RemoveAll(hostPath); err != nil {
				return err
			}
			cs, err := kubeClient(cp.Kubeconfig)
			if err != nil {
				return err
			}
			_ = cs.CoreV1().PersistentVolumeClaims("vault").Delete(ctx, "data-vault-0", metav1.DeleteOptions{})
			if err := cs.CoreV1().Pods("vault").Delete(ctx, "vault-0", metav1.DeleteOptions{}); err != nil {
				return err
			}
			rebuilt = time.Now()
			d.say("the daemon will report vault-0 uninitialised and refuse to initialise it (see its log lines)")
			return nil
		}},
		{"pve-vault-agent recover --yes: provision → install → throwaway init → snapshot-force → unseal with the keyfile", func() error {
			var rep struct {
				Opened   string `json:"opened"`
				Restored bool   `json:"restored"`
				Steps    []struct {
					Name    string  `json:"name"`
					Result  string  `json:"result"`
					Seconds float64 `json:"seconds"`
				} `json:"steps"`
			}
			if err := d.agentJSON(ctx, &rep, "recover", "--yes", "-o", "json", "--config", cfgPath); err != nil {
				return err
			}
			for _, s := range rep.Steps {
				d.say("%-10s %6.2fs  %s", s.Name, s.Seconds, s.Result)
			}
			if rep.Opened != "throwaway-init" || !rep.Restored {
				return fmt.Errorf("recover did not restore the snapshot into an empty node (opened %q, restored %v): the act did not happen", rep.Opened, rep.Restored)
			}
			d.say("node rebuilt → unsealed with data back in %s", time.Since(rebuilt).Round(time.Millisecond))
			return nil
		}},
		{"read the secret back", func() error {
			return withRoot(ctx, pods, keyfile, func(n *vault.Node, root vault.Token) error {
				v, err := n.Read(ctx, root, "kv/demo")
				if err == nil {
					d.say("kv/demo = %q", v)
				}
				return err
			})
		}},
		{"pve-vault-agent status", func() error { return d.agentCmd(ctx, "status", "--config", cfgPath) }},
		{"\"host lost\": the node rebuilt again, and this host's state directory (keyfile, records) and snapshot directory wiped; only S3 and the operator's offline key remain", func() error {
			if v := pods.Vault("vault-0"); v != nil {
				v.Kill()
			}
			cs, err := kubeClient(cp.Kubeconfig)
			if err != nil {
				return err
			}
			_ = cs.CoreV1().PersistentVolumeClaims("vault").Delete(ctx, "data-vault-0", metav1.DeleteOptions{})
			if err := cs.CoreV1().Pods("vault").Delete(ctx, "vault-0", metav1.DeleteOptions{}); err != nil {
				return err
			}
			for _, p := range []string{hostPath, filepath.Join(dir, "state"), filepath.Join(dir, "pve-storage", "vault-snapshots")} {
				if err := os.RemoveAll(p); err != nil {
					return err
				}
			}
			rebuilt = time.Now()
			return nil
		}},
		{"pve-vault-agent recover --from s3 --identity operator.agekey --manifest-key sha256:… --yes: fetch and authenticate the newest copy and the keyfile (pinned to the manifest key init printed), seal the keyfile with this host's key, recover", func() error {
			var rep struct {
				Copy        string `json:"copy"`
				ManifestKey string `json:"manifest_key"`
				Recover     struct {
					Opened   string `json:"opened"`
					Restored bool   `json:"restored"`
				} `json:"recover"`
			}
			if err := d.agentJSON(ctx, &rep, "recover", "--from", "s3", "--identity", identity, "--manifest-key", manifestKey, "--yes", "-o", "json", "--config", cfgPath); err != nil {
				return err
			}
			if rep.Recover.Opened != "throwaway-init" || !rep.Recover.Restored {
				return fmt.Errorf("recover --from did not restore into an empty node (opened %q, restored %v)", rep.Recover.Opened, rep.Recover.Restored)
			}
			d.say("copy %s, manifest key %s; host lost → unsealed with data back in %s", rep.Copy, rep.ManifestKey, time.Since(rebuilt).Round(time.Millisecond))
			return nil
		}},
		{"read the secret back, on a host that started from nothing", func() error {
			return withRoot(ctx, pods, keyfile, func(n *vault.Node, root vault.Token) error {
				v, err := n.Read(ctx, root, "kv/demo")
				if err == nil {
					d.say("kv/demo = %q (after the host was lost)", v)
				}
				return err
			})
		}},
		{"\"off-host target down\": S3 stopped, a backup every 5 s (snapshots.schedule, systemctl reload); the daemon stores each here, the push fails, and the operator gets one mail", func() error {
			s3.Stop()
			if err := setSchedule(cfgPath, "'@every 5s'"); err != nil {
				return err
			}
			if err := daemon.Process.Signal(syscall.SIGHUP); err != nil {
				return err
			}
			m, err := waitMail(ctx, mail, "FAILING: offsite s3")
			if err != nil {
				return err
			}
			d.say("mail read back from the server:\n\nSubject: %s\n\n%s", m.Subject, strings.TrimSpace(m.Text))
			return nil
		}},
		{"S3 back: the next backup pushes what it lacks, and the recovery is mailed too", func() error {
			if err := s3.Start(ctx); err != nil {
				return err
			}
			m, err := waitMail(ctx, mail, "recovered: offsite s3")
			if err != nil {
				return err
			}
			d.say("Subject: %s", m.Subject)
			return setSchedule(cfgPath, "6h")
		}},
	}
	steps := append(setup, lifecycle...)
	if *adopt {
		steps = append(setup, d.adoption(ctx, adoptionLab{bins: bins, cp: func() *lab.ControlPlane { return cp }, pods: func() *lab.VaultPods { return pods },
			hostPath: hostPath, chart: chart, cfgPath: cfgPath, daemonLog: daemonLog, printed: printed},
			step{kubeletTitle, startKubelet}, step{"start the daemon (pve-vault-agent run), as the systemd service would", startDaemon}, step{rebootTitle, reboot})...)
	}
	for _, s := range steps {
		if err := d.timed(s.title, s.f); err != nil {
			return 1
		}
		if ctx.Err() != nil {
			fmt.Fprintln(out, "demo: interrupted")
			return 130
		}
	}
	fmt.Fprintf(out, "\ndemo finished in %s\n", time.Since(d.start).Round(time.Millisecond))
	return 0
}

// seedValues are the operator's own chart values from the deployment the product was
// designed from: resources and probes that keep a sealed pod from being restarted.
const seedValues = `global:
  enabled: true
  tlsDisable: true   # lab only
# The lab has no cluster DNS: with the injector on, the API server would resolve its
# webhook Service through the host's resolver, off loopback.
injector:
  enabled: false
server:
  resources:
    requests: {cpu: 100m, memory: 256Mi}
    limits: {cpu: 500m, memory: 512Mi}
  readinessProbe:
    enabled: true
    path: /v1/sys/health?standbyok=true&sealedcode=204&uninitcode=204
  livenessProbe:
    enabled: true
    path: /v1/sys/health?standbyok=true
    initialDelaySeconds: 60
`

func writeConfig(dir, hostPath, chartPath string, cp *lab.ControlPlane, node *lab.SSHD, pve *lab.PVE, s3 *lab.S3, mail *lab.Mailpit, identity, tokenID, tokenSecret string) error {
	id, err := age.GenerateX25519Identity()
	if err != nil {
		return err
	}
	if err := os.WriteFile(identity, []byte(id.String()+"\n"), 0o600); err != nil {
		return err
	}
	ak, sk := filepath.Join(dir, "s3-access-key"), filepath.Join(dir, "s3-secret-key")
	if err := os.WriteFile(ak, []byte(s3.AccessKey+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(sk, []byte(s3.SecretKey+"\n"), 0o600); err != nil {
		return err
	}
	valuesFile := filepath.Join(dir, "values.yaml")
	if err := os.WriteFile(valuesFile, []byte(seedValues), 0o600); err != nil {
		return err
	}
	secretFile := filepath.Join(dir, "pve-token")
	if err := os.WriteFile(secretFile, []byte(tokenSecret+"\n"), 0o600); err != nil {
		return err
	}
	known := filepath.Join(dir, "known_hosts")
	if err := node.WriteKnownHosts(known); err != nil {
		return err
	}
	mailPassword := filepath.Join(dir, "smtp-password")
	if err := os.WriteFile(mailPassword, []byte(mail.Password+"\n"), 0o600); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`proxmox:
  url: %s
  token_id: %s
  token_secret: {file: %s}
  ca_file: %s
  node: pve1
nodes:
  - name: k8s-node-1
    vmid: 201
    host_path: %s
ssh:
  user: root
  port: %d
  identity: {file: %s}
  known_hosts: %s
kubernetes:
  kubeconfig: {file: %s}
chart:
  path: %s
  values_files: [%s]
  cache_dir: %s
  timeout: 2m
snapshots:
  proxmox_storage: backup
  targets:
    - {name: s3, type: s3, endpoint: %s, bucket: %s, prefix: demo, access_key: {file: %s}, secret_key: {file: %s}, allow_http: true}
vault:
  recovery_recipient: %s
  keyfile: %s
  systemd_creds_key: host
  token_period: 1h
metrics:
  listen: 127.0.0.1:0
notify:
  token_ttl_below: 20m
  targets:
    - {name: mail, type: smtp, host: %s, port: %d, tls: starttls, ca_file: %s, username: %s, password: {file: %s}, from: pve-vault-agent@lab.test, to: [ops@lab.test]}
`, pve.URL, tokenID, secretFile, pve.CAFile, hostPath, node.Port, node.ClientKeyPath, known, cp.Kubeconfig,
		chartPath, valuesFile, filepath.Join(dir, "charts"), s3.Endpoint, s3.Bucket, ak, sk, id.Recipient().String(), filepath.Join(dir, "state", "unseal.cred"),
		mail.Host, mail.Port, mail.CAFile, mail.User, mailPassword)
	return os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(cfg), 0o600)
}

// setSchedule rewrites snapshots.schedule in the configuration (the daemon reads it on
// SIGHUP).
func setSchedule(cfgPath, schedule string) error {
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "  schedule: ") {
			continue
		}
		out = append(out, l)
		if l == "snapshots:" {
			out = append(out, "  schedule: "+schedule)
		}
	}
	return os.WriteFile(cfgPath, []byte(strings.Join(out, "\n")), 0o600)
}

// waitMail waits for a mail whose subject holds want.
func waitMail(ctx context.Context, m *lab.Mailpit, want string) (lab.Mail, error) {
	var got lab.Mail
	err := lab.WaitFor(ctx, 90*time.Second, "a mail "+want, func(ctx context.Context) error {
		ms, err := m.Messages(ctx)
		if err != nil {
			return err
		}
		for _, x := range ms {
			if strings.Contains(x.Subject, want) {
				got = x
				return nil
			}
		}
		return fmt.Errorf("%d mails, none %q", len(ms), want)
	})
	return got, err
}

// sealedAt reads sys/seal-status directly.
func sealedAt(addr string) (bool, error) {
	resp, err := http.Get(addr + "/v1/sys/seal-status")
	if err != nil {
		return true, err
	}
	defer resp.Body.Close()
	var st struct{ Sealed bool }
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return true, err
	}
	return st.Sealed, nil
}

// withRoot runs f with a root token generated from the keyfile's shares on vault-0 (the
// operator token authorising generate-root, as Vault 2.x requires) and revokes it
// after: how an operator gets a privileged token once root was revoked.
func withRoot(ctx context.Context, pods *lab.VaultPods, keyfile string, f func(*vault.Node, vault.Token) error) error {
	v := pods.Vault("vault-0")
	if v == nil {
		return fmt.Errorf("no Vault process for vault-0")
	}
	kf, err := vault.ReadKeyfile(ctx, keyfile, vault.SystemdCreds{WithKey: "host"})
	if err != nil {
		return err
	}
	n, err := vault.NewNode("vault-0", v.Addr, nil)
	if err != nil {
		return err
	}
	// Vault 2.x (the lab's gate): generate-root needs a token as well as the shares.
	root, err := n.GenerateRoot(ctx, kf.Keyset, vault.GenerateRootOptions{Auth: kf.OperatorToken})
	if err != nil {
		return err
	}
	defer n.RevokeSelf(ctx, root)
	return f(n, root)
}

// useAgentAccounts applies what `rbac` prints as the admin, writes the two accounts'
// kubeconfigs and points the configuration at them.
func (d *demo) useAgentAccounts(ctx context.Context, cfgPath, adminKubeconfig string) error {
	var manifests strings.Builder
	cmd := exec.CommandContext(ctx, d.agent, "rbac", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = &manifests, d.out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("rbac: %w", err)
	}
	cs, err := kubeClient(adminKubeconfig)
	if err != nil {
		return err
	}
	if err := lab.ApplyYAML(ctx, cs, manifests.String()); err != nil {
		return err
	}
	d.say("applied %d objects as the admin (kubectl apply -f -); the roles, rule by rule:", strings.Count(manifests.String(), "\nkind: "))
	for _, l := range strings.Split(manifests.String(), "\n") {
		if strings.HasPrefix(l, "#   ") {
			d.say("  %s", strings.TrimPrefix(l, "#   "))
		}
	}
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	body := string(b)
	for _, role := range []string{"operate", "install"} {
		var kc strings.Builder
		cmd := exec.CommandContext(ctx, d.agent, "rbac", "kubeconfig", role, "--admin-kubeconfig", adminKubeconfig, "--config", cfgPath)
		cmd.Stdout, cmd.Stderr = &kc, d.out
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("rbac kubeconfig %s: %w", role, err)
		}
		p := filepath.Join(filepath.Dir(cfgPath), role+".kubeconfig")
		if err := os.WriteFile(p, []byte(kc.String()), 0o600); err != nil {
			return err
		}
		if role == "operate" {
			body = strings.Replace(body, "  kubeconfig: {file: "+adminKubeconfig+"}\n", "  kubeconfig: {file: "+p+"}\n", 1)
		} else {
			body = strings.Replace(body, "kubernetes:\n", "kubernetes:\n  install_kubeconfig: {file: "+p+"}\n", 1)
		}
		d.say("$ pve-vault-agent rbac kubeconfig %s --admin-kubeconfig admin.kubeconfig > %s", role, p)
	}
	return os.WriteFile(cfgPath, []byte(body), 0o600)
}

func kubeClient(kubeconfig string) (kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(rc)
}

func fingerprint(s *lab.SSHD) string {
	out, err := exec.Command("ssh-keygen", "-l", "-f", filepath.Join(s.Dir, "ssh_host_ed25519_key")).Output()
	if err != nil {
		return "?"
	}
	return strings.Fields(string(out))[1]
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}
