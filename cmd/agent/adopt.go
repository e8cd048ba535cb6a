package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
)

type adoptOptions struct {
	initOutput        string
	authTokenFile     string
	recoveryRecipient string
	yes               bool
	output            string
}

func newAdoptCommand(g *globalOptions) *cobra.Command {
	opts := &adoptOptions{}
	cmd := &cobra.Command{
		Use:   "adopt",
		Short: "Take over a Vault initialised by hand: prove its shares, seal them into the keyfile",
		Long: `For a Vault you initialised yourself (vault operator init, the keys in a password
manager). Nothing is restarted or re-initialised. The shares come from that init's output
(--init-output FILE: JSON from -format=json, its text, or one share per line, base64 or
hex; "-" reads standard input) or are typed at a prompt that does not echo; the file is
read once and its path is not kept. --auth-token-file is a token (the initial root token,
or an admin's) used for this run only, never stored.

Before anything is written, adopt takes a Raft snapshot with that token and opens it in a
throwaway drill pod with the shares: wrong or too few shares are refused with nothing
changed. Then it writes the agent's two policies and its canary mount
(pve-vault-agent/), mints its periodic tokens, seals shares and tokens into the keyfile,
stores the proven snapshot as the first backup and unseals any sealed pod. It refuses
when Vault already holds a policy or mount of those names that is not the agent's, and
when a keyfile of other shares exists; with this keyset's keyfile it does nothing.
Changes: Vault (policies, canary mount, two tokens), the keyfile, the snapshot directory.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := g.start(opts.output)
			if err != nil {
				return err
			}
			defer env.Close()
			return runAdopt(cmd.Context(), opts, env, g)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.initOutput, "init-output", "", "file with `vault operator init` output (JSON or text) or one share per line; - reads stdin; empty: prompt")
	f.StringVar(&opts.authTokenFile, "auth-token-file", "", "a 0600 file holding a token that may snapshot, write policies and mounts, and create tokens (used once)")
	f.StringVar(&opts.recoveryRecipient, "recovery-recipient", "", "age public key (age1…) that receives an offline copy of the keyfile")
	f.BoolVar(&opts.yes, "yes", false, "do not ask")
	f.StringVarP(&opts.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func runAdopt(ctx context.Context, opts *adoptOptions, env *agent.Env, g *globalOptions) error {
	if opts.authTokenFile == "" {
		return usageErrorf("adopt needs --auth-token-file: a token (the initial root token, or an admin's) in a 0600 file, used for this run only")
	}
	if opts.initOutput == "-" && !opts.yes {
		return usageErrorf("--init-output - reads the shares from standard input, so nothing is left to answer a question on: add --yes")
	}
	printPlan(g.stderr, "adopt plan:", agent.AdoptPlan())
	var typed []string
	if opts.initOutput == "" {
		var err error
		if typed, err = promptShares(g); err != nil {
			return err
		}
		defer clear(typed)
	}
	in, err := agent.AdoptInputs(opts.initOutput, g.stdin, typed, opts.authTokenFile)
	if err != nil {
		return err
	}
	// Asked after the shares are typed: the prompt reads its lines unbuffered.
	if err := confirm(g, opts.yes, "adopt this Vault (writes the agent's policies, canary and tokens into it, and the keyfile here)?"); err != nil {
		return err
	}
	in.RecoveryRecipient = opts.recoveryRecipient
	unlock, err := env.Lock("adopt")
	if err != nil {
		return err
	}
	defer unlock()
	rep, err := agent.Adopt(ctx, env, in)
	if err != nil {
		err = fmt.Errorf("adopt: %w", err)
	}
	return report(g, opts.output, rep, func(w io.Writer) {
		printSteps(g.stderr, rep.Steps)
		m := rep.Meta
		if rep.Already {
			fmt.Fprintf(w, "already adopted: %s holds these shares; nothing changed\n", rep.Keyfile)
			return
		}
		if !rep.Adopted {
			return
		}
		fmt.Fprintf(w, "adopted vault cluster %s through pod %s\nkeyfile %s: %d shares, threshold %d, keyset %s\n",
			m.ClusterID, rep.Pod, rep.Keyfile, m.Shares, m.Threshold, m.Fingerprint)
		if rep.RecoveryCopy != "" {
			fmt.Fprintf(w, "offline recovery copy %s (age); move it off this host\n", rep.RecoveryCopy)
		}
		if rep.ManifestKey != "" {
			fmt.Fprintf(w, "manifest key %s: note it with the offline identity; recover --from shows the one it finds\n", rep.ManifestKey)
		}
		if rep.Backup.Path != "" {
			fmt.Fprintf(w, "first backup %s (raft index %d), opened by the proof drill\n", rep.Backup.Path, rep.Backup.Manifest.RaftIndex)
		}
		for _, p := range rep.Unsealed {
			fmt.Fprintf(w, "unsealed %s\n", p)
		}
		fmt.Fprintln(w, "the token of --auth-token-file was not stored; revoke it when you no longer need it")
	}, err)
}

// promptShares reads shares one per line until an empty line: without echo on a
// terminal, plainly from a reader a test hands in.
func promptShares(g *globalOptions) ([]string, error) {
	if !g.interactive() {
		return nil, usageErrorf("no --init-output and not a terminal to type the shares on: give --init-output FILE (or - with --yes)")
	}
	fmt.Fprintln(g.stderr, "type the unseal shares (base64 or hex), one per line, at least the threshold; an empty line ends")
	var shares []string
	for i := 1; ; i++ {
		fmt.Fprintf(g.stderr, "share %d: ", i)
		line, err := readShareLine(g)
		if err != nil {
			clear(shares)
			return nil, fmt.Errorf("read a share: %w", err)
		}
		if line == "" {
			break
		}
		shares = append(shares, line)
	}
	if len(shares) == 0 {
		return nil, errors.New("no share typed: nothing changed")
	}
	return shares, nil
}

// readShareLine reads one line: without echo on a terminal; else byte by byte, so a
// question asked after it reads what follows.
func readShareLine(g *globalOptions) (string, error) {
	if f, ok := g.stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		b, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(g.stderr)
		defer clear(b)
		return strings.TrimSpace(string(b)), err
	}
	var line []byte
	defer clear(line)
	var c [1]byte
	for {
		n, err := g.stdin.Read(c[:])
		if n == 1 && c[0] != '\n' {
			line = append(line, c[0])
		}
		if n == 1 && c[0] == '\n' || errors.Is(err, io.EOF) {
			return strings.TrimSpace(string(line)), nil
		}
		if err != nil {
			return "", err
		}
	}
}
