package xds

import (
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/anypb"
)

// consistent says what go-control-plane's Consistent says of the same
// resources, for every kind of reference Resources can hold.
func TestConsistentAgreesWithGoControlPlane(t *testing.T) {
	gw, err := TranslateGateway(snapshotOf(t, echoService()), GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)
	cla := func(name string) *endpointv3.ClusterLoadAssignment {
		return &endpointv3.ClusterLoadAssignment{ClusterName: name}
	}
	withService := func(name, service string) *clusterv3.Cluster {
		c := edsCluster(name)
		c.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: c.EdsClusterConfig.EdsConfig, ServiceName: service}
		return c
	}
	hcmConfig := func(t *testing.T, m *hcmv3.HttpConnectionManager, prefix string) *listenerv3.Filter {
		a, err := anypb.New(m)
		require.NoError(t, err)
		if prefix != "" {
			a.TypeUrl = prefix + "/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
		}
		return &listenerv3.Filter{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}
	}
	rds := func(route string) *hcmv3.HttpConnectionManager {
		return &hcmv3.HttpConnectionManager{StatPrefix: "http", RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: route}}}
	}
	scoped := func(routes ...string) *hcmv3.HttpConnectionManager {
		var list []*routev3.ScopedRouteConfiguration
		for _, r := range routes {
			list = append(list, &routev3.ScopedRouteConfiguration{Name: "s-" + r, RouteConfigurationName: r})
		}
		return &hcmv3.HttpConnectionManager{StatPrefix: "http", RouteSpecifier: &hcmv3.HttpConnectionManager_ScopedRoutes{ScopedRoutes: &hcmv3.ScopedRoutes{
			ConfigSpecifier: &hcmv3.ScopedRoutes_ScopedRouteConfigurationsList{ScopedRouteConfigurationsList: &hcmv3.ScopedRouteConfigurationsList{ScopedRouteConfigurations: list}},
		}}}
	}
	listener := func(filters ...*listenerv3.Filter) *listenerv3.Listener {
		return &listenerv3.Listener{Name: "l", FilterChains: []*listenerv3.FilterChain{{Filters: filters}}}
	}
	route := func(name string) *routev3.RouteConfiguration { return &routev3.RouteConfiguration{Name: name} }

	tests := []struct {
		name       string
		resources  Resources
		consistent bool
	}{
		{name: "the gateway's", consistent: true, resources: Resources{
			Listeners: []*listenerv3.Listener{gw.Listeners[0]},
			Clusters:  []*clusterv3.Cluster{gw.Clusters[0], gw.Clusters[1], gw.Clusters[2]},
			Endpoints: []*endpointv3.ClusterLoadAssignment{gw.Endpoints[0], gw.Endpoints[1]},
		}},
		{name: "a cluster without its endpoints", resources: Resources{
			Listeners: []*listenerv3.Listener{gw.Listeners[0]},
			Clusters:  []*clusterv3.Cluster{gw.Clusters[0], gw.Clusters[1], gw.Clusters[2]},
			Endpoints: []*endpointv3.ClusterLoadAssignment{gw.Endpoints[0]},
		}},
		{name: "endpoints of no cluster", resources: Resources{
			Clusters:  []*clusterv3.Cluster{gw.Clusters[1]},
			Endpoints: []*endpointv3.ClusterLoadAssignment{gw.Endpoints[0], cla("other")},
		}},
		{name: "endpoints named otherwise", resources: Resources{
			Clusters:  []*clusterv3.Cluster{edsCluster("a")},
			Endpoints: []*endpointv3.ClusterLoadAssignment{cla("b")},
		}},
		{name: "a static cluster names nothing", consistent: true, resources: Resources{
			Clusters: []*clusterv3.Cluster{gw.Clusters[0]},
		}},
		{name: "an EDS service name", consistent: true, resources: Resources{
			Clusters:  []*clusterv3.Cluster{withService("a", "svc")},
			Endpoints: []*endpointv3.ClusterLoadAssignment{cla("svc")},
		}},
		{name: "an EDS service name, endpoints by cluster name", resources: Resources{
			Clusters:  []*clusterv3.Cluster{withService("a", "svc")},
			Endpoints: []*endpointv3.ClusterLoadAssignment{cla("a")},
		}},
		{name: "RDS", consistent: true, resources: Resources{
			Listeners: []*listenerv3.Listener{listener(hcmConfig(t, rds("r1"), ""))},
			Routes:    []*routev3.RouteConfiguration{route("r1")},
		}},
		{name: "RDS without the route", resources: Resources{
			Listeners: []*listenerv3.Listener{listener(hcmConfig(t, rds("r1"), ""))},
		}},
		{name: "a route nothing names", resources: Resources{
			Listeners: []*listenerv3.Listener{listener(hcmConfig(t, rds("r1"), ""))},
			Routes:    []*routev3.RouteConfiguration{route("r1"), route("r2")},
		}},
		{name: "RDS in the default chain", consistent: true, resources: Resources{
			Listeners: []*listenerv3.Listener{&listenerv3.Listener{Name: "l", DefaultFilterChain: &listenerv3.FilterChain{
				Filters: []*listenerv3.Filter{hcmConfig(t, rds("r1"), "")},
			}}},
			Routes: []*routev3.RouteConfiguration{route("r1")},
		}},
		{name: "RDS under another type URL prefix", consistent: true, resources: Resources{
			Listeners: []*listenerv3.Listener{listener(hcmConfig(t, rds("r1"), "example.com/types"))},
			Routes:    []*routev3.RouteConfiguration{route("r1")},
		}},
		{name: "scoped routes inline", consistent: true, resources: Resources{
			Listeners: []*listenerv3.Listener{listener(hcmConfig(t, scoped("r1", "r2"), ""))},
			Routes:    []*routev3.RouteConfiguration{route("r1"), route("r2")},
		}},
		{name: "two clusters, one service name", consistent: true, resources: Resources{
			Clusters:  []*clusterv3.Cluster{withService("a", "svc"), withService("b", "svc")},
			Endpoints: []*endpointv3.ClusterLoadAssignment{cla("svc")},
		}},
		{name: "out of order", consistent: true, resources: Resources{
			Clusters:  []*clusterv3.Cluster{edsCluster("b"), edsCluster("a")},
			Endpoints: []*endpointv3.ClusterLoadAssignment{cla("a"), cla("b")},
		}},
		{name: "out of order, one missing", resources: Resources{
			Clusters:  []*clusterv3.Cluster{edsCluster("c"), edsCluster("a"), edsCluster("b")},
			Endpoints: []*endpointv3.ClusterLoadAssignment{cla("c"), cla("a")},
		}},
		{name: "a TCP proxy names no route", resources: Resources{
			Listeners: []*listenerv3.Listener{gw.Listeners[0]},
			Clusters:  []*clusterv3.Cluster{gw.Clusters[0], gw.Clusters[1], gw.Clusters[2]},
			Endpoints: []*endpointv3.ClusterLoadAssignment{gw.Endpoints[0], gw.Endpoints[1]},
			Routes:    []*routev3.RouteConfiguration{route("r1")},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.resources
			lists := map[resource.Type][]types.Resource{}
			for _, l := range r.Listeners {
				lists[resource.ListenerType] = append(lists[resource.ListenerType], l)
			}
			for _, c := range r.Clusters {
				lists[resource.ClusterType] = append(lists[resource.ClusterType], c)
			}
			for _, e := range r.Endpoints {
				lists[resource.EndpointType] = append(lists[resource.EndpointType], e)
			}
			for _, rc := range r.Routes {
				lists[resource.RouteType] = append(lists[resource.RouteType], rc)
			}
			snap, err := cache.NewSnapshot("1", lists)
			require.NoError(t, err)
			theirs, ours := snap.Consistent(), consistent(r)
			if tc.consistent {
				require.NoError(t, theirs)
				require.NoError(t, ours)
			} else {
				require.Error(t, theirs)
				require.Error(t, ours)
			}
		})
	}
}
