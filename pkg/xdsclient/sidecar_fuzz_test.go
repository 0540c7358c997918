package xdsclient

import (
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
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
