package main

import (
	"context"
	"fmt"
	"io"
	"regexp"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type recoverOptions struct {
	snapshot string
	latest   bool
	from     string
	identity string
	manifest string
	force    bool
	dryRun   bool
	yes      bool
	output   string
	authFile string
}

func newRecoverCommand(g *globalOptions) *cobra.Command {
	opts := &recoverOptions{}
	cmd := &cobra.Command{
		Use:   "recover [--snapshot FILE | --latest | --from TARGET --identity FILE]",
		Short: "After a node rebuild: provision, install, restore the snapshot, unseal (resumable)",
		Long: `Brings Vault back from a snapshot after its data was lost. Checks the snapshot offline and
that the keyfile holds its keys (refused before anything changes otherwise), then
provisions, installs, opens the first pod (a throwaway init when its data is gone),
restores the snapshot with the throwaway's own root token, waits until it is applied,
unseals with the snapshot's keys, joins the other pods (wiping a node Vault removed from
the cluster first), replaces agent tokens the snapshot brought back expired, and
verifies. Each step checks state first: re-run it after any failure or interruption and it
continues. Prints its plan first; asks before changing anything unless --yes. --dry-run
stops after the checks.

When the host itself was lost (an empty state directory), --from TARGET --identity FILE
first fetches from that off-host target the newest copy whose manifest authenticates and
the keyfile's recovery copy, decrypts both with the operator's offline age identity,
refuses a copy that was swapped, edited or rolled back (and says which) unless --force,
seals the keyfile with this host's key, then runs the recover above with that copy.
Anyone who can write to the target can plant a keyfile of their own there: pass
--manifest-key with the fingerprint init printed (status and keyfile check show it) and
only recovery copies under that key are used; without it, recover shows the fingerprint
it found and asks, --yes or not, before it fetches anything.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.snapshot != "" && opts.latest {
				return usageErrorf("--snapshot and --latest exclude each other")
			}
			if opts.from != "" && (opts.snapshot != "" || opts.latest) {
				return usageErrorf("--from fetches the newest authentic copy: give no --snapshot or --latest")
			}
			if (opts.from == "") != (opts.identity == "") {
				return usageErrorf("--from and --identity go together")
			}
			if opts.force && opts.from == "" {
				return usageErrorf("--force applies to --from")
			}
			if opts.manifest != "" && opts.from == "" {
				return usageErrorf("--manifest-key applies to --from")
			}
			if opts.manifest != "" && !manifestKeyRe.MatchString(opts.manifest) {
				return usageErrorf("--manifest-key %q: want sha256: and 16 hex digits, as init printed it", opts.manifest)
			}
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runRecover(cmd.Context(), opts, env, g)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.snapshot, "snapshot", "", "snapshot file to restore (default: the newest verified one)")
	f.BoolVar(&opts.latest, "latest", false, "restore the newest verified snapshot (the default)")
	f.StringVar(&opts.from, "from", "", "fetch the snapshot and the keyfile from this off-host target (a host that lost its state)")
	f.StringVar(&opts.identity, "identity", "", "with --from: the operator's offline age identity file")
	f.StringVar(&opts.manifest, "manifest-key", "", "with --from: the manifest key fingerprint init printed (sha256:…); recovery copies under another key are refused")
	f.BoolVar(&opts.force, "force", false, "with --from: recover from the newest authentic copy despite swapped, edited or rolled-back copies")
	f.StringVar(&opts.authFile, "auth-token-file", "", "a 0600 file with a token valid in the snapshot, for minting the agent's tokens when the snapshot brings none back (imported from before adopt, or older than vault.token_period)")
	f.BoolVar(&opts.dryRun, "dry-run", false, "check the snapshot and keys, print the plan, change nothing")
	f.BoolVar(&opts.yes, "yes", false, "do not ask")
	f.StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runRecover(ctx context.Context, opts *recoverOptions, env *agent.Env, g *globalOptions) error {
	printPlan(g.stderr, "recover plan:", agent.RecoverPlan())
	if !opts.dryRun {
		if err := confirm(g, opts.yes, "restore Vault from a snapshot, replacing whatever the first pod holds?"); err != nil {
			return err
		}
		unlock, err := env.Lock("recover")
		if err != nil {
			return err
		}
		defer unlock()
	}
	if opts.from != "" {
		return runRecoverFrom(ctx, opts, env, g)
	}
	rep, err := agent.Recover(ctx, env, agent.RecoverOptions{Snapshot: opts.snapshot, DryRun: opts.dryRun, AuthTokenFile: opts.authFile})
	if err != nil && !agent.Refused(err) {
		err = withRerun(err)
	}
	return report(g, opts.output, rep, func(w io.Writer) { printSteps(w, rep.Steps) }, err)
}

var manifestKeyRe = regexp.MustCompile(`^sha256:[0-9a-f]{16}$`)

// withRerun reminds that recover resumes.
func withRerun(err error) error {
	return fmt.Errorf("recover: %w (re-run recover to continue)", err)
}

func runRecoverFrom(ctx context.Context, opts *recoverOptions, env *agent.Env, g *globalOptions) error {
	ask := func(found string) error {
		// Asked even with --yes: only the operator knows the fingerprint init printed.
		if !g.interactive() {
			return usageErrorf("recover --from found manifest key %s: not a terminal to ask whether it is the one init printed; pass --manifest-key %s if it is", found, found)
		}
		return confirm(g, false, fmt.Sprintf("the copies found are authenticated by manifest key %s: is it the fingerprint init printed?", found))
	}
	rep, err := agent.RecoverFrom(ctx, env, agent.RecoverFromOptions{Target: opts.from, IdentityFile: opts.identity, Force: opts.force, DryRun: opts.dryRun,
		ManifestKey: opts.manifest, Confirm: ask})
	if rep == nil {
		return err
	}
	if err != nil && !agent.Refused(err) && rep.Recover != nil {
		err = fmt.Errorf("%w (the keyfile and snapshot are on this host now: re-run recover without --from to continue)", err)
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		fmt.Fprintf(w, "copy %s from %s, keyfile %s\n", rep.Copy, rep.Target, rep.KeyfileCopy)
		fmt.Fprintf(w, "cluster %s, manifest key %s (compare with the one init printed)\n", rep.ClusterID, rep.ManifestKey)
		for _, p := range rep.Problems {
			fmt.Fprintf(w, "problem: %s\n", p)
		}
		if rep.Recover != nil {
			printSteps(w, rep.Recover.Steps)
		}
	}, err)
}
