package gateway

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const otherSNI = "outbound_.80_._.other.demo.svc.cluster.local"

// syncSource is a RouteTable whose Updated channel is unbuffered: set
// returns once the gateway has taken the update, so a test knows the
// gateway saw each table, however quickly the next one follows.
type syncSource struct {
	*RouteTable
	updated chan struct{}
}

func (s *syncSource) Updated() <-chan struct{} { return s.updated }

func (s *syncSource) set(t testing.TB, r *Routes) {
	t.Helper()
	s.Set(r)
	select {
	case s.updated <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("the gateway did not take the routing table update within 10s")
	}
}

func startSyncGateway(t testing.TB, routes *Routes, mod func(*Config)) (*harness, *syncSource) {
	t.Helper()
	src := &syncSource{RouteTable: NewRouteTable(routes), updated: make(chan struct{})}
	return startGatewayOn(t, src, src.RouteTable, mod, nil), src
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
		{"after the timeout", 300 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPKI(t)
			beA := startBackend(t, p.server, namedEcho("a"))
			beA2 := startBackend(t, p.server, namedEcho("a2"))
			beOther := startBackend(t, p.server, namedEcho("other"))
			echoRoute := route(echoSNI, echoCluster, beA.addr())
			otherRoute := route(otherSNI, "outbound|80||other.demo.svc.cluster.local", beOther.addr())
			h, src := startSyncGateway(t, mustRoutes(t, echoRoute, otherRoute), func(c *Config) {
				c.RouteDrainTimeout = tc.timeout
			})

			echoConn := h.connect(t, p.client, echoSNI, "a")
			otherConn := h.connect(t, p.client, otherSNI, "other")

			// The pod behind the route is replaced (EDS): established
			// connections keep the old one, well past the timeout.
			src.set(t, mustRoutes(t, route(echoSNI, echoCluster, beA2.addr()), otherRoute))
			time.Sleep(tc.timeout + 500*time.Millisecond)
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
	const timeout = 2 * time.Second
	h, src := startSyncGateway(t, mustRoutes(t, echoRoute), func(c *Config) {
		c.RouteDrainTimeout = timeout
	})
	c := h.connect(t, p.client, echoSNI, "echo")

	src.set(t, mustRoutes(t))
	require.NoError(t, echoes(t, c, "removed"), "still open within the route drain timeout")
	src.set(t, mustRoutes(t, echoRoute))
	time.Sleep(timeout + time.Second)
	require.NoError(t, echoes(t, c, "back"), "the route came back: its connection stays")
	require.Zero(t, h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonRouteRemoved+`"`))

	// Removed again: the new removal runs its own timeout.
	src.set(t, mustRoutes(t))
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
	h, src := startSyncGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) {
		c.RouteDrainTimeout = 2 * time.Second // for the other to be gone by then
	})
	stays := h.connect(t, p.client, echoSNI, "echo")
	leaves := h.connect(t, p.client, echoSNI, "echo")

	src.set(t, mustRoutes(t))
	require.NoError(t, leaves.Close())
	eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 1 }, "one left on its own")
	requireClosedByGateway(t, stays)
	eventually(t, func() bool {
		return h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonRouteRemoved+`"`) == 1
	}, "counted")
}
