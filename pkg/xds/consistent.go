package xds

import (
	"fmt"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// hcm stands for its type when a filter's config is asked whether it is
// one.
var hcm = &hcmv3.HttpConnectionManager{}

// consistent is go-control-plane's (*cache.Snapshot).Consistent, the same
// rule without its cost: every ClusterLoadAssignment is named by an EDS
// cluster and every EDS cluster names one, and likewise every
// RouteConfiguration by the HTTP connection managers (RDS, scoped routes)
// and scoped routes. Consistent decodes every listener filter's config
// as an HTTP connection manager, and makes an error of each that is not;
// with one filter chain per exported service that was most of the cost
// of a new snapshot. Here only configs of that type are decoded.
func consistent(s *cache.Snapshot) error {
	refs := map[types.ResponseType]map[string]bool{types.Endpoint: {}, types.Route: {}}
	for _, item := range s.Resources[types.Cluster].Items {
		c, ok := item.Resource.(*clusterv3.Cluster)
		if !ok || c.GetType() != clusterv3.Cluster_EDS {
			continue
		}
		if name := c.GetEdsClusterConfig().GetServiceName(); name != "" {
			refs[types.Endpoint][name] = true
		} else {
			refs[types.Endpoint][c.GetName()] = true
		}
	}
	for _, item := range s.Resources[types.Listener].Items {
		l, ok := item.Resource.(*listenerv3.Listener)
		if !ok {
			continue
		}
		for _, chain := range l.GetFilterChains() {
			routeRefs(chain, refs[types.Route])
		}
		routeRefs(l.GetDefaultFilterChain(), refs[types.Route])
	}
	for _, item := range s.Resources[types.ScopedRoute].Items {
		if sr, ok := item.Resource.(*routev3.ScopedRouteConfiguration); ok {
			refs[types.Route][sr.GetRouteConfigurationName()] = true
		}
	}
	for _, typ := range []types.ResponseType{types.Endpoint, types.Route} {
		names, items := refs[typ], s.Resources[typ].Items
		url, _ := cache.GetResponseTypeURL(typ)
		if len(names) != len(items) {
			return fmt.Errorf("%d %s named, %d served", len(names), url, len(items))
		}
		for name := range items {
			if !names[name] {
				return fmt.Errorf("%s %q is named by nothing", url, name)
			}
		}
	}
	return nil
}

// routeRefs adds the routes the HTTP connection managers of chain name.
// A config of another type is not decoded; one of this type that does not
// decode names nothing, as in go-control-plane.
func routeRefs(chain *listenerv3.FilterChain, out map[string]bool) {
	for _, f := range chain.GetFilters() {
		if !f.GetTypedConfig().MessageIs(hcm) {
			continue
		}
		m := resource.GetHTTPConnectionManager(f)
		if name := m.GetRds().GetRouteConfigName(); name != "" {
			out[name] = true
		}
		for _, sr := range m.GetScopedRoutes().GetScopedRouteConfigurationsList().GetScopedRouteConfigurations() {
			out[sr.GetRouteConfigurationName()] = true
		}
	}
}
