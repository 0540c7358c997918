package xdsclient

import (
	"net"
	"net/netip"
	"strconv"
	"time"
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
)

func (t ClusterType) String() string {
	switch t {
	case Static:
		return "STATIC"
	case StrictDNS:
		return "STRICT_DNS"
	case EDS:
		return "EDS"
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
	// May be empty (a service with no pods).
	Endpoints []Endpoint
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
