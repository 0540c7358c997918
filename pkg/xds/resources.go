package xds

import (
	"fmt"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
)

// Resources is one proxy configuration: every resource has passed its
// Validate() and each list is sorted by name.
//
// Each type has its own version, a hash of the deterministic encoding
// of that type's resources alone, and the snapshot serves each type at
// its version: equal configurations have equal versions, a proxy is
// never pushed the same thing twice, and a change of one type does not
// push the others again (a pod turning unready pushes the endpoints, not
// every listener, cluster and route configuration).
//
// The Secrets (SDS, from TranslateSecrets) are served at their own
// version, SecretsVersion, a hash of them alone: a catalog change does not
// push the trust bundles again, and a bundle rotation pushes only them.
//
// Resources and the messages it holds are shared and must not be
// modified.
type Resources struct {
	// Version is a hash of the listeners', clusters', endpoints' and
	// routes' versions: it changes when any of them does. It names the
	// configuration in logs and /debug/xds; proxies see the per-type
	// versions.
	Version   string
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	// Routes are the route configurations (RDS) the listeners name; the
	// sidecar's (withRoutes), none for the gateway.
	Routes []*routev3.RouteConfiguration
	// ListenersVersion, ClustersVersion, EndpointsVersion and
	// RoutesVersion are the versions of each type (RoutesVersion is
	// empty without routes: the gateway serves no RDS).
	ListenersVersion, ClustersVersion, EndpointsVersion, RoutesVersion string
	// Secrets and SecretsVersion are empty until the trust store holds a
	// bundle.
	Secrets        []*tlsv3.Secret
	SecretsVersion string
	// Inbound, for the sidecars, are the listeners of the pods whose
	// Services declare ports (sidecar_inbound.go); nil when no pod
	// does. Version covers them.
	Inbound *InboundProfiles
}

// newResources validates every resource and computes the versions. The
// lists must already be in their canonical order.
func newResources(lis []*listenerv3.Listener, cls []*clusterv3.Cluster, eps []*endpointv3.ClusterLoadAssignment) (Resources, error) {
	r := Resources{Listeners: lis, Clusters: cls, Endpoints: eps}
	var err error
	if r.ListenersVersion, err = typeVersion(listenerTag, lis, (*listenerv3.Listener).GetName); err != nil {
		return Resources{}, err
	}
	if r.ClustersVersion, err = typeVersion(clusterTag, cls, (*clusterv3.Cluster).GetName); err != nil {
		return Resources{}, err
	}
	if r.EndpointsVersion, err = typeVersion(endpointTag, eps, (*endpointv3.ClusterLoadAssignment).GetClusterName); err != nil {
		return Resources{}, err
	}
	r.combine()
	return r, nil
}

// typeVersion validates and encodes every resource of one type, and
// hashes them: each resource's encoding recorded with the type and its
// length (versionHash), so no two different lists hash alike.
func typeVersion[M interface {
	proto.Message
	Validate() error
}](typ string, ms []M, name func(M) string) (string, error) {
	v := newVersionHash()
	for _, m := range ms {
		enc, err := encode(typ, name(m), m)
		if err != nil {
			return "", err
		}
		v.resource(typ, enc)
	}
	return v.sum(), nil
}

// combine sets Version from the per-type versions.
func (r *Resources) combine() {
	v := newVersionHash()
	for _, tv := range [...]struct{ typ, version string }{
		{listenerTag, r.ListenersVersion}, {clusterTag, r.ClustersVersion},
		{endpointTag, r.EndpointsVersion}, {routeTag, r.RoutesVersion},
	} {
		v.record(tv.typ, len(tv.version))
		v.writeString(tv.version)
	}
	if r.Inbound != nil {
		v.record("inbound", len(r.Inbound.Version))
		v.writeString(r.Inbound.Version)
	}
	r.Version = v.sum()
}

// TypeVersions are the versions the snapshot serves, by type URL: what a
// proxy that holds this configuration ACKs. A type without a version
// (routes of the gateway, Secrets before the first bundle) is left out.
func (r Resources) TypeVersions() map[string]string {
	out := make(map[string]string, 5)
	for typ, v := range r.versionsByType() {
		if v != "" {
			out[typ] = v
		}
	}
	return out
}

// TypeVersionsFor are TypeVersions as the node of ID id is served them:
// the listeners at its pod's profile's version (Inbound), when it has
// one.
func (r Resources) TypeVersionsFor(id string) map[string]string {
	out := r.TypeVersions()
	if k, ok := r.Inbound.nodeProfile(id); ok {
		out[resource.ListenerType] = r.Inbound.byKey[k].version
	}
	return out
}

// versionsByType is every type a snapshot carries, with its version
// (empty when there is none): the types the server answers.
func (r Resources) versionsByType() map[string]string {
	return map[string]string{
		resource.ListenerType: r.ListenersVersion, resource.ClusterType: r.ClustersVersion,
		resource.EndpointType: r.EndpointsVersion, resource.RouteType: r.RoutesVersion,
		resource.SecretType: r.SecretsVersion,
	}
}

// Snapshot returns the resources as a go-control-plane snapshot, after
// checking that it is consistent (every EDS cluster has exactly one
// ClusterLoadAssignment, and no other exists; likewise for routes: see
// consistent). Each type is at its own version, the Secrets at
// SecretsVersion.
func (r Resources) Snapshot() (*cache.Snapshot, error) {
	if err := consistent(r); err != nil {
		return nil, fmt.Errorf("snapshot %s is inconsistent: %w", r.Version, err)
	}
	snap := &cache.Snapshot{}
	snap.Resources[types.Listener] = cache.NewResources(r.ListenersVersion, asResources(r.Listeners))
	snap.Resources[types.Cluster] = cache.NewResources(r.ClustersVersion, asResources(r.Clusters))
	snap.Resources[types.Endpoint] = cache.NewResources(r.EndpointsVersion, asResources(r.Endpoints))
	if len(r.Routes) > 0 {
		snap.Resources[types.Route] = cache.NewResources(r.RoutesVersion, asResources(r.Routes))
	}
	snap.Resources[types.Secret] = cache.NewResources(r.SecretsVersion, asResources(r.Secrets))
	return snap, nil
}

// served is Snapshot with each pod's listeners: those of its profile
// (Inbound), when it has one.
func (r Resources) served() (cache.ResourceSnapshot, error) {
	snap, err := r.Snapshot()
	if err != nil {
		return nil, err
	}
	return profiled(snap, r.Inbound), nil
}

func asResources[M types.Resource](ms []M) []types.Resource {
	out := make([]types.Resource, len(ms))
	for i, m := range ms {
		out[i] = m
	}
	return out
}

// Names lists the resources' names by type URL, each list in order;
// the Route and Secret types only when there are some.
func (r Resources) Names() map[string][]string {
	out := map[string][]string{
		resource.ListenerType: make([]string, 0, len(r.Listeners)),
		resource.ClusterType:  make([]string, 0, len(r.Clusters)),
		resource.EndpointType: make([]string, 0, len(r.Endpoints)),
	}
	for _, l := range r.Listeners {
		out[resource.ListenerType] = append(out[resource.ListenerType], l.GetName())
	}
	for _, c := range r.Clusters {
		out[resource.ClusterType] = append(out[resource.ClusterType], c.GetName())
	}
	for _, e := range r.Endpoints {
		out[resource.EndpointType] = append(out[resource.EndpointType], e.GetClusterName())
	}
	for _, rc := range r.Routes {
		out[resource.RouteType] = append(out[resource.RouteType], rc.GetName())
	}
	for _, s := range r.Secrets {
		out[resource.SecretType] = append(out[resource.SecretType], s.GetName())
	}
	return out
}
