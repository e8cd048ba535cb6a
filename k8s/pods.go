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
)

// ErrPodsNotRunning is returned when pods do not come up in time; the message names
// each stuck pod and why.
var ErrPodsNotRunning = errors.New("vault pods not running")

// ServerSelector selects the chart's Vault server pods.
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
}

// Pods lists the release's Vault server pods, by ordinal.
func (c *Cluster) Pods(ctx context.Context, release string) ([]Pod, error) {
	list, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).List(ctx, metav1.ListOptions{LabelSelector: ServerSelector(release)})
	if err != nil {
		return nil, fmt.Errorf("list vault pods: %w", err)
	}
	var out []Pod
	for _, p := range list.Items {
		out = append(out, toPod(release, &p))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ordinal < out[j].Ordinal })
	return out, nil
}

func toPod(release string, p *corev1.Pod) Pod {
	ord, err := strconv.Atoi(strings.TrimPrefix(p.Name, release+"-"))
	if err != nil {
		ord = -1
	}
	return Pod{Name: p.Name, Ordinal: ord, Node: p.Spec.NodeName, IP: p.Status.PodIP, Phase: string(p.Status.Phase),
		UID: string(p.UID), Revision: p.Labels[appsv1.ControllerRevisionHashLabelKey]}
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

// podsState returns the running pods and, for each one that is not, why.
func (c *Cluster) podsState(ctx context.Context, release string, replicas int) ([]Pod, []string, error) {
	ns := c.cfg.Namespace
	var pods []Pod
	var stuck []string
	for i := 0; i < replicas; i++ {
		name := fmt.Sprintf("%s-%d", release, i)
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
		if p.Status.Phase == corev1.PodRunning {
			pods = append(pods, toPod(release, p))
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
	claim := ClaimName(release, i)
	if pvc, err := c.Clients.CoreV1().PersistentVolumeClaims(c.cfg.Namespace).Get(ctx, claim, metav1.GetOptions{}); err == nil && pvc.Status.Phase != corev1.ClaimBound {
		reasons = append(reasons, fmt.Sprintf("PVC %s is %s (no matching PersistentVolume: was the agent's storage applied?)", claim, pvc.Status.Phase))
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

// RollFunc is called for each pod once it runs again on the new revision, before the
// next pod is rolled (the Vault side unseals it here).
type RollFunc func(ctx context.Context, pod Pod) error

// Roll replaces, one at a time and highest ordinal first, every pod not on the
// StatefulSet's update revision (the chart's updateStrategy is OnDelete, so an upgrade
// restarts nothing by itself): delete, wait until the new pod runs, call after, go on.
// Returns the names of the rolled pods.
func (c *Cluster) Roll(ctx context.Context, release string, timeout time.Duration, after RollFunc) ([]string, error) {
	ns := c.cfg.Namespace
	sts, err := c.Clients.AppsV1().StatefulSets(ns).Get(ctx, release, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("read StatefulSet %s: %w", release, err)
	}
	replicas := 1
	if sts.Spec.Replicas != nil {
		replicas = int(*sts.Spec.Replicas)
	}
	// The controller publishes the update revision asynchronously after an upgrade.
	target, err := c.updateRevision(ctx, release, sts.Generation, timeout)
	if err != nil {
		return nil, err
	}
	pods, err := c.WaitRunning(ctx, release, replicas, timeout)
	if err != nil {
		return nil, err
	}
	var rolled []string
	for i := len(pods) - 1; i >= 0; i-- {
		p := pods[i]
		if p.Revision == target {
			continue
		}
		c.log.Info("rolling pod to the new revision", "pod", p.Name, "from", p.Revision, "to", target)
		if err := c.Clients.CoreV1().Pods(ns).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return rolled, fmt.Errorf("delete pod %s: %w", p.Name, err)
		}
		np, err := c.waitReplaced(ctx, release, p, timeout)
		if err != nil {
			return rolled, err
		}
		rolled = append(rolled, p.Name)
		if after != nil {
			if err := after(ctx, np); err != nil {
				return rolled, fmt.Errorf("after rolling %s: %w", p.Name, err)
			}
		}
	}
	return rolled, nil
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

// waitReplaced waits until the pod of old's name is a new object and running.
func (c *Cluster) waitReplaced(ctx context.Context, release string, old Pod, timeout time.Duration) (Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		p, err := c.Clients.CoreV1().Pods(c.cfg.Namespace).Get(ctx, old.Name, metav1.GetOptions{})
		if err == nil && string(p.UID) != old.UID && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			return toPod(release, p), nil
		}
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
