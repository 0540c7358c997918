package bulk

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

func TestForEach(t *testing.T) {
	var sum, running, peak atomic.Int64
	err := ForEach(t.Context(), 100, 4, func(_ context.Context, i int) error {
		n := running.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		sum.Add(int64(i))
		running.Add(-1)
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, int64(99*100/2), sum.Load(), "every index once")
	require.LessOrEqual(t, peak.Load(), int64(4))

	boom := errors.New("boom")
	var after atomic.Int64
	err = ForEach(t.Context(), 1000, 1, func(ctx context.Context, i int) error {
		if i == 3 {
			return boom
		}
		if i > 3 {
			after.Add(1)
		}
		return nil
	})
	require.ErrorIs(t, err, boom)
	require.LessOrEqual(t, after.Load(), int64(1), "the first error stops what has not started")
}

func TestTransient(t *testing.T) {
	gr := schema.GroupResource{Resource: "services"}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{apierrors.NewTimeoutError("slow", 1), true},
		{apierrors.NewTooManyRequests("busy", 1), true},
		{apierrors.NewConflict(gr, "x", errors.New("changed")), true},
		{fmt.Errorf("create: %w", context.DeadlineExceeded), true},
		{apierrors.NewInvalid(schema.GroupKind{Kind: "Service"}, "x", nil), false},
		{apierrors.NewAlreadyExists(gr, "x"), false},
		{errors.New("Internal error occurred: etcdserver: request timed out"), true},
	} {
		t.Run(fmt.Sprint(tc.err), func(t *testing.T) {
			require.Equal(t, tc.want, Transient(tc.err))
		})
	}
}

func TestRetry(t *testing.T) {
	calls := 0
	err := Retry(t.Context(), func() error {
		calls++
		return apierrors.NewAlreadyExists(schema.GroupResource{Resource: "services"}, "x")
	})
	require.True(t, apierrors.IsAlreadyExists(err))
	require.Equal(t, 1, calls, "a permanent error is not retried")
}
