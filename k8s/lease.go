package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

// ErrLeaseNotHeld means the Lease is not this identity's, or its hold ran out.
var ErrLeaseNotHeld = errors.New("the Lease is not held by this agent")

// Election is one identity's part in the leader election of the agents of a Proxmox
// cluster: client-go's leaderelection on the coordination.k8s.io Lease Name in the
// cluster's namespace.
type Election struct {
	Name, Identity                            string
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// OnNewLeader is told every holder the elector observes.
	OnNewLeader func(identity string)
	Log         *slog.Logger
}

func (c *Cluster) leaseLock(e Election) *resourcelock.LeaseLock {
	return &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: e.Name, Namespace: c.cfg.Namespace},
		Client:     c.Clients.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: e.Identity},
	}
}

// Elect takes part in the election until this identity has held the Lease and lost it,
// or ctx ends. While it holds the Lease, lead runs (in the caller's goroutine) with a
// context that ends the moment it stops holding it (a renewal that failed for
// RenewDeadline); Elect returns only after lead has. A leader that stops cleanly
// releases the Lease, so another takes over at once.
func (c *Cluster) Elect(ctx context.Context, e Election, lead func(lctx context.Context)) error {
	started := make(chan context.Context, 1)
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: c.leaseLock(e), Name: "pve-vault-agent",
		LeaseDuration: e.LeaseDuration, RenewDeadline: e.RenewDeadline, RetryPeriod: e.RetryPeriod,
		ReleaseOnCancel: true,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(lctx context.Context) { started <- lctx },
			OnStoppedLeading: func() {},
			OnNewLeader: func(holder string) {
				if e.OnNewLeader != nil {
					e.OnNewLeader(holder)
				}
			},
		},
	})
	if err != nil {
		return err
	}
	// client-go logs through klog's context logger: into the agent's log, not stderr.
	log := e.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	kctx := klog.NewContext(ctx, logr.FromSlogHandler(log.Handler()))
	ran := make(chan struct{})
	go func() { defer close(ran); le.Run(kctx) }()
	select {
	case lctx := <-started:
		lead(lctx)
		<-ran
	case <-ran:
	}
	return nil
}

// LeaseOnce does to the Lease what one election round does, with this account: get it,
// then create it when there is none, or write it back unchanged. It takes nothing from a
// holder (the record written back is the one read) and returns what the API server said:
// a refusal names the rule the account lacks.
func (c *Cluster) LeaseOnce(ctx context.Context, e Election) error {
	lock := c.leaseLock(e)
	rec, _, err := lock.Get(ctx)
	switch {
	case apierrors.IsNotFound(err):
		err = lock.Create(ctx, resourcelock.LeaderElectionRecord{LeaseDurationSeconds: int(e.LeaseDuration.Seconds())})
	case err == nil:
		err = lock.Update(ctx, *rec)
	}
	if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) {
		return nil // another agent wrote it in between: the account may
	}
	return err
}

// LeaseState is what the Lease says.
type LeaseState struct {
	Holder   string
	Renewed  time.Time
	Duration time.Duration
}

// Lease reads the Lease name.
func (c *Cluster) Lease(ctx context.Context, name string) (LeaseState, error) {
	l, err := c.Clients.CoordinationV1().Leases(c.cfg.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return LeaseState{}, err
	}
	var st LeaseState
	if l.Spec.HolderIdentity != nil {
		st.Holder = *l.Spec.HolderIdentity
	}
	if l.Spec.RenewTime != nil {
		st.Renewed = l.Spec.RenewTime.Time
	}
	if l.Spec.LeaseDurationSeconds != nil {
		st.Duration = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
	}
	return st, nil
}

// HoldsLease reads the Lease itself, not an elector's memory of it: nil only when its
// holder is identity and its last renewal is within its duration at now.
func (c *Cluster) HoldsLease(ctx context.Context, name, identity string, now time.Time) error {
	st, err := c.Lease(ctx, name)
	switch {
	case err != nil:
		return fmt.Errorf("%w: read the Lease %s: %v", ErrLeaseNotHeld, name, err)
	case st.Holder != identity:
		return fmt.Errorf("%w: the Lease %s is held by %q", ErrLeaseNotHeld, name, st.Holder)
	case st.Renewed.Add(st.Duration).Before(now):
		return fmt.Errorf("%w: the hold on the Lease %s ran out at %s", ErrLeaseNotHeld, name, st.Renewed.Add(st.Duration).UTC().Format(time.RFC3339))
	}
	return nil
}
