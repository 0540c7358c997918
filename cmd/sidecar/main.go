// Command sidecar is Isthmus's proxy beside each workload. Its
// subcommands are the steps of a pod's life: `sidecar iptables` redirects
// the pod's traffic to the sidecar (pkg/sidecar/capture) as the pod's init
// step.
//
// Each subcommand lives in a file of its own that registers its
// constructor in init (see addCommand), so adding one is adding a file.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/pkg/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar:", err)
		os.Exit(1)
	}
}

// globals are the flags every subcommand shares.
type globals struct {
	logLevel slog.Level
	logJSON  bool
}

// logger builds the process logger writing to w.
func (g *globals) logger(w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: g.logLevel}
	var h slog.Handler = slog.NewTextHandler(w, opts)
	if g.logJSON {
		h = slog.NewJSONHandler(w, opts)
	}
	return slog.New(h)
}

// commands are the subcommands' constructors, in the order their files
// registered them.
var commands []func(*globals) *cobra.Command

// addCommand registers a subcommand; each subcommand's file calls it from
// init.
func addCommand(newCommand func(*globals) *cobra.Command) {
	commands = append(commands, newCommand)
}

func newRootCommand() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "sidecar",
		Short:         "Isthmus proxy beside each workload",
		Version:       version.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		// A container image's entry point: no shell to complete in.
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
	}
	pf := root.PersistentFlags()
	pf.TextVar(&g.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	pf.BoolVar(&g.logJSON, "log-json", false, "log JSON lines instead of text")
	for _, newCommand := range commands {
		root.AddCommand(newCommand(g))
	}
	return root
}
