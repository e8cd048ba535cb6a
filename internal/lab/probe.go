package lab

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// The lab kubelet runs a pod's readiness and liveness probes as the kubelet does
// (pkg/kubelet/prober, pkg/probe/http, pkg/kubelet/kuberuntime):
//   - an HTTP GET of the probe's path and query on the pod IP and the probe's port (a
//     number, or the name of a container port), TLS unverified for scheme HTTPS; any
//     status from 200 to 399 is a success, anything else or no answer within
//     timeoutSeconds (default 1) a failure;
//   - the first probe initialDelaySeconds after the container started, then every
//     periodSeconds (default 10); failureThreshold consecutive failures (default 3)
//     fail it, successThreshold (1) successes pass it;
//   - readiness sets the pod's Ready and ContainersReady conditions (the endpoint
//     controller follows them into the Services' endpoints);
//   - liveness failing kills the container and starts it again in the same pod (same UID
//     and IP, restartCount + 1, the last state terminated); restarts back off as
//     CrashLoopBackOff: the first at once, then 10 s doubling to 5 min, reset once the
//     container ran 10 minutes (kubelet's backOff: initial 10 s, max 300 s).

const (
	backoffInitial = 10 * time.Second
	backoffMax     = 5 * time.Minute
	backoffReset   = 10 * time.Minute
)

// prober probes one pod's first container until stop.
type prober struct {
	k       *Kubelet
	pod     *corev1.Pod
	stop    chan struct{}
	done    chan struct{}
	backoff time.Duration
}

func hasHTTPProbe(p *corev1.Pod) bool {
	if len(p.Spec.Containers) == 0 {
		return false
	}
	c := p.Spec.Containers[0]
	return (c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil) || (c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet != nil)
}

// startProber starts probing p (running, with its IP) unless it has no HTTP probe.
func (k *Kubelet) startProber(p *corev1.Pod) {
	if !hasHTTPProbe(p) {
		return
	}
	pr := &prober{k: k, pod: p.DeepCopy(), stop: make(chan struct{}), done: make(chan struct{})}
	k.mu.Lock()
	if k.probers == nil {
		k.probers = map[string]*prober{}
	}
	k.probers[string(p.UID)] = pr
	k.mu.Unlock()
	go pr.run()
}

// stopProber ends the probing of a pod (it is going), waiting for it.
func (k *Kubelet) stopProber(uid string) {
	k.mu.Lock()
	pr := k.probers[uid]
	delete(k.probers, uid)
	k.mu.Unlock()
	if pr != nil {
		close(pr.stop)
		<-pr.done
	}
}

// Restarts is how often the lab kubelet restarted pod's container after a failed
// liveness probe.
func (k *Kubelet) Restarts(pod string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.restarts[pod]
}

type probeState struct {
	probe    *corev1.Probe
	next     time.Time
	failures int
	ok       bool
}

func newProbeState(p *corev1.Probe, started time.Time) *probeState {
	if p == nil || p.HTTPGet == nil {
		return nil
	}
	return &probeState{probe: p, next: started.Add(time.Duration(p.InitialDelaySeconds) * time.Second)}
}

func (pr *prober) run() {
	defer close(pr.done)
	started := time.Now()
	c := pr.pod.Spec.Containers[0]
	live, ready := newProbeState(c.LivenessProbe, started), newProbeState(c.ReadinessProbe, started)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-pr.stop:
			return
		case <-tick.C:
		}
		now := time.Now()
		if ready != nil && !now.Before(ready.next) {
			was := ready.ok
			pr.probe(ready)
			if ready.ok != was {
				pr.setReady(ready.ok)
			}
		}
		if live != nil && !now.Before(live.next) {
			pr.probe(live)
			if live.failures >= threshold(live.probe.FailureThreshold, 3) {
				if !pr.restart(started) {
					return
				}
				started = time.Now()
				live, ready = newProbeState(c.LivenessProbe, started), newProbeState(c.ReadinessProbe, started)
			}
		}
	}
}

func threshold(v int32, def int) int {
	if v <= 0 {
		return def
	}
	return int(v)
}

// probe runs one HTTP GET and updates the probe's state.
func (pr *prober) probe(s *probeState) {
	g := s.probe.HTTPGet
	period := time.Duration(max(s.probe.PeriodSeconds, 1)) * time.Second
	if s.probe.PeriodSeconds == 0 {
		period = 10 * time.Second
	}
	s.next = time.Now().Add(period)
	timeout := time.Duration(max(s.probe.TimeoutSeconds, 1)) * time.Second
	port := g.Port.IntValue()
	if port == 0 {
		for _, cp := range pr.pod.Spec.Containers[0].Ports {
			if cp.Name == g.Port.String() {
				port = int(cp.ContainerPort)
			}
		}
	}
	scheme := "http"
	if g.Scheme == corev1.URISchemeHTTPS {
		scheme = "https"
	}
	url := scheme + "://" + net.JoinHostPort(pr.pod.Status.PodIP, strconv.Itoa(port)) + g.Path
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true,
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // the kubelet does not verify probe certificates
	ok := false
	if resp, err := client.Get(url); err == nil {
		resp.Body.Close()
		ok = resp.StatusCode >= 200 && resp.StatusCode < 400
	}
	if ok {
		s.failures, s.ok = 0, true
		return
	}
	s.failures++
	if s.failures >= threshold(s.probe.FailureThreshold, 3) {
		s.ok = false
	}
}

// setReady writes the pod's Ready and ContainersReady conditions.
func (pr *prober) setReady(ready bool) {
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	pr.update(func(p *corev1.Pod) {
		for i, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady || c.Type == corev1.ContainersReady {
				p.Status.Conditions[i].Status = status
				p.Status.Conditions[i].LastTransitionTime = metav1.Now()
			}
		}
		for i := range p.Status.ContainerStatuses {
			p.Status.ContainerStatuses[i].Ready = ready
		}
	})
}

// restart kills the container after a failed liveness probe and starts it again after
// its back-off; false when the pod went meanwhile.
func (pr *prober) restart(started time.Time) bool {
	k, p := pr.k, pr.pod
	if time.Since(started) >= backoffReset {
		pr.backoff = 0
	}
	if k.hooks.Stop != nil {
		k.hooks.Stop(p)
	}
	k.mu.Lock()
	if k.restarts == nil {
		k.restarts = map[string]int{}
	}
	k.restarts[p.Name]++
	k.mu.Unlock()
	finished := metav1.Now()
	delay := pr.backoff
	pr.update(func(cur *corev1.Pod) {
		for i := range cur.Status.Conditions {
			if cur.Status.Conditions[i].Type == corev1.PodReady || cur.Status.Conditions[i].Type == corev1.ContainersReady {
				cur.Status.Conditions[i].Status = corev1.ConditionFalse
			}
		}
		for i := range cur.Status.ContainerStatuses {
			cs := &cur.Status.ContainerStatuses[i]
			cs.RestartCount++
			cs.Ready = false
			cs.LastTerminationState = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed",
				Message: "Container vault failed liveness probe, will be restarted", StartedAt: metav1.NewTime(started), FinishedAt: finished}}
			if delay > 0 {
				cs.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff",
					Message: fmt.Sprintf("back-off %s restarting failed container=%s pod=%s", delay, cs.Name, cur.Name)}}
			}
		}
	})
	if delay > 0 {
		select {
		case <-pr.stop:
			return false
		case <-time.After(delay):
		}
	}
	pr.backoff = min(max(2*pr.backoff, backoffInitial), backoffMax)
	if k.hooks.Start != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_, err := k.hooks.Start(ctx, p)
		cancel()
		if err != nil {
			k.fail(fmt.Errorf("restart pod %s after its liveness probe failed: %w", p.Name, err))
		}
	}
	now := metav1.Now()
	pr.update(func(cur *corev1.Pod) {
		for i := range cur.Status.ContainerStatuses {
			cur.Status.ContainerStatuses[i].State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
		}
	})
	return true
}

// update applies f to the pod's current status (retrying a conflict).
func (pr *prober) update(f func(*corev1.Pod)) {
	k := pr.k
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := k.cs.CoreV1().Pods(k.ns).Get(ctx, pr.pod.Name, metav1.GetOptions{})
		if err != nil || cur.UID != pr.pod.UID {
			return nil // gone or replaced: nothing to report
		}
		f(cur)
		_, err = k.cs.CoreV1().Pods(k.ns).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		k.fail(fmt.Errorf("probe status of pod %s: %w", pr.pod.Name, err))
	}
}
