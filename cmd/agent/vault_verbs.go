package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/internal/sdnotify"
	"github.com/pve-vault-agent/pve-vault-agent/vault"
)

type initOptions struct {
	recoveryRecipient string
	output            string
}

func newInitCommand(g *globalOptions) *cobra.Command {
	opts := &initOptions{}
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Initialise Vault once and seal its unseal keys into the keyfile",
		Long: `Initialises Vault with vault.shares/vault.threshold, writes the unseal shares straight
into the sealed keyfile (systemd-creds or age; never plaintext on disk, never printed),
creates a least-privilege periodic token for snapshots, revokes the root token and
unseals every pod. With --recovery-recipient (or vault.recovery_recipient) a second copy
is encrypted to an offline age key, for the day this host is lost.

Refuses when a keyfile exists or when any pod is already initialised: not safe to
re-run by design. Changes: Vault (initialised, policy and token created), the keyfile.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, cfg, err := g.start(opts.output)
			if err != nil {
				return err
			}
			rep, err := agent.Init(cmd.Context(), cfg, agent.InitOptions{RecoveryRecipient: opts.recoveryRecipient}, log)
			if rep != nil {
				if opts.output == "json" {
					writeJSON(g, rep)
				} else {
					fmt.Fprintf(g.stdout, "initialised vault through pod %s\nkeyfile %s: %d shares, threshold %d, keyset %s, cluster %s\n",
						rep.Pod, rep.Keyfile, rep.Meta.Shares, rep.Meta.Threshold, rep.Meta.Fingerprint, rep.Meta.ClusterID)
					if rep.RecoveryCopy != "" {
						fmt.Fprintf(g.stdout, "offline recovery copy %s (age); move it off this host\n", rep.RecoveryCopy)
					}
					for _, p := range rep.Unsealed {
						fmt.Fprintf(g.stdout, "unsealed %s\n", p)
					}
				}
			}
			if err != nil {
				return fmt.Errorf("init: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&opts.recoveryRecipient, "recovery-recipient", "", "age public key (age1…) that receives an offline copy of the keyfile")
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func newUnsealCommand(g *globalOptions) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "unseal",
		Short: "Unseal every sealed Vault pod now (safe to re-run)",
		Long: `Reads the sealed keyfile and unseals each sealed Vault pod, resetting a stale unseal in
progress first. Shares of another cluster are detected at the threshold, the progress is
reset, and the pod is reported. A pod that is uninitialised while the agent holds a
keyfile is reported (its data is gone): use recover. Changes: the seal state of Vault.
Safe to re-run. Exit 1 if any pod stays sealed.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, cfg, err := g.start(output)
			if err != nil {
				return err
			}
			res, err := agent.Unseal(cmd.Context(), cfg, log)
			if output == "json" {
				writeJSON(g, res)
			} else if len(res) > 0 {
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "POD\tWAS\tNOW\tSHARES")
				for _, r := range res {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", r.Node, sealWord(r.WasSealed), sealWord(r.Sealed), r.SharesUsed)
				}
				tw.Flush()
			}
			if err != nil {
				return fmt.Errorf("unseal: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func sealWord(sealed bool) string {
	if sealed {
		return "sealed"
	}
	return "unsealed"
}

func newKeyfileCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "keyfile", Short: "Inspect the sealed keyfile", Args: noArgs, RunE: showHelp}
	var output string
	check := &cobra.Command{
		Use:   "check",
		Short: "Prove the keyfile decrypts and show its non-secret metadata (changes nothing)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, cfg, err := g.start(output)
			if err != nil {
				return err
			}
			s, err := agent.KeyfileSealer(cfg)
			if err != nil {
				return err
			}
			kf, err := vault.ReadKeyfile(cmd.Context(), cfg.Vault.Keyfile, s)
			if err != nil {
				return fmt.Errorf("keyfile check: %w", err)
			}
			m := kf.Meta()
			if output == "json" {
				writeJSON(g, m)
				return nil
			}
			fmt.Fprintf(g.stdout, "keyfile %s decrypts (%s)\ncluster %s (%s)\nshares %d, threshold %d, keyset %s\nsnapshot token: %v\ncreated %s\n",
				cfg.Vault.Keyfile, cfg.Vault.Seal, m.ClusterID, m.ClusterName, m.Shares, m.Threshold, m.Fingerprint, m.HasToken, m.Created.Format("2006-01-02 15:04:05 MST"))
			return nil
		},
	}
	check.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	cmd.AddCommand(check)
	return cmd
}

func newRunCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon: keep every Vault pod unsealed (the systemd service)",
		Long: `Watches every Vault server pod and unseals it whenever it is sealed — after a reboot of
the host, a VM or a pod, or Vault restarting — with capped back-off for unreachable pods.
Speaks sd_notify (READY=1, STATUS=, WATCHDOG=1, STOPPING=1), serves Prometheus metrics on
metrics.listen, reloads configuration and keyfile on SIGHUP and stops cleanly on SIGTERM.
A bad configuration exits 2 (the unit does not restart on it).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			if _, err := g.loadConfig(); err != nil {
				return err
			}
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			n := sdnotify.FromEnv()
			err = agent.Run(cmd.Context(), agent.DaemonOptions{
				Load: g.loadConfig, Reload: hup, Notify: n, WatchdogInterval: sdnotify.WatchdogInterval(), Version: version,
			}, log)
			if err != nil && errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		},
	}
}
