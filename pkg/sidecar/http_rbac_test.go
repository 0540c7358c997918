package sidecar

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2/hpack"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Envoy's HTTP RBAC filter in the inbound HTTP connection manager, as
// Istio writes it for an HTTP port: decided per request, on every HTTP
// path, before anything of the request reaches the app; a denied request
// gets Envoy's 403 and the connection serves the next one.

func httpRBACFilter(tb testing.TB, action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: "envoy.filters.http.rbac", ConfigType: &hcmv3.HttpFilter_TypedConfig{
		TypedConfig: mustAny(tb, &httprbacv3.RBAC{Rules: &rbacv3.RBAC{Action: action, Policies: policies}})}}
}

func rbacHeader(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: name,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}}}}
}

func rbacPath(m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: m}}}}
}

func exactly(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

func prefixed(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: s}}
}

// withHTTPRBAC puts filters in front of the router of fc's connection
// manager.
func withHTTPRBAC(tb testing.TB, fc *listenerv3.FilterChain, filters []*hcmv3.HttpFilter) *listenerv3.FilterChain {
	f := fc.Filters[len(fc.Filters)-1]
	h := new(hcmv3.HttpConnectionManager)
	require.NoError(tb, f.GetTypedConfig().UnmarshalTo(h))
	h.HttpFilters = slices.Concat(filters, h.HttpFilters)
	f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tb, h)}
	return fc
}

// startHTTPRBACMesh starts a mesh whose pods' Configs edit changes
// (nil: none) and whose b has the HTTP RBAC filters filters on both its
// HTTP chains (the HTTP app's port, and the one by ALPN for any port).
func startHTTPRBACMesh(t *testing.T, edit func(*Config), filters func(tb testing.TB, m *mesh) []*hcmv3.HttpFilter) *rbacMesh {
	t.Helper()
	m := &rbacMesh{mesh: startMeshWith(t, edit)}
	f := filters(t, m.mesh)
	snap := snapshot(t, "v1", []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
	m.xds.set(t, withInbound(t, snap,
		withHTTPRBAC(t, inboundChain(t, m.b.http.addr.Port(), true), f),
		inboundChain(t, m.b.tcp.addr.Port(), false),
		withHTTPRBAC(t, inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2), f),
		inboundChain(t, 0, false),
	))
	m.a.waitReady(t, "v1")
	m.b.waitReady(t, "v1")
	require.NotNil(t, m.b.proxy.state.Load().cfg.Sidecar.Inbound.Chains[0].HTTP.RBAC, "b adopted the HTTP RBAC filters")
	m.httpAddr, m.tcpAddr = m.b.endpoint(ipHTTP).String(), m.b.endpoint(ipTCP).String()
	return m
}

// istioHTTPPolicies are an HTTP port's policies, Istio's DENY then ALLOW:
// nobody may DELETE or use /admin/; alpha's demo/caller may do anything
// else; demo/web only GET /public with the tenants a and b; nobody else
// anything.
func istioHTTPPolicies(tb testing.TB, m *mesh) []*hcmv3.HttpFilter {
	return []*hcmv3.HttpFilter{
		httpRBACFilter(tb, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"ns[demo]-policy[no-admin]-rule[0]": {
				Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
					rbacPath(prefixed("/admin/")), rbacHeader(":method", exactly("DELETE"))}}}}},
				Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
			},
		}),
		httpRBACFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"ns[demo]-policy[caller]-rule[0]": {Permissions: []*rbacv3.Permission{rbacAnyPermission()},
				Principals: []*rbacv3.Principal{rbacExact(m.alpha.id("demo", "caller").String())}},
			"ns[demo]-policy[web]-rule[0]": {
				Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
					rbacHeader(":method", exactly("GET")), rbacPath(exactly("/public")),
					rbacHeader("X-Tenant", exactly("a,b")), rbacHeader("host", prefixed("echo.demo."))}}}}},
				Principals: []*rbacv3.Principal{rbacExact(m.alpha.id("demo", "web").String())},
			},
		}),
	}
}

// inboundClient is a caller's HTTP client to addr that keeps its
// connections (HTTP/1.1 keep-alive, or one HTTP/2 connection with prior
// knowledge), counting them.
type inboundClient struct {
	t     *testing.T
	tr    *http.Transport
	dials atomic.Int32
}

func newInboundClient(t *testing.T, addr string, cert tls.Certificate, h2 bool) *inboundClient {
	return newInboundClientFrom(t, netip.Addr{}, addr, cert, h2)
}

// do sends a request for target with body (nil: none) and header, and
// returns the answer, its body read.
func (c *inboundClient) do(method, target string, body io.Reader, header http.Header) (*http.Response, string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(c.t.Context(), waitFor)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, "http://echo.demo.svc.cluster.local"+target, body)
	require.NoError(c.t, err)
	for k, vs := range header {
		req.Header[k] = vs
	}
	resp, err := c.tr.RoundTrip(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	return resp, string(b)
}

// requireDenied requires Envoy's answer to a request RBAC denies.
func requireDenied(t *testing.T, resp *http.Response, body string) {
	t.Helper()
	require.Equal(t, http.StatusForbidden, resp.StatusCode, body)
	require.Equal(t, "text/plain", resp.Header.Get("Content-Type"))
	require.Equal(t, "RBAC: access denied", body)
}

// requireServed requires the app's echo of a request for path.
func requireServed(t *testing.T, resp *http.Response, body, path string) {
	t.Helper()
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	var reply echoReply
	require.NoError(t, json.Unmarshal([]byte(body), &reply), body)
	require.Equal(t, "b", reply.Pod)
	require.Equal(t, path, reply.Path)
}

// inboundHTTPPaths are the sidecar's inbound HTTP paths: its own
// HTTP/1.1 and HTTP/2 codecs, and net/http's server for each
// (Config.NetHTTP1, NetHTTP2).
var inboundHTTPPaths = []struct {
	name string
	h2   bool
	edit func(*Config)
}{
	{"HTTP/1.1", false, nil},
	{"HTTP/2", true, nil},
	{"HTTP/1.1 on net/http", false, func(c *Config) { c.NetHTTP1 = true }},
	{"HTTP/2 on net/http", true, func(c *Config) { c.NetHTTP2 = true }},
}

// Each caller's requests are decided one by one over one connection, on
// both protocols and on both of each one's paths (the sidecar's codec,
// net/http's server): the DENY first (DELETE, /admin/ are denied even to
// the caller the ALLOW names), then the ALLOW (by principal, method,
// url_path without the query, the joined values of a repeated header,
// the authority). Only what is allowed reaches the app, each refusal is
// counted, and the connection serves on after a 403.
func TestInboundHTTPRBAC(t *testing.T) {
	for _, tc := range inboundHTTPPaths {
		t.Run(tc.name, func(t *testing.T) {
			m := startHTTPRBACMesh(t, tc.edit, istioHTTPPolicies)
			callerCert, _ := m.caller(t, "caller")
			webCert, _ := m.caller(t, "web")
			otherCert, _ := m.caller(t, "other")
			tenants := http.Header{"X-Tenant": {"a", "b"}}

			caller := newInboundClient(t, m.httpAddr, callerCert, tc.h2)
			resp, body := caller.do("GET", "/?q=1", nil, nil)
			requireServed(t, resp, body, "/")
			resp, body = caller.do("GET", "/admin/users", nil, nil)
			requireDenied(t, resp, body)
			resp, body = caller.do("DELETE", "/", nil, nil)
			requireDenied(t, resp, body)
			resp, body = caller.do("GET", "/next", nil, nil)
			requireServed(t, resp, body, "/next")
			require.EqualValues(t, 1, caller.dials.Load(), "one connection served every request")

			web := newInboundClient(t, m.httpAddr, webCert, tc.h2)
			resp, body = web.do("GET", "/public?next=/admin/", nil, tenants)
			requireServed(t, resp, body, "/public")
			resp, body = web.do("GET", "/public", nil, http.Header{"X-Tenant": {"a"}})
			requireDenied(t, resp, body)
			resp, body = web.do("GET", "/private", nil, tenants)
			requireDenied(t, resp, body)
			resp, body = web.do("POST", "/public", strings.NewReader("hello"), tenants)
			requireDenied(t, resp, body)
			resp, body = web.do("GET", "/public", nil, tenants)
			requireServed(t, resp, body, "/public")
			require.EqualValues(t, 1, web.dials.Load(), "one connection served every request")

			other := newInboundClient(t, m.httpAddr, otherCert, tc.h2)
			resp, body = other.do("GET", "/", nil, nil)
			requireDenied(t, resp, body)

			require.EqualValues(t, 4, m.b.http.requests.Load(), "only the allowed requests reached the app")
			m.requireRBACRefusals(t, 6)
			require.EqualValues(t, 6, metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total", "listener=inbound", "cluster=", "code=403"))
		})
	}
}

// h1Raw is one HTTP/1.1 connection to the inbound listener, written as
// bytes, read answer by answer.
type h1Raw struct {
	t *testing.T
	c net.Conn // TLS, or plaintext (dialPlainH1Raw)
	r *bufio.Reader
}

func dialH1Raw(t *testing.T, addr string, cert tls.Certificate) *h1Raw {
	c, err := dialInbound(t, addr, cert)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return &h1Raw{t: t, c: c, r: bufio.NewReader(c)}
}

// roundTrip writes raw and reads the answer.
func (h *h1Raw) roundTrip(raw string) (*http.Response, string) {
	h.t.Helper()
	_, err := io.WriteString(h.c, raw)
	require.NoError(h.t, err)
	resp, err := http.ReadResponse(h.r, nil)
	require.NoError(h.t, err)
	b, err := io.ReadAll(resp.Body)
	require.NoError(h.t, err)
	return resp, string(b)
}

// requireClosed requires the sidecar to close the connection.
func (h *h1Raw) requireClosed() {
	h.t.Helper()
	_ = h.c.SetReadDeadline(time.Now().Add(waitFor))
	_, err := h.r.ReadByte()
	require.ErrorIs(h.t, err, io.EOF)
}

const echoHostLine = "Host: echo.demo.svc.cluster.local\r\n"

// A denied HTTP/1.1 request's body never reaches the app. One all there
// with its head is skipped and the connection kept; one still coming
// (a length not all sent, or chunked) is never waited for: the answer
// says Connection: close and the connection closes after it, whole.
func TestInboundHTTPRBACBodies(t *testing.T) {
	m := startHTTPRBACMesh(t, nil, istioHTTPPolicies)
	cert, _ := m.caller(t, "caller")

	h := dialH1Raw(t, m.httpAddr, cert)
	resp, body := h.roundTrip("POST /admin/x HTTP/1.1\r\n" + echoHostLine + "Content-Length: 5\r\n\r\nhello")
	requireDenied(t, resp, body)
	require.False(t, resp.Close)
	resp, body = h.roundTrip("GET /after HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/after")

	h = dialH1Raw(t, m.httpAddr, cert)
	resp, body = h.roundTrip("POST /admin/x HTTP/1.1\r\n" + echoHostLine + "Content-Length: 100000\r\n\r\n" + strings.Repeat("x", 1000))
	requireDenied(t, resp, body)
	require.True(t, resp.Close, "the body is not waited for")
	h.requireClosed()

	h = dialH1Raw(t, m.httpAddr, cert)
	resp, body = h.roundTrip("POST /admin/x HTTP/1.1\r\n" + echoHostLine + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
	requireDenied(t, resp, body)
	require.True(t, resp.Close)
	h.requireClosed()

	// A denied HEAD gets the answer's head alone, and the connection
	// serves on.
	h = dialH1Raw(t, m.httpAddr, cert)
	_, err := io.WriteString(h.c, "HEAD /admin/x HTTP/1.1\r\n"+echoHostLine+"\r\n")
	require.NoError(t, err)
	resp, err = http.ReadResponse(h.r, &http.Request{Method: http.MethodHead})
	require.NoError(t, err)
	require.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.EqualValues(t, len("RBAC: access denied"), resp.ContentLength)
	resp, body = h.roundTrip("GET /after-head HTTP/1.1\r\n" + echoHostLine + "\r\n")
	requireServed(t, resp, body, "/after-head")

	// A denied request that asked for the connection to close has it.
	h = dialH1Raw(t, m.httpAddr, cert)
	resp, body = h.roundTrip("GET /admin/x HTTP/1.1\r\n" + echoHostLine + "Connection: close\r\n\r\n")
	requireDenied(t, resp, body)
	require.True(t, resp.Close)
	h.requireClosed()

	require.EqualValues(t, 2, m.b.http.requests.Load(), "only GET /after and /after-head reached the app")
	m.requireRBACRefusals(t, 5)
}

// A denied HTTP/2 request whose body is still coming is answered at
// once and its stream stopped; the connection's next stream is served.
func TestInboundHTTPRBACH2BodyStillComing(t *testing.T) {
	m := startHTTPRBACMesh(t, nil, istioHTTPPolicies)
	cert, _ := m.caller(t, "caller")
	c := newInboundClient(t, m.httpAddr, cert, true)
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() { _, _ = pw.Write([]byte(strings.Repeat("x", 1000))) }()
	resp, body := c.do("POST", "/admin/upload", pr, nil)
	requireDenied(t, resp, body)
	resp, body = c.do("GET", "/after", nil, nil)
	requireServed(t, resp, body, "/after")
	require.EqualValues(t, 1, c.dials.Load())
	require.EqualValues(t, 1, m.b.http.requests.Load())
	m.requireRBACRefusals(t, 1)
}

// An ALLOW filter without policies denies every request; the config dump
// shows each connection manager's HTTP RBAC filters, in order, with
// their policies.
func TestInboundHTTPRBACEmptyAllowAndDump(t *testing.T) {
	m := startHTTPRBACMesh(t, nil, func(tb testing.TB, m *mesh) []*hcmv3.HttpFilter {
		return append(istioHTTPPolicies(tb, m)[:1], httpRBACFilter(tb, rbacv3.RBAC_ALLOW, nil))
	})
	cert, _ := m.caller(t, "caller")
	for _, h2 := range []bool{false, true} {
		resp, body := newInboundClient(t, m.httpAddr, cert, h2).do("GET", "/", nil, nil)
		requireDenied(t, resp, body)
	}
	require.Zero(t, m.b.http.requests.Load())
	tcpEchoes(t, m.tcpAddr, cert) // the TCP chain has no RBAC

	_, body := httpGet(t, "http://"+m.b.proxy.AdminAddr().String()+"/config_dump")
	var dump struct {
		Listeners []struct {
			Chains []struct {
				HTTP *struct {
					RBAC []struct {
						Action     string   `json:"action"`
						StatPrefix string   `json:"stat_prefix"`
						Policies   []string `json:"policies"`
					} `json:"http_rbac"`
				} `json:"http_connection_manager"`
			} `json:"filter_chains"`
		} `json:"listeners"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &dump), body)
	httpChains := 0
	for i, ch := range dump.Listeners[1].Chains {
		if ch.HTTP == nil {
			continue
		}
		httpChains++
		require.Len(t, ch.HTTP.RBAC, 2, "chain %d", i)
		require.Equal(t, "DENY", ch.HTTP.RBAC[0].Action)
		require.Equal(t, []string{"ns[demo]-policy[no-admin]-rule[0]"}, ch.HTTP.RBAC[0].Policies)
		require.Equal(t, "ALLOW", ch.HTTP.RBAC[1].Action)
		require.Empty(t, ch.HTTP.RBAC[1].Policies)
		require.NotNil(t, ch.HTTP.RBAC[1].Policies, "an empty list, not null")
		require.Empty(t, ch.HTTP.RBAC[0].StatPrefix, "an HTTP filter has none")
	}
	require.NotZero(t, httpChains, "the inbound HTTP chains are dumped")
	for _, ch := range dump.Listeners[0].Chains {
		if ch.HTTP != nil {
			require.Empty(t, ch.HTTP.RBAC, "no RBAC outbound")
		}
	}
}

// Each HTTP path's view of a request's headers gives the RBAC matchers
// what Envoy's header map gives them: names matched whatever their case,
// a repeated header's values joined with "," in order (empty ones too),
// cookie crumbs with "; ", nothing for an absent header.
func TestRBACHeaderViews(t *testing.T) {
	fields := [][2]string{{"X-A", "1"}, {"Accept", "*/*"}, {"x-a", ""}, {"X-A", "3"}, {"Cookie", "a=1"}, {"cookie", "b=2"}, {"X-One", "v"}}
	raw := "GET / HTTP/1.1\r\nHost: h\r\n"
	var h2 []hpack.HeaderField
	nh := http.Header{}
	for _, f := range fields {
		raw += f[0] + ": " + f[1] + "\r\n"
		h2 = append(h2, hpack.HeaderField{Name: strings.ToLower(f[0]), Value: f[1]})
		nh.Add(f[0], f[1])
	}
	head := []byte(raw + "\r\n")
	var h1 h1Head
	require.NoError(t, parseRequestHead(head, &h1))
	views := map[string]xdsclient.RBACHeaders{
		"HTTP/1.1": &h1Fields{head: head, h: &h1},
		"HTTP/2":   &h2Fields{fields: h2},
		"net/http": netHTTPFields(nh),
	}
	for name, v := range views {
		t.Run(name, func(t *testing.T) {
			for _, c := range []struct {
				name, want string
				ok         bool
			}{
				{"x-a", "1,,3", true},
				{"x-one", "v", true},
				{"cookie", "a=1; b=2", true},
				{"accept", "*/*", true},
				{"x-none", "", false},
			} {
				for range 2 { // the join buffer is reused
					got, ok := v.Lookup(c.name)
					require.Equal(t, c.ok, ok, c.name)
					require.Equal(t, c.want, got, c.name)
				}
			}
			if name != "net/http" {
				require.Zero(t, testing.AllocsPerRun(10, func() { v.Lookup("x-a"); v.Lookup("x-one"); v.Lookup("x-none") }),
					"the codecs' views allocate nothing once their join buffer grew")
			}
		})
	}
}
