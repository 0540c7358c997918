package gwroutes

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

const (
	echoSNI     = "outbound_.80_._.echo.demo.svc.cluster.local"
	echoCluster = "outbound|80||echo.demo.svc.cluster.local"
	fedSNI      = "federation.isthmus.internal"
	fedCluster  = "isthmus-federation"
)

func config(fed xdsclient.Cluster) *xdsclient.Config {
	return &xdsclient.Config{
		Listeners: []xdsclient.Listener{{Name: "eastwest-gw", Port: 15443, Chains: []xdsclient.Chain{
			{SNIs: []string{fedSNI}, Cluster: fedCluster, IdleTimeout: time.Hour},
			{SNIs: []string{echoSNI, "echo.alias.example"}, Cluster: echoCluster, IdleTimeout: 2 * time.Minute},
		}}},
		Clusters: map[string]xdsclient.Cluster{
			fedCluster: fed,
			echoCluster: {Name: echoCluster, Type: xdsclient.EDS, ServiceName: echoCluster, ConnectTimeout: time.Second, Endpoints: []xdsclient.Endpoint{
				{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Port: 8080, Healthy: true},
				{Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Port: 8080, Healthy: false},
			}},
		},
	}
}

func TestRoutes(t *testing.T) {
	static := xdsclient.Cluster{Name: fedCluster, Type: xdsclient.Static, ConnectTimeout: 3 * time.Second,
		Endpoints: []xdsclient.Endpoint{{Addr: netip.MustParseAddrPort("10.0.0.5:15012"), Port: 15012, Healthy: true}}}
	r, err := Routes(config(static))
	require.NoError(t, err)
	require.Equal(t, 3, r.Len())
	echo, ok := r.Route("OUTBOUND_.80_._.echo.demo.svc.cluster.local")
	require.True(t, ok)
	require.Equal(t, gateway.Route{SNI: echoSNI, Cluster: echoCluster, ConnectTimeout: time.Second, IdleTimeout: 2 * time.Minute,
		Endpoints: []gateway.Endpoint{
			{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Healthy: true},
			{Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Healthy: false},
		}}, echo)
	alias, ok := r.Route("echo.alias.example")
	require.True(t, ok)
	require.Equal(t, echoCluster, alias.Cluster)
	fed, ok := r.Route(fedSNI)
	require.True(t, ok)
	require.Equal(t, []gateway.Endpoint{{Addr: netip.MustParseAddrPort("10.0.0.5:15012"), Healthy: true}}, fed.Endpoints)
	require.Empty(t, fed.DNS)
	require.Equal(t, 3*time.Second, fed.ConnectTimeout)

	dns := xdsclient.Cluster{Name: fedCluster, Type: xdsclient.StrictDNS, ConnectTimeout: time.Second,
		Endpoints: []xdsclient.Endpoint{{Host: "federator.alpha.example", Port: 15012, Healthy: true}}}
	r, err = Routes(config(dns))
	require.NoError(t, err)
	fed, _ = r.Route(fedSNI)
	require.Equal(t, "federator.alpha.example:15012", fed.DNS)
	require.Empty(t, fed.Endpoints)

	for name, tc := range map[string]struct {
		cfg  func() *xdsclient.Config
		want string
	}{
		"two listeners": {func() *xdsclient.Config {
			c := config(static)
			c.Listeners = append(c.Listeners, c.Listeners[0])
			return c
		}, "the gateway serves exactly one listener, got 2"},
		"two hostnames": {func() *xdsclient.Config {
			d := dns
			d.Endpoints = append(d.Endpoints, xdsclient.Endpoint{Host: "federator-b.alpha.example", Port: 15012, Healthy: true})
			return config(d)
		}, `cluster "isthmus-federation": the gateway resolves one hostname per STRICT_DNS cluster, got 2 endpoints`},
		"no config": {func() *xdsclient.Config { return nil }, "no config"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Routes(tc.cfg())
			require.ErrorContains(t, err, tc.want)
			require.ErrorContains(t, Check(tc.cfg()), tc.want)
		})
	}
}

// The wiring cmd/eastwest-gw does, against go-control-plane's server: the
// client with Check, a Source on top, and a config the gateway cannot
// route NACKed while the table stays.
func TestSourceFollowsTheClient(t *testing.T) {
	node := xdsclient.GatewayNode("alpha", "10.0.0.9", "eastwest-gw-0", "isthmus-system")
	snaps := cache.NewSnapshotCache(true, cache.IDHash{}, nil)
	nacks := make(chan *discoveryv3.DiscoveryRequest, 8)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	gs := grpc.NewServer()
	ctx, cancel := context.WithCancel(context.Background())
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, snaps, serverv3.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discoveryv3.DiscoveryRequest) error {
			if r.GetErrorDetail() != nil {
				nacks <- proto.Clone(r).(*discoveryv3.DiscoveryRequest)
			}
			return nil
		},
	}))
	served := make(chan struct{})
	go func() { defer close(served); _ = gs.Serve(lis) }()
	t.Cleanup(func() { gs.Stop(); cancel(); <-served })

	set := func(version string, listeners ...types.Resource) {
		snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
			resource.ListenerType: listeners,
			resource.ClusterType:  {edsCluster(echoCluster)},
			resource.EndpointType: {assignment(echoCluster, "10.1.0.1")},
		})
		require.NoError(t, err)
		require.NoError(t, snaps.SetSnapshot(context.Background(), node.ID, snap))
	}
	set("v1", listener(t, "eastwest-gw"))

	builder := NewBuilder()
	client, err := xdsclient.New(xdsclient.ClientConfig{Server: lis.Addr().String(), Plaintext: true, Node: node,
		BackoffMin: 10 * time.Millisecond, BackoffMax: 100 * time.Millisecond, Check: builder.Check})
	require.NoError(t, err)
	src := NewSource(client, builder, nil)
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- client.Run(runCtx) }()
	go func() { done <- src.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		for range 2 {
			require.NoError(t, <-done)
		}
	})

	select {
	case <-src.Updated():
	case <-time.After(15 * time.Second):
		t.Fatal("no routes")
	}
	first := src.Routes()
	checked, err := builder.Build(client.Current())
	require.NoError(t, err)
	require.Same(t, checked, first, "the table Check built is the one routed")
	rt, ok := first.Route(echoSNI)
	require.True(t, ok)
	require.Equal(t, []gateway.Endpoint{{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Healthy: true}}, rt.Endpoints)

	// Two listeners: valid xDS, but not a gateway's. NACKed by Check.
	set("v2", listener(t, "eastwest-gw"), listener(t, "another"))
	select {
	case n := <-nacks:
		require.Contains(t, n.GetErrorDetail().GetMessage(), "the gateway serves exactly one listener, got 2")
		require.Equal(t, "v1", n.GetVersionInfo())
	case <-time.After(15 * time.Second):
		t.Fatal("no NACK")
	}
	require.Same(t, first, src.Routes())
}

func listener(t *testing.T, name string) *listenerv3.Listener {
	tp, err := anypb.New(&tcpproxyv3.TcpProxy{StatPrefix: echoCluster,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: echoCluster}, IdleTimeout: durationpb.New(time.Hour)})
	require.NoError(t, err)
	return &listenerv3.Listener{
		Name:            name,
		Address:         sockAddr("0.0.0.0", 15443),
		ListenerFilters: []*listenerv3.ListenerFilter{{Name: "envoy.filters.listener.tls_inspector"}},
		FilterChains: []*listenerv3.FilterChain{{
			FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: []string{echoSNI}},
			Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.tcp_proxy",
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: tp}}},
		}},
	}
}

func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
			ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		}},
		ConnectTimeout: durationpb.New(time.Second),
	}
}

func assignment(name, ip string) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
		LbEndpoints: []*endpointv3.LbEndpoint{{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: sockAddr(ip, 8080)}},
			HealthStatus:   corev3.HealthStatus_HEALTHY,
		}},
	}}}
}

func sockAddr(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}
