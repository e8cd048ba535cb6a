package deptest

import (
	"os/exec"
	"reflect"
	"strings"
	"testing"
)

// goList maps each package of the module to the fields the template prints.
func goList(t *testing.T, field string) map[string][]string {
	t.Helper()
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .`+field+`}} {{.}}{{end}}`, Module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	graph := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		graph[strings.TrimPrefix(f[0], Module+"/")] = f[1:]
	}
	return graph
}

// The real graph of this module has no forbidden edge. Every direct import is checked:
// a path between two packages is made of direct edges, and the leaves import nothing.
func TestModuleGraph(t *testing.T) {
	graph := map[string][]string{}
	for pkg, deps := range goList(t, "Imports") {
		for _, d := range deps {
			if strings.HasPrefix(d, Module+"/") {
				graph[pkg] = append(graph[pkg], strings.TrimPrefix(d, Module+"/"))
			}
		}
		if _, ok := graph[pkg]; !ok {
			graph[pkg] = nil
		}
	}
	for _, must := range []string{"cmd/agent", "configs", "provision", "agent", "k8s", "vault"} {
		if _, ok := graph[must]; !ok {
			t.Errorf("package %s missing from the graph", must)
		}
	}
	if v := Violations(graph); len(v) > 0 {
		t.Fatalf("forbidden imports:\n%s", strings.Join(v, "\n"))
	}
}

// Each package imports only the third-party modules it is meant to use.
func TestThirdPartyImports(t *testing.T) {
	if v := ThirdPartyViolations(goList(t, "Imports")); len(v) > 0 {
		t.Fatalf("forbidden third-party imports:\n%s", strings.Join(v, "\n"))
	}
}

// The checker itself catches each kind of forbidden edge.
func TestViolations(t *testing.T) {
	graph := map[string][]string{
		"provision":     {"k8s"},
		"k8s":           {"agent"},
		"vault":         {"configs", "internal/safefile"},
		"vault/keyfile": {"vault"},
		"agent":         {"provision", "cmd/agent"},
		"configs":       {"provision", "vault"},
		"cmd/agent":     {"agent", "internal/lab", "vault/snapshot"},
		"internal/lab":  nil,
	}
	want := []string{
		"agent imports cmd/agent: arrows point from cmd/agent to agent, not back",
		"cmd/agent imports internal/lab: the lab is for tests and the demo only",
		"cmd/agent imports vault/snapshot: cmd/agent wires: it imports agent, configs and internal/… only, never a domain package",
		"configs imports vault: configs is a leaf: it may use provision's path rules and nothing above",
		"k8s imports agent: a domain package imports only the standard library and its own system's SDK",
		"provision imports k8s: a domain package imports only the standard library and its own system's SDK",
		"vault imports configs: a domain package imports only the standard library and its own system's SDK",
	}
	if got := Violations(graph); !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	third := ThirdPartyViolations(map[string][]string{
		"vault":     {"github.com/hashicorp/vault/api", "k8s.io/client-go/kubernetes", "fmt"},
		"cmd/agent": {"github.com/spf13/cobra", "helm.sh/helm/v3/pkg/action"},
		"provision": {"golang.org/x/crypto/ssh/knownhosts"},
	})
	wantThird := []string{
		"cmd/agent imports helm.sh/helm/v3/pkg/action: not among the modules that package is meant to use",
		"vault imports k8s.io/client-go/kubernetes: not among the modules that package is meant to use",
	}
	if !reflect.DeepEqual(third, wantThird) {
		t.Fatalf("third-party: got\n%s", strings.Join(third, "\n"))
	}
}
