package main

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/internal/sdnotify"
)

func newRunCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon: keep every Vault pod unsealed and backed up (the systemd service)",
		Long: `Watches every Vault server pod and unseals it whenever it is sealed — after a reboot of
the host, a VM or a pod, or Vault restarting inside it — with capped back-off for
unreachable pods. Renews the agent's tokens at a third of their period, takes snapshots on
snapshots.schedule (anchored to the newest snapshot on disk: a missed slot runs at once),
serves Prometheus metrics on metrics.listen, speaks sd_notify (READY=1, STATUS=, WATCHDOG=1
while its loop is alive, STOPPING=1), reloads configuration and keyfile on SIGHUP (a
failed reload keeps everything running) and stops cleanly on SIGTERM.
A bad configuration exits 78, the one code the unit does not restart on.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runDaemon(cmd.Context(), g) },
	}
}

func runDaemon(ctx context.Context, g *globalOptions) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	err := agent.Run(ctx, agent.DaemonOptions{
		Load: g.environment, Reload: hup, Notify: sdnotify.FromEnv(), WatchdogInterval: sdnotify.WatchdogInterval(),
	})
	if err != nil && errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
