package k8s

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The objects of a restore drill carry DrillLabel (the drill's id) and DrillReleaseLabel;
// none carries the chart's labels, so no selector of the release (StatefulSet, Services,
// ServerPods) ever matches them.
const (
	DrillLabel        = "pva.io/drill"
	DrillReleaseLabel = "pva.io/release"
	// DrillPriorityClass ranks drill pods below every workload (value -100, never
	// preempting): a drill yields, production pods do not.
	DrillPriorityClass = "pve-vault-agent-drill"
	// Where the drill pod finds its config, TLS pair and (empty) data directory.
	DrillConfigDir = "/vault/drill/config"
	DrillTLSDir    = "/vault/drill/tls"
	DrillDataDir   = "/vault/data"
	DrillConfigKey = "drill.hcl"
)

// ErrNoRoom means the cluster cannot place the drill pod.
var ErrNoRoom = errors.New("no room for the drill pod")

// DrillSpec is a throwaway Vault pod for a restore drill.
type DrillSpec struct {
	Release string
	ID      string
	// Nodes the pod may run on: the agent reaches pods through their node.
	Nodes []string
	// Config is the Vault HCL; TLSCert/TLSKey the listener's pair (PEM).
	Config          string
	TLSCert, TLSKey []byte
	// MemoryLimit caps the pod (a restore holds the snapshot in memory for a moment).
	MemoryLimit resource.Quantity
	// Deadline is the pod's activeDeadlineSeconds: the kubelet stops the unsealed copy
	// after it even when the agent that started the drill is gone.
	Deadline time.Duration
}

// DrillPod is the drill's pod once it runs.
type DrillPod struct {
	Name       string
	UID        string
	Node       string
	IP         string
	Image      string
	ServerName string
}

func drillName(release, id string) string { return release + "-drill-" + id }

func drillLabels(release, id string) map[string]string {
	return map[string]string{DrillLabel: id, DrillReleaseLabel: release,
		"app.kubernetes.io/managed-by": FieldManager, "app.kubernetes.io/name": "pve-vault-agent-drill"}
}

// DrillSelector selects every drill object of the release.
func DrillSelector(release string) string {
	return DrillLabel + "," + DrillReleaseLabel + "=" + release
}

// StartDrill creates the drill's Secret, ConfigMap and Pod: the release StatefulSet's
// image and security context, the given config, an emptyDir for data, no service
// account token, no service links, the lowest priority, required to run on one of
// spec.Nodes. It returns the pod's name and UID.
func (c *Cluster) StartDrill(ctx context.Context, spec DrillSpec) (name, uid, image string, err error) {
	ns := c.cfg.Namespace
	sts, err := c.Clients.AppsV1().StatefulSets(ns).Get(ctx, spec.Release, metav1.GetOptions{})
	if err != nil {
		return "", "", "", fmt.Errorf("read StatefulSet %s (the drill runs its image): %w", spec.Release, err)
	}
	tmpl := sts.Spec.Template.Spec
	var vaultC *corev1.Container
	for i := range tmpl.Containers {
		if tmpl.Containers[i].Name == "vault" {
			vaultC = &tmpl.Containers[i]
		}
	}
	if vaultC == nil {
		return "", "", "", fmt.Errorf("StatefulSet %s has no container named vault", spec.Release)
	}
	name = drillName(spec.Release, spec.ID)
	labels := drillLabels(spec.Release, spec.ID)
	meta := metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels}
	// The ConfigMap first: cleanup finds a drill by its ConfigMap, pod or policy and
	// deletes its Secret by name (the operate role may not list Secrets).
	if _, err := c.Clients.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: meta,
		Data: map[string]string{DrillConfigKey: spec.Config}}, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
		return "", "", "", fmt.Errorf("create the drill's ConfigMap: %w", err)
	}
	if _, err := c.Clients.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: meta, Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{corev1.TLSCertKey: spec.TLSCert, corev1.TLSPrivateKeyKey: spec.TLSKey}}, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
		return "", "", "", fmt.Errorf("create the drill's Secret: %w", err)
	}
	// No egress: the restored copy holds production's leases and would revoke the ones
	// expired by its clock against their real backends. Ingress only on the API port
	// from the nodes it may run on: the agent reaches it through an SSH tunnel to its
	// node (and NetworkPolicy never blocks a pod's own node). Both need a CNI that
	// enforces NetworkPolicies.
	from, err := c.nodeAddresses(ctx, spec.Nodes)
	if err != nil {
		return "", "", "", err
	}
	if _, err := c.Clients.NetworkingV1().NetworkPolicies(ns).Create(ctx, &networkingv1.NetworkPolicy{ObjectMeta: meta,
		Spec: drillPolicy(spec.ID, from)}, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
		return "", "", "", fmt.Errorf("create the drill's NetworkPolicy: %w", err)
	}
	priority, err := c.drillPriorityClass(ctx)
	if err != nil {
		return "", "", "", err
	}
	no, mode := false, int32(0o440)
	sizeLimit := resource.MustParse("4Gi")
	memReq := resource.MustParse("64Mi")
	limit := spec.MemoryLimit
	if limit.IsZero() {
		limit = resource.MustParse("512Mi")
	}
	deadline := int64(spec.Deadline / time.Second)
	if deadline <= 0 {
		deadline = 600
	}
	pod := &corev1.Pod{ObjectMeta: meta, Spec: corev1.PodSpec{
		RestartPolicy:                 corev1.RestartPolicyNever,
		ActiveDeadlineSeconds:         &deadline,
		AutomountServiceAccountToken:  &no,
		EnableServiceLinks:            &no,
		PriorityClassName:             priority,
		SecurityContext:               tmpl.SecurityContext,
		Tolerations:                   tmpl.Tolerations,
		TerminationGracePeriodSeconds: ptr(int64(5)),
		Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
			NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{
				{Key: "kubernetes.io/hostname", Operator: corev1.NodeSelectorOpIn, Values: spec.Nodes}}}}}}},
		Containers: []corev1.Container{{
			Name: "vault", Image: vaultC.Image, ImagePullPolicy: vaultC.ImagePullPolicy,
			// The binary itself, not the image's entrypoint: nothing rewrites the config.
			Command:         []string{"vault", "server", "-config=" + DrillConfigDir + "/" + DrillConfigKey},
			Env:             []corev1.EnvVar{{Name: "SKIP_SETCAP", Value: "true"}, {Name: "SKIP_CHOWN", Value: "true"}},
			Ports:           []corev1.ContainerPort{{Name: "https", ContainerPort: 8200}, {Name: "https-internal", ContainerPort: 8201}},
			SecurityContext: vaultC.SecurityContext,
			Resources: corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: memReq},
				Limits:   corev1.ResourceList{corev1.ResourceMemory: limit},
			},
			VolumeMounts: []corev1.VolumeMount{
				{Name: "config", MountPath: DrillConfigDir, ReadOnly: true},
				{Name: "tls", MountPath: DrillTLSDir, ReadOnly: true},
				{Name: "data", MountPath: DrillDataDir},
			},
		}},
		Volumes: []corev1.Volume{
			{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: name}}}},
			{Name: "tls", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: name, DefaultMode: &mode}}},
			{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: &sizeLimit}}},
		},
	}}
	created, err := c.createDrillPod(ctx, pod)
	if err != nil {
		return "", "", "", fmt.Errorf("create the drill pod: %w", err)
	}
	return name, string(created.UID), vaultC.Image, nil
}

// drillPolicy denies the drill pod all egress, and all ingress but TCP 8200 from the
// given node addresses.
func drillPolicy(id string, from []string) networkingv1.NetworkPolicySpec {
	port := intstr.FromInt32(8200)
	tcp := corev1.ProtocolTCP
	in := networkingv1.NetworkPolicyIngressRule{Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}}}
	for _, a := range from {
		cidr := a + "/32"
		if strings.Contains(a, ":") {
			cidr = a + "/128"
		}
		in.From = append(in.From, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr}})
	}
	spec := networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{DrillLabel: id}},
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}}
	if len(in.From) > 0 {
		spec.Ingress = []networkingv1.NetworkPolicyIngressRule{in}
	}
	return spec
}

// nodeAddresses are the InternalIP addresses of the named nodes (a node the API does not
// know has none; one it refuses to show is an error: the policy would be guessed).
func (c *Cluster) nodeAddresses(ctx context.Context, nodes []string) ([]string, error) {
	var out []string
	for _, name := range nodes {
		n, err := c.Clients.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read node %s (the drill pod admits its addresses): %w", name, err)
		}
		for _, a := range n.Status.Addresses {
			if a.Type == corev1.NodeInternalIP {
				out = append(out, a.Address)
			}
		}
	}
	return out, nil
}

// priorityClassLag bounds how long a pod create may be refused for a PriorityClass the
// API server has already stored: the Priority admission plugin resolves the name from
// an informer cache (plugin/pkg/admission/priority), which lags a fresh create by up to
// one watch event, so the first pod after the class is made can be refused with
// "no PriorityClass with name … was found".
const priorityClassLag = 10 * time.Second

// createDrillPod creates pod, retrying only while the admission cache has not yet seen
// the drill's PriorityClass.
func (c *Cluster) createDrillPod(ctx context.Context, pod *corev1.Pod) (*corev1.Pod, error) {
	deadline := time.Now().Add(priorityClassLag)
	for {
		created, err := c.Clients.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{FieldManager: FieldManager})
		if err == nil || !priorityClassNotSeen(err, pod.Spec.PriorityClassName) || time.Now().After(deadline) {
			return created, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func priorityClassNotSeen(err error, class string) bool {
	return class != "" && apierrors.IsForbidden(err) &&
		strings.Contains(err.Error(), "no PriorityClass with name "+class)
}

func ptr[T any](v T) *T { return &v }

// drillPriorityClass returns the drill's PriorityClass when it exists (install makes
// it), or "" (default priority, with a warning) when it does not yet.
func (c *Cluster) drillPriorityClass(ctx context.Context) (string, error) {
	_, err := c.Clients.SchedulingV1().PriorityClasses().Get(ctx, DrillPriorityClass, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		c.log.Warn("the drill pod runs at default priority: its PriorityClass does not exist yet (install creates it)", "priorityclass", DrillPriorityClass)
		return "", nil
	case err != nil:
		return "", fmt.Errorf("read the drill's PriorityClass %s: %w", DrillPriorityClass, err)
	}
	return DrillPriorityClass, nil
}

// EnsureDrillPriorityClass creates the drill's PriorityClass (value -100, never
// preempting: a drill yields, production pods do not) when it is missing.
func (c *Cluster) EnsureDrillPriorityClass(ctx context.Context) error {
	pcs := c.Clients.SchedulingV1().PriorityClasses()
	_, err := pcs.Get(ctx, DrillPriorityClass, metav1.GetOptions{})
	if !apierrors.IsNotFound(err) {
		return err
	}
	never := corev1.PreemptNever
	_, err = pcs.Create(ctx, &schedulingv1.PriorityClass{
		ObjectMeta:       metav1.ObjectMeta{Name: DrillPriorityClass, Labels: map[string]string{"app.kubernetes.io/managed-by": FieldManager}},
		Value:            -100,
		PreemptionPolicy: &never,
		Description:      "pve-vault-agent restore drills: below every workload, never preempting",
	}, metav1.CreateOptions{FieldManager: FieldManager})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// WaitDrill waits until the drill pod (name, uid) runs with an IP. It fails at once when
// the scheduler finds no room or the pod fails, and after timeout otherwise, naming what
// the pod waits for.
func (c *Cluster) WaitDrill(ctx context.Context, release, name, uid string, timeout time.Duration) (DrillPod, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	why := "not created"
	for {
		p, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
		switch {
		case err != nil && why == "not created":
			why = err.Error() // the pod's own state, once read, says more than an API hiccup
		case err != nil:
		case string(p.UID) != uid:
			return DrillPod{}, fmt.Errorf("pod %s was replaced by another (uid %s, created %s): not the drill's", name, p.UID, uid)
		default:
			for _, cond := range p.Status.Conditions {
				if cond.Type == corev1.PodScheduled && cond.Status == corev1.ConditionFalse && cond.Reason == corev1.PodReasonUnschedulable {
					return DrillPod{}, fmt.Errorf("%w: %s", ErrNoRoom, cond.Message)
				}
			}
			switch {
			case p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded:
				return DrillPod{}, fmt.Errorf("the drill pod ended (%s): %s %s", p.Status.Phase, p.Status.Reason, p.Status.Message)
			case p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" && p.Spec.NodeName != "":
				return DrillPod{Name: p.Name, UID: string(p.UID), Node: p.Spec.NodeName, IP: p.Status.PodIP,
					Image: p.Spec.Containers[0].Image, ServerName: p.Name}, nil
			}
			why = c.whyPending(ctx, p, release, -1)
		}
		select {
		case <-ctx.Done():
			return DrillPod{}, fmt.Errorf("the drill pod %s is not running after %s: %s", name, timeout, why)
		case <-tick.C:
		}
	}
}

// CleanupDrills deletes every drill object of the release and waits until no drill pod
// is left (the pod's grace period is 5 s: the kubelet has stopped Vault when it is
// gone); it returns what it deleted. Drills are found by their pods, ConfigMaps and
// NetworkPolicies; a drill's Secret (same name) goes first, by name: the operate role
// may not list Secrets, and a Secret is never made without its ConfigMap before it.
func (c *Cluster) CleanupDrills(ctx context.Context, release string, timeout time.Duration) ([]string, error) {
	ns := c.cfg.Namespace
	sel := metav1.ListOptions{LabelSelector: DrillSelector(release)}
	pods, err := c.Clients.CoreV1().Pods(ns).List(ctx, sel)
	if err != nil {
		return nil, fmt.Errorf("list drill pods: %w", err)
	}
	cms, err := c.Clients.CoreV1().ConfigMaps(ns).List(ctx, sel)
	if err != nil {
		return nil, fmt.Errorf("list drill ConfigMaps: %w", err)
	}
	policies, err := c.Clients.NetworkingV1().NetworkPolicies(ns).List(ctx, sel)
	if err != nil {
		return nil, fmt.Errorf("list drill NetworkPolicies: %w", err)
	}
	drills := map[string]bool{}
	for _, o := range pods.Items {
		drills[o.Name] = true
	}
	for _, o := range cms.Items {
		drills[o.Name] = true
	}
	for _, o := range policies.Items {
		drills[o.Name] = true
	}
	var gone []string
	for name := range drills {
		err := c.Clients.CoreV1().Secrets(ns).Delete(ctx, name, metav1.DeleteOptions{})
		switch {
		case err == nil:
			gone = append(gone, "secret/"+name)
		case !apierrors.IsNotFound(err):
			return gone, fmt.Errorf("delete drill Secret %s: %w", name, err)
		}
	}
	for _, p := range pods.Items {
		if err := c.Clients.CoreV1().Pods(ns).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return gone, fmt.Errorf("delete drill pod %s: %w", p.Name, err)
		}
		gone = append(gone, "pod/"+p.Name)
	}
	for _, o := range cms.Items {
		if err := c.Clients.CoreV1().ConfigMaps(ns).Delete(ctx, o.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return gone, fmt.Errorf("delete drill ConfigMap %s: %w", o.Name, err)
		}
		gone = append(gone, "configmap/"+o.Name)
	}
	for _, o := range policies.Items {
		if err := c.Clients.NetworkingV1().NetworkPolicies(ns).Delete(ctx, o.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return gone, fmt.Errorf("delete drill NetworkPolicy %s: %w", o.Name, err)
		}
		gone = append(gone, "networkpolicy/"+o.Name)
	}
	sort.Strings(gone)
	if len(pods.Items) == 0 {
		return gone, nil
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		left, err := c.Clients.CoreV1().Pods(ns).List(ctx, sel)
		if err == nil && len(left.Items) == 0 {
			return gone, nil
		}
		select {
		case <-ctx.Done():
			var names []string
			if left != nil {
				for _, p := range left.Items {
					names = append(names, p.Name)
				}
			}
			return gone, fmt.Errorf("drill pods still present after %s: %s", timeout, strings.Join(names, ", "))
		case <-tick.C:
		}
	}
}
