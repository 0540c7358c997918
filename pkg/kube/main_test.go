package kube

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/watch"
	k8stesting "k8s.io/client-go/testing"
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

// oldFake is a generated fake clientset of the older kind
// (NewSimpleClientset), as the MCS and Istio ones are.
type oldFake interface {
	Tracker() k8stesting.ObjectTracker
	PrependWatchReactor(resource string, reaction k8stesting.WatchReactionFunc)
}

// watchFromList makes c's watches start at the resource version of the
// List before them, as an API server's do and as kubefake.NewClientset's
// do. The older fakes start a watch at "now", so an object created
// between an informer's List and its Watch was never seen. Call it
// before anything watches c.
func watchFromList[C oldFake](c C) C {
	c.PrependWatchReactor("*", func(a k8stesting.Action) (bool, watch.Interface, error) {
		wa, ok := a.(k8stesting.WatchActionImpl)
		if !ok {
			return false, nil, nil
		}
		w, err := c.Tracker().Watch(a.GetResource(), a.GetNamespace(), wa.ListOptions)
		return true, w, err
	})
	return c
}
