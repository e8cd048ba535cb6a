package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/spf13/cobra"

	"github.com/pve-vault-agent/pve-vault-agent/configs"
)

// Exit codes, as documented in the README.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitInterrupted = 130
)

// Set at build time with -ldflags "-X main.version=… -X main.commit=…".
var (
	version = "dev"
	commit  = "unknown"
)

// globalOptions are the flags every verb shares.
type globalOptions struct {
	configPath string
	logLevel   string
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

// loadConfig loads and validates the configuration named by --config.
func (g *globalOptions) loadConfig() (*configs.Config, error) {
	return configs.Load(g.configPath)
}

// setup builds the logger and loads the configuration, the start of most verbs.
func (g *globalOptions) setup() (*slog.Logger, *configs.Config, error) {
	log, err := g.logger()
	if err != nil {
		return nil, nil, err
	}
	cfg, err := g.loadConfig()
	return log, cfg, err
}

// start is how a verb that prints text or json begins: check -o, build the logger,
// load the configuration.
func (g *globalOptions) start(output string) (*slog.Logger, *configs.Config, error) {
	if err := outputFormat(output, "text", "json"); err != nil {
		return nil, nil, err
	}
	return g.setup()
}

// writeJSON prints v as indented JSON on stdout.
func writeJSON(g *globalOptions, v any) error {
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// usageError marks a mistake in how the command was called (exit 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, a ...any) error { return &usageError{msg: fmt.Sprintf(format, a...)} }

// run executes one invocation and returns the process exit code. Nothing below main
// exits the process.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	g := &globalOptions{stdout: stdout, stderr: stderr}
	root := newRootCommand(g)
	root.SetArgs(args)
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
	fmt.Fprintf(stderr, "pve-vault-agent: %v\n", err)
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "Run 'pve-vault-agent --help' for usage.")
		return exitUsage
	case errors.Is(err, configs.ErrInvalidConfig):
		fmt.Fprintln(stderr, "Fix the configuration and run 'pve-vault-agent config check' again.")
		return exitUsage
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
Exit codes: 0 ok, 1 operation failed, 2 usage or invalid configuration, 130 interrupted.`,
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

	root.AddCommand(newVersionCommand(g), newConfigCommand(g), newProvisionCommand(g), newInstallCommand(g),
		newInitCommand(g), newUnsealCommand(g), newKeyfileCommand(g), newRunCommand(g),
		newBackupNowCommand(g), newSnapshotsCommand(g),
		newRecoverCommand(g), newRestoreCommand(g), newStatusCommand(g))
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
