package lab

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// Receiver is the lab's HTTP receiver of notifications: a webhook endpoint, and the
// publish endpoint of an ntfy server (POST /<topic>, the message as the body, the title
// in a header: docs.ntfy.sh/publish) for the shoutrrr path. It records every request.
type Receiver struct {
	URL string
	srv *httptest.Server
	mu  sync.Mutex
	got []Received
	// Status, when set, is what the receiver answers (a failing endpoint).
	status int
}

// Received is one request.
type Received struct {
	Path   string
	Header http.Header
	Body   []byte
}

// StartReceiver serves on 127.0.0.1 until the test ends.
func StartReceiver(t testing.TB) *Receiver {
	t.Helper()
	r := &Receiver{}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(req.Body, 1<<20))
		r.mu.Lock()
		r.got = append(r.got, Received{Path: req.URL.Path, Header: req.Header.Clone(), Body: body})
		status := r.status
		r.mu.Unlock()
		if status != 0 {
			w.WriteHeader(status)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"id":"lab","event":"message"}`))
	}))
	r.URL = r.srv.URL
	t.Cleanup(r.srv.Close)
	return r
}

// Answer makes the receiver answer status (0: 200 again).
func (r *Receiver) Answer(status int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.status = status
}

// Requests returns what arrived so far.
func (r *Receiver) Requests() []Received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Received(nil), r.got...)
}

// ListenSilent listens on addr (127.0.0.1:0 for any port) and accepts every connection
// without ever sending a byte: a server that hangs after the TCP handshake. It closes
// when the test ends (or with Close).
func ListenSilent(t testing.TB, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l
}
