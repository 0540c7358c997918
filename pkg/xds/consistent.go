package xds

import (
	"fmt"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// hcmName is the full name of an HTTP connection manager's config.
var hcmName = string((&hcmv3.HttpConnectionManager{}).ProtoReflect().Descriptor().FullName())

// isHCM is anypb's MessageIs for an HTTP connection manager, as
// go-control-plane asks it, without looking the name up every time.
func isHCM(typeURL string) bool {
	return strings.HasSuffix(typeURL, hcmName) &&
		(len(typeURL) == len(hcmName) || typeURL[len(typeURL)-len(hcmName)-1] == '/')
}

// consistent is go-control-plane's (*cache.Snapshot).Consistent for the
// snapshot of r, the same rule without its cost: the ClusterLoadAssignments
// are exactly the ones the EDS clusters name, and the RouteConfigurations
// exactly the ones the HTTP connection managers name (RDS, scoped
// routes). Consistent decodes every listener filter's config as an HTTP
// connection manager, and makes an error of each that is not; with one
// filter chain per exported service that was most of the cost of a new
// snapshot. Here only configs of that type are decoded, and the names are
// compared as sorted lists, which r's mostly are already.
func consistent(r Resources) error {
	var eds []string
	for _, c := range r.Clusters {
		if c.GetType() != clusterv3.Cluster_EDS {
			continue
		}
		if name := c.GetEdsClusterConfig().GetServiceName(); name != "" {
			eds = append(eds, name)
		} else {
			eds = append(eds, c.GetName())
		}
	}
	loads := make([]string, len(r.Endpoints))
	for i, e := range r.Endpoints {
		loads[i] = e.GetClusterName()
	}
	if err := sameNames(resource.EndpointType, eds, loads); err != nil {
		return err
	}

	var named []string
	for _, l := range r.Listeners {
		for _, chain := range l.GetFilterChains() {
			named = routeRefs(chain, named)
		}
		named = routeRefs(l.GetDefaultFilterChain(), named)
	}
	routes := make([]string, len(r.Routes))
	for i, rc := range r.Routes {
		routes[i] = rc.GetName()
	}
	return sameNames(resource.RouteType, named, routes)
}

// routeRefs appends the routes the HTTP connection managers of chain
// name. A config of another type is not decoded; one of this type that
// does not decode names nothing, as in go-control-plane.
func routeRefs(chain *listenerv3.FilterChain, out []string) []string {
	for _, f := range chain.GetFilters() {
		if !isHCM(f.GetTypedConfig().GetTypeUrl()) {
			continue
		}
		m := resource.GetHTTPConnectionManager(f)
		if name := m.GetRds().GetRouteConfigName(); name != "" {
			out = append(out, name)
		}
		for _, sr := range m.GetScopedRoutes().GetScopedRouteConfigurationsList().GetScopedRouteConfigurations() {
			out = append(out, sr.GetRouteConfigurationName())
		}
	}
	return out
}

// sameNames reports whether the resources of typeURL that are named and
// those served are the same set, as go-control-plane's snapshot, which
// indexes both by name, sees them. It sorts its arguments.
func sameNames(typeURL string, named, served []string) error {
	if !slices.IsSorted(named) {
		slices.Sort(named)
	}
	if !slices.IsSorted(served) {
		slices.Sort(served)
	}
	named, served = slices.Compact(named), slices.Compact(served)
	i, j := 0, 0
	for i < len(named) && j < len(served) {
		switch {
		case named[i] == served[j]:
			i++
			j++
		case named[i] < served[j]:
			return fmt.Errorf("%s %q is named but not served", typeURL, named[i])
		default:
			return fmt.Errorf("%s %q is named by nothing", typeURL, served[j])
		}
	}
	if i < len(named) {
		return fmt.Errorf("%s %q is named but not served", typeURL, named[i])
	}
	if j < len(served) {
		return fmt.Errorf("%s %q is named by nothing", typeURL, served[j])
	}
	return nil
}
