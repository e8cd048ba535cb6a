package k8s

import (
	"errors"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// The API server's two ways of saying no, as it words them, parse into the rule that
// is missing.
func TestParseForbidden(t *testing.T) {
	for _, tc := range []struct {
		name, msg string
		want      Forbidden
	}{
		{"namespaced", `install step "storage": pods is forbidden: User "system:serviceaccount:vault:pve-vault-agent-operate" cannot list resource "pods" in API group "" in the namespace "vault"`,
			Forbidden{User: "system:serviceaccount:vault:pve-vault-agent-operate", Verb: "list", Resource: "pods", Namespace: "vault"}},
		{"cluster", `nodes "n1" is forbidden: User "u" cannot get resource "nodes" in API group "" at the cluster scope`,
			Forbidden{User: "u", Verb: "get", Resource: "nodes"}},
		{"role escalation", "helm install vault: 2 errors occurred:\n\t* roles.rbac.authorization.k8s.io \"vault-discovery-role\" is forbidden: user \"u\" (groups=[\"system:authenticated\"]) is attempting to grant RBAC permissions not currently held:\n{APIGroups:[\"\"], Resources:[\"pods\"], Verbs:[\"watch\" \"update\" \"patch\"]}\n",
			Forbidden{User: "u", Verb: "watch", Resource: "pods", Escalation: `roles.rbac.authorization.k8s.io vault-discovery-role`}},
		{"binding escalation", "clusterrolebindings.rbac.authorization.k8s.io \"vault-server-binding\" is forbidden: user \"u\" (groups=[\"a\" \"b\"]) is attempting to grant RBAC permissions not currently held:\n{APIGroups:[\"authentication.k8s.io\"], Resources:[\"tokenreviews\"], Verbs:[\"create\"]}\n",
			Forbidden{User: "u", Verb: "bind", Resource: "clusterroles", Group: "rbac.authorization.k8s.io", Escalation: `clusterrolebindings.rbac.authorization.k8s.io vault-server-binding`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := ParseForbidden(errors.New(tc.msg))
			if !ok || got != tc.want {
				t.Fatalf("got %+v %v, want %+v", got, ok, tc.want)
			}
			if !strings.Contains(got.Rule(), `resources: ["`+tc.want.Resource+`"]`) {
				t.Fatalf("rule %q", got.Rule())
			}
		})
	}
	if _, ok := ParseForbidden(errors.New("connection refused")); ok {
		t.Fatal("an unrelated error parsed as a refusal")
	}
}

// The manifests hold both accounts, each rule once, every one with its reason, and
// decode as YAML; names are narrowed where Kubernetes allows it.
func TestRBACManifests(t *testing.T) {
	spec := RBACSpec{Namespace: "vault", Release: "vault", Replicas: 3, Nodes: []string{"n1", "n2", "n3"}}
	out, err := RBACYAML(spec)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kind: ServiceAccount", "name: pve-vault-agent-operate", "name: pve-vault-agent-install", "type: kubernetes.io/service-account-token",
		"name: pve-vault-agent-operate-vault-vault", "pva-vault-vault-2", "system:auth-delegator"} {
		if !strings.Contains(out, want) {
			t.Errorf("manifests lack %q", want)
		}
	}
	for _, doc := range strings.Split(out, "\n---\n")[1:] {
		var v map[string]any
		if err := yaml.Unmarshal([]byte(doc), &v); err != nil || v["kind"] == nil {
			t.Fatalf("not a manifest: %v\n%s", err, doc)
		}
	}
	injSpec := spec
	injSpec.Injector = true
	for _, role := range []string{RoleOperate, RoleInstall} {
		seen := map[string]bool{}
		for _, r := range Rules(role, injSpec) {
			if r.Why == "" || r.Flow == "" || seen[RuleString(r)] {
				t.Errorf("%s: rule %s without a reason or flow, or twice", role, RuleString(r))
			}
			seen[RuleString(r)] = true
			for _, v := range r.Verbs {
				if (v == "create" || v == "list") && len(r.ResourceNames) > 0 {
					t.Errorf("%s: %s narrows %s to names, which Kubernetes ignores", role, RuleString(r), v)
				}
			}
		}
	}
	if inj := len(Rules(RoleInstall, RBACSpec{Namespace: "v", Release: "v", Injector: true})) - len(Rules(RoleInstall, spec)); inj <= 0 {
		t.Fatal("the injector adds no rules")
	}
}
