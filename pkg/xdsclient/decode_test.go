package xdsclient

import (
	"net/netip"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func TestTypeURLsMatchGoControlPlane(t *testing.T) {
	require.Equal(t, resource.ListenerType, TypeListener)
	require.Equal(t, resource.ClusterType, TypeCluster)
	require.Equal(t, resource.EndpointType, TypeClusterLoadAssignment)
	require.Equal(t, resource.SecretType, TypeSecret)
}

// mutable is one fresh copy of the gateway's resources (echo + the
// federation cluster) for a case to break.
type mutable struct {
	l   *listenerv3.Listener
	fed *clusterv3.Cluster // isthmus-federation, STATIC
	eds *clusterv3.Cluster // echo's EDS cluster
	cla *endpointv3.ClusterLoadAssignment
}

func newMutable(t testing.TB) *mutable {
	r := buildGateway(t, "10.0.0.5", echo)
	return &mutable{
		l:   r.listeners[0].(*listenerv3.Listener),
		fed: r.clusters[0].(*clusterv3.Cluster),
		eds: r.clusters[1].(*clusterv3.Cluster),
		cla: r.assignments[0].(*endpointv3.ClusterLoadAssignment),
	}
}

func (m *mutable) decode(t testing.TB) (*Config, error) {
	return Decode(mustAny(t, m.l), mustAny(t, m.fed), mustAny(t, m.eds), mustAny(t, m.cla))
}

// echoChain is the listener's chain for echo (the federation chain sorts
// first).
func (m *mutable) echoChain() *listenerv3.FilterChain { return m.l.FilterChains[1] }

func (m *mutable) echoTCPProxy(t testing.TB) *tcpproxyv3.TcpProxy {
	tp := new(tcpproxyv3.TcpProxy)
	require.NoError(t, m.echoChain().Filters[0].GetTypedConfig().UnmarshalTo(tp))
	return tp
}

func (m *mutable) setEchoTCPProxy(t testing.TB, tp *tcpproxyv3.TcpProxy) {
	m.echoChain().Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, tp)}
}

func (m *mutable) lbEndpoint() *endpointv3.LbEndpoint { return m.cla.Endpoints[0].LbEndpoints[0] }

func TestDecodeRefusesWhatTheContractDoesNotDescribe(t *testing.T) {
	const (
		lis  = `listener "eastwest-gw": `
		echo = `outbound|80||echo.demo.svc.cluster.local`
	)
	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T, m *mutable)
		want   string
	}{
		{"unknown listener filter", func(t *testing.T, m *mutable) {
			m.l.ListenerFilters[0].Name = "envoy.filters.listener.http_inspector"
			m.l.ListenerFilters[0].ConfigType = nil
		}, lis + `listener_filters[0].name: unsupported listener filter "envoy.filters.listener.http_inspector" (only envoy.filters.listener.tls_inspector)`},
		{"no tls_inspector", func(t *testing.T, m *mutable) {
			m.l.ListenerFilters = nil
		}, lis + `listener_filters: want exactly one envoy.filters.listener.tls_inspector, got 0`},
		{"tls_inspector option", func(t *testing.T, m *mutable) {
			m.l.ListenerFilters[0].ConfigType = &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(t, &tlsinspectorv3.TlsInspector{EnableJa3Fingerprinting: wrapperspb.Bool(true)})}
		}, lis + `listener_filters[0].typed_config.enable_ja3_fingerprinting: not supported`},
		{"http_connection_manager", func(t *testing.T, m *mutable) {
			m.echoChain().Filters[0].Name = "envoy.filters.network.http_connection_manager"
		}, lis + `filter_chains[1].filters[0].name: unsupported network filter "envoy.filters.network.http_connection_manager" (only envoy.filters.network.tcp_proxy)`},
		{"chain without filters", func(t *testing.T, m *mutable) {
			m.echoChain().Filters = nil
		}, lis + `filter_chains[1].filters: want exactly one envoy.filters.network.tcp_proxy, got 0 filters`},
		{"chain with two tcp_proxies", func(t *testing.T, m *mutable) {
			m.echoChain().Filters = append(m.echoChain().Filters, m.echoChain().Filters[0])
		}, lis + `filter_chains[1].filters: want exactly one envoy.filters.network.tcp_proxy, got 2 filters`},
		{"tcp_proxy with another type's config", func(t *testing.T, m *mutable) {
			m.echoChain().Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, &tlsinspectorv3.TlsInspector{})}
		}, lis + `filter_chains[1].filters[0].typed_config: unsupported type "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" (want type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy)`},
		{"unknown typed_config type", func(t *testing.T, m *mutable) {
			m.echoChain().Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/acme.Proxy"}}
		}, lis + `filter_chains[1].filters[0].typed_config: unsupported type "type.googleapis.com/acme.Proxy"`},
		{"tcp_proxy without typed_config", func(t *testing.T, m *mutable) {
			m.echoChain().Filters[0].ConfigType = nil
		}, lis + `filter_chains[1].filters[0].typed_config: is missing`},
		{"weighted_clusters", func(t *testing.T, m *mutable) {
			tp := m.echoTCPProxy(t)
			tp.ClusterSpecifier = &tcpproxyv3.TcpProxy_WeightedClusters{WeightedClusters: &tcpproxyv3.TcpProxy_WeightedCluster{
				Clusters: []*tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{{Name: echo, Weight: 1}},
			}}
			m.setEchoTCPProxy(t, tp)
		}, lis + `filter_chains[1].filters[0].typed_config.weighted_clusters: not supported: one cluster per chain`},
		{"tcp_proxy access log", func(t *testing.T, m *mutable) {
			tp := m.echoTCPProxy(t)
			tp.MaxConnectAttempts = wrapperspb.UInt32(3)
			m.setEchoTCPProxy(t, tp)
		}, lis + `filter_chains[1].filters[0].typed_config.max_connect_attempts: not supported`},
		{"idle timeout disabled", func(t *testing.T, m *mutable) {
			tp := m.echoTCPProxy(t)
			tp.IdleTimeout = durationpb.New(0)
			m.setEchoTCPProxy(t, tp)
		}, lis + `filter_chains[1].filters[0].typed_config.idle_timeout: 0s is not above zero`},
		{"empty tcp_proxy cluster", func(t *testing.T, m *mutable) {
			tp := m.echoTCPProxy(t)
			tp.ClusterSpecifier = &tcpproxyv3.TcpProxy_Cluster{}
			m.setEchoTCPProxy(t, tp)
		}, lis + `filter_chains[1].filters[0].typed_config.cluster: is empty`},
		{"match on destination port", func(t *testing.T, m *mutable) {
			m.echoChain().FilterChainMatch.DestinationPort = wrapperspb.UInt32(15443)
		}, lis + `filter_chains[1].filter_chain_match.destination_port: not supported`},
		{"match on transport protocol", func(t *testing.T, m *mutable) {
			m.echoChain().FilterChainMatch.TransportProtocol = "tls"
		}, lis + `filter_chains[1].filter_chain_match.transport_protocol: not supported`},
		{"catch-all chain", func(t *testing.T, m *mutable) {
			m.echoChain().FilterChainMatch = nil
		}, lis + `filter_chains[1].filter_chain_match.server_names: is empty: a chain must match server names (there is no catch-all chain)`},
		{"default filter chain", func(t *testing.T, m *mutable) {
			m.l.DefaultFilterChain = m.echoChain()
		}, lis + `default_filter_chain: not supported`},
		{"wildcard server name", func(t *testing.T, m *mutable) {
			m.echoChain().FilterChainMatch.ServerNames = []string{"*.demo.svc.cluster.local"}
		}, lis + `filter_chains[1].filter_chain_match.server_names[0]: "*.demo.svc.cluster.local": byte 0x2a at 0 is not allowed`},
		{"the same server name twice", func(t *testing.T, m *mutable) {
			m.echoChain().FilterChainMatch.ServerNames = []string{"FEDERATION.isthmus.internal"}
		}, lis + `filter_chains[1].filter_chain_match.server_names: "federation.isthmus.internal" is also matched by filter_chains[0]`},
		{"chain terminating TLS", func(t *testing.T, m *mutable) {
			m.echoChain().TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls",
				ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, &tlsv3.DownstreamTlsContext{})}}
		}, lis + `filter_chains[1].transport_socket: not supported`},
		{"original destination listener", func(t *testing.T, m *mutable) {
			m.l.UseOriginalDst = wrapperspb.Bool(true)
		}, lis + `use_original_dst: not supported`},
		{"no filter chains", func(t *testing.T, m *mutable) {
			m.l.FilterChains = nil
		}, lis + `filter_chains: is empty`},
		{"listener on a pipe", func(t *testing.T, m *mutable) {
			m.l.Address = &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/tmp/gw"}}}
		}, lis + `address.pipe: not supported`},
		{"listener on UDP", func(t *testing.T, m *mutable) {
			m.l.Address.GetSocketAddress().Protocol = corev3.SocketAddress_UDP
		}, lis + `address.socket_address.protocol: UDP is not supported (TCP)`},
		{"logical DNS cluster", func(t *testing.T, m *mutable) {
			m.fed.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_LOGICAL_DNS}
		}, `cluster "isthmus-federation": type: LOGICAL_DNS is not supported (EDS, STATIC or STRICT_DNS)`},
		{"original destination cluster", func(t *testing.T, m *mutable) {
			m.eds.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST}
			m.eds.EdsClusterConfig = nil
		}, `cluster "` + echo + `": type: ORIGINAL_DST is not supported`},
		{"custom cluster type", func(t *testing.T, m *mutable) {
			m.eds.ClusterDiscoveryType = &clusterv3.Cluster_ClusterType{ClusterType: &clusterv3.Cluster_CustomClusterType{Name: "envoy.clusters.aggregate"}}
		}, `cluster "` + echo + `": cluster_type: not supported`},
		{"EDS without eds_cluster_config", func(t *testing.T, m *mutable) {
			m.eds.EdsClusterConfig = nil
		}, `cluster "` + echo + `": eds_cluster_config: is missing for type EDS`},
		{"EDS from a file", func(t *testing.T, m *mutable) {
			m.eds.EdsClusterConfig.EdsConfig = &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_PathConfigSource{PathConfigSource: &corev3.PathConfigSource{Path: "/etc/eds.yaml"}}}
		}, `cluster "` + echo + `": eds_cluster_config.eds_config: only ads {} is supported`},
		{"EDS from another server", func(t *testing.T, m *mutable) {
			m.eds.EdsClusterConfig.EdsConfig = &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{ApiType: corev3.ApiConfigSource_GRPC}}}
		}, `cluster "` + echo + `": eds_cluster_config.eds_config: only ads {} is supported`},
		{"EDS with an initial fetch timeout", func(t *testing.T, m *mutable) {
			m.eds.EdsClusterConfig.EdsConfig.InitialFetchTimeout = durationpb.New(time.Second)
		}, `cluster "` + echo + `": eds_cluster_config.eds_config.initial_fetch_timeout: not supported`},
		{"least request", func(t *testing.T, m *mutable) {
			m.eds.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
		}, `cluster "` + echo + `": lb_policy: LEAST_REQUEST is not supported (ROUND_ROBIN)`},
		{"upstream TLS", func(t *testing.T, m *mutable) {
			m.eds.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls"}
		}, `cluster "` + echo + `": transport_socket: not supported`},
		{"circuit breakers", func(t *testing.T, m *mutable) {
			m.eds.CircuitBreakers = &clusterv3.CircuitBreakers{}
		}, `cluster "` + echo + `": circuit_breakers: not supported`},
		{"zero connect timeout", func(t *testing.T, m *mutable) {
			m.eds.ConnectTimeout = durationpb.New(0)
		}, `cluster "` + echo + `": connect_timeout: 0s is not above zero`},
		{"EDS cluster with inline endpoints", func(t *testing.T, m *mutable) {
			m.eds.LoadAssignment = assignment(echo)
		}, `cluster "` + echo + `": load_assignment: not supported with type EDS`},
		{"STATIC without endpoints", func(t *testing.T, m *mutable) {
			m.fed.LoadAssignment = nil
		}, `cluster "isthmus-federation": load_assignment: is missing for type STATIC`},
		{"STATIC with a hostname", func(t *testing.T, m *mutable) {
			m.fed.LoadAssignment = assignment(fedCluster, ep{ip: "federator.example", port: 15012})
		}, `cluster "isthmus-federation": load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: "federator.example" is not an IP address`},
		{"STRICT_DNS with a bad name", func(t *testing.T, m *mutable) {
			m.fed.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS}
			m.fed.LoadAssignment = assignment(fedCluster, ep{ip: "federator..example", port: 15012})
		}, `socket_address.address: "federator..example" is neither an IP address nor a DNS name: empty label`},
		{"endpoint on a pipe", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().Address = &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/tmp/echo"}}}
		}, `cluster_load_assignment "` + echo + `": endpoints[0].lb_endpoints[0].endpoint.address.pipe: not supported`},
		{"internal address", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().Address = &corev3.Address{Address: &corev3.Address_EnvoyInternalAddress{EnvoyInternalAddress: &corev3.EnvoyInternalAddress{}}}
		}, `endpoints[0].lb_endpoints[0].endpoint.address.envoy_internal_address: not supported`},
		{"named endpoint", func(t *testing.T, m *mutable) {
			m.lbEndpoint().HostIdentifier = &endpointv3.LbEndpoint_EndpointName{EndpointName: "pod-a"}
		}, `endpoints[0].lb_endpoints[0].endpoint_name: not supported`},
		{"weighted endpoint", func(t *testing.T, m *mutable) {
			m.lbEndpoint().LoadBalancingWeight = wrapperspb.UInt32(5)
		}, `endpoints[0].lb_endpoints[0].load_balancing_weight: not supported`},
		{"endpoint hostname", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().Hostname = "pod-a"
		}, `endpoints[0].lb_endpoints[0].endpoint.hostname: not supported`},
		{"zero port", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().GetAddress().GetSocketAddress().PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: 0}
		}, `endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: 0 is not a port`},
		{"port out of range", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().GetAddress().GetSocketAddress().PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: 70000}
		}, `socket_address.port_value: 70000 is not a port`},
		{"named port", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().GetAddress().GetSocketAddress().PortSpecifier = &corev3.SocketAddress_NamedPort{NamedPort: "http"}
		}, `socket_address.named_port: not supported`},
		{"IPv6 zone", func(t *testing.T, m *mutable) {
			m.lbEndpoint().GetEndpoint().GetAddress().GetSocketAddress().Address = "fe80::1%eth0"
		}, `"fe80::1%eth0": zones are not supported`},
		{"priorities", func(t *testing.T, m *mutable) {
			m.cla.Endpoints[0].Priority = 1
		}, `cluster_load_assignment "` + echo + `": endpoints[0].priority: not supported`},
		{"overprovisioning policy", func(t *testing.T, m *mutable) {
			m.cla.Policy = &endpointv3.ClusterLoadAssignment_Policy{OverprovisioningFactor: wrapperspb.UInt32(140)}
		}, `cluster_load_assignment "` + echo + `": policy: not supported`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMutable(t)
			tc.mutate(t, m)
			cfg, err := m.decode(t)
			require.Nil(t, cfg)
			require.ErrorContains(t, err, tc.want)
			require.NotErrorIs(t, err, ErrIncomplete)
		})
	}
}

func TestDecodeRefusesBadResourceSets(t *testing.T) {
	m := newMutable(t)
	for _, tc := range []struct {
		name string
		res  []*anypb.Any
		want string
	}{
		{"garbage", []*anypb.Any{{TypeUrl: TypeListener, Value: []byte{0xff, 0xff}}},
			`listener #0: cannot decode: `},
		{"unsupported type", []*anypb.Any{mustAny(t, &routev3.RouteConfiguration{Name: "80"})},
			`resource #0: unsupported type "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"`},
		{"two listeners with one name", []*anypb.Any{mustAny(t, m.l), mustAny(t, m.l)},
			`listener "eastwest-gw": name: duplicate listener name in the response`},
		{"two clusters with one name", []*anypb.Any{mustAny(t, m.fed), mustAny(t, m.fed)},
			`cluster "isthmus-federation": name: duplicate cluster name in the response`},
		{"two assignments with one name", []*anypb.Any{mustAny(t, m.cla), mustAny(t, m.cla)},
			`cluster_load_assignment "outbound|80||echo.demo.svc.cluster.local": cluster_name: duplicate cluster_name in the response`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode(tc.res...)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestDecodeReportsEveryProblem(t *testing.T) {
	m := newMutable(t)
	m.echoChain().Filters[0].Name = "envoy.filters.network.redis_proxy"
	m.l.FilterChains[0].FilterChainMatch.DestinationPort = wrapperspb.UInt32(1)
	m.eds.LbPolicy = clusterv3.Cluster_RANDOM
	_, err := m.decode(t)
	require.ErrorContains(t, err, `listener "eastwest-gw": filter_chains[0].filter_chain_match.destination_port: not supported; filter_chains[1].filters[0].name: unsupported network filter "envoy.filters.network.redis_proxy"`)
	require.ErrorContains(t, err, `cluster "outbound|80||echo.demo.svc.cluster.local": lb_policy: RANDOM is not supported`)
}

func TestNACKMessageIsBounded(t *testing.T) {
	var res []*anypb.Any
	for i := range 50 {
		c := edsCluster("c" + itoa(i))
		c.LbPolicy = clusterv3.Cluster_RANDOM
		res = append(res, mustAny(t, c))
	}
	s := &state{}
	_, err := s.apply(TypeCluster, res)
	msg := nackMessage(err)
	require.Contains(t, msg, `cluster "c0": lb_policy: RANDOM is not supported`)
	require.Contains(t, msg, `cluster "c19"`)
	require.NotContains(t, msg, `cluster "c20"`)
	require.Contains(t, msg, "and 30 more problems")
}

func TestDecodeAccepts(t *testing.T) {
	t.Run("STRICT_DNS federation upstream", func(t *testing.T) {
		m := newMutable(t)
		m.fed = fedClusterFor("Federator.alpha.example", 15012)
		cfg, err := m.decode(t)
		require.NoError(t, err)
		require.Equal(t, Cluster{Name: fedCluster, Type: StrictDNS, ConnectTimeout: time.Second,
			Endpoints: []Endpoint{{Host: "federator.alpha.example", Port: 15012, Healthy: true}}}, cfg.Clusters[fedCluster])
		require.Equal(t, "federator.alpha.example:15012", cfg.Clusters[fedCluster].Endpoints[0].HostPort())
	})
	t.Run("Envoy's defaults and health statuses", func(t *testing.T) {
		m := newMutable(t)
		tp := m.echoTCPProxy(t)
		tp.IdleTimeout = nil
		m.setEchoTCPProxy(t, tp)
		m.l.ListenerFilters[0].ConfigType = nil
		m.eds.ConnectTimeout = nil
		m.eds.EdsClusterConfig.EdsConfig.ResourceApiVersion = corev3.ApiVersion_AUTO
		m.eds.EdsClusterConfig.ServiceName = "echo-eds"
		m.cla.ClusterName = "echo-eds"
		eps := m.cla.Endpoints[0].LbEndpoints
		eps[0].HealthStatus = corev3.HealthStatus_UNKNOWN
		eps[1].HealthStatus = corev3.HealthStatus_DRAINING
		m.echoChain().FilterChainMatch.ServerNames = []string{"Outbound_.80_._.Echo.demo.svc.cluster.local"}
		cfg, err := m.decode(t)
		require.NoError(t, err)
		ch := cfg.Listeners[0].Chains[1]
		require.Equal(t, time.Hour, ch.IdleTimeout)
		require.Equal(t, []string{"outbound_.80_._.echo.demo.svc.cluster.local"}, ch.SNIs)
		c := cfg.Clusters[m.eds.Name]
		require.Equal(t, 5*time.Second, c.ConnectTimeout)
		require.Equal(t, "echo-eds", c.ServiceName)
		require.True(t, c.Endpoints[0].Healthy)
		require.False(t, c.Endpoints[1].Healthy)
		require.Equal(t, netip.MustParseAddrPort("10.1.0.2:8080"), c.Endpoints[1].Addr)
	})
	t.Run("IPv4-mapped addresses are unmapped", func(t *testing.T) {
		m := newMutable(t)
		m.lbEndpoint().GetEndpoint().GetAddress().GetSocketAddress().Address = "::ffff:10.1.0.1"
		cfg, err := m.decode(t)
		require.NoError(t, err)
		require.Equal(t, netip.MustParseAddrPort("10.1.0.1:8080"), cfg.Clusters[m.eds.Name].Endpoints[0].Addr)
	})
	t.Run("a service with no pods", func(t *testing.T) {
		m := newMutable(t)
		m.cla.Endpoints = nil
		cfg, err := m.decode(t)
		require.NoError(t, err)
		require.Empty(t, cfg.Clusters[m.eds.Name].Endpoints)
	})
	t.Run("nothing at all", func(t *testing.T) {
		cfg, err := Decode()
		require.NoError(t, err)
		require.Empty(t, cfg.Listeners)
		require.Empty(t, cfg.Clusters)
	})
}

func TestDecodeIncomplete(t *testing.T) {
	m := newMutable(t)
	_, err := Decode(mustAny(t, m.l), mustAny(t, m.eds), mustAny(t, m.cla))
	require.ErrorIs(t, err, ErrIncomplete)
	require.ErrorContains(t, err, `listener "eastwest-gw" names cluster "isthmus-federation", which is not there`)

	_, err = Decode(mustAny(t, m.l), mustAny(t, m.fed), mustAny(t, m.eds))
	require.ErrorIs(t, err, ErrIncomplete)
	require.ErrorContains(t, err, `cluster "outbound|80||echo.demo.svc.cluster.local" has no ClusterLoadAssignment "outbound|80||echo.demo.svc.cluster.local"`)
}
