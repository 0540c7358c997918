// Package e2e runs Isthmus's real binaries on the local multi-cluster
// harness: real kube-apiservers and kube-controller-managers, and, as root,
// each cluster in its own network namespaces.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/federator"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// binDir holds the binaries built for this test run.
var binDir string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "isthmus-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// -race binaries, so data races in the product fail the e2e run too.
	cmd := exec.Command("go", "build", "-race", "-o", dir+"/",
		"github.com/isthmus-mesh/isthmus/cmd/federator",
		"github.com/isthmus-mesh/isthmus/cmd/eastwest-gw",
		"github.com/isthmus-mesh/isthmus/cmd/sidecar",
		"github.com/isthmus-mesh/isthmus/test/echo")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building binaries:", err)
		return 1
	}
	binDir = dir
	return m.Run()
}

// startFederator runs the real federator binary in cluster c and stops it
// when the test ends.
func startFederator(t *testing.T, c *localcluster.Cluster) *fedproc.Federator {
	t.Helper()
	f, err := fedproc.Start(t.Context(), c, binDir, "--log-level", "debug")
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Stop(10 * time.Second) })
	return f
}

func catalogOf(t *testing.T, f *fedproc.Federator) federator.CatalogDump {
	t.Helper()
	d, err := f.Catalog(t.Context())
	require.NoError(t, err)
	return d
}

// installIsthmus applies deploy/ to every cluster of env.
func installIsthmus(t *testing.T, env *localcluster.Env) {
	t.Helper()
	for _, c := range env.Clusters() {
		cfg, err := c.RESTConfig(localcluster.UserAdmin)
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		require.NoError(t, install.Isthmus(ctx, cfg, "system:isthmus:federator"))
		cancel()
	}
}
