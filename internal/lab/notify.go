package lab

import (
	"net"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// NotifySocket listens where a daemon sends sd_notify messages (NOTIFY_SOCKET), as
// systemd does, recording each with its arrival time.
type NotifySocket struct {
	Path string
	l    *net.UnixConn
	mu   sync.Mutex
	msgs []notifyMsg
}

type notifyMsg struct {
	at   time.Time
	text string
}

// ListenNotify listens on dir/notify until Close.
func ListenNotify(dir string) (*NotifySocket, error) {
	ns := &NotifySocket{Path: filepath.Join(dir, "notify")}
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: ns.Path, Net: "unixgram"})
	if err != nil {
		return nil, err
	}
	ns.l = l
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := l.ReadFromUnix(buf)
			if err != nil {
				return
			}
			ns.mu.Lock()
			ns.msgs = append(ns.msgs, notifyMsg{time.Now(), string(buf[:n])})
			ns.mu.Unlock()
		}
	}()
	return ns, nil
}

// Close stops listening.
func (ns *NotifySocket) Close() { ns.l.Close() }

// Received reports whether any message so far contains s (READY=1, STATUS=…).
func (ns *NotifySocket) Received(s string) bool {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	for _, m := range ns.msgs {
		if strings.Contains(m.text, s) {
			return true
		}
	}
	return false
}

// Pings lists when WATCHDOG=1 arrived in [from, to).
func (ns *NotifySocket) Pings(from, to time.Time) []time.Time {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	var out []time.Time
	for _, m := range ns.msgs {
		if strings.Contains(m.text, "WATCHDOG=1") && !m.at.Before(from) && m.at.Before(to) {
			out = append(out, m.at)
		}
	}
	return out
}
