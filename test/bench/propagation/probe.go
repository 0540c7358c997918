package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/tlsbackend"
)

// outcome is what one new connection through the gateway met.
type outcome int

const (
	// routed: the mTLS handshake with the backend completed and the
	// backend answered a ping.
	routed outcome = iota
	// refused: the gateway answered the ClientHello with its
	// unrecognized_name alert (no exported service has that SNI).
	refused
	// failed: anything else (a reset, a timeout, a backend error).
	failed
)

// prober opens new connections through the gateway, one at a time, and
// keeps what each kind of attempt cost: that bounds the resolution of
// what it times.
type prober struct {
	addr string
	base *tls.Config
	poll time.Duration

	// Used by one goroutine at a time (the measure loop): no lock.
	n           [3]int
	spent       [3]time.Duration
	lastFailure error
}

func newProber(addr string, client *tls.Config, poll time.Duration) *prober {
	return &prober{addr: addr, base: client, poll: poll}
}

// attempt opens one connection with server name sni and returns its
// outcome and when the handshake ended (completed or was refused).
func (p *prober) attempt(ctx context.Context, sni string) (outcome, time.Time, error) {
	cfg := p.base.Clone()
	cfg.ServerName = sni
	start := time.Now()
	c, err := tlsbackend.Dial(ctx, p.addr, cfg)
	end := time.Now()
	o := routed
	switch {
	case err != nil && strings.Contains(err.Error(), "unrecognized name"):
		o = refused
	case err != nil:
		o = failed
	default:
		err = tlsbackend.Ping(c, 5*time.Second)
		_ = c.Close()
		if err != nil {
			o = failed
		}
	}
	p.n[o]++
	p.spent[o] += end.Sub(start)
	if o == failed {
		p.lastFailure = err
	}
	return o, end, err
}

// until opens a connection every poll interval until one meets want,
// within bound, and returns when its handshake ended and how many
// attempts it took.
func (p *prober) until(ctx context.Context, sni string, want outcome, bound time.Duration) (time.Time, int, error) {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	tick := time.NewTicker(p.poll)
	defer tick.Stop()
	attempts := 0
	var last outcome
	var lastErr error
	for {
		o, at, err := p.attempt(ctx, sni)
		attempts++
		if o == want {
			return at, attempts, nil
		}
		last, lastErr = o, err
		select {
		case <-ctx.Done():
			return time.Time{}, attempts, fmt.Errorf("%s: not %s within %s (%d attempts; the last %s: %v)",
				sni, want, bound, attempts, last, lastErr)
		case <-tick.C:
		}
	}
}

// mean is the mean duration of the attempts with outcome o.
func (p *prober) mean(o outcome) time.Duration {
	if p.n[o] == 0 {
		return 0
	}
	return p.spent[o] / time.Duration(p.n[o])
}

func (p *prober) failures() int { return p.n[failed] }

func (o outcome) String() string {
	switch o {
	case routed:
		return "routed"
	case refused:
		return "refused"
	default:
		return "failed"
	}
}
