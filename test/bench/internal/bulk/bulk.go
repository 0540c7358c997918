// Package bulk creates many Kubernetes objects for a benchmark's set-up,
// untimed: on a bounded number of goroutines, retrying what an API server
// short of CPU sheds (the machine is shared), and stopping at the first
// error that is not that.
package bulk

import (
	"context"
	"errors"
	"net"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/retry"
)

// ForEach runs fn for 0..n-1 on workers goroutines; the first error
// cancels the rest and is returned.
func ForEach(ctx context.Context, n, workers int, fn func(ctx context.Context, i int) error) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(workers)
	for i := range n {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error { return fn(gctx, i) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// Transient reports errors worth retrying when creating objects in bulk:
// an API server short of CPU times out or sheds load.
func Transient(err error) bool {
	var netErr net.Error
	return apierrors.IsTimeout(err) || apierrors.IsServerTimeout(err) || apierrors.IsTooManyRequests(err) ||
		apierrors.IsInternalError(err) || apierrors.IsServiceUnavailable(err) || apierrors.IsConflict(err) ||
		errors.Is(err, context.DeadlineExceeded) || errors.As(err, &netErr) ||
		// A Service's IP allocation reports etcd timeouts as invalid.
		(err != nil && strings.Contains(err.Error(), "etcdserver: request timed out"))
}

// Retry retries fn on transient errors, six times at most over about a
// minute.
func Retry(ctx context.Context, fn func() error) error {
	b := wait.Backoff{Steps: 6, Duration: time.Second, Factor: 2, Jitter: 0.1}
	return retry.OnError(b, func(err error) bool { return ctx.Err() == nil && Transient(err) }, fn)
}
