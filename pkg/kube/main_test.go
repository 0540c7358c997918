package kube

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) {
	// The MCS fake clientset predates client-go's streaming lists and never
	// sends the bookmark that ends one, so its informers would never sync.
	// Real API servers (and the integration tests) keep the default.
	if err := os.Setenv("KUBE_FEATURE_WatchListClient", "false"); err != nil {
		panic(err)
	}
	os.Exit(m.Run())
}

// runUntilCleanup runs a component's Run in the background until the
// test ends, then cancels it and requires a clean stop within 10s.
func runUntilCleanup(t *testing.T, name string, run func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Errorf("%s did not stop within 10s", name)
		}
	})
}
