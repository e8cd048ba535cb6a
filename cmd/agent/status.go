package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type statusOptions struct {
	output string
}

func newStatusCommand(g *globalOptions) *cobra.Command {
	opts := &statusOptions{}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "One screen: nodes, hostPaths, release, pods, keyfile, tokens, snapshots (changes nothing)",
		Long:  "Reads everything the agent looks after and lists what needs attention. Exit 1 when something does.",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runStatus(cmd.Context(), opts, env, g)
		},
	}
	cmd.Flags().StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runStatus(ctx context.Context, opts *statusOptions, env *agent.Env, g *globalOptions) error {
	st := agent.GetStatus(ctx, env)
	var err error
	if len(st.Attention) > 0 {
		err = fmt.Errorf("%d thing(s) need attention", len(st.Attention))
	}
	return report(g, opts.output, st, func(w io.Writer) { printStatus(w, st) }, err)
}

func printStatus(w io.Writer, st *agent.Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tVM\tADDRESS\tHOSTPATH\tOWNER\tMODE")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, dash(n.VMStatus), dash(n.Address), n.HostPath, dash(n.Owner), dash(n.Mode))
	}
	tw.Flush()
	if r := st.Release; r != nil && r.FromStatefulSet {
		fmt.Fprintf(w, "\nrelease %s/%s: chart %s (from its StatefulSet: the operate account does not read Helm's records)\n", r.Namespace, r.Name, r.ChartVersion)
	} else if r != nil {
		fmt.Fprintf(w, "\nrelease %s/%s: revision %d, %s, chart %s\n", r.Namespace, r.Name, r.Revision, r.Status, r.ChartVersion)
	}
	if o := st.Owner; o != nil {
		fmt.Fprintf(w, "owned by %s; install.managed_by: %s\n", o, st.ManagedBy)
	}
	if h := st.HelmRelease; h != nil {
		fmt.Fprintf(w, "HelmRelease %s/%s: ready %s (%s), suspended %v\n", h.Namespace, h.Name, h.Ready, dash(h.Reason), h.Suspended)
	}
	if d := st.Drift; d != nil && d.Checked {
		if len(d.Keys) == 0 {
			fmt.Fprintln(w, "values: the live release has every value the agent requires")
		}
		for _, k := range d.Keys {
			fmt.Fprintf(w, "values drift: %s\n", k)
		}
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tINITIALISED\tSEALED\tACTIVE\tHEALTH\tVERSION")
	for _, p := range st.Pods {
		fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%v\t%d\t%s\n", p.Name, dash(p.Node), p.Initialized, p.Sealed, p.Active, p.Health, dash(p.Version))
	}
	tw.Flush()
	if k := st.Keyfile; k != nil {
		fmt.Fprintf(w, "\nkeyfile: cluster %s, %d shares / threshold %d, keyset %s, created %s\n", k.ClusterID, k.Shares, k.Threshold, k.Fingerprint, k.Created.Format(time.RFC3339))
		if k.ManifestKey != "" {
			fmt.Fprintf(w, "manifest key %s (write it down beside the offline key: recover --from … --manifest-key %s)\n", k.ManifestKey, k.ManifestKey)
		}
	}
	if r := st.RecoveryCopy; r != nil {
		fmt.Fprintf(w, "offline recovery copy: sealed to %s (vault.recovery_recipient %s)\n", dash(r.Recipient), dash(r.Configured))
	}
	printTokens(w, st.Tokens)
	if s := st.LastSnapshot; s != nil {
		fmt.Fprintf(w, "last snapshot: %s ago, verified %v (%s)\n", s.Age, s.Verified, s.Path)
	}
	if !st.NextBackup.IsZero() {
		fmt.Fprintf(w, "next scheduled backup: %s\n", st.NextBackup.Format(time.RFC3339))
	}
	if d := st.LastDrill; d != nil {
		verdict := "passed"
		if !d.Passed {
			verdict = "FAILED: " + d.Reason
		}
		fmt.Fprintf(w, "last restore drill: %s ago, %s (%.1f s, %s)\n", d.Age, verdict, d.DurationSecs, d.Snapshot)
	}
	for _, o := range st.Offsite {
		last := "never"
		if !o.LastSuccess.IsZero() {
			last = o.LastSuccess.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "off-host %s: last push %s, newest copy %s, %d failures, %s pushed\n", o.Target, last, dash(o.Newest), o.Failures, humanBytes(o.Bytes))
	}
	if c := st.Cluster; c != nil {
		fmt.Fprintf(w, "cluster: this host %s, leader %s (Lease %s renewed %s)\n", dash(c.Identity), dash(c.Leader), c.LeaseName, c.Renewed.Format(time.RFC3339))
		for _, k := range c.Keyfiles {
			if k.Error != "" {
				fmt.Fprintf(w, "  keyfile on %s: %s (%s)\n", k.Host, k.State, k.Error)
			} else {
				fmt.Fprintf(w, "  keyfile on %s: %s\n", k.Host, k.State)
			}
		}
	}
	for _, wmsg := range st.Warnings {
		fmt.Fprintf(w, "warning: %s\n", wmsg)
	}
	switch {
	case len(st.Attention) == 0 && len(st.Warnings) == 0:
		fmt.Fprintln(w, "\nall good")
		return
	case len(st.Attention) == 0:
		fmt.Fprintf(w, "\nnothing needs attention; %d warning(s) above\n", len(st.Warnings))
		return
	}
	fmt.Fprintln(w, "\nneeds attention:")
	for _, a := range st.Attention {
		fmt.Fprintf(w, "  - %s\n", a)
	}
}
