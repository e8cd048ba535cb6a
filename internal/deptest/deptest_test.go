package deptest

import (
	"os/exec"
	"reflect"
	"strings"
	"testing"
)

// The real graph of this module has no forbidden edge.
func TestModuleGraph(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`, Module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	graph := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		pkg := strings.TrimPrefix(f[0], Module+"/")
		var deps []string
		for _, d := range f[1:] {
			if strings.HasPrefix(d, Module+"/") {
				deps = append(deps, strings.TrimPrefix(d, Module+"/"))
			}
		}
		graph[pkg] = deps
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

// The checker itself catches each kind of forbidden edge.
func TestViolations(t *testing.T) {
	graph := map[string][]string{
		"provision":     {"k8s"},
		"k8s":           {"agent"},
		"vault":         {"configs"},
		"vault/keyfile": {"vault"},
		"agent":         {"provision", "cmd/agent"},
		"configs":       {"provision", "vault"},
		"cmd/agent":     {"agent", "internal/lab"},
		"internal/lab":  nil,
	}
	want := []string{
		"agent imports cmd/agent: arrows point from cmd/agent to agent, not back",
		"cmd/agent imports internal/lab: the lab is for tests and the demo only",
		"configs imports vault: configs is a leaf: it may use provision's path rules and nothing above",
		"k8s imports agent: a domain package imports only the standard library and its own system's SDK",
		"provision imports k8s: a domain package imports only the standard library and its own system's SDK",
		"vault imports configs: a domain package imports only the standard library and its own system's SDK",
	}
	if got := Violations(graph); !reflect.DeepEqual(got, want) {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
