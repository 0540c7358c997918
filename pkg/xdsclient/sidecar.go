package xdsclient

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The sidecar's model (docs/sidecar-xds.md). Everything here is built
// once, when a response is decoded, and then only read: the lookup
// helpers a proxy calls per connection or per request are map lookups
// over indexes the decoder precomputed, and allocate nothing.

// Names the sidecar contract fixes.
const (
	// OutboundListenerName is the listener on 15001 that receives the
	// app's outbound connections.
	OutboundListenerName = "outbound"
	// InboundListenerName is the listener on 15006 that receives
	// connections to the pod.
	InboundListenerName = "inbound"
	// PassthroughCluster is the outbound default chain's ORIGINAL_DST
	// cluster: anything that is not a clusterset service.
	PassthroughCluster = "PassthroughCluster"
	// InboundPassthroughCluster is the inbound chains' ORIGINAL_DST
	// cluster: the app behind the sidecar. The Go sidecar dials
	// 127.0.0.1:<original destination port>.
	InboundPassthroughCluster = "inbound-passthrough"
	// ServiceMetadataKey is the cluster metadata.filter_metadata key of
	// ServiceMeta.
	ServiceMetadataKey = "isthmus"
)

// Sidecar is the sidecar role's part of a Config: its two listeners, the
// route configurations they use and the DNS name table. The decoder
// guarantees, for every Sidecar it publishes:
//   - Outbound and Inbound are both present;
//   - every route configuration an HTTP connection manager names over RDS
//     is in Routes, and Routes holds no other;
//   - every cluster a tcp_proxy or a route names is in the Config's
//     Clusters, and every EDS cluster has its ClusterLoadAssignment;
//   - the ROOTCA Secret every TLS context names has been received
//     (Config.Bundles is set);
//   - no two clusters' metadata give one host two VIPs, or one VIP two
//     hosts.
type Sidecar struct {
	// Outbound is the listener named "outbound" (15001).
	Outbound *OutboundListener
	// Inbound is the listener named "inbound" (15006).
	Inbound *InboundListener
	// Routes are the RouteConfigurations received over RDS, by name ("80",
	// "explicit", …). The inbound listener's inline route_config is not
	// here: it hangs off its chain.
	Routes map[string]*RouteConfig

	// hostVIP and vipHost are the DNS name table, from the clusters'
	// ServiceMeta: lowercased host → VIP and VIP → host.
	hostVIP map[string]netip.Addr
	vipHost map[netip.Addr]string
}

// Route is the route configuration named name (an HCM's
// RouteConfigName), nil if there is none.
func (s *Sidecar) Route(name string) *RouteConfig {
	if s == nil {
		return nil
	}
	return s.Routes[name]
}

// LookupHost is the DNS proxy's name table: the VIP of a clusterset
// service's host (`<name>.<ns>.svc.clusterset.local`), from the clusters'
// metadata. It is case-insensitive and accepts a trailing dot (a DNS
// question's name as is).
func (s *Sidecar) LookupHost(name string) (netip.Addr, bool) {
	if s == nil {
		return netip.Addr{}, false
	}
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	return lookupLower(s.hostVIP, name)
}

// LookupVIP is the host that owns vip, for reverse lookups and logs.
func (s *Sidecar) LookupVIP(vip netip.Addr) (string, bool) {
	if s == nil {
		return "", false
	}
	h, ok := s.vipHost[vip.Unmap()]
	return h, ok
}

// NameTable is a copy of the DNS name table, host → VIP, for the DNS
// proxy to swap in when the config changes.
func (s *Sidecar) NameTable() map[string]netip.Addr {
	if s == nil {
		return nil
	}
	return maps.Clone(s.hostVIP)
}

// Hosts is the number of names in the DNS table.
func (s *Sidecar) Hosts() int {
	if s == nil {
		return 0
	}
	return len(s.hostVIP)
}

// OutboundListener is the listener named "outbound": listener_filters
// [original_dst], one filter chain per (destination port, VIPs), and a
// default chain. The decoder guarantees: every chain has a
// destination_port; prefix_ranges are single addresses (/32, /128); no
// two chains match the same (port, address), and no two chains match any
// address on the same port; Default is set.
type OutboundListener struct {
	Name string
	// Addr and Port are the listener's socket_address (0.0.0.0:15001),
	// informative: the sidecar binds where its flags say.
	Addr netip.Addr
	Port uint16
	// Chains in the order the server sent them (HTTP ports, then TCP by
	// VIP and port, then explicit).
	Chains []OutboundChain
	// Default is default_filter_chain: tcp_proxy to PassthroughCluster.
	Default OutboundChain

	// exact indexes Chains by (VIP, port) of every prefix range; anyIP by
	// the destination port of the chains without prefix ranges.
	exact map[netip.AddrPort]int32
	anyIP map[uint16]int32
}

// Match is the filter chain for a connection whose original destination
// (SO_ORIGINAL_DST, or the listener's own address when not redirected) is
// dst, by Envoy's rules restricted to what the contract emits: the chains
// for dst's port, the one listing dst's address first, else the one for
// any address; if dst's port has no chain at all, or none of its chains
// matches, Default. Never nil.
func (l *OutboundListener) Match(dst netip.AddrPort) *OutboundChain {
	if i, ok := l.exact[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]; ok {
		return &l.Chains[i]
	}
	if i, ok := l.anyIP[dst.Port()]; ok {
		return &l.Chains[i]
	}
	return &l.Default
}

// OutboundChain is one outbound filter chain: its filter_chain_match and
// its one network filter, exactly one of HTTP and TCP.
type OutboundChain struct {
	// Port is filter_chain_match.destination_port; zero only for Default.
	Port uint16
	// VIPs are filter_chain_match.prefix_ranges, each a whole address
	// (address_prefix with prefix_len 32, or 128 for IPv6), unmapped.
	// Empty: any address on Port (the explicit-mode chain).
	VIPs []netip.Addr
	// HTTP is an envoy.filters.network.http_connection_manager using RDS.
	HTTP *HTTPConnectionManager
	// TCP is an envoy.filters.network.tcp_proxy.
	TCP *TCPProxy
}

// TCPProxy is an envoy.filters.network.tcp_proxy to one cluster.
type TCPProxy struct {
	// Cluster is the upstream cluster; the Config has it.
	Cluster string
	// StatPrefix is stat_prefix (required by Envoy).
	StatPrefix string
	// IdleTimeout is idle_timeout: Envoy's one hour when unset, never
	// zero (disabling it is refused).
	IdleTimeout time.Duration
}

// ForwardClientCert is an HTTP connection manager's
// forward_client_cert_details: what happens to X-Forwarded-Client-Cert.
type ForwardClientCert int

// The forward_client_cert_details values the client accepts.
const (
	// Sanitize (SANITIZE, Envoy's default) removes any XFCC header the
	// downstream sent and adds none.
	Sanitize ForwardClientCert = iota
	// SanitizeSet (SANITIZE_SET) replaces any XFCC header the downstream
	// sent with one describing the downstream's client certificate (only
	// over mTLS): By=<own URI SAN>;Hash=<hex SHA-256 of the client's
	// certificate>, then the fields SetCurrentClientCert names.
	SanitizeSet
)

func (f ForwardClientCert) String() string {
	switch f {
	case Sanitize:
		return "SANITIZE"
	case SanitizeSet:
		return "SANITIZE_SET"
	}
	return "ForwardClientCert(" + strconv.Itoa(int(f)) + ")"
}

// HTTPConnectionManager is an envoy.filters.network.http_connection_manager
// with codec_type AUTO (HTTP/1.1, or HTTP/2 with prior knowledge, told
// apart by the connection preface) and http_filters [router], preceded on
// an inbound chain by at most two envoy.filters.http.rbac. The decoder
// guarantees exactly one of RouteConfigName and Routes is set.
type HTTPConnectionManager struct {
	// StatPrefix is stat_prefix: "outbound_<P>", "inbound".
	StatPrefix string
	// RouteConfigName is rds.route_config_name (rds.config_source is
	// ads {}): the outbound chains. The Sidecar's Routes has it.
	RouteConfigName string
	// Routes is the inline route_config: the inbound HTTP chain.
	Routes *RouteConfig
	// ForwardClientCert is forward_client_cert_details.
	ForwardClientCert ForwardClientCert
	// SetClientCertURI is set_current_client_cert_details.uri: with
	// SanitizeSet, the XFCC header also carries URI=<client's URI SAN>.
	SetClientCertURI bool
	// RBAC is the envoy.filters.http.rbac filters before the router, on
	// an inbound chain only, decided per request; nil when there are
	// none.
	RBAC *HTTPRBAC
	// NormalizePath is normalize_path, on an inbound chain only: the
	// request's path is normalized as Envoy normalizes it before HTTP
	// RBAC reads it and the app receives it, and a path that cannot be
	// is answered 400.
	NormalizePath bool
}

// InboundListener is the listener named "inbound": listener_filters
// [original_dst, tls_inspector] and filter chains that match
// transport_protocol "tls", terminating it with a DownstreamTLS, or
// "raw_buffer": plaintext, the PERMISSIVE ports of an Istio
// PeerAuthentication. The decoder guarantees: among the chains of one
// destination port, and among those for any port, no two TLS chains list
// the same application protocol, at most one TLS chain lists none, and
// at most one chain is raw_buffer; there is no default chain — a
// connection that no chain matches is closed.
type InboundListener struct {
	Name string
	// Addr and Port are the listener's socket_address (0.0.0.0:15006),
	// informative.
	Addr netip.Addr
	Port uint16
	// Chains in the order the server sent them.
	Chains []InboundChain

	// groups has an entry for every destination port some chain matches,
	// 0 standing for the chains of any port. byALPN indexes the TLS
	// chains by (group, application protocol).
	groups map[uint16]inboundGroup
	byALPN map[inboundKey]int32
	// plaintext: some chain is raw_buffer.
	plaintext bool
}

// inboundGroup is the chains of one destination port (or of any port)
// that no application protocol picks: the index of the TLS chain that
// lists none and of the raw_buffer chain, -1 for either when there is
// none.
type inboundGroup struct {
	tlsAny, raw int32
}

// inboundKey is a chain's place in InboundListener.byALPN: its
// destination port (0: any) and one application protocol it lists.
type inboundKey struct {
	port uint16
	alpn string
}

// Transport is filter_chain_match.transport_protocol of an inbound chain,
// and what Envoy's tls_inspector makes of a connection: TLS when it
// opens with a TLS handshake record, else raw_buffer.
type Transport uint8

// The inbound transport protocols.
const (
	// TransportTLS is "tls": the chain terminates mTLS.
	TransportTLS Transport = iota
	// TransportRaw is "raw_buffer": plaintext, no caller identity.
	TransportRaw
)

func (t Transport) String() string {
	switch t {
	case TransportTLS:
		return "tls"
	case TransportRaw:
		return "raw_buffer"
	}
	return "Transport(" + strconv.Itoa(int(t)) + ")"
}

// Plaintext reports whether some chain matches transport_protocol
// "raw_buffer": only then must the listener tell a TLS connection from a
// plaintext one before matching; without it every connection is taken
// as TLS, and one that is not fails its handshake.
func (l *InboundListener) Plaintext() bool { return l.plaintext }

// Match is the filter chain for a TLS connection to the original
// destination port port whose ClientHello offers alpn (in the client's
// order): MatchIndex's with TransportTLS. Nil when nothing matches:
// close the connection.
func (l *InboundListener) Match(port uint16, alpn []string) *InboundChain {
	return l.chain(l.MatchIndex(port, TransportTLS, alpn))
}

// MatchPlaintext is the filter chain for a plaintext connection to the
// original destination port port: MatchIndex's with TransportRaw. Nil
// when nothing matches (port is STRICT): close the connection.
func (l *InboundListener) MatchPlaintext(port uint16) *InboundChain {
	return l.chain(l.MatchIndex(port, TransportRaw, nil))
}

func (l *InboundListener) chain(i int) *InboundChain {
	if i < 0 {
		return nil
	}
	return &l.Chains[i]
}

// MatchIndex is the index in Chains of the filter chain for a
// connection to the original destination port port, of transport t,
// whose ClientHello offers alpn (in the client's order; nil for
// raw_buffer), by Envoy's rules, which match destination_port, then
// transport_protocol, then application_protocols, and never go back: if
// a chain names port, only the chains of port are considered, else only
// the chains of any port. Among those, a raw_buffer connection gets the
// raw_buffer chain; a TLS one the TLS chain listing the first offered
// protocol that one lists, otherwise the TLS chain that lists none. -1
// when nothing matches: close the connection.
func (l *InboundListener) MatchIndex(port uint16, t Transport, alpn []string) int {
	g, ok := l.groups[port]
	if !ok {
		port = 0
		if g, ok = l.groups[0]; !ok {
			return -1
		}
	}
	if t == TransportRaw {
		return int(g.raw)
	}
	for _, p := range alpn {
		if i, ok := l.byALPN[inboundKey{port, p}]; ok {
			return int(i)
		}
	}
	return int(g.tlsAny)
}

// InboundChain is one inbound filter chain: filter_chain_match
// { destination_port, transport_protocol, application_protocols }, the
// TLS it terminates (none for raw_buffer), its RBAC filters if any, and
// exactly one of HTTP and TCP.
type InboundChain struct {
	// Port is filter_chain_match.destination_port, the original
	// destination's port (the app's); 0 when unset: any port.
	Port uint16
	// ALPN is filter_chain_match.application_protocols; empty matches any
	// protocol (or none). Always empty on a raw_buffer chain.
	ALPN []string
	// TLS is the chain's transport_socket, envoy.transport_sockets.tls,
	// on a chain of transport_protocol "tls". Nil on a "raw_buffer"
	// chain, which has no transport_socket: its connections are
	// plaintext, their caller unauthenticated (RBAC reads its ID as
	// empty, which no authenticated principal matches) and their HTTP
	// requests get no X-Forwarded-Client-Cert.
	TLS *DownstreamTLS
	// HTTP is an HTTP connection manager with an inline route_config.
	HTTP *HTTPConnectionManager
	// TCP is a tcp_proxy (to InboundPassthroughCluster).
	TCP *TCPProxy
	// RBAC is the envoy.filters.network.rbac filters before HTTP or TCP,
	// decided once per connection; nil when there are none.
	RBAC *NetworkRBAC
}

// Transport is the chain's filter_chain_match.transport_protocol.
func (ch *InboundChain) Transport() Transport {
	if ch.TLS == nil {
		return TransportRaw
	}
	return TransportTLS
}

// DownstreamTLS is a DownstreamTlsContext whose certificates come from
// SDS. The decoder guarantees both names are set and that a client
// certificate is required (require_client_certificate: true): there is
// no one-way TLS inbound. (Plaintext is a chain without TLS, matching
// transport_protocol "raw_buffer".)
type DownstreamTLS struct {
	// CertSecret is common_tls_context.tls_certificate_sds_secret_configs
	// [0].name: "default", the sidecar's own SVID (made locally, never
	// sent by the federator).
	CertSecret string
	// ValidationSecret is common_tls_context
	// .validation_context_sds_secret_config.name: "ROOTCA", the
	// per-trust-domain bundles a client's SVID is verified against.
	ValidationSecret string
}

// UpstreamTLS is a cluster's transport_socket envoy.transport_sockets.tls
// with an UpstreamTlsContext. The decoder guarantees SNI, CertSecret and
// ValidationSecret are set and every SAN is a SPIFFE ID.
type UpstreamTLS struct {
	// SNI is sni: outbound_.<port>_._.<name>.<ns>.svc.cluster.local.
	SNI string
	// CertSecret is common_tls_context.tls_certificate_sds_secret_configs
	// [0].name: "default", the sidecar's own SVID.
	CertSecret string
	// ValidationSecret is combined_validation_context
	// .validation_context_sds_secret_config.name: "ROOTCA". The peer's
	// certificate is verified against the bundle of its own trust domain.
	ValidationSecret string
	// SANs are combined_validation_context.default_validation_context
	// .match_typed_subject_alt_names, every one {san_type: URI, matcher:
	// {exact: <id>}}, in the order sent: the peer's SPIFFE ID must be one
	// of them. Empty: any ID the bundles verify (Envoy's behaviour).
	SANs []spiffeid.ID
	// ALPN is common_tls_context.alpn_protocols, in the order sent:
	// ["istio-http/1.1", "istio-h2"] for HTTP ports, ["istio"] for TCP.
	ALPN []string
}

// Protocol is a service port's protocol from the cluster metadata.
type Protocol int

// The protocols of ServiceMeta.
const (
	ProtocolTCP Protocol = iota + 1
	ProtocolHTTP
)

func (p Protocol) String() string {
	switch p {
	case ProtocolTCP:
		return "TCP"
	case ProtocolHTTP:
		return "HTTP"
	}
	return "Protocol(" + strconv.Itoa(int(p)) + ")"
}

// ServiceMeta is a service cluster's metadata.filter_metadata["isthmus"]:
// {host, vip, port, protocol}. The decoder guarantees host is a DNS name
// (lowercased), vip an IP address (unmapped), port non-zero and protocol
// "HTTP" or "TCP".
type ServiceMeta struct {
	Host     string
	VIP      netip.Addr
	Port     uint16
	Protocol Protocol
}

// Priority is one priority level of a ClusterLoadAssignment: the
// LocalityLbEndpoints whose priority is its index in Cluster.Priorities.
type Priority struct {
	// Localities in the order the server sent them.
	Localities []LocalityEndpoints
}

// LocalityEndpoints is one LocalityLbEndpoints.
type LocalityEndpoints struct {
	Locality Locality
	// Weight is load_balancing_weight; zero when unset, and then the
	// sidecar weighs the locality by its healthy endpoint count.
	Weight uint32
	// Endpoints is lb_endpoints: a sub-slice of the Cluster's Endpoints.
	Endpoints []Endpoint
}

// RouteConfig is a RouteConfiguration (over RDS, or inline on the inbound
// HTTP chain). The decoder guarantees every domain is an exact host,
// host:port or "*", no two virtual hosts share a domain (compared
// case-insensitively), and every route's cluster is in the Config.
type RouteConfig struct {
	Name string
	// VirtualHosts in the order sent (sorted by name by the federator).
	VirtualHosts []VirtualHost

	// domains indexes VirtualHosts by lowercased domain; wildcard is the
	// one with domain "*", -1 when none.
	domains  map[string]int32
	wildcard int32
}

// VirtualHost is the virtual host for an HTTP request's authority (the
// Host header, or :authority), as Envoy picks it among the exact domains
// and "*" the contract emits: the domain equal to the whole authority,
// port included, compared case-insensitively; else the "*" one; else nil
// (Envoy answers 404). "echo.demo.svc.clusterset.local:8080" matches only
// a domain that lists the port, as in Envoy.
func (rc *RouteConfig) VirtualHost(authority string) *VirtualHost {
	if rc == nil {
		return nil
	}
	if i, ok := lookupLower(rc.domains, authority); ok {
		return &rc.VirtualHosts[i]
	}
	if rc.wildcard >= 0 {
		return &rc.VirtualHosts[rc.wildcard]
	}
	return nil
}

// VirtualHost is one virtual host of a RouteConfig.
type VirtualHost struct {
	Name string
	// Domains as sent, lowercased.
	Domains []string
	// Routes in order: the first whose prefix matches the path wins.
	Routes []Route
}

// Route is the first route whose prefix path starts with, or nil (404).
func (vh *VirtualHost) Route(path string) *Route {
	for i := range vh.Routes {
		r := &vh.Routes[i]
		if len(path) >= len(r.Prefix) && path[:len(r.Prefix)] == r.Prefix {
			return r
		}
	}
	return nil
}

// Route is one route: match { prefix } → route { cluster, timeout }.
type Route struct {
	// Prefix is match.prefix, case-sensitive; it starts with "/".
	Prefix string
	// Cluster is route.cluster; the Config has it.
	Cluster string
	// Timeout is route.timeout: the whole request and response must
	// finish within it. Zero means none (timeout: 0s, which the contract
	// sends); Envoy's 15 seconds when unset.
	Timeout time.Duration
}

// defaultRouteTimeout is Envoy's route.timeout when unset.
const defaultRouteTimeout = 15 * time.Second

// maxHostLen bounds the keys the lookups lowercase on the stack: a DNS
// name (253) plus ":65535". A longer name matches nothing.
const maxHostLen = 260

// lookupLower is m[lowercase(s)] without allocating: s itself when it
// has no upper-case ASCII letter, else a lowercased copy on the stack
// (m[string(b)] does not allocate). A key longer than maxHostLen is in
// no map the decoder builds.
func lookupLower[V any](m map[string]V, s string) (V, bool) {
	upper := false
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' {
			upper = true
			break
		}
	}
	if !upper {
		v, ok := m[s]
		return v, ok
	}
	var buf [maxHostLen]byte
	if len(s) > len(buf) {
		var zero V
		return zero, false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		buf[i] = c
	}
	v, ok := m[string(buf[:len(s)])]
	return v, ok
}

// The indexes behind the lookups, built by the decoder once a resource's
// parts are valid. Each reports the conflicts that would make a lookup
// ambiguous, as field errors relative to the resource.

// index fills l's chain indexes; a (port, address) or a port's
// any-address match claimed by two chains is an error, as in Envoy
// ("multiple filter chains with the same matching rules").
func (l *OutboundListener) index() error {
	var errs []error
	n := 0
	for _, ch := range l.Chains {
		n += len(ch.VIPs)
	}
	l.exact = make(map[netip.AddrPort]int32, n)
	l.anyIP = make(map[uint16]int32)
	for i, ch := range l.Chains {
		if len(ch.VIPs) == 0 {
			if j, dup := l.anyIP[ch.Port]; dup {
				errs = append(errs, fieldErr("filter_chains["+itoa(i)+"].filter_chain_match",
					"destination_port "+itoa(int(ch.Port))+" with any address is also matched by filter_chains["+itoa(int(j))+"]"))
				continue
			}
			l.anyIP[ch.Port] = int32(i)
			continue
		}
		for k, vip := range ch.VIPs {
			key := netip.AddrPortFrom(vip, ch.Port)
			if j, dup := l.exact[key]; dup {
				errs = append(errs, fieldErr("filter_chains["+itoa(i)+"].filter_chain_match.prefix_ranges["+itoa(k)+"]",
					key.String()+" is also matched by filter_chains["+itoa(int(j))+"]"))
				continue
			}
			l.exact[key] = int32(i)
		}
	}
	return errors.Join(errs...)
}

// index fills l's (port, transport, ALPN) index; within the chains of
// one destination port, or those of any port, a protocol listed by two
// TLS chains, two TLS chains listing none, or two raw_buffer chains, is
// an error.
func (l *InboundListener) index() error {
	var errs []error
	l.groups = make(map[uint16]inboundGroup)
	l.byALPN = make(map[inboundKey]int32)
	l.plaintext = false
	for i, ch := range l.Chains {
		g, ok := l.groups[ch.Port]
		if !ok {
			g = inboundGroup{tlsAny: -1, raw: -1}
		}
		switch {
		case ch.TLS == nil:
			l.plaintext = true
			if g.raw >= 0 {
				errs = append(errs, fieldErr("filter_chains["+itoa(i)+"].filter_chain_match.transport_protocol",
					`"raw_buffer" is also matched by filter_chains[`+itoa(int(g.raw))+"] of the same destination port: two chains match the same connections"))
			} else {
				g.raw = int32(i)
			}
		case len(ch.ALPN) == 0:
			if g.tlsAny >= 0 {
				errs = append(errs, fieldErr("filter_chains["+itoa(i)+"].filter_chain_match.application_protocols",
					"is empty, as in filter_chains["+itoa(int(g.tlsAny))+"]: two chains match the same connections"))
			} else {
				g.tlsAny = int32(i)
			}
		}
		l.groups[ch.Port] = g
		for k, p := range ch.ALPN {
			key := inboundKey{ch.Port, p}
			if j, dup := l.byALPN[key]; dup {
				errs = append(errs, fieldErr("filter_chains["+itoa(i)+"].filter_chain_match.application_protocols["+itoa(k)+"]",
					quote(p)+" is also matched by filter_chains["+itoa(int(j))+"]"))
				continue
			}
			l.byALPN[key] = int32(i)
		}
	}
	return errors.Join(errs...)
}

// index fills rc's domain index; a domain (case-insensitively) in two
// virtual hosts, or in one twice, is an error, as in Envoy.
func (rc *RouteConfig) index() error {
	var errs []error
	n := 0
	for _, vh := range rc.VirtualHosts {
		n += len(vh.Domains)
	}
	rc.domains = make(map[string]int32, n)
	rc.wildcard = -1
	for i, vh := range rc.VirtualHosts {
		for k, d := range vh.Domains {
			j, dup := rc.domains[d]
			if d == "*" {
				j, dup = rc.wildcard, rc.wildcard >= 0
			}
			if dup {
				errs = append(errs, fieldErr("virtual_hosts["+itoa(i)+"].domains["+itoa(k)+"]",
					quote(d)+" is also a domain of virtual_hosts["+itoa(int(j))+"]"))
				continue
			}
			if d == "*" {
				rc.wildcard = int32(i)
				continue
			}
			rc.domains[d] = int32(i)
		}
	}
	return errors.Join(errs...)
}

// indexNames builds the DNS name table from the clusters' ServiceMeta: a
// host with two VIPs, or a VIP claimed by two hosts, is an error naming
// the clusters. A host has one entry per port's cluster, all with the
// same VIP.
func (s *Sidecar) indexNames(clusters map[string]Cluster) error {
	s.hostVIP = make(map[string]netip.Addr)
	s.vipHost = make(map[netip.Addr]string)
	hostBy := make(map[string]string)
	vipBy := make(map[netip.Addr]string)
	var problems []string
	for _, name := range sortedNames(clusters) {
		m := clusters[name].Service
		if m == nil {
			continue
		}
		if vip, ok := s.hostVIP[m.Host]; ok && vip != m.VIP {
			problems = append(problems, fmt.Sprintf("cluster %q: metadata.filter_metadata[%q].vip: host %q has VIP %v, but %v in cluster %q",
				name, ServiceMetadataKey, m.Host, m.VIP, vip, hostBy[m.Host]))
			continue
		}
		if host, ok := s.vipHost[m.VIP]; ok && host != m.Host {
			problems = append(problems, fmt.Sprintf("cluster %q: metadata.filter_metadata[%q].vip: %v is also the VIP of host %q (cluster %q)",
				name, ServiceMetadataKey, m.VIP, host, vipBy[m.VIP]))
			continue
		}
		if _, ok := hostBy[m.Host]; !ok {
			hostBy[m.Host] = name
			vipBy[m.VIP] = name
		}
		s.hostVIP[m.Host] = m.VIP
		s.vipHost[m.VIP] = m.Host
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

func sortedNames[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
