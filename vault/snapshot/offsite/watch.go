package offsite

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ErrIdle ends a target attempt on which nothing moved for the idle deadline: a server
// that stopped reading, a hung SFTP subsystem behind a live SSH connection, an S3
// endpoint that accepted a request and never answered.
var ErrIdle = errors.New("the target stopped answering")

// Activity is the progress of one attempt on a target: bytes taken from an upload's
// source, bytes read from a downloaded object, calls started and returned, and for
// targets whose transport has no traffic of its own (HTTP), bytes moved on the wire.
type Activity struct {
	last atomic.Int64 // unix nanos of the last progress
	busy atomic.Int32 // calls in flight and objects open: idle counts only while > 0
}

// NewActivity starts counting now.
func NewActivity() *Activity {
	a := &Activity{}
	a.Touch()
	return a
}

// Touch records progress.
func (a *Activity) Touch() { a.last.Store(time.Now().UnixNano()) }

// idleFor is how long a call in flight has moved nothing (0 while none is in flight:
// an operator reading a prompt is not a hung server).
func (a *Activity) idleFor() time.Duration {
	if a.busy.Load() == 0 {
		return 0
	}
	return time.Since(time.Unix(0, a.last.Load()))
}

func (a *Activity) begin() { a.Touch(); a.busy.Add(1) }
func (a *Activity) end()   { a.busy.Add(-1); a.Touch() }

// Watch returns t with its calls and object bytes counted by a, and a watchdog that
// calls abort (closing the target's connection, so the blocked call fails) when a call
// has moved nothing for idle. stop ends the watchdog.
func Watch(t Target, a *Activity, idle time.Duration, abort func()) (Target, func()) {
	if idle <= 0 {
		idle = 2 * time.Minute
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(max(idle/8, 10*time.Millisecond))
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if a.idleFor() >= idle {
					if abort != nil {
						abort()
					}
					return
				}
			}
		}
	}()
	var once sync.Once
	return watched{t, a}, func() { once.Do(func() { close(done) }) }
}

// Conn counts every byte read or written on c as progress. Only for transports without
// keepalive traffic of their own (HTTP): an SSH server's keepalives would count as
// progress while the SFTP subsystem behind it hangs.
func (a *Activity) Conn(c net.Conn) net.Conn { return &activeConn{Conn: c, a: a} }

type activeConn struct {
	net.Conn
	a *Activity
}

func (c *activeConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.a.Touch()
	}
	return n, err
}

func (c *activeConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.a.Touch()
	}
	return n, err
}

// Attempt runs f on t, one attempt of the agent's, under an idle deadline: whenever
// nothing moved for idle (see Activity), or ctx ends, abort is called to close the
// target's connection so every blocked call returns (pkg/sftp does not watch contexts
// inside a transfer), and f's context is cancelled. If f still has not returned a
// grace period later (a hung NFS mount blocks in the kernel, where nothing can reach
// it), Attempt returns without it: the attempt is abandoned, its goroutine left to
// finish or hang on its own, and the caller is free to go on (its lock released, the
// next slot run).
func Attempt(ctx context.Context, t Target, a *Activity, idle time.Duration, abort func(), f func(context.Context, Target) error) error {
	if idle <= 0 {
		idle = 2 * time.Minute
	}
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f(actx, watched{t, a}) }()
	check := time.NewTicker(max(idle/8, 10*time.Millisecond))
	defer check.Stop()
	var why error
	var once sync.Once
	stop := func(err error) {
		once.Do(func() {
			why = err
			cancel()
			if abort != nil {
				abort()
			}
		})
	}
	var grace <-chan time.Time
	for {
		select {
		case err := <-done:
			if why != nil {
				return fmt.Errorf("%s: %w (%v)", t, why, err)
			}
			return err
		case <-ctx.Done():
			stop(ctx.Err())
		case <-check.C:
			if d := a.idleFor(); d >= idle {
				stop(fmt.Errorf("%w: nothing moved for %s", ErrIdle, d.Round(time.Second)))
			}
		}
		if why != nil && grace == nil {
			grace = time.After(max(idle/2, 5*time.Second))
		}
		select {
		case <-grace:
			return fmt.Errorf("%s: %w; the attempt did not return after its connection was closed and was abandoned", t, why)
		default:
		}
	}
}

// watched counts a target's calls and the bytes of its objects as activity.
type watched struct {
	Target
	a *Activity
}

func (w watched) call(f func() error) error {
	w.a.begin()
	defer w.a.end()
	return f()
}

func (w watched) Put(ctx context.Context, name string, r io.Reader, size int64) error {
	return w.call(func() error { return w.Target.Put(ctx, name, activeReader{r, w.a}, size) })
}

func (w watched) Open(ctx context.Context, name string) (io.ReadCloser, error) {
	var rc io.ReadCloser
	err := w.call(func() (err error) { rc, err = w.Target.Open(ctx, name); return err })
	if err != nil {
		return nil, err
	}
	w.a.begin() // an open object is a call in flight until closed
	return &activeObject{activeReader{rc, w.a}, rc, w.a, sync.Once{}}, nil
}

type activeObject struct {
	activeReader
	c    io.Closer
	a    *Activity
	once sync.Once
}

func (o *activeObject) Close() error {
	o.once.Do(o.a.end)
	return o.c.Close()
}

func (w watched) List(ctx context.Context, prefix string) (out []Object, err error) {
	err = w.call(func() error { out, err = w.Target.List(ctx, prefix); return err })
	return out, err
}

func (w watched) Check(ctx context.Context, name string, size int64, sum string) error {
	if w.Target.ReadsBack() {
		return checkObject(ctx, w, name, size, sum) // through w.Open: its bytes count
	}
	return w.call(func() error { return w.Target.Check(ctx, name, size, sum) })
}

func (w watched) Remove(ctx context.Context, name string) error {
	return w.call(func() error { return w.Target.Remove(ctx, name) })
}

func (w watched) Clean(ctx context.Context) error {
	return w.call(func() error { return w.Target.Clean(ctx) })
}

type activeReader struct {
	r io.Reader
	a *Activity
}

func (r activeReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.a.Touch()
	}
	return n, err
}
