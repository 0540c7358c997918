package sidecar

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/stretchr/testify/require"
)

// Envoy's network RBAC filter on the inbound chains, as Istio writes it
// from an AuthorizationPolicy: decided once per connection, after the
// TLS handshake, by the caller's SPIFFE ID and the original destination
// port; a denied connection is closed before a byte reaches the app.

func rbacNetFilter(tb testing.TB, action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *listenerv3.Filter {
	return typedFilter(tb, "envoy.filters.network.rbac", &netrbacv3.RBAC{StatPrefix: "tcp.", Rules: &rbacv3.RBAC{Action: action, Policies: policies}})
}

func rbacPrincipal(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func rbacExact(id string) *rbacv3.Principal {
	return rbacPrincipal(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}})
}

func rbacPort(p uint16) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: uint32(p)}}
}

func rbacAnyPermission() *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
}

// withRBACFilters puts filters in front of fc's terminal filter.
func withRBACFilters(fc *listenerv3.FilterChain, filters []*listenerv3.Filter) *listenerv3.FilterChain {
	fc.Filters = slices.Concat(filters, fc.Filters)
	return fc
}

func rbacPolicies(perm *rbacv3.Permission, prins ...*rbacv3.Principal) map[string]*rbacv3.Policy {
	return map[string]*rbacv3.Policy{"ns[demo]-policy[p]-rule[0]": {Permissions: []*rbacv3.Permission{perm}, Principals: prins}}
}

// rbacMesh is a mesh whose b has the same RBAC filters on every inbound
// chain: one for its HTTP app's port, one for its TCP app's port, and
// the two by ALPN for any other.
type rbacMesh struct {
	*mesh
	httpAddr, tcpAddr string
}

// startRBACMesh starts the mesh; filters, given its pods (b's apps'
// ports, alpha's IDs), are the RBAC filters.
func startRBACMesh(t *testing.T, filters func(m *mesh) []*listenerv3.Filter) *rbacMesh {
	t.Helper()
	m := &rbacMesh{mesh: startMesh(t)}
	f := filters(m.mesh)
	snap := snapshot(t, "v1", []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
	m.xds.set(t, withInbound(t, snap,
		withRBACFilters(inboundChain(t, m.b.http.addr.Port(), true), f),
		withRBACFilters(inboundChain(t, m.b.tcp.addr.Port(), false), f),
		withRBACFilters(inboundChain(t, 0, true, alpnHTTP1, alpnHTTP2), f),
		withRBACFilters(inboundChain(t, 0, false), f),
	))
	m.a.waitReady(t, "v1")
	m.b.waitReady(t, "v1")
	require.NotNil(t, m.b.proxy.state.Load().cfg.Sidecar.Inbound.Chains[0].RBAC, "b adopted the RBAC filters")
	m.httpAddr, m.tcpAddr = m.b.endpoint(ipHTTP).String(), m.b.endpoint(ipTCP).String()
	return m
}

// caller is a valid SVID of alpha's for demo/sa, and its SPIFFE ID.
func (m *rbacMesh) caller(t *testing.T, sa string) (tls.Certificate, string) {
	id := m.alpha.id("demo", sa)
	return tlsCert(m.alpha.svid(t, id)), id.String()
}

// tcpEchoes sends a payload over a TLS connection to addr and requires
// the TCP app's echo of it.
func tcpEchoes(t *testing.T, addr string, cert tls.Certificate) {
	t.Helper()
	c, err := dialInbound(t, addr, cert)
	require.NoError(t, err)
	defer c.Close()
	payload := strings.Repeat("\x00rbac\xff", 500)
	go func() { _, _ = io.WriteString(c, payload) }()
	got := make([]byte, len(payload))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, payload, string(got))
}

// requireRBACRefused requires a connection to addr with cert to be
// closed after its handshake, whatever it sends: the client's handshake
// may end before the server's decision, so the refusal shows on the
// first read.
func requireRBACRefused(t *testing.T, addr string, cert tls.Certificate) {
	t.Helper()
	c, err := dialInbound(t, addr, cert)
	if err == nil {
		defer c.Close()
		_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: echo.demo.svc.cluster.local\r\n\r\n")
		var n int
		n, err = c.Read(make([]byte, 1))
		require.Zero(t, n, "nothing answers a denied caller")
	}
	require.Error(t, err)
}

func (m *rbacMesh) requireRBACRefusals(t *testing.T, want int) {
	t.Helper()
	require.Eventually(t, func() bool {
		return metricValue(t, m.b.scrape(t), "isthmus_sidecar_refusals_total", "listener=inbound", "reason=rbac") == float64(want)
	}, waitFor, 10*time.Millisecond, "want %d rbac refusals", want)
}

// An ALLOW policy for one SPIFFE ID: that caller reaches the app over
// the HTTP and the TCP chain; another valid SVID of the same trust
// domain is refused on both, and nothing of it reaches either app.
func TestInboundRBACAllowsOneCaller(t *testing.T) {
	m := startRBACMesh(t, func(m *mesh) []*listenerv3.Filter {
		return []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(), rbacExact(m.alpha.id("demo", "caller").String())))}
	})
	callerCert, _ := m.caller(t, "caller")
	otherCert, _ := m.caller(t, "other")

	for _, h2 := range []bool{false, true} {
		code, reply := getInbound(t, m.httpAddr, callerCert, h2)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "b", reply.Pod)
	}
	tcpEchoes(t, m.tcpAddr, callerCert)
	require.EqualValues(t, 2, m.b.http.requests.Load())
	require.EqualValues(t, 1, m.b.tcp.accepted.Load())

	requireRBACRefused(t, m.httpAddr, otherCert)
	requireRBACRefused(t, m.tcpAddr, otherCert)
	m.requireRBACRefusals(t, 2)
	require.EqualValues(t, 2, m.b.http.requests.Load(), "no request of the other caller reached the app")
	require.EqualValues(t, 1, m.b.tcp.accepted.Load(), "the TCP app was never dialled for the other caller")

	// a's sidecar, another identity, is refused too: a's app sees the
	// upstream connection fail.
	code, _, _ := m.a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.EqualValues(t, 2, m.b.http.requests.Load())
}

// A DENY policy on one port: the caller is refused there, and served on
// another port.
func TestInboundRBACDeniesOnePort(t *testing.T) {
	m := startRBACMesh(t, func(m *mesh) []*listenerv3.Filter {
		return []*listenerv3.Filter{rbacNetFilter(t, rbacv3.RBAC_DENY, rbacPolicies(rbacPort(m.b.tcp.addr.Port()), &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}))}
	})
	cert, _ := m.caller(t, "caller")
	requireRBACRefused(t, m.tcpAddr, cert)
	m.requireRBACRefusals(t, 1)
	require.Zero(t, m.b.tcp.accepted.Load(), "nothing reached the TCP app")

	code, reply := getInbound(t, m.httpAddr, cert, false)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "b", reply.Pod)
	code, _, body := m.a.get(t, true, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.EqualValues(t, 2, m.b.http.requests.Load())
	m.requireRBACRefusals(t, 1)
}

// DENY and ALLOW together, in Istio's order: the DENY decides first,
// then a caller must be in the ALLOW.
func TestInboundRBACDenyThenAllow(t *testing.T) {
	m := startRBACMesh(t, func(m *mesh) []*listenerv3.Filter {
		return []*listenerv3.Filter{
			// other may not use the HTTP port.
			rbacNetFilter(t, rbacv3.RBAC_DENY, rbacPolicies(rbacPort(m.b.http.addr.Port()),
				rbacPrincipal(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: "/SA/OTHER"}, IgnoreCase: true}))),
			// Only alpha's demo/caller and demo/other are allowed at all.
			rbacNetFilter(t, rbacv3.RBAC_ALLOW, rbacPolicies(rbacAnyPermission(),
				rbacPrincipal(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: `spiffe://alpha\.mesh/ns/demo/sa/(caller|other)`}}}))),
		}
	})
	caller, _ := m.caller(t, "caller")
	other, _ := m.caller(t, "other")
	third, _ := m.caller(t, "third")

	code, _ := getInbound(t, m.httpAddr, caller, false)
	require.Equal(t, http.StatusOK, code)
	tcpEchoes(t, m.tcpAddr, caller)
	tcpEchoes(t, m.tcpAddr, other)
	requireRBACRefused(t, m.httpAddr, other)
	requireRBACRefused(t, m.httpAddr, third)
	requireRBACRefused(t, m.tcpAddr, third)
	m.requireRBACRefusals(t, 3)
	require.EqualValues(t, 1, m.b.http.requests.Load())
	require.EqualValues(t, 2, m.b.tcp.accepted.Load())

	// The config dump shows both filters of every inbound chain, in
	// order, with their policies.
	_, body := httpGet(t, "http://"+m.b.proxy.AdminAddr().String()+"/config_dump")
	var dump struct {
		Listeners []struct {
			Chains []struct {
				RBAC []struct {
					Action     string   `json:"action"`
					StatPrefix string   `json:"stat_prefix"`
					Policies   []string `json:"policies"`
				} `json:"network_rbac"`
			} `json:"filter_chains"`
		} `json:"listeners"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &dump), body)
	require.NotEmpty(t, dump.Listeners[1].Chains, "the inbound chains are dumped")
	for i, ch := range dump.Listeners[1].Chains {
		require.Len(t, ch.RBAC, 2, "chain %d", i)
		require.Equal(t, "DENY", ch.RBAC[0].Action, "chain %d", i)
		require.Equal(t, "ALLOW", ch.RBAC[1].Action, "chain %d", i)
		require.NotEmpty(t, ch.RBAC[0].StatPrefix, "chain %d", i)
		require.Equal(t, []string{"ns[demo]-policy[p]-rule[0]"}, ch.RBAC[0].Policies, "chain %d", i)
		require.Equal(t, []string{"ns[demo]-policy[p]-rule[0]"}, ch.RBAC[1].Policies, "chain %d", i)
	}
}
