package main

import "github.com/spf13/cobra"

func newSnapshotsCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "snapshots", Short: "Inspect and maintain the snapshot directory", Args: noArgs, RunE: showHelp}
	cmd.AddCommand(newSnapshotsListCommand(g), newSnapshotsVerifyCommand(g), newSnapshotsImportCommand(g), newSnapshotsPruneCommand(g))
	return cmd
}
