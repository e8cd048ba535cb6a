package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// The protocol against a real unixgram socket, as systemd listens on one.
func TestNotifyOverUnixgram(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	n := FromEnv()
	if !n.Enabled() {
		t.Fatal("not enabled with NOTIFY_SOCKET set")
	}
	if err := n.Notify("READY=1", "STATUS=watching 3 pods"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256)
	_ = l.SetReadDeadline(time.Now().Add(5 * time.Second))
	k, _, err := l.ReadFromUnix(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:k]); got != "READY=1\nSTATUS=watching 3 pods" {
		t.Fatalf("datagram %q", got)
	}
}

func TestNoSocketIsNoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := FromEnv().Notify("READY=1"); err != nil {
		t.Fatal(err)
	}
}

func TestWatchdogInterval(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "30000000")
	t.Setenv("WATCHDOG_PID", "")
	if d := WatchdogInterval(); d != 15*time.Second {
		t.Fatalf("interval %s", d)
	}
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()+1))
	if d := WatchdogInterval(); d != 0 {
		t.Fatalf("another process's watchdog: %s", d)
	}
	t.Setenv("WATCHDOG_USEC", "")
	if d := WatchdogInterval(); d != 0 {
		t.Fatalf("no watchdog: %s", d)
	}
}
