package main

import (
	"context"
	"crypto/tls"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/tlsbackend"
)

// window is one measurement: count at the start and end of the measured
// period (after the warm-up), and the proxy's CPU over the same period.
type window struct {
	count   float64 // bytes or connections in the measured period
	seconds float64
	cpu     float64 // proxy CPU seconds in the period (0 for direct)
	errors  int64
}

// measure runs work on conns goroutines, each adding to the counter, and
// reads the counter and the proxy's CPU after warmup and after warmup+dur.
func measure(conns int, warmup, dur time.Duration, cpu func() float64, work func(ctx context.Context, count, errs *atomic.Int64)) window {
	ctx, cancel := context.WithCancel(context.Background())
	var count, errs atomic.Int64
	var wg sync.WaitGroup
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work(ctx, &count, &errs)
		}()
	}
	time.Sleep(warmup)
	c0, cpu0, e0, t0 := count.Load(), cpu(), errs.Load(), time.Now()
	time.Sleep(dur)
	c1, cpu1, e1, t1 := count.Load(), cpu(), errs.Load(), time.Now()
	cancel()
	wg.Wait()
	return window{count: float64(c1 - c0), seconds: t1.Sub(t0).Seconds(), cpu: cpu1 - cpu0, errors: e1 - e0}
}

// bulk streams TLS application data to the backend's sink on each
// connection, counting bytes the client hands to the socket (the socket
// buffers hold a few MB, noise next to GB over the window).
func bulk(addr string, cfg *tls.Config) func(ctx context.Context, count, errs *atomic.Int64) {
	return func(ctx context.Context, count, errs *atomic.Int64) {
		c, err := tlsbackend.Dial(ctx, addr, cfg)
		if err != nil {
			errs.Add(1)
			return
		}
		stop := context.AfterFunc(ctx, func() { _ = c.Close() })
		defer stop()
		defer c.Close()
		buf := make([]byte, 64<<10)
		buf[0] = tlsbackend.CmdSink
		for ctx.Err() == nil {
			n, err := c.Write(buf)
			count.Add(int64(n))
			if err != nil {
				if ctx.Err() == nil {
					errs.Add(1)
				}
				return
			}
		}
	}
}

// handshakes opens connection after connection: a full mTLS handshake, one
// byte each way, close.
func handshakes(addr string, cfg *tls.Config) func(ctx context.Context, count, errs *atomic.Int64) {
	return func(ctx context.Context, count, errs *atomic.Int64) {
		for ctx.Err() == nil {
			err := func() error {
				c, err := tlsbackend.Dial(ctx, addr, cfg)
				if err != nil {
					return err
				}
				defer c.Close()
				return tlsbackend.Ping(c, 10*time.Second)
			}()
			switch {
			case err == nil:
				count.Add(1)
			case ctx.Err() == nil && !errors.Is(err, context.Canceled):
				errs.Add(1)
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
}
