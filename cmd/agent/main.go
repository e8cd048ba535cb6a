// Command pve-vault-agent keeps a HashiCorp Vault, deployed by the official Helm chart
// with Raft storage in a Kubernetes cluster of Proxmox VMs, provisioned, unsealed and
// backed up. This package only wires verbs, flags and configuration to the agent: one
// file per verb, each an options struct and a runX function.
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
