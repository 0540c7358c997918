package gateway

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"
)

const echoSNI = "outbound_.80_._.echo.demo.svc.cluster.local"
const echoCluster = "outbound|80||echo.demo.svc.cluster.local"

// pki is two clusters' trust domains: clients live in a.mesh (the peer
// cluster), backends in b.mesh (the gateway's cluster). The gateway holds
// no key of either.
type pki struct {
	a, b             *testCA
	clientID, echoID spiffeid.ID
	client, server   *tls.Config
}

func newPKI(t testing.TB) *pki {
	a, b := newTestCA(t, "a.mesh"), newTestCA(t, "b.mesh")
	p := &pki{a: a, b: b, clientID: a.id("/ns/demo/sa/client"), echoID: b.id("/ns/demo/sa/echo")}
	// Each side validates the other against the bundle of the other's own
	// trust domain, never a merged one.
	p.client = tlsconfig.MTLSClientConfig(a.svid(t, "/ns/demo/sa/client"), x509bundle.NewSet(b.bundle), tlsconfig.AuthorizeID(p.echoID))
	p.server = tlsconfig.MTLSServerConfig(b.svid(t, "/ns/demo/sa/echo"), x509bundle.NewSet(a.bundle), tlsconfig.AuthorizeID(p.clientID))
	p.client.MinVersion = tls.VersionTLS13
	return p
}

// recorder is a TCP relay that keeps every byte going towards the
// backend: what the gateway sent to its upstream.
type recorder struct {
	ln net.Listener
	// mu guards seen.
	mu   sync.Mutex
	seen bytes.Buffer
}

func startRecorder(t testing.TB, target netip.AddrPort) *recorder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r := &recorder{ln: ln}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target.String())
			if err != nil {
				_ = c.Close()
				continue
			}
			go func() {
				_, _ = io.Copy(io.MultiWriter(up, r), c)
				_ = up.(*net.TCPConn).CloseWrite()
			}()
			go func() {
				_, _ = io.Copy(c, up)
				_ = c.Close()
				_ = up.Close()
			}()
		}
	}()
	return r
}

func (r *recorder) Write(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen.Write(b)
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.seen.Bytes())
}

func (r *recorder) addr() netip.AddrPort { return netip.MustParseAddrPort(r.ln.Addr().String()) }

// A client in another trust domain completes mTLS with the backend
// through the gateway: the backend sees the client's SPIFFE ID, the client
// the backend's, and what crossed the gateway is ciphertext only.
func TestMTLSThroughGateway(t *testing.T) {
	p := newPKI(t)
	secret := []byte("plaintext-the-gateway-must-never-see")
	peerIDs := make(chan string, 1)
	be := startBackend(t, p.server, func(_ net.Conn, c *tls.Conn) {
		peerIDs <- c.ConnectionState().PeerCertificates[0].URIs[0].String()
		buf := make([]byte, len(secret))
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		_, _ = c.Write(append([]byte("echo:"), buf...))
	})
	rec := startRecorder(t, be.addr())
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, rec.addr())), nil)

	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	defer c.Close()
	require.Equal(t, p.echoID.String(), c.ConnectionState().PeerCertificates[0].URIs[0].String())
	_, err = c.Write(secret)
	require.NoError(t, err)
	got := make([]byte, len("echo:")+len(secret))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, "echo:"+string(secret), string(got))
	require.Equal(t, p.clientID.String(), <-peerIDs, "the backend authenticated the client itself")

	seen := rec.bytes()
	require.NotEmpty(t, seen)
	require.False(t, bytes.Contains(seen, secret), "plaintext crossed the gateway")
	require.True(t, bytes.Contains(seen, []byte(echoSNI)), "the ClientHello was replayed to the upstream")
	require.Equal(t, byte(22), seen[0], "the upstream got the client's own TLS records from the first byte")

	require.Equal(t, int64(1), be.accepts.Load())
	require.Equal(t, 1.0, h.metric("isthmus_gateway_routed_connections_total", `cluster="`+echoCluster+`"`))
	require.Greater(t, h.metric("isthmus_gateway_received_bytes_total", `cluster="`+echoCluster+`"`), float64(len(secret)))
	_ = c.Close()
	eventually(t, func() bool {
		return h.metric("isthmus_gateway_sent_bytes_total", `cluster="`+echoCluster+`"`) > float64(len(secret)) &&
			h.metric("isthmus_gateway_connections_active", "") == 0
	}, "bytes counted both ways once the connection closed")
}

// Bytes are counted as they cross, not when the connection ends: with the
// default idle timeout of an hour, a connection still open has both
// directions counted.
func TestBytesCountedWhileOpen(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), nil)
	c := h.connect(t, p.client, echoSNI, "echo")
	_, err := fmt.Fprintf(c, "ping\n")
	require.NoError(t, err)
	require.Equal(t, "ping", readLine(t, c))

	hello := captureClientHello(t, &tls.Config{ServerName: echoSNI})
	eventually(t, func() bool {
		// The server's flight is a certificate chain; the client's, past
		// its ClientHello, at least a Finished and the line.
		return h.metric("isthmus_gateway_sent_bytes_total", `cluster="`+echoCluster+`"`) > 500 &&
			h.metric("isthmus_gateway_received_bytes_total", `cluster="`+echoCluster+`"`) > float64(len(hello)+50)
	}, "bytes counted both ways while the connection is open")
	require.Equal(t, 1.0, h.metric("isthmus_gateway_connections_active", ""), "still open")
}

// A replay that fails after the connect succeeded (the endpoint closed or
// reset at once) is refused as upstream_error and is not a connect
// failure: the connect worked.
func TestReplayFailureIsNotAConnectFailure(t *testing.T) {
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, unusedAddr(t))), nil)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer ln.Close()
	dial := func() (client, server *net.TCPConn) {
		client, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		require.NoError(t, err)
		server, err = ln.AcceptTCP()
		require.NoError(t, err)
		t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
		return client, server
	}
	_, down := dial()
	up, _ := dial()
	require.NoError(t, up.Close()) // the write fails at once

	c := h.table.Routes().lookup(echoSNI)
	require.False(t, h.gw.replay(down, up, c, ClientHello{ServerName: echoSNI}, []byte{22, 3, 1}))
	require.Equal(t, 1.0, h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonUpstreamError+`"`))
	require.Zero(t, h.metric("isthmus_gateway_upstream_connect_failures_total", `cluster="`+echoCluster+`"`))
	require.Zero(t, h.metric("isthmus_gateway_routed_connections_total", `cluster="`+echoCluster+`"`))
}

// Connections the gateway cannot route are refused before any byte reaches
// a backend, each with its reason and the documented alert or close.
func TestRefusals(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) {
		c.ClientHelloTimeout = 300 * time.Millisecond
	})
	realHello := captureClientHello(t, &tls.Config{ServerName: echoSNI})

	// rawExchange sends data, then reads until the gateway closes.
	rawExchange := func(t *testing.T, data []byte) []byte {
		c, err := net.Dial("tcp", h.addr())
		require.NoError(t, err)
		defer c.Close()
		_, err = c.Write(data)
		require.NoError(t, err)
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		var ne net.Error
		require.False(t, errors.As(err, &ne) && ne.Timeout(), "the gateway closed the connection")
		return got
	}
	alert := func(desc byte) []byte { return []byte{21, 3, 3, 0, 2, 2, desc} }
	cases := []struct {
		name   string
		reason string
		run    func(t *testing.T)
	}{
		{"unknown SNI gets unrecognized_name", ReasonUnknownSNI, func(t *testing.T) {
			_, err := h.dialTLS(p.client, "outbound_.80_._.secret.demo.svc.cluster.local")
			require.ErrorContains(t, err, "unrecognized name")
		}},
		{"no SNI gets unrecognized_name", ReasonNoSNI, func(t *testing.T) {
			cfg := p.client.Clone()
			_, err := h.dialTLS(cfg, "")
			require.ErrorContains(t, err, "unrecognized name")
		}},
		{"plain HTTP is closed without an alert", ReasonNotTLS, func(t *testing.T) {
			require.Empty(t, rawExchange(t, []byte("GET / HTTP/1.1\r\nHost: echo\r\n\r\n")))
		}},
		{"malformed ClientHello gets decode_error", ReasonMalformed, func(t *testing.T) {
			require.Equal(t, alert(50), rawExchange(t, records(helloMsg(sniExt("a b")), 1<<14)))
		}},
		{"oversized ClientHello gets handshake_failure", ReasonTooLarge, func(t *testing.T) {
			big := records(helloMsg(sniExt(echoSNI), tlsExt(21, make([]byte, 17000))), 1<<14)
			require.Equal(t, alert(40), rawExchange(t, big))
		}},
		{"ClientHello over too many records gets handshake_failure", ReasonTooLarge, func(t *testing.T) {
			split := records(helloMsg(sniExt(echoSNI), tlsExt(21, make([]byte, 200))), 4)
			require.Equal(t, alert(40), rawExchange(t, split))
		}},
		{"slow ClientHello is closed at the deadline", ReasonHelloTimeout, func(t *testing.T) {
			require.Empty(t, rawExchange(t, realHello[:20]))
		}},
		{"closing early is counted apart", ReasonClosedEarly, func(t *testing.T) {
			c, err := net.Dial("tcp", h.addr())
			require.NoError(t, err)
			_, _ = c.Write(realHello[:20])
			require.NoError(t, c.Close())
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := h.metric("isthmus_gateway_refusals_total", `reason="`+tc.reason+`"`)
			tc.run(t)
			eventually(t, func() bool {
				return h.metric("isthmus_gateway_refusals_total", `reason="`+tc.reason+`"`) == before+1
			}, "refusal counted under "+tc.reason)
		})
	}
	require.Zero(t, be.accepts.Load(), "no refused connection reached the backend")

	// And a routable name still works after all that.
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	require.Equal(t, "echo", readLine(t, c))
	_ = c.Close()
	require.Equal(t, int64(1), be.accepts.Load())
}

// Before the first routing table the gateway is not ready and routes
// nothing.
func TestNoRoutesYet(t *testing.T) {
	p := newPKI(t)
	h := startGateway(t, nil, nil)
	require.Equal(t, http.StatusServiceUnavailable, h.ready())
	_, err := h.dialTLS(p.client, echoSNI)
	require.ErrorContains(t, err, "unrecognized name")
	require.Equal(t, 1.0, h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonNoRoutes+`"`))

	be := startBackend(t, p.server, namedEcho("echo"))
	h.table.Set(mustRoutes(t, route(echoSNI, echoCluster, be.addr())))
	require.Equal(t, http.StatusOK, h.ready())
	require.Equal(t, 1.0, h.metric("isthmus_gateway_routes", ""))
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	require.Equal(t, "echo", readLine(t, c))
	_ = c.Close()
}

// A new routing table takes effect for new connections; established ones
// keep their upstream.
func TestRouteSwap(t *testing.T) {
	p := newPKI(t)
	beA := startBackend(t, p.server, namedEcho("a"))
	beB := startBackend(t, p.server, namedEcho("b"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, beA.addr())), nil)

	old := h.connect(t, p.client, echoSNI, "a")

	h.table.Set(mustRoutes(t, route(echoSNI, echoCluster, beB.addr())))
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	require.Equal(t, "b", readLine(t, c))
	_ = c.Close()

	_, err = fmt.Fprintf(old, "still a\n")
	require.NoError(t, err)
	require.Equal(t, "still a", readLine(t, old), "the established connection kept its upstream")

	h.table.Set(mustRoutes(t, route("outbound_.80_._.other.demo.svc.cluster.local", "other", beB.addr())))
	_, err = h.dialTLS(p.client, echoSNI)
	require.ErrorContains(t, err, "unrecognized name", "an unexported service is no longer routable")
	require.Equal(t, int64(1), beA.accepts.Load())
	require.Equal(t, int64(1), beB.accepts.Load())
}

// An endpoint that refuses connections is skipped (once failed, it is
// ejected and not tried again); an unhealthy one is never picked; a
// cluster without a working endpoint refuses.
func TestEndpointSelection(t *testing.T) {
	p := newPKI(t)
	alive := startBackend(t, p.server, namedEcho("alive"))
	notReady := startBackend(t, p.server, namedEcho("not-ready"))
	dead := unusedAddr(t)
	r := route(echoSNI, echoCluster, dead, alive.addr())
	r.Endpoints = append(r.Endpoints, Endpoint{Addr: notReady.addr(), Healthy: false})
	deadOnly := route("outbound_.81_._.dead.demo.svc.cluster.local", "dead", dead)
	h := startGateway(t, mustRoutes(t, r, deadOnly), nil)

	for i := range 6 {
		c, err := h.dialTLS(p.client, echoSNI)
		require.NoError(t, err, "connection %d", i)
		require.Equal(t, "alive", readLine(t, c))
		_ = c.Close()
	}
	require.Equal(t, int64(6), alive.accepts.Load())
	require.Zero(t, notReady.accepts.Load(), "an unhealthy endpoint is never picked")
	require.Equal(t, 1.0, h.metric("isthmus_gateway_upstream_connect_failures_total", `cluster="`+echoCluster+`"`),
		"the dead endpoint was tried once, then ejected")

	// Every endpoint ejected: the gateway still tries (and fails), then refuses.
	_, err := h.dialTLS(p.client, deadOnly.SNI)
	require.Error(t, err)
	require.Equal(t, 1.0, h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonNoEndpoint+`"`))
}

// An endpoint that fails during one connection's attempts is not dialled
// again by it while another is left untried, even one ejected before: the
// live pod, ejected by a stale failure, is tried after the two dead ones
// instead of the first dead one twice.
func TestEndpointSelectionTriesEachOnce(t *testing.T) {
	p := newPKI(t)
	alive := startBackend(t, p.server, namedEcho("alive"))
	deadA, deadC := unusedAddr(t), unusedAddr(t)
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, deadA, alive.addr(), deadC)), func(c *Config) {
		c.MaxConnectAttempts = 3
	})
	h.gw.health.Eject(alive.addr()) // a failure of a moment ago

	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err, "the one live endpoint was tried")
	require.Equal(t, "alive", readLine(t, c))
	_ = c.Close()
	require.Equal(t, int64(1), alive.accepts.Load())
	require.Equal(t, 2.0, h.metric("isthmus_gateway_upstream_connect_failures_total", `cluster="`+echoCluster+`"`),
		"each dead endpoint dialled once")
	require.Zero(t, h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonNoEndpoint+`"`))
}

// The endpoints left after an ejection share its turns evenly, as in
// Envoy's round robin, which leaves ejected hosts out of the rotation.
// Moving on to the next endpoint in the list gave that one every turn
// of the ejected one: 20 connections to 10 here.
func TestEjectedEndpointsTurnsAreShared(t *testing.T) {
	p := newPKI(t)
	b := startBackend(t, p.server, namedEcho("b"))
	c := startBackend(t, p.server, namedEcho("c"))
	dead := unusedAddr(t)
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, dead, b.addr(), c.addr())), nil)
	for i := range 30 {
		conn, err := h.dialTLS(p.client, echoSNI)
		require.NoError(t, err, "connection %d", i)
		_ = readLine(t, conn)
		_ = conn.Close()
	}
	require.InDelta(t, b.accepts.Load(), c.accepts.Load(), 1, "b %d, c %d", b.accepts.Load(), c.accepts.Load())
	require.Equal(t, 1.0, h.metric("isthmus_gateway_upstream_connect_failures_total", `cluster="`+echoCluster+`"`))
}

// The health and metrics servers close keep-alive connections left idle,
// rather than hold them (and a goroutine each) for ever.
func TestHTTPIdleConnectionsClosed(t *testing.T) {
	table := NewRouteTable(mustRoutes(t, route(echoSNI, echoCluster, unusedAddr(t))))
	h := startGatewayOn(t, table, table, nil, func(g *Gateway) { g.httpIdleTimeout = 200 * time.Millisecond })

	for _, addr := range []net.Addr{h.gw.HealthAddr(), h.gw.MetricsAddr()} {
		c, err := net.Dial("tcp", addr.String())
		require.NoError(t, err)
		defer c.Close()
		_, err = fmt.Fprintf(c, "GET /healthz/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
		require.NoError(t, err)
		r := bufio.NewReader(c)
		resp, err := http.ReadResponse(r, nil)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.False(t, resp.Close, "a keep-alive connection")

		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = r.ReadByte()
		var ne net.Error
		require.False(t, errors.As(err, &ne) && ne.Timeout(), "the idle connection is closed by the server: %v", err)
		require.ErrorIs(t, err, io.EOF)
	}
}

// A STRICT_DNS route (the federation cluster by hostname) resolves at
// dial time.
func TestDNSRoute(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("federator"))
	r := Route{SNI: "federation.isthmus.internal", Cluster: "isthmus-federation", DNS: fmt.Sprintf("localhost:%d", be.addr().Port())}
	h := startGateway(t, mustRoutes(t, r), nil)
	c, err := h.dialTLS(p.client, r.SNI)
	require.NoError(t, err)
	require.Equal(t, "federator", readLine(t, c))
	_ = c.Close()
}

// Half-close crosses the gateway at the TCP level: the client's FIN
// reaches the backend, which can still answer.
func TestHalfClose(t *testing.T) {
	p := newPKI(t)
	sawFIN := make(chan bool, 1)
	be := startBackend(t, p.server, func(raw net.Conn, c *tls.Conn) {
		req, err := io.ReadAll(c) // until the client's close_notify
		if err != nil {
			return
		}
		// Below TLS, the socket itself reached EOF: the gateway passed the
		// FIN on with CloseWrite.
		_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := raw.Read(make([]byte, 1))
		sawFIN <- n == 0 && errors.Is(err, io.EOF)
		_, _ = fmt.Fprintf(c, "got %d bytes", len(req))
	})
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), nil)
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write(bytes.Repeat([]byte("x"), 100_000))
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())                          // close_notify
	require.NoError(t, c.NetConn().(*net.TCPConn).CloseWrite()) // FIN
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, "got 100000 bytes", string(resp))
	require.True(t, <-sawFIN, "the backend's socket saw EOF")
}

// On shutdown the gateway fails readiness, stops accepting, and lets
// connections in flight finish.
func TestDrainFinishesInFlight(t *testing.T) {
	p := newPKI(t)
	release := make(chan struct{})
	be := startBackend(t, p.server, func(_ net.Conn, c *tls.Conn) {
		line := readLine(t, c)
		<-release
		_, _ = fmt.Fprintf(c, "late answer to %s\n", line)
	})
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), nil)
	require.Equal(t, http.StatusOK, h.ready())
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	defer c.Close()
	_, err = fmt.Fprintf(c, "q1\n")
	require.NoError(t, err)

	stopped := make(chan error, 1)
	go func() { stopped <- h.stop() }()
	eventually(t, func() bool { return h.ready() == http.StatusServiceUnavailable }, "readiness fails while draining")
	eventually(t, func() bool {
		c, err := net.Dial("tcp", h.addr())
		if err == nil {
			_ = c.Close()
		}
		return err != nil
	}, "the listener is closed")
	select {
	case <-stopped:
		t.Fatal("Run returned with a connection in flight")
	default:
	}

	close(release)
	require.Equal(t, "late answer to q1", readLine(t, c))
	require.NoError(t, c.Close())
	select {
	case err := <-stopped:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return once the last connection closed")
	}
}

// A connection still open when the drain timeout passes is closed, and
// counted as the gateway's close.
func TestDrainTimeoutClosesTheRest(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) {
		c.DrainTimeout = 300 * time.Millisecond
	})
	c := h.connect(t, p.client, echoSNI, "echo")
	require.NoError(t, h.stop())
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "closed by the gateway, not by our deadline: %v", err)
	require.Error(t, err)
	require.Equal(t, 1.0, h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonDrainTimeout+`"`))
}

// Beyond MaxConnections a connection is closed at once and counted.
func TestConnectionLimit(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) {
		c.MaxConnections = 2
	})
	var open []*tls.Conn
	for range 2 {
		c, err := h.dialTLS(p.client, echoSNI)
		require.NoError(t, err)
		require.Equal(t, "echo", readLine(t, c))
		open = append(open, c)
	}
	_, err := h.dialTLS(p.client, echoSNI)
	require.Error(t, err, "the third connection is refused")
	require.Equal(t, 1.0, h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonOverLimit+`"`))
	require.Equal(t, int64(2), be.accepts.Load())

	require.NoError(t, open[0].Close())
	eventually(t, func() bool { return h.metric("isthmus_gateway_connections_active", "") == 1 }, "one slot freed")
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	require.Equal(t, "echo", readLine(t, c))
	_ = c.Close()
	_ = open[1].Close()
}

// A connection idle both ways past the route's idle timeout is closed; one
// with traffic in either direction is not.
func TestIdleTimeout(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	r := route(echoSNI, echoCluster, be.addr())
	r.IdleTimeout = 1200 * time.Millisecond // the route's, over the gateway's hour
	h := startGateway(t, mustRoutes(t, r), nil)

	busy := h.connect(t, p.client, echoSNI, "echo")
	idle := h.connect(t, p.client, echoSNI, "echo")

	idleClosed := make(chan error, 1)
	go func() {
		_ = idle.SetReadDeadline(time.Now().Add(20 * time.Second))
		_, err := idle.Read(make([]byte, 1))
		idleClosed <- err
	}()
	deadline := time.Now().Add(3 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		_, err := fmt.Fprintf(busy, "ping %d\n", i)
		require.NoError(t, err)
		require.Equal(t, fmt.Sprintf("ping %d", i), readLine(t, busy), "the busy connection stays open")
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case err := <-idleClosed:
		var ne net.Error
		require.False(t, errors.As(err, &ne) && ne.Timeout(), "closed by the gateway: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the idle connection was never closed")
	}
	eventually(t, func() bool {
		return h.metric("isthmus_gateway_closed_connections_total", `reason="`+ReasonIdleTimeout+`"`) == 1
	}, "the idle close is counted, once")
}

func TestConfigValidate(t *testing.T) {
	require.NoError(t, DefaultConfig().Validate())
	err := Config{ListenAddr: "nope", MaxConnections: -1, DrainDelay: -time.Second, RouteDrainTimeout: -time.Second}.Validate()
	require.Error(t, err)
	for _, want := range []string{"listen address", "ClientHello timeout", "dial timeout", "ejection time", "idle timeout", "drain timeout", "max connections", "max connect attempts", "drain delay", "route drain timeout"} {
		require.ErrorContains(t, err, want)
	}
	_, err = New(DefaultConfig(), nil, nil)
	require.ErrorContains(t, err, "no route source")
	require.False(t, strings.Contains(DefaultConfig().ListenAddr, "0.0.0.0"))
}

// Connections one after another are served by the same few worker
// goroutines, and none of them outlives Run.
func TestWorkersAreReusedAndEndWithRun(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, func(_ net.Conn, c *tls.Conn) {
		_, _ = c.Write([]byte("hi"))
	})
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), nil)
	const conns = 20
	for range conns {
		c, err := h.dialTLS(p.client, echoSNI)
		require.NoError(t, err)
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		require.NoError(t, err)
		require.Equal(t, "hi", string(b))
		require.NoError(t, c.Close())
		// The worker is waiting for the next connection once the
		// gateway has let go of this one.
		require.Eventually(t, func() bool { return h.gw.active.Load() == 0 }, 10*time.Second, time.Millisecond)
	}
	// A worker goes back to waiting just after its connection's count
	// drops, so the next connection may rarely find none idle.
	n := workerGoroutines(t)
	require.GreaterOrEqual(t, n, 1)
	require.LessOrEqual(t, n, 3, "%d sequential connections took %d workers", conns, n)

	require.NoError(t, h.stop())
	require.Zero(t, workerGoroutines(t), "workers left after Run returned")
}

// A request still coming in on the health port when the gateway stops
// (a probe that stopped mid-header) is closed: Run leaves no HTTP
// connection, and no goroutine, behind. Shutdown gave up after a second
// and left it to the header timeout.
func TestRunLeavesNoHTTPConnection(t *testing.T) {
	h := startGateway(t, mustRoutes(t), nil)
	c, err := net.Dial("tcp", h.gw.HealthAddr().String())
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "GET /healthz/ready HTTP/1.1\r\nHost: x\r\n") // headers unfinished
	require.NoError(t, err)
	eventually(t, func() bool { return httpConnGoroutines(t) == 1 }, "the health server took the connection")
	require.NoError(t, h.stop())
	// Closed by the gateway with Run, not by the header timeout (5 s).
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	require.False(t, errors.As(err, &ne) && ne.Timeout(), "closed by the gateway: %v", err)
	// Run waited for the connection's end; its goroutine returns from
	// there.
	eventually(t, func() bool { return httpConnGoroutines(t) == 0 }, "the connection's goroutine ended")
}

// The health server holds at most httpMaxConns connections: a flood of
// idle ones waits in the backlog instead of taking the gateway's file
// descriptors, and a probe behind them is answered once one ends.
func TestHealthConnectionsAreCapped(t *testing.T) {
	const maxConns = 4
	table := NewRouteTable(mustRoutes(t))
	h := startGatewayOn(t, table, table, nil, func(g *Gateway) { g.httpMaxConns = maxConns })
	addr := h.gw.HealthAddr().String()
	var idle []net.Conn
	for range maxConns {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		idle = append(idle, c)
	}
	eventually(t, func() bool { return httpConnGoroutines(t) == maxConns }, "the health server took the idle connections")

	probe, err := net.Dial("tcp", addr)
	require.NoError(t, err, "the kernel still accepts into the backlog")
	defer probe.Close()
	_, err = io.WriteString(probe, "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	// Not served while the others hold every place (a broken cap would
	// answer within this wait; a working one never does).
	_ = probe.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = probe.Read(make([]byte, 1))
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "the probe was served beyond the cap: %v", err)
	require.Equal(t, maxConns, httpConnGoroutines(t))

	require.NoError(t, idle[0].Close())
	_ = probe.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(probe), nil)
	require.NoError(t, err, "served once a place was free")
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	// Run ends with connections held and waiting.
	late, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer late.Close()
	require.NoError(t, h.stop())
}

// httpConnGoroutines counts the goroutines serving an HTTP connection.
func httpConnGoroutines(t *testing.T) int {
	var b strings.Builder
	require.NoError(t, pprof.Lookup("goroutine").WriteTo(&b, 2))
	return strings.Count(b.String(), "net/http.(*conn).serve(")
}

// workerGoroutines counts the goroutines in (*Gateway).worker.
func workerGoroutines(t *testing.T) int {
	var b strings.Builder
	require.NoError(t, pprof.Lookup("goroutine").WriteTo(&b, 2))
	return strings.Count(b.String(), "gateway.(*Gateway).worker(")
}

// On shutdown readiness fails at once, but for DrainDelay the gateway
// still accepts and routes new connections (peers' probes and load
// balancers are still noticing the 503); then its listener closes, the
// connections in flight drain, and Run returns.
func TestDrainDelayKeepsAccepting(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	// The test ends the delay, however slow the machine.
	fc := clocktesting.NewFakeClock(time.Now())
	table := NewRouteTable(mustRoutes(t, route(echoSNI, echoCluster, be.addr())))
	h := startGatewayOn(t, table, table, func(c *Config) {
		c.DrainDelay = 5 * time.Second
	}, func(g *Gateway) { g.clock = fc })
	inFlight := h.connect(t, p.client, echoSNI, "echo")

	stopped := make(chan error, 1)
	go func() { stopped <- h.stop() }()
	eventually(t, func() bool { return h.ready() == http.StatusServiceUnavailable }, "readiness fails at once")
	eventually(t, fc.HasWaiters, "the drain delay is timed")
	fc.Step(5*time.Second - time.Millisecond) // the delay is Config.DrainDelay: not over yet
	for i := range 3 {
		c, err := h.dialTLS(p.client, echoSNI)
		require.NoError(t, err, "connection %d during the drain delay", i)
		require.Equal(t, "echo", readLine(t, c))
		require.NoError(t, echoes(t, c, fmt.Sprintf("new %d", i)))
		require.NoError(t, c.Close())
	}
	require.NoError(t, echoes(t, inFlight, "in flight"))
	require.Equal(t, 4.0, h.metric("isthmus_gateway_routed_connections_total", `cluster="`+echoCluster+`"`))
	require.Equal(t, http.StatusServiceUnavailable, h.ready())
	select {
	case <-stopped:
		t.Fatal("Run returned during the drain delay")
	default:
	}

	fc.Step(time.Millisecond)
	eventually(t, func() bool {
		c, err := net.Dial("tcp", h.addr())
		if err == nil {
			_ = c.Close()
		}
		return err != nil
	}, "the listener closes once the delay ends")
	select {
	case <-stopped:
		t.Fatal("Run returned with a connection in flight")
	default:
	}
	require.NoError(t, echoes(t, inFlight, "draining"), "the connection in flight drains")
	require.NoError(t, inFlight.Close())
	select {
	case err := <-stopped:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return once the last connection closed")
	}
}

// The drain delay ends by itself: Run returns, no sooner than DrainDelay
// after its context ended, and the listener is closed.
func TestDrainDelayEnds(t *testing.T) {
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, unusedAddr(t))), func(c *Config) {
		c.DrainDelay = 300 * time.Millisecond
	})
	start := time.Now()
	require.NoError(t, h.stop())
	require.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond)
	_, err := net.Dial("tcp", h.addr())
	require.Error(t, err, "the listener is closed")
}
