package gateway

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"
)

const otherSNI = "outbound_.80_._.other.demo.svc.cluster.local"

// syncSource is a RouteTable whose Updated channel is unbuffered: set
// returns once the gateway has acted on the update, so a test knows the
// gateway saw each table, however quickly the next one follows.
type syncSource struct {
	*RouteTable
	updated chan struct{}
}

func (s *syncSource) Updated() <-chan struct{} { return s.updated }

func (s *syncSource) set(t testing.TB, r *Routes) {
	t.Helper()
	s.Set(r)
	// The second send is taken once the gateway has acted on the first
	// (and on anything due on its clock by then); acting on the same
	// table again changes nothing.
	for range 2 {
		select {
		case s.updated <- struct{}{}:
		case <-time.After(10 * time.Second):
			t.Fatal("the gateway did not take the routing table update within 10s")
		}
	}
}

// settle returns once the gateway has acted on everything due on its
// clock: after a Step of the fake clock, its timer fired.
func (s *syncSource) settle(t testing.TB) {
	t.Helper()
	s.set(t, s.Routes())
}

// startSyncGateway starts a gateway on a syncSource, with a fake clock
// the test moves.
func startSyncGateway(t testing.TB, routes *Routes, mod func(*Config)) (*harness, *syncSource, *clocktesting.FakeClock) {
	t.Helper()
	src := &syncSource{RouteTable: NewRouteTable(routes), updated: make(chan struct{})}
	fc := clocktesting.NewFakeClock(time.Now())
	return startGatewayOn(t, src, src.RouteTable, mod, func(g *Gateway) { g.clock = fc }), src, fc
}

// echoes reports whether c, connected to a namedEcho backend, still
// answers a line.
func echoes(t testing.TB, c *tls.Conn, line string) error {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	defer func() { _ = c.SetDeadline(time.Time{}) }()
	if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
		return err
	}
	got, err := readLineErr(c)
	if err != nil {
		return err
	}
	if got != line {
		return fmt.Errorf("echoed %q, want %q", got, line)
	}
	return nil
}

// requireClosedByGateway waits (bounded) for the gateway to close c.
func requireClosedByGateway(t testing.TB, c *tls.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "closed by the gateway, not by our deadline: %v", err)
	require.Error(t, err)
}

// When a service's export is revoked (its route leaves the table), new
// connections are refused at once and those established are closed once
// RouteDrainTimeout has passed; other routes' connections stay, and a
// change of the route's endpoints closes nothing.
func TestRevokedRouteDrainsItsConnections(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
	}{
		{"at once", 0},
		{"after the timeout", 45 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPKI(t)
			beA := startBackend(t, p.server, namedEcho("a"))
			beA2 := startBackend(t, p.server, namedEcho("a2"))
			beOther := startBackend(t, p.server, namedEcho("other"))
			echoRoute := route(echoSNI, echoCluster, beA.addr())
			otherRoute := route(otherSNI, "outbound|80||other.demo.svc.cluster.local", beOther.addr())
			h, src, clock := startSyncGateway(t, mustRoutes(t, echoRoute, otherRoute), func(c *Config) {
				c.RouteDrainTimeout = tc.timeout
			})

			echoConn := h.connect(t, p.client, echoSNI, "a")
			otherConn := h.connect(t, p.client, otherSNI, "other")

			// The pod behind the route is replaced (EDS): established
			// connections keep the old one, well past the timeout.
			src.set(t, mustRoutes(t, route(echoSNI, echoCluster, beA2.addr()), otherRoute))
			clock.Step(tc.timeout + time.Second)
			src.settle(t)
			require.NoError(t, echoes(t, echoConn, "endpoints changed"), "endpoint churn must not close connections")
			c, err := h.dialTLS(p.client, echoSNI)
			require.NoError(t, err)
			require.Equal(t, "a2", readLine(t, c))
			require.NoError(t, c.Close())
			eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 2 },
				"the gateway let go of the connection closed")

			// Unexported.
			src.set(t, mustRoutes(t, otherRoute))
			_, err = h.dialTLS(p.client, echoSNI)
			require.ErrorContains(t, err, "unrecognized name", "new connections are refused at once")
			if tc.timeout > 0 {
				clock.Step(tc.timeout - time.Millisecond)
				src.settle(t)
				require.NoError(t, echoes(t, echoConn, "draining"), "open until the timeout has passed")
				clock.Step(time.Millisecond)
			}
			requireClosedByGateway(t, echoConn)
			require.NoError(t, echoes(t, otherConn, "still here"), "another route's connection stays")

			eventually(t, func() bool {
				return h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonRouteRemoved+`"`) == 1
			}, "the closed connection is counted once")
			eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 1 },
				"only the other route's connection is left")
			require.Equal(t, int64(1), beA.accepts.Load())
		})
	}
}

// A route back before RouteDrainTimeout passes keeps its connections.
func TestRouteBackKeepsItsConnections(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	echoRoute := route(echoSNI, echoCluster, be.addr())
	const timeout = 45 * time.Second
	h, src, clock := startSyncGateway(t, mustRoutes(t, echoRoute), func(c *Config) {
		c.RouteDrainTimeout = timeout
	})
	c := h.connect(t, p.client, echoSNI, "echo")

	src.set(t, mustRoutes(t))
	clock.Step(timeout / 2)
	src.settle(t)
	require.NoError(t, echoes(t, c, "removed"), "still open within the route drain timeout")
	src.set(t, mustRoutes(t, echoRoute))
	clock.Step(timeout)
	src.settle(t)
	require.NoError(t, echoes(t, c, "back"), "the route came back: its connection stays")
	require.Zero(t, h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonRouteRemoved+`"`))

	// Removed again: the new removal runs its own timeout.
	src.set(t, mustRoutes(t))
	clock.Step(timeout - time.Millisecond)
	src.settle(t)
	require.NoError(t, echoes(t, c, "removed again"), "a whole timeout from the second removal")
	clock.Step(time.Millisecond)
	requireClosedByGateway(t, c)
	eventually(t, func() bool {
		return h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonRouteRemoved+`"`) == 1
	}, "counted")
}

// A connection that ended on its own before its route's drain timeout
// is not counted as closed by the gateway.
func TestRouteDrainCountsOnlyOpenConnections(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h, src, clock := startSyncGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) {
		c.RouteDrainTimeout = 45 * time.Second
	})
	stays := h.connect(t, p.client, echoSNI, "echo")
	leaves := h.connect(t, p.client, echoSNI, "echo")

	src.set(t, mustRoutes(t))
	require.NoError(t, leaves.Close())
	eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 1 }, "one left on its own")
	clock.Step(45 * time.Second)
	requireClosedByGateway(t, stays)
	eventually(t, func() bool {
		return h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonRouteRemoved+`"`) == 1
	}, "counted")
}

// A route's connections closed at its drain timeout are no longer in
// use: an update that comes before their goroutines untrack them does
// not find the route in use again and close (and count) them twice. It
// did, as often as updates came in that moment.
func TestRemovedRouteClosesItsConnectionsOnce(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	table := NewRouteTable(mustRoutes(t, route(echoSNI, echoCluster, be.addr())))
	cfg := DefaultConfig()
	cfg.RouteDrainTimeout = 0
	g, err := New(cfg, table, testLogger(t))
	require.NoError(t, err)
	down, up := tcpPair(t)
	require.True(t, g.trackRouted(down, up, table.Routes().lookup(echoSNI)))

	table.Set(mustRoutes(t))
	gone := map[string]time.Time{}
	g.markGone(table.Routes(), gone)
	require.Contains(t, gone, echoSNI)
	g.closeGone(gone)
	_, err = down.Read(make([]byte, 1))
	require.ErrorIs(t, err, net.ErrClosed, "closed at once")

	// Another update, before the connection's goroutine untracked it.
	g.markGone(table.Routes(), gone)
	require.Empty(t, gone, "the route is no longer in use")

	g.untrackAndClose(down, up)
	require.Empty(t, g.routed)
	require.Empty(t, g.conns)
}

// tcpPair is the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer ln.Close()
	a, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	require.NoError(t, err)
	b, err := ln.AcceptTCP()
	require.NoError(t, err)
	t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
	return a, b
}
