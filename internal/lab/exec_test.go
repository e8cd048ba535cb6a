package lab

import (
	"context"
	"os/exec"
	"strconv"
)

func execCmd(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, name, args...)
}

func itoa(i int) string { return strconv.Itoa(i) }
