package lab

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// SlowLink is a TCP proxy on loopback that plays a bad network between a client and a
// server: it passes bytes at a set rate in both directions (0: unlimited) and can stall
// a connection after some bytes from the server, holding it open without a byte more,
// as a hung tunnel or a dying link does.
type SlowLink struct {
	Addr   string
	target string
	ln     net.Listener

	mu         sync.Mutex
	rate       int   // bytes per second, 0 = unlimited
	stallAfter int64 // bytes from the server before the link stalls, 0 = never
	gen        int   // bumped by StallAfter: counting starts again
	// deafAfter is the bytes from the client a connection takes before the server
	// "stops reading": nothing more is read from the client (its writes block once the
	// socket buffers fill) and nothing more reaches it. 0 = never.
	deafAfter int64
	conns     []net.Conn
	closed    chan struct{}
}

// StartSlowLink proxies a loopback port to target until the test ends.
func StartSlowLink(t testing.TB, target string) *SlowLink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &SlowLink{Addr: ln.Addr().String(), target: target, ln: ln, closed: make(chan struct{})}
	go s.serve()
	t.Cleanup(s.Close)
	return s
}

// SetRate limits both directions to bps bytes per second (0: unlimited).
func (s *SlowLink) SetRate(bps int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rate = bps
}

// StallAfter makes every connection, open or new, stop passing server bytes after n
// more of them (0: never).
func (s *SlowLink) StallAfter(n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stallAfter = n
	s.gen++
}

// StopReadingAfter makes every new connection play a server that stops reading after
// the first n bytes from the client (a handshake, a request): from then on the link
// reads nothing from the client and passes nothing back, holding the connection open
// (0: never).
func (s *SlowLink) StopReadingAfter(n int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deafAfter = n
}

// Close stops the proxy and drops its connections.
func (s *SlowLink) Close() {
	s.ln.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	for _, c := range s.conns {
		c.Close()
	}
}

func (s *SlowLink) serve() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", s.target)
		if err != nil {
			c.Close()
			continue
		}
		s.mu.Lock()
		s.conns = append(s.conns, c, u)
		deaf := s.deafAfter
		s.mu.Unlock()
		if deaf > 0 {
			d := &deafness{after: deaf, closed: s.closed, deaf: make(chan struct{})}
			go d.pipe(u, c, true)
			go d.pipe(c, u, false)
			continue
		}
		go s.pipe(u, c, false)
		go s.pipe(c, u, true)
	}
}

// deafness is one connection of a server that stops reading after some client bytes.
type deafness struct {
	after  int64
	closed chan struct{}
	deaf   chan struct{}
	once   sync.Once
}

// pipe copies src to dst until the client has sent d.after bytes; then both directions
// stop (nothing read, nothing passed) until the link closes.
func (d *deafness) pipe(dst, src net.Conn, fromClient bool) {
	var n int64
	buf := make([]byte, 512)
	for {
		select {
		case <-d.deaf:
			<-d.closed
			return
		default:
		}
		chunk := buf
		if fromClient && int64(len(chunk)) > d.after-n {
			chunk = buf[:d.after-n]
		}
		k, err := src.Read(chunk)
		if k > 0 {
			select {
			case <-d.deaf:
				<-d.closed // the answer to a request the server no longer hears
				return
			default:
			}
			if _, werr := dst.Write(chunk[:k]); werr != nil {
				return
			}
			if n += int64(k); fromClient && n >= d.after {
				d.once.Do(func() { close(d.deaf) })
			}
		}
		if err != nil {
			if c, ok := dst.(*net.TCPConn); ok {
				_ = c.CloseWrite()
			}
			return
		}
	}
}

// pipe copies src to dst in small chunks at the current rate; from the server (stalls)
// it stops copying once the stall setting is reached, keeping both ends open.
func (s *SlowLink) pipe(dst, src net.Conn, stalls bool) {
	buf := make([]byte, 512)
	var n int64
	gen := -1
	for {
		s.mu.Lock()
		stall, g := s.stallAfter, s.gen
		s.mu.Unlock()
		if !stalls {
			stall = 0
		}
		if g != gen {
			gen, n = g, 0
		}
		if stall > 0 && n >= stall {
			_, _ = io.Copy(io.Discard, src) // hold the line: read nothing more through
			return
		}
		chunk := buf
		if stall > 0 && int64(len(chunk)) > stall-n {
			chunk = buf[:stall-n]
		}
		k, err := src.Read(chunk)
		if k > 0 {
			if _, werr := dst.Write(chunk[:k]); werr != nil {
				return
			}
			n += int64(k)
			s.mu.Lock()
			rate := s.rate
			s.mu.Unlock()
			if rate > 0 {
				time.Sleep(time.Duration(k) * time.Second / time.Duration(rate))
			}
		}
		if err != nil {
			if c, ok := dst.(*net.TCPConn); ok {
				_ = c.CloseWrite()
			}
			return
		}
	}
}
