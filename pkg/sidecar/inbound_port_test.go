package sidecar

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// The inbound listener with a chain per declared port, as Istio's (and
// the federator's, per pod): Envoy matches destination_port before the
// ALPN, so on a declared port the caller's ALPN cannot pick another
// chain.

// forgedXFCC is what a caller with a valid SVID would like the app to
// believe about it.
const forgedXFCC = "By=spiffe://evil;URI=spiffe://x/ns/admin/sa/root"

// inboundChain is a copy of the inbound listener's HTTP chain (http) or
// TCP chain, matching destination_port port (0: any) and application
// protocols alpn.
func inboundChain(tb testing.TB, port uint16, http bool, alpn ...string) *listenerv3.FilterChain {
	i := 1
	if http {
		i = 0
	}
	fc := proto.Clone(inboundListener(tb).FilterChains[i]).(*listenerv3.FilterChain)
	fc.FilterChainMatch.ApplicationProtocols = alpn
	if port != 0 {
		fc.FilterChainMatch.DestinationPort = wrapperspb.UInt32(uint32(port))
	}
	return fc
}

// withInbound is snap with chains for its inbound listener's filter
// chains.
func withInbound(tb testing.TB, snap *cache.Snapshot, chains ...*listenerv3.FilterChain) *cache.Snapshot {
	tb.Helper()
	res := map[resource.Type][]types.Resource{}
	for _, typ := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType, resource.SecretType} {
		for name, r := range snap.GetResources(typ) {
			if typ == resource.ListenerType && name == xdsclient.InboundListenerName {
				l := proto.Clone(r).(*listenerv3.Listener)
				l.FilterChains = chains
				r = l
			}
			res[typ] = append(res[typ], r)
		}
	}
	out, err := cache.NewSnapshot(snap.GetVersion(resource.ListenerType), res)
	require.NoError(tb, err)
	require.NoError(tb, out.Consistent())
	return out
}

// dialInbound is a TLS connection, handshake done, to addr as a caller
// holding cert that offers alpn (none when empty).
func dialInbound(t testing.TB, addr string, cert tls.Certificate, alpn ...string) (*tls.Conn, error) {
	t.Helper()
	return dialInboundFrom(t, netip.Addr{}, addr, cert, alpn...)
}

// getInbound sends one GET for / with a forged XFCC, over HTTP/1.1 or
// HTTP/2 with prior knowledge (h2), on a TLS connection to addr offering
// alpn, and returns the status and what the app echoed.
func getInbound(t testing.TB, addr string, cert tls.Certificate, h2 bool, alpn ...string) (int, echoReply) {
	t.Helper()
	var protos http.Protocols
	if h2 {
		protos.SetUnencryptedHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	// The TLS is the test's own: the transport speaks "http" on it.
	tr := &http.Transport{Protocols: &protos, DisableKeepAlives: true,
		DialContext: func(context.Context, string, string) (net.Conn, error) { return dialInbound(t, addr, cert, alpn...) }}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://echo.demo.svc.cluster.local/", nil)
	require.NoError(t, err)
	req.Header.Set(xfccHeader, forgedXFCC)
	resp, err := tr.RoundTrip(req)
	require.NoError(t, err)
	code, reply, _ := readEcho(t, resp)
	return code, reply
}

// rawGetInbound writes an HTTP/1.1 request with a forged XFCC on a TLS
// connection to addr offering alpn, bytes as a client would send them,
// and reads the app's echo. On a TCP chain the request reaches the app
// as sent.
func rawGetInbound(t testing.TB, addr string, cert tls.Certificate, alpn ...string) (int, echoReply) {
	t.Helper()
	c, err := dialInbound(t, addr, cert, alpn...)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "GET / HTTP/1.1\r\nHost: echo.demo.svc.cluster.local\r\n"+xfccHeader+": "+forgedXFCC+"\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	code, reply, _ := readEcho(t, resp)
	return code, reply
}

func alpnName(alpn []string) string {
	if len(alpn) == 0 {
		return "no ALPN"
	}
	return "ALPN " + strings.Join(alpn, ",")
}

// A mesh whose b has, on its inbound listener, a chain for its HTTP
// app's port (the HTTP manager, no ALPN), one for its TCP app's port
// (tcp_proxy), one for a third app's port listing only the HTTP ALPN,
// then the two chains by ALPN for every other port.
type portMesh struct {
	*mesh
	caller   tls.Certificate
	wantXFCC string
	// strict is the app on the port whose only chain lists the HTTP
	// ALPN; other is an HTTP app on a port without a chain.
	strict, other *backend
}

var (
	ipStrict = netip.MustParseAddr("127.0.0.5")
	ipOther  = netip.MustParseAddr("127.0.0.6")
)

func startPortMesh(t *testing.T) *portMesh {
	t.Helper()
	m := &portMesh{mesh: startMesh(t)}
	m.strict, m.other = startHTTPBackend(t, "b-strict"), startHTTPBackend(t, "b-other")
	m.b.setApp(ipStrict, m.strict.addr)
	m.b.setApp(ipOther, m.other.addr)
	snap := snapshot(t, "v1", []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
	m.xds.set(t, withInbound(t, snap,
		inboundChain(t, m.b.http.addr.Port(), true),
		inboundChain(t, m.b.tcp.addr.Port(), false),
		inboundChain(t, m.strict.addr.Port(), true, alpnHTTP1, alpnHTTP2),
		inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2),
		inboundChain(t, 0, false),
	))
	m.a.waitReady(t, "v1")
	m.b.waitReady(t, "v1")
	caller := m.alpha.svid(t, m.alpha.id("demo", "caller"))
	m.caller = tlsCert(caller)
	sum := sha256.Sum256(caller.Certificates[0].Raw)
	m.wantXFCC = "By=" + m.b.id.String() + ";Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + caller.ID.String()
	return m
}

// The gap closed: on the HTTP app's port a caller with a valid SVID
// that offers ALPN istio, or none, still gets the HTTP manager, and the
// app sees only the XFCC b sets, naming the caller's real identity.
// Picked by ALPN, these connections went to the TCP chain and the app
// got the caller's forged XFCC.
func TestInboundPortChainSanitizesXFCCWhateverTheALPN(t *testing.T) {
	m := startPortMesh(t)
	addr := m.b.endpoint(ipHTTP).String()
	for _, tc := range []struct {
		name      string
		h2        bool
		alpn      []string
		wantProto string
	}{
		{"HTTP/1.1, ALPN istio", false, []string{"istio"}, "HTTP/1.1"},
		{"HTTP/1.1, no ALPN", false, nil, "HTTP/1.1"},
		{"h2 preface, no ALPN", true, nil, "HTTP/2.0"},
		{"h2 preface, ALPN istio", true, []string{"istio"}, "HTTP/2.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, reply := getInbound(t, addr, m.caller, tc.h2, tc.alpn...)
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, "b", reply.Pod)
			require.Equal(t, tc.wantProto, reply.Proto)
			require.Equal(t, []string{m.wantXFCC}, reply.XFCC, "the forged XFCC never reaches the app")
		})
	}
	t.Run("HTTP/1.1 bytes as sent, ALPN istio", func(t *testing.T) {
		code, reply := rawGetInbound(t, addr, m.caller, "istio")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, []string{m.wantXFCC}, reply.XFCC)
	})

	// a's sidecar (ALPN istio-http/1.1, istio-h2; the chain lists none,
	// so none is negotiated) lands on the same chain, in either version.
	aLeaf := sha256.Sum256(m.a.svid.Certificates[0].Raw)
	for _, h2 := range []bool{false, true} {
		code, reply, body := m.a.get(t, h2, "http://echo.demo.svc.clusterset.local/", http.Header{xfccHeader: {forgedXFCC}})
		require.Equal(t, http.StatusOK, code, body)
		require.Equal(t, map[bool]string{false: "HTTP/1.1", true: "HTTP/2.0"}[h2], reply.Proto)
		require.Equal(t, []string{"By=" + m.b.id.String() + ";Hash=" + hex.EncodeToString(aLeaf[:]) + ";URI=" + m.a.id.String()}, reply.XFCC)
	}

	mt := m.b.scrape(t)
	require.EqualValues(t, 7, metricValue(t, mt, "isthmus_sidecar_requests_total", "listener=inbound", "cluster=inbound-passthrough", "code=200"),
		"every request went through b's HTTP manager")
	require.EqualValues(t, -1, metricValue(t, mt, "isthmus_sidecar_refusals_total", "listener=inbound"))

	// The config dump shows each chain's port, none for the chains of
	// any port.
	_, dumpBody := httpGet(t, "http://"+m.b.proxy.AdminAddr().String()+"/config_dump")
	var dump struct {
		Listeners []struct {
			Name   string `json:"name"`
			Chains []struct {
				DestinationPort *uint16  `json:"destination_port"`
				ALPN            []string `json:"application_protocols"`
			} `json:"filter_chains"`
		} `json:"listeners"`
	}
	require.NoError(t, json.Unmarshal([]byte(dumpBody), &dump), dumpBody)
	require.Equal(t, xdsclient.InboundListenerName, dump.Listeners[1].Name)
	in := dump.Listeners[1].Chains
	require.Len(t, in, 5)
	for i, want := range []uint16{m.b.http.addr.Port(), m.b.tcp.addr.Port(), m.strict.addr.Port()} {
		require.NotNil(t, in[i].DestinationPort, "chain %d", i)
		require.Equal(t, want, *in[i].DestinationPort, "chain %d", i)
	}
	require.Nil(t, in[3].DestinationPort)
	require.Nil(t, in[4].DestinationPort)
	require.Equal(t, []string{alpnHTTP1, alpnHTTP2}, in[3].ALPN)
}

// On the TCP app's port the TCP chain decides, even for a caller that
// offers the HTTP ALPN: its bytes reach the app unchanged, as Envoy
// would carry them.
func TestInboundPortChainTCPWhateverTheALPN(t *testing.T) {
	m := startPortMesh(t)
	for _, alpn := range [][]string{{alpnHTTP1}, {alpnHTTP2, alpnHTTP1}, nil} {
		t.Run(alpnName(alpn), func(t *testing.T) {
			c, err := dialInbound(t, m.b.endpoint(ipTCP).String(), m.caller, alpn...)
			require.NoError(t, err)
			defer c.Close()
			require.Empty(t, c.ConnectionState().NegotiatedProtocol, "the TCP chain lists no protocol")
			payload := "GET / HTTP/1.1\r\nHost: echo\r\n" + xfccHeader + ": " + forgedXFCC + "\r\n\r\n" + strings.Repeat("\x00not http\xff", 1000)
			go func() { _, _ = io.WriteString(c, payload) }()
			got := make([]byte, len(payload))
			_, err = io.ReadFull(c, got)
			require.NoError(t, err)
			require.Equal(t, payload, string(got), "the echo app got the bytes as sent")
		})
	}
	require.EqualValues(t, 3, m.b.tcp.accepted.Load())
	require.EqualValues(t, -1, metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total", "listener=inbound"), "no HTTP manager saw them")
}

// A port without a chain of its own falls to the chains by ALPN, as
// before: the HTTP ALPN gets the HTTP manager; istio, or none, the TCP
// chain, which carries the caller's bytes (its XFCC too) as sent. Only a
// port chain closes that, which is why the federator sends one per
// declared port.
func TestInboundPortWithoutChainMatchesByALPN(t *testing.T) {
	m := startPortMesh(t)
	addr := m.b.endpoint(ipOther).String()
	for _, tc := range []struct {
		name     string
		h2       bool
		alpn     []string
		wantXFCC []string
	}{
		{"istio-http/1.1", false, []string{alpnHTTP1}, []string{m.wantXFCC}},
		{"istio-h2", true, []string{alpnHTTP2}, []string{m.wantXFCC}},
		{"istio: TCP", false, []string{"istio"}, []string{forgedXFCC}},
		{"no ALPN: TCP", true, nil, []string{forgedXFCC}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, reply := getInbound(t, addr, m.caller, tc.h2, tc.alpn...)
			require.Equal(t, http.StatusOK, code)
			require.Equal(t, "b-other", reply.Pod)
			require.Equal(t, tc.wantXFCC, reply.XFCC)
		})
	}
	require.EqualValues(t, 4, m.other.requests.Load())
	require.EqualValues(t, 2, metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total", "listener=inbound", "cluster=inbound-passthrough", "code=200"),
		"the HTTP manager saw the two with the HTTP ALPN")
}

// A port whose only chain lists the HTTP ALPN refuses a caller that
// offers another, or none, as Envoy does: no_chain, never the chains of
// any port.
func TestInboundPortChainWithoutTheOfferedALPNRefuses(t *testing.T) {
	m := startPortMesh(t)
	addr := m.b.endpoint(ipStrict).String()
	for _, alpn := range [][]string{{"istio"}, nil, {"h2", "http/1.1"}} {
		t.Run(alpnName(alpn), func(t *testing.T) {
			c, err := dialInbound(t, addr, m.caller, alpn...)
			if err == nil {
				// The handshake failed on the server's side first;
				// the client sees it on its first read.
				defer c.Close()
				_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
				_, err = c.Read(make([]byte, 1))
			}
			require.Error(t, err)
		})
	}
	require.Eventually(t, func() bool {
		return metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound", "reason=no_chain") == 3
	}, waitFor, 10*time.Millisecond, "every refusal is counted as no_chain")
	require.Zero(t, m.strict.requests.Load(), "nothing reached the app")
	require.Zero(t, m.b.tcp.accepted.Load())

	// Offering the chain's ALPN gets its HTTP manager.
	code, reply := getInbound(t, addr, m.caller, false, alpnHTTP1)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "b-strict", reply.Pod)
	require.Equal(t, []string{m.wantXFCC}, reply.XFCC)
}
