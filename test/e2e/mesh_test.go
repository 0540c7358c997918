package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/test/mesh"
)

// echoHost is the clusterset name of the echo service every test pod
// calls.
const echoHost = "echo.demo.svc.clusterset.local"

// meshWait bounds each wait for the mesh to converge (a federation update,
// an xDS push, an EndpointSlice change).
const meshWait = 60 * time.Second

// TestMesh runs three clusters with real kube-apiservers, each in its own
// network namespaces, with real federators, gateways and sidecars: a and c
// export demo/echo, b imports it. a and b share region r1, c is in r2.
//
// A client pod in b calls echo.demo.svc.clusterset.local by name: the
// pod's iptables send its DNS query to its sidecar's DNS proxy and its
// connection to its sidecar, which carries it over mTLS through a's
// east-west gateway to a's echo pod, whose sidecar verifies b's
// certificate against b's own bundle and tells the app who called.
func TestMesh(t *testing.T) {
	m := mesh.StartT(t, mesh.Options{
		BinDir: binDir,
		Clusters: []mesh.ClusterSpec{
			{Name: "a", Region: "r1"}, {Name: "b", Region: "r1"}, {Name: "c", Region: "r2"},
		},
		FederatorArgs: []string{"--log-level", "debug", "--heartbeat", "1s"},
		SidecarArgs:   []string{"--log-level", "debug"},
	})
	ctx := t.Context()
	a, b, c := m.Cluster("a"), m.Cluster("b"), m.Cluster("c")

	// Every link of the triangle, and every pod, at once.
	var g errgroup.Group
	g.Go(func() error { return mesh.Link(ctx, a, b) })
	g.Go(func() error { return mesh.Link(ctx, a, c) })
	g.Go(func() error { return mesh.Link(ctx, c, b) })
	var echoA, echoC, privateA []*mesh.Pod
	var clientB, clientA, explicitA, outsider, outsiderB *mesh.Pod
	g.Go(func() (err error) { echoA, err = a.ServeEcho(ctx, "demo", "echo", 1); return err })
	g.Go(func() (err error) { echoC, err = c.ServeEcho(ctx, "demo", "echo", 1); return err })
	// A Service of a that is never exported.
	g.Go(func() (err error) { privateA, err = a.ServeEcho(ctx, "demo", "private", 1); return err })
	g.Go(func() (err error) { clientB, err = b.RunPod(ctx, mesh.PodSpec{Name: "client"}); return err })
	g.Go(func() (err error) { clientA, err = a.RunPod(ctx, mesh.PodSpec{Name: "client"}); return err })
	g.Go(func() (err error) {
		explicitA, err = a.RunPod(ctx, mesh.PodSpec{Name: "explicit", NoCapture: true})
		return err
	})
	g.Go(func() (err error) {
		outsider, err = a.RunPod(ctx, mesh.PodSpec{Name: "outsider", NoSidecar: true})
		return err
	})
	g.Go(func() (err error) {
		outsiderB, err = b.RunPod(ctx, mesh.PodSpec{Name: "outsider", NoSidecar: true})
		return err
	})
	require.NoError(t, g.Wait())
	require.NoError(t, a.Export(ctx, "demo", "echo", 1))
	require.NoError(t, c.Export(ctx, "demo", "echo", 1))
	for _, exporter := range []string{"a", "c"} {
		require.NoError(t, mesh.Poll(ctx, meshWait, "b imports demo/echo from "+exporter, func(ctx context.Context) (bool, string) {
			s, ok, err := b.Imported(ctx, exporter, "demo", "echo")
			if err != nil || !ok {
				return false, fmt.Sprintf("ok=%t err=%v", ok, err)
			}
			return s.ReadyEndpoints() == 1, fmt.Sprintf("%d ready endpoints", s.ReadyEndpoints())
		}))
	}
	callerB := b.SPIFFEID("demo", "client")
	echoAID := a.SPIFFEID("demo", "echo")

	t.Run("the pod's DNS answers the clusterset name with a virtual IP", func(t *testing.T) {
		var addrs []netip.Addr
		eventually(t, "b's client resolves "+echoHost, func() error {
			var err error
			addrs, err = clientB.Resolve(ctx, echoHost)
			return err
		})
		require.Len(t, addrs, 1)
		assert.True(t, netip.MustParsePrefix("240.240.0.0/16").Contains(addrs[0]), "VIP %s", addrs[0])
	})

	t.Run("b's pods reach a only through a's gateway", func(t *testing.T) {
		gw := netip.AddrPortFrom(a.K.WANIP(), mesh.GatewayPort).String()
		require.NoError(t, dialOnce(ctx, outsiderB, gw), "b's pod → a's gateway")
		for _, addr := range []string{
			netip.AddrPortFrom(echoA[0].W.IP, mesh.EchoHTTPPort).String(), // a's pod
			a.Federator.FederationAddr,                                    // a's federator, on the WAN
			netip.AddrPortFrom(a.K.WANIP(), 6443).String(),                // a's API server
		} {
			err := dialOnce(ctx, outsiderB, addr)
			require.Error(t, err, "b's pod reached %s", addr)
			t.Logf("b's pod → %s: %v", addr, err)
		}
	})

	t.Run("HTTP/1.1, HTTP/2, gRPC and TCP cross from b to a with b's identity", func(t *testing.T) {
		crossesWithIdentity(t, clientB, a, echoA[0])
	})

	t.Run("the same call inside a stays in a", func(t *testing.T) {
		before := gatewayRouted(t, a, ServiceHTTP)
		for _, proto := range []string{"http1", "h2c"} {
			r := callOK(t, clientA, mesh.Call{Proto: proto, Target: echoHost + ":80"})
			assert.Equal(t, "a", r.Cluster, "a's own pod, not c's")
			assert.Equal(t, a.SPIFFEID("demo", "client"), r.CallerIdentity)
		}
		r := callOK(t, clientA, mesh.Call{Proto: "tcp", Target: echoHost + ":9000"})
		assert.Equal(t, "a", r.Cluster)
		assert.Equal(t, before, gatewayRouted(t, a, ServiceHTTP), "a local call went through a's gateway")
	})

	t.Run("a's Service that is not exported: a's meshed pods call it over mTLS, by any of its names", func(t *testing.T) {
		svc, err := a.K.Client().CoreV1().Services("demo").Get(ctx, "private", metav1.GetOptions{})
		require.NoError(t, err)
		clusterIP := svc.Spec.ClusterIP
		var addrs []netip.Addr
		eventually(t, "a's client resolves private.demo.svc.cluster.local", func() error {
			addrs, err = clientA.Resolve(ctx, "private.demo.svc.cluster.local")
			return err
		})
		require.Equal(t, []netip.Addr{netip.MustParseAddr(clusterIP)}, addrs, "the sidecar's DNS answers with the ClusterIP")
		for _, tc := range []struct{ proto, target, seen string }{
			{"http1", "private.demo.svc.cluster.local:80", "HTTP/1.1"},
			{"h2c", "private:80", "HTTP/1.1"}, // the short name, through the search list; port 80 is declared http
			{"h2c", "private.demo:81", "HTTP/2.0"},
			{"grpc", "private.demo:9090", "grpc"},
			{"http1", net.JoinHostPort(clusterIP, "80"), "HTTP/1.1"},
			{"tcp", net.JoinHostPort(clusterIP, "9000"), "tcp"},
		} {
			r := callOK(t, clientA, mesh.Call{Proto: tc.proto, Target: tc.target})
			assert.Equal(t, "a", r.Cluster, "%s %s", tc.proto, tc.target)
			assert.Equal(t, privateA[0].Name(), r.Pod, "%s %s", tc.proto, tc.target)
			assert.Equal(t, tc.seen, r.Proto, "%s %s", tc.proto, tc.target)
			// The app hears from its own sidecar, whose inbound side
			// takes only mTLS: before the in-cluster services, these
			// calls left a's client in plaintext and were refused.
			assert.True(t, strings.HasPrefix(r.Remote, "127.0.0.1:"), "%s %s: remote %s", tc.proto, tc.target, r.Remote)
			if tc.proto != "tcp" {
				assert.Equal(t, a.SPIFFEID("demo", "client"), r.CallerIdentity, "%s %s", tc.proto, tc.target)
			}
		}
		// b never sees it.
		_, ok, err := b.Imported(ctx, "a", "demo", "private")
		require.NoError(t, err)
		assert.False(t, ok, "b imported a service a never exported")
	})

	t.Run("an X-Forwarded-Client-Cert from the app never reaches the destination", func(t *testing.T) {
		forged := "By=" + echoAID + ";Hash=00;URI=spiffe://a.mesh/ns/demo/sa/admin"
		for _, proto := range []string{"http1", "h2c", "grpc"} {
			port := "80"
			if proto == "grpc" {
				port = "9090"
			}
			r := callOK(t, clientB, mesh.Call{Proto: proto, Target: net.JoinHostPort(echoHost, port),
				Headers: []string{"X-Forwarded-Client-Cert: " + forged}})
			assert.NotContains(t, r.XFCC, "sa/admin", "%s: the forged XFCC reached the app", proto)
			assert.NotContains(t, r.XFCC, "Hash=00", "%s", proto)
			assert.Equal(t, callerB, r.CallerIdentity, "%s", proto)
		}
	})

	t.Run("a workload without a valid certificate cannot reach the inbound port", func(t *testing.T) {
		target := echoA[0]
		refusals := func(reason string) float64 {
			metrics, err := target.SidecarMetrics(ctx)
			if err != nil {
				t.Logf("sidecar metrics: %v", err)
				return -1
			}
			return mesh.MetricSum(metrics, "isthmus_sidecar_refusals_total", `listener="inbound"`, `reason="`+reason+`"`)
		}
		before, loopsBefore := refusals("handshake"), refusals("loop")
		require.GreaterOrEqual(t, before, 0.0)
		require.GreaterOrEqual(t, loopsBefore, 0.0)
		httpAddr := netip.AddrPortFrom(target.W.IP, mesh.EchoHTTPPort).String()
		tcpAddr := netip.AddrPortFrom(target.W.IP, mesh.EchoTCPPort).String()

		// Plain HTTP to the app's port: the pod's capture sends it to the
		// sidecar's inbound listener, which speaks only TLS.
		answer, err := exchange(ctx, outsider, httpAddr, nil, "GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
		assert.NotContains(t, answer, "HTTP/", "plain HTTP reached the app (err %v)", err)
		// Raw TCP: echo greets every connection at once; the sidecar does not.
		answer, err = exchange(ctx, outsider, tcpAddr, nil, "")
		assert.NotContains(t, answer, `"pod"`, "a raw connection reached the app (err %v)", err)
		// TLS without a client certificate.
		answer, err = exchange(ctx, outsider, httpAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio-http/1.1"}}, //nolint:gosec // an attacker verifies nothing
			"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
		require.Error(t, err)
		assert.NotContains(t, answer, "HTTP/")
		// TLS with b's client's identity, signed by no trusted root.
		forged := selfSignedSVID(t, callerB)
		answer, err = exchange(ctx, outsider, httpAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio-http/1.1"}, //nolint:gosec // as above
			Certificates: []tls.Certificate{forged}}, "GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
		require.Error(t, err)
		assert.NotContains(t, answer, "HTTP/")
		t.Logf("a self-signed certificate for %s: %v", callerB, err)

		// The sidecar's own outbound port, asked to carry a request into
		// the mesh: the capture sends it to the inbound listener too,
		// which refuses it before any handshake (reason loop), so nobody
		// outside the pod sends with the pod's identity, with or without
		// a valid certificate (pkg/sidecar's
		// TestInboundToTheOutboundPortIsRefused has the valid one).
		outboundAddr := netip.AddrPortFrom(target.W.IP, 15001).String()
		answer, err = exchange(ctx, outsider, outboundAddr, nil, "GET / HTTP/1.1\r\nHost: "+echoHost+"\r\nConnection: close\r\n\r\n")
		assert.NotContains(t, answer, "HTTP/", "the outbound port carried an outsider's request (err %v)", err)

		assert.Eventually(t, func() bool { return refusals("handshake") >= before+4 && refusals("loop") >= loopsBefore+1 },
			10*time.Second, 100*time.Millisecond,
			"a's sidecar did not count 4 refused inbound handshakes (from %v) and 1 loop (from %v)", before, loopsBefore)
		// The same pod answers the mesh all along.
		r := callOK(t, clientA, mesh.Call{Proto: "http1", Target: echoHost + ":80"})
		assert.Equal(t, target.Name(), r.Pod)
	})

	t.Run("a caller with a valid SVID cannot hand the app its own X-Forwarded-Client-Cert", func(t *testing.T) {
		// An outsider holding a real SVID of a's trust domain speaks TLS
		// itself and offers no HTTP ALPN: echo's Service declares 8080
		// HTTP, so a's federator gives echo's sidecar an inbound chain
		// for 8080 that is HTTP whatever the caller offers, and it
		// replaces the header (docs/sidecar-xds.md, "Inbound profiles").
		outsiderID := a.SPIFFEID("demo", "outsider")
		cert := caSignedSVID(t, a, outsiderID)
		target := echoA[0]
		httpAddr := netip.AddrPortFrom(target.W.IP, mesh.EchoHTTPPort).String()
		tcpAddr := netip.AddrPortFrom(target.W.IP, mesh.EchoTCPPort).String()
		forged := "By=" + echoAID + ";Hash=00;URI=spiffe://a.mesh/ns/demo/sa/admin"
		request := "GET / HTTP/1.1\r\nHost: echo\r\nX-Forwarded-Client-Cert: " + forged + "\r\nConnection: close\r\n\r\n"
		attempt := func(alpn []string) string {
			answer, _ := exchange(ctx, outsider, httpAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: alpn, //nolint:gosec // the attacker verifies nothing
				Certificates: []tls.Certificate{cert}}, request)
			return answer
		}
		// Until echo's sidecar holds its profile (it has since echo's
		// endpoints were published; this bounds a slow push).
		require.NoError(t, mesh.Poll(ctx, meshWait, "echo's sidecar serves 8080 as HTTP", func(context.Context) (bool, string) {
			answer := attempt([]string{"istio"})
			return strings.Contains(answer, "HTTP/1.1 200") && !strings.Contains(answer, "sa/admin"), answer
		}))
		for _, alpn := range [][]string{{"istio"}, nil, {"h2", "http/1.1"}} {
			answer := attempt(alpn)
			require.Contains(t, answer, "HTTP/1.1 200", "ALPN %q", alpn)
			assert.NotContains(t, answer, "sa/admin", "ALPN %q: the caller's XFCC reached the app", alpn)
			assert.NotContains(t, answer, "Hash=00", "ALPN %q", alpn)
			assert.Contains(t, answer, "URI="+outsiderID, "ALPN %q: the app was told who called", alpn)
		}
		// Echo's TCP port is declared TCP: bytes pass as sent, even
		// when the caller offers an HTTP ALPN (echo greets at once).
		answer, _ := exchange(ctx, outsider, tcpAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio-http/1.1"}, //nolint:gosec // as above
			Certificates: []tls.Certificate{cert}}, "")
		assert.Contains(t, answer, `"pod"`, "the TCP port's chain is TCP")
	})

	t.Run("AuthorizationPolicy: a's sidecars let through only the callers a policy allows", func(t *testing.T) {
		authorizationPolicies(t, a, clientA, clientB, privateA[0], callerB)
	})

	t.Run("PeerAuthentication: PERMISSIVE opens a pod's ports to plaintext callers, and only those", func(t *testing.T) {
		peerAuthentication(t, a, clientA, outsider, privateA[0])
	})

	t.Run("explicit mode: the outbound port carries the pod's own requests, and nobody else's", func(t *testing.T) {
		// No capture in this pod: its app sends to 127.0.0.1:15001 as to
		// an HTTP proxy, and the outbound listener, bound to every
		// address, is reachable from outside the pod too.
		request := "GET / HTTP/1.1\r\nHost: " + echoHost + "\r\nConnection: close\r\n\r\n"
		answer, err := exchange(ctx, explicitA, "127.0.0.1:15001", nil, request)
		require.Contains(t, answer, "HTTP/1.1 200", "from inside the pod (err %v)", err)
		assert.Contains(t, answer, a.SPIFFEID("demo", "explicit"), "the destination saw the pod's identity")

		notLocal := func() float64 {
			metrics, err := explicitA.SidecarMetrics(ctx)
			require.NoError(t, err)
			return mesh.MetricSum(metrics, "isthmus_sidecar_refusals_total", `listener="outbound"`, `reason="not_local"`)
		}
		before := notLocal()
		answer, err = exchange(ctx, outsider, netip.AddrPortFrom(explicitA.W.IP, 15001).String(), nil, request)
		assert.NotContains(t, answer, "HTTP/", "the outbound port carried an outsider's request (err %v)", err)
		assert.Equal(t, before+1, notLocal(), "refusals{listener=outbound,reason=not_local}")
	})

	t.Run("a's endpoints unready: b fails over to c, and back to a", func(t *testing.T) {
		require.NoError(t, echoA[0].SetReady(ctx, false))
		require.NoError(t, a.WaitReadyEndpoints(ctx, "demo", "echo", 0, meshWait))
		answeredBy(t, clientB, "c", echoC[0], callerB)
		r := callOK(t, clientB, mesh.Call{Proto: "tcp", Target: echoHost + ":9000"})
		assert.Equal(t, "c", r.Cluster)

		require.NoError(t, echoA[0].SetReady(ctx, true))
		require.NoError(t, a.WaitReadyEndpoints(ctx, "demo", "echo", 1, meshWait))
		answeredBy(t, clientB, "a", echoA[0], callerB)
	})

	t.Run("b's federator restarts while a's is down and b's client calls: no call fails", func(t *testing.T) {
		callsAcrossFederatorRestart(t, b, clientB, a)
	})
}

// callsAcrossFederatorRestart restarts c's federator while client, a pod
// of c, calls echo by its clusterset name over and over, and answerer's
// federator is down: answerer's gateway and pods keep serving, so the
// calls can go on, but c's new federator cannot learn answerer's exports
// until answerer's federator is back. Its sidecars must be served nothing
// meanwhile (--peer-sync-timeout, 30s by default), so that they keep the
// configuration they had: served what c's federator knows, they would
// lose answerer's endpoints (fail over to another exporter, or fail). No
// call may fail, and answerer answers every one with client's identity.
func callsAcrossFederatorRestart(t *testing.T, c *mesh.Cluster, client *mesh.Pod, answerer *mesh.Cluster) {
	ctx := t.Context()
	caller := client.SPIFFEID()
	callOK(t, client, mesh.Call{Proto: "http1", Target: echoHost + ":80"})

	type outcome struct {
		at    time.Time
		reply mesh.Reply
		err   error
	}
	var (
		mu       sync.Mutex
		outcomes []outcome
	)
	count := func() (ok, failed int) {
		mu.Lock()
		defer mu.Unlock()
		for _, o := range outcomes {
			if o.err != nil {
				failed++
			} else {
				ok++
			}
		}
		return ok, failed
	}
	callCtx, stopCalls := context.WithCancel(ctx)
	var calls errgroup.Group
	calls.Go(func() error {
		for callCtx.Err() == nil {
			replies, err := client.Call(callCtx, mesh.Call{Proto: "http1", Target: echoHost + ":80", Timeout: 5 * time.Second})
			if callCtx.Err() != nil {
				return nil // ended by stopCalls, not by the mesh
			}
			o := outcome{at: time.Now(), err: err}
			if err == nil {
				o.reply = replies[0]
			}
			mu.Lock()
			outcomes = append(outcomes, o)
			mu.Unlock()
		}
		return nil
	})
	defer func() {
		stopCalls()
		_ = calls.Wait()
	}()
	waitCalls := func(what string, n int) {
		t.Helper()
		start, _ := count()
		require.NoError(t, mesh.Poll(ctx, meshWait, what, func(context.Context) (bool, string) {
			ok, failed := count()
			return ok >= start+n, fmt.Sprintf("%d calls answered, %d failed", ok, failed)
		}))
	}
	waitCalls("calls before the restart", 2)
	before, err := c.Federator.XDS(ctx)
	require.NoError(t, err)
	require.NotEmpty(t, before.Sidecar.Version)

	require.NoError(t, answerer.StopFederator())
	stopped := time.Now()
	require.NoError(t, c.RestartFederator(ctx))
	ready := time.Now()

	// The client's sidecar redials the new federator, which serves it
	// nothing while answerer is away; the calls go on.
	node := "sidecar~" + client.W.IP.String() + "~" + client.Name() + "."
	require.NoError(t, mesh.Poll(ctx, meshWait, "the client's sidecar on the restarted federator, served nothing", func(ctx context.Context) (bool, string) {
		st, err := c.Federator.XDS(ctx)
		if err != nil {
			return false, err.Error()
		}
		for _, p := range st.Proxies {
			if strings.HasPrefix(p.Node, node) {
				return true, ""
			}
		}
		return false, fmt.Sprintf("no stream from %s; sidecars waiting until %v", node, st.Sidecar.WaitingForPeersUntil)
	}))
	waitCalls("calls while "+answerer.Name()+"'s federator is down", 3)
	st, err := c.Federator.XDS(ctx)
	require.NoError(t, err)
	require.False(t, st.Sidecar.WaitingForPeersUntil.IsZero(), "the sidecars no longer wait for %s", answerer.Name())
	require.Empty(t, st.Sidecar.Version, "the sidecars were served without %s's imports", answerer.Name())
	require.NotEmpty(t, st.Gateway.Version, "the gateway was served nothing: it must not wait for the peers")

	require.NoError(t, answerer.StartFederator(ctx))
	// Served once every peer resent its exports, answerer's included.
	var served xds.Status
	require.NoError(t, mesh.Poll(ctx, meshWait, "the restarted federator serves its sidecars", func(ctx context.Context) (bool, string) {
		st, err := c.Federator.XDS(ctx)
		if err != nil {
			return false, err.Error()
		}
		served = st
		return st.Sidecar.Version != "" && st.Sidecar.WaitingForPeersUntil.IsZero(),
			fmt.Sprintf("sidecar version %q, waiting until %v", st.Sidecar.Version, st.Sidecar.WaitingForPeersUntil)
	}))
	servedAt := time.Now()
	assert.Contains(t, served.Sidecar.Imports, answerer.Name(), "served with %s's imports", answerer.Name())
	metrics, err := c.Federator.Metrics(ctx)
	require.NoError(t, err)
	assert.Zero(t, mesh.MetricSum(metrics, "isthmus_xds_peer_sync_timeouts"), "the sidecars' wait ended on the bound, not on the peers")
	// Its first configuration is the one the sidecars held: same content,
	// same version, so nothing is even pushed to them.
	assert.Equal(t, before.Sidecar.Version, served.Sidecar.Version, "the restarted federator's first sidecar configuration differs from the one before")
	waitCalls("calls after the sidecars are served", 3)
	stopCalls()
	require.NoError(t, calls.Wait())

	mu.Lock()
	defer mu.Unlock()
	during := 0
	for _, o := range outcomes {
		if o.at.After(stopped) && o.at.Before(servedAt) {
			during++
		}
		at := func(t time.Time) string { return t.Format(time.TimeOnly + ".000") }
		if assert.NoError(t, o.err, "call at %s (restart at %s, federator ready at %s, sidecars served at %s)",
			at(o.at), at(stopped), at(ready), at(servedAt)) {
			assert.Equal(t, answerer.Name(), o.reply.Cluster, "call at %s: answered by another cluster", at(o.at))
			assert.Equal(t, caller, o.reply.CallerIdentity)
		}
	}
	t.Logf("%d calls, %d of them between the restart and the sidecars being served (%s, of which %s until c's federator was ready)",
		len(outcomes), during, servedAt.Sub(stopped).Round(time.Millisecond), ready.Sub(stopped).Round(time.Millisecond))
}

// crossesWithIdentity calls echo by its clusterset name from client over
// HTTP/1.1, h2c, gRPC and raw TCP, and checks that each call is answered
// by pod echo of cluster to, through to's east-west gateway, with client's
// identity as echo's sidecar verified it, and that iptables sent client's
// six connections to its sidecar.
func crossesWithIdentity(t *testing.T, client *mesh.Pod, to *mesh.Cluster, echo *mesh.Pod) {
	t.Helper()
	caller, echoID := client.SPIFFEID(), echo.SPIFFEID()
	before := gatewayRouted(t, to, ServiceHTTP)
	captured := sidecarOutbound(t, client)
	for _, tc := range []struct {
		proto, port, seen string
		identity          bool
	}{
		{"http1", "80", "HTTP/1.1", true},
		// Port 80 is declared http: the sidecars speak HTTP/1.1 between
		// them, whatever the app spoke (Istio's rule); 81, declared
		// http2, carries HTTP/2 end to end, and upgrades HTTP/1.1.
		{"h2c", "80", "HTTP/1.1", true},
		{"h2c", "81", "HTTP/2.0", true},
		{"http1", "81", "HTTP/2.0", true},
		{"grpc", "9090", "grpc", true},
		{"tcp", "9000", "tcp", false},
	} {
		t.Run(tc.proto+" to "+tc.port, func(t *testing.T) {
			r := callOK(t, client, mesh.Call{Proto: tc.proto, Target: net.JoinHostPort(echoHost, tc.port)})
			t.Logf("%s: %+v", tc.proto, r)
			assert.Equal(t, to.Name(), r.Cluster, "answered by cluster %s", to.Name())
			assert.Equal(t, echo.Name(), r.Pod)
			assert.Equal(t, tc.seen, r.Proto)
			// The app hears from its own sidecar on loopback.
			assert.True(t, strings.HasPrefix(r.Remote, "127.0.0.1:"), "remote %s", r.Remote)
			if tc.identity {
				assert.Equal(t, caller, r.CallerIdentity, "the caller's identity as %s's sidecar verified it", to.Name())
				assert.Contains(t, r.XFCC, "By="+echoID+";")
				assert.Empty(t, r.XFCCError)
			}
		})
	}
	assert.Greater(t, gatewayRouted(t, to, ServiceHTTP), before, "the HTTP calls went through %s's east-west gateway", to.Name())
	assert.GreaterOrEqual(t, sidecarOutbound(t, client), captured+6, "iptables sent the app's six connections to %s's sidecar", client.Cluster.Name())
}

// ServiceHTTP is the gateway cluster of echo's HTTP port.
const ServiceHTTP = "outbound|80||echo.demo.svc.cluster.local"

// gatewayRouted counts the connections c's gateway routed to cluster.
func gatewayRouted(t *testing.T, c *mesh.Cluster, cluster string) float64 {
	t.Helper()
	metrics, err := c.GatewayMetrics(t.Context())
	require.NoError(t, err)
	return mesh.MetricSum(metrics, "isthmus_gateway_routed_connections_total", `cluster="`+cluster+`"`)
}

// sidecarOutbound counts the connections p's sidecar accepted on its
// outbound listener: the app's, redirected by iptables.
func sidecarOutbound(t *testing.T, p *mesh.Pod) float64 {
	t.Helper()
	metrics, err := p.SidecarMetrics(t.Context())
	require.NoError(t, err)
	return mesh.MetricSum(metrics, "isthmus_sidecar_connections_total", `listener="outbound"`)
}

// dialOnce connects from p's namespace to addr, bounded by two seconds.
func dialOnce(ctx context.Context, p *mesh.Pod, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := p.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return conn.Close()
}

// eventually retries fn until it succeeds, at most meshWait, and fails t
// with its last error.
func eventually(t *testing.T, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(meshWait)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last error: %v", what, meshWait, err)
		}
		select {
		case <-t.Context().Done():
			t.Fatalf("%s: %v; last error: %v", what, t.Context().Err(), err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// callOK makes call from p, retrying while the mesh converges, and returns
// its one reply.
func callOK(t *testing.T, p *mesh.Pod, call mesh.Call) mesh.Reply {
	t.Helper()
	var replies []mesh.Reply
	eventually(t, p.Cluster.Name()+"/"+p.Name()+": echo "+strings.Join(call.Args(), " "), func() error {
		var err error
		replies, err = p.Call(t.Context(), call)
		return err
	})
	require.Len(t, replies, 1)
	return replies[0]
}

// answeredBy waits until p's HTTP call to echo is answered by cluster's
// pod, with caller as the identity.
func answeredBy(t *testing.T, p *mesh.Pod, cluster string, pod *mesh.Pod, caller string) {
	t.Helper()
	var last mesh.Reply
	eventually(t, "answered by cluster "+cluster, func() error {
		replies, err := p.Call(t.Context(), mesh.Call{Proto: "http1", Target: echoHost + ":80"})
		if err != nil {
			return err
		}
		if last = replies[0]; last.Cluster != cluster {
			return fmt.Errorf("answered by cluster %s", last.Cluster)
		}
		return nil
	})
	assert.Equal(t, pod.Name(), last.Pod)
	assert.Equal(t, caller, last.CallerIdentity)
}

// exchange connects from p's namespace to addr (over TLS when cfg is
// set), sends request and returns what came back within two seconds, and
// the first error: a refusal shows as one.
func exchange(ctx context.Context, p *mesh.Pod, addr string, cfg *tls.Config, request string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := p.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
		return "", err
	}
	if cfg != nil {
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			return "", fmt.Errorf("handshake: %w", err)
		}
		conn = tc
	}
	if request != "" {
		if _, err := io.WriteString(conn, request); err != nil {
			return "", fmt.Errorf("write: %w", err)
		}
	}
	got, err := io.ReadAll(io.LimitReader(conn, 64<<10))
	var ne net.Error
	if err == nil {
		err = errors.New("closed")
	} else if errors.As(err, &ne) && ne.Timeout() {
		err = fmt.Errorf("nothing within the deadline: %w", err)
	}
	return string(got), err
}

// caSignedSVID is a client certificate for id signed by c's CA, whose
// key the test reads from the CA's Secret: what a workload of c's trust
// domain holds, without a sidecar to speak for it.
func caSignedSVID(t *testing.T, c *mesh.Cluster, id string) tls.Certificate {
	t.Helper()
	sec, err := c.K.Client().CoreV1().Secrets("isthmus-system").Get(t.Context(), ca.DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	signer, err := tls.X509KeyPair(sec.Data[ca.KeyCACert], sec.Data[ca.KeyCAKey])
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(signer.Certificate[0])
	require.NoError(t, err)
	return svidCert(t, id, caCert, signer.PrivateKey)
}

// selfSignedSVID is a certificate claiming id, signed by its own key: what
// a workload outside the mesh could make.
func selfSignedSVID(t *testing.T, id string) tls.Certificate {
	t.Helper()
	return svidCert(t, id, nil, nil)
}

// svidCert is a client certificate with id as its URI SAN, signed by
// parent's key, or by its own when parent is nil.
func svidCert(t *testing.T, id string, parent *x509.Certificate, parentKey any) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	u, err := url.Parse(id)
	require.NoError(t, err)
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "forged-" + strconv.FormatInt(serial.Int64()%1000, 10)},
		URIs:         []*url.URL{u},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	require.NoError(t, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
