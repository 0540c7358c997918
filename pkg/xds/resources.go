package xds

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
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
// Validate(), each list is sorted by name, and Version is a hash of the
// deterministic encoding of the listeners, clusters and endpoints, so
// equal configurations have equal versions and a proxy is never pushed
// the same thing twice.
//
// The Secrets (SDS, from TranslateSecrets) are served at their own
// version, SecretsVersion, a hash of them alone: a catalog change does not
// push the trust bundles again, and a bundle rotation pushes only them.
//
// Resources and the messages it holds are shared and must not be
// modified.
type Resources struct {
	Version   string
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	// Routes are the route configurations (RDS) the listeners name, in
	// the Version too; the sidecar's (withRoutes), none for the gateway.
	Routes []*routev3.RouteConfiguration
	// Secrets and SecretsVersion are empty until the trust store holds a
	// bundle.
	Secrets        []*tlsv3.Secret
	SecretsVersion string
}

// newResources validates every resource and computes the version. The
// lists must already be in their canonical order.
func newResources(lis []*listenerv3.Listener, cls []*clusterv3.Cluster, eps []*endpointv3.ClusterLoadAssignment) (Resources, error) {
	r := Resources{Listeners: lis, Clusters: cls, Endpoints: eps}
	h := sha256.New()
	var buf []byte
	opts := proto.MarshalOptions{Deterministic: true}
	add := func(typ, name string, m interface {
		proto.Message
		Validate() error
	}) error {
		if err := m.Validate(); err != nil {
			return fmt.Errorf("%s %q is invalid: %w", typ, name, err)
		}
		msg, err := opts.Marshal(m)
		if err != nil {
			return fmt.Errorf("%s %q: encode: %w", typ, name, err)
		}
		// Type and message length-prefixed, so no two different lists
		// encode alike.
		buf = buf[:0]
		buf = binary.AppendUvarint(buf, uint64(len(typ)))
		buf = append(buf, typ...)
		buf = binary.AppendUvarint(buf, uint64(len(msg)))
		h.Write(buf)
		h.Write(msg)
		return nil
	}
	for _, l := range lis {
		if err := add("listener", l.GetName(), l); err != nil {
			return Resources{}, err
		}
	}
	for _, c := range cls {
		if err := add("cluster", c.GetName(), c); err != nil {
			return Resources{}, err
		}
	}
	for _, e := range eps {
		if err := add("ClusterLoadAssignment", e.GetClusterName(), e); err != nil {
			return Resources{}, err
		}
	}
	r.Version = hex.EncodeToString(h.Sum(nil)[:12])
	return r, nil
}

// Snapshot returns the resources as a go-control-plane snapshot, after
// checking that it is consistent (every EDS cluster has exactly one
// ClusterLoadAssignment, and no other exists; likewise for routes: see
// consistent). The Secrets are at
// SecretsVersion, everything else at Version.
func (r Resources) Snapshot() (*cache.Snapshot, error) {
	res := map[resource.Type][]types.Resource{
		resource.ListenerType: make([]types.Resource, 0, len(r.Listeners)),
		resource.ClusterType:  make([]types.Resource, 0, len(r.Clusters)),
		resource.EndpointType: make([]types.Resource, 0, len(r.Endpoints)),
	}
	for _, l := range r.Listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
	}
	for _, c := range r.Clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], c)
	}
	for _, e := range r.Endpoints {
		res[resource.EndpointType] = append(res[resource.EndpointType], e)
	}
	for _, rc := range r.Routes {
		res[resource.RouteType] = append(res[resource.RouteType], rc)
	}
	snap, err := cache.NewSnapshot(r.Version, res)
	if err != nil {
		return nil, err
	}
	secrets := make([]types.Resource, 0, len(r.Secrets))
	for _, s := range r.Secrets {
		secrets = append(secrets, s)
	}
	snap.Resources[types.Secret] = cache.NewResources(r.SecretsVersion, secrets)
	if err := consistent(r); err != nil {
		return nil, fmt.Errorf("snapshot %s is inconsistent: %w", r.Version, err)
	}
	return snap, nil
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
