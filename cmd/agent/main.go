// Command pve-vault-agent keeps a HashiCorp Vault, deployed by the official Helm chart
// with Raft storage in a Kubernetes cluster of Proxmox VMs, provisioned, unsealed and
// backed up. This package only wires verbs, flags and configuration to the agent: one
// file per verb, each an options struct and a runX function.
//
// The runtime does not re-read the cgroup's CPU limit every second (Go 1.25's
// container-aware GOMAXPROCS): the idle daemon's wake-ups are what it costs a hypervisor,
// and the limit of a host's service does not change under it.
//
//go:debug updatemaxprocs=0
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
