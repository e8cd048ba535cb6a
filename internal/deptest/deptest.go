// Package deptest keeps the package graph pointing one way:
// cmd/agent → agent → {provision, k8s, vault}, with configs a leaf beside them,
// internal/safefile a standard-library leaf anyone may use, and internal/lab reachable
// from tests only. It also keeps each package to the third-party modules it is meant to
// use: a domain package to its own system's SDK, cmd/agent to its CLI libraries. Its test
// lists the real graph with `go list` and fails on any forbidden import.
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

// leaves are the module's packages every package may import.
var leaves = []string{"internal/safefile"}

// Violations returns every forbidden edge in graph: each package of the module (path
// relative to the module) → the module's packages it imports. Sorted.
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
	for _, l := range leaves {
		if within(dep, l) {
			return ""
		}
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
	if within(pkg, "cmd/agent") && !within(dep, "agent") && !within(dep, "configs") && !within(dep, "internal") {
		return "cmd/agent wires: it imports agent, configs and internal/… only, never a domain package"
	}
	if within(pkg, "configs") && (within(dep, "agent") || within(dep, "cmd") || within(dep, "k8s") || within(dep, "vault")) {
		return "configs is a leaf: it may use provision's path rules and nothing above"
	}
	return ""
}

// thirdParty lists, per package root, the module path prefixes of the third-party
// imports it may have. A root not listed may import no third-party module.
var thirdParty = map[string][]string{
	"cmd/agent": {"github.com/spf13/cobra", "golang.org/x/term", "go.yaml.in/yaml/v3"},
	"agent":     {"github.com/prometheus/client_golang", "filippo.io/age"},
	// configs parses age recipients to validate them (a prefix proves nothing).
	"configs":   {"github.com/spf13/viper", "github.com/go-viper/mapstructure/v2", "go.yaml.in/yaml/v3", "github.com/robfig/cron/v3", "filippo.io/age"},
	"provision": {"github.com/luthermonson/go-proxmox", "golang.org/x/crypto/ssh"},
	// The election's client-go logs through logr's slog bridge.
	"k8s":   {"helm.sh/helm/v3", "k8s.io/", "sigs.k8s.io/yaml", "github.com/go-logr/logr"},
	"vault": {"github.com/hashicorp/vault/api", "filippo.io/age", "golang.org/x/sys/unix"},
	// Off-host copies speak SFTP over the SSH connection the agent dialled and S3.
	"vault/snapshot/offsite": {"filippo.io/age", "github.com/pkg/sftp", "golang.org/x/crypto/ssh", "github.com/minio/minio-go/v7"},
	// The lab and its tools run real servers through their SDKs; they ship in nothing.
	"internal/lab":      {""},
	"internal/sdnotify": {},
	// Push services through one well-kept library; mail and webhooks are the standard library.
	"internal/notify":   {"github.com/nicholas-fedor/shoutrrr"},
	"internal/safefile": {},
	"internal/deptest":  {},
}

// ThirdPartyViolations returns every direct import of a third-party module a package
// may not use: imports maps each package of the module (relative path) to its direct
// imports. Sorted.
func ThirdPartyViolations(imports map[string][]string) []string {
	var out []string
	for pkg, imps := range imports {
		allowed, ok := allowedFor(pkg)
		for _, imp := range imps {
			if isStd(imp) || strings.HasPrefix(imp, Module) {
				continue
			}
			if !ok || !hasPrefix(imp, allowed) {
				out = append(out, fmt.Sprintf("%s imports %s: not among the modules that package is meant to use", pkg, imp))
			}
		}
	}
	sort.Strings(out)
	return out
}

func allowedFor(pkg string) ([]string, bool) {
	best := ""
	for root := range thirdParty {
		if within(pkg, root) && len(root) > len(best) {
			best = root
		}
	}
	if best == "" {
		return nil, false
	}
	return thirdParty[best], true
}

func hasPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// isStd reports whether an import path is the standard library's (no dot in its first
// element).
func isStd(path string) bool {
	first, _, _ := strings.Cut(path, "/")
	return !strings.Contains(first, ".")
}
