package lab

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

// RegisterNodes creates Ready Node objects (there is no kubelet to register them).
func RegisterNodes(ctx context.Context, cs kubernetes.Interface, names ...string) error {
	for _, name := range names {
		n := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
		}
		_, err := cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("register node %s: %w", name, err)
		}
		// Controllers touch a new node too (TTL annotations): retry on conflict.
		err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
			cur, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			cur.Status = nodeStatus(name)
			_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, cur, metav1.UpdateOptions{})
			return err
		})
		if err != nil {
			return fmt.Errorf("mark node %s ready: %w", name, err)
		}
	}
	return nil
}

func nodeStatus(name string) corev1.NodeStatus {
	return corev1.NodeStatus{
		Conditions:  []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now()}},
		Addresses:   []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: name}},
		Capacity:    corev1.ResourceList{corev1.ResourcePods: *resourceQty("110")},
		Allocatable: corev1.ResourceList{corev1.ResourcePods: *resourceQty("110")},
	}
}

// PodHooks let a test decide what "running a pod" means (start a Vault process, say).
type PodHooks struct {
	// Start runs when a bound pod is to become Running; it returns the pod IP.
	Start func(ctx context.Context, pod *corev1.Pod) (ip string, err error)
	// Stop runs when a pod is being deleted, before it disappears.
	Stop func(pod *corev1.Pod)
}

// Kubelet plays scheduler and kubelet for one namespace: a pod whose PVCs are bound is
// bound to the node its local PersistentVolume requires (or the first node), then
// started through the hooks and marked Running (not Ready) with the returned IP; a
// deleted pod is stopped and removed at once. It polls; Stop ends it.
type Kubelet struct {
	cs      kubernetes.Interface
	ns      string
	hooks   PodHooks
	cancel  context.CancelFunc
	done    chan struct{}
	mu      sync.Mutex
	started map[string]*corev1.Pod // pod UID → the pod as started
	errs    []error
	// mountWaits records each pod that could not mount its volume, with why.
	mountWaits []string
	probers    map[string]*prober // pod UID → its prober (probe.go)
	restarts   map[string]int     // pod name → container restarts after a failed liveness probe
}

// StartKubelet starts the loop.
func StartKubelet(cs kubernetes.Interface, ns string, hooks PodHooks) *Kubelet {
	ctx, cancel := context.WithCancel(context.Background())
	k := &Kubelet{cs: cs, ns: ns, hooks: hooks, cancel: cancel, done: make(chan struct{}), started: map[string]*corev1.Pod{}}
	go k.loop(ctx)
	return k
}

// Stop ends the loop and the probes.
func (k *Kubelet) Stop() {
	k.cancel()
	<-k.done
	k.mu.Lock()
	var uids []string
	for uid := range k.probers {
		uids = append(uids, uid)
	}
	k.mu.Unlock()
	for _, uid := range uids {
		k.stopProber(uid)
	}
}

// Errors returns the errors the loop met (hooks failing, API errors).
func (k *Kubelet) Errors() []error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]error(nil), k.errs...)
}

func (k *Kubelet) fail(err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.errs) < 100 {
		k.errs = append(k.errs, err)
	}
}

func (k *Kubelet) loop(ctx context.Context) {
	defer close(k.done)
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		k.sync(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (k *Kubelet) sync(ctx context.Context) {
	pods, err := k.cs.CoreV1().Pods(k.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		if ctx.Err() == nil {
			k.fail(err)
		}
		return
	}
	// A pod deleted with no grace is gone from the API at once: stop what runs for it,
	// as a kubelet kills the containers of a pod that vanished.
	listed := map[string]bool{}
	for i := range pods.Items {
		listed[string(pods.Items[i].UID)] = true
	}
	k.mu.Lock()
	var vanished []*corev1.Pod
	for uid, p := range k.started {
		if !listed[uid] {
			vanished = append(vanished, p)
			delete(k.started, uid)
		}
	}
	k.mu.Unlock()
	for _, p := range vanished {
		k.stopProber(string(p.UID))
		if k.hooks.Stop != nil {
			k.hooks.Stop(p)
		}
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		switch {
		case p.DeletionTimestamp != nil:
			k.stopProber(string(p.UID))
			if k.hooks.Stop != nil {
				k.hooks.Stop(p)
			}
			zero := int64(0)
			uid := p.UID
			err := k.cs.CoreV1().Pods(k.ns).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid}})
			if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && ctx.Err() == nil {
				k.fail(fmt.Errorf("remove pod %s: %w", p.Name, err))
			}
			k.mu.Lock()
			delete(k.started, string(p.UID))
			k.mu.Unlock()
		case p.Spec.NodeName == "":
			k.schedule(ctx, p)
		case p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded:
		case p.Status.Phase != corev1.PodRunning:
			k.run(ctx, p)
		case pastDeadline(p):
			k.deadlineExceeded(ctx, p)
		}
	}
}

// schedule binds p to the node its bound PVs require, once all its claims are bound,
// or to the first node its required node affinity names; a pod whose memory request
// does not fit the node's allocatable memory (when a test set one with SetNodeMemory)
// is marked Unschedulable with the scheduler's message instead.
func (k *Kubelet) schedule(ctx context.Context, p *corev1.Pod) {
	node := affinityNode(p)
	// nodeSelector: the node whose labels match (only kubernetes.io/hostname here, the
	// one label the lab's nodes carry).
	if h := p.Spec.NodeSelector["kubernetes.io/hostname"]; h != "" && node == "" {
		node = h
	}
	for _, v := range p.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			continue
		}
		pvc, err := k.cs.CoreV1().PersistentVolumeClaims(k.ns).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
		if err != nil || pvc.Status.Phase != corev1.ClaimBound {
			return // a real scheduler would wait too
		}
		pv, err := k.cs.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil {
			return
		}
		if na := pv.Spec.NodeAffinity; na != nil && na.Required != nil {
			for _, term := range na.Required.NodeSelectorTerms {
				for _, e := range term.MatchExpressions {
					if e.Key == "kubernetes.io/hostname" && len(e.Values) > 0 {
						node = e.Values[0]
					}
				}
			}
		}
	}
	if node == "" {
		nodes, err := k.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil || len(nodes.Items) == 0 {
			return
		}
		node = nodes.Items[0].Name
	}
	if !k.fits(ctx, p, node) {
		return
	}
	err := k.cs.CoreV1().Pods(k.ns).Bind(ctx, &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, UID: p.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: node},
	}, metav1.CreateOptions{})
	// A pod deleted or rebound meanwhile is not an error: the next pass sees the truth.
	if err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		k.fail(fmt.Errorf("bind pod %s to %s: %w", p.Name, node, err))
	}
}

// affinityNode is the first node a pod's required node affinity allows, or "".
func affinityNode(p *corev1.Pod) string {
	a := p.Spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return ""
	}
	for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
		for _, e := range term.MatchExpressions {
			if e.Key == "kubernetes.io/hostname" && e.Operator == corev1.NodeSelectorOpIn && len(e.Values) > 0 {
				return e.Values[0]
			}
		}
	}
	return ""
}

// fits reports whether p's memory request fits what node has left; when it does not,
// the pod is marked Unschedulable as kube-scheduler does.
func (k *Kubelet) fits(ctx context.Context, p *corev1.Pod, node string) bool {
	n, err := k.cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return false
	}
	alloc, ok := n.Status.Allocatable[corev1.ResourceMemory]
	if !ok {
		return true
	}
	pods, err := k.cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return false
	}
	used := resource.Quantity{}
	for _, o := range pods.Items {
		if o.Status.Phase == corev1.PodSucceeded || o.Status.Phase == corev1.PodFailed {
			continue
		}
		used.Add(memoryRequest(&o))
	}
	used.Add(memoryRequest(p))
	if used.Cmp(alloc) <= 0 {
		return true
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Reason == corev1.PodReasonUnschedulable {
			return false // said already
		}
	}
	nodes, _ := k.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	total := 1
	if nodes != nil {
		total = len(nodes.Items)
	}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: corev1.PodReasonUnschedulable,
		Message:            fmt.Sprintf("0/%d nodes are available: 1 Insufficient memory. preemption: 0/%d nodes are available: 1 No preemption victims found for incoming pod.", total, total),
		LastTransitionTime: metav1.Now()}}
	if _, err := k.cs.CoreV1().Pods(k.ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		k.fail(fmt.Errorf("mark pod %s unschedulable: %w", p.Name, err))
	}
	return false
}

func memoryRequest(p *corev1.Pod) resource.Quantity {
	q := resource.Quantity{}
	for _, c := range p.Spec.Containers {
		if r, ok := c.Resources.Requests[corev1.ResourceMemory]; ok {
			q.Add(r)
		}
	}
	return q
}

// SetNodeMemory gives a node allocatable memory (nodes start without a limit), so a
// test can leave no room for a pod.
func SetNodeMemory(ctx context.Context, cs kubernetes.Interface, node, memory string) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Status.Allocatable[corev1.ResourceMemory] = resource.MustParse(memory)
		n.Status.Capacity[corev1.ResourceMemory] = resource.MustParse(memory)
		_, err = cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

func (k *Kubelet) run(ctx context.Context, p *corev1.Pod) {
	if msg := k.unmountable(ctx, p); msg != "" {
		k.waitMount(ctx, p, msg)
		return
	}
	ip := "127.0.0.1"
	if k.hooks.Start != nil {
		var err error
		if ip, err = k.hooks.Start(ctx, p); err != nil {
			k.fail(fmt.Errorf("start pod %s: %w", p.Name, err))
			return
		}
	}
	k.mu.Lock()
	k.started[string(p.UID)] = p.DeepCopy()
	k.mu.Unlock()
	now := metav1.Now()
	p.Status.Phase = corev1.PodRunning
	p.Status.HostIP = "127.0.0.1"
	p.Status.PodIP = ip
	p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	p.Status.StartTime = &now
	p.Status.Conditions = []corev1.PodCondition{
		{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.ContainersReady, Status: corev1.ConditionFalse, LastTransitionTime: now},
		{Type: corev1.PodReady, Status: corev1.ConditionFalse, LastTransitionTime: now, Reason: "ContainersNotReady"},
	}
	var statuses []corev1.ContainerStatus
	for _, c := range p.Spec.Containers {
		statuses = append(statuses, corev1.ContainerStatus{Name: c.Name, Image: c.Image, Started: ptrTrue(),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}})
	}
	p.Status.ContainerStatuses = statuses
	updated, err := k.cs.CoreV1().Pods(k.ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	if err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		k.fail(fmt.Errorf("mark pod %s running: %w", p.Name, err))
	}
	if err == nil {
		k.startProber(updated)
	}
}

// unmountable says why a pod's volumes cannot be mounted, or "". As the kubelet's
// local volume plugin does (pkg/volume/local: "path %q does not exist" from
// NewMounter, retried with a back-off), a local PersistentVolume whose directory is
// missing keeps the pod from starting: no container runs until the path is back.
func (k *Kubelet) unmountable(ctx context.Context, p *corev1.Pod) string {
	for _, v := range p.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			continue
		}
		pvc, err := k.cs.CoreV1().PersistentVolumeClaims(k.ns).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
		if err != nil || pvc.Spec.VolumeName == "" {
			continue
		}
		pv, err := k.cs.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
		if err != nil || pv.Spec.Local == nil {
			continue
		}
		if fi, err := os.Stat(pv.Spec.Local.Path); err != nil || !fi.IsDir() {
			return fmt.Sprintf("MountVolume.NewMounter initialization failed for volume %q : path %q does not exist", pv.Name, pv.Spec.Local.Path)
		}
	}
	return ""
}

// waitMount shows a pod whose volumes cannot be mounted as the kubelet does: Pending,
// its containers waiting in ContainerCreating (the mount error is an event).
func (k *Kubelet) waitMount(ctx context.Context, p *corev1.Pod, msg string) {
	for _, cs := range p.Status.ContainerStatuses {
		if cs.State.Waiting != nil && cs.State.Waiting.Reason == "ContainerCreating" {
			return // said already
		}
	}
	now := metav1.Now()
	p.Status.Phase = corev1.PodPending
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now}}
	p.Status.ContainerStatuses = nil
	for _, c := range p.Spec.Containers {
		p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{Name: c.Name, Image: c.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}})
	}
	if _, err := k.cs.CoreV1().Pods(k.ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		k.fail(fmt.Errorf("mark pod %s waiting for its volume: %w", p.Name, err))
	}
	k.mu.Lock()
	k.mountWaits = append(k.mountWaits, p.Name+": "+msg)
	k.mu.Unlock()
}

// MountWaits lists the pods that waited for a volume, with the kubelet's message.
func (k *Kubelet) MountWaits() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.mountWaits...)
}

// pastDeadline reports whether a running pod has outlived its activeDeadlineSeconds.
func pastDeadline(p *corev1.Pod) bool {
	d := p.Spec.ActiveDeadlineSeconds
	return d != nil && p.Status.StartTime != nil && time.Since(p.Status.StartTime.Time) > time.Duration(*d)*time.Second
}

// deadlineExceeded ends a pod past its deadline as the kubelet does
// (pkg/kubelet/active_deadline.go): its containers are killed and it fails with reason
// DeadlineExceeded; the object stays until someone deletes it.
func (k *Kubelet) deadlineExceeded(ctx context.Context, p *corev1.Pod) {
	k.stopProber(string(p.UID))
	if k.hooks.Stop != nil {
		k.hooks.Stop(p)
	}
	k.mu.Lock()
	delete(k.started, string(p.UID))
	k.mu.Unlock()
	now := metav1.Now()
	p.Status.Phase = corev1.PodFailed
	p.Status.Reason = "DeadlineExceeded"
	p.Status.Message = "Pod was active on the node longer than the specified deadline"
	for i := range p.Status.ContainerStatuses {
		p.Status.ContainerStatuses[i].State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 137, Reason: "Error", FinishedAt: now}}
	}
	if _, err := k.cs.CoreV1().Pods(k.ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		k.fail(fmt.Errorf("mark pod %s past its deadline: %w", p.Name, err))
	}
}

func ptrTrue() *bool { b := true; return &b }

func resourceQty(s string) *resource.Quantity { q := resource.MustParse(s); return &q }
