package xds

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	originaldstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

// Names and values of the sidecar's contract (docs/sidecar-xds.md).
const (
	// OutboundListenerName receives the app's outbound connections.
	OutboundListenerName = "outbound"
	// InboundListenerName receives the connections to the pod.
	InboundListenerName = "inbound"
	// OutboundPort and InboundPort are Istio's capture ports.
	OutboundPort = 15001
	InboundPort  = 15006
	// PassthroughClusterName takes outbound traffic to anything that is
	// not a clusterset service where the app sent it.
	PassthroughClusterName = "PassthroughCluster"
	// InboundPassthroughClusterName is the app behind the sidecar.
	InboundPassthroughClusterName = "inbound-passthrough"
	// ExplicitRouteName is the route configuration of explicit mode (the
	// app calls 127.0.0.1:15001, or uses the sidecar as its HTTP proxy).
	ExplicitRouteName = "explicit"
	// InboundRouteName is the inbound HTTP chain's inline route
	// configuration, and its one virtual host.
	InboundRouteName = "inbound"
	// ServiceMetadataKey is the cluster metadata filter_metadata key that
	// carries a service port's host, VIP, port and protocol.
	ServiceMetadataKey = "isthmus"
	// CertificateSecretName is the sidecar's own SVID, which the sidecar
	// makes itself and the federator never sends.
	CertificateSecretName = "default"
	// ClusterSetDomain ends every clusterset service's host:
	// <name>.<namespace>.svc.clusterset.local.
	ClusterSetDomain = "svc.clusterset.local"
	// InClusterDomain ends every in-cluster service's host:
	// <name>.<namespace>.svc.cluster.local.
	InClusterDomain = "svc.cluster.local"
	// httpProtocolOptionsName is the typed_extension_protocol_options key
	// of envoy.extensions.upstreams.http.v3.HttpProtocolOptions.
	httpProtocolOptionsName = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

// ALPN protocols a sidecar offers to the next sidecar (Istio's), which
// the inbound listener's chains match on.
var (
	httpALPN = []string{"istio-http/1.1", "istio-h2"}
	tcpALPN  = []string{"istio"}
)

// Load balancing values of every service cluster.
const (
	// overprovisioningFactor makes Envoy fail over to the next priority
	// only when a priority has no healthy endpoint at all, which is what
	// the Go sidecar does.
	overprovisioningFactor = 100000
	// vipBase is 240.240.0.0/16, Istio's auto-allocation range.
	vipBase0, vipBase1 = 240, 240
)

// SidecarInput are the catalogs the sidecars' configuration is made of.
type SidecarInput struct {
	// Local is the cluster's own exports (catalog.LocalSource); nil
	// when there are none.
	Local *catalog.Snapshot
	// InCluster is the cluster's in-cluster services
	// (catalog.InClusterSource): every meshed Service, exported or not;
	// nil when there are none.
	InCluster *catalog.Snapshot
	// Peers are the peers' imports, one catalog each, in any order.
	Peers []*catalog.Snapshot
	// Declared is every Service with endpoints and the pods behind them
	// (catalog.DeclaredSource): when set, the pods' inbound profiles
	// are read from it alone; else from Local and InCluster.
	Declared *catalog.Snapshot
	// Policies are the cluster's AuthorizationPolicies and the pods they
	// select: each such pod's inbound chains enforce its own. nil: none.
	Policies *authz.Snapshot
}

// SidecarOptions are the inputs of TranslateSidecar besides the catalog.
type SidecarOptions struct {
	// Region is the local cluster's region (the federator's --region):
	// peers whose endpoints are in it are preferred to the others. Empty
	// matches only peers whose region is empty too.
	Region string
	// TrustDomain is the local trust domain, which "cluster.local" in
	// an AuthorizationPolicy's principals names too (as in Istio).
	TrustDomain string
}

// Skipped is something the sidecar translation left out, and why: a
// gateway address that is not an IP, a port defined differently by two
// exporters, an exporter that names no SPIFFE identity.
type Skipped struct {
	// Service is namespace/name.
	Service string `json:"service"`
	// Cluster is the exporting cluster concerned.
	Cluster string `json:"cluster,omitempty"`
	Reason  string `json:"reason"`
}

// ClusterSetHost is the host of a clusterset service:
// <name>.<namespace>.svc.clusterset.local.
func ClusterSetHost(namespace, name string) string {
	return name + "." + namespace + "." + ClusterSetDomain
}

// ClusterSetClusterName is the sidecar's cluster for port of the
// clusterset service namespace/name: outbound|<port>||<host>.
func ClusterSetClusterName(namespace, name string, port int32) string {
	return outboundClusterName(ClusterSetHost(namespace, name), port)
}

// InClusterHost is the host of an in-cluster service:
// <name>.<namespace>.svc.cluster.local.
func InClusterHost(namespace, name string) string {
	return name + "." + namespace + "." + InClusterDomain
}

// outboundClusterName is the sidecar's cluster for port of host:
// outbound|<port>||<host>.
func outboundClusterName(host string, port int32) string {
	return outboundPrefix + "|" + strconv.Itoa(int(port)) + "|" + emptySubsetName + "|" + host
}

// IsHTTPPort reports whether a sidecar handles port as HTTP: its
// appProtocol, or else its name's part before the first "-" (Istio's
// convention), is http, http2, grpc, grpc-web, h2c or kubernetes.io/h2c,
// compared case-insensitively. Everything else is opaque TCP.
func IsHTTPPort(p catalog.Port) bool { return UpstreamHTTPOf(p) != UpstreamHTTPNone }

// UpstreamHTTP is the HTTP version a sidecar speaks to the endpoints of
// a service port: Istio's choice by the port's declared protocol, not
// the version the app spoke.
type UpstreamHTTP int

// The upstream HTTP versions of a service port.
const (
	// UpstreamHTTPNone: not an HTTP port, the bytes are relayed as they
	// come.
	UpstreamHTTPNone UpstreamHTTP = iota
	// UpstreamHTTP1 is a port declared http: HTTP/1.1, to which an h2c
	// client is downgraded.
	UpstreamHTTP1
	// UpstreamHTTP2 is a port declared http2, grpc, grpc-web or h2c:
	// HTTP/2, to which an HTTP/1.1 client is upgraded.
	UpstreamHTTP2
)

// String names the port protocol: TCP, HTTP/1.1 or HTTP/2.
func (u UpstreamHTTP) String() string {
	switch u {
	case UpstreamHTTPNone:
		return "TCP"
	case UpstreamHTTP1:
		return "HTTP/1.1"
	case UpstreamHTTP2:
		return "HTTP/2"
	}
	return "UpstreamHTTP(" + strconv.Itoa(int(u)) + ")"
}

// UpstreamHTTPOf is the HTTP version a sidecar speaks upstream on port,
// from the protocol IsHTTPPort reads: http is HTTP/1.1; http2, grpc,
// grpc-web, h2c and kubernetes.io/h2c are HTTP/2; anything else is not
// HTTP.
func UpstreamHTTPOf(p catalog.Port) UpstreamHTTP {
	v := p.AppProtocol
	if v == "" {
		v, _, _ = strings.Cut(p.Name, "-")
	}
	switch strings.ToLower(v) {
	case "http":
		return UpstreamHTTP1
	case "http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c":
		return UpstreamHTTP2
	}
	return UpstreamHTTPNone
}

// exporter is one cluster's export of a clusterset service.
type exporter struct {
	cluster string
	// source is the catalog the export came from: it orders two
	// exporters that claim one cluster name, which a well-formed mesh
	// never has, so that the result does not depend on the peers' order.
	source string
	local  bool
	svc    *catalog.Service
	// gateways are the exporter's usable gateway addresses (IPs only),
	// sorted; empty for the local exporter.
	gateways []netip.AddrPort
}

// port finds the exporter's TCP port number n.
func (e *exporter) port(n int32) (catalog.Port, bool) {
	for _, p := range e.svc.Ports {
		if p.Port == n && p.Protocol == catalog.ProtocolTCP {
			return p, true
		}
	}
	return catalog.Port{}, false
}

// locality is the exporter's first locality: where a peer's gateway
// endpoints are placed.
func (e *exporter) locality() catalog.Locality {
	if len(e.svc.Endpoints) == 0 {
		return catalog.Locality{}
	}
	return e.svc.Endpoints[0].Locality
}

// csPort is one port of a clusterset service: its number, and the HTTP
// version the sidecar speaks upstream on it, if any (by the winning
// definition).
type csPort struct {
	number   int32
	upstream UpstreamHTTP
}

// http reports whether the sidecar speaks HTTP on the port.
func (p csPort) http() bool { return p.upstream != UpstreamHTTPNone }

// csService is a clusterset service: one namespace/name over every
// cluster that exports it.
type csService struct {
	key  catalog.ServiceKey
	host string
	// inCluster marks an in-cluster service: its one exporter is the
	// local cluster, its VIP its ClusterIP, and each port has an
	// outbound chain of its own.
	inCluster bool
	vip       netip.Addr
	exporters []*exporter // sorted by cluster name
	ports     []csPort    // sorted by number
	sans      []string    // sorted
}

// sidecarBuilder holds what one translation computes; it is used once.
type sidecarBuilder struct {
	opts    SidecarOptions
	skipped []Skipped
	// Typed configs every cluster or chain of a kind shares. Resources
	// are immutable once built, so one message serves them all.
	// httpOptions are a service cluster's HttpProtocolOptions by its
	// port's UpstreamHTTP (nil for TCP); downstreamHTTP are
	// inbound-passthrough's.
	httpOptions                                       [UpstreamHTTP2 + 1]*anypb.Any
	downstreamHTTP, router, originalDst, tlsInspector *anypb.Any
	adsSource                                         *corev3.ConfigSource
	edsType                                           *clusterv3.Cluster_Type
	edsConfig                                         *clusterv3.Cluster_EdsClusterConfig
	timeout, noTimeout, idleTimeout                   *durationpb.Duration
	lbConfig                                          *clusterv3.Cluster_CommonLbConfig
	certSDS                                           []*tlsv3.SdsSecretConfig
	rootSDS                                           *tlsv3.SdsSecretConfig
	policy                                            *endpointv3.ClusterLoadAssignment_Policy
	localities                                        map[catalog.Locality]*corev3.Locality
}

// TranslateSidecar computes every sidecar's configuration from the local
// catalog (the cluster's own exports) and the peers' imports: one
// clusterset service per namespace/name, with a virtual IP, a cluster and
// ClusterLoadAssignment per TCP port (local pods first, then the peers'
// gateways, same region first), the outbound and inbound listeners, and
// the route configurations of the HTTP ports and of explicit mode.
//
// It is a pure function: the same catalogs and options give the same
// Resources, with the same Version, whatever the order of peers. Every
// resource has passed its Validate(); an error names the service and port
// at fault. What was left out is listed in the returned Skipped, sorted.
func TranslateSidecar(in SidecarInput, opts SidecarOptions) (Resources, []Skipped, error) {
	b, err := newSidecarBuilder(opts)
	if err != nil {
		return Resources{}, nil, err
	}
	services, err := b.services(in.Local, in.Peers)
	if err != nil {
		return Resources{}, nil, err
	}
	if err := assignVIPs(services); err != nil {
		return Resources{}, nil, err
	}
	inCluster, err := b.inClusterServices(in.InCluster)
	if err != nil {
		return Resources{}, nil, err
	}

	clusters := make([]*clusterv3.Cluster, 0, 2+2*len(services))
	loads := make([]*endpointv3.ClusterLoadAssignment, 0, 2*len(services))
	for _, s := range slices.Concat(services, inCluster) {
		for _, p := range s.ports {
			c, err := b.serviceCluster(s, p)
			if err != nil {
				return Resources{}, nil, err
			}
			clusters = append(clusters, c)
			loads = append(loads, b.loadAssignment(s, p))
		}
	}
	passthrough, inboundPassthrough := b.passthroughClusters()
	clusters = append(clusters, passthrough, inboundPassthrough)

	outbound, routes, err := b.outbound(services, inCluster)
	if err != nil {
		return Resources{}, nil, err
	}
	inbound, err := b.inbound()
	if err != nil {
		return Resources{}, nil, err
	}

	byName := func(a, b *clusterv3.Cluster) int { return strings.Compare(a.GetName(), b.GetName()) }
	slices.SortFunc(clusters, byName)
	slices.SortFunc(loads, func(a, b *endpointv3.ClusterLoadAssignment) int {
		return strings.Compare(a.GetClusterName(), b.GetClusterName())
	})
	slices.SortFunc(routes, func(a, b *routev3.RouteConfiguration) int { return strings.Compare(a.GetName(), b.GetName()) })
	// "inbound" sorts before "outbound".
	res, err := newResources([]*listenerv3.Listener{inbound, outbound}, clusters, loads)
	if err != nil {
		return Resources{}, nil, err
	}
	res, err = res.withRoutes(routes)
	if err != nil {
		return Resources{}, nil, err
	}
	slices.SortFunc(b.skipped, func(x, y Skipped) int {
		return cmp.Or(strings.Compare(x.Service, y.Service), strings.Compare(x.Cluster, y.Cluster), strings.Compare(x.Reason, y.Reason))
	})
	return withProfiles(res, slices.Compact(b.skipped), in.Local, in.InCluster, in.Declared, in.Policies, opts.TrustDomain)
}

func newSidecarBuilder(opts SidecarOptions) (*sidecarBuilder, error) {
	ads := &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
	b := &sidecarBuilder{
		opts:        opts,
		adsSource:   ads,
		edsType:     &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		edsConfig:   &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ads},
		timeout:     durationpb.New(connectTimeout),
		noTimeout:   durationpb.New(0),
		idleTimeout: durationpb.New(tcpIdleTimeout),
		lbConfig: &clusterv3.Cluster_CommonLbConfig{
			// No panic routing: an unhealthy endpoint is never picked, as
			// in the Go sidecar.
			HealthyPanicThreshold: &typev3.Percent{Value: 0},
			LocalityConfigSpecifier: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig_{
				LocalityWeightedLbConfig: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig{},
			},
		},
		certSDS:    []*tlsv3.SdsSecretConfig{{Name: CertificateSecretName}},
		rootSDS:    &tlsv3.SdsSecretConfig{Name: RootCASecretName, SdsConfig: ads},
		policy:     &endpointv3.ClusterLoadAssignment_Policy{OverprovisioningFactor: wrapperspb.UInt32(overprovisioningFactor)},
		localities: map[catalog.Locality]*corev3.Locality{},
	}
	var err error
	if b.downstreamHTTP, err = typedConfig(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
			UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{},
		},
	}); err != nil {
		return nil, err
	}
	// A service cluster speaks the version its port declares, as in
	// Istio: the calling app's h2c is downgraded on an http port, its
	// HTTP/1.1 upgraded on an http2 or gRPC port.
	if b.httpOptions[UpstreamHTTP1], err = typedConfig(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}},
		}},
	}); err != nil {
		return nil, err
	}
	if b.httpOptions[UpstreamHTTP2], err = typedConfig(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	}); err != nil {
		return nil, err
	}
	if b.router, err = typedConfig(&routerv3.Router{}); err != nil {
		return nil, err
	}
	if b.originalDst, err = typedConfig(&originaldstv3.OriginalDst{}); err != nil {
		return nil, err
	}
	if b.tlsInspector, err = typedConfig(&tlsinspectorv3.TlsInspector{}); err != nil {
		return nil, err
	}
	return b, nil
}

func (b *sidecarBuilder) skip(key catalog.ServiceKey, cluster, format string, args ...any) {
	b.skipped = append(b.skipped, Skipped{Service: key.String(), Cluster: cluster, Reason: fmt.Sprintf(format, args...)})
}

// services gathers the clusterset services from the local catalog and
// every peer's imports, sorted by host.
func (b *sidecarBuilder) services(local *catalog.Snapshot, peers []*catalog.Snapshot) ([]*csService, error) {
	byKey := map[catalog.ServiceKey][]*exporter{}
	add := func(snap *catalog.Snapshot, isLocal bool) {
		for svc := range snap.All() {
			cluster := cmp.Or(svc.Cluster, snap.Source())
			byKey[svc.Key()] = append(byKey[svc.Key()], &exporter{cluster: cluster, source: snap.Source(), local: isLocal, svc: svc})
		}
	}
	if local != nil {
		if local.Source() != catalog.LocalSource {
			return nil, fmt.Errorf("local catalog has source %q, not %q", local.Source(), catalog.LocalSource)
		}
		add(local, true)
	}
	seen := map[string]bool{}
	for _, p := range peers {
		if p == nil {
			continue
		}
		if p.Source() == catalog.LocalSource || seen[p.Source()] {
			return nil, fmt.Errorf("peer catalog source %q is the local one or listed twice", p.Source())
		}
		seen[p.Source()] = true
		add(p, false)
	}

	out := make([]*csService, 0, len(byKey))
	for key, exps := range byKey {
		if s := b.service(key, exps); s != nil {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, compareHosts)
	if err := sharedHost(len(out), func(i int) *csService { return out[i] }); err != nil {
		return nil, err
	}
	return out, nil
}

// vipRange is 240.240.0.0/16, the clusterset VIPs.
var vipRange = netip.PrefixFrom(netip.AddrFrom4([4]byte{vipBase0, vipBase1, 0, 0}), 16)

// inClusterServices makes the in-cluster services of snap, sorted by
// VIP. Two with one ClusterIP, which the API server never allocates,
// fail the translation: the sidecars would refuse the configuration.
func (b *sidecarBuilder) inClusterServices(snap *catalog.Snapshot) ([]*csService, error) {
	if snap == nil {
		return nil, nil
	}
	if snap.Source() != catalog.InClusterSource {
		return nil, fmt.Errorf("in-cluster catalog has source %q, not %q", snap.Source(), catalog.InClusterSource)
	}
	var out []*csService
	for svc := range snap.All() {
		if s := b.inClusterService(svc); s != nil {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, compareVIPs)
	for i := 1; i < len(out); i++ {
		if out[i-1].vip == out[i].vip {
			return nil, sharedClusterIP(out[i-1], out[i])
		}
	}
	return out, nil
}

// compareVIPs orders in-cluster services by VIP, then key.
func compareVIPs(x, y *csService) int {
	return cmp.Or(x.vip.Compare(y.vip), catalog.CompareKeys(x.key, y.key))
}

func sharedClusterIP(x, y *csService) error {
	if compareVIPs(x, y) > 0 {
		x, y = y, x
	}
	return fmt.Errorf("in-cluster services %s and %s have one ClusterIP %s", x.key, y.key, x.vip)
}

// inClusterService makes svc's in-cluster service, or returns nil, and
// says why under skipped, when it cannot be one.
func (b *sidecarBuilder) inClusterService(svc *catalog.Service) *csService {
	key := svc.Key()
	e := &exporter{cluster: cmp.Or(svc.Cluster, catalog.InClusterSource), source: catalog.InClusterSource, local: true, svc: svc}
	vip, err := netip.ParseAddr(svc.ClusterIP)
	switch {
	case err != nil:
		b.skip(key, e.cluster, "in-cluster service: ClusterIP %q is not an IP address: left out", svc.ClusterIP)
		return nil
	case vipRange.Contains(vip.Unmap()):
		b.skip(key, e.cluster, "in-cluster service: ClusterIP %s is in %s, the clusterset virtual IPs: left out", vip, vipRange)
		return nil
	case len(svc.Identities) == 0:
		b.skip(key, e.cluster, "in-cluster service: names no SPIFFE identity, so its endpoints could not be verified: left out")
		return nil
	}
	s := &csService{
		key: key, host: InClusterHost(key.Namespace, key.Name), inCluster: true, vip: vip.Unmap(),
		exporters: []*exporter{e},
	}
	s.sans = slices.Compact(slices.Sorted(slices.Values(svc.Identities)))
	for _, p := range svc.Ports {
		if p.Protocol == catalog.ProtocolTCP {
			s.ports = append(s.ports, csPort{number: p.Port, upstream: UpstreamHTTPOf(p)})
		}
	}
	if len(s.ports) == 0 {
		b.skip(key, e.cluster, "in-cluster service: no TCP port: left out")
		return nil
	}
	slices.SortFunc(s.ports, func(x, y csPort) int { return cmp.Compare(x.number, y.number) })
	return s
}

// sharedHost refuses two clusterset services, sorted by host, with one
// host: their clusters would have one name. Only a name or namespace
// with a dot makes them ("c.a" in "b", "c" in "a.b"), which Kubernetes
// and the federation API refuse.
func sharedHost(n int, at func(int) *csService) error {
	for i := 1; i < n; i++ {
		if a, b := at(i-1), at(i); a.host == b.host {
			return fmt.Errorf("services %s and %s have one clusterset host %q", a.key, b.key, a.host)
		}
	}
	return nil
}

// service merges one namespace/name's exporters into a clusterset
// service, or returns nil when none of them can serve it.
func (b *sidecarBuilder) service(key catalog.ServiceKey, all []*exporter) *csService {
	slices.SortFunc(all, func(x, y *exporter) int {
		// A local exporter before a peer of the same name, which a
		// well-formed mesh never has.
		return cmp.Or(strings.Compare(x.cluster, y.cluster), -cmpBool(x.local, y.local), strings.Compare(x.source, y.source))
	})
	s := &csService{key: key, host: ClusterSetHost(key.Namespace, key.Name)}
	for _, e := range all {
		if len(e.svc.Identities) == 0 {
			// An empty SAN list would accept any identity the bundles
			// verify; an exporter that names none cannot be verified.
			b.skip(key, e.cluster, "names no SPIFFE identity, so its endpoints could not be verified: left out")
			continue
		}
		if !e.local {
			b.parseGateways(key, e)
		}
		s.exporters = append(s.exporters, e)
		s.sans = append(s.sans, e.svc.Identities...)
	}
	if len(s.exporters) == 0 {
		return nil
	}
	slices.Sort(s.sans)
	s.sans = slices.Compact(s.sans)

	// The union of the exporters' TCP ports by number; the lowest
	// cluster name defines each.
	type def struct {
		port    catalog.Port
		cluster string
	}
	defs := map[int32]def{}
	for _, e := range s.exporters {
		for _, p := range e.svc.Ports {
			if p.Protocol != catalog.ProtocolTCP {
				continue
			}
			first, ok := defs[p.Port]
			if !ok {
				defs[p.Port] = def{port: p, cluster: e.cluster}
				s.ports = append(s.ports, csPort{number: p.Port, upstream: UpstreamHTTPOf(p)})
				continue
			}
			// HTTP/1.1 and HTTP/2 disagree too: one cluster cannot speak
			// both upstream.
			if up, firstUp := UpstreamHTTPOf(p), UpstreamHTTPOf(first.port); first.port.Name != p.Name || up != firstUp {
				b.skip(key, e.cluster, "port %d is %s (name %q, appProtocol %q) here and %s (name %q, appProtocol %q) in cluster %s, whose definition is used",
					p.Port, up, p.Name, p.AppProtocol, firstUp, first.port.Name, first.port.AppProtocol, first.cluster)
			}
		}
	}
	if len(s.ports) == 0 {
		b.skip(key, "", "no TCP port: not a clusterset service")
		return nil
	}
	slices.SortFunc(s.ports, func(x, y csPort) int { return cmp.Compare(x.number, y.number) })
	return s
}

// compareHosts orders clusterset services by host, the order VIPs are
// assigned in. Two keys have one host only when a name or namespace has
// a dot, which Kubernetes and the federation API refuse, and sharedHost
// refuses; the key then decides, so that the refusal names the two in
// the same order every time.
func compareHosts(x, y *csService) int {
	return cmp.Or(strings.Compare(x.host, y.host), catalog.CompareKeys(x.key, y.key))
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	default:
		return -1
	}
}

func protocolName(http bool) string {
	if http {
		return "HTTP"
	}
	return "TCP"
}

// parseGateways keeps a peer's gateway addresses that are IP:port; the
// others are reported.
func (b *sidecarBuilder) parseGateways(key catalog.ServiceKey, e *exporter) {
	for _, g := range e.svc.Gateways {
		ap, err := netip.ParseAddrPort(g)
		switch {
		case err != nil:
			b.skip(key, e.cluster, "gateway %q is not an IP address and port: left out", g)
			continue
		case ap.Addr().Zone() != "" || ap.Port() == 0:
			b.skip(key, e.cluster, "gateway %q has a zone or port 0: left out", g)
			continue
		case federation.CheckDialIP(ap.Addr()) != nil:
			// 0.0.0.0 would be the sidecar's own host.
			b.skip(key, e.cluster, "gateway %q is not a unicast address: left out", g)
			continue
		}
		e.gateways = append(e.gateways, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	}
	slices.SortFunc(e.gateways, func(x, y netip.AddrPort) int { return x.Compare(y) })
	e.gateways = slices.Compact(e.gateways)
}

// assignVIPs gives each service, in host order, the first free address
// of 240.240.0.0/16 probing upward (wrapping) from 240.240.<h0>.<h1>,
// where h is SHA-256(host), skipping .0 and .255 in the last octet.
func assignVIPs(services []*csService) error {
	var used vipTable
	for _, s := range services {
		sum := sha256.Sum256([]byte(s.host))
		vip, ok := used.take(binary.BigEndian.Uint16(sum[:2]))
		if !ok {
			return fmt.Errorf("service %s: no free virtual IP in 240.240.0.0/16 for %d clusterset services", s.key, len(services))
		}
		s.vip = vip
	}
	return nil
}

// vipTable marks the taken addresses of 240.240.0.0/16 by their last two
// bytes.
type vipTable [1 << 16]bool

// take marks and returns the first free address from 240.240.0.0/16 +
// start upward, wrapping, skipping .0 and .255; false when all are taken.
func (t *vipTable) take(start uint16) (netip.Addr, bool) {
	for i := range 1 << 16 {
		a := start + uint16(i)
		if low := a & 0xff; low == 0 || low == 0xff || t[a] {
			continue
		}
		t[a] = true
		return netip.AddrFrom4([4]byte{vipBase0, vipBase1, byte(a >> 8), byte(a)}), true
	}
	return netip.Addr{}, false
}

// serviceCluster is the EDS cluster of one clusterset or in-cluster
// service port.
func (b *sidecarBuilder) serviceCluster(s *csService, p csPort) (*clusterv3.Cluster, error) {
	name := outboundClusterName(s.host, p.number)
	fail := func(err error) (*clusterv3.Cluster, error) {
		return nil, fmt.Errorf("service %s port %d: cluster %q: %w", s.key, p.number, name, err)
	}
	sans := make([]*tlsv3.SubjectAltNameMatcher, len(s.sans))
	for i, id := range s.sans {
		sans[i] = &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}},
		}
	}
	alpn := tcpALPN
	if p.http() {
		alpn = httpALPN
	}
	tlsCtx, err := typedConfig(&tlsv3.UpstreamTlsContext{
		Sni: ServiceSNI(s.key.Namespace, s.key.Name, p.number),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: b.certSDS,
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
				CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
					DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: sans},
					ValidationContextSdsSecretConfig: b.rootSDS,
				},
			},
			AlpnProtocols: alpn,
		},
	})
	if err != nil {
		return fail(err)
	}
	c := &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: b.edsType,
		EdsClusterConfig:     b.edsConfig,
		ConnectTimeout:       b.timeout,
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		CommonLbConfig:       b.lbConfig,
	}
	c.Metadata = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{ServiceMetadataKey: {Fields: map[string]*structpb.Value{
		"host":     structpb.NewStringValue(s.host),
		"vip":      structpb.NewStringValue(s.vip.String()),
		"port":     structpb.NewNumberValue(float64(p.number)),
		"protocol": structpb.NewStringValue(protocolName(p.http())),
	}}}}
	if p.http() {
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsName: b.httpOptions[p.upstream]}
	}
	c.TransportSocket = &corev3.TransportSocket{
		Name:       wellknown.TransportSocketTLS,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: tlsCtx},
	}
	return c, nil
}

// passthroughClusters are the two ORIGINAL_DST clusters: outbound to
// anything else, and inbound to the app.
func (b *sidecarBuilder) passthroughClusters() (*clusterv3.Cluster, *clusterv3.Cluster) {
	mk := func(name string) *clusterv3.Cluster {
		return &clusterv3.Cluster{
			Name:                 name,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
			ConnectTimeout:       b.timeout,
			LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		}
	}
	inbound := mk(InboundPassthroughClusterName)
	// The app gets the version that arrived, which the calling sidecar
	// chose by the port's declared protocol: HTTP/2 for h2c and gRPC,
	// HTTP/1.1 for http.
	inbound.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsName: b.downstreamHTTP}
	return mk(PassthroughClusterName), inbound
}

// level is one priority's localities while a ClusterLoadAssignment is
// built.
type level []*endpointv3.LocalityLbEndpoints

// loadAssignment lists one service port's endpoints by priority: the
// local pods, then the same-region peers' gateways, then the other
// peers'; an empty level is dropped so the priorities stay contiguous.
func (b *sidecarBuilder) loadAssignment(s *csService, p csPort) *endpointv3.ClusterLoadAssignment {
	name := outboundClusterName(s.host, p.number)
	// Envoy keeps only the first of two endpoints with one address.
	taken := map[netip.AddrPort]bool{}
	var local level
	near, far := map[catalog.Locality]*endpointv3.LocalityLbEndpoints{}, map[catalog.Locality]*endpointv3.LocalityLbEndpoints{}
	owner := claims(s.exporters, p.number)
	for _, e := range s.exporters {
		ep, ok := e.port(p.number)
		if !ok {
			continue
		}
		if e.local {
			target := uint16(cmp.Or(ep.TargetPort, ep.Port))
			for _, le := range e.svc.Endpoints {
				lle := &endpointv3.LocalityLbEndpoints{Locality: b.locality(le.Locality)}
				ready := uint32(0)
				for _, a := range le.Addresses {
					ip, err := netip.ParseAddr(a.IP)
					if err != nil {
						b.skip(s.key, e.cluster, "endpoint %q is not an IP address: left out", a.IP)
						continue
					}
					ap := netip.AddrPortFrom(ip.Unmap(), target)
					if taken[ap] || owner[ap] != e {
						continue
					}
					taken[ap] = true
					health := corev3.HealthStatus_UNHEALTHY
					if a.Ready {
						health = corev3.HealthStatus_HEALTHY
						ready++
					}
					lle.LbEndpoints = append(lle.LbEndpoints, lbEndpoint(ap.Addr().String(), uint32(ap.Port()), health))
				}
				if len(lle.LbEndpoints) == 0 {
					continue
				}
				if ready > 0 {
					lle.LoadBalancingWeight = wrapperspb.UInt32(ready)
				}
				local = append(local, lle)
			}
			continue
		}
		loc := e.locality()
		group := far
		if loc.Region == b.opts.Region {
			group = near
		}
		ready := e.svc.ReadyEndpoints()
		health := corev3.HealthStatus_UNHEALTHY
		if ready > 0 {
			health = corev3.HealthStatus_HEALTHY
		}
		var eps []*endpointv3.LbEndpoint
		for _, gw := range e.gateways {
			if taken[gw] || owner[gw] != e {
				b.skip(s.key, e.cluster, "gateway %s is also another exporter's: left out", gw)
				continue
			}
			taken[gw] = true
			eps = append(eps, lbEndpoint(gw.Addr().String(), uint32(gw.Port()), health))
		}
		if len(eps) == 0 {
			continue
		}
		// Peers in one locality share one LocalityLbEndpoints, since
		// Envoy merges equal localities of a priority.
		lle := group[loc]
		if lle == nil {
			lle = &endpointv3.LocalityLbEndpoints{Locality: b.locality(loc)}
			group[loc] = lle
		}
		lle.LbEndpoints = append(lle.LbEndpoints, eps...)
		if ready > 0 {
			w := uint64(lle.GetLoadBalancingWeight().GetValue()) + uint64(ready)
			lle.LoadBalancingWeight = wrapperspb.UInt32(uint32(min(w, 1<<32-1)))
		}
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name, Policy: b.policy}
	priority := uint32(0)
	for _, lv := range []level{local, sortedLevel(near), sortedLevel(far)} {
		if len(lv) == 0 {
			continue
		}
		fitWeights(lv)
		for _, lle := range lv {
			lle.Priority = priority
			cla.Endpoints = append(cla.Endpoints, lle)
		}
		priority++
	}
	return cla
}

// fitWeights scales the locality weights of one priority down, keeping
// their proportions, when they add up past what Envoy and gRPC accept:
// the weights of a priority must sum to a uint32. A peer reports up to
// MaxInt32 ready endpoints per locality, and several localities share a
// priority. Each weight stays at least 1; the sum is kept n below the
// limit for the floating-point rounding, at most 1 per weight.
func fitWeights(lv level) {
	var sum, n uint64
	for _, lle := range lv {
		if w := lle.GetLoadBalancingWeight(); w != nil {
			sum += uint64(w.GetValue())
			n++
		}
	}
	if sum <= math.MaxUint32 {
		return
	}
	scale := float64(math.MaxUint32-n) / float64(sum)
	for _, lle := range lv {
		if w := lle.GetLoadBalancingWeight(); w != nil {
			lle.LoadBalancingWeight = wrapperspb.UInt32(uint32(max(1, float64(w.GetValue())*scale)))
		}
	}
}

// claims says which exporter owns each endpoint address of a service
// port, since Envoy keeps only the first of two endpoints with one
// address: the local pods claim theirs first, then the peers that report
// the most ready endpoints claim their gateways (ties in name order). A
// peer naming another exporter's address (a local pod's, or another
// peer's gateway) thus never shadows it with its own health; it loses the
// address and is reported as skipped. Exporters are listed in name order
// either way, as before.
func claims(exporters []*exporter, port int32) map[netip.AddrPort]*exporter {
	order := slices.Clone(exporters)
	slices.SortStableFunc(order, func(x, y *exporter) int {
		if x.local != y.local {
			return -cmpBool(x.local, y.local)
		}
		if x.local {
			return 0
		}
		return cmp.Compare(y.svc.ReadyEndpoints(), x.svc.ReadyEndpoints())
	})
	owner := map[netip.AddrPort]*exporter{}
	claim := func(ap netip.AddrPort, e *exporter) {
		if _, ok := owner[ap]; !ok {
			owner[ap] = e
		}
	}
	for _, e := range order {
		ep, ok := e.port(port)
		if !ok {
			continue
		}
		if !e.local {
			for _, gw := range e.gateways {
				claim(gw, e)
			}
			continue
		}
		target := uint16(cmp.Or(ep.TargetPort, ep.Port))
		for _, le := range e.svc.Endpoints {
			for _, a := range le.Addresses {
				if ip, err := netip.ParseAddr(a.IP); err == nil {
					claim(netip.AddrPortFrom(ip.Unmap(), target), e)
				}
			}
		}
	}
	return owner
}

func sortedLevel(m map[catalog.Locality]*endpointv3.LocalityLbEndpoints) level {
	out := make(level, 0, len(m))
	for _, lle := range m {
		out = append(out, lle)
	}
	slices.SortFunc(out, func(a, b *endpointv3.LocalityLbEndpoints) int {
		x, y := a.GetLocality(), b.GetLocality()
		return cmp.Or(strings.Compare(x.GetRegion(), y.GetRegion()), strings.Compare(x.GetZone(), y.GetZone()),
			strings.Compare(x.GetSubZone(), y.GetSubZone()))
	})
	return out
}

// locality is l in Envoy's terms, one message per locality.
func (b *sidecarBuilder) locality(l catalog.Locality) *corev3.Locality {
	el, ok := b.localities[l]
	if !ok {
		el = &corev3.Locality{Region: l.Region, Zone: l.Zone, SubZone: l.Subzone}
		b.localities[l] = el
	}
	return el
}

// outbound builds the listener on 15001 and the route configurations
// its HTTP chains name.
func (b *sidecarBuilder) outbound(services, inCluster []*csService) (*listenerv3.Listener, []*routev3.RouteConfiguration, error) {
	type tcpChain struct {
		s *csService
		p csPort
	}
	httpVIPs := map[int32][]netip.Addr{}
	httpHosts := map[int32][]*routev3.VirtualHost{}
	var explicit []*routev3.VirtualHost
	// tcp are the chains of one address: clusterset TCP ports and
	// in-cluster ports.
	var tcp []tcpChain
	for _, s := range slices.Concat(services, inCluster) {
		for _, p := range s.ports {
			if p.http() {
				explicit = append(explicit, b.explicitHost(s, p))
			}
			if !p.http() || s.inCluster {
				tcp = append(tcp, tcpChain{s, p})
				continue
			}
			ps := strconv.Itoa(int(p.number))
			cluster := outboundClusterName(s.host, p.number)
			vhName := s.host + ":" + ps
			httpVIPs[p.number] = append(httpVIPs[p.number], s.vip)
			vip := s.vip.String()
			httpHosts[p.number] = append(httpHosts[p.number],
				b.virtualHost(vhName, []string{s.host, vhName, vip, vip + ":" + ps}, cluster))
		}
	}

	lis := &listenerv3.Listener{
		Name:    OutboundListenerName,
		Address: socketAddress(anyAddress, OutboundPort),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       wellknown.OriginalDestination,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: b.originalDst},
		}},
	}
	var routes []*routev3.RouteConfiguration
	ports := make([]int32, 0, len(httpVIPs))
	for p := range httpVIPs {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	for _, p := range ports {
		ps := strconv.Itoa(int(p))
		hcm, err := b.rdsManager("outbound_"+ps, ps)
		if err != nil {
			return nil, nil, fmt.Errorf("listener %q: HTTP port %d: %w", OutboundListenerName, p, err)
		}
		vips := httpVIPs[p]
		slices.SortFunc(vips, netip.Addr.Compare)
		lis.FilterChains = append(lis.FilterChains, &listenerv3.FilterChain{
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(p)), PrefixRanges: hostRanges(vips)},
			Filters:          []*listenerv3.Filter{hcm},
		})
		vhs := httpHosts[p]
		slices.SortFunc(vhs, func(a, b *routev3.VirtualHost) int { return strings.Compare(a.GetName(), b.GetName()) })
		routes = append(routes, &routev3.RouteConfiguration{Name: ps, VirtualHosts: vhs})
	}
	slices.SortFunc(tcp, func(x, y tcpChain) int { return cmp.Or(x.s.vip.Compare(y.s.vip), cmp.Compare(x.p.number, y.p.number)) })
	for _, c := range tcp {
		chain, err := b.addressChain(c.s, c.p, hostRanges([]netip.Addr{c.s.vip})[0])
		if err != nil {
			return nil, nil, err
		}
		lis.FilterChains = append(lis.FilterChains, chain)
	}
	hcm, err := b.rdsManager(ExplicitRouteName, ExplicitRouteName)
	if err != nil {
		return nil, nil, fmt.Errorf("listener %q: explicit chain: %w", OutboundListenerName, err)
	}
	lis.FilterChains = append(lis.FilterChains, &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(OutboundPort)},
		Filters:          []*listenerv3.Filter{hcm},
	})
	slices.SortFunc(explicit, func(a, b *routev3.VirtualHost) int { return strings.Compare(a.GetName(), b.GetName()) })
	routes = append(routes, &routev3.RouteConfiguration{Name: ExplicitRouteName, VirtualHosts: explicit})

	passthrough, err := b.tcpProxyFilter(PassthroughClusterName)
	if err != nil {
		return nil, nil, fmt.Errorf("listener %q: default chain: %w", OutboundListenerName, err)
	}
	lis.DefaultFilterChain = &listenerv3.FilterChain{Filters: []*listenerv3.Filter{passthrough}}
	return lis, routes, nil
}

// explicitHost is an HTTP port's virtual host in the explicit route:
// <host>:<port>, and <host> alone for port 80.
func (b *sidecarBuilder) explicitHost(s *csService, p csPort) *routev3.VirtualHost {
	vhName := s.host + ":" + strconv.Itoa(int(p.number))
	domains := []string{vhName}
	if p.number == 80 {
		domains = append(domains, s.host)
	}
	return b.virtualHost(vhName, domains, outboundClusterName(s.host, p.number))
}

// addressChain is the outbound chain of port p of s's one address
// cidr: tcp_proxy to the port's cluster for a TCP port, and for an
// in-cluster service's HTTP port an HTTP connection manager whose inline
// route takes every Host to the cluster (the address and port already
// name the service).
func (b *sidecarBuilder) addressChain(s *csService, p csPort, cidr *corev3.CidrRange) (*listenerv3.FilterChain, error) {
	cluster := outboundClusterName(s.host, p.number)
	fail := func(err error) (*listenerv3.FilterChain, error) {
		return nil, fmt.Errorf("listener %q: service %s port %d: %w", OutboundListenerName, s.key, p.number, err)
	}
	var filter *listenerv3.Filter
	var err error
	if p.http() {
		vhName := s.host + ":" + strconv.Itoa(int(p.number))
		filter, err = b.inlineManager("outbound_"+strconv.Itoa(int(p.number)), b.virtualHost(vhName, []string{"*"}, cluster))
	} else {
		filter, err = b.tcpProxyFilter(cluster)
	}
	if err != nil {
		return fail(err)
	}
	return &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(p.number)), PrefixRanges: []*corev3.CidrRange{cidr}},
		Filters:          []*listenerv3.Filter{filter},
	}, nil
}

// inlineManager is an HTTP connection manager with vh as its one
// virtual host, in a route configuration of the same name.
func (b *sidecarBuilder) inlineManager(statPrefix string, vh *routev3.VirtualHost) (*listenerv3.Filter, error) {
	hcm, err := typedConfig(&hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: statPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: vh.GetName(), VirtualHosts: []*routev3.VirtualHost{vh},
		}},
		HttpFilters: []*hcmv3.HttpFilter{b.routerFilter()},
	})
	if err != nil {
		return nil, err
	}
	return &listenerv3.Filter{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm}}, nil
}

// inbound builds the listener on 15006: mTLS required on every chain,
// HTTP for the istio-http ALPNs, TCP for the rest.
func (b *sidecarBuilder) inbound() (*listenerv3.Listener, error) {
	fail := func(err error) (*listenerv3.Listener, error) {
		return nil, fmt.Errorf("listener %q: %w", InboundListenerName, err)
	}
	tlsCtx, err := typedConfig(&tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: b.certSDS,
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: b.rootSDS,
			},
		},
	})
	if err != nil {
		return fail(err)
	}
	transport := &corev3.TransportSocket{Name: wellknown.TransportSocketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: tlsCtx}}

	hcm, err := typedConfig(&hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: InboundRouteName,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name:         InboundRouteName,
			VirtualHosts: []*routev3.VirtualHost{b.virtualHost(InboundRouteName, []string{"*"}, InboundPassthroughClusterName)},
		}},
		HttpFilters:                 []*hcmv3.HttpFilter{b.routerFilter()},
		ForwardClientCertDetails:    hcmv3.HttpConnectionManager_SANITIZE_SET,
		SetCurrentClientCertDetails: &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true},
		// Istio's default (pathNormalization BASE): the app and the
		// HTTP RBAC see one path, so /public/../admin cannot pass a
		// DENY on /admin that the app would then serve.
		NormalizePath: wrapperspb.Bool(true),
	})
	if err != nil {
		return fail(err)
	}
	proxy, err := b.tcpProxyFilter(InboundPassthroughClusterName)
	if err != nil {
		return fail(err)
	}
	return &listenerv3.Listener{
		Name:    InboundListenerName,
		Address: socketAddress(anyAddress, InboundPort),
		ListenerFilters: []*listenerv3.ListenerFilter{
			// The original destination first: inbound-passthrough dials
			// the port the caller dialled, not 15006.
			{Name: wellknown.OriginalDestination, ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: b.originalDst}},
			{Name: wellknown.TLSInspector, ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: b.tlsInspector}},
		},
		FilterChains: []*listenerv3.FilterChain{
			{
				FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: "tls", ApplicationProtocols: httpALPN},
				Filters: []*listenerv3.Filter{{
					Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm},
				}},
				TransportSocket: transport,
			},
			{
				FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: "tls"},
				Filters:          []*listenerv3.Filter{proxy},
				TransportSocket:  transport,
			},
		},
	}, nil
}

func (b *sidecarBuilder) routerFilter() *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: wellknown.Router, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: b.router}}
}

// rdsManager is an HTTP connection manager whose routes come over ADS
// under route.
func (b *sidecarBuilder) rdsManager(statPrefix, route string) (*listenerv3.Filter, error) {
	hcm, err := typedConfig(&hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: statPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource: b.adsSource, RouteConfigName: route,
		}},
		HttpFilters: []*hcmv3.HttpFilter{b.routerFilter()},
	})
	if err != nil {
		return nil, err
	}
	return &listenerv3.Filter{Name: wellknown.HTTPConnectionManager, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm}}, nil
}

func (b *sidecarBuilder) tcpProxyFilter(cluster string) (*listenerv3.Filter, error) {
	proxy, err := typedConfig(&tcpproxyv3.TcpProxy{
		StatPrefix:       cluster,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
		IdleTimeout:      b.idleTimeout,
	})
	if err != nil {
		return nil, err
	}
	return &listenerv3.Filter{Name: wellknown.TCPProxy, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: proxy}}, nil
}

// virtualHost routes every path of domains to cluster, without a
// timeout: streams and long polls are not cut.
func (b *sidecarBuilder) virtualHost(name string, domains []string, cluster string) *routev3.VirtualHost {
	return &routev3.VirtualHost{
		Name:    name,
		Domains: domains,
		Routes: []*routev3.Route{{
			Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
				Timeout:          b.noTimeout,
			}},
		}},
	}
}

func hostRanges(addrs []netip.Addr) []*corev3.CidrRange {
	out := make([]*corev3.CidrRange, len(addrs))
	for i, a := range addrs {
		out[i] = &corev3.CidrRange{AddressPrefix: a.String(), PrefixLen: wrapperspb.UInt32(uint32(a.BitLen()))}
	}
	return out
}

// withRoutes adds route configurations, each validated, in their
// canonical order (by name), with their version, and folds it into
// Version.
func (r Resources) withRoutes(routes []*routev3.RouteConfiguration) (Resources, error) {
	v, err := typeVersion(routeTag, routes, (*routev3.RouteConfiguration).GetName)
	if err != nil {
		return Resources{}, err
	}
	r.Routes, r.RoutesVersion = routes, v
	r.combine()
	return r, nil
}
