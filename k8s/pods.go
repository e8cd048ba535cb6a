package k8s

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// ErrPodsNotRunning is returned when pods do not come up in time; the message names
// each stuck pod and why.
var ErrPodsNotRunning = errors.New("vault pods not running")

// ServerSelector selects the chart's Vault server pods (labels alone prove nothing: see
// ServerPods).
func ServerSelector(release string) string {
	return "app.kubernetes.io/name=vault,app.kubernetes.io/instance=" + release + ",component=server"
}

// Pod is a Vault server pod as the agent needs it.
type Pod struct {
	Name    string `json:"name"`
	Ordinal int    `json:"ordinal"`
	Node    string `json:"node"`
	IP      string `json:"ip"`
	Phase   string `json:"phase"`
	UID     string `json:"uid"`
	// Revision is the StatefulSet revision the pod was created from.
	Revision string `json:"revision"`
	// ServerName is the pod's DNS name under the chart's headless Service: what a TLS
	// listener's certificate names.
	ServerName string `json:"server_name"`
	// Terminating: the pod is being deleted.
	Terminating bool `json:"terminating,omitempty"`
}

// Rejected is a pod that carries the chart's server labels but is not one of the
// release's server pods, and why. It receives nothing from the agent.
type Rejected struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// ServerPods lists the release's Vault server pods, by ordinal. A pod counts only when
// its controlling owner is the release's StatefulSet (matched by UID), it is named
// <release>-N with N below the StatefulSet's replicas, and it runs on the node its
// agent-made volume pins (a pod not scheduled yet is listed without a node). Every other
// pod with the chart's labels is returned in rejected: whoever can create a pod in the
// namespace must not be able to collect the unseal shares.
func (c *Cluster) ServerPods(ctx context.Context, release string) ([]Pod, []Rejected, error) {
	ns := c.cfg.Namespace
	sts, err := c.Clients.AppsV1().StatefulSets(ns).Get(ctx, release, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read StatefulSet %s: %w", release, err)
	}
	replicas := 1
	if sts.Spec.Replicas != nil {
		replicas = int(*sts.Spec.Replicas)
	}
	list, err := c.Clients.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: ServerSelector(release)})
	if err != nil {
		return nil, nil, fmt.Errorf("list vault pods: %w", err)
	}
	pins := map[int]volumePin{}
	var out []Pod
	var rejected []Rejected
	for i := range list.Items {
		p := &list.Items[i]
		reject := func(format string, a ...any) {
			rejected = append(rejected, Rejected{Name: p.Name, Reason: fmt.Sprintf(format, a...)})
		}
		owner := metav1.GetControllerOf(p)
		if owner == nil || owner.Kind != "StatefulSet" || owner.Name != release || owner.UID != sts.UID {
			reject("not controlled by StatefulSet %s (uid %s)", release, sts.UID)
			continue
		}
		ord, err := strconv.Atoi(strings.TrimPrefix(p.Name, release+"-"))
		if err != nil || !strings.HasPrefix(p.Name, release+"-") || ord < 0 || ord >= replicas || p.Name != fmt.Sprintf("%s-%d", release, ord) {
			reject("not named %s-N with N below %d", release, replicas)
			continue
		}
		pin, ok := pins[ord]
		if !ok {
			pin, err = c.volumePin(ctx, release, ord)
			if err != nil {
				return nil, nil, err
			}
			pins[ord] = pin
		}
		switch {
		case p.Spec.NodeName == "" || pin.anywhere:
		case pin.reject != "":
			reject("%s", pin.reject)
			continue
		case pin.node == "":
			reject("it runs on node %s, but no volume pins %s there (run install, or adopt for a volume you wrote)", p.Spec.NodeName, p.Name)
			continue
		case p.Spec.NodeName != pin.node:
			reject("runs on node %s, but its volume %s is on %s", p.Spec.NodeName, pin.volume, pin.node)
			continue
		}
		out = append(out, toPod(release, p))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ordinal < out[j].Ordinal })
	return out, rejected, nil
}

// volumePin is where a server pod may run: the node its volume's data is on.
type volumePin struct {
	volume string
	node   string
	// anywhere: network storage (the data follows the pod to any node).
	anywhere bool
	// reject says why no pod of the ordinal can be trusted with the shares.
	reject string
	// path is a hostPath or local volume's directory on node; ours: the agent made it.
	path string
	ours bool
}

// volumePin finds the PersistentVolume pod ordinal i's claim is bound to (the agent's,
// or one the operator wrote) and the node it pins: the node of its required node
// affinity; for a hostPath volume without one, the node recorded when the agent adopted
// it (Pins); network storage pins nothing. Before the claim is bound, the agent's
// volume of that ordinal, if any, is the one.
func (c *Cluster) volumePin(ctx context.Context, release string, i int) (volumePin, error) {
	name := PVName(c.cfg.Namespace, release, i)
	claim := ClaimName(release, i)
	pvc, err := c.Clients.CoreV1().PersistentVolumeClaims(c.cfg.Namespace).Get(ctx, claim, metav1.GetOptions{})
	switch {
	case err == nil && pvc.Spec.VolumeName != "":
		name = pvc.Spec.VolumeName
	case err != nil && !apierrors.IsNotFound(err):
		return volumePin{}, fmt.Errorf("read PersistentVolumeClaim %s: %w", claim, err)
	}
	pv, err := c.Clients.CoreV1().PersistentVolumes().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return volumePin{volume: name}, nil
	}
	if err != nil {
		return volumePin{}, fmt.Errorf("read PersistentVolume %s: %w", name, err)
	}
	pin := volumePin{volume: name, node: hostnameAffinity(pv), ours: pv.Labels["app.kubernetes.io/managed-by"] == FieldManager}
	switch {
	case pv.Spec.HostPath != nil:
		pin.path = pv.Spec.HostPath.Path
	case pv.Spec.Local != nil:
		pin.path = pv.Spec.Local.Path
	}
	switch {
	case pin.node != "":
	case pv.Spec.HostPath != nil:
		pod := fmt.Sprintf("%s-%d", release, i)
		if pin.node = c.Pins[pod]; pin.node == "" {
			pin.reject = fmt.Sprintf("its volume %s is a hostPath with no node affinity, and no node was recorded for it: run adopt on this host (it records the node %s's data is on) or give the volume a node affinity", name, pod)
		}
	case pv.Spec.Local == nil && !pin.ours:
		pin.anywhere = true
	}
	return pin, nil
}

// hostnameAffinity is the one node a PersistentVolume's required node affinity names
// by kubernetes.io/hostname, or "".
func hostnameAffinity(pv *corev1.PersistentVolume) string {
	if na := pv.Spec.NodeAffinity; na != nil && na.Required != nil {
		for _, term := range na.Required.NodeSelectorTerms {
			for _, e := range term.MatchExpressions {
				if e.Key == "kubernetes.io/hostname" && e.Operator == corev1.NodeSelectorOpIn && len(e.Values) == 1 {
					return e.Values[0]
				}
			}
		}
	}
	return ""
}

// VolumeNodes reports, for each pod of the release's StatefulSet that runs on a
// hostPath volume without node affinity, the node it runs on now (pod name → node):
// what adopt records as Pins, where the operator's data is today.
func (c *Cluster) VolumeNodes(ctx context.Context, release string) (map[string]string, error) {
	sts, replicas, err := c.statefulSet(ctx, release)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for i := 0; i < replicas; i++ {
		name := fmt.Sprintf("%s-%d", release, i)
		p, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read pod %s: %w", name, err)
		}
		if owner := metav1.GetControllerOf(p); owner == nil || owner.UID != sts.UID || p.Spec.NodeName == "" {
			continue
		}
		pin, err := c.volumePin(ctx, release, i)
		if err != nil {
			return nil, err
		}
		if pin.node == "" && pin.reject != "" {
			out[name] = p.Spec.NodeName
		}
	}
	return out, nil
}

// statefulSet reads the release's StatefulSet and its replica count.
func (c *Cluster) statefulSet(ctx context.Context, release string) (*appsv1.StatefulSet, int, error) {
	sts, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(ctx, release, metav1.GetOptions{})
	if err != nil {
		return nil, 0, fmt.Errorf("read StatefulSet %s: %w", release, err)
	}
	replicas := 1
	if sts.Spec.Replicas != nil {
		replicas = int(*sts.Spec.Replicas)
	}
	return sts, replicas, nil
}

// OperatorVolumes maps each node to the directory of the hostPath or local volume, not
// made by the agent, that a claim of the release is bound to and that is pinned to that
// node (by node affinity, or Pins, or else where the release's pod runs now): where
// provision must prepare the operator's data directory. Empty when the release has no StatefulSet yet.
func (c *Cluster) OperatorVolumes(ctx context.Context, release string) (map[string]string, error) {
	sts, replicas, err := c.statefulSet(ctx, release)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for i := 0; i < replicas; i++ {
		pin, err := c.volumePin(ctx, release, i)
		if err != nil {
			return nil, err
		}
		if pin.ours || pin.path == "" {
			continue
		}
		if pin.node == "" { // a hostPath without affinity, no node recorded: where its pod runs now
			p, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, fmt.Sprintf("%s-%d", release, i), metav1.GetOptions{})
			if err != nil && !apierrors.IsNotFound(err) {
				return nil, fmt.Errorf("read pod %s-%d: %w", release, i, err)
			}
			if owner := metav1.GetControllerOf(p); err == nil && owner != nil && owner.UID == sts.UID {
				pin.node = p.Spec.NodeName
			}
		}
		if pin.node != "" {
			out[pin.node] = pin.path
		}
	}
	return out, nil
}

func toPod(release string, p *corev1.Pod) Pod {
	ord, err := strconv.Atoi(strings.TrimPrefix(p.Name, release+"-"))
	if err != nil {
		ord = -1
	}
	return Pod{Name: p.Name, Ordinal: ord, Node: p.Spec.NodeName, IP: p.Status.PodIP, Phase: string(p.Status.Phase),
		UID: string(p.UID), Revision: p.Labels[appsv1.ControllerRevisionHashLabelKey], ServerName: p.Name + "." + release + "-internal",
		Terminating: p.DeletionTimestamp != nil}
}

// WaitRunning waits until pods <release>-0 … <release>-(replicas-1) exist, are
// scheduled and Running (not Ready: a sealed Vault is never Ready). On timeout the error
// names every stuck pod with the reason.
func (c *Cluster) WaitRunning(ctx context.Context, release string, replicas int, timeout time.Duration) ([]Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		pods, stuck, err := c.podsState(ctx, release, replicas)
		if err == nil && len(stuck) == 0 {
			return pods, nil
		}
		select {
		case <-ctx.Done():
			// Diagnose once more with a fresh deadline: the last poll may have been cut short.
			dctx, dcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_, stuck, err = c.podsState(dctx, release, replicas)
			dcancel()
			if err != nil {
				return nil, fmt.Errorf("%w after %s: %v", ErrPodsNotRunning, timeout, err)
			}
			return nil, fmt.Errorf("%w after %s:\n  - %s", ErrPodsNotRunning, timeout, strings.Join(stuck, "\n  - "))
		case <-tick.C:
		}
	}
}

// podsState returns the running server pods and, for each ordinal that is not, why.
func (c *Cluster) podsState(ctx context.Context, release string, replicas int) ([]Pod, []string, error) {
	ns := c.cfg.Namespace
	servers, rejected, err := c.ServerPods(ctx, release)
	if err != nil {
		return nil, nil, err
	}
	byOrd := map[int]Pod{}
	for _, p := range servers {
		byOrd[p.Ordinal] = p
	}
	why := map[string]string{}
	for _, r := range rejected {
		why[r.Name] = r.Reason
	}
	var pods []Pod
	var stuck []string
	for i := 0; i < replicas; i++ {
		name := fmt.Sprintf("%s-%d", release, i)
		if sp, ok := byOrd[i]; ok && sp.Phase == string(corev1.PodRunning) && !sp.Terminating {
			pods = append(pods, sp)
			continue
		}
		if r, ok := why[name]; ok {
			stuck = append(stuck, name+": not the release's server pod: "+r)
			continue
		}
		p, err := c.Clients.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			stuck = append(stuck, c.whyMissing(ctx, release, name))
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		if p.DeletionTimestamp != nil {
			stuck = append(stuck, name+": terminating")
			continue
		}
		// A claim recreated after its volume was released (pod and claim deleted, the
		// volume kept): hand the agent's volume to the new claim.
		if p.Spec.NodeName == "" {
			if err := c.releaseStaleClaim(ctx, PVName(ns, release, i), ClaimName(release, i)); err != nil {
				c.log.Debug("release stale claim", "err", err)
			}
		}
		stuck = append(stuck, name+": "+c.whyPending(ctx, p, release, i))
	}
	return pods, stuck, nil
}

func (c *Cluster) whyMissing(ctx context.Context, release, name string) string {
	sts, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(ctx, release, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return name + ": not created (StatefulSet " + release + " does not exist)"
	}
	if err == nil && sts.Spec.Replicas != nil {
		return fmt.Sprintf("%s: not created yet (StatefulSet has %d/%d pods)", name, sts.Status.Replicas, *sts.Spec.Replicas)
	}
	return name + ": not created yet"
}

func (c *Cluster) whyPending(ctx context.Context, p *corev1.Pod, release string, i int) string {
	var reasons []string
	if i >= 0 { // a server pod (a drill pod has no claim)
		claim := ClaimName(release, i)
		if pvc, err := c.Clients.CoreV1().PersistentVolumeClaims(c.cfg.Namespace).Get(ctx, claim, metav1.GetOptions{}); err == nil && pvc.Status.Phase != corev1.ClaimBound {
			reasons = append(reasons, fmt.Sprintf("PVC %s is %s (no matching PersistentVolume: was the agent's storage applied?)", claim, pvc.Status.Phase))
		}
	}
	if p.Spec.NodeName == "" {
		msg := "not scheduled to a node"
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Status == corev1.ConditionFalse && cond.Message != "" {
				msg += ": " + cond.Message
			}
		}
		reasons = append(reasons, msg)
	} else {
		reasons = append(reasons, fmt.Sprintf("on node %s, phase %s", p.Spec.NodeName, p.Status.Phase))
		for _, cs := range p.Status.ContainerStatuses {
			if w := cs.State.Waiting; w != nil {
				reasons = append(reasons, fmt.Sprintf("container %s waiting: %s %s", cs.Name, w.Reason, w.Message))
			}
		}
	}
	return strings.Join(reasons, "; ")
}

// UpdateRevision waits until the StatefulSet's controller has observed its current
// generation and returns the revision new pods are created from. (After an upgrade the
// controller publishes it asynchronously; the chart's OnDelete strategy restarts nothing
// by itself.)
func (c *Cluster) UpdateRevision(ctx context.Context, release string, timeout time.Duration) (string, error) {
	sts, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(ctx, release, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read StatefulSet %s: %w", release, err)
	}
	return c.updateRevision(ctx, release, sts.Generation, timeout)
}

// DeletePod deletes exactly this incarnation of a pod (UID precondition): a pod already
// replaced is left alone.
func (c *Cluster) DeletePod(ctx context.Context, p Pod) error {
	uid := types.UID(p.UID)
	err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("delete pod %s: %w", p.Name, err)
	}
	return nil
}

// WaitGone waits until this incarnation of a pod (its UID) no longer exists. The kubelet
// removes a gracefully deleted pod from the API only after its containers have stopped,
// so once it is gone no process of it runs.
func (c *Cluster) WaitGone(ctx context.Context, p Pod, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		cur, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) || (err == nil && string(cur.UID) != p.UID) {
			return nil
		}
		select {
		case <-ctx.Done():
			why := "still there"
			if err != nil {
				why = err.Error()
			} else if cur.DeletionTimestamp != nil {
				why = "still terminating (its containers have not stopped)"
			}
			return fmt.Errorf("%w: %s was deleted but is %s after %s", ErrPodsNotRunning, p.Name, why, timeout)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// PodNamed returns the pod of that name as it is now; ok is false when there is none.
func (c *Cluster) PodNamed(ctx context.Context, release, name string) (Pod, bool, error) {
	p, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return Pod{}, false, nil
	}
	if err != nil {
		return Pod{}, false, fmt.Errorf("read pod %s: %w", name, err)
	}
	return toPod(release, p), true, nil
}

func (c *Cluster) updateRevision(ctx context.Context, release string, generation int64, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		sts, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(ctx, release, metav1.GetOptions{})
		if err != nil {
			return "", fmt.Errorf("read StatefulSet %s: %w", release, err)
		}
		if sts.Status.ObservedGeneration >= generation && sts.Status.UpdateRevision != "" {
			return sts.Status.UpdateRevision, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("StatefulSet %s: the controller has not observed generation %d after %s (is kube-controller-manager running?)", release, generation, timeout)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WaitReplaced waits until the pod of old's name is a new object, a server pod of the
// release, and running.
func (c *Cluster) WaitReplaced(ctx context.Context, release string, old Pod, timeout time.Duration) (Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		servers, _, serr := c.ServerPods(ctx, release)
		for _, sp := range servers {
			if serr == nil && sp.Name == old.Name && sp.UID != old.UID && !sp.Terminating && sp.Phase == string(corev1.PodRunning) {
				return sp, nil
			}
		}
		p, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, old.Name, metav1.GetOptions{})
		select {
		case <-ctx.Done():
			why := "not recreated"
			if err == nil && string(p.UID) != old.UID {
				why = c.whyPending(context.Background(), p, release, old.Ordinal)
			}
			return Pod{}, fmt.Errorf("%w: %s after rolling: %s", ErrPodsNotRunning, old.Name, why)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// LivenessPath is the HTTP path of the liveness probe of the release's vault
// container, "" when it has none.
func (c *Cluster) LivenessPath(ctx context.Context, release string) (string, error) {
	sts, err := c.Clients.AppsV1().StatefulSets(c.cfg.Namespace).Get(ctx, release, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("read StatefulSet %s: %w", release, err)
	}
	for _, ct := range sts.Spec.Template.Spec.Containers {
		if ct.Name == "vault" && ct.LivenessProbe != nil && ct.LivenessProbe.HTTPGet != nil {
			return ct.LivenessProbe.HTTPGet.Path, nil
		}
	}
	return "", nil
}
