package xdsclient

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Resources as the federator emits them, per docs/gateway-xds.md.

const gwListener = "eastwest-gw"

type ep struct {
	ip      string
	port    uint32
	healthy bool
	region  string
	zone    string
}

type service struct {
	name, ns string
	port     uint32
	eps      []ep
}

func (s service) sni() string {
	return fmt.Sprintf("outbound_.%d_._.%s.%s.svc.cluster.local", s.port, s.name, s.ns)
}

func (s service) cluster() string {
	return fmt.Sprintf("outbound|%d||%s.%s.svc.cluster.local", s.port, s.name, s.ns)
}

const (
	fedSNI     = "federation.isthmus.internal"
	fedCluster = "isthmus-federation"
)

func mustAny(tb testing.TB, m proto.Message) *anypb.Any {
	tb.Helper()
	a, err := anypb.New(m)
	require.NoError(tb, err)
	return a
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func tcpChain(tb testing.TB, sni, cluster string) *listenerv3.FilterChain {
	return &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: []string{sni}},
		Filters: []*listenerv3.Filter{{
			Name: "envoy.filters.network.tcp_proxy",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tb, &tcpproxyv3.TcpProxy{
				StatPrefix:       cluster,
				ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
				IdleTimeout:      durationpb.New(time.Hour),
			})},
		}},
	}
}

func gatewayListener(tb testing.TB, chains ...*listenerv3.FilterChain) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name:    gwListener,
		Address: socketAddress("0.0.0.0", 15443),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       "envoy.filters.listener.tls_inspector",
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &tlsinspectorv3.TlsInspector{})},
		}},
		FilterChains: chains,
	}
}

func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
			ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
			ResourceApiVersion:    corev3.ApiVersion_V3,
		}},
		ConnectTimeout: durationpb.New(time.Second),
		LbPolicy:       clusterv3.Cluster_ROUND_ROBIN,
	}
}

// fedClusterFor is isthmus-federation: STATIC for an IP upstream,
// STRICT_DNS for a hostname.
func fedClusterFor(host string, port uint32) *clusterv3.Cluster {
	typ := clusterv3.Cluster_STATIC
	if _, err := netip.ParseAddr(host); err != nil {
		typ = clusterv3.Cluster_STRICT_DNS
	}
	return &clusterv3.Cluster{
		Name:                 fedCluster,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(time.Second),
		LoadAssignment:       assignment(fedCluster, ep{ip: host, port: port, healthy: true}),
	}
}

func assignment(name string, eps ...ep) *endpointv3.ClusterLoadAssignment {
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	byLoc := map[[2]string]*endpointv3.LocalityLbEndpoints{}
	for _, e := range eps {
		k := [2]string{e.region, e.zone}
		le := byLoc[k]
		if le == nil {
			le = &endpointv3.LocalityLbEndpoints{}
			if e.region != "" || e.zone != "" {
				le.Locality = &corev3.Locality{Region: e.region, Zone: e.zone}
			}
			byLoc[k] = le
			cla.Endpoints = append(cla.Endpoints, le)
		}
		hs := corev3.HealthStatus_HEALTHY
		if !e.healthy {
			hs = corev3.HealthStatus_UNHEALTHY
		}
		le.LbEndpoints = append(le.LbEndpoints, &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(e.ip, e.port)}},
			HealthStatus:   hs,
		})
	}
	return cla
}

// gatewayResources is what the federator emits for these exported
// services plus the federation cluster (upstream federator at fedHost).
type gatewayResources struct {
	listeners, clusters, assignments []proto.Message
}

func buildGateway(tb testing.TB, fedHost string, svcs ...service) gatewayResources {
	var r gatewayResources
	chains := []*listenerv3.FilterChain{tcpChain(tb, fedSNI, fedCluster)}
	r.clusters = append(r.clusters, fedClusterFor(fedHost, 15012))
	for _, s := range svcs {
		chains = append(chains, tcpChain(tb, s.sni(), s.cluster()))
		r.clusters = append(r.clusters, edsCluster(s.cluster()))
		r.assignments = append(r.assignments, assignment(s.cluster(), s.eps...))
	}
	sortChains(chains)
	r.listeners = []proto.Message{gatewayListener(tb, chains...)}
	return r
}

func sortChains(chains []*listenerv3.FilterChain) {
	for i := 1; i < len(chains); i++ {
		for j := i; j > 0 && chains[j].FilterChainMatch.ServerNames[0] < chains[j-1].FilterChainMatch.ServerNames[0]; j-- {
			chains[j], chains[j-1] = chains[j-1], chains[j]
		}
	}
}

func (r gatewayResources) anys(tb testing.TB) []*anypb.Any {
	var out []*anypb.Any
	for _, list := range [][]proto.Message{r.listeners, r.clusters, r.assignments} {
		for _, m := range list {
			out = append(out, mustAny(tb, m))
		}
	}
	return out
}

// The services most tests use.
var (
	echo = service{name: "echo", ns: "demo", port: 80, eps: []ep{
		{ip: "10.1.0.1", port: 8080, healthy: true, region: "eu", zone: "eu-a"},
		{ip: "10.1.0.2", port: 8080, healthy: true, region: "eu", zone: "eu-a"},
		{ip: "10.1.1.1", port: 8080, healthy: false, region: "eu", zone: "eu-b"},
	}}
)

// requireConsistent checks what a published Config promises.
func requireConsistent(t testing.TB, cfg *Config) {
	if cfg == nil {
		return
	}
	for _, l := range cfg.Listeners {
		for _, ch := range l.Chains {
			if _, ok := cfg.Clusters[ch.Cluster]; !ok {
				t.Errorf("chain %v names missing cluster %q", ch.SNIs, ch.Cluster)
			}
		}
	}
	for name, cl := range cfg.Clusters {
		if cl.Name != name {
			t.Errorf("cluster %q stored as %q", cl.Name, name)
		}
		for _, e := range cl.Endpoints {
			if e.Port == 0 || (e.Host == "") == !e.Addr.IsValid() {
				t.Errorf("cluster %q: bad endpoint %+v", name, e)
			}
		}
	}
}
