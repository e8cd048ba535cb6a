package k8s

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"sort"
	"strings"

	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/yaml"
)

// The agent's two Kubernetes roles. The daemon and the verbs that only read and drill
// (unseal, backup-now, status, drill, snapshots) hold operate; the verbs that change the
// release (install, upgrade, recover, restore) hold install too. Each is a
// ServiceAccount in the release's namespace with a Role there and a ClusterRole for the
// cluster-scoped objects, every rule there because a flow needs it (Why, Flow) and
// narrowed to the objects' names wherever Kubernetes allows (get, patch, delete, bind;
// never create or list).
const (
	RoleOperate = "operate"
	RoleInstall = "install"
)

// Rule is one RBAC rule of a role, with the reason it exists and a flow that fails
// without it (the minimality test removes each and runs that flow).
type Rule struct {
	Cluster bool // a ClusterRole rule (cluster-scoped objects), else the namespace's Role
	rbacv1.PolicyRule
	Why  string
	Flow string // "unseal", "drill", "lead", "install", "reclaim"
}

// RBACSpec names what the roles are for.
type RBACSpec struct {
	Namespace string
	Release   string
	// Replicas is the number of Vault pods (one PersistentVolume each).
	Replicas int
	// Nodes are the Kubernetes node names of the configured node VMs.
	Nodes []string
	// Injector: the chart's agent injector is enabled (its Deployment, webhook and
	// cluster role are the release's too).
	Injector bool
	// Lease is the Lease the agents of a Proxmox cluster elect their leader with (empty:
	// one agent, no election).
	Lease string
	// HelmRelease is the name of the Flux HelmRelease that owns the release (empty: not
	// managed by Flux). It may live in another namespace (flux-system): its rules are
	// cluster rules narrowed to that name.
	HelmRelease string
}

func rule(cluster bool, groups, resources, names, verbs []string, flow, why string) Rule {
	return Rule{Cluster: cluster, PolicyRule: rbacv1.PolicyRule{APIGroups: groups, Resources: resources, ResourceNames: names, Verbs: verbs}, Flow: flow, Why: why}
}

var (
	core   = []string{""}
	apps   = []string{"apps"}
	netw   = []string{"networking.k8s.io"}
	rbac   = []string{"rbac.authorization.k8s.io"}
	policy = []string{"policy"}
	flux   = []string{"helm.toolkit.fluxcd.io"}
)

// Rules are a role's rules for spec.
func Rules(role string, spec RBACSpec) []Rule {
	var pvs, claims []string
	for i := 0; i < spec.Replicas; i++ {
		pvs = append(pvs, PVName(spec.Namespace, spec.Release, i))
		claims = append(claims, ClaimName(spec.Release, i))
	}
	sts := []string{spec.Release}
	if role == RoleOperate {
		out := []Rule{
			rule(false, apps, []string{"statefulsets"}, sts, []string{"get"}, "unseal", "the release's StatefulSet: its UID proves a pod is the release's, its replicas which ordinals count; a drill runs its image"),
			rule(false, core, []string{"pods"}, nil, []string{"get", "list"}, "unseal", "find the Vault server pods (and a drill's pod)"),
			rule(false, core, []string{"persistentvolumeclaims"}, claims, []string{"get"}, "unseal", "which PersistentVolume each pod's claim is bound to"),
			rule(true, core, []string{"persistentvolumes"}, nil, []string{"get"}, "unseal", "the node a pod's volume pins it to; every name, because the claim may be bound to a volume the operator wrote (PersistentVolumes hold no secrets)"),
			rule(false, core, []string{"pods"}, nil, []string{"create", "delete"}, "drill", "the restore drill's throwaway pod"),
			rule(false, core, []string{"configmaps"}, nil, []string{"create", "list", "delete"}, "drill", "the drill's Vault config; list finds what a killed drill left"),
			rule(false, core, []string{"secrets"}, nil, []string{"create", "delete"}, "drill", "the drill's one-off TLS pair (never read: no get or list)"),
			rule(false, netw, []string{"networkpolicies"}, nil, []string{"create", "list", "delete"}, "drill", "the drill pod's NetworkPolicy (no egress, ingress from the nodes only)"),
			rule(true, core, []string{"nodes"}, spec.Nodes, []string{"get"}, "drill", "the nodes' addresses the drill pod admits"),
			rule(true, []string{"scheduling.k8s.io"}, []string{"priorityclasses"}, []string{DrillPriorityClass}, []string{"get"}, "drill", "the drill pod's lowest priority (install creates the class)"),
		}
		if spec.Lease != "" {
			coord := []string{"coordination.k8s.io"}
			out = append(out,
				rule(false, coord, []string{"leases"}, []string{spec.Lease}, []string{"get", "update"}, "lead", "hold and renew the leadership Lease of the agents on the Proxmox hosts"),
				rule(false, coord, []string{"leases"}, nil, []string{"create"}, "lead", "the first agent creates the Lease (create cannot be narrowed to a name)"))
		}
		if spec.HelmRelease != "" {
			out = append(out, rule(true, flux, []string{"helmreleases"}, []string{spec.HelmRelease}, []string{"get"}, "flux", "the Flux HelmRelease's Ready and suspend, for status and before a recover or restore"))
		}
		return out
	}
	sc := []string{StorageClassName(spec.Namespace, spec.Release)}
	managed := []string{"get", "create", "patch", "delete"}
	out := []Rule{
		rule(false, core, []string{"secrets"}, nil, []string{"get", "list", "create", "update", "delete"}, "install", "Helm keeps the release's history in Secrets of its namespace"),
		rule(false, core, []string{"configmaps", "services", "serviceaccounts"}, nil, managed, "install", "the chart's ConfigMap, Services and ServiceAccount"),
		rule(false, apps, []string{"statefulsets"}, nil, append(managed, "list"), "install", "the chart's StatefulSet; list finds a Vault of another release in the namespace (install refuses to build a second one)"),
		rule(false, policy, []string{"poddisruptionbudgets"}, nil, managed, "install", "the chart's PodDisruptionBudget (HA)"),
		rule(false, rbac, []string{"roles", "rolebindings"}, nil, managed, "install", "the chart's service-discovery Role and its binding"),
		rule(false, core, []string{"pods"}, nil, []string{"get", "list", "watch", "update", "patch", "delete"}, "install",
			"wait for and roll the pods; watch, update and patch only because the chart's discovery Role grants them, and RBAC lets the installer grant only what it holds"),
		rule(false, core, []string{"persistentvolumeclaims"}, claims, []string{"patch"}, "reclaim", "have the binder give a claim recreated after a rebuild its Released volume now, not at its periodic resync (get comes with the operate role)"),
		rule(true, []string{"storage.k8s.io"}, []string{"storageclasses"}, nil, []string{"create"}, "install", "the release's no-provisioner StorageClass (create cannot be narrowed to a name)"),
		rule(true, []string{"storage.k8s.io"}, []string{"storageclasses"}, sc, []string{"get", "patch"}, "install", "apply the release's StorageClass"),
		rule(true, core, []string{"persistentvolumes"}, nil, []string{"create"}, "install", "one local PersistentVolume per node (create cannot be narrowed to a name)"),
		rule(true, core, []string{"persistentvolumes"}, pvs, []string{"get", "patch"}, "install", "apply the release's volumes, hand a Released one back"),
		rule(true, core, []string{"nodes"}, nil, []string{"list"}, "install", "count the schedulable nodes (the chart's pod anti-affinity)"),
		rule(true, rbac, []string{"clusterrolebindings"}, nil, []string{"create"}, "install", "the chart's auth-delegator binding (create cannot be narrowed to a name)"),
		rule(true, rbac, []string{"clusterrolebindings"}, []string{spec.Release + "-server-binding"}, []string{"get", "patch", "delete"}, "install", "the chart's auth-delegator binding"),
		rule(true, rbac, []string{"clusterroles"}, []string{"system:auth-delegator"}, []string{"bind"}, "install", "bind the chart's ServiceAccount to system:auth-delegator (Vault's Kubernetes auth) without holding its rights"),
		rule(true, []string{"scheduling.k8s.io"}, []string{"priorityclasses"}, nil, []string{"create"}, "install", "the drill's PriorityClass, made once so the operate role only reads it"),
	}
	if spec.HelmRelease != "" {
		out = append(out, rule(true, flux, []string{"helmreleases"}, []string{spec.HelmRelease}, []string{"patch"}, "flux", "recover and restore suspend the Flux HelmRelease while they restore Vault's data, then resume it (spec.suspend, as flux suspend/resume do)"))
	}
	if spec.Injector {
		inj := spec.Release + "-agent-injector"
		out = append(out,
			rule(false, apps, []string{"deployments"}, nil, managed, "install", "the chart's agent injector Deployment"),
			rule(true, []string{"admissionregistration.k8s.io"}, []string{"mutatingwebhookconfigurations"}, nil, []string{"create", "get", "list", "watch", "patch"}, "install",
				"the injector's webhook; on every webhook configuration because the injector's ClusterRole grants get, list, watch and patch on all of them, and RBAC lets the installer grant only what it holds"),
			rule(true, []string{"admissionregistration.k8s.io"}, []string{"mutatingwebhookconfigurations"}, []string{inj + "-cfg"}, []string{"delete"}, "install", "the injector's webhook"),
			rule(true, rbac, []string{"clusterroles", "clusterrolebindings"}, nil, []string{"create"}, "install", "the injector's ClusterRole and binding"),
			rule(true, rbac, []string{"clusterroles"}, []string{inj + "-clusterrole"}, []string{"get", "patch", "delete", "bind"}, "install", "the injector's ClusterRole"),
			rule(true, rbac, []string{"clusterrolebindings"}, []string{inj + "-binding"}, []string{"get", "patch", "delete"}, "install", "the injector's binding"),
		)
	}
	return out
}

// ServiceAccountName is the account of a role.
func ServiceAccountName(role string) string { return "pve-vault-agent-" + role }

// TokenSecretName is the long-lived token Secret of a role's account.
func TokenSecretName(role string) string { return ServiceAccountName(role) + "-token" }

// ClusterRoleName is the ClusterRole of a role for one release (several releases, in
// several namespaces, each have their own).
func ClusterRoleName(role, namespace, release string) string {
	return fmt.Sprintf("pve-vault-agent-%s-%s-%s", role, namespace, release)
}

// RBACObjects are the manifests an administrator applies once: the namespace, per role a
// ServiceAccount with a kubernetes.io/service-account-token Secret (a token that does
// not expire: the agent on a host has no way to renew a bound one before it does, and
// revoking it is deleting the Secret), a Role and RoleBinding in the namespace, and a
// ClusterRole and ClusterRoleBinding for the cluster-scoped objects. The install account
// is bound to the operate rules too.
func RBACObjects(spec RBACSpec) []runtime.Object {
	return RBACObjectsWith(spec, map[string][]Rule{RoleOperate: Rules(RoleOperate, spec), RoleInstall: Rules(RoleInstall, spec)})
}

// RBACObjectsWith is RBACObjects with the given rules per role (a test takes one away).
func RBACObjectsWith(spec RBACSpec, rules map[string][]Rule) []runtime.Object {
	ns := spec.Namespace
	labels := map[string]string{"app.kubernetes.io/managed-by": FieldManager, "app.kubernetes.io/instance": spec.Release}
	objs := []runtime.Object{&corev1.Namespace{TypeMeta: typeMeta("v1", "Namespace"), ObjectMeta: metav1.ObjectMeta{Name: ns}}}
	for _, role := range []string{RoleOperate, RoleInstall} {
		sa := ServiceAccountName(role)
		meta := metav1.ObjectMeta{Name: sa, Namespace: ns, Labels: labels}
		objs = append(objs,
			&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: meta},
			&corev1.Secret{TypeMeta: typeMeta("v1", "Secret"), Type: corev1.SecretTypeServiceAccountToken,
				ObjectMeta: metav1.ObjectMeta{Name: TokenSecretName(role), Namespace: ns, Labels: labels, Annotations: map[string]string{corev1.ServiceAccountNameKey: sa}}})
		subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: ns}}
		roles := []string{role}
		if role == RoleInstall {
			roles = []string{RoleOperate, RoleInstall}
		}
		var nsRules, clusterRules []rbacv1.PolicyRule
		for _, r := range roles {
			for _, ru := range rules[r] {
				if ru.Cluster {
					clusterRules = append(clusterRules, ru.PolicyRule)
				} else {
					nsRules = append(nsRules, ru.PolicyRule)
				}
			}
		}
		objs = append(objs,
			&rbacv1.Role{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "Role"), ObjectMeta: meta, Rules: nsRules},
			&rbacv1.RoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "RoleBinding"), ObjectMeta: meta, Subjects: subject,
				RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: sa}})
		cr := ClusterRoleName(role, ns, spec.Release)
		objs = append(objs,
			&rbacv1.ClusterRole{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRole"), ObjectMeta: metav1.ObjectMeta{Name: cr, Labels: labels}, Rules: clusterRules},
			&rbacv1.ClusterRoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), ObjectMeta: metav1.ObjectMeta{Name: cr, Labels: labels}, Subjects: subject,
				RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: cr}})
	}
	return objs
}

func typeMeta(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}

// RBACYAML renders the objects as one YAML stream, with each rule's reason beside it.
func RBACYAML(spec RBACSpec) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "# pve-vault-agent's Kubernetes access for release %s in namespace %s.\n# Apply as a cluster administrator: kubectl apply -f -\n", spec.Release, spec.Namespace)
	for _, role := range []string{RoleOperate, RoleInstall} {
		fmt.Fprintf(&b, "#\n# %s role, why each rule is there:\n", role)
		for _, r := range Rules(role, spec) {
			fmt.Fprintf(&b, "#   %s: %s\n", RuleString(r), r.Why)
		}
	}
	for _, o := range RBACObjects(spec) {
		y, err := yaml.Marshal(o)
		if err != nil {
			return "", err
		}
		b.WriteString("---\n")
		b.Write(cleanYAML(y))
	}
	return b.String(), nil
}

// cleanYAML drops the empty status and creationTimestamp fields the API types marshal.
func cleanYAML(y []byte) []byte {
	var out []string
	for _, l := range strings.Split(string(y), "\n") {
		t := strings.TrimSpace(l)
		if t == "creationTimestamp: null" || t == "status: {}" {
			continue
		}
		out = append(out, l)
	}
	return []byte(strings.Join(out, "\n"))
}

// RuleString is a rule in one line: verbs on resources (.group) [names], in which scope.
func RuleString(r Rule) string {
	var res []string
	for _, g := range r.APIGroups {
		for _, x := range r.Resources {
			if g != "" {
				x += "." + g
			}
			res = append(res, x)
		}
	}
	s := strings.Join(r.Verbs, ",") + " " + strings.Join(res, ",")
	if len(r.ResourceNames) > 0 {
		s += " " + fmt.Sprint(r.ResourceNames)
	}
	if r.Cluster {
		return s + " (ClusterRole)"
	}
	return s + " (Role)"
}

// forbiddenRe parses the API server's refusal (staging/.../authorizer: "<resource>
// \"<name>\" is forbidden: User \"<user>\" cannot <verb> resource \"<resource>\" in API
// group \"<group>\" [in the namespace \"<ns>\"|at the cluster scope]").
var forbiddenRe = regexp.MustCompile(`User "([^"]*)" cannot (\S+) resource "([^"]+)" in API group "([^"]*)"(?: in the namespace "([^"]*)")?`)

// escalationRe parses RBAC's escalation check (pkg/registry/rbac/validation: a role or
// binding that grants what its creator does not hold): "<kind> \"<name>\" is forbidden:
// user \"<user>\" (groups=…) is attempting to grant RBAC permissions not currently held:
// {APIGroups:[…], Resources:[…], Verbs:[…]}…".
var escalationRe = regexp.MustCompile(`(\S+) "([^"]+)" is forbidden: user "([^"]*)" .*?is attempting to grant RBAC permissions not currently held:\s*\{APIGroups:\["([^"]*)"[^\]]*\], Resources:\["([^"]+)"[^\]]*\], Verbs:\["([^"]+)"`)

// Forbidden is a refusal of the API server's authorizer, parsed: the rule the account
// lacks. An escalation (a role or binding of the chart granting what the account does
// not hold) lacks what the role grants, or for a binding `bind` on the role it names.
type Forbidden struct {
	User, Verb, Resource, Group, Namespace string
	// Escalation names the chart's object that would have granted more than the account
	// holds.
	Escalation string
	// InClusterRole: the rule for this namespaced resource is a cluster rule of the
	// agent's roles (an object of another namespace, such as Flux's HelmRelease).
	InClusterRole bool
}

// ParseForbidden finds an RBAC refusal in an error's text (Helm wraps the API server's
// errors in its own text, so the type is not always there).
func ParseForbidden(err error) (Forbidden, bool) {
	if err == nil {
		return Forbidden{}, false
	}
	if m := escalationRe.FindStringSubmatch(err.Error()); m != nil {
		f := Forbidden{User: m[3], Escalation: m[1] + " " + m[2], Group: m[4], Resource: m[5], Verb: m[6]}
		switch kind, _, _ := strings.Cut(m[1], "."); kind {
		case "clusterrolebindings":
			f.Group, f.Resource, f.Verb = "rbac.authorization.k8s.io", "clusterroles", "bind"
		case "rolebindings":
			f.Group, f.Resource, f.Verb = "rbac.authorization.k8s.io", "roles", "bind"
		}
		return f, true
	}
	m := forbiddenRe.FindStringSubmatch(err.Error())
	if m == nil {
		return Forbidden{}, false
	}
	return Forbidden{User: m[1], Verb: m[2], Resource: m[3], Group: m[4], Namespace: m[5]}, true
}

// Rule is the RBAC rule the refusal asks for, as a manifest line.
func (f Forbidden) Rule() string {
	scope := "the ClusterRole (a cluster-scoped object)"
	switch {
	case f.InClusterRole:
		scope = "the ClusterRole (narrowed to the object's name: it lives in namespace " + f.Namespace + ")"
	case f.Namespace != "":
		scope = "the Role in namespace " + f.Namespace
	}
	resource, sub, _ := strings.Cut(f.Resource, "/")
	if sub != "" {
		resource += "/" + sub
	}
	if f.Escalation != "" {
		return fmt.Sprintf("%s may not grant what it does not hold (the chart's %s): it needs {apiGroups: [%q], resources: [%q], verbs: [%q]}", f.User, f.Escalation, f.Group, resource, f.Verb)
	}
	return fmt.Sprintf("%s needs {apiGroups: [%q], resources: [%q], verbs: [%q]} in %s", f.User, f.Group, resource, f.Verb, scope)
}

// CheckAccess asks the API server (SelfSubjectAccessReview, which any authenticated
// account may) whether this connection may do what each rule says, and returns the
// rules it may not, each with the first refused verb.
func (c *Cluster) CheckAccess(ctx context.Context, rules []Rule) ([]string, error) {
	var missing []string
	for _, r := range rules {
		ns := c.cfg.Namespace
		if r.Cluster {
			ns = ""
		}
		names := r.ResourceNames
		if len(names) == 0 {
			names = []string{""}
		}
	check:
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					for _, n := range names {
						rev, err := c.Clients.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authzv1.SelfSubjectAccessReview{Spec: authzv1.SelfSubjectAccessReviewSpec{
							ResourceAttributes: &authzv1.ResourceAttributes{Namespace: ns, Verb: v, Group: g, Resource: res, Name: n}}}, metav1.CreateOptions{})
						if err != nil {
							return missing, fmt.Errorf("ask the API server what this account may do: %w", err)
						}
						if !rev.Status.Allowed {
							missing = append(missing, fmt.Sprintf("%s (refused: %s %s%s): %s", RuleString(r), v, res, nameSuffix(n), r.Why))
							break check
						}
					}
				}
			}
		}
	}
	sort.Strings(missing)
	return missing, nil
}

func nameSuffix(n string) string {
	if n == "" {
		return ""
	}
	return " " + n
}

// ServiceAccountKubeconfig builds a kubeconfig for a role's account from its token
// Secret, read with an administrator's kubeconfig (whose server and CA it keeps).
func ServiceAccountKubeconfig(ctx context.Context, admin []byte, kcontext, namespace, role string) ([]byte, error) {
	c, err := Connect(ctx, ClusterConfig{Kubeconfig: admin, Source: "the administrator's kubeconfig", Context: kcontext, Namespace: namespace}, discardLogger())
	if err != nil {
		return nil, err
	}
	name := TokenSecretName(role)
	sec, err := c.Clients.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("read the %s account's token (Secret %s/%s; apply `pve-vault-agent rbac` first): %w", role, namespace, name, err)
	}
	token := sec.Data[corev1.ServiceAccountTokenKey]
	if len(token) == 0 {
		return nil, fmt.Errorf("Secret %s/%s holds no token yet: the token controller fills it in a moment after it is created; try again", namespace, name)
	}
	ca := sec.Data[corev1.ServiceAccountRootCAKey]
	if len(ca) == 0 {
		ca = c.rest.CAData
	}
	user := ServiceAccountName(role)
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["cluster"] = &clientcmdapi.Cluster{Server: c.rest.Host, CertificateAuthorityData: ca}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: string(token)}
	cfg.Contexts[user] = &clientcmdapi.Context{Cluster: "cluster", AuthInfo: user, Namespace: namespace}
	cfg.CurrentContext = user
	return clientcmd.Write(*cfg)
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
