package vault

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// ErrStalled means a snapshot stream moved no byte for its idle timeout.
var ErrStalled = errors.New("snapshot stream stalled")

// StreamSnapshot streams GET sys/storage/raft/snapshot with tok into w. Vault sends the
// archive chunked, without a length; nothing is buffered here. There is no total
// timeout (a large snapshot over a slow tunnel takes what it takes): the stream ends
// with ctx, or with ErrStalled when less than 8 KiB arrives in idle.
func (n *Node) StreamSnapshot(ctx context.Context, tok Token, idle time.Duration, w io.Writer) (int64, error) {
	c, err := n.streamWithToken(tok)
	if err != nil {
		return 0, err
	}
	ctx, watch := watchIdle(ctx, idle)
	defer watch.stop()
	resp, err := c.Logical().ReadRawWithContext(ctx, "sys/storage/raft/snapshot")
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		if IsPermissionDenied(err) {
			return 0, fmt.Errorf("%s: %w: the snapshot token was refused (revoked or expired?)", n.Name, ErrTokenRefused)
		}
		return 0, fmt.Errorf("%s: snapshot: %w", n.Name, watch.cause(ctx, err))
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s: snapshot: HTTP %d", n.Name, resp.StatusCode)
	}
	written, err := io.Copy(w, &idleReader{r: resp.Body, w: watch})
	if err != nil {
		return written, fmt.Errorf("%s: snapshot stream after %d bytes: %w", n.Name, written, watch.cause(ctx, err))
	}
	return written, nil
}

// RestoreSnapshot uploads a Raft snapshot with tok (the operator token, or the initial
// root token of a throwaway cluster). force restores a snapshot of another cluster
// (snapshot-force): Vault then seals and opens only with the keys of the snapshot's
// cluster. The upload is bounded by ctx and by idle (no byte taken for that long); the
// wait for Vault's answer after the last byte only by ctx. Vault 2.x answers once it
// has accepted the file and applies it in the background: the caller waits for the
// restore to show (see the agent's restore flows) before relying on it.
func (n *Node) RestoreSnapshot(ctx context.Context, tok Token, r io.Reader, force bool, idle time.Duration) error {
	c, err := n.streamWithToken(tok)
	if err != nil {
		return err
	}
	ctx, watch := watchIdle(ctx, idle)
	defer watch.stop()
	body := &idleReader{r: r, w: watch, stopAtEOF: true}
	if err := c.Sys().RaftSnapshotRestoreWithContext(ctx, body, force); err != nil {
		if IsPermissionDenied(err) {
			return fmt.Errorf("%s: restore snapshot: %w", n.Name, ErrTokenRefused)
		}
		return fmt.Errorf("%s: restore snapshot: %w", n.Name, watch.cause(ctx, err))
	}
	return nil
}

// idleWatch cancels a context when touch is not called for idle.
type idleWatch struct {
	mu      sync.Mutex
	timer   *time.Timer
	idle    time.Duration
	cancel  context.CancelCauseFunc
	stopped bool
}

func watchIdle(ctx context.Context, idle time.Duration) (context.Context, *idleWatch) {
	ctx, cancel := context.WithCancelCause(ctx)
	w := &idleWatch{idle: idle, cancel: cancel}
	if idle > 0 {
		w.timer = time.AfterFunc(idle, func() {
			cancel(fmt.Errorf("%w: no byte moved for %s", ErrStalled, idle))
		})
	}
	return ctx, w
}

func (w *idleWatch) touch() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.timer != nil && !w.stopped {
		w.timer.Reset(w.idle)
	}
}

// pause stops the idle clock (the body is sent; Vault is working on it).
func (w *idleWatch) pause() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	if w.timer != nil {
		w.timer.Stop()
	}
}

func (w *idleWatch) stop() {
	w.pause()
	w.cancel(nil)
}

// cause prefers the stall over the generic "context canceled" it produced.
func (w *idleWatch) cause(ctx context.Context, err error) error {
	if c := context.Cause(ctx); errors.Is(c, ErrStalled) {
		return c
	}
	return err
}

// idleReadSize caps each read, so progress is seen while a large HTTP chunk is still
// arriving (net/http's chunked reader returns only when a chunk or the buffer is full):
// the idle timeout then means "less than 8 KiB moved in that time".
const idleReadSize = 8 << 10

type idleReader struct {
	r         io.Reader
	w         *idleWatch
	stopAtEOF bool
}

func (r *idleReader) Read(p []byte) (int, error) {
	if len(p) > idleReadSize {
		p = p[:idleReadSize]
	}
	n, err := r.r.Read(p)
	if n > 0 {
		r.w.touch()
	}
	if err == io.EOF && r.stopAtEOF {
		r.w.pause()
	}
	return n, err
}
