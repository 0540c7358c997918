package sidecar

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// PeerAuthentication PERMISSIVE on the inbound listener: beside the TLS
// chains, plaintext ones (transport_protocol "raw_buffer", no
// transport_socket), matched as Envoy matches them: destination port,
// then transport, then ALPN, never going back. A plaintext caller has no
// identity: RBAC sees it unauthenticated, and its requests carry no
// X-Forwarded-Client-Cert.

// plaintext is fc made a raw_buffer chain, as Istio sends one for a
// PERMISSIVE port: the same filters, no TLS, no ALPN.
func plaintext(fc *listenerv3.FilterChain) *listenerv3.FilterChain {
	fc.FilterChainMatch.TransportProtocol = "raw_buffer"
	fc.FilterChainMatch.ApplicationProtocols = nil
	fc.TransportSocket = nil
	return fc
}

// permissiveMesh is a mesh whose b is PERMISSIVE on its HTTP and TCP
// apps' ports and on any undeclared port, and STRICT on strict's port.
type permissiveMesh struct {
	*rbacMesh
	strict *backend
	// callerCert is alpha's demo/caller SVID, wantXFCC what b sets for
	// it.
	callerCert tls.Certificate
	wantXFCC   string
}

// startPermissiveMesh starts the mesh with both pods' Configs edited
// (nil: none); its inbound chains are permissiveChains(nil, nil, true).
func startPermissiveMesh(t *testing.T, edit func(*Config)) *permissiveMesh {
	t.Helper()
	m := &permissiveMesh{rbacMesh: &rbacMesh{mesh: startMeshWith(t, edit)}}
	m.strict = startHTTPBackend(t, "b-strict")
	m.b.setApp(ipStrict, m.strict.addr)
	m.setInbound(t, "v1", m.permissiveChains(t, nil, nil, true)...)
	m.a.waitReady(t, "")
	m.httpAddr, m.tcpAddr = m.b.endpoint(ipHTTP).String(), m.b.endpoint(ipTCP).String()
	caller := m.alpha.svid(t, m.alpha.id("demo", "caller"))
	m.callerCert = tlsCert(caller)
	sum := sha256.Sum256(caller.Certificates[0].Raw)
	m.wantXFCC = "By=" + m.b.id.String() + ";Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + caller.ID.String()
	return m
}

// permissiveChains are b's inbound chains: for its HTTP app's port and
// its TCP app's port a TLS chain and a plaintext one, for strict's port
// a TLS chain alone, then the two TLS chains by ALPN of any port and,
// with anyPlain, a plaintext TCP chain of any port; the network RBAC
// filters nf on every chain, the HTTP RBAC filters hf and normalize_path
// in every connection manager, as the federator sends them.
func (m *permissiveMesh) permissiveChains(t *testing.T, nf []*listenerv3.Filter, hf []*hcmv3.HttpFilter, anyPlain bool) []*listenerv3.FilterChain {
	httpChain := func(port uint16, alpn ...string) *listenerv3.FilterChain {
		return withNormalizePath(t, withHTTPRBAC(t, withRBACFilters(inboundChain(t, port, true, alpn...), nf), hf))
	}
	tcpChain := func(port uint16) *listenerv3.FilterChain {
		return withRBACFilters(inboundChain(t, port, false), nf)
	}
	chains := []*listenerv3.FilterChain{
		httpChain(m.b.http.addr.Port()),
		plaintext(httpChain(m.b.http.addr.Port())),
		tcpChain(m.b.tcp.addr.Port()),
		plaintext(tcpChain(m.b.tcp.addr.Port())),
		httpChain(m.strict.addr.Port()),
		httpChain(0, alpnHTTP1, alpnHTTP2),
		tcpChain(0),
	}
	if anyPlain {
		chains = append(chains, plaintext(tcpChain(0)))
	}
	return chains
}

// dialPlain is a plaintext TCP connection to addr.
func dialPlain(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitFor)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitFor))
	return c
}

// getPlain sends one GET for path with a forged XFCC, in plaintext
// HTTP/1.1 or h2c with prior knowledge, to addr, and returns the status
// and the body.
func getPlain(t testing.TB, addr string, h2 bool, path string) (int, string) {
	t.Helper()
	var protos http.Protocols
	if h2 {
		protos.SetUnencryptedHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	tr := &http.Transport{Protocols: &protos, DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{Timeout: waitFor}).DialContext(ctx, "tcp", addr)
		}}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://echo.demo.svc.cluster.local"+path, nil)
	require.NoError(t, err)
	req.Header.Set(xfccHeader, forgedXFCC)
	resp, err := tr.RoundTrip(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// requirePlainEcho requires a plaintext GET of path to addr to reach
// b's HTTP app in the protocol sent, without an XFCC header.
func requirePlainEcho(t *testing.T, addr string, h2 bool, path string) {
	t.Helper()
	code, body := getPlain(t, addr, h2, path)
	require.Equal(t, http.StatusOK, code, body)
	var reply echoReply
	require.NoError(t, json.Unmarshal([]byte(body), &reply), body)
	require.Equal(t, "b", reply.Pod)
	require.Equal(t, path, reply.Path)
	require.Equal(t, map[bool]string{false: "HTTP/1.1", true: "HTTP/2.0"}[h2], reply.Proto)
	require.Empty(t, reply.XFCC, "the caller's XFCC is removed and none is set: it has no certificate")
}

// requirePlainRefused requires a plaintext connection to addr to be
// closed with nothing answered, whatever it sends.
func requirePlainRefused(t *testing.T, addr string) {
	t.Helper()
	c := dialPlain(t, addr)
	_, _ = io.WriteString(c, "GET / HTTP/1.1\r\n"+echoHostLine+"\r\n")
	n, err := c.Read(make([]byte, 1))
	require.Zero(t, n, "nothing answers")
	require.Error(t, err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection is closed, not left open")
}

func (m *permissiveMesh) refusals(t *testing.T, reason string) float64 {
	return metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound", "reason="+reason)
}

// On a PERMISSIVE HTTP port a plaintext HTTP/1.1 or h2c caller reaches
// the app through the raw_buffer chain's connection manager, on every
// inbound HTTP path, its forged XFCC removed and none set; an mTLS
// caller on the same port still gets the TLS chain and its XFCC.
func TestPlaintextInboundHTTP(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
	}{
		{"own codecs", nil},
		{"net/http", func(c *Config) { c.NetHTTP1, c.NetHTTP2 = true, true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := startPermissiveMesh(t, tc.edit)
			requirePlainEcho(t, m.httpAddr, false, "/h1")
			requirePlainEcho(t, m.httpAddr, true, "/h2c")

			// Bytes as a client sends them, keep-alive: two requests
			// on one connection, the XFCC sent in another case.
			h := dialPlainH1Raw(t, m.httpAddr)
			for _, path := range []string{"/one", "/two"} {
				resp, body := h.roundTrip("GET " + path + " HTTP/1.1\r\n" + echoHostLine + "x-forwarded-client-cert: " + forgedXFCC + "\r\n\r\n")
				requireServed(t, resp, body, path)
				require.NotContains(t, body, "evil")
			}

			for _, h2 := range []bool{false, true} {
				code, reply := getInbound(t, m.httpAddr, m.callerCert, h2)
				require.Equal(t, http.StatusOK, code)
				require.Equal(t, []string{m.wantXFCC}, reply.XFCC, "mTLS on the same port: the TLS chain")
			}
			require.EqualValues(t, 6, m.b.http.requests.Load())
			require.EqualValues(t, 6, metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total",
				"listener=inbound", "cluster=inbound-passthrough", "code=200"), "every request went through b's connection managers")
			require.EqualValues(t, -1, metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound"))
		})
	}
}

// dialPlainH1Raw is h1Raw over a plaintext connection.
func dialPlainH1Raw(t *testing.T, addr string) *h1Raw {
	c := dialPlain(t, addr)
	return &h1Raw{t: t, c: c, r: bufio.NewReader(c)}
}

// Path normalization applies to a plaintext caller's requests as to an
// mTLS one's: the app gets the normalized path, and one that cannot be
// is answered 400.
func TestPlaintextInboundNormalizesPaths(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	require.True(t, m.b.proxy.state.Load().cfg.Sidecar.Inbound.Chains[1].HTTP.NormalizePath)
	h := dialPlainH1Raw(t, m.httpAddr)
	resp, body := h.roundTrip("GET /a/../b/./c?x HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/b/c")
	require.Equal(t, "/b/c?x", *m.b.http.lastTarget.Load())
	resp, body = h.roundTrip("GET /a%zz HTTP/1.1\r\n" + echoHostLine + "\r\n")
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	require.EqualValues(t, 1, m.b.http.requests.Load())
}

// On a PERMISSIVE TCP port a plaintext caller's bytes reach the app as
// sent (the tcp_proxy), both ways, with half-close; so do an mTLS
// caller's.
func TestPlaintextInboundTCP(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	c := dialPlain(t, m.tcpAddr)
	payload := "GET / HTTP/1.1\r\n" + xfccHeader + ": " + forgedXFCC + "\r\n\r\n" + strings.Repeat("\x00plain\xff", 5000)
	go func() {
		_, _ = io.WriteString(c, payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	require.Equal(t, payload, string(got), "the echo app got the bytes as sent, and closed after the caller's end")
	tcpEchoes(t, m.tcpAddr, m.callerCert)
	require.EqualValues(t, 2, m.b.tcp.accepted.Load())
	require.EqualValues(t, -1, metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total", "listener=inbound"), "no HTTP manager saw them")
}

// A port whose chains are all TLS is STRICT: a plaintext caller is
// refused (no_chain) although the chains of any port have a plaintext
// one, as Envoy never goes back from the port's chains; an mTLS caller
// is served. A port without chains of its own takes any port's
// plaintext chain.
func TestPlaintextInboundStrictPort(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	strictAddr := m.b.endpoint(ipStrict).String()
	requirePlainRefused(t, strictAddr)
	requirePlainRefused(t, strictAddr)
	require.Eventually(t, func() bool { return m.refusals(t, ReasonNoChain) == 2 }, waitFor, 10*time.Millisecond)
	require.Zero(t, m.strict.requests.Load(), "nothing reached the app")

	code, reply := getInbound(t, strictAddr, m.callerCert, false)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "b-strict", reply.Pod)
	require.Equal(t, []string{m.wantXFCC}, reply.XFCC)

	// An undeclared port: any port's plaintext TCP chain carries the
	// bytes, the forged XFCC too (a TCP chain reads nothing).
	other := startHTTPBackend(t, "b-other")
	m.b.setApp(ipOther, other.addr)
	code, body := getPlain(t, m.b.endpoint(ipOther).String(), false, "/")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `"pod":"b-other"`)
	require.Contains(t, body, "evil")

	// Without it, every undeclared port is STRICT.
	m.setInbound(t, "v2", m.permissiveChains(t, nil, nil, false)...)
	requirePlainRefused(t, m.b.endpoint(ipOther).String())
	require.Eventually(t, func() bool { return m.refusals(t, ReasonNoChain) == 3 }, waitFor, 10*time.Millisecond)
	require.EqualValues(t, 1, other.requests.Load())
}

// TLS on a PERMISSIVE port is the TLS chain's, which still requires a
// client certificate: a caller without one is refused (handshake), as
// is one that sends nothing before the handshake timeout (a
// server-first protocol cannot be told apart).
func TestPlaintextInboundTLSStillMutual(t *testing.T) {
	m := startPermissiveMesh(t, func(c *Config) { c.HandshakeTimeout = 300 * time.Millisecond })
	for _, addr := range []string{m.httpAddr, m.tcpAddr} {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
		if err == nil {
			// TLS 1.3: the client's handshake ends before the server
			// checks its (missing) certificate.
			_ = c.SetDeadline(time.Now().Add(waitFor))
			_, _ = io.WriteString(c, "GET / HTTP/1.1\r\n"+echoHostLine+"\r\n")
			_, err = c.Read(make([]byte, 1))
			_ = c.Close()
		}
		require.Error(t, err)
	}
	require.Eventually(t, func() bool { return m.refusals(t, ReasonHandshake) == 2 }, waitFor, 10*time.Millisecond)

	silent := dialPlain(t, m.httpAddr)
	start := time.Now()
	n, err := silent.Read(make([]byte, 1))
	require.Zero(t, n)
	require.Error(t, err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the sidecar closed it")
	require.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond, "after the handshake timeout")
	require.Eventually(t, func() bool { return m.refusals(t, ReasonHandshake) == 3 }, waitFor, 10*time.Millisecond)
	require.Zero(t, m.b.http.requests.Load())
	require.Zero(t, m.b.tcp.accepted.Load())
}

// principalsOf is an RBAC policy's principals naming ids (Istio's
// principals) and, with notIDs, not_id of each (notPrincipals).
func principalsOf(ids []string, notIDs ...string) []*rbacv3.Principal {
	var prins []*rbacv3.Principal
	for _, id := range ids {
		prins = append(prins, rbacExact(id))
	}
	for _, id := range notIDs {
		prins = append(prins, &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: rbacExact(id)}})
	}
	return prins
}

// Network RBAC decides a plaintext connection as an unauthenticated
// caller's: an ALLOW naming principals refuses it (rbac) before a byte
// reaches the app, and one with notPrincipals matches it.
func TestPlaintextInboundNetworkRBAC(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	_, callerID := m.caller(t, "caller")
	allowCaller := []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), principalsOf([]string{callerID})...))}
	m.setInbound(t, "v2", m.permissiveChains(t, allowCaller, nil, true)...)
	requirePlainRefused(t, m.httpAddr)
	requirePlainRefused(t, m.tcpAddr)
	m.requireRBACRefusals(t, 2)
	tcpEchoes(t, m.tcpAddr, m.callerCert)
	code, _ := getInbound(t, m.httpAddr, m.callerCert, false)
	require.Equal(t, http.StatusOK, code, "the named caller, over mTLS, is served")

	// A namespace or trust domain principal (a pattern) needs a
	// certificate just as much.
	ns := &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
		PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: `.*`}}}}}}
	m.setInbound(t, "v3", m.permissiveChains(t, []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), ns))}, nil, true)...)
	requirePlainRefused(t, m.tcpAddr)
	m.requireRBACRefusals(t, 3)

	// notPrincipals: anyone but one ID, which a plaintext caller is.
	notOther := []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), principalsOf(nil, m.alpha.id("demo", "other").String())...))}
	m.setInbound(t, "v4", m.permissiveChains(t, notOther, nil, true)...)
	requirePlainEcho(t, m.httpAddr, false, "/not-principals")
	c := dialPlain(t, m.tcpAddr)
	echoOn(t, c, "allowed")
	m.requireRBACRefusals(t, 3)
	require.EqualValues(t, 2, m.b.tcp.accepted.Load())
}

// HTTP RBAC decides a plaintext caller's requests as an unauthenticated
// caller's, on both protocols: an ALLOW naming principals answers 403,
// a DENY with notPrincipals (Istio's "deny requests without an
// identity") answers 403 to the plaintext caller and serves the mTLS
// one.
func TestPlaintextInboundHTTPRBAC(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	_, callerID := m.caller(t, "caller")
	m.setInbound(t, "v2", m.permissiveChains(t, nil, allowHTTP(t, callerID), true)...)
	for _, h2 := range []bool{false, true} {
		code, body := getPlain(t, m.httpAddr, h2, "/")
		require.Equal(t, http.StatusForbidden, code)
		require.Equal(t, "RBAC: access denied", body)
	}
	code, _ := getInbound(t, m.httpAddr, m.callerCert, true)
	require.Equal(t, http.StatusOK, code)

	anyID := &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
		PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: `.+`}}}}}}
	denyUnauthenticated := []*hcmv3.HttpFilter{httpRBACFilter(t, rbacv3.RBAC_DENY, rbacPolicies(rbacPath(prefixed("/admin/")),
		&rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: anyID}}))}
	m.setInbound(t, "v3", m.permissiveChains(t, nil, denyUnauthenticated, true)...)
	for _, h2 := range []bool{false, true} {
		code, body := getPlain(t, m.httpAddr, h2, "/admin/x")
		require.Equal(t, http.StatusForbidden, code, body)
		requirePlainEcho(t, m.httpAddr, h2, "/public")
	}
	code, reply := getInbound(t, m.httpAddr, m.callerCert, false)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "b", reply.Pod)
	require.EqualValues(t, 4, metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound", "reason=rbac"))
	require.EqualValues(t, 4, m.b.http.requests.Load())
}

// A new configuration re-decides the open plaintext connections as
// raw_buffer ones: when their port becomes STRICT (its plaintext chain
// dropped), a TCP one is closed (no_chain) and an idle HTTP one closes
// as a drain closes it; a new network RBAC that needs an identity cuts
// one (rbac). The mTLS connections on the same ports stay.
func TestPlaintextInboundRevoked(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	tcpPlain := dialPlain(t, m.tcpAddr)
	echoOn(t, tcpPlain, "before")
	httpPlain := dialPlainH1Raw(t, m.httpAddr)
	resp, body := httpPlain.roundTrip("GET /before HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/before")
	tcpTLS, err := dialInbound(t, m.tcpAddr, m.callerCert)
	require.NoError(t, err)
	defer tcpTLS.Close()
	echoOn(t, tcpTLS, "before")

	// Another configuration that leaves their chains as they are (the
	// strict port's is gone) keeps them.
	chains := m.permissiveChains(t, nil, nil, true)
	m.setInbound(t, "v2", chains[0], chains[1], chains[2], chains[3], chains[5], chains[6], chains[7])
	echoOn(t, tcpPlain, "kept")
	resp, body = httpPlain.roundTrip("GET /kept HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/kept")

	// The ports become STRICT: no plaintext chain of theirs, the any
	// port one left (never gone back to).
	chains = m.permissiveChains(t, nil, nil, true)
	m.setInbound(t, "v3", chains[0], chains[2], chains[4], chains[5], chains[6], chains[7])
	requireCutPlain(t, tcpPlain)
	httpPlain.requireClosed()
	echoOn(t, tcpTLS, "after")
	require.Eventually(t, func() bool { return m.refusals(t, ReasonNoChain) == 1 }, waitFor, 10*time.Millisecond,
		"the TCP connection counted once, no_chain; the HTTP one drained")
	requirePlainRefused(t, m.tcpAddr)

	// PERMISSIVE again, then an ALLOW naming a principal: the open
	// plaintext connection is cut (rbac); the named mTLS caller's stays.
	m.setInbound(t, "v4", m.permissiveChains(t, nil, nil, true)...)
	tcpPlain = dialPlain(t, m.tcpAddr)
	echoOn(t, tcpPlain, "again")
	_, callerID := m.caller(t, "caller")
	m.setInbound(t, "v5", m.permissiveChains(t, allowNetwork(t, callerID), nil, true)...)
	requireCutPlain(t, tcpPlain)
	m.requireRBACRefusals(t, 1)
	echoOn(t, tcpTLS, "still")
}

// requireCutPlain requires the sidecar to close c, sending nothing more.
func requireCutPlain(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(waitFor))
	n, err := c.Read(make([]byte, 1))
	require.Zero(t, n, "nothing more comes")
	require.Error(t, err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection is closed, not left open")
}

// The config dump shows each inbound chain's transport_protocol, and no
// secrets on a plaintext one.
func TestPlaintextInboundConfigDump(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	_, body := httpGet(t, "http://"+m.b.proxy.AdminAddr().String()+"/config_dump")
	var dump struct {
		Listeners []struct {
			Name   string `json:"name"`
			Chains []struct {
				DestinationPort   uint16  `json:"destination_port"`
				TransportProtocol string  `json:"transport_protocol"`
				CertSecret        *string `json:"tls_certificate_sds_secret"`
				HTTP              any     `json:"http_connection_manager"`
			} `json:"filter_chains"`
		} `json:"listeners"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &dump), body)
	require.Equal(t, xdsclient.InboundListenerName, dump.Listeners[1].Name)
	in := dump.Listeners[1].Chains
	require.Len(t, in, 8)
	for i, want := range []string{"tls", "raw_buffer", "tls", "raw_buffer", "tls", "tls", "tls", "raw_buffer"} {
		require.Equal(t, want, in[i].TransportProtocol, "chain %d", i)
		require.Equal(t, want == "tls", in[i].CertSecret != nil, "chain %d", i)
	}
	require.Equal(t, m.b.http.addr.Port(), in[1].DestinationPort)
	require.NotNil(t, in[1].HTTP)
}

// A request in flight when its chain goes (its port made STRICT) may
// finish, but not forever: as Envoy's drain time ends a drain, the
// connection is closed Config.DrainTimeout after the change (no_chain),
// a streaming response cut with it.
func TestRetiringConnectionClosedAfterDrainTimeout(t *testing.T) {
	const drain = 300 * time.Millisecond
	m := startPermissiveMesh(t, func(c *Config) { c.DrainTimeout = drain })
	c := dialPlain(t, m.httpAddr)
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	_, err := io.WriteString(c, "GET /stream?n=500&every=20ms HTTP/1.1\r\n"+echoHostLine+"\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	rd := bufio.NewReader(resp.Body)
	_, err = rd.ReadString('\n')
	require.NoError(t, err, "the stream started")

	chains := m.permissiveChains(t, nil, nil, true)
	m.setInbound(t, "v2", chains[0], chains[2], chains[4], chains[5], chains[6])
	strictAt := time.Now()
	for time.Since(strictAt) < 10*time.Second {
		if _, err = rd.ReadString('\n'); err != nil {
			break
		}
	}
	require.Error(t, err, "the stream was cut")
	require.Less(t, time.Since(strictAt), 5*time.Second, "cut at the drain timeout (%v), not when the stream ended (10 s)", drain)
	require.Eventually(t, func() bool { return m.refusals(t, ReasonNoChain) == 1 }, waitFor, 10*time.Millisecond,
		"counted once, no_chain")
}
