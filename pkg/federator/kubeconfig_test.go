package federator

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// A list of kubeconfigs (as $KUBECONFIG) is merged as kubectl merges
// it: the first file to set a value wins, a missing file is skipped.
func TestKubeconfigListIsMerged(t *testing.T) {
	dir := t.TempDir()
	// kubectl's usual split, as JSON this time (kubeconfigs may be
	// either): contexts in one file, clusters and users in another; the
	// second file's current-context does not override the first's.
	files := map[string]string{
		"contexts": `{"kind": "Config", "apiVersion": "v1", "current-context": "east",
			"contexts": [{"name": "east", "context": {"cluster": "east", "user": "admin"}}]}`,
		"clusters": `{"kind": "Config", "apiVersion": "v1", "current-context": "west",
			"clusters": [{"name": "east", "cluster": {"server": "https://east.example:6443"}},
			             {"name": "west", "cluster": {"server": "https://west.example:6443"}}],
			"contexts": [{"name": "west", "context": {"cluster": "west", "user": "admin"}}],
			"users": [{"name": "admin", "user": {"token": "secret"}}]}`,
	}
	for name, text := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600))
	}
	contexts, clusters := filepath.Join(dir, "contexts"), filepath.Join(dir, "clusters")
	list := func(paths ...string) string { return strings.Join(paths, string(os.PathListSeparator)) }

	cfg, err := restConfig(list(contexts, filepath.Join(dir, "missing"), clusters))
	require.NoError(t, err)
	require.Equal(t, "https://east.example:6443", cfg.Host)
	require.Equal(t, "secret", cfg.BearerToken)

	cfg, err = restConfig(list(clusters, contexts))
	require.NoError(t, err)
	require.Equal(t, "https://west.example:6443", cfg.Host, "the first file's current-context wins")

	cfg, err = restConfig(clusters + string(os.PathListSeparator)) // an empty entry is skipped
	require.NoError(t, err)
	require.Equal(t, "https://west.example:6443", cfg.Host)

	_, err = restConfig(list(filepath.Join(dir, "a"), filepath.Join(dir, "b")))
	require.ErrorContains(t, err, "none of them exists")

	// Merged, but the context names a cluster no file defines.
	_, err = restConfig(list(contexts, filepath.Join(dir, "missing")))
	require.ErrorContains(t, err, "load kubeconfigs")
	require.ErrorContains(t, err, `cluster "east" was not found`)
}
