package xdsclient

import (
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The sidecar's part of FuzzDecodeResources: a whole resource set as one
// encoded DiscoveryResponse, so the fuzzer mutates listeners, routes,
// clusters, assignments and the Secret together and can reach a
// consistent config.

// sidecarFuzzSeeds are encoded responses: the resources of
// docs/sidecar-xds.md, and a few near misses.
func sidecarFuzzSeeds(tb testing.TB) [][]byte {
	encode := func(m *scMutable) []byte {
		b, err := proto.Marshal(&discoveryv3.DiscoveryResponse{Resources: m.anys(tb)})
		require.NoError(tb, err)
		return b
	}
	seeds := [][]byte{encode(newSidecarMutable(tb))}
	// What the federator emits for in-cluster services too: chains of
	// one address with inline routes.
	b, err := proto.Marshal(&discoveryv3.DiscoveryResponse{Resources: translatedAnys(tb, inClusterTranslation(tb))})
	require.NoError(tb, err)
	seeds = append(seeds, b)
	for _, mutate := range []func(m *scMutable){
		func(m *scMutable) { m.out.FilterChains[3].FilterChainMatch.DestinationPort = wrapperspb.UInt32(80) },
		func(m *scMutable) { m.routes["80"].VirtualHosts[1].Domains[0] = "ECHO.demo.svc.clusterset.local" },
		func(m *scMutable) { m.clas[scEcho.cluster(80)].Endpoints[2].Priority = 2 },
		func(m *scMutable) { delete(m.routes, "9090") },
		func(m *scMutable) {
			m.clusters[PassthroughCluster].ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		},
		// Inbound chains per declared port, before the chains by ALPN
		// (what the federator sends per pod), and near misses: a port
		// out of range, two catch-all chains of one port.
		func(m *scMutable) {
			httpPort := onPort(m.in.FilterChains[0], 8080)
			httpPort.FilterChainMatch.ApplicationProtocols = nil
			m.in.FilterChains = append([]*listenerv3.FilterChain{httpPort, onPort(m.in.FilterChains[1], 9000)}, m.in.FilterChains...)
		},
		func(m *scMutable) { m.in.FilterChains[0].FilterChainMatch.DestinationPort = wrapperspb.UInt32(65536) },
		func(m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, onPort(m.in.FilterChains[1], 9000), onPort(m.in.FilterChains[1], 9000))
		},
		// Plaintext chains beside the TLS ones (PERMISSIVE ports, and
		// any port), and near misses: a raw_buffer chain with TLS, with
		// ALPN, two of one port, another transport_protocol.
		func(m *scMutable) {
			httpPort := onPort(m.in.FilterChains[0], 8080)
			httpPort.FilterChainMatch.ApplicationProtocols = nil
			m.in.FilterChains = append([]*listenerv3.FilterChain{httpPort, onPort(rawChain(httpPort), 8080), onPort(m.in.FilterChains[1], 9000)},
				append(m.in.FilterChains, rawChain(m.in.FilterChains[1]))...)
		},
		func(m *scMutable) { m.in.FilterChains[1].FilterChainMatch.TransportProtocol = "raw_buffer" },
		func(m *scMutable) {
			raw := rawChain(m.in.FilterChains[0])
			raw.FilterChainMatch.ApplicationProtocols = []string{"istio-http/1.1"}
			m.in.FilterChains = append(m.in.FilterChains, raw)
		},
		func(m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, onPort(rawChain(m.in.FilterChains[0]), 8080), onPort(rawChain(m.in.FilterChains[1]), 8080))
		},
		func(m *scMutable) { m.in.FilterChains[1].FilterChainMatch.TransportProtocol = "quic" },
		// Network RBAC on the inbound chains, Istio's DENY then ALLOW,
		// and near misses: after the terminal filter, on the outbound
		// listener, a regex that does not compile, nesting too deep.
		func(m *scMutable) {
			withRBAC(m, 0,
				rbacFilter(tb, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"deny": rbacPolicy(perms(permOr(permPort(9000), permRange(15000, 15100))), prinNot(prinRegex(`spiffe://alpha/.*`)))}),
				rbacFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"allow": rbacPolicy(perms(permAny()), prinOr(prinExact(idCaller), prinAny()))}))
			withRBAC(m, 1, rbacFilter(tb, rbacv3.RBAC_ALLOW, nil))
		},
		func(m *scMutable) {
			m.in.FilterChains[1].Filters = append(m.in.FilterChains[1].Filters, rbacFilter(tb, rbacv3.RBAC_DENY, nil))
		},
		func(m *scMutable) {
			m.out.FilterChains[0].Filters = append([]*listenerv3.Filter{rbacFilter(tb, rbacv3.RBAC_ALLOW, nil)}, m.out.FilterChains[0].Filters...)
		},
		func(m *scMutable) {
			withRBAC(m, 0, rbacFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinRegex(`(`))}))
		},
		func(m *scMutable) {
			deep := permPort(80)
			for range maxRBACDepth {
				deep = permNot(deep)
			}
			withRBAC(m, 0, rbacFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(deep), prinAny())}))
		},
		// HTTP RBAC before the inbound router, Istio's DENY then ALLOW
		// with the request's attributes, and near misses: after the
		// router, on the outbound listener, a pseudo-header it does not
		// read, a regex that does not compile.
		func(m *scMutable) {
			withHTTPRBAC(tb, m, 0,
				httpRBACFilter(tb, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"deny": rbacPolicy(perms(permAnd(
					permHeader(":method", smExact("DELETE")), permPath(smPrefix("/admin/")), permNotHeader("x-a", ic(smContains("b"))))), prinAny())}),
				httpRBACFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"allow": rbacPolicy(perms(permOr(
					permHeader("host", smSuffix(".local")), permPresent("x-tenant", true), permPath(smRegex(`/v[0-9]+/.*`)))), prinExact(idCaller))}))
			withRBAC(m, 1, rbacFilter(tb, rbacv3.RBAC_ALLOW, nil))
		},
		func(m *scMutable) {
			editFilter(tb, m.in.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) {
				h.HttpFilters = append(h.HttpFilters, httpRBACFilter(tb, rbacv3.RBAC_ALLOW, nil))
			})
		},
		func(m *scMutable) {
			editFilter(tb, m.out.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) {
				h.HttpFilters = append([]*hcmv3.HttpFilter{httpRBACFilter(tb, rbacv3.RBAC_DENY, nil)}, h.HttpFilters...)
			})
		},
		func(m *scMutable) {
			withHTTPRBAC(tb, m, 0, httpRBACFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permHeader(":scheme", smExact("https"))), prinAny())}))
		},
		func(m *scMutable) {
			withHTTPRBAC(tb, m, 0, httpRBACFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permPath(smRegex(`(`))), prinAny())}))
		},
		// Addresses, as Istio writes ipBlocks, remoteIpBlocks and
		// destination.ip, in both kinds of filter and nested; and near
		// misses: a CIDR string as address_prefix, a prefix_len too long
		// for IPv4, the deprecated source_ip.
		func(m *scMutable) {
			withRBAC(m, 1,
				rbacFilter(tb, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"deny": rbacPolicy(perms(permAny()), prinOr(prinRemoteIP("192.168.0.0", 16), prinRemoteIP("fd00::", 8)))}),
				rbacFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"allow": rbacPolicy(perms(permAnd(permPort(8080), permNot(permDestIP("10.0.0.2", 32)))),
					prinAnd(prinExact(idCaller), prinNot(prinDirectIP("::ffff:172.16.0.0", 108))))}))
			withHTTPRBAC(tb, m, 0, httpRBACFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permOr(permDestIP("10.0.0.1", 32), permDestIP("::", 0))),
				prinOr(prinDirectIP("127.0.0.0", 8), prinRemoteIP("0.0.0.0", 0)))}))
		},
		func(m *scMutable) {
			withRBAC(m, 0, rbacFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinDirectIP("10.0.0.0/8", 8))}))
		},
		func(m *scMutable) {
			withHTTPRBAC(tb, m, 0, httpRBACFilter(tb, rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permDestIP("10.0.0.1", 33)), prinAny())}))
		},
		func(m *scMutable) {
			withRBAC(m, 0, rbacFilter(tb, rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": rbacPolicy(perms(permAny()), prinSourceIP("10.0.0.0", 8))}))
		},
		// Two upstream HTTP versions on the wire, of which proto keeps
		// the last.
		func(m *scMutable) {
			setHTTPOptions(tb, m, scEcho.cluster(80), concatHTTPOptions(httpProtocolOptions(tb, UpstreamHTTP2), httpProtocolOptions(tb, UpstreamHTTPDownstream)))
		},
	} {
		m := newSidecarMutable(tb)
		mutate(m)
		seeds = append(seeds, encode(m))
	}
	return seeds
}

// checkSidecarDecode decodes an encoded response (the client's codec
// reads it as proto.Unmarshal does) and its resources for the sidecar:
// never a panic, the same decisions with base's entries to
// reuse as without, and what is accepted keeps every promise a
// published sidecar Config makes.
func checkSidecarDecode(t *testing.T, data []byte, base *state) {
	if len(data) == 0 {
		return
	}
	requireUnmarshalsAsProto(t, data)
	var resp discoveryv3.DiscoveryResponse
	if proto.Unmarshal(data, &resp) != nil {
		return
	}
	checkCached(t, base, resp.GetResources())
	for _, r := range resp.GetResources() {
		checkParts(t, base, r)
	}
	cfg, err := DecodeRole(RoleSidecar, resp.GetResources()...)
	if err != nil {
		require.Nil(t, cfg)
		require.NotEmpty(t, nackMessage(err))
		return
	}
	requireSidecarConsistent(t, cfg)
	decideRBAC(cfg)
	for name, c := range cfg.Clusters {
		if c.Type != EDS {
			continue
		}
		seen := map[netip.AddrPort]bool{}
		for _, e := range c.Endpoints {
			require.False(t, seen[e.Addr], "cluster %s lists %v twice", name, e.Addr)
			seen[e.Addr] = true
		}
	}
	again, err := DecodeRole(RoleSidecar, resp.GetResources()...)
	require.NoError(t, err)
	require.True(t, sameBundles(cfg.Bundles, again.Bundles), "decoding is deterministic")
	cfgRest, againRest := *cfg, *again
	cfgRest.Bundles, againRest.Bundles = nil, nil
	require.Equal(t, cfgRest, againRest, "decoding is deterministic")
}

// fuzzRequests are requests an accepted configuration's RBAC filters
// must decide without a panic: with and without the attributes an HTTP
// rule reads.
var fuzzRequests = []*RBACRequest{
	{},
	{Port: 8080, Method: "GET", Authority: "echo.demo:8080", Path: "/", PeerIP: netip.MustParseAddr("127.0.0.1")}, // plaintext: no ID
	{ID: idCaller, Port: 8080, Method: "GET", Authority: "echo.demo:8080", Path: "/admin/x?y#z",
		Headers: headerList{{"x-a", "b"}, {"x-tenant", "t"}, {"x-a", "c"}},
		PeerIP:  netip.MustParseAddr("::ffff:10.1.2.3"), DestinationIP: netip.MustParseAddr("10.0.0.1")},
	{ID: idBeta, Port: 65535, Method: "CONNECT", Authority: "db:5432",
		PeerIP: netip.MustParseAddr("fe80::1%eth0"), DestinationIP: netip.MustParseAddr("fd00::1")},
}

// decideRBAC evaluates every RBAC filter of cfg's inbound chains.
func decideRBAC(cfg *Config) {
	for _, ch := range cfg.Sidecar.Inbound.Chains {
		for _, req := range fuzzRequests {
			ch.RBAC.Allows(req)
			if ch.HTTP != nil {
				ch.HTTP.RBAC.Allows(req)
			}
		}
	}
}
