package sidecar

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Addresses in RBAC, as Istio writes ipBlocks (direct_remote_ip),
// remoteIpBlocks (remote_ip) and destination.ip (destination_ip): the
// peer address is the inbound socket's remote address, the destination
// the connection's original destination (10.0.0.1 in these tests: the
// pods' OriginalDst). Callers bind distinct loopback addresses, so each
// rule meets an address the test chose.

var (
	// srcIn and srcOut are the two callers' source addresses.
	srcIn  = netip.MustParseAddr("127.0.0.7")
	srcOut = netip.MustParseAddr("127.0.0.8")
)

func rbacCIDR(addr string, bits uint32) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: addr, PrefixLen: wrapperspb.UInt32(bits)}
}

func rbacDirectRemoteIP(addr string, bits uint32) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: rbacCIDR(addr, bits)}}
}

func rbacRemoteIP(addr string, bits uint32) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: rbacCIDR(addr, bits)}}
}

func rbacDestinationIP(addr string, bits uint32) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: rbacCIDR(addr, bits)}}
}

// allowFrom is a chain's network ALLOW filter for callers whose peer
// address is in addr/bits (Istio's ipBlocks).
func allowFrom(t *testing.T, addr string, bits uint32) []*listenerv3.Filter {
	return []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), rbacDirectRemoteIP(addr, bits)))}
}

// dialerFrom dials from src.
func dialerFrom(src netip.Addr) *net.Dialer {
	if !src.IsValid() {
		return &net.Dialer{Timeout: waitFor}
	}
	return &net.Dialer{Timeout: waitFor, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
}

// dialInboundFrom is dialInbound from the source address src (any,
// when src is the zero Addr).
func dialInboundFrom(t testing.TB, src netip.Addr, addr string, cert tls.Certificate, alpn ...string) (*tls.Conn, error) {
	t.Helper()
	c, err := tls.DialWithDialer(dialerFrom(src), "tcp", addr, &tls.Config{
		InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}, NextProtos: alpn})
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(waitFor))
	return c, nil
}

// tcpEchoesFrom is tcpEchoes from src.
func tcpEchoesFrom(t *testing.T, src netip.Addr, addr string, cert tls.Certificate) {
	t.Helper()
	c, err := dialInboundFrom(t, src, addr, cert)
	require.NoError(t, err)
	defer c.Close()
	echoOn(t, c, strings.Repeat("from "+src.String()+" ", 100))
}

// requireRBACRefusedFrom is requireRBACRefused from src.
func requireRBACRefusedFrom(t *testing.T, src netip.Addr, addr string, cert tls.Certificate) {
	t.Helper()
	c, err := dialInboundFrom(t, src, addr, cert)
	if err == nil {
		defer c.Close()
		_, _ = io.WriteString(c, "GET / HTTP/1.1\r\n"+echoHostLine+"\r\n")
		var n int
		n, err = c.Read(make([]byte, 1))
		require.Zero(t, n, "nothing answers a denied caller")
	}
	require.Error(t, err)
}

// newInboundClientFrom is newInboundClient from src (any, when src is
// the zero Addr).
func newInboundClientFrom(t *testing.T, src netip.Addr, addr string, cert tls.Certificate, h2 bool) *inboundClient {
	c := &inboundClient{t: t}
	var protos http.Protocols
	if h2 {
		protos.SetUnencryptedHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	c.tr = &http.Transport{Protocols: &protos, MaxConnsPerHost: 1,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			c.dials.Add(1)
			return dialInboundFrom(t, src, addr, cert)
		}}
	t.Cleanup(c.tr.CloseIdleConnections)
	return c
}

// dialH1RawFrom is dialH1Raw from src.
func dialH1RawFrom(t *testing.T, src netip.Addr, addr string, cert tls.Certificate) *h1Raw {
	c, err := dialInboundFrom(t, src, addr, cert)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return &h1Raw{t: t, c: c, r: bufio.NewReader(c)}
}

// Istio's ipBlocks on a connection: a network ALLOW of a range lets in
// the callers whose peer address is in it, over the TLS chains of the
// TCP and the HTTP port (both protocols), and refuses the others before
// a byte reaches the app; /32 tells two loopback callers apart.
func TestInboundRBACDirectRemoteIP(t *testing.T) {
	m := startRevokeMesh(t, nil)
	cert, _ := m.caller(t, "caller")

	m.setInbound(t, "v2", m.rbacChains(t, allowFrom(t, "10.0.0.0", 8), nil)...)
	requireRBACRefusedFrom(t, srcIn, m.tcpAddr, cert)
	requireRBACRefusedFrom(t, srcIn, m.httpAddr, cert)
	m.requireRBACRefusals(t, 2)
	require.Zero(t, m.b.tcp.accepted.Load(), "a caller outside 10.0.0.0/8 never reached the TCP app")
	require.Zero(t, m.b.http.requests.Load())

	m.setInbound(t, "v3", m.rbacChains(t, allowFrom(t, "127.0.0.0", 8), nil)...)
	tcpEchoesFrom(t, srcIn, m.tcpAddr, cert)
	for _, h2 := range []bool{false, true} {
		c := newInboundClientFrom(t, srcIn, m.httpAddr, cert, h2)
		resp, body := c.do("GET", "/loopback", nil, nil)
		requireServed(t, resp, body, "/loopback")
	}

	m.setInbound(t, "v4", m.rbacChains(t, allowFrom(t, srcIn.String(), 32), nil)...)
	tcpEchoesFrom(t, srcIn, m.tcpAddr, cert)
	requireRBACRefusedFrom(t, srcOut, m.tcpAddr, cert)
	requireRBACRefusedFrom(t, srcOut, m.httpAddr, cert)
	m.requireRBACRefusals(t, 4)
	require.EqualValues(t, 2, m.b.tcp.accepted.Load())
	require.EqualValues(t, 2, m.b.http.requests.Load())
}

// Istio's remoteIpBlocks on an HTTP port: an HTTP DENY on remote_ip
// answers the caller at that address 403 on every HTTP path, request
// after request on its connection, and serves another caller. An
// X-Forwarded-For the caller sends does not choose the address: the
// connection managers trust no hop.
func TestInboundHTTPRBACRemoteIP(t *testing.T) {
	for _, tc := range inboundHTTPPaths {
		t.Run(tc.name, func(t *testing.T) {
			m := startRevokeMesh(t, tc.edit)
			cert, _ := m.caller(t, "caller")
			deny := []*hcmv3.HttpFilter{httpRBACFilter(t, rbacv3.RBAC_DENY, rbacPolicies(rbacAnyPermission(), rbacRemoteIP(srcOut.String(), 32)))}
			m.setInbound(t, "v2", m.rbacChains(t, nil, deny)...)

			out := newInboundClientFrom(t, srcOut, m.httpAddr, cert, tc.h2)
			for range 2 {
				resp, body := out.do("GET", "/denied", nil, http.Header{"X-Forwarded-For": {srcIn.String()}})
				requireDenied(t, resp, body)
			}
			require.EqualValues(t, 1, out.dials.Load(), "the connection serves on after a 403")
			in := newInboundClientFrom(t, srcIn, m.httpAddr, cert, tc.h2)
			resp, body := in.do("GET", "/served", nil, http.Header{"X-Forwarded-For": {srcOut.String()}})
			requireServed(t, resp, body, "/served")

			m.requireRBACRefusals(t, 2)
			require.EqualValues(t, 1, m.b.http.requests.Load(), "no denied request reached the app")
		})
	}
}

// Istio's when destination.ip: destination_ip matches the connection's
// original destination (10.0.0.1 here), in network RBAC and, with a
// path, in HTTP RBAC.
func TestInboundRBACDestinationIP(t *testing.T) {
	m := startRevokeMesh(t, nil)
	cert, _ := m.caller(t, "caller")
	allowTo := func(addr string, bits uint32) []*listenerv3.Filter {
		return []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacDestinationIP(addr, bits), &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}))}
	}
	denyAdminTo := []*hcmv3.HttpFilter{httpRBACFilter(t, rbacv3.RBAC_DENY, rbacPolicies(
		&rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
			rbacDestinationIP("10.0.0.0", 24), rbacPath(prefixed("/admin/"))}}}},
		&rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}))}

	m.setInbound(t, "v2", m.rbacChains(t, allowTo("10.0.0.1", 32), denyAdminTo)...)
	tcpEchoes(t, m.tcpAddr, cert)
	c := newInboundClient(t, m.httpAddr, cert, false)
	resp, body := c.do("GET", "/public", nil, nil)
	requireServed(t, resp, body, "/public")
	resp, body = c.do("GET", "/admin/users", nil, nil)
	requireDenied(t, resp, body)
	m.requireRBACRefusals(t, 1)

	m.setInbound(t, "v3", m.rbacChains(t, allowTo("10.0.0.2", 32), nil)...)
	requireRBACRefused(t, m.tcpAddr, cert)
	requireRBACRefused(t, m.httpAddr, cert)
	// The keep-alive connection is re-decided: closed, refused.
	m.requireRBACRefusals(t, 4)
	require.EqualValues(t, 1, m.b.tcp.accepted.Load())
	require.EqualValues(t, 1, m.b.http.requests.Load())
}

// A new configuration whose network RBAC no longer takes in a caller's
// address closes its open connections, TCP and HTTP, each counted;
// another caller's, still in the range, carries on.
func TestRevokeNetworkRBACByAddress(t *testing.T) {
	m := startRevokeMesh(t, nil)
	cert, _ := m.caller(t, "caller")
	m.setInbound(t, "v2", m.rbacChains(t, allowFrom(t, "127.0.0.0", 8), nil)...)

	tcp, err := dialInboundFrom(t, srcIn, m.tcpAddr, cert)
	require.NoError(t, err)
	defer tcp.Close()
	echoOn(t, tcp, "in, first")
	kept, err := dialInboundFrom(t, srcOut, m.tcpAddr, cert)
	require.NoError(t, err)
	defer kept.Close()
	echoOn(t, kept, "out, first")
	h := dialH1RawFrom(t, srcIn, m.httpAddr, cert)
	resp, body := h.roundTrip("GET /before HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/before")

	m.setInbound(t, "v3", m.rbacChains(t, allowFrom(t, srcOut.String(), 32), nil)...)
	m.requireRBACRefusals(t, 2)
	requireCut(t, tcp)
	h.requireClosed()
	echoOn(t, kept, "out, after the change")
	require.EqualValues(t, 2, m.b.tcp.accepted.Load(), "the kept connection is the same one")
	require.EqualValues(t, 1, m.b.http.requests.Load())
	m.requireRBACRefusals(t, 2)
}

// A plaintext caller (a PERMISSIVE port's raw_buffer chain) has no
// identity but has an address: ipBlocks decide it as they decide an
// mTLS caller.
func TestPlaintextInboundRBACByAddress(t *testing.T) {
	m := startPermissiveMesh(t, nil)
	m.setInbound(t, "v2", m.permissiveChains(t, allowFrom(t, srcIn.String(), 32), nil, true)...)

	c, err := dialerFrom(srcIn).Dial("tcp", m.tcpAddr)
	require.NoError(t, err)
	defer c.Close()
	echoOn(t, c, "plaintext, in range")

	refused, err := dialerFrom(srcOut).Dial("tcp", m.tcpAddr)
	require.NoError(t, err)
	defer refused.Close()
	_ = refused.SetDeadline(time.Now().Add(waitFor))
	_, _ = io.WriteString(refused, "hello")
	n, err := refused.Read(make([]byte, 1))
	require.Zero(t, n, "nothing answers")
	require.Error(t, err)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection is closed, not left open")

	m.requireRBACRefusals(t, 1)
	require.EqualValues(t, 1, m.b.tcp.accepted.Load())
}
