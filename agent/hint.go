package agent

import (
	"errors"
	"fmt"

	"github.com/pve-vault-agent/pve-vault-agent/k8s"
)

// hinted is an error with what the operator should do about it, kept apart from the
// message so the CLI prints it on its own "hint:" line.
type hinted struct {
	err  error
	hint string
}

func (h *hinted) Error() string { return h.err.Error() }
func (h *hinted) Unwrap() error { return h.err }
func (h *hinted) Hint() string  { return h.hint }

// withHint attaches a hint to err (nil stays nil).
func withHint(err error, format string, a ...any) error {
	if err == nil {
		return nil
	}
	return &hinted{err: err, hint: fmt.Sprintf(format, a...)}
}

// hintf is a new error with a hint.
func hintf(hint, format string, a ...any) error {
	return &hinted{err: fmt.Errorf(format, a...), hint: hint}
}

// Hints collects the hints anywhere in err's chain (any error with a Hint() string
// method, whichever package made it), outermost first, without repeats.
func Hints(err error) []string {
	var out []string
	seen := map[string]bool{}
	var walk func(error)
	walk = func(e error) {
		if e == nil {
			return
		}
		if h, ok := e.(interface{ Hint() string }); ok {
			if s := h.Hint(); s != "" && !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
		}
		switch u := e.(type) {
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		case interface{ Unwrap() []error }:
			for _, x := range u.Unwrap() {
				walk(x)
			}
		}
	}
	walk(err)
	if h := forbiddenHint(err); h != "" && !seen[h] {
		out = append(out, h)
	}
	return out
}

// forbiddenHint explains a refusal of the Kubernetes API server's authorizer: which
// account, which rule it lacks, and in which of the agent's roles that rule belongs.
func forbiddenHint(err error) string {
	f, ok := k8s.ParseForbidden(err)
	if !ok {
		return ""
	}
	where := "neither of the agent's roles has it: is the account bound to the roles `pve-vault-agent rbac` prints?"
	for _, role := range []string{k8s.RoleOperate, k8s.RoleInstall} {
		for _, r := range k8s.Rules(role, k8s.RBACSpec{Namespace: f.Namespace, Replicas: 1, Lease: "any", HelmRelease: "any"}) {
			if contains(r.APIGroups, f.Group) && contains(r.Resources, f.Resource) && contains(r.Verbs, f.Verb) {
				f.InClusterRole = r.Cluster && f.Namespace != ""
				where = fmt.Sprintf("the %s role has it (%s): apply the roles `pve-vault-agent rbac` prints, or use the %s account's kubeconfig", role, k8s.RuleString(r), role)
				return "Kubernetes refused: " + f.Rule() + "; " + where
			}
		}
	}
	return "Kubernetes refused: " + f.Rule() + "; " + where
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// is reports errors.Is for any of targets.
func isAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

// Refused reports whether err is a refusal made before anything was changed: the CLI
// says so, so the operator knows a re-run after the fix starts from a clean state.
func Refused(err error) bool {
	return isAny(err, ErrUnknownKeyset, ErrNoSnapshot, ErrBusy, ErrInitKeyfileExists, ErrInitInitialised)
}
