package xds

import (
	"cmp"
	"fmt"
	"net/netip"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// declaredPods is a declared-ports catalog of demo/name, whose pods
// (name → IP) serve ports.
func declaredPods(t testing.TB, name string, ports []catalog.Port, pods map[string]string, more ...catalog.Service) *catalog.Snapshot {
	t.Helper()
	s := catalog.Service{Namespace: "demo", Name: name, Cluster: "a", Ports: ports}
	le := catalog.LocalityEndpoints{}
	for pod, ip := range pods {
		le.Addresses = append(le.Addresses, catalog.Address{IP: ip, Pod: pod, Ready: true})
		le.Ready++
	}
	s.Endpoints = []catalog.LocalityEndpoints{le}
	snap, err := catalog.NewSnapshot(catalog.DeclaredSource, append([]catalog.Service{s}, more...))
	require.NoError(t, err)
	return snap
}

// policy is an AuthorizationPolicy of namespace ns.
func policy(ns, name string, spec *securityv1beta1.AuthorizationPolicy) authz.Policy {
	return authz.Policy{Namespace: ns, Name: name, Spec: spec}
}

func selectApp(app string) *typev1beta1.WorkloadSelector {
	return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": app}}
}

// sidecarOf is the configuration the Go sidecar of pod demo/pod decodes
// from res, as the federator would serve it.
func sidecarOf(t testing.TB, res Resources, pod, ip string) *xdsclient.Config {
	t.Helper()
	id := nodeid.ID{Role: nodeid.RoleSidecar, IP: ip, Pod: pod, Namespace: "demo"}.String()
	listeners := res.Inbound.Listeners(id)
	if listeners == nil {
		listeners = res.Listeners
	}
	var anys []*anypb.Any
	add := func(m proto.Message) {
		a, err := anypb.New(m)
		require.NoError(t, err)
		anys = append(anys, a)
	}
	for _, l := range listeners {
		add(l)
	}
	for _, r := range res.Routes {
		add(r)
	}
	for _, c := range res.Clusters {
		add(c)
	}
	for _, e := range res.Endpoints {
		add(e)
	}
	secrets, _, err := TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh"), bundleOf(t, "b.mesh", "b.mesh")})
	require.NoError(t, err)
	for _, s := range secrets {
		add(s)
	}
	cfg, err := xdsclient.DecodeRole(xdsclient.RoleSidecar, anys...)
	require.NoError(t, err, "the Go sidecar accepts what the federator sends")
	return cfg
}

// request is what an HTTP request shows the HTTP RBAC: GET / to web
// unless said otherwise.
type request struct {
	method, host, path string
	headers            map[string]string
	// peer and dst are the caller's address and the original
	// destination's; unset, they match no range.
	peer, dst netip.Addr
}

type headerMap map[string]string

func (h headerMap) Lookup(name string) (string, bool) {
	v, ok := h[name]
	return v, ok
}

// allows says whether the sidecar lets a caller through to port, over
// the chain the caller's ALPN picks: the connection on a TCP chain, the
// request (GET / by default) on an HTTP one, which then has no network
// RBAC (a connection is never refused before its requests are seen).
func allows(t testing.TB, cfg *xdsclient.Config, caller string, port uint16, alpn ...string) bool {
	t.Helper()
	return allowsRequest(t, cfg, caller, port, request{}, alpn...)
}

func allowsRequest(t testing.TB, cfg *xdsclient.Config, caller string, port uint16, r request, alpn ...string) bool {
	t.Helper()
	ch := cfg.Sidecar.Inbound.Match(port, alpn)
	require.NotNil(t, ch, "a chain for port %d %v", port, alpn)
	if ch.HTTP == nil {
		return ch.RBAC.Allows(&xdsclient.RBACRequest{ID: caller, Port: port, PeerIP: r.peer, DestinationIP: r.dst})
	}
	require.Nil(t, ch.RBAC, "an HTTP chain has no network RBAC")
	req := &xdsclient.RBACRequest{ID: caller, Port: port, Method: cmp.Or(r.method, "GET"), Authority: cmp.Or(r.host, "web"),
		Path: cmp.Or(r.path, "/"), Headers: headerMap(r.headers), PeerIP: r.peer, DestinationIP: r.dst}
	return ch.HTTP.RBAC.Allows(req)
}

// AuthorizationPolicies reach the sidecars of the pods they select as
// network RBAC on every inbound chain, with Istio's meaning for a
// connection: DENY first, then ALLOW when any ALLOW policy selects the
// pod; HTTP-only fields make an ALLOW rule match nothing and are left out
// of a DENY rule; the Go sidecar decodes and enforces what is sent.
func TestSidecarEnforcesAuthorizationPolicies(t *testing.T) {
	store := authz.NewStore("")
	store.SetPod("demo", "web-0", map[string]string{"app": "web"})
	store.SetPod("demo", "db-0", map[string]string{"app": "db"})
	store.SetPod("demo", "free-0", map[string]string{"app": "free"})
	store.SetPod("other", "x-0", map[string]string{"app": "web"})
	store.SetPolicy(policy("demo", "web-allow", &securityv1beta1.AuthorizationPolicy{
		Selector: selectApp("web"),
		Rules: []*securityv1beta1.Rule{
			// b's client on 8080; anyone of namespace ops on any port.
			{
				From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{"b.mesh/ns/demo/sa/client"}}}},
				To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"8080"}}}},
			},
			{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{"ops"}}}}},
			// Anyone may DELETE, over HTTP: never matches a connection.
			{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Methods: []string{"DELETE"}}}}},
		},
	}))
	store.SetPolicy(policy("demo", "web-deny", &securityv1beta1.AuthorizationPolicy{
		Selector: selectApp("web"),
		Action:   securityv1beta1.AuthorizationPolicy_DENY,
		Rules: []*securityv1beta1.Rule{{
			From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{"cluster.local/ns/ops/sa/intruder"}}}},
		}},
	}))
	// A mesh-wide DENY with a method: for a connection, it denies port
	// 5432 to everyone.
	store.SetPolicy(policy("istio-system", "no-db-writes", &securityv1beta1.AuthorizationPolicy{
		Selector: selectApp("db"),
		Action:   securityv1beta1.AuthorizationPolicy_DENY,
		Rules: []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{
			Methods: []string{"POST"}, Ports: []string{"5432"},
		}}}}},
	}))
	store.SetSynced()
	policies := store.Snapshot()

	ports := []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}, {Name: "tcp-admin", Port: 9000, TargetPort: 9000}}
	declared := declaredPods(t, "web", ports, map[string]string{"web-0": "10.0.1.2", "free-0": "10.0.1.4"},
		catalog.Service{Namespace: "demo", Name: "db", Cluster: "a", Ports: []catalog.Port{{Name: "tcp", Port: 5432, TargetPort: 5432}, {Name: "tcp-m", Port: 9187, TargetPort: 9187}},
			Endpoints: []catalog.LocalityEndpoints{{Addresses: []catalog.Address{{IP: "10.0.1.3", Pod: "db-0", Ready: true}}, Ready: 1}}})
	in := SidecarInput{Declared: declared, Policies: policies}
	opts := SidecarOptions{Region: "r1", TrustDomain: "a.mesh"}
	res, skipped, err := TranslateSidecar(in, opts)
	require.NoError(t, err)
	require.Contains(t, skipped, Skipped{Service: "AuthorizationPolicy demo/web-allow", Reason: "on TCP ports, rule 2 never matches: to.operation.methods (not in a connection)"})
	require.Contains(t, skipped, Skipped{Service: "AuthorizationPolicy istio-system/no-db-writes", Reason: "on TCP ports, rule 0 is applied without to.operation.methods (not in a connection)"})

	const (
		client   = "spiffe://b.mesh/ns/demo/sa/client"
		other    = "spiffe://b.mesh/ns/demo/sa/other"
		ops      = "spiffe://a.mesh/ns/ops/sa/tool"
		intruder = "spiffe://a.mesh/ns/ops/sa/intruder"
	)
	web := sidecarOf(t, res, "web-0", "10.0.1.2")
	del := request{method: "DELETE"}
	for _, alpn := range [][]string{nil, {"istio"}, {"istio-http/1.1"}, {"h2"}} {
		// 8080 is declared HTTP: decided per request whatever the ALPN.
		require.True(t, allows(t, web, client, 8080, alpn...), "client to 8080 %v", alpn)
		require.False(t, allows(t, web, other, 8080, alpn...), "another account of b %v", alpn)
		require.True(t, allowsRequest(t, web, other, 8080, del, alpn...), "anyone may DELETE %v", alpn)
		require.False(t, allowsRequest(t, web, intruder, 8080, del, alpn...), "but the DENY policy comes first %v", alpn)
		// 9000 is declared TCP: per connection.
		require.False(t, allows(t, web, client, 9000, alpn...), "client to 9000 %v: only 8080 is allowed", alpn)
		require.True(t, allows(t, web, ops, 9000, alpn...), "namespace ops, any port %v", alpn)
		require.False(t, allows(t, web, other, 9000, alpn...), "the DELETE rule never matches a connection %v", alpn)
		require.True(t, allows(t, web, ops, 7777, alpn...), "namespace ops, an undeclared port %v", alpn)
		require.False(t, allows(t, web, intruder, 8080, alpn...), "cluster.local names the local trust domain: denied %v", alpn)
		require.False(t, allows(t, web, intruder, 9000, alpn...), "denied %v", alpn)
	}
	// Istio's default path normalization, so RBAC and the app see one
	// path (pkg/sidecar normalizes and tests the bypasses).
	require.True(t, web.Sidecar.Inbound.Match(8080, nil).HTTP.NormalizePath, "inbound paths are normalized")
	// An undeclared port: the ALPN picks the level.
	require.True(t, allowsRequest(t, web, other, 7777, del, "istio-http/1.1"), "DELETE over HTTP on an undeclared port")
	require.False(t, allows(t, web, other, 7777, "istio"), "a connection on an undeclared port")

	db := sidecarOf(t, res, "db-0", "10.0.1.3")
	require.False(t, allows(t, db, client, 5432), "the DENY rule without its method denies 5432")
	require.True(t, allows(t, db, client, 9187), "and only 5432: there is no ALLOW policy")

	free := sidecarOf(t, res, "free-0", "10.0.1.4")
	require.True(t, allows(t, free, other, 8080), "a pod no policy selects allows every authenticated caller")
	require.Nil(t, free.Sidecar.Inbound.Match(8080, nil).RBAC)

	// The incremental translator makes the same, and follows a policy's
	// change and removal.
	tr, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	got, gotSkipped, err := tr.Translate(in)
	require.NoError(t, err)
	require.Equal(t, renderSidecar(t, res, skipped), renderSidecar(t, got, gotSkipped))

	store.DeletePolicy("demo", "web-deny")
	in.Policies = store.Snapshot()
	got, _, err = tr.Translate(in)
	require.NoError(t, err)
	require.NotEqual(t, res.Version, got.Version)
	require.True(t, allows(t, sidecarOf(t, got, "web-0", "10.0.1.2"), intruder, 8080), "the DENY policy is gone; the ALLOW one lets ops in")
	require.False(t, allows(t, sidecarOf(t, got, "db-0", "10.0.1.3"), client, 5432), "db's policies did not change")
	want, _, err := TranslateSidecar(in, opts)
	require.NoError(t, err)
	require.Equal(t, want.Version, got.Version)

	store.SetPod("demo", "web-0", map[string]string{"app": "not-web"})
	in.Policies = store.Snapshot()
	got, _, err = tr.Translate(in)
	require.NoError(t, err)
	require.True(t, allows(t, sidecarOf(t, got, "web-0", "10.0.1.2"), other, 9000), "relabelled: no policy selects it")
	require.Equal(t, got.Inbound.byKey["8080/HTTP,9000/TCP"].version, got.TypeVersionsFor(nodeid.ID{Role: nodeid.RoleSidecar, IP: "10.0.1.2", Pod: "web-0", Namespace: "demo"}.String())[resource.ListenerType])

	// A change of the declared ports alone (no service the sidecars
	// route to changed) reaches the profiles too.
	in.Declared = declaredPods(t, "web", []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}, {Name: "http-admin", Port: 9000, TargetPort: 9000}},
		map[string]string{"web-0": "10.0.1.2", "free-0": "10.0.1.4"})
	got, _, err = tr.Translate(in)
	require.NoError(t, err)
	require.Contains(t, got.Inbound.Status(), "8080/HTTP,9000/HTTP")
	want, _, err = TranslateSidecar(in, opts)
	require.NoError(t, err)
	require.Equal(t, want.Version, got.Version)
}

// An ALLOW policy whose rules all need HTTP attributes, or that has no
// rules, lets no connection through; a pod that declares no port gets
// its policies on the listener's own chains.
func TestSidecarAllowWithoutConnectionRulesDeniesAll(t *testing.T) {
	store := authz.NewStore("")
	store.SetPod("demo", "web-0", map[string]string{"app": "web"})
	store.SetPod("demo", "lone-0", map[string]string{"app": "lone"})
	store.SetPolicy(policy("demo", "paths-only", &securityv1beta1.AuthorizationPolicy{
		Selector: selectApp("web"),
		Rules:    []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Paths: []string{"/healthz"}}}}}},
	}))
	store.SetPolicy(policy("demo", "nothing", &securityv1beta1.AuthorizationPolicy{Selector: selectApp("lone")}))
	store.SetSynced()
	declared := declaredPods(t, "web", []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}}, map[string]string{"web-0": "10.0.1.2"})
	res, _, err := TranslateSidecar(SidecarInput{Declared: declared, Policies: store.Snapshot()}, SidecarOptions{TrustDomain: "a.mesh"})
	require.NoError(t, err)

	web := sidecarOf(t, res, "web-0", "10.0.1.2")
	require.False(t, allows(t, web, "spiffe://a.mesh/ns/demo/sa/x", 8080, "istio-http/1.1"))
	require.True(t, allowsRequest(t, web, "spiffe://a.mesh/ns/demo/sa/x", 8080, request{path: "/healthz"}, "istio-http/1.1"), "the path the policy allows")
	require.False(t, allows(t, web, "spiffe://a.mesh/ns/demo/sa/x", 8080, "istio"), "a TCP connection: the paths rule never matches")
	lone := sidecarOf(t, res, "lone-0", "10.0.1.9")
	require.False(t, allows(t, lone, "spiffe://a.mesh/ns/demo/sa/x", 8080, "istio-http/1.1"))
	require.False(t, allows(t, lone, "spiffe://a.mesh/ns/demo/sa/x", 9, "istio"))
	require.Contains(t, res.Inbound.Status(), "authz="+mustSet(t, store, "demo/lone-0").Key)
}

func mustSet(t testing.TB, store *authz.Store, pod string) *authz.Set {
	t.Helper()
	set, ok := store.Snapshot().Pod(pod)
	require.True(t, ok, pod)
	return set
}

// Each field of an AuthorizationPolicy a connection has, as the Go
// sidecar decides with what the federator sends: one policy selecting
// the pod, a caller, a destination port.
func TestAuthorizationPolicyFieldsForAConnection(t *testing.T) {
	type call struct {
		caller string
		port   uint16
		allow  bool
		// peer is the caller's address; none when empty.
		peer string
	}
	const (
		client   = "spiffe://b.mesh/ns/demo/sa/client"
		local    = "spiffe://a.mesh/ns/demo/sa/client"
		ops      = "spiffe://a.mesh/ns/ops/sa/tool"
		ops2     = "spiffe://c.mesh/ns/ops-2/sa/tool"
		teamProd = "spiffe://a.mesh/ns/team-a-prod/sa/x"
	)
	from := func(s *securityv1beta1.Source) []*securityv1beta1.Rule {
		return []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: s}}}}
	}
	for _, tc := range []struct {
		name  string
		spec  *securityv1beta1.AuthorizationPolicy
		calls []call
		notes []string
	}{
		{"principals exact", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Principals: []string{"b.mesh/ns/demo/sa/client"}})},
			[]call{{client, 8080, true, ""}, {local, 8080, false, ""}}, nil},
		{"principals prefix", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Principals: []string{"b.mesh/ns/*"}})},
			[]call{{client, 8080, true, ""}, {local, 8080, false, ""}}, nil},
		{"principals suffix", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Principals: []string{"*/sa/client"}})},
			[]call{{client, 8080, true, ""}, {local, 8080, true, ""}, {ops, 8080, false, ""}}, nil},
		{"principals any authenticated", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Principals: []string{"*"}})},
			[]call{{client, 8080, true, ""}, {ops2, 1, true, ""}}, nil},
		{"cluster.local is the local trust domain", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Principals: []string{"cluster.local/ns/demo/sa/client"}})},
			[]call{{local, 8080, true, ""}, {client, 8080, false, ""}}, nil},
		{"notPrincipals", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{NotPrincipals: []string{"b.mesh/ns/demo/sa/client"}})},
			[]call{{client, 8080, false, ""}, {local, 8080, true, ""}}, nil},
		{"namespaces", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Namespaces: []string{"ops"}})},
			[]call{{ops, 8080, true, ""}, {ops2, 8080, false, ""}, {client, 8080, false, ""}}, nil},
		{"namespaces prefix", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{Namespaces: []string{"ops*"}})},
			[]call{{ops, 8080, true, ""}, {ops2, 8080, true, ""}, {client, 8080, false, ""}}, nil},
		{"notNamespaces", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{NotNamespaces: []string{"demo"}})},
			[]call{{ops, 8080, true, ""}, {client, 8080, false, ""}}, nil},
		{"serviceAccounts of the policy's namespace and another", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{ServiceAccounts: []string{"client", "ops/tool"}})},
			[]call{{client, 8080, true, ""}, {local, 8080, true, ""}, {ops, 8080, true, ""}, {ops2, 8080, false, ""}}, nil},
		{"trustDomains", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{TrustDomains: []string{"b.mesh"}})},
			[]call{{client, 8080, true, ""}, {local, 8080, false, ""}}, nil},
		{"notTrustDomains suffix", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{NotTrustDomains: []string{"*.mesh"}})},
			[]call{{client, 8080, false, ""}, {local, 8080, false, ""}}, nil},
		{"ports and notPorts", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{
			{Operation: &securityv1beta1.Operation{Ports: []string{"8080", "9000"}}},
			{Operation: &securityv1beta1.Operation{NotPorts: []string{"8080", "9000", "5432"}}},
		}}}}, []call{{client, 8080, true, ""}, {client, 9000, true, ""}, {client, 5432, false, ""}, {client, 1, true, ""}}, nil},
		{"from and to both", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{
			From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{"ops"}}}},
			To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"9000"}}}},
		}}}, []call{{ops, 9000, true, ""}, {ops, 8080, false, ""}, {client, 9000, false, ""}}, nil},
		{"when source.namespace and destination.port", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{When: []*securityv1beta1.Condition{
			{Key: "source.namespace", Values: []string{"ops", "demo"}, NotValues: []string{"demo"}},
			{Key: "destination.port", NotValues: []string{"5432"}},
		}}}}, []call{{ops, 9000, true, ""}, {ops, 5432, false, ""}, {client, 9000, false, ""}}, nil},
		{"when source.principal", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{When: []*securityv1beta1.Condition{
			{Key: "source.principal", Values: []string{"b.mesh/ns/demo/sa/client"}},
		}}}}, []call{{client, 9000, true, ""}, {local, 9000, false, ""}}, nil},
		{"an ALLOW rule with a request condition never matches", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{When: []*securityv1beta1.Condition{
			{Key: "request.headers[x-user]", Values: []string{"admin"}},
		}}}}, []call{{client, 8080, false, ""}, {client, 9000, false, ""}}, []string{`on TCP ports, rule 0 never matches: when "request.headers[x-user]" (not in a connection)`}},
		{"ipBlocks: the caller's address", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{IpBlocks: []string{"10.0.2.0/24", "10.9.9.9"}})},
			[]call{{client, 8080, true, "10.0.2.7"}, {client, 9000, true, "10.9.9.9"}, {client, 9000, false, "10.0.3.1"}, {"", 9000, true, "10.0.2.7"}, {client, 9000, false, ""}}, nil},
		{"notIpBlocks and remoteIpBlocks", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{
			NotIpBlocks: []string{"10.0.2.7"}, RemoteIpBlocks: []string{"10.0.0.0/8"}})},
			[]call{{client, 9000, true, "10.0.2.8"}, {client, 9000, false, "10.0.2.7"}, {client, 9000, false, "192.0.2.1"}}, nil},
		{"when source.ip and destination.ip", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{When: []*securityv1beta1.Condition{
			{Key: "source.ip", Values: []string{"10.0.2.0/24"}},
			{Key: "destination.ip", Values: []string{"10.0.1.2"}},
		}}}}, []call{{client, 9000, true, "10.0.2.1"}, {client, 8080, true, "10.0.2.1"}, {client, 9000, false, "10.0.3.1"}}, nil},
		{"an ALLOW rule with a bad ipBlock never matches", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{IpBlocks: []string{"10.0.0.0/8", "10.0.0.0/33"}})},
			[]call{{client, 8080, false, ""}, {client, 9000, false, ""}}, []string{`rule 0 never matches: from.source.ipBlocks ("10.0.0.0/33" is not an IP address or CIDR range)`}},
		{"an ALLOW rule with requestPrincipals never matches", &securityv1beta1.AuthorizationPolicy{Rules: from(&securityv1beta1.Source{RequestPrincipals: []string{"*"}})},
			[]call{{client, 8080, false, ""}, {client, 9000, false, ""}}, []string{"rule 0 never matches: from.source.requestPrincipals (not enforced)"}},
		{"a bad port makes an ALLOW rule match nothing", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"8080", "http"}}}}}}},
			[]call{{client, 8080, false, ""}, {client, 9000, false, ""}}, []string{`rule 0 never matches: to.operation.ports ("http" is not a port number)`}},
		{"a DENY rule with a bad notPort denies without it", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{NotPorts: []string{"8080", "x"}}}}}}},
			[]call{{client, 8080, false, ""}, {client, 9000, false, ""}}, []string{`rule 0 is applied without to.operation.notPorts ("x" is not a port number)`}},
		{"a DENY rule with a path denies the port", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Paths: []string{"/admin"}, Ports: []string{"9000"}}}}}}},
			[]call{{client, 9000, false, ""}, {client, 8080, true, ""}}, []string{"on TCP ports, rule 0 is applied without to.operation.paths (not in a connection)"}},
		{"a * inside a namespace stands for any characters, as in Istio", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: []*securityv1beta1.Rule{
				{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{"team-*-prod"}}}}},
				{When: []*securityv1beta1.Condition{{Key: "source.namespace", Values: []string{"o*s"}}}},
			}},
			[]call{{teamProd, 9000, false, ""}, {teamProd, 8080, false, ""}, {ops, 9000, false, ""}, {client, 9000, true, ""}, {ops2, 9000, true, ""}}, nil},
		{"a * inside a principal: the DENY rule applies without it", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: []*securityv1beta1.Rule{
				{
					From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{"b.mesh/ns/*/sa/client"}}}},
					To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"9000"}}}},
				},
				{
					When: []*securityv1beta1.Condition{{Key: "source.principal", Values: []string{"a.mesh/*/x"}}},
					To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"9001"}}}},
				},
			}},
			[]call{{client, 9000, false, ""}, {ops, 9000, false, ""}, {ops, 9001, false, ""}, {client, 8080, true, ""}}, []string{
				`rule 0 is applied without from.source.principals ("b.mesh/ns/*/sa/client": a * inside a value is not enforced)`,
				`rule 1 is applied without when "source.principal" ("a.mesh/*/x": a * inside a value is not enforced)`,
			}},
		{"DENY without rules denies nothing", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY},
			[]call{{client, 8080, true, ""}}, nil},
		{"ALLOW with an empty rule allows all", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{}}},
			[]call{{client, 8080, true, ""}, {ops2, 1, true, ""}}, nil},
		{"CUSTOM denies what it matches", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_CUSTOM,
			Rules: from(&securityv1beta1.Source{Namespaces: []string{"ops"}})},
			[]call{{ops, 8080, false, ""}, {client, 8080, true, ""}}, []string{"action CUSTOM needs an external authorizer, which Isthmus does not call: what its rules match is denied"}},
		{"AUDIT has no effect", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_AUDIT, Rules: []*securityv1beta1.Rule{{}}},
			[]call{{client, 8080, true, ""}}, []string{"action AUDIT is not audited: the policy has no effect"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, notes := webWithPolicy(t, tc.spec)
			require.Equal(t, tc.notes, notes)
			for _, c := range tc.calls {
				r := request{dst: netip.MustParseAddr("10.0.1.2")}
				if c.peer != "" {
					r.peer = netip.MustParseAddr(c.peer)
				}
				require.Equal(t, c.allow, allowsRequest(t, cfg, c.caller, c.port, r, "istio"), "%s from %q to %d", c.caller, c.peer, c.port)
			}
		})
	}
}

// webWithPolicy is the Go sidecar configuration of pod demo/web-0
// (10.0.1.2; its Service declares 8080 HTTP and 9000 TCP) when spec,
// selecting it, is the one AuthorizationPolicy (demo/p), and what the
// translation notes of it.
func webWithPolicy(t *testing.T, spec *securityv1beta1.AuthorizationPolicy) (*xdsclient.Config, []string) {
	t.Helper()
	store := authz.NewStore("")
	store.SetPod("demo", "web-0", map[string]string{"app": "web"})
	spec.Selector = selectApp("web")
	store.SetPolicy(policy("demo", "p", spec))
	store.SetSynced()
	declared := declaredPods(t, "web", []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}, {Name: "tcp", Port: 9000, TargetPort: 9000}}, map[string]string{"web-0": "10.0.1.2"})
	res, skipped, err := TranslateSidecar(SidecarInput{Declared: declared, Policies: store.Snapshot()}, SidecarOptions{TrustDomain: "a.mesh"})
	require.NoError(t, err)
	var notes []string
	for _, sk := range skipped {
		if sk.Service == "AuthorizationPolicy demo/p" {
			notes = append(notes, sk.Reason)
		}
	}
	return sidecarOf(t, res, "web-0", "10.0.1.2"), notes
}

// Each HTTP field of an AuthorizationPolicy, as the Go sidecar decides
// a request on a port declared HTTP with what the federator sends.
func TestAuthorizationPolicyFieldsForARequest(t *testing.T) {
	const caller = "spiffe://b.mesh/ns/demo/sa/client"
	type call struct {
		r     request
		allow bool
	}
	to := func(o *securityv1beta1.Operation) []*securityv1beta1.Rule {
		return []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{Operation: o}}}}
	}
	for _, tc := range []struct {
		name  string
		spec  *securityv1beta1.AuthorizationPolicy
		calls []call
	}{
		{"methods", &securityv1beta1.AuthorizationPolicy{Rules: to(&securityv1beta1.Operation{Methods: []string{"GET", "HEAD"}})},
			[]call{{request{}, true}, {request{method: "HEAD"}, true}, {request{method: "POST"}, false}, {request{method: "get"}, false}}},
		{"notMethods", &securityv1beta1.AuthorizationPolicy{Rules: to(&securityv1beta1.Operation{NotMethods: []string{"DELETE"}})},
			[]call{{request{}, true}, {request{method: "DELETE"}, false}}},
		{"paths exact, prefix and suffix, without the query", &securityv1beta1.AuthorizationPolicy{Rules: to(&securityv1beta1.Operation{Paths: []string{"/healthz", "/api/*", "*.css"}})},
			[]call{{request{path: "/healthz"}, true}, {request{path: "/healthz?full=1"}, true}, {request{path: "/healthz/x"}, false},
				{request{path: "/api/v1"}, true}, {request{path: "/api"}, false}, {request{path: "/s/site.css"}, true}, {request{}, false}}},
		{"notPaths", &securityv1beta1.AuthorizationPolicy{Rules: to(&securityv1beta1.Operation{NotPaths: []string{"/admin*"}})},
			[]call{{request{}, true}, {request{path: "/admin/users"}, false}}},
		{"hosts: any case, with or without a port, wildcards", &securityv1beta1.AuthorizationPolicy{Rules: to(&securityv1beta1.Operation{Hosts: []string{"web.demo", "*.example.com"}})},
			[]call{{request{host: "web.demo"}, true}, {request{host: "WEB.demo:8080"}, true}, {request{host: "web.demo.evil"}, false},
				{request{host: "a.example.com"}, true}, {request{host: "a.example.com:443"}, true}, {request{host: "example.com"}, false}}},
		{"notHosts", &securityv1beta1.AuthorizationPolicy{Rules: to(&securityv1beta1.Operation{NotHosts: []string{"internal*"}})},
			[]call{{request{host: "web"}, true}, {request{host: "internal.demo"}, false}}},
		{"request headers: a value, a prefix, present, and notValues", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{When: []*securityv1beta1.Condition{
			{Key: "request.headers[X-User]", Values: []string{"admin", "ops-*"}},
			{Key: "request.headers[x-trace]", Values: []string{"*"}},
			{Key: "request.headers[x-env]", NotValues: []string{"prod"}},
		}}}}, []call{
			{request{headers: map[string]string{"x-user": "admin", "x-trace": "1"}}, true},
			{request{headers: map[string]string{"x-user": "ops-7", "x-trace": "", "x-env": "dev"}}, true},
			{request{headers: map[string]string{"x-user": "admin"}}, false},
			{request{headers: map[string]string{"x-user": "root", "x-trace": "1"}}, false},
			{request{headers: map[string]string{"x-user": "admin", "x-trace": "1", "x-env": "prod"}}, false},
		}},
		{"a pseudo-header the sidecar has not: the DENY rule applies without it", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: []*securityv1beta1.Rule{{
				To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Paths: []string{"/x"}}}},
				When: []*securityv1beta1.Condition{{Key: "request.headers[:scheme]", Values: []string{"http"}}},
			}}},
			[]call{{request{}, true}, {request{path: "/x"}, false}}},
		{"a request header on :authority", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{When: []*securityv1beta1.Condition{
			{Key: "request.headers[:authority]", Values: []string{"web*"}},
		}}}}, []call{{request{}, true}, {request{host: "other"}, false}}},
		{"a DENY policy on a method denies only that method", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: to(&securityv1beta1.Operation{Methods: []string{"DELETE"}, Paths: []string{"/data/*"}})},
			[]call{{request{}, true}, {request{method: "DELETE", path: "/data/1"}, false}, {request{method: "DELETE", path: "/other"}, true}}},
		{"a rule on a request principal never matches", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{
			{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{RequestPrincipals: []string{"*"}}}}},
			{To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Paths: []string{"/public"}}}}},
		}}, []call{{request{}, false}, {request{path: "/public"}, true}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := webWithPolicy(t, tc.spec)
			for _, c := range tc.calls {
				for _, alpn := range []string{"istio-http/1.1", "istio-h2", "istio"} {
					require.Equal(t, c.allow, allowsRequest(t, cfg, caller, 8080, c.r, alpn), "%+v over %s", c.r, alpn)
				}
			}
		})
	}
}

// BenchmarkPolicyChange is the sidecars' translation when a policy
// changes, at 1,000 and 10,000 services whose pods all have policies (an
// ALLOW AuthorizationPolicy in each of the 10 namespaces): a DENY policy
// of one namespace (deny), or a namespace-wide PERMISSIVE
// PeerAuthentication (permissive), added and removed in turn, which
// gives a tenth of the pods another policy set. Run with
//
//	go test -run '^$' -bench PolicyChange -benchmem ./pkg/xds/
func BenchmarkPolicyChange(b *testing.B) {
	opts := SidecarOptions{Region: "r1", TrustDomain: "a.mesh"}
	for _, n := range []int{1000, 10000} {
		local, peers := sidecarBenchCatalogs(b, n)
		store := authz.NewStore("")
		db := catalog.NewBuilder(catalog.DeclaredSource)
		pods := 0
		for svc := range local.All() {
			d := svc.Clone()
			for i := range d.Endpoints {
				for j := range d.Endpoints[i].Addresses {
					a := &d.Endpoints[i].Addresses[j]
					a.Pod = d.Name + "-" + a.IP
					store.SetPod(d.Namespace, a.Pod, map[string]string{"app": d.Name})
					pods++
				}
			}
			require.NoError(b, db.Put(d))
		}
		declared := db.Build()
		for ns := range 10 {
			store.SetPolicy(policy(fmt.Sprintf("ns-%02d", ns), "callers", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{
				From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{"ops"}}}},
				To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Methods: []string{"GET"}}}},
			}}}))
		}
		store.SetSynced()
		without := store.Snapshot()
		store.SetPolicy(policy("ns-00", "deny", &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_DENY,
			Rules: []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{"b.mesh/ns/x/sa/y"}}}}}}}))
		withDeny := store.Snapshot()
		store.DeletePolicy("ns-00", "deny")
		store.SetPeerAuthentication(authz.PeerPolicy{Namespace: "ns-00", Name: "default", Spec: &securityv1beta1.PeerAuthentication{
			Mtls: &securityv1beta1.PeerAuthentication_MutualTLS{Mode: securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE}}})
		withPermissive := store.Snapshot()
		for _, change := range []struct {
			name string
			with *authz.Snapshot
		}{{"deny", withDeny}, {"permissive", withPermissive}} {
			benchPolicyChange(b, fmt.Sprintf("services=%d/pods=%d/%s", n, pods, change.name), opts,
				SidecarInput{Local: local, Peers: peers, Declared: declared}, without, change.with)
		}
	}
}

// benchPolicyChange measures translating in with the policies without
// and with in turn.
func benchPolicyChange(b *testing.B, name string, opts SidecarOptions, in SidecarInput, without, with *authz.Snapshot) {
	b.Run(name, func(b *testing.B) {
		tr, err := NewSidecarTranslator(opts)
		require.NoError(b, err)
		in.Policies = without
		_, _, err = tr.Translate(in)
		require.NoError(b, err)
		i := 0
		cpu := startCPU()
		for b.Loop() {
			in.Policies = without
			if i%2 == 0 {
				in.Policies = with
			}
			if _, _, err := tr.Translate(in); err != nil {
				b.Fatal(err)
			}
			i++
		}
		cpu.report(b)
	})
}

// FuzzAuthorizationPolicyDecodes checks that whatever an
// AuthorizationPolicy holds (the API server checks little of it), the
// federator sends the sidecars something they accept: a listener the
// Go sidecar refused would leave the pod on its last configuration,
// with none of the policy changes after it.
func FuzzAuthorizationPolicyDecodes(f *testing.F) {
	f.Add(uint8(0), "b.mesh/ns/demo/sa/client", "ops", "x-user", "admin", "/admin*", "*.example.com", "GET", "8080")
	f.Add(uint8(1), "*", "*", ":scheme", "*", "{*}", "web:80", "*", "http")
	f.Add(uint8(2), "cluster.local/ns/*", "team-*-prod", "X Bad", "a\x00b", "", "*", "", "0")
	f.Add(uint8(3), "*", "ops", "source.ip", "10.0.0.0/8", "/", "::ffff:10.1.2.3", "GET", "9000")
	f.Add(uint8(0), "*", "ops", "remote.ip", "10.1.2.3/40", "/", "fe80::1%eth0", "GET", "9000")
	f.Fuzz(func(t *testing.T, action uint8, principal, namespace, header, value, path, host, method, port string) {
		rule := &securityv1beta1.Rule{
			From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{
				Principals: []string{principal}, NotNamespaces: []string{namespace},
				ServiceAccounts: []string{namespace + "/" + principal}, TrustDomains: []string{namespace},
				IpBlocks: []string{value}, NotRemoteIpBlocks: []string{host},
			}}},
			To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{
				Paths: []string{path}, NotHosts: []string{host}, Methods: []string{method}, Ports: []string{port},
			}}},
			When: []*securityv1beta1.Condition{
				{Key: "request.headers[" + header + "]", Values: []string{value}, NotValues: []string{path}},
				{Key: "destination.port", NotValues: []string{port}},
				{Key: header, Values: []string{value}},
				{Key: "destination.ip", NotValues: []string{host}},
			},
		}
		spec := &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_Action(action % 5), Rules: []*securityv1beta1.Rule{rule, {}}}
		webWithPolicy(t, spec)
	})
}

// A pod the federator has not seen, in a namespace policies cover, lets
// nobody in until it has: its labels, so its policies, are unknown. Once
// seen it gets its own profile; a namespace no policy covers is as
// before.
func TestUnknownPodLetsNobodyIn(t *testing.T) {
	store := authz.NewStore("")
	store.SetPod("demo", "web-0", map[string]string{"app": "web"})
	store.SetPolicy(policy("demo", "web-only", &securityv1beta1.AuthorizationPolicy{Selector: selectApp("web"), Rules: []*securityv1beta1.Rule{{}}}))
	store.SetSynced()
	declared := declaredPods(t, "web", []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}}, map[string]string{"web-0": "10.0.1.2", "web-1": "10.0.1.3"})
	opts := SidecarOptions{TrustDomain: "a.mesh"}
	tr, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	in := SidecarInput{Declared: declared, Policies: store.Snapshot()}
	res, _, err := tr.Translate(in)
	require.NoError(t, err)
	const caller = "spiffe://a.mesh/ns/demo/sa/x"
	require.True(t, allows(t, sidecarOf(t, res, "web-0", "10.0.1.2"), caller, 8080, "istio"))
	unknown := sidecarOf(t, res, "web-1", "10.0.1.3")
	require.False(t, allows(t, unknown, caller, 8080, "istio"), "web-1 is not known yet")
	require.False(t, allows(t, unknown, caller, 9, "istio"), "on any port")
	require.False(t, allows(t, unknown, caller, 9, "istio-http/1.1"), "over HTTP too")
	require.False(t, allows(t, sidecarOf(t, res, "x-0", "10.0.9.9"), caller, 9, "istio"), "a pod no Service names, unknown too")

	// Seen, with labels no policy selects: its declared ports, no RBAC.
	store.SetPod("demo", "web-1", map[string]string{"app": "other"})
	in.Policies = store.Snapshot()
	got, _, err := tr.Translate(in)
	require.NoError(t, err)
	require.NotEqual(t, res.Version, got.Version, "a pod becoming known changes what its sidecar is served")
	known := sidecarOf(t, got, "web-1", "10.0.1.3")
	require.True(t, allows(t, known, caller, 8080, "istio"))
	require.NotNil(t, known.Sidecar.Inbound.Match(8080, []string{"istio"}).HTTP, "its declared HTTP port")
	want, _, err := TranslateSidecar(in, opts)
	require.NoError(t, err)
	require.Equal(t, want.Version, got.Version)

	// A namespace no policy covers: an unknown pod there is as before.
	other := nodeid.ID{Role: nodeid.RoleSidecar, IP: "10.0.5.5", Pod: "y-0", Namespace: "other"}.String()
	require.Nil(t, got.Inbound.Listeners(other))

	// A first policy in it, with no pod of it known: its unknown pods
	// let nobody in, and the version says so (the cache pushes on it).
	store.SetPolicy(policy("other", "all", &securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{}}}))
	in.Policies = store.Snapshot()
	covered, _, err := tr.Translate(in)
	require.NoError(t, err)
	require.NotEqual(t, got.Version, covered.Version)
	require.NotNil(t, covered.Inbound.Listeners(other))
	// And the other way.
	store.DeletePolicy("other", "all")
	in.Policies = store.Snapshot()
	uncovered, _, err := tr.Translate(in)
	require.NoError(t, err)
	require.NotEqual(t, covered.Version, uncovered.Version)
	require.Nil(t, uncovered.Inbound.Listeners(other))
}

// A pod whose Service's EndpointSlice gives only its IP (no pod name)
// keeps its declared-port chains when a policy, known by its name,
// selects it: its sidecar gets both.
func TestPoliciesByNameDeclaredPortsByIP(t *testing.T) {
	store := authz.NewStore("")
	store.SetPod("demo", "web-0", map[string]string{"app": "web"})
	store.SetPolicy(policy("demo", "no-ops", &securityv1beta1.AuthorizationPolicy{Selector: selectApp("web"), Action: securityv1beta1.AuthorizationPolicy_DENY,
		Rules: []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{"ops"}}}}}}}))
	store.SetSynced()
	svc := catalog.Service{Namespace: "demo", Name: "web", Cluster: "a", Ports: []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}},
		Endpoints: []catalog.LocalityEndpoints{{Addresses: []catalog.Address{{IP: "10.0.1.2", Ready: true}}, Ready: 1}}}
	declared, err := catalog.NewSnapshot(catalog.DeclaredSource, []catalog.Service{svc})
	require.NoError(t, err)
	res, _, err := TranslateSidecar(SidecarInput{Declared: declared, Policies: store.Snapshot()}, SidecarOptions{TrustDomain: "a.mesh"})
	require.NoError(t, err)
	cfg := sidecarOf(t, res, "web-0", "10.0.1.2")
	ch := cfg.Sidecar.Inbound.Match(8080, []string{"istio"})
	require.NotNil(t, ch.HTTP, "port 8080 is declared HTTP, whatever the caller's ALPN")
	require.False(t, allows(t, cfg, "spiffe://a.mesh/ns/ops/sa/x", 8080, "istio"), "and the policy applies")
	require.True(t, allows(t, cfg, "spiffe://a.mesh/ns/demo/sa/x", 8080, "istio"))
}
