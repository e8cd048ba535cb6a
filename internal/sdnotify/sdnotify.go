// Package sdnotify speaks systemd's notify protocol (sd_notify(3)): datagrams such as
// READY=1, STATUS=…, WATCHDOG=1 and STOPPING=1 to the unixgram socket in $NOTIFY_SOCKET.
// Outside systemd (no $NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same
// in a terminal.
package sdnotify

import (
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Notifier sends states to the service manager.
type Notifier struct {
	addr string
}

// FromEnv returns a Notifier for $NOTIFY_SOCKET (a no-op one when unset).
func FromEnv() *Notifier {
	return &Notifier{addr: os.Getenv("NOTIFY_SOCKET")}
}

// Enabled reports whether a service manager listens.
func (n *Notifier) Enabled() bool { return n != nil && n.addr != "" }

// Notify sends one or more "KEY=value" assignments in one datagram.
func (n *Notifier) Notify(states ...string) error {
	if !n.Enabled() {
		return nil
	}
	addr := n.addr
	if strings.HasPrefix(addr, "@") {
		addr = "\x00" + addr[1:] // abstract socket
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(strings.Join(states, "\n")))
	return err
}

// WatchdogInterval is how often to send WATCHDOG=1: half of $WATCHDOG_USEC, or 0 when
// the unit has no watchdog (or it is meant for another process: $WATCHDOG_PID).
func WatchdogInterval() time.Duration {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}
