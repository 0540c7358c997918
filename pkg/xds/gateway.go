package xds

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

// Names of the gateway's resources (docs/gateway-xds.md).
const (
	// GatewayNodePrefix starts the node ID of every east-west gateway;
	// all of them get the same snapshot.
	GatewayNodePrefix = "eastwest-gw~"
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
func TranslateGateway(local *catalog.Snapshot, opts GatewayOptions) (Resources, error) {
	fed, err := federationCluster(opts.FederationUpstream)
	if err != nil {
		return Resources{}, err
	}
	port := opts.ListenerPort
	if port == 0 {
		port = GatewayPort
	}

	type chain struct{ sni, cluster string }
	chains := []chain{{sni: federation.ReservedSNI, cluster: FederationClusterName}}
	clusters := []*clusterv3.Cluster{fed}
	var loads []*endpointv3.ClusterLoadAssignment
	if local != nil {
		for svc := range local.All() {
			for _, p := range svc.Ports {
				if p.Protocol != catalog.ProtocolTCP {
					// The gateway forwards TLS over TCP only: UDP and SCTP
					// ports are not reachable through it.
					continue
				}
				name := ServiceClusterName(svc.Namespace, svc.Name, p.Port)
				chains = append(chains, chain{sni: ServiceSNI(svc.Namespace, svc.Name, p.Port), cluster: name})
				clusters = append(clusters, edsCluster(name))
				loads = append(loads, loadAssignment(name, svc, p))
			}
		}
	}
	slices.SortFunc(chains, func(a, b chain) int { return strings.Compare(a.sni, b.sni) })
	slices.SortFunc(clusters, func(a, b *clusterv3.Cluster) int { return strings.Compare(a.GetName(), b.GetName()) })
	slices.SortFunc(loads, func(a, b *endpointv3.ClusterLoadAssignment) int {
		return strings.Compare(a.GetClusterName(), b.GetClusterName())
	})

	inspector, err := typedConfig(&tlsinspectorv3.TlsInspector{})
	if err != nil {
		return Resources{}, fmt.Errorf("listener %q: %w", GatewayListenerName, err)
	}
	lis := &listenerv3.Listener{
		Name:    GatewayListenerName,
		Address: socketAddress(anyAddress, port),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       wellknown.TLSInspector,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: inspector},
		}},
	}
	for _, c := range chains {
		proxy, err := typedConfig(&tcpproxyv3.TcpProxy{
			StatPrefix:       c.cluster,
			ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: c.cluster},
			IdleTimeout:      durationpb.New(tcpIdleTimeout),
		})
		if err != nil {
			return Resources{}, fmt.Errorf("listener %q: filter chain %q: %w", GatewayListenerName, c.sni, err)
		}
		lis.FilterChains = append(lis.FilterChains, &listenerv3.FilterChain{
			FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: []string{c.sni}},
			Filters: []*listenerv3.Filter{{
				Name:       wellknown.TCPProxy,
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: proxy},
			}},
		})
	}
	return newResources([]*listenerv3.Listener{lis}, clusters, loads)
}

// typedConfig validates a filter's configuration, which its enclosing
// resource's Validate() cannot see inside an Any, and packs it.
func typedConfig(m interface {
	proto.Message
	Validate() error
}) (*anypb.Any, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	a := &anypb.Any{}
	if err := anypb.MarshalFrom(a, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		return nil, fmt.Errorf("%s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return a, nil
}

func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
			ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
			ResourceApiVersion:    corev3.ApiVersion_V3,
		}},
		ConnectTimeout: durationpb.New(connectTimeout),
		LbPolicy:       clusterv3.Cluster_ROUND_ROBIN,
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
func loadAssignment(name string, svc *catalog.Service, p catalog.Port) *endpointv3.ClusterLoadAssignment {
	port := uint32(cmp.Or(p.TargetPort, p.Port))
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	for _, le := range svc.Endpoints {
		lle := &endpointv3.LocalityLbEndpoints{Locality: &corev3.Locality{
			Region: le.Locality.Region, Zone: le.Locality.Zone, SubZone: le.Locality.Subzone,
		}}
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
