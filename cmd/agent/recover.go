package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

// confirm asks on a terminal; without one, --yes is required.
func confirm(g *globalOptions, yes bool, question string) error {
	if yes {
		return nil
	}
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return usageErrorf("%s: not a terminal to ask on; pass --yes to proceed", question)
	}
	fmt.Fprintf(g.stderr, "%s [y/N] ", question)
	answer, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
		return errors.New("cancelled")
	}
	return nil
}

func newRecoverCommand(g *globalOptions) *cobra.Command {
	var file, output string
	var latest, dryRun, yes bool
	cmd := &cobra.Command{
		Use:   "recover [--snapshot FILE | --latest]",
		Short: "After a node rebuild: provision, install, restore the snapshot, unseal (resumable)",
		Long: `Brings Vault back from a snapshot after its data was lost: checks the snapshot offline
and that the keyfile holds its keys (refused before anything changes otherwise), then
provision → install → open the first pod (a throwaway init when its data is gone) →
snapshot-force → unseal with the snapshot's keys → join and unseal the other pods and
remove stale Raft peers → verify. Each step checks state first: re-run it after any
failure or interruption and it continues. Prints its plan first; asks before changing
anything unless --yes. --dry-run stops after the checks.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := outputFormat(output, "text", "json"); err != nil {
				return err
			}
			if file != "" && latest {
				return usageErrorf("--snapshot and --latest exclude each other")
			}
			log, cfg, err := g.setup()
			if err != nil {
				return err
			}
			fmt.Fprintln(g.stderr, "recover plan:")
			for i, s := range agent.RecoverPlan {
				fmt.Fprintf(g.stderr, "  %d. %s\n", i+1, s)
			}
			if !dryRun {
				if err := confirm(g, yes, "restore Vault from a snapshot, replacing whatever the first pod holds?"); err != nil {
					return err
				}
			}
			rep, err := agent.Recover(cmd.Context(), cfg, agent.RecoverOptions{Snapshot: file, DryRun: dryRun}, log)
			if output == "json" {
				writeJSON(g, rep)
			} else if rep != nil {
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "STEP\tTIME\tRESULT")
				for _, s := range rep.Steps {
					fmt.Fprintf(tw, "%s\t%s\t%s\n", s.Name, s.Duration.Round(time.Millisecond), s.Result)
				}
				tw.Flush()
			}
			if errors.Is(err, agent.ErrUnknownKeyset) || errors.Is(err, agent.ErrNoSnapshot) {
				return fmt.Errorf("recover refused, nothing changed: %w", err)
			}
			if err != nil {
				return fmt.Errorf("recover: %w (re-run recover to continue)", err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&file, "snapshot", "", "snapshot file to restore (default: the newest verified one)")
	f.BoolVar(&latest, "latest", false, "restore the newest verified snapshot (the default)")
	f.BoolVar(&dryRun, "dry-run", false, "check the snapshot and keys, print the plan, change nothing")
	f.BoolVar(&yes, "yes", false, "do not ask")
	f.StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func newRestoreCommand(g *globalOptions) *cobra.Command {
	var force, yes bool
	var output string
	cmd := &cobra.Command{
		Use:   "restore FILE",
		Short: "Restore a snapshot into the running Vault cluster",
		Long: `Verifies FILE offline and that the keyfile holds its keys before touching Vault, then
uploads it to the active node with a root token generated from the keys (revoked after).
A snapshot of another cluster needs --force (snapshot-force). Asks first unless --yes.
Changes: all of Vault's data, replaced by the snapshot's.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageErrorf("restore takes one snapshot file")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			log, cfg, err := g.start(output)
			if err != nil {
				return err
			}
			if err := confirm(g, yes, "replace all of Vault's data with "+args[0]+"?"); err != nil {
				return err
			}
			rep, err := agent.Restore(cmd.Context(), cfg, args[0], agent.RestoreOptions{Force: force}, log)
			if err != nil {
				return fmt.Errorf("restore: %w", err)
			}
			if output == "json" {
				writeJSON(g, rep)
			} else {
				fmt.Fprintf(g.stdout, "restored %s through %s (forced: %v)\n", rep.Snapshot, rep.Pod, rep.Forced)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "restore a snapshot of another cluster")
	cmd.Flags().BoolVar(&yes, "yes", false, "do not ask")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func newStatusCommand(g *globalOptions) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "One screen: nodes, hostPaths, release, pods, keyfile, snapshots (changes nothing)",
		Long:  "Reads everything the agent looks after and lists what needs attention. Exit 1 when something does.",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, cfg, err := g.start(output)
			if err != nil {
				return err
			}
			st := agent.GetStatus(cmd.Context(), cfg, time.Now(), log)
			if output == "json" {
				writeJSON(g, st)
			} else {
				printStatus(g, st)
			}
			if len(st.Attention) > 0 {
				return fmt.Errorf("%d thing(s) need attention", len(st.Attention))
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func printStatus(g *globalOptions, st *agent.Status) {
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tVM\tADDRESS\tHOSTPATH\tOWNER\tMODE")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, dash(n.VMStatus), dash(n.Address), n.HostPath, dash(n.Owner), dash(n.Mode))
	}
	tw.Flush()
	if r := st.Release; r != nil {
		fmt.Fprintf(g.stdout, "\nrelease %s/%s: revision %d, %s, chart %s\n", r.Namespace, r.Name, r.Revision, r.Status, r.ChartVersion)
	}
	fmt.Fprintln(g.stdout)
	tw = tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tINITIALISED\tSEALED\tACTIVE\tVERSION")
	for _, p := range st.Pods {
		fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%v\t%s\n", p.Name, dash(p.Node), p.Initialized, p.Sealed, p.Active, dash(p.Version))
	}
	tw.Flush()
	if k := st.Keyfile; k != nil {
		fmt.Fprintf(g.stdout, "\nkeyfile: cluster %s, %d shares / threshold %d, keyset %s, created %s\n", k.ClusterID, k.Shares, k.Threshold, k.Fingerprint, k.Created.Format(time.RFC3339))
	}
	if s := st.LastSnapshot; s != nil {
		fmt.Fprintf(g.stdout, "last snapshot: %s ago, verified %v (%s)\n", s.Age, s.Verified, s.Path)
	}
	if !st.NextBackup.IsZero() {
		fmt.Fprintf(g.stdout, "next scheduled backup: %s\n", st.NextBackup.Format(time.RFC3339))
	}
	if len(st.Attention) == 0 {
		fmt.Fprintln(g.stdout, "\nall good")
		return
	}
	fmt.Fprintln(g.stdout, "\nneeds attention:")
	for _, a := range st.Attention {
		fmt.Fprintf(g.stdout, "  - %s\n", a)
	}
}
