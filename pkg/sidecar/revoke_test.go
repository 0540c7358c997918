package sidecar

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// A new configuration's RBAC reaches the inbound connections already
// open (revoke.go): an HTTP request is decided by the current
// configuration's filters, a connection its network filters now deny is
// closed, and one whose chain is gone closes once its request in flight
// is answered.

// startRevokeMesh starts a mesh whose pods' Configs edit changes (nil:
// none), with the inbound chains of version v1: rbacChains(t, nil, nil).
func startRevokeMesh(t *testing.T, edit func(*Config)) *rbacMesh {
	t.Helper()
	m := &rbacMesh{mesh: startMeshWith(t, edit)}
	m.setInbound(t, "v1", m.rbacChains(t, nil, nil)...)
	m.a.waitReady(t, "")
	m.httpAddr, m.tcpAddr = m.b.endpoint(ipHTTP).String(), m.b.endpoint(ipTCP).String()
	return m
}

// rbacChains are b's inbound chains: its HTTP app's port, its TCP app's
// port, and the two by ALPN for any other, with the network RBAC filters
// nf on every chain and the HTTP RBAC filters hf in both connection
// managers.
func (m *rbacMesh) rbacChains(t *testing.T, nf []*listenerv3.Filter, hf []*hcmv3.HttpFilter) []*listenerv3.FilterChain {
	return []*listenerv3.FilterChain{
		withHTTPRBAC(t, withRBACFilters(inboundChain(t, m.b.http.addr.Port(), true), nf), hf),
		withRBACFilters(inboundChain(t, m.b.tcp.addr.Port(), false), nf),
		withHTTPRBAC(t, withRBACFilters(inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2), nf), hf),
		withRBACFilters(inboundChain(t, 0, false), nf),
	}
}

// setInbound serves version with b's inbound chains and waits until b
// adopted it.
func (m *rbacMesh) setInbound(t *testing.T, version string, chains ...*listenerv3.FilterChain) {
	t.Helper()
	snap := snapshot(t, version, []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
	m.xds.set(t, withInbound(t, snap, chains...))
	require.Eventually(t, func() bool {
		st := m.b.proxy.state.Load()
		return st != nil && st.cfg.Versions[resource.ListenerType] == version
	}, waitFor, 5*time.Millisecond, "b never adopted %s", version)
}

// allowHTTP is an HTTP connection manager's ALLOW filter for the callers
// ids.
func allowHTTP(t *testing.T, ids ...string) []*hcmv3.HttpFilter {
	prins := make([]*rbacv3.Principal, 0, len(ids))
	for _, id := range ids {
		prins = append(prins, rbacExact(id))
	}
	return []*hcmv3.HttpFilter{httpRBACFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), prins...))}
}

// allowNetwork is a chain's network ALLOW filter for the callers ids.
func allowNetwork(t *testing.T, ids ...string) []*listenerv3.Filter {
	prins := make([]*rbacv3.Principal, 0, len(ids))
	for _, id := range ids {
		prins = append(prins, rbacExact(id))
	}
	return []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), prins...))}
}

// requireCut requires the sidecar to close c, sending nothing more.
func requireCut(t *testing.T, c *tls.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(waitFor))
	n, err := c.Read(make([]byte, 1))
	require.Zero(t, n, "nothing more comes")
	require.Error(t, err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection is closed, not left open")
}

// echoOn sends a payload on c (TLS or plaintext), open to the TCP app,
// and requires its echo.
func echoOn(t *testing.T, c net.Conn, payload string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(waitFor))
	_, err := io.WriteString(c, payload)
	require.NoError(t, err)
	got := make([]byte, len(payload))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, payload, string(got))
}

// A keep-alive connection a caller's sidecar pools is decided again on
// every request by the configuration current then, on both protocols and
// on both of each one's paths: allowed, then refused (403) on the same
// connection once a new configuration's ALLOW no longer names the
// caller, then allowed again, without reconnecting.
func TestRevokeHTTPRBACOnOpenConnections(t *testing.T) {
	for _, tc := range inboundHTTPPaths {
		t.Run(tc.name, func(t *testing.T) {
			m := startRevokeMesh(t, tc.edit)
			cert, id := m.caller(t, "caller")
			_, other := m.caller(t, "other")
			m.setInbound(t, "v2", m.rbacChains(t, nil, allowHTTP(t, id, other))...)

			c := newInboundClient(t, m.httpAddr, cert, tc.h2)
			resp, body := c.do("GET", "/one", nil, nil)
			requireServed(t, resp, body, "/one")

			m.setInbound(t, "v3", m.rbacChains(t, nil, allowHTTP(t, other))...)
			resp, body = c.do("GET", "/two", nil, nil)
			requireDenied(t, resp, body)
			m.requireRBACRefusals(t, 1)

			m.setInbound(t, "v4", m.rbacChains(t, nil, allowHTTP(t, id))...)
			resp, body = c.do("GET", "/three", nil, nil)
			requireServed(t, resp, body, "/three")

			require.EqualValues(t, 1, c.dials.Load(), "one connection carried every request")
			require.EqualValues(t, 2, m.b.http.requests.Load(), "the refused request never reached the app")
			m.requireRBACRefusals(t, 1)
		})
	}
}

// A new configuration whose network RBAC denies a caller closes its open
// connections, TCP and HTTP alike, each counted as a refusal; another
// caller's connection, still allowed, carries on untouched.
func TestRevokeNetworkRBACOnOpenConnections(t *testing.T) {
	m := startRevokeMesh(t, nil)
	cert, id := m.caller(t, "caller")
	otherCert, other := m.caller(t, "other")
	m.setInbound(t, "v2", m.rbacChains(t, allowNetwork(t, id, other), nil)...)

	tcp, err := dialInbound(t, m.tcpAddr, cert)
	require.NoError(t, err)
	defer tcp.Close()
	echoOn(t, tcp, "caller, first")
	kept, err := dialInbound(t, m.tcpAddr, otherCert)
	require.NoError(t, err)
	defer kept.Close()
	echoOn(t, kept, "other, first")
	h := dialH1Raw(t, m.httpAddr, cert)
	resp, body := h.roundTrip("GET /before HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/before")
	require.EqualValues(t, 2, m.b.tcp.accepted.Load())

	m.setInbound(t, "v3", m.rbacChains(t, allowNetwork(t, other), nil)...)
	// Counted first: the TCP app would close the connection too, in
	// waitFor.
	m.requireRBACRefusals(t, 2)
	requireCut(t, tcp)
	h.requireClosed()
	echoOn(t, kept, "other, after the change")
	echoOn(t, kept, strings.Repeat("other, still ", 1000))
	require.EqualValues(t, 2, m.b.tcp.accepted.Load(), "the kept connection is the same one")
	require.EqualValues(t, 1, m.b.http.requests.Load())
	m.requireRBACRefusals(t, 2)
}

// dialInboundRawH2 is an HTTP/2 connection (prior knowledge) to addr
// frame by frame, its preface exchanged.
func dialInboundRawH2(t *testing.T, addr string, cert tls.Certificate) *rawH2 {
	t.Helper()
	c, err := dialInbound(t, addr, cert)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	r := &rawH2{c: c, fr: http2.NewFramer(c, c), peer: map[http2.SettingID]uint32{}}
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.enc = hpack.NewEncoder(&r.encBuf)
	_, err = io.WriteString(c, http2.ClientPreface)
	require.NoError(t, err)
	require.NoError(t, r.fr.WriteSettings())
	return r
}

// requireClosed reads frames until the sidecar closes the connection.
func (r *rawH2) requireClosed(t *testing.T) {
	t.Helper()
	_ = r.c.SetReadDeadline(time.Now().Add(waitFor))
	for {
		if _, err := r.fr.ReadFrame(); err != nil {
			require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection is closed, not left open")
			return
		}
	}
}

// A configuration in which b's HTTP port is a TCP port: the HTTP
// connections open to it close as a drain closes them, the request in
// flight answered first with Connection: close, an idle HTTP/1.1
// connection closed, an HTTP/2 one told GOAWAY; none is counted as
// refused. A TCP connection whose port is now HTTP is closed (no_chain):
// its bytes would no longer pass as they are.
func TestRevokeChainGoneClosesGracefully(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
	}{
		{"own codecs", nil},
		{"net/http", func(c *Config) { c.NetHTTP1, c.NetHTTP2 = true, true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := startRevokeMesh(t, tc.edit)
			cert, _ := m.caller(t, "caller")
			idle := dialH1Raw(t, m.httpAddr, cert)
			resp, body := idle.roundTrip("GET /idle HTTP/1.1\r\n" + echoHostLine + "\r\n")
			requireServed(t, resp, body, "/idle")
			busy := dialH1Raw(t, m.httpAddr, cert)
			_, err := io.WriteString(busy.c, "GET /slow?d=1s HTTP/1.1\r\n"+echoHostLine+"\r\n")
			require.NoError(t, err)
			h2 := dialInboundRawH2(t, m.httpAddr, cert)
			require.NoError(t, h2.writeHeaders(1, true, requestFields("GET", "echo.demo.svc.cluster.local", "/h2")))
			o := h2.readStream(t, 1)
			require.True(t, o.ended, "%+v", o)
			require.Equal(t, "200", o.status)
			tcp, err := dialInbound(t, m.tcpAddr, cert)
			require.NoError(t, err)
			defer tcp.Close()
			echoOn(t, tcp, "before")
			require.Eventually(t, func() bool { return m.b.http.requests.Load() == 3 }, waitFor, 5*time.Millisecond,
				"the slow request reached the app")

			// The ports swap kinds.
			m.setInbound(t, "v2",
				inboundChain(t, m.b.http.addr.Port(), false),
				inboundChain(t, m.b.tcp.addr.Port(), true),
				inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2),
				inboundChain(t, 0, false))

			resp, err = http.ReadResponse(busy.r, nil)
			require.NoError(t, err)
			b, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Equal(t, "slow done", string(b), "the request in flight is answered")
			require.True(t, resp.Close, "with Connection: close")
			busy.requireClosed()
			idle.requireClosed()
			if tc.edit == nil {
				o = h2.readStream(t, 3)
				require.True(t, o.goAway, "%+v", o)
				require.Equal(t, http2.ErrCodeNo, o.goAwayCode)
			}
			h2.requireClosed(t)
			requireCut(t, tcp)

			metrics := m.b.scrape(t)
			require.EqualValues(t, 1, metricValue(t, metrics, "isthmus_sidecar_refusals_total", "listener=inbound", "reason=no_chain"))
			require.EqualValues(t, -1, metricValue(t, metrics, "isthmus_sidecar_refusals_total", "listener=inbound", "reason=rbac"), "no refusal")
			require.EqualValues(t, 3, m.b.http.requests.Load())
		})
	}
}

// revokeBenchProxy is a proxy that serves nothing, with two
// configurations of an inbound listener like a pod's whose policies
// allow alpha's callers: 20 port chains (even ports HTTP, with an HTTP
// ALLOW filter; odd ones TCP, with a network one) and the two by ALPN.
func revokeBenchProxy(b *testing.B) (p *Proxy, st1, st2 *state) {
	ca := newTestCA(b, "alpha.mesh")
	prefix := &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://alpha.mesh/ns/demo/"}}
	policies := rbacPolicies(rbacAnyPermission(), rbacPrincipal(prefix))
	var chains []*listenerv3.FilterChain
	for port := uint16(8000); port < 8020; port++ {
		if port%2 == 0 {
			chains = append(chains, withHTTPRBAC(b, inboundChain(b, port, true), []*hcmv3.HttpFilter{httpRBACFilter(b, rbacv3.RBAC_ALLOW, policies)}))
		} else {
			chains = append(chains, withRBACFilters(inboundChain(b, port, false), []*listenerv3.Filter{rbacNetFilter(b, rbacv3.RBAC_ALLOW, policies)}))
		}
	}
	chains = append(chains, inboundChain(b, 0, true, alpnHTTP1, alpnHTTP2), inboundChain(b, 0, false))
	cfg := decoded(b, withInbound(b, snapshot(b, "v1", []*testCA{ca}, echoSvc), chains...))
	p = &Proxy{inConns: map[*inboundConn]struct{}{}, h1Conns: map[*h1Conn]struct{}{}, h2Conns: map[*h2Conn]struct{}{}}
	return p, &state{cfg: cfg, gen: 1}, &state{cfg: cfg, gen: 2}
}

// The peer and original destination addresses of the benchmarks'
// connections.
var (
	benchPeer = netip.MustParseAddr("10.1.2.3")
	benchDst  = netip.MustParseAddr("10.0.0.1")
)

// BenchmarkRBACNow is what an inbound HTTP request pays to find the
// RBAC that decides it: under the configuration its connection was
// accepted under, and under a newer one (the chain matched again).
func BenchmarkRBACNow(b *testing.B) {
	p, st1, st2 := revokeBenchProxy(b)
	l := st1.cfg.Sidecar.Inbound
	i := l.MatchIndex(8010, xdsclient.TransportTLS, nil)
	ch := &l.Chains[i]
	in := newInboundConn(nil, st1, ch, "spiffe://alpha.mesh/ns/demo/sa/caller", benchPeer, netip.AddrPortFrom(benchDst, 8010), "")
	ci := &connInfo{listener: listenerInbound, hcm: ch.HTTP, in: in}
	for _, tc := range []struct {
		name string
		st   *state
	}{{"accepted-config", st1}, {"new-config", st2}} {
		b.Run(tc.name, func(b *testing.B) {
			p.state.Store(tc.st)
			in.checked.Store(tc.st)
			b.ReportAllocs()
			for b.Loop() {
				if nw, h := p.rbacNow(ci); nw != nil || h.RBAC == nil {
					b.Fatal("not the chain's HTTP RBAC")
				}
			}
		})
	}
}

// BenchmarkRevokePass is the pass that re-decides 10,000 open inbound
// connections (half HTTP, half TCP, over 20 ports) after a configuration
// change, every one still allowed: off the configuration swap's path,
// which only wakes it.
func BenchmarkRevokePass(b *testing.B) {
	p, st1, st2 := revokeBenchProxy(b)
	l := st1.cfg.Sidecar.Inbound
	for n := range 10000 {
		port := uint16(8000 + n%20)
		in := newInboundConn(nil, st1, &l.Chains[l.MatchIndex(port, xdsclient.TransportTLS, nil)], "spiffe://alpha.mesh/ns/demo/sa/caller-"+strconv.Itoa(n%50),
			benchPeer, netip.AddrPortFrom(benchDst, port), "")
		p.inConns[in] = struct{}{}
	}
	var buf []*inboundConn
	gen := st2.gen
	b.ReportAllocs()
	for b.Loop() {
		gen++
		p.state.Store(&state{cfg: st2.cfg, gen: gen})
		buf = p.recheckAll(buf)
	}
	for in := range p.inConns {
		require.False(b, in.retiring.Load())
	}
}

// A connection retired by one configuration and cut by the next (or by
// its drain timer, then a configuration) is refused, and counted, once.
func TestRetiredThenCutCountedOnce(t *testing.T) {
	for _, timerFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("timer first %v", timerFirst), func(t *testing.T) {
			m := startRevokeMesh(t, func(c *Config) { c.DrainTimeout = 300 * time.Millisecond })
			cert, _ := m.caller(t, "caller")
			busy := dialH1Raw(t, m.httpAddr, cert)
			_, err := io.WriteString(busy.c, "GET /slow?d=3s HTTP/1.1\r\n"+echoHostLine+"\r\n")
			require.NoError(t, err)
			require.Eventually(t, func() bool { return m.b.http.requests.Load() == 1 }, waitFor, 5*time.Millisecond)
			// v2 turns the HTTP port's chain into a TCP one: retired.
			m.setInbound(t, "v2", inboundChain(t, m.b.http.addr.Port(), false), inboundChain(t, m.b.tcp.addr.Port(), true),
				inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2), inboundChain(t, 0, false))
			if timerFirst {
				time.Sleep(600 * time.Millisecond)
			}
			// v3's network RBAC denies it: cut.
			m.setInbound(t, "v3", withRBACFilters(inboundChain(t, m.b.http.addr.Port(), false), allowNetwork(t, "spiffe://alpha.mesh/ns/x/sa/nobody")),
				inboundChain(t, m.b.tcp.addr.Port(), true), inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2), inboundChain(t, 0, false))
			time.Sleep(time.Second)
			metrics := m.b.scrape(t)
			rbac := metricValue(t, metrics, "isthmus_sidecar_refusals_total", "listener=inbound", "reason=rbac")
			noChain := metricValue(t, metrics, "isthmus_sidecar_refusals_total", "listener=inbound", "reason=no_chain")
			require.Equal(t, 1.0, max(rbac, 0)+max(noChain, 0), "one connection, one refusal (rbac %v, no_chain %v)", rbac, noChain)
		})
	}
}
