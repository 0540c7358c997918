package sidecar

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// The mesh these tests run: pod a (trust domain alpha.mesh) calls pod b
// (beta.mesh) through both sidecars, over mTLS validated per trust
// domain, fed by the federator's ADS (go-control-plane) through the real
// xDS client.
var (
	echoSvc    = svc{name: "echo", ns: "demo", vip: "240.240.0.10", ports: []svcPort{{80, true}}}
	greeterSvc = svc{name: "greeter", ns: "demo", vip: "240.240.0.11", ports: []svcPort{{9090, true}}}
	dbSvc      = svc{name: "db", ns: "demo", vip: "240.240.0.12", ports: []svcPort{{5432, false}}}
)

func hostsOf(svcs ...svc) map[string]netip.Addr {
	m := map[string]netip.Addr{}
	for _, s := range svcs {
		m[s.host()] = netip.MustParseAddr(s.vip)
	}
	return m
}

type mesh struct {
	alpha, beta *testCA
	xds         *xdsServer
	hosts       map[string]netip.Addr
	a, b        *pod
}

// startMesh starts a and b; services(m) are the services of every
// snapshot set with m.set.
func startMesh(t testing.TB) *mesh {
	t.Helper()
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t),
		hosts: hostsOf(echoSvc, greeterSvc, dbSvc, impostorSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	return m
}

// onB is a service served by pod b, one healthy endpoint.
func (m *mesh) onB(s svc, app netip.Addr) svc {
	s.ids = []spiffeid.ID{m.b.id}
	s.locs = []locSpec{{zone: "z1", weight: 1, eps: []ep{{m.b.endpoint(app), true}}}}
	return s
}

// set serves svcs at version and waits until a has adopted it.
func (m *mesh) set(t testing.TB, version string, svcs ...svc) {
	t.Helper()
	m.xds.set(t, snapshot(t, version, []*testCA{m.alpha, m.beta}, svcs...))
	m.a.waitReady(t, version)
	m.b.waitReady(t, version)
}

// impostorSvc is served by b, but the federator says only another
// identity serves it.
var impostorSvc = svc{name: "impostor", ns: "demo", vip: "240.240.0.13", ports: []svcPort{{80, true}}}

func (m *mesh) standard(t testing.TB) {
	t.Helper()
	impostor := m.onB(impostorSvc, ipHTTP)
	impostor.ids = []spiffeid.ID{m.beta.id("demo", "someone-else")}
	m.set(t, "v1", m.onB(echoSvc, ipHTTP), m.onB(greeterSvc, ipGRPC), m.onB(dbSvc, ipTCP), impostor)
}

// HTTP/1.1 and h2c from the app reach b's app in the same protocol, with
// the authority as sent, b's XFCC naming a (any XFCC a's app sent is
// gone), and are counted by cluster and code.
func TestHTTPThroughTwoSidecars(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	aLeaf := sha256.Sum256(m.a.svid.Certificates[0].Raw)
	wantXFCC := "By=" + m.b.id.String() + ";Hash=" + hex.EncodeToString(aLeaf[:]) + ";URI=" + m.a.id.String()
	for _, tc := range []struct {
		name      string
		h2        bool
		url       string
		wantProto string
		wantHost  string
	}{
		{"HTTP/1.1", false, "http://echo.demo.svc.clusterset.local/one", "HTTP/1.1", "echo.demo.svc.clusterset.local"},
		{"h2c", true, "http://echo.demo.svc.clusterset.local/two", "HTTP/2.0", "echo.demo.svc.clusterset.local"},
		{"by VIP and port", false, "http://240.240.0.10:80/three", "HTTP/1.1", "240.240.0.10:80"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr := http.Header{xfccHeader: {"By=spiffe://evil/;URI=spiffe://alpha.mesh/ns/demo/sa/admin"}}
			code, reply, body := m.a.get(t, tc.h2, tc.url, hdr)
			require.Equal(t, http.StatusOK, code, body)
			require.Equal(t, "b", reply.Pod)
			require.Equal(t, tc.wantProto, reply.Proto)
			require.Equal(t, tc.wantHost, reply.Host)
			require.Equal(t, []string{wantXFCC}, reply.XFCC, "b sets its XFCC and drops the caller's")
		})
	}
	// A body goes up and comes back counted.
	resp, err := m.a.nat.httpClient(false).Post("http://echo.demo.svc.clusterset.local/upload", "text/plain", strings.NewReader(strings.Repeat("x", 100000)))
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	// Streaming responses flow as they are written, line by line.
	resp, err = m.a.nat.httpClient(true).Get("http://echo.demo.svc.clusterset.local/stream?n=3")
	require.NoError(t, err)
	lines, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, "line 0\nline 1\nline 2\n", string(lines))

	echoCluster := echoSvc.cluster(80)
	require.Eventually(t, func() bool {
		mt := m.a.scrape(t)
		return metricValue(t, mt, "isthmus_sidecar_requests_total", "listener=outbound", "cluster="+echoCluster, "code=200") == 5 &&
			metricValue(t, mt, "isthmus_sidecar_received_bytes_total", "listener=outbound", "cluster="+echoCluster) == 100000
	}, waitFor, 20*time.Millisecond, "a counts its requests: %s", "")
	mt := m.b.scrape(t)
	require.EqualValues(t, 5, metricValue(t, mt, "isthmus_sidecar_requests_total", "listener=inbound", "cluster=inbound-passthrough", "code=200"))
}

// gRPC through both sidecars: a unary call, an error status carried in
// trailers, and a server stream that keeps delivering.
func TestGRPCThroughTwoSidecars(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	conn, err := grpc.NewClient("passthrough:///greeter.demo.svc.clusterset.local:9090",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(m.a.nat.dial))
	require.NoError(t, err)
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()

	m.b.grpc.health.SetServingStatus("greeter", healthpb.HealthCheckResponse_SERVING)
	resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "greeter"})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())

	requireTrailersAndStream(t, ctx, cancel, client, m.b.grpc.health, "greeter")
}

// requireTrailersAndStream checks gRPC through the sidecars beyond a
// unary call: an error status in a trailers-only answer (an unknown
// service), and a server stream of service, SERVING now, that delivers
// each message as it is sent and ends in Canceled once ctx is cancelled.
func requireTrailersAndStream(t *testing.T, ctx context.Context, cancel context.CancelFunc, client healthpb.HealthClient, srv *health.Server, service string) {
	t.Helper()
	_, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: "nobody"})
	require.Equal(t, codes.NotFound, status.Code(err), "the grpc-status trailer came through: %v", err)

	stream, err := client.Watch(ctx, &healthpb.HealthCheckRequest{Service: service})
	require.NoError(t, err)
	got, err := stream.Recv()
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, got.GetStatus())
	srv.SetServingStatus(service, healthpb.HealthCheckResponse_NOT_SERVING)
	got, err = stream.Recv()
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, got.GetStatus(), "the stream delivers updates as they happen")
	cancel()
	_, err = stream.Recv()
	require.Equal(t, codes.Canceled, status.Code(err))
}

// Opaque TCP through both sidecars (mTLS with ALPN istio between them),
// each side's end of stream passed on.
func TestTCPThroughTwoSidecars(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	c, err := m.a.nat.dial(t.Context(), "db.demo.svc.clusterset.local:5432")
	require.NoError(t, err)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitFor))
	payload := strings.Repeat("0123456789", 50000)
	go func() {
		_, _ = io.WriteString(c, payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	require.NoError(t, err, "the echo's end of stream arrives after all its bytes")
	require.Equal(t, len(payload), len(got))
	require.Equal(t, payload, string(got))
	require.EqualValues(t, 1, m.b.tcp.accepted.Load())

	require.Eventually(t, func() bool {
		mt := m.a.scrape(t)
		return metricValue(t, mt, "isthmus_sidecar_sent_bytes_total", "listener=outbound", "cluster="+dbSvc.cluster(5432)) == float64(len(payload))
	}, waitFor, 20*time.Millisecond)
}

// What reaches b's inbound listener without a valid SVID never reaches
// b's app: plaintext, TLS without a client certificate, a certificate of
// a trust domain the federation does not know, or one that does not
// verify against its own trust domain's bundle.
func TestInboundRefusesWithoutAValidSVID(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	gamma := newTestCA(t, "gamma.mesh")
	forged := newTestCA(t, "alpha.mesh") // same trust domain, another root
	addr := m.b.endpoint(ipHTTP).String()
	tlsDial := func(certs []tls.Certificate, alpn string) error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", addr, &tls.Config{
			InsecureSkipVerify: true, Certificates: certs, NextProtos: []string{alpn}})
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(waitFor))
		// TLS 1.3: the server's verdict on the client certificate comes
		// after the client's handshake ends.
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			return err
		}
		_, err = c.Read(make([]byte, 1))
		return err
	}
	for name, try := range map[string]func() error{
		"plaintext HTTP": func() error {
			c, err := net.Dial("tcp", addr)
			require.NoError(t, err)
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(waitFor))
			_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
			b, err := io.ReadAll(c)
			if strings.Contains(string(b), "HTTP/1.1 200") {
				return nil
			}
			return fmt.Errorf("closed after %q (%v)", b, err)
		},
		"no client certificate": func() error { return tlsDial(nil, alpnHTTP1) },
		"unknown trust domain": func() error {
			return tlsDial([]tls.Certificate{tlsCert(gamma.svid(t, gamma.id("demo", "a")))}, alpnHTTP1)
		},
		"forged for a known trust domain": func() error {
			return tlsDial([]tls.Certificate{tlsCert(forged.svid(t, forged.id("demo", "a")))}, alpnHTTP1)
		},
		"forged, TCP": func() error {
			return tlsDial([]tls.Certificate{tlsCert(forged.svid(t, forged.id("demo", "a")))}, "istio")
		},
	} {
		t.Run(name, func(t *testing.T) {
			require.Error(t, try())
		})
	}
	require.Zero(t, m.b.http.requests.Load(), "nothing reached b's app")
	require.Zero(t, m.b.tcp.accepted.Load())
	// The client reads the sidecar's alert before the sidecar's handshake
	// returns and counts the refusal: wait for the count.
	require.Eventually(t, func() bool {
		return metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound", "reason=handshake") >= 5
	}, waitFor, 10*time.Millisecond, "every refused handshake is counted")

	// A valid SVID of a known trust domain goes through.
	good := tlsCert(m.alpha.svid(t, m.alpha.id("demo", "a")))
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{good}, NextProtos: []string{alpnHTTP1}})
	require.NoError(t, err)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitFor))
	_, err = io.WriteString(c, "GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	resp, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Contains(t, string(resp), "HTTP/1.1 200 OK")
	require.Contains(t, string(resp), "URI=spiffe://alpha.mesh/ns/demo/sa/a")
}

// A peer with a valid SVID that dials the pod's outbound port (15001,
// captured inbound as every port) is refused before its handshake:
// passed on, the connection would reach the outbound listener from
// loopback, as one of the pod's own processes, and go into the mesh with
// the pod's identity. It did (a 200 from echo, the app seeing b's
// identity, not the caller's).
func TestInboundToTheOutboundPortIsRefused(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	loopIP := netip.MustParseAddr("127.0.0.77")
	m.b.setApp(loopIP, m.b.proxy.OutboundAddr().(*net.TCPAddr).AddrPort()) // as iptables would deliver pod:15001
	good := tlsCert(m.alpha.svid(t, m.alpha.id("demo", "attacker")))
	c, err := tls.Dial("tcp", m.b.endpoint(loopIP).String(), &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{good}, NextProtos: []string{alpnHTTP1}})
	if err == nil {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(waitFor))
		_, _ = io.WriteString(c, "GET /laundered HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\nConnection: close\r\n\r\n")
		resp, _ := io.ReadAll(c)
		require.NotContains(t, string(resp), "200 OK")
	}
	require.Eventually(t, func() bool {
		return metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound", "reason=loop") == 1
	}, waitFor, 10*time.Millisecond, "refused as a loop")
	require.Zero(t, m.b.http.requests.Load(), "nothing reached an app")
}

// b serves impostor with a valid beta.mesh SVID, but not the identity the
// cluster's SAN matchers name: a refuses it, and nothing reaches b.
func TestOutboundRefusesASANMismatch(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	code, _, body := m.a.get(t, false, "http://impostor.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "TLS error")
	require.Contains(t, body, m.b.id.String())
	require.Zero(t, m.b.http.requests.Load())
	require.Positive(t, metricValue(t, m.a.scrape(t), "isthmus_sidecar_upstream_connect_failures_total", "cluster="+impostorSvc.cluster(80)))
}

// The sidecar as the app's HTTP proxy on 127.0.0.1:15001 (no iptables):
// by Host, by absolute-form request target, and 404 naming an unknown
// host.
func TestExplicitMode(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	out := m.a.proxy.OutboundAddr().String()

	req, err := http.NewRequest(http.MethodGet, "http://"+out+"/by-host", nil)
	require.NoError(t, err)
	req.Host = "echo.demo.svc.clusterset.local"
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, string(b))
	require.Contains(t, string(b), `"pod":"b"`)
	require.Contains(t, string(b), `"path":"/by-host"`)

	proxied := &http.Client{Timeout: waitFor, Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: out})}}
	resp, err = proxied.Get("http://echo.demo.svc.clusterset.local:80/absolute?q=1")
	require.NoError(t, err)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, string(b))
	require.Contains(t, string(b), `"path":"/absolute"`)
	require.Contains(t, string(b), `"host":"echo.demo.svc.clusterset.local:80"`)

	resp, err = proxied.Get("http://nowhere.demo.svc.clusterset.local/")
	require.NoError(t, err)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	require.Contains(t, string(b), `no route for host "nowhere.demo.svc.clusterset.local"`)
	require.Contains(t, string(b), "(NR)")
	require.EqualValues(t, 1, metricValue(t, m.a.scrape(t), "isthmus_sidecar_requests_total", "listener=outbound", "cluster=", "code=404"))
}

// Anything that is not a clusterset service goes where the app sent it,
// untouched (PassthroughCluster); and a connection sent to the sidecar
// itself on a port no chain knows is refused, not looped back.
func TestPassthrough(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	outside := startTCPEcho(t)
	c, err := m.a.nat.dial(t.Context(), outside.addr.String())
	require.NoError(t, err)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitFor))
	_, err = io.WriteString(c, "plain bytes")
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, "plain bytes", string(got))
	require.EqualValues(t, 1, outside.accepted.Load())
}

// Failover across priorities: b's endpoint is priority 0, c's (another
// pod, another trust domain) priority 1. EDS marking b unhealthy moves
// traffic to c, and back when b is healthy again; b's sidecar dying moves
// it by passive health, and b coming back on the same address returns it
// once the ejection passes.
func TestFailoverAcrossPriorities(t *testing.T) {
	m := startMesh(t)
	c := startPod(t, "c", m.alpha, m.hosts, podOptions{xds: m.xds})
	echo := func(bHealthy bool, bEP netip.AddrPort) svc {
		s := echoSvc
		s.ids = []spiffeid.ID{m.b.id, c.id}
		s.locs = []locSpec{
			{priority: 0, zone: "local", weight: 1, eps: []ep{{bEP, bHealthy}}},
			{priority: 1, zone: "remote", weight: 1, eps: []ep{{c.endpoint(ipHTTP), true}}},
		}
		return s
	}
	bEP := m.b.endpoint(ipHTTP)
	pods := func(n int) map[string]int {
		seen := map[string]int{}
		for range n {
			code, reply, body := m.a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
			require.Equal(t, http.StatusOK, code, body)
			seen[reply.Pod]++
		}
		return seen
	}
	m.set(t, "v1", echo(true, bEP))
	c.waitReady(t, "v1")
	require.Equal(t, map[string]int{"b": 4}, pods(4), "priority 0 while it is healthy")

	m.set(t, "v2", echo(false, bEP))
	require.Equal(t, map[string]int{"c": 4}, pods(4), "EDS says b is unhealthy: priority 1")

	m.set(t, "v3", echo(true, bEP))
	require.Equal(t, map[string]int{"b": 4}, pods(4), "b is healthy again: back to priority 0")

	// b's sidecar dies (its port closes); EDS does not know yet.
	m.b.stop(t)
	require.Equal(t, map[string]int{"c": 4}, pods(4), "connect failure: b ejected, priority 1 takes over")
	require.Positive(t, metricValue(t, m.a.scrape(t), "isthmus_sidecar_upstream_connect_failures_total", "cluster="+echoSvc.cluster(80)))

	// b comes back on the same address; after the ejection it is tried
	// again and wins.
	b2 := startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds, inboundPort: bEP.Port()})
	b2.waitReady(t, "v3")
	require.Eventually(t, func() bool {
		_, reply, _ := m.a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
		return reply.Pod == "b"
	}, waitFor, 50*time.Millisecond, "b back at priority 0")
}

// Passive health within a priority: a dead endpoint next to a live one is
// tried once, ejected, and every request still succeeds.
func TestPassiveHealthSkipsADeadEndpoint(t *testing.T) {
	m := startMesh(t)
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	deadAddr := dead.Addr().(*net.TCPAddr).AddrPort()
	require.NoError(t, dead.Close())
	s := echoSvc
	s.ids = []spiffeid.ID{m.b.id}
	s.locs = []locSpec{{zone: "z", weight: 1, eps: []ep{{deadAddr, true}, {m.b.endpoint(ipHTTP), true}}}}
	m.set(t, "v1", s)
	for range 6 {
		code, reply, body := m.a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
		require.Equal(t, http.StatusOK, code, body)
		require.Equal(t, "b", reply.Pod)
	}
	require.EqualValues(t, 1, metricValue(t, m.a.scrape(t), "isthmus_sidecar_upstream_connect_failures_total", "cluster="+echoSvc.cluster(80)),
		"the dead endpoint was tried once, then skipped")
}

// SIGTERM: the sidecar stops accepting and fails readiness at once, lets
// a request in flight finish, and Run returns after it.
func TestDrainFinishesRequestsInFlight(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	type result struct {
		code int
		body string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := m.a.nat.httpClient(false).Get("http://echo.demo.svc.clusterset.local/slow?d=500ms")
		if err != nil {
			done <- result{err: err}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		done <- result{code: resp.StatusCode, body: string(b), err: err}
	}()
	require.Eventually(t, func() bool { return m.b.http.requests.Load() == 1 }, waitFor, 5*time.Millisecond)

	stopped := make(chan struct{})
	go func() { m.a.stop(t); close(stopped) }()
	require.Eventually(t, func() bool { ok, _ := m.a.proxy.Ready(); return !ok }, waitFor, 5*time.Millisecond)
	require.Eventually(t, func() bool {
		c, err := net.DialTimeout("tcp", m.a.proxy.OutboundAddr().String(), time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	}, waitFor, 5*time.Millisecond, "the outbound listener closed")

	r := <-done
	require.NoError(t, r.err)
	require.Equal(t, http.StatusOK, r.code)
	require.Equal(t, "slow done", r.body)
	select {
	case <-stopped:
	case <-time.After(waitFor):
		t.Fatal("Run did not return after the drain")
	}
}

// A request longer than the drain timeout is cut at the timeout, and Run
// still returns.
func TestDrainTimeoutCutsWhatIsLeft(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	c, err := m.a.nat.dial(t.Context(), "db.demo.svc.clusterset.local:5432")
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "hold")
	require.NoError(t, err)
	buf := make([]byte, 4)
	_ = c.SetDeadline(time.Now().Add(waitFor))
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)

	start := time.Now()
	m.a.stop(t)
	require.Less(t, time.Since(start), waitFor)
	_, err = c.Read(buf)
	require.Error(t, err, "the TCP proxy was closed at the drain timeout")
}

// Dials and handshakes in flight when the drain timeout passes give up
// too: a TCP proxy and an HTTP request to an endpoint that accepts but
// never answers the mTLS handshake. Before, Run waited for every connect
// attempt (3 × the 10 s handshake timeout, Kubernetes' whole grace
// period) after the drain timeout.
func TestDrainTimeoutCutsDialsInFlight(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = silent.Close() })
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = c.Close() })
		}
	}()
	at := []locSpec{{zone: "z1", weight: 1, eps: []ep{{silent.Addr().(*net.TCPAddr).AddrPort(), true}}}}
	tcpSvc := svc{name: "silent-tcp", ns: "demo", vip: "240.240.0.41", ports: []svcPort{{5432, false}}, locs: at}
	httpSvc := svc{name: "silent-http", ns: "demo", vip: "240.240.0.42", ports: []svcPort{{80, true}}, locs: at}
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(tcpSvc, httpSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: func(c *Config) { c.DrainTimeout = 300 * time.Millisecond }})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	m.set(t, "v1", tcpSvc, httpSvc)

	c, err := m.a.nat.dial(t.Context(), tcpSvc.host()+":5432")
	require.NoError(t, err)
	defer c.Close()
	reqDone := make(chan error, 1)
	go func() {
		resp, err := m.a.nat.httpClient(false).Get("http://" + httpSvc.host() + "/")
		if err == nil {
			resp.Body.Close()
		}
		reqDone <- err
	}()
	time.Sleep(200 * time.Millisecond) // both in their handshakes

	start := time.Now()
	m.a.stop(t)
	require.Less(t, time.Since(start), 5*time.Second, "Run returned long after the drain timeout")
	<-reqDone
}

// With no route timeout, the stream idle timeout is what ends a request
// whose upstream went silent; a stream that keeps moving is never cut.
func TestStreamIdleTimeout(t *testing.T) {
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(echoSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: func(c *Config) { c.StreamIdleTimeout = time.Second }})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	m.set(t, "v1", m.onB(echoSvc, ipHTTP))
	for _, h2 := range []bool{false, true} {
		resp, err := m.a.nat.httpClient(h2).Get("http://echo.demo.svc.clusterset.local/slow?d=5s")
		require.NoError(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
		require.Equal(t, "stream timeout", string(b))

		// 75 lines, one every 20 ms: 1.5 s in all, never 1 s silent. (The
		// timeout is that long so that a stalled test machine does not
		// cut a moving stream.) Then 300 lines 5 ms apart: the HTTP/1.1
		// path leaves a deadline that would move by less than idle/16
		// (62 ms) as it is, so this one holds only if the skipped moves
		// add up.
		for _, s := range []struct {
			query string
			lines int
		}{{"n=75", 75}, {"n=300&every=5ms", 300}} {
			resp, err = m.a.nat.httpClient(h2).Get("http://echo.demo.svc.clusterset.local/stream?" + s.query)
			require.NoError(t, err)
			b, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err, s.query)
			require.Equal(t, http.StatusOK, resp.StatusCode, s.query)
			require.Equal(t, s.lines, strings.Count(string(b), "\n"), s.query)
		}
	}
	require.EqualValues(t, 2, metricValue(t, m.a.scrape(t), "isthmus_sidecar_requests_total", "listener=outbound", "code=504"))
}

// Explicit mode is for the pod's own processes. A connection the outbound
// listener gets without a redirect, from an address that is not this
// network namespace's, is refused: it would otherwise send requests into
// the mesh with this workload's identity. (The capture rules send a peer
// that dials port 15001 to the inbound listener; this is for the sidecar
// without iptables. pkg/sidecar/capture's TestCaptureIPv4 shows a peer
// in another namespace landing on 15006.)
func TestExplicitModeOnlyFromThisPod(t *testing.T) {
	pod := netip.MustParseAddr("10.1.2.3")
	local := func(a netip.Addr) bool { return a == pod || a == netip.MustParseAddr("fd00::3") }
	for _, tc := range []struct {
		remote, local string
		want          bool
	}{
		{"127.0.0.1", "127.0.0.1", true},
		{"127.0.0.6", "127.0.0.1", true},
		{"::1", "::1", true},
		{"10.1.2.3", "10.1.2.3", true},    // the app calling the pod's own address
		{"fd00::3", "127.0.0.1", true},    // another address of the pod
		{"10.1.2.4", "10.1.2.3", false},   // another pod
		{"192.0.2.2", "10.1.2.3", false},  // anyone else
		{"2001:db8::1", "fd00::3", false}, // anyone else, over IPv6
	} {
		got := isLocalSource(netip.MustParseAddr(tc.remote), netip.MustParseAddr(tc.local), local)
		require.Equal(t, tc.want, got, "%s → %s", tc.remote, tc.local)
	}
	// This host's own addresses are its own. Other tests on this machine
	// add and remove addresses meanwhile, so only those there both before
	// and after the cache's one read are required of it.
	before, err := interfaceAddrs()
	require.NoError(t, err)
	var own ifAddrs
	require.False(t, own.has(netip.MustParseAddr("192.0.2.200")))
	after, err := interfaceAddrs()
	require.NoError(t, err)
	for _, a := range before {
		if slices.Contains(after, a) {
			require.True(t, own.has(a), a.String())
		}
	}
}

// The interface addresses are read once per ifAddrsTTL however many
// connections ask, and a failed read keeps what was known.
func TestInterfaceAddressesAreReadOncePerTTL(t *testing.T) {
	pod := netip.MustParseAddr("10.1.2.3")
	reads := 0
	var fail bool
	l := ifAddrs{read: func() ([]netip.Addr, error) {
		reads++
		if fail {
			return nil, errors.New("netlink: no")
		}
		return []netip.Addr{pod}, nil
	}}
	for range 1000 {
		require.True(t, l.has(pod))
		require.False(t, l.has(netip.MustParseAddr("192.0.2.2")))
	}
	require.Equal(t, 1, reads)
	l.at = l.at.Add(-ifAddrsTTL)
	fail = true
	require.True(t, l.has(pod), "what was known is kept")
	require.Equal(t, 2, reads)
}

// BenchmarkRefusedSourceCheck is the check a connection to the outbound
// port without a redirect, from an address not of this pod, costs
// before it is refused (`go test -run '^$' -bench RefusedSourceCheck
// ./pkg/sidecar`); the uncached read beside it is what each cost before.
func BenchmarkRefusedSourceCheck(b *testing.B) {
	remote, local := netip.MustParseAddr("198.51.100.77"), netip.MustParseAddr("10.1.2.3")
	b.Run("cached", func(b *testing.B) {
		var l ifAddrs
		for b.Loop() {
			if isLocalSource(remote, local, l.has) {
				b.Fatal("local")
			}
		}
	})
	b.Run("netlink-each-time", func(b *testing.B) {
		for b.Loop() {
			addrs, err := interfaceAddrs()
			if err != nil || slices.Contains(addrs, remote) {
				b.Fatal(err)
			}
		}
	})
}

// An app that listens on the pod's address (--app-addr) is reached from
// 127.0.0.6, which the capture rules let through: from any other source
// of the sidecar's own, the connection to the pod address is captured
// inbound again (pkg/sidecar/capture's TestCaptureIPv4 shows both), and
// every inbound request looped back into the sidecar.
func TestAppOnPodAddressReachedFromPassthroughSource(t *testing.T) {
	ap := netip.MustParseAddrPort
	require.Nil(t, appSource(ap("127.0.0.1:8080"), netip.MustParseAddr("127.0.0.1")))
	pod := netip.MustParseAddr("10.1.2.3")
	require.Equal(t, inboundPassthrough, appSource(ap("10.1.2.3:8080"), pod))
	require.Equal(t, inboundPassthrough, appSource(ap("[::ffff:10.1.2.3]:8080"), pod), "mapped")
	require.Nil(t, appSource(ap("10.9.9.9:8080"), pod), "not the app")
	require.Nil(t, appSource(ap("192.0.2.1:443"), pod), "outbound passthrough")
	require.ErrorContains(t, func() error { c := DefaultConfig(); c.AppAddr = netip.MustParseAddr("fd00::3"); return c.Validate() }(),
		"an IPv6 app address must be ::1")

	// For real: a pod address of this host (any non-loopback IPv4 one).
	var app netip.Addr
	addrs, err := net.InterfaceAddrs()
	require.NoError(t, err)
	for _, ia := range addrs {
		if n, ok := ia.(*net.IPNet); ok {
			if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap().Is4() && !a.IsLoopback() {
				app = a.Unmap()
				break
			}
		}
	}
	if !app.IsValid() {
		t.Skip("no non-loopback IPv4 address here")
	}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(app, 0).String())
	require.NoError(t, err)
	defer ln.Close()
	// Through the pool's own dial, so that the source it picks is the
	// one it connects from.
	pl := &pool{p: &Proxy{cfg: Config{AppAddr: app}, dials: t.Context()}, connectTimeout: waitFor}
	c, err := pl.dial(t.Context(), ln.Addr().(*net.TCPAddr).AddrPort(), nil)
	require.NoError(t, err)
	defer c.Close()
	s, err := ln.Accept()
	require.NoError(t, err)
	defer s.Close()
	require.Equal(t, "127.0.0.6", s.RemoteAddr().(*net.TCPAddr).IP.String())
}
