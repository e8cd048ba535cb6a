// Package deptest keeps the package graph pointing one way:
// cmd/agent → agent → {provision, k8s, vault}, with configs a leaf beside them and
// internal/lab reachable from tests only. Its test lists the real graph with `go list`
// and fails on any forbidden import.
package deptest

import (
	"fmt"
	"sort"
	"strings"
)

// Module is the module path of this repository.
const Module = "github.com/pve-vault-agent/pve-vault-agent"

// domains own one outside system each and must not see each other or the layers above.
var domains = []string{"provision", "k8s", "vault"}

// Violations returns every forbidden edge in graph: each package of the module (path
// relative to the module) → the module's packages it depends on, transitively. Sorted.
func Violations(graph map[string][]string) []string {
	var out []string
	for pkg, deps := range graph {
		for _, dep := range deps {
			if why := forbidden(pkg, dep); why != "" {
				out = append(out, fmt.Sprintf("%s imports %s: %s", pkg, dep, why))
			}
		}
	}
	sort.Strings(out)
	return out
}

func within(pkg, root string) bool { return pkg == root || strings.HasPrefix(pkg, root+"/") }

func forbidden(pkg, dep string) string {
	if within(dep, "internal/lab") && !within(pkg, "internal/lab") {
		return "the lab is for tests and the demo only"
	}
	for _, d := range domains {
		if !within(pkg, d) {
			continue
		}
		if within(dep, d) {
			return ""
		}
		return "a domain package imports only the standard library and its own system's SDK"
	}
	if within(pkg, "agent") && within(dep, "cmd") {
		return "arrows point from cmd/agent to agent, not back"
	}
	if within(pkg, "configs") && (within(dep, "agent") || within(dep, "cmd") || within(dep, "k8s") || within(dep, "vault")) {
		return "configs is a leaf: it may use provision's path rules and nothing above"
	}
	return ""
}
