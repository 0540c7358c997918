package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/stretchr/testify/require"
)

// execute runs the federator command with args in process and returns
// its stdout and stderr.
func execute(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	root := newRootCommand()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(args)
	err = root.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// Every verb refuses a word left over after its flags, naming it, before
// it reads a kubeconfig: a boolean flag's value given apart (--log-json
// false) would otherwise be dropped with the flag set to true.
func TestEveryCommandRefusesArguments(t *testing.T) {
	t.Setenv("KUBECONFIG", "/nonexistent/kubeconfig")
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			walk(sub)
		}
		if c.Name() == "help" || c.Name() == "completion" || c.HasParent() && c.Parent().Name() == "completion" {
			return
		}
		path := strings.Fields(c.CommandPath())[1:]
		t.Run(strings.Join(append([]string{"federator"}, path...), " "), func(t *testing.T) {
			_, _, err := execute(t.Context(), append(path, "stray")...)
			require.ErrorContains(t, err, `unknown command "stray"`)
		})
	}
	walk(newRootCommand())

	// Alone, a command that only holds others prints its help.
	out, _, err := execute(t.Context(), "token")
	require.NoError(t, err)
	require.Contains(t, out, "federator token [command]")
}

// -o takes table or json, for `ca status` as for `status`: anything else
// is refused before the cluster is read, not printed as a table.
func TestOutputFormat(t *testing.T) {
	t.Setenv("KUBECONFIG", "/nonexistent/kubeconfig")
	for _, args := range [][]string{{"status", "-o", "yaml"}, {"ca", "status", "-o", "yaml"}, {"ca", "status", "--output=wide"}} {
		_, _, err := execute(t.Context(), args...)
		require.ErrorContains(t, err, "unknown output format", "%v", args)
		require.ErrorContains(t, err, "-o takes table or json", "%v", args)
	}
}
