package lab

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

// The control plane is started once per test binary (it takes seconds) and shared;
// each test uses its own namespace.
var shared struct {
	once sync.Once
	cp   *ControlPlane
	dir  string
	err  error
}

// SharedControlPlane starts the test binary's control plane on first use and returns it.
// The test binary's TestMain must call RunTests so that it is stopped at the end.
func SharedControlPlane(t testing.TB) *ControlPlane {
	t.Helper()
	bins := Need(t)
	shared.once.Do(func() {
		shared.dir, shared.err = os.MkdirTemp("", "pva-lab-kube-")
		if shared.err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		shared.cp, shared.err = StartControlPlane(ctx, bins, shared.dir)
	})
	if shared.err != nil {
		t.Fatalf("start the lab control plane: %v", shared.err)
	}
	return shared.cp
}

// RunTests runs m and then stops the shared control plane, if one was started.
func RunTests(m *testing.M) int {
	code := m.Run()
	if shared.cp != nil {
		shared.cp.Close()
	}
	switch {
	case shared.dir != "" && code == 0:
		_ = os.RemoveAll(shared.dir)
	case shared.dir != "":
		fmt.Fprintf(os.Stderr, "lab: control plane state and logs kept in %s\n", shared.dir)
	}
	return code
}
