package xdsclient

import (
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
)

// Config is one consistent, accepted xDS configuration: every filter
// chain's cluster is present and every EDS cluster carries its
// assignment's endpoints. A Config is never modified once published:
// readers share it without locks, and must not modify its slices or maps.
type Config struct {
	// Listeners sorted by name. The gateway role receives exactly one
	// (docs/gateway-xds.md), but the model does not assume it.
	Listeners []Listener
	// Clusters by name: CDS combined with EDS (or a cluster's inline
	// load_assignment).
	Clusters map[string]Cluster
	// Sidecar is the sidecar role's listeners, route configurations and
	// DNS name table (docs/sidecar-xds.md); nil for the gateway role,
	// whose listeners are Listeners. The sidecar's clusters are Clusters.
	Sidecar *Sidecar
	// Bundles are the trust bundles of the ROOTCA Secret, one per trust
	// domain (the local one and every federated peer's), never merged:
	// a peer is validated against the bundle of the trust domain in its
	// SPIFFE ID. Nil until the first ROOTCA is accepted, and for a client
	// that does not subscribe to Secrets. The set and its bundles are
	// shared and must not be modified; Client.Bundles is the live
	// x509bundle.Source to give go-spiffe's tlsconfig.
	Bundles *x509bundle.Set
	// Versions maps each type URL to the version_info of the responses
	// this Config was made from. A later response that changes nothing is
	// accepted without publishing a new Config (Client.Stats has the
	// versions accepted last). Nil for a Config made by Decode.
	Versions map[string]string
}

// Listener finds a listener by name.
func (c *Config) Listener(name string) (Listener, bool) {
	if c == nil {
		return Listener{}, false
	}
	for _, l := range c.Listeners {
		if l.Name == name {
			return l, true
		}
	}
	return Listener{}, false
}

// Listener is an SNI-routing TCP listener: tls_inspector, then one filter
// chain per set of server names, each ending in a tcp_proxy to a cluster.
type Listener struct {
	Name string
	// Addr and Port are the listener's socket_address. They are informative:
	// the gateway binds where its flags say.
	Addr netip.Addr
	Port uint16
	// Chains in the order the server sent them (sorted by SNI by the
	// federator). No two chains share a server name.
	Chains []Chain
}

// Chain is one filter chain: the server names that select it and the
// tcp_proxy it ends in.
type Chain struct {
	// SNIs are the chain's filter_chain_match.server_names, lowercased,
	// matched exactly. Never empty: there is no catch-all chain.
	SNIs []string
	// Cluster is the tcp_proxy's upstream cluster.
	Cluster string
	// StatPrefix is the tcp_proxy's stat_prefix.
	StatPrefix string
	// IdleTimeout is the tcp_proxy's idle_timeout: Envoy's default of one
	// hour when unset; never zero (disabling it is refused).
	IdleTimeout time.Duration
}

// ClusterType is how a cluster finds its endpoints.
type ClusterType int

// The cluster types the client accepts.
const (
	// Static endpoints are IP addresses in the cluster's load_assignment.
	Static ClusterType = iota + 1
	// StrictDNS endpoints may be hostnames, resolved when dialing.
	StrictDNS
	// EDS endpoints come from a ClusterLoadAssignment over ADS.
	EDS
	// OriginalDst (ORIGINAL_DST, with lb_policy CLUSTER_PROVIDED) has no
	// endpoints: the upstream is the connection's original destination
	// (PassthroughCluster), or for inbound-passthrough the app on
	// 127.0.0.1 at the original destination's port. Sidecar role only.
	OriginalDst
)

func (t ClusterType) String() string {
	switch t {
	case Static:
		return "STATIC"
	case StrictDNS:
		return "STRICT_DNS"
	case EDS:
		return "EDS"
	case OriginalDst:
		return "ORIGINAL_DST"
	}
	return "ClusterType(" + strconv.Itoa(int(t)) + ")"
}

// Cluster is an upstream cluster with its endpoints.
type Cluster struct {
	Name string
	Type ClusterType
	// ServiceName is the ClusterLoadAssignment's cluster_name for an EDS
	// cluster: eds_cluster_config.service_name, or Name. Empty otherwise.
	ServiceName string
	// ConnectTimeout bounds dialing one endpoint: Envoy's default of five
	// seconds when unset, never zero.
	ConnectTimeout time.Duration
	// Endpoints in the order the server sent them, grouped by locality.
	// May be empty (a service with no pods). For the sidecar they are
	// ordered by priority, lowest first (Priorities slices them).
	Endpoints []Endpoint

	// The fields below are the sidecar role's (docs/sidecar-xds.md); the
	// gateway role refuses the proto fields they come from.

	// Priorities are the ClusterLoadAssignment's LocalityLbEndpoints by
	// priority: Priorities[p] holds every locality with priority p. The
	// decoder guarantees they are contiguous from 0 (every level has at
	// least one locality), no address appears twice in the assignment,
	// and the cluster asked Envoy to balance as the sidecar does
	// (common_lb_config: locality_weighted_lb_config, and a
	// healthy_panic_threshold of 0: never an unhealthy endpoint). Nil
	// when the assignment has no locality, for the gateway role, and for
	// non-EDS clusters.
	Priorities []Priority
	// OverprovisioningFactor is policy.overprovisioning_factor, in
	// percent: Envoy's 140 when unset. The contract sends 100000: fail
	// over only when a priority has no healthy endpoint at all. Zero for
	// the gateway role and for non-EDS clusters.
	OverprovisioningFactor uint32
	// Service is metadata.filter_metadata["isthmus"]: the service port
	// this cluster carries; nil for the fixed clusters.
	Service *ServiceMeta
	// TLS is the transport_socket's UpstreamTlsContext: mTLS to the next
	// sidecar or gateway. Nil: plaintext (the ORIGINAL_DST clusters).
	TLS *UpstreamTLS
	// UpstreamHTTP is the HTTP version the cluster speaks to its
	// endpoints. The decoder guarantees a service cluster has one
	// (UpstreamHTTP1, UpstreamHTTP2, or UpstreamHTTPDownstream) exactly
	// when its Service.Protocol is HTTP; the federator sends
	// inbound-passthrough UpstreamHTTPDownstream (the app gets the
	// version the calling sidecar chose) and PassthroughCluster none.
	UpstreamHTTP UpstreamHTTP
}

// UpstreamHTTP is the HTTP version a cluster speaks to its endpoints:
// typed_extension_protocol_options
// ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"], whose
// upstream_protocol_options the decoder accepts in three forms. The
// federator picks by the declared port protocol, as Istio does: a port
// declared http gets HTTP/1.1, http2, grpc, grpc-web and h2c get HTTP/2.
type UpstreamHTTP int

// The upstream HTTP versions of docs/sidecar-xds.md.
const (
	// UpstreamHTTPNone: no HttpProtocolOptions, not an HTTP cluster (TCP
	// ports, the outbound passthrough).
	UpstreamHTTPNone UpstreamHTTP = iota
	// UpstreamHTTPDownstream is use_downstream_protocol_config {}: the
	// version the downstream spoke.
	UpstreamHTTPDownstream
	// UpstreamHTTP1 is explicit_http_config { http_protocol_options {} }:
	// HTTP/1.1 whatever the downstream spoke (h2c is downgraded).
	UpstreamHTTP1
	// UpstreamHTTP2 is explicit_http_config { http2_protocol_options {} }:
	// HTTP/2 whatever the downstream spoke (HTTP/1.1 is upgraded).
	UpstreamHTTP2
)

func (u UpstreamHTTP) String() string {
	switch u {
	case UpstreamHTTPNone:
		return "none"
	case UpstreamHTTPDownstream:
		return "downstream"
	case UpstreamHTTP1:
		return "HTTP/1.1"
	case UpstreamHTTP2:
		return "HTTP/2"
	}
	return "UpstreamHTTP(" + strconv.Itoa(int(u)) + ")"
}

// Endpoint is one upstream address.
type Endpoint struct {
	// Addr is set for an IP endpoint (every endpoint of EDS and STATIC
	// clusters); invalid when Host is set.
	Addr netip.AddrPort
	// Host is a DNS name, only in STRICT_DNS clusters; empty for IP
	// endpoints.
	Host string
	// Port is the endpoint's port, also for Host endpoints. Never zero.
	Port uint16
	// Healthy is false for endpoints whose health_status is anything but
	// HEALTHY or UNKNOWN (Envoy's default): UNHEALTHY, DRAINING, TIMEOUT,
	// DEGRADED. A proxy never picks them.
	Healthy bool
	// Locality is the endpoint's LocalityLbEndpoints locality.
	Locality Locality
}

// HostPort is the address to dial: "ip:port" or "host:port".
func (e Endpoint) HostPort() string {
	if e.Host != "" {
		return net.JoinHostPort(e.Host, strconv.Itoa(int(e.Port)))
	}
	return e.Addr.String()
}

// Locality is where an endpoint runs (Kubernetes topology labels).
type Locality struct {
	Region, Zone, SubZone string
}
