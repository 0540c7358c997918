package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/relay"
)

// TLS alert descriptions (RFC 8446 6.2) the gateway sends when it refuses
// a ClientHello it could read. A connection that does not speak TLS, or
// that the gateway could not route to a working endpoint, is closed
// without an alert, as Envoy's tcp_proxy does.
const (
	alertHandshakeFailure = 40
	alertDecodeError      = 50
	alertUnrecognizedName = 112
)

var peekBuffers = sync.Pool{New: func() any { return new([peekBufferSize]byte) }}

// serveConn is one downstream connection's goroutine: peek, route, dial,
// replay, splice.
func (g *Gateway) serveConn(down *net.TCPConn) {
	g.track(down)
	var up *net.TCPConn
	defer func() {
		g.untrackAndClose(down, up)
		g.active.Add(-1)
		g.metrics.active.Add(context.Background(), -1)
		g.handlers.Done()
	}()

	buf := peekBuffers.Get().(*[peekBufferSize]byte)
	hello, n, err := readClientHello(down, buf[:], time.Now().Add(g.cfg.ClientHelloTimeout))
	if err != nil {
		peekBuffers.Put(buf)
		g.refuseHello(down, err)
		return
	}
	routes := g.src.Routes()
	c := routes.lookup(hello.ServerName)
	if c == nil {
		peekBuffers.Put(buf)
		reason := ReasonUnknownSNI
		if routes == nil {
			reason = ReasonNoRoutes
		}
		g.refuse(down, reason, alertUnrecognizedName, "sni", hello.ServerName)
		return
	}
	up, err = g.dial(c)
	if err != nil {
		peekBuffers.Put(buf)
		g.refuse(down, ReasonNoEndpoint, 0, "sni", hello.ServerName, "error", err)
		return
	}
	if !g.trackRouted(down, up, c) {
		// Unexported while dialing: not a byte has reached the pod.
		peekBuffers.Put(buf)
		g.refuse(down, ReasonUnknownSNI, alertUnrecognizedName, "sni", hello.ServerName)
		return
	}
	ok := g.replay(down, up, c, hello, buf[:n])
	peekBuffers.Put(buf)
	if !ok {
		return
	}
	idle := c.route.IdleTimeout
	if idle == 0 {
		idle = g.cfg.IdleTimeout
	}
	g.pipe(down, up, c, idle, n)
}

// replay writes what was peeked to the endpoint just connected to; then
// the bare sockets can be spliced (wrapping down in a reader that
// replays would cost splice(2)). It reports whether the write succeeded;
// if not, it refuses down. The connection had succeeded: a failure here
// is the endpoint's (it reset or closed at once), an upstream_error
// refusal, not a connect failure.
func (g *Gateway) replay(down, up *net.TCPConn, c *cluster, hello ClientHello, peeked []byte) bool {
	if _, err := up.Write(peeked); err != nil {
		g.refuse(down, ReasonUpstreamError, 0, "sni", hello.ServerName, "error", err)
		return false
	}
	g.metrics.routed.Add(context.Background(), 1, c.attrsOpt())
	return true
}

func (g *Gateway) refuseHello(down *net.TCPConn, err error) {
	switch {
	case errors.Is(err, ErrNotTLS):
		g.refuse(down, ReasonNotTLS, 0, "error", err)
	case errors.Is(err, ErrNoSNI):
		g.refuse(down, ReasonNoSNI, alertUnrecognizedName, "error", err)
	case errors.Is(err, ErrTooLarge):
		g.refuse(down, ReasonTooLarge, alertHandshakeFailure, "error", err)
	case errors.Is(err, ErrMalformed):
		g.refuse(down, ReasonMalformed, alertDecodeError, "error", err)
	case errors.Is(err, ErrClientHelloTimeout):
		g.refuse(down, ReasonHelloTimeout, 0, "error", err)
	default:
		g.refuse(down, ReasonClosedEarly, 0, "error", err)
	}
}

// refuse counts a refusal, sends a fatal TLS alert when alert is not zero,
// and leaves closing to the caller.
func (g *Gateway) refuse(down *net.TCPConn, reason string, alert byte, logArgs ...any) {
	g.metrics.refuse(reason)
	if alert != 0 {
		// level fatal (2); record version TLS 1.2, which every client
		// accepts before a version is negotiated.
		_ = down.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = down.Write([]byte{21, 3, 3, 0, 2, 2, alert})
	}
	if g.log.Enabled(context.Background(), slog.LevelDebug) {
		g.log.Debug("refused", append([]any{"reason", reason, "remote", down.RemoteAddr().String()}, logArgs...)...)
	}
}

// dial connects to one of c's endpoints: round-robin over the healthy
// ones, at most MaxConnectAttempts tries, never the same endpoint twice.
// Endpoints that recently failed are tried last, after every other: when
// those are all gone it tries them anyway, as Envoy's panic threshold
// does, since a stale ejection must not black-hole a cluster that came
// back.
func (g *Gateway) dial(c *cluster) (*net.TCPConn, error) {
	timeout := c.route.ConnectTimeout
	if timeout == 0 {
		timeout = g.cfg.DialTimeout
	}
	if c.route.DNS != "" {
		conn, err := g.dialAddr(c.route.DNS, timeout)
		if err != nil {
			g.metrics.connectFailures.Add(context.Background(), 1, c.attrsOpt())
		}
		return conn, err
	}
	n := uint32(len(c.healthy))
	if n == 0 {
		return nil, errors.New("no healthy endpoint")
	}
	start := c.next.Add(1) - 1
	attempts := 0
	var lastErr error
	// Pass 0 dials the endpoints not ejected, in turn among themselves,
	// as Envoy's round robin leaves ejected hosts out of its rotation
	// (moving on to the next in the list instead would give that one the
	// ejected ones' turns too); pass 1 the others. An endpoint that
	// fails in pass 0 is ejected by then: tried records pass 0's (indexes
	// into healthy), so that pass 1 does not dial it again before one it
	// never tried.
	ejections := g.health.Any() // rare: only while some endpoint is ejected
	var liveBuf [64]uint32
	live := liveBuf[:0]
	if ejections {
		now := time.Now().UnixNano()
		for i := range n {
			if !g.health.Ejected(c.healthy[i], now) {
				live = append(live, i)
			}
		}
	}
	var triedBuf [8]uint32
	tried := triedBuf[:0]
	for pass := range 2 {
		turns := n
		if pass == 0 && ejections {
			turns = uint32(len(live))
		}
		for k := uint32(0); k < turns && attempts < g.cfg.MaxConnectAttempts; k++ {
			i := (start + k) % n
			if pass == 0 && ejections {
				i = live[(start+k)%turns]
			}
			if pass == 0 {
				tried = append(tried, i)
			} else if slices.Contains(tried, i) {
				continue
			}
			ep := c.healthy[i]
			attempts++
			conn, err := g.dialAddr(ep.String(), timeout)
			if err != nil {
				lastErr = err
				g.metrics.connectFailures.Add(context.Background(), 1, c.attrsOpt())
				g.health.Eject(ep)
				continue
			}
			if pass == 1 {
				g.health.Restore(ep)
			}
			return conn, nil
		}
	}
	return nil, fmt.Errorf("%d connect attempts failed, the last: %w", attempts, lastErr)
}

// dialAddr connects to "host:port" (an endpoint's address, or a
// STRICT_DNS cluster's name, resolved). Not with Dialer.DialTCP, whose
// local address cannot be left out: a zero netip.AddrPort becomes a
// non-nil *TCPAddr, and the socket is bound to port 0 before connect. A
// port bound that way is the connection's alone, whatever the
// destination, so every upstream connection the gateway holds would take
// one of the ~28,000 ephemeral ports of the whole host, where connect
// alone shares a port between different destinations, and it costs a
// bind(2) per connection.
func (g *Gateway) dialAddr(addr string, timeout time.Duration) (*net.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := g.dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return conn.(*net.TCPConn), nil
}

// pipe copies both ways until both directions have ended, propagating
// half-close, and closes the connection after idle without a byte either
// way (internal/relay). One direction runs on the caller's goroutine.
// replayed, the ClientHello bytes already written to up, count as
// received with the rest: one lookup of c's counts per connection.
func (g *Gateway) pipe(down, up *net.TCPConn, c *cluster, idle time.Duration, replayed int) {
	b := g.metrics.bytesOf(c)
	b.received.Add(int64(replayed))
	if relay.Pipe(down, up, idle, func(n int64) { b.received.Add(n) }, func(n int64) { b.sent.Add(n) }) {
		g.metrics.closed(ReasonIdleTimeout, 1)
	}
}
