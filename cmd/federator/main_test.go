package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
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

// The operator verbs find the cluster as kubectl does: --kubeconfig, or
// $KUBECONFIG, a list of files merged, not one path joined by colons;
// `federator run` too, but never ~/.kube/config.
func TestKubeconfigAsKubectl(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(text), 0o600))
		return p
	}
	// kubectl's usual split: contexts in one file, clusters and users in
	// another.
	contexts := write("contexts", `apiVersion: v1
kind: Config
current-context: east
contexts:
- name: east
  context: {cluster: east, user: admin}
`)
	clusters := write("clusters", `apiVersion: v1
kind: Config
clusters:
- name: east
  cluster: {server: "https://east.example:6443"}
- name: west
  cluster: {server: "https://west.example:6443"}
users:
- name: admin
  user: {token: secret}
`)
	whole := write("whole", `apiVersion: v1
kind: Config
current-context: west
contexts:
- name: west
  context: {cluster: west, user: admin}
clusters:
- name: west
  cluster: {server: "https://west.example:6443"}
users:
- name: admin
  user: {token: secret}
`)
	host := func(args ...string) (string, error) {
		var cf clusterFlags
		fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
		cf.register(fs)
		require.NoError(t, fs.Parse(args))
		cfg, err := cf.restConfig()
		if err != nil {
			return "", err
		}
		return cfg.Host, nil
	}

	t.Setenv("KUBECONFIG", contexts+string(os.PathListSeparator)+filepath.Join(dir, "missing")+string(os.PathListSeparator)+clusters)
	h, err := host()
	require.NoError(t, err)
	require.Equal(t, "https://east.example:6443", h)

	h, err = host("--kubeconfig", whole)
	require.NoError(t, err, "--kubeconfig wins over $KUBECONFIG")
	require.Equal(t, "https://west.example:6443", h)

	_, err = host("--kubeconfig", filepath.Join(dir, "missing"))
	require.ErrorContains(t, err, "missing", "an explicit --kubeconfig must exist")

	// `federator run` merges a list too (pkg/federator's
	// TestKubeconfigListIsMerged); one with nothing in it is an error
	// that names the files, before anything is written.
	missing := []string{filepath.Join(dir, "missing"), filepath.Join(dir, "gone")}
	t.Setenv("KUBECONFIG", strings.Join(missing, string(os.PathListSeparator)))
	_, _, err = execute(t.Context(), "run", "--cluster-name", "east")
	require.ErrorContains(t, err, "load kubeconfigs "+strings.Join(missing, ", ")+": none of them exists")
	t.Setenv("KUBECONFIG", missing[0])
	_, _, err = execute(t.Context(), "run", "--cluster-name", "east")
	require.ErrorContains(t, err, `load kubeconfig "`+missing[0]+`"`, "one file in $KUBECONFIG must exist, as --kubeconfig")
}

// writeKubeconfig writes a kubeconfig for a server nothing answers at:
// enough for the verbs to build a client and refuse bad flags before
// their first request.
func writeKubeconfig(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(p, []byte(`apiVersion: v1
kind: Config
current-context: c
contexts:
- name: c
  context: {cluster: c, user: u}
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: u
  user: {token: t}
`), 0o600))
	return p
}

// --ttl 0s is refused, not taken for the default hour, and so is a TTL
// too short to join with; the flag's help says the bounds.
func TestTokenCreateTTL(t *testing.T) {
	kc := writeKubeconfig(t)
	for ttl, want := range map[string]string{
		"0s":   "--ttl 0s is shorter than 1m0s",
		"1ms":  "--ttl 1ms is shorter than 1m0s",
		"59s":  "--ttl 59s is shorter than 1m0s",
		"169h": "--ttl 169h0m0s is longer than 168h0m0s",
	} {
		_, _, err := execute(t.Context(), "token", "create", "--kubeconfig", kc, "--peer", "west", "--address", "east.example:15443", "--ttl", ttl)
		require.ErrorContains(t, err, want)
	}
	out, _, err := execute(t.Context(), "token", "create", "--help")
	require.NoError(t, err)
	require.Contains(t, out, "at least 1m0s and at most 168h0m0s (default 1h0m0s)")
}

// --root-publish-delay, not given, follows the --max-cert-ttl given:
// raising the maximum alone is not refused for a flag the user never set.
// Given, it is still held to 0.55 x --max-cert-ttl.
func TestRunRootPublishDelayFollowsMaxCertTTL(t *testing.T) {
	// An empty --cluster-name makes Validate fail, so nothing is dialled:
	// the other problems it names are what is looked at.
	_, _, err := execute(t.Context(), "run", "--cluster-name=", "--max-cert-ttl", "72h")
	require.ErrorContains(t, err, "--cluster-name is required")
	require.NotContains(t, err.Error(), "--root-publish-delay")

	_, _, err = execute(t.Context(), "run", "--cluster-name=", "--max-cert-ttl", "72h", "--root-publish-delay", "26h24m")
	require.ErrorContains(t, err, "--root-publish-delay 26h24m0s is too short")
	require.ErrorContains(t, err, "at least 39h36m0s")

	_, _, err = execute(t.Context(), "run", "--cluster-name=", "--root-publish-delay", "0s")
	require.ErrorContains(t, err, "--root-publish-delay 0s is too short", "given, 0s is not taken for the default")

	out, _, err := execute(t.Context(), "run", "--help")
	require.NoError(t, err)
	require.Contains(t, out, "at least 0.55 x --max-cert-ttl, which is the default (26h24m0s with the default --max-cert-ttl)")
}

// --root-namespace defaults to Istio's and is checked as a namespace name,
// before anything is dialled.
func TestRunRootNamespace(t *testing.T) {
	_, _, err := execute(t.Context(), "run", "--cluster-name=", "--root-namespace", "Istio_System")
	require.ErrorContains(t, err, `--root-namespace "Istio_System" is not a DNS label`)
	out, _, err := execute(t.Context(), "run", "--help")
	require.NoError(t, err)
	require.Regexp(t, `--root-namespace string +Istio's root namespace .*\(default "istio-system"\)`, out)
}

// join without --name says the flag is required, before it reads the
// token or the cluster.
func TestJoinWithoutName(t *testing.T) {
	t.Setenv("KUBECONFIG", "/nonexistent/kubeconfig")
	_, _, err := execute(t.Context(), "join", "--token-file", "/nonexistent/token")
	require.ErrorContains(t, err, "--name is required")
}
