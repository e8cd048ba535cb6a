package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

// The whole lifecycle end to end with the built binary, exactly as `make demo` runs it:
// provision, install, init, reboot unsealed by the daemon, a secret, backup-now, a
// restore drill, node
// rebuild, recover, the secret back, nothing in status needing attention.
func TestDemoLifecycle(t *testing.T) {
	out := runDemo(t)
	for _, want := range []string{
		"state=created", "unchanged",
		"release vault in namespace vault installed: revision 1",
		"initialised vault through pod vault-0",
		"came back sealed", "the daemon's log shows it unsealed it",
		"drill PASSED in ",
		`kv/demo = "written before the node was rebuilt"`,
		"node rebuilt → unsealed with data back",
		"host lost → unsealed with data back",
		`kv/demo = "written before the node was rebuilt" (after the host was lost)`,
		// The lab runs Vault's listener without TLS: status warns about it, and nothing
		// needs attention.
		"nothing needs attention; ",
		// The last act: S3 down, the failure mailed and read back, the recovery mailed.
		"mail read back from the server", "Subject: [pve-vault-agent pve1] FAILING: offsite s3",
		"the push to off-host target s3 failed", "Subject: [pve-vault-agent pve1] recovered: offsite s3",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	if strings.Contains(out.String(), "FAILED") {
		t.Errorf("a demo step failed:\n%s", out.String())
	}
	if i := strings.Index(out.String(), "mail read back from the server"); i >= 0 {
		t.Logf("the mail act:\n%s", out.String()[i:min(len(out.String()), i+1200)])
	}
}

// The second demo, as `make demo-adopt` runs it: the write-up's Vault (hand-written
// volume, the operator's Helm install, vault operator init, a manual snapshot) adopted,
// the manual snapshot imported, drilled, and recovered from after a node rebuild.
func TestDemoAdopt(t *testing.T) {
	out := runDemo(t, "-adopt")
	for _, want := range []string{
		"release vault installed: revision 1",
		"unsealed by hand with three of them",
		"warning: ", "fails while Vault is sealed",
		"adopted; the proof drill took",
		"imported, not drilled",
		"drill PASSED in ",
		"the daemon's log shows it unsealed it",
		"node rebuilt → unsealed with the manual snapshot's data",
		`kv/demo = "written by hand before the agent came" (from the manual snapshot)`,
		"none of the 5 shares and not the root token",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	for _, l := range strings.Split(out.String(), "\n") {
		if strings.Contains(l, "adopted; ") || strings.Contains(l, " → ") {
			t.Log(strings.TrimSpace(l))
		}
	}
	if strings.Contains(out.String(), "FAILED") {
		t.Errorf("a demo step failed:\n%s", out.String())
	}
}

// runDemo builds the agent and runs the demo with args exactly as make does (from the
// repository root, where it finds the test chart), and returns what it printed.
func runDemo(t *testing.T, args ...string) *bytes.Buffer {
	t.Helper()
	lab.Need(t)
	bin := filepath.Join(t.TempDir(), "pve-vault-agent")
	build := exec.Command("go", "build", "-o", bin, "../../../cmd/agent")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	wd, _ := os.Getwd()
	if err := os.Chdir("../../.."); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chdir(wd) })
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if code := run(ctx, append([]string{"-agent", bin}, args...), &out); code != 0 {
		t.Fatalf("demo exit %d:\n%s", code, out.String())
	}
	return &out
}
