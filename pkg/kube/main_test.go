package kube

import (
	"os"
	"testing"
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
