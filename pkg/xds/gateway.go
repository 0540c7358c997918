package xds

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

// Names of the gateway's resources (docs/gateway-xds.md).
const (
	// GatewayListenerName is the gateway's only listener.
	GatewayListenerName = "eastwest-gw"
	// GatewayPort is the port the gateway listens on (Istio's convention).
	GatewayPort = 15443
	// FederationClusterName is the cluster behind federation.ReservedSNI:
	// the federator's federation API.
	FederationClusterName = "isthmus-federation"
)

// Values of the contract that are the same for every chain and cluster.
const (
	connectTimeout  = time.Second
	tcpIdleTimeout  = time.Hour
	anyAddress      = "0.0.0.0"
	clusterDomain   = "svc.cluster.local"
	outboundPrefix  = "outbound"
	emptySubsetName = ""
)

// GatewayOptions are the inputs of TranslateGateway besides the catalog.
type GatewayOptions struct {
	// FederationUpstream is host:port of the federator's federation API as
	// the gateway reaches it, the target of federation.ReservedSNI. An IP
	// makes a STATIC cluster, a hostname a STRICT_DNS one. Required.
	FederationUpstream string
	// ListenerPort is the port written in the listener's address, which
	// the gateway treats as informative; zero means GatewayPort.
	ListenerPort uint32
	// Namespace, when set, is where gateways run (the federator's own):
	// a gateway node on the TLS port must present an SVID of a
	// ServiceAccount there. Empty: any namespace, so long as the node's
	// own names the SVID's.
	Namespace string
}

// ServiceSNI is the TLS server name that selects port of the service
// namespace/name at an east-west gateway, in Istio's grammar with the
// empty subset: outbound_.<port>_._.<name>.<namespace>.svc.cluster.local.
func ServiceSNI(namespace, name string, port int32) string {
	return outboundPrefix + "_." + strconv.Itoa(int(port)) + "_." + emptySubsetName + "_." + name + "." + namespace + "." + clusterDomain
}

// ServiceClusterName is the cluster of port of the service
// namespace/name: outbound|<port>||<name>.<namespace>.svc.cluster.local.
func ServiceClusterName(namespace, name string, port int32) string {
	return outboundPrefix + "|" + strconv.Itoa(int(port)) + "|" + emptySubsetName + "|" + name + "." + namespace + "." + clusterDomain
}

// TranslateGateway computes the east-west gateway's configuration from
// the local catalog: one filter chain per TCP port of every exported
// service plus the federation chain, their clusters and endpoints. It is
// a pure function: the same catalog and options give the same Resources,
// with the same Version. Every resource has passed its Validate(); an
// error names the resource that did not.
//
// It is a GatewayTranslator used once; the federator keeps one, so that
// a change of one service re-translates that service alone.
func TranslateGateway(local *catalog.Snapshot, opts GatewayOptions) (Resources, error) {
	t, err := NewGatewayTranslator(opts)
	if err != nil {
		return Resources{}, err
	}
	return t.Translate(local)
}

// typedConfig validates a filter's configuration, which its enclosing
// resource's Validate() cannot see inside an Any, and packs it.
func typedConfig(m interface {
	proto.Message
	Validate() error
}) (*anypb.Any, error) {
	return typedConfigAs(typeURLOf(m), m)
}

// typedConfigAs is typedConfig with the type URL given, so that the Anys
// of one type share one string.
func typedConfigAs(typeURL string, m interface {
	proto.Message
	Validate() error
}) (*anypb.Any, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	b, err := deterministic.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return &anypb.Any{TypeUrl: typeURL, Value: b}, nil
}

// typeURLOf is the type URL anypb.New gives m.
func typeURLOf(m proto.Message) string {
	return "type.googleapis.com/" + string(m.ProtoReflect().Descriptor().FullName())
}

// tcpProxyTypeURL is the type URL of every filter chain's TcpProxy.
var tcpProxyTypeURL = typeURLOf(&tcpproxyv3.TcpProxy{})

// filterChain routes the TLS server name sni to cluster.
func filterChain(sni, cluster string) (*listenerv3.FilterChain, error) {
	proxy, err := typedConfigAs(tcpProxyTypeURL, &tcpproxyv3.TcpProxy{
		StatPrefix:       cluster,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
		IdleTimeout:      durationpb.New(tcpIdleTimeout),
	})
	if err != nil {
		return nil, fmt.Errorf("listener %q: filter chain %q: %w", GatewayListenerName, sni, err)
	}
	return &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: []string{sni}},
		Filters: []*listenerv3.Filter{{
			Name:       wellknown.TCPProxy,
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: proxy},
		}},
	}, nil
}

// gatewayListener is the gateway's listener without its filter chains.
func gatewayListener(port uint32) (*listenerv3.Listener, error) {
	if port == 0 {
		port = GatewayPort
	}
	inspector, err := typedConfig(&tlsinspectorv3.TlsInspector{})
	if err != nil {
		return nil, fmt.Errorf("listener %q: %w", GatewayListenerName, err)
	}
	return &listenerv3.Listener{
		Name:    GatewayListenerName,
		Address: socketAddress(anyAddress, port),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       wellknown.TLSInspector,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: inspector},
		}},
	}, nil
}

// edsParts are the parts every service cluster has in common. A
// translator shares one set among all its clusters, since resources are
// never modified.
type edsParts struct {
	typ     *clusterv3.Cluster_Type
	config  *clusterv3.Cluster_EdsClusterConfig
	timeout *durationpb.Duration
	lb      *clusterv3.Cluster_CommonLbConfig
}

func newEDSParts() edsParts {
	return edsParts{
		typ: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		config: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
			ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
			ResourceApiVersion:    corev3.ApiVersion_V3,
		}},
		timeout: durationpb.New(connectTimeout),
		lb:      noPanic(),
	}
}

// noPanic is a cluster's load balancing with Envoy's panic mode off
// (healthy_panic_threshold 0%). Envoy's default of 50% sends traffic to
// every endpoint, unready pods included, once fewer than half are
// healthy; the Go gateway never picks an UNHEALTHY endpoint, and a stock
// Envoy fed the same clusters must not either.
func noPanic() *clusterv3.Cluster_CommonLbConfig {
	return &clusterv3.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: 0}}
}

// edsCluster is a service cluster with parts of its own.
func edsCluster(name string) *clusterv3.Cluster { return newEDSParts().cluster(name) }

// cluster is the service cluster name, with the shared parts p.
func (p edsParts) cluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: p.typ,
		EdsClusterConfig:     p.config,
		ConnectTimeout:       p.timeout,
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		CommonLbConfig:       p.lb,
	}
}

// federationCluster points isthmus-federation at upstream: STATIC for an
// IP, STRICT_DNS for a hostname, with the address inline.
func federationCluster(upstream string) (*clusterv3.Cluster, error) {
	if upstream == "" {
		return nil, fmt.Errorf("cluster %q: %w", FederationClusterName, errNoUpstream)
	}
	if err := federation.CheckAddress(upstream); err != nil {
		return nil, fmt.Errorf("cluster %q: federation upstream: %w", FederationClusterName, err)
	}
	host, portStr, _ := net.SplitHostPort(upstream)
	port, _ := strconv.ParseUint(portStr, 10, 16)
	typ := clusterv3.Cluster_STRICT_DNS
	if addr, err := netip.ParseAddr(host); err == nil {
		typ = clusterv3.Cluster_STATIC
		host = addr.String()
	}
	return &clusterv3.Cluster{
		Name:                 FederationClusterName,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(connectTimeout),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		CommonLbConfig:       noPanic(),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: FederationClusterName,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{
				LbEndpoints: []*endpointv3.LbEndpoint{lbEndpoint(host, uint32(port), corev3.HealthStatus_UNKNOWN)},
			}},
		},
	}, nil
}

// loadAssignment lists the endpoints of one service port, per locality,
// at the port's target port (its service port when the target is
// unknown). Not-ready endpoints stay listed, UNHEALTHY, so the gateway
// knows them but never picks them.
//
// sameForGateway must compare every field of the service read here.
func loadAssignment(name string, svc *catalog.Service, p catalog.Port, localities *localities) *endpointv3.ClusterLoadAssignment {
	port := uint32(cmp.Or(p.TargetPort, p.Port))
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	for _, le := range svc.Endpoints {
		lle := &endpointv3.LocalityLbEndpoints{Locality: localities.get(le.Locality)}
		for _, a := range le.Addresses {
			health := corev3.HealthStatus_UNHEALTHY
			if a.Ready {
				health = corev3.HealthStatus_HEALTHY
			}
			lle.LbEndpoints = append(lle.LbEndpoints, lbEndpoint(a.IP, port, health))
		}
		cla.Endpoints = append(cla.Endpoints, lle)
	}
	return cla
}

func lbEndpoint(host string, port uint32, health corev3.HealthStatus) *endpointv3.LbEndpoint {
	return &endpointv3.LbEndpoint{
		HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(host, port)}},
		HealthStatus:   health,
	}
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}
