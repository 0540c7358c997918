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

// consistent says what go-control-plane's Consistent says, of every
// kind of reference it follows.
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
		resources  map[resource.Type][]types.Resource
		consistent bool
	}{
		{name: "the gateway's", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {gw.Listeners[0]},
			resource.ClusterType:  {gw.Clusters[0], gw.Clusters[1], gw.Clusters[2]},
			resource.EndpointType: {gw.Endpoints[0], gw.Endpoints[1]},
		}},
		{name: "a cluster without its endpoints", resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {gw.Listeners[0]},
			resource.ClusterType:  {gw.Clusters[0], gw.Clusters[1], gw.Clusters[2]},
			resource.EndpointType: {gw.Endpoints[0]},
		}},
		{name: "endpoints of no cluster", resources: map[resource.Type][]types.Resource{
			resource.ClusterType:  {gw.Clusters[1]},
			resource.EndpointType: {gw.Endpoints[0], cla("other")},
		}},
		{name: "endpoints named otherwise", resources: map[resource.Type][]types.Resource{
			resource.ClusterType:  {edsCluster("a")},
			resource.EndpointType: {cla("b")},
		}},
		{name: "a static cluster names nothing", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ClusterType: {gw.Clusters[0]},
		}},
		{name: "an EDS service name", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ClusterType:  {withService("a", "svc")},
			resource.EndpointType: {cla("svc")},
		}},
		{name: "an EDS service name, endpoints by cluster name", resources: map[resource.Type][]types.Resource{
			resource.ClusterType:  {withService("a", "svc")},
			resource.EndpointType: {cla("a")},
		}},
		{name: "RDS", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {listener(hcmConfig(t, rds("r1"), ""))},
			resource.RouteType:    {route("r1")},
		}},
		{name: "RDS without the route", resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {listener(hcmConfig(t, rds("r1"), ""))},
		}},
		{name: "a route nothing names", resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {listener(hcmConfig(t, rds("r1"), ""))},
			resource.RouteType:    {route("r1"), route("r2")},
		}},
		{name: "RDS in the default chain", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {&listenerv3.Listener{Name: "l", DefaultFilterChain: &listenerv3.FilterChain{
				Filters: []*listenerv3.Filter{hcmConfig(t, rds("r1"), "")},
			}}},
			resource.RouteType: {route("r1")},
		}},
		{name: "RDS under another type URL prefix", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {listener(hcmConfig(t, rds("r1"), "example.com/types"))},
			resource.RouteType:    {route("r1")},
		}},
		{name: "scoped routes inline", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {listener(hcmConfig(t, scoped("r1", "r2"), ""))},
			resource.RouteType:    {route("r1"), route("r2")},
		}},
		{name: "a scoped route resource", consistent: true, resources: map[resource.Type][]types.Resource{
			resource.ScopedRouteType: {&routev3.ScopedRouteConfiguration{Name: "s", RouteConfigurationName: "r1"}},
			resource.RouteType:       {route("r1")},
		}},
		{name: "a TCP proxy names no route", resources: map[resource.Type][]types.Resource{
			resource.ListenerType: {gw.Listeners[0]},
			resource.ClusterType:  {gw.Clusters[0], gw.Clusters[1], gw.Clusters[2]},
			resource.EndpointType: {gw.Endpoints[0], gw.Endpoints[1]},
			resource.RouteType:    {route("r1")},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := cache.NewSnapshot("1", tc.resources)
			require.NoError(t, err)
			theirs, ours := snap.Consistent(), consistent(snap)
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
