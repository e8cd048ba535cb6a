// Command demo runs the pve-vault-agent lifecycle against the local lab (make demo):
// it brings up the lab on loopback (Kubernetes control plane, an sshd node, a Vault
// with Raft storage, the fake Proxmox API), writes an agent config for it, runs the
// agent's verbs step by step with timings, and tears everything down.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout)
	stop()
	os.Exit(code)
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
	cmd.Stdout = prefixed{d.out}
	cmd.Stderr = prefixed{d.out}
	return cmd.Run()
}

type prefixed struct{ w io.Writer }

func (p prefixed) Write(b []byte) (int, error) {
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if line != "" {
			fmt.Fprint(p.w, "      | "+line)
		}
	}
	return len(b), nil
}

func run(ctx context.Context, args []string, out io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	agent := fs.String("agent", "bin/pve-vault-agent", "the built pve-vault-agent binary")
	keep := fs.Bool("keep", false, "keep the lab directory after the demo")
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
		cp    *lab.ControlPlane
		ns    *lab.Netns
		node  *lab.SSHD
		pve   *lab.PVE
		vault *lab.Vault
	)
	const tokenID, tokenSecret = "vault-agent@pve!demo", "5b0c1e2d-demo-4a7f-9e3b-0c1d2e3f4a5b"
	hostPath := filepath.Join(dir, "node1-root", "srv", "vault")
	steps := []struct {
		title string
		f     func() error
	}{
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
		{"start the fake Proxmox VE API: VM 201 running, its guest agent reporting the node address", func() (err error) {
			pve, err = lab.StartPVE(dir, tokenID, tokenSecret)
			if err == nil {
				cleanup = append(cleanup, pve.Close)
				pve.PutVM(lab.FakeVM{VMID: 201, Name: "k8s-node-1", Status: "running", Agent: true,
					Interfaces: []lab.FakeIface{{Name: "eth0", MAC: "bc:24:11:00:02:01", Addrs: []string{ns.NodeIP + "/30"}}}})
				d.say("API %s", pve.URL)
			}
			return err
		}},
		{"write the agent's configuration for the lab (node = VMID 201, data in " + hostPath + ")", func() error {
			return writeConfig(dir, hostPath, cp, node, pve, tokenID, tokenSecret)
		}},
		{"pve-vault-agent version", func() error { return d.agentCmd(ctx, "version") }},
		{"pve-vault-agent config check (validates, prints the effective config; secrets are references)", func() error {
			return d.agentCmd(ctx, "config", "check", "--config", filepath.Join(dir, "config.yaml"), "-o", "json")
		}},
		{"pve-vault-agent provision: resolve VM 201 through Proxmox, SSH in, prepare the hostPath", func() error {
			return d.agentCmd(ctx, "provision", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"pve-vault-agent provision again: nothing to do", func() error {
			return d.agentCmd(ctx, "provision", "--config", filepath.Join(dir, "config.yaml"))
		}},
		{"start Vault as uid 100 on the provisioned directory (what the chart's pod does)", func() (err error) {
			uid, gid := uint32(100), uint32(100)
			vault, err = lab.StartVault(ctx, bins, lab.VaultOptions{DataDir: hostPath, StateDir: filepath.Join(dir, "vault"), UID: &uid, GID: &gid})
			if err != nil {
				return err
			}
			cleanup = append(cleanup, vault.Close)
			resp, err := http.Get(vault.Addr + "/v1/sys/health")
			if err != nil {
				return err
			}
			resp.Body.Close()
			d.say("Vault %s runs as uid 100 with Raft data in %s; sys/health says %d (501 = ready to initialise)", vault.Addr, hostPath, resp.StatusCode)
			return nil
		}},
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

func writeConfig(dir, hostPath string, cp *lab.ControlPlane, node *lab.SSHD, pve *lab.PVE, tokenID, tokenSecret string) error {
	secretFile := filepath.Join(dir, "pve-token")
	if err := os.WriteFile(secretFile, []byte(tokenSecret+"\n"), 0o600); err != nil {
		return err
	}
	known := filepath.Join(dir, "known_hosts")
	if err := node.WriteKnownHosts(known); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`proxmox:
  url: %s
  token_id: %s
  token_secret: {file: %s}
  ca_file: %s
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
  kubeconfig: %s
snapshots:
  dir: %s
metrics:
  listen: 127.0.0.1:0
`, pve.URL, tokenID, secretFile, pve.CAFile, hostPath, node.Port, node.ClientKeyPath, known, cp.Kubeconfig, filepath.Join(dir, "snapshots"))
	return os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(cfg), 0o600)
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
