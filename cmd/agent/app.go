package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/pve-vault-agent/pve-vault-agent/agent"
	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

// Exit codes, as documented in the README.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitConfig      = 78 // EX_CONFIG: the one code the unit does not restart on
	exitInterrupted = 130
)

// Set at build time with -ldflags "-X main.version=… -X main.commit=…".
var (
	version = "dev"
	commit  = "unknown"
)

// globalOptions are the flags every verb shares and the process's streams.
type globalOptions struct {
	configPath string
	logLevel   string
	stdin      io.Reader
	stdout     io.Writer
	stderr     io.Writer
}

// logger builds the stderr logger for a verb; a bad level is a usage error.
func (g *globalOptions) logger() (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(g.logLevel)); err != nil {
		return nil, usageErrorf("--log-level %q: use debug, info, warn or error", g.logLevel)
	}
	return slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: lvl})), nil
}

// environment loads the configuration and builds the environment every flow of the
// verb shares: logger, clock, keyfile source (the credential the service manager
// decrypted, when this runs under systemd with LoadCredentialEncrypted=), connections.
func (g *globalOptions) environment() (*agent.Env, error) {
	log, err := g.logger()
	if err != nil {
		return nil, err
	}
	cfg, err := configs.Load(g.configPath)
	if err != nil {
		return nil, err
	}
	return agent.NewEnv(cfg, log, agent.EnvOptions{Version: version, CredentialsDir: os.Getenv("CREDENTIALS_DIRECTORY")}), nil
}

// start is how a verb that prints text or json begins: check -o, then build the
// environment. The caller closes it.
func (g *globalOptions) start(output string, formats ...string) (*agent.Env, error) {
	if len(formats) == 0 {
		formats = []string{"text", "json"}
	}
	if err := outputFormat(output, formats...); err != nil {
		return nil, err
	}
	return g.environment()
}

// interactive reports whether a question can be asked: stdin is a terminal, or a reader
// a test handed in.
func (g *globalOptions) interactive() bool {
	if f, ok := g.stdin.(*os.File); ok {
		return term.IsTerminal(int(f.Fd()))
	}
	return g.stdin != nil
}

// usageError marks a mistake in how the command was called (exit 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, a ...any) error { return &usageError{msg: fmt.Sprintf(format, a...)} }

// run executes one invocation and returns the process exit code. Nothing below main
// exits the process.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	g := &globalOptions{stdin: stdin, stdout: stdout, stderr: stderr}
	root := newRootCommand(g)
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)

	err := root.ExecuteContext(ctx)
	switch {
	case err == nil:
		return exitOK
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		fmt.Fprintln(stderr, "pve-vault-agent: interrupted")
		return exitInterrupted
	}
	if agent.Refused(err) {
		fmt.Fprintf(stderr, "pve-vault-agent: refused, nothing changed: %v\n", err)
	} else {
		fmt.Fprintf(stderr, "pve-vault-agent: %v\n", err)
	}
	for _, h := range agent.Hints(err) {
		fmt.Fprintf(stderr, "hint: %s\n", h)
	}
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "hint: run 'pve-vault-agent --help' for usage")
		return exitUsage
	case errors.Is(err, configs.ErrInvalidConfig), errors.Is(err, agent.ErrChartValues):
		fmt.Fprintln(stderr, "hint: fix the configuration and run 'pve-vault-agent config check' again")
		return exitConfig
	}
	return exitFailed
}

func newRootCommand(g *globalOptions) *cobra.Command {
	root := &cobra.Command{
		Use:   "pve-vault-agent",
		Short: "Keep Vault on Proxmox provisioned, unsealed and backed up",
		Long: `pve-vault-agent runs on a Proxmox VE host and keeps a HashiCorp Vault, deployed by the
official Helm chart with Raft storage in a Kubernetes cluster of Proxmox VMs, provisioned,
unsealed and backed up.

Results go to stdout, progress and logs to stderr.
Exit codes: 0 ok, 1 operation failed, 2 usage, 78 invalid configuration, 130 interrupted.`,
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          noArgs,
		RunE:          showHelp,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			_, err := g.logger() // reject a bad --log-level before any work
			return err
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{msg: err.Error()} })
	pf := root.PersistentFlags()
	pf.StringVarP(&g.configPath, "config", "c", configs.DefaultPath, "configuration file (YAML)")
	pf.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn, error")

	root.AddCommand(newVersionCommand(g), newConfigCommand(g), newProvisionCommand(g), newInstallCommand(g), newDrillCommand(g),
		newUpgradeCommand(g), newInitCommand(g), newAdoptCommand(g), newUnsealCommand(g), newKeyfileCommand(g), newRunCommand(g),
		newBackupNowCommand(g), newSnapshotsCommand(g), newRecoverCommand(g), newRestoreCommand(g),
		newStatusCommand(g), newTokenCommand(g), newRBACCommand(g), newNotifyCommand(g), newRenderCommand(g), newRollCommand(g))
	return root
}

// showHelp is the action of a verb group called without a sub-command.
func showHelp(cmd *cobra.Command, _ []string) error { return cmd.Help() }

// noArgs rejects positional arguments and unknown sub-commands as usage errors.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	if cmd.HasSubCommands() {
		return usageErrorf("unknown command %q for %q", args[0], cmd.CommandPath())
	}
	return usageErrorf("%s takes no arguments, got %q", cmd.CommandPath(), strings.Join(args, " "))
}

// outputFormat validates an -o value against the formats a verb supports.
func outputFormat(value string, allowed ...string) error {
	for _, a := range allowed {
		if value == a {
			return nil
		}
	}
	return usageErrorf("-o %q: use one of %s", value, strings.Join(allowed, ", "))
}
