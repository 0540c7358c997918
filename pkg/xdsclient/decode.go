package xdsclient

import (
	"errors"
	"fmt"
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
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// The resource types the client subscribes to (ADS type URLs).
const (
	TypeListener              = "type.googleapis.com/envoy.config.listener.v3.Listener"
	TypeCluster               = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	TypeClusterLoadAssignment = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	TypeSecret                = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
)

// Extension names and typed_config types the gateway subset contains.
const (
	tlsInspectorName = "envoy.filters.listener.tls_inspector"
	tlsInspectorType = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
	tcpProxyName     = "envoy.filters.network.tcp_proxy"
	tcpProxyType     = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
)

// Envoy's defaults for the durations the subset carries.
const (
	defaultIdleTimeout    = time.Hour
	defaultConnectTimeout = 5 * time.Second
)

// Decode validates and decodes a complete set of resources, as a server
// would send them over one ADS stream, into a Config. It is a pure
// function: the federator's tests can check that what the translator emits
// is what the proxies accept.
//
// A resource outside the subset of docs/gateway-xds.md is an error naming
// the resource and the field (the text a NACK carries). Valid resources
// that are not consistent yet give an error wrapping ErrIncomplete.
// Without a ROOTCA Secret among the resources, Config.Bundles is nil.
func Decode(resources ...*anypb.Any) (*Config, error) {
	return DecodeRole(RoleGateway, resources...)
}

// DecodeRole is Decode for a proxy of role: RoleGateway
// (docs/gateway-xds.md), or RoleSidecar (docs/sidecar-xds.md), whose
// resources also include RouteConfigurations and whose Config has
// Sidecar set.
func DecodeRole(role string, resources ...*anypb.Any) (*Config, error) {
	s, err := newState(role)
	if err != nil {
		return nil, err
	}
	order := decodeOrder(role)
	byType := make(map[string][]*anypb.Any, len(order))
	var errs []error
	for i, r := range resources {
		if t := r.GetTypeUrl(); slices.Contains(order, t) {
			byType[t] = append(byType[t], r)
		} else {
			errs = append(errs, &resourceError{kind: "resource", idx: i, err: fmt.Errorf("unsupported type %q", t)})
		}
	}
	for _, t := range order {
		next, err := s.apply(t, byType[t])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s = next
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s.assemble(nil)
}

// unpack unmarshals a resource of the expected type.
func unpack(r *anypb.Any, typeURL string, m proto.Message) error {
	if r.GetTypeUrl() != typeURL {
		return fmt.Errorf("type %q in a response for %q", r.GetTypeUrl(), typeURL)
	}
	if err := proto.Unmarshal(r.GetValue(), m); err != nil {
		return fmt.Errorf("cannot decode: %w", err)
	}
	return nil
}

// unpackTyped unmarshals a typed_config of the one type the field allows.
func unpackTyped(a *anypb.Any, typeURL string, m proto.Message) error {
	if a.GetTypeUrl() != typeURL {
		return fieldErr("typed_config", fmt.Sprintf("unsupported type %q (want %s)", a.GetTypeUrl(), typeURL))
	}
	if err := proto.Unmarshal(a.GetValue(), m); err != nil {
		return fieldErr("typed_config", "cannot decode: "+err.Error())
	}
	return nil
}

// pgv runs the protoc-gen-validate rules Envoy itself enforces (required
// fields, ranges), after our own checks passed.
func pgv(m interface{ Validate() error }) error {
	if err := m.Validate(); err != nil {
		return fieldErr("", "invalid: "+err.Error())
	}
	return nil
}

func decodeListener(m *listenerv3.Listener) (Listener, error) {
	chains := m.GetFilterChains()
	return decodeListenerWith(m, len(chains), func(i int) (Chain, error) { return decodeFilterChain(chains[i]) })
}

// decodeListenerWith is decodeListener with the n filter chains coming
// from chain (m's own are ignored): the chains of a listener resent are
// decoded one by one, and the unchanged ones not at all (parts.go).
func decodeListenerWith(m *listenerv3.Listener, n int, chain func(i int) (Chain, error)) (Listener, error) {
	l := Listener{Name: m.GetName()}
	errs := []error{listenerFields.check(m)}
	if l.Name == "" {
		errs = append(errs, fieldErr("name", "is empty"))
	}
	if m.GetAddress() == nil {
		errs = append(errs, fieldErr("address", "is missing"))
	} else {
		ep, err := decodeAddress(m.GetAddress(), false)
		errs = append(errs, within("address", err))
		l.Addr, l.Port = ep.Addr.Addr(), ep.Port
	}

	inspectors := 0
	for i, f := range m.GetListenerFilters() {
		err := decodeListenerFilter(f)
		if err == nil {
			inspectors++
		}
		errs = append(errs, withinIndex("listener_filters", i, err))
	}
	if inspectors != 1 && len(m.GetListenerFilters()) == inspectors {
		errs = append(errs, fieldErr("listener_filters", "want exactly one "+tlsInspectorName+", got "+itoa(inspectors)))
	}

	if n == 0 {
		errs = append(errs, fieldErr("filter_chains", "is empty"))
	}
	l.Chains = make([]Chain, 0, n)
	sniChain := make(map[string]int, n)
	for i := range n {
		ch, err := chain(i)
		if err != nil {
			errs = append(errs, withinIndex("filter_chains", i, err))
			continue
		}
		for _, sni := range ch.SNIs {
			if j, dup := sniChain[sni]; dup {
				errs = append(errs, fieldErr("filter_chains["+itoa(i)+"].filter_chain_match.server_names",
					fmt.Sprintf("%q is also matched by filter_chains[%d]", sni, j)))
				continue
			}
			sniChain[sni] = i
		}
		l.Chains = append(l.Chains, ch)
	}
	if err := errors.Join(errs...); err != nil {
		return Listener{}, err
	}
	return l, pgv(m)
}

func decodeListenerFilter(f *listenerv3.ListenerFilter) error {
	if err := listenerFilterFields.check(f); err != nil {
		return err
	}
	if f.GetName() != tlsInspectorName {
		return fieldErr("name", fmt.Sprintf("unsupported listener filter %q (only %s)", f.GetName(), tlsInspectorName))
	}
	if f.GetTypedConfig() == nil {
		return nil
	}
	ti := new(tlsinspectorv3.TlsInspector)
	if err := unpackTyped(f.GetTypedConfig(), tlsInspectorType, ti); err != nil {
		return err
	}
	return within("typed_config", tlsInspectorFields.check(ti))
}

func decodeFilterChain(fc *listenerv3.FilterChain) (Chain, error) {
	errs := []error{filterChainFields.check(fc)}
	var ch Chain
	match := fc.GetFilterChainMatch()
	if err := chainMatchFields.check(match); err != nil {
		errs = append(errs, within("filter_chain_match", err))
	}
	if len(match.GetServerNames()) == 0 {
		errs = append(errs, fieldErr("filter_chain_match.server_names", "is empty: a chain must match server names (there is no catch-all chain)"))
	}
	ch.SNIs = make([]string, 0, len(match.GetServerNames()))
	for i, sni := range match.GetServerNames() {
		if err := validServerName(sni); err != nil {
			errs = append(errs, fieldErr("filter_chain_match.server_names["+itoa(i)+"]", fmt.Sprintf("%q: %v", sni, err)))
			continue
		}
		ch.SNIs = append(ch.SNIs, strings.ToLower(sni))
	}
	if n := len(fc.GetFilters()); n != 1 {
		errs = append(errs, fieldErr("filters", "want exactly one "+tcpProxyName+", got "+itoa(n)+" filters"))
	}
	for i, f := range fc.GetFilters() {
		tp, err := decodeNetworkFilter(f)
		errs = append(errs, withinIndex("filters", i, err))
		if err == nil {
			ch.Cluster, ch.StatPrefix, ch.IdleTimeout = tp.Cluster, tp.StatPrefix, tp.IdleTimeout
		}
	}
	return ch, errors.Join(errs...)
}

func decodeNetworkFilter(f *listenerv3.Filter) (Chain, error) {
	if err := filterFields.check(f); err != nil {
		return Chain{}, err
	}
	if f.GetName() != tcpProxyName {
		return Chain{}, fieldErr("name", fmt.Sprintf("unsupported network filter %q (only %s)", f.GetName(), tcpProxyName))
	}
	if f.GetTypedConfig() == nil {
		return Chain{}, fieldErr("typed_config", "is missing")
	}
	tp := new(tcpproxyv3.TcpProxy)
	if err := unpackTyped(f.GetTypedConfig(), tcpProxyType, tp); err != nil {
		return Chain{}, err
	}
	var errs []error
	if tp.GetWeightedClusters() != nil {
		errs = append(errs, fieldErr("typed_config.weighted_clusters", "not supported: one cluster per chain"))
	}
	errs = append(errs, within("typed_config", tcpProxyFields.check(tp)))
	ch := Chain{Cluster: tp.GetCluster(), StatPrefix: tp.GetStatPrefix(), IdleTimeout: defaultIdleTimeout}
	if tp.GetWeightedClusters() == nil && ch.Cluster == "" {
		errs = append(errs, fieldErr("typed_config.cluster", "is empty"))
	}
	if ch.StatPrefix == "" {
		errs = append(errs, fieldErr("typed_config.stat_prefix", "is empty"))
	}
	if tp.IdleTimeout != nil {
		d, err := positiveDuration(tp.IdleTimeout)
		if err != nil {
			errs = append(errs, fieldErr("typed_config.idle_timeout", err.Error()))
		}
		ch.IdleTimeout = d
	}
	return ch, errors.Join(errs...)
}

func decodeCluster(m *clusterv3.Cluster) (Cluster, error) {
	c := Cluster{Name: m.GetName(), ConnectTimeout: defaultConnectTimeout}
	errs := []error{clusterFields.check(m)}
	if c.Name == "" {
		errs = append(errs, fieldErr("name", "is empty"))
	}
	if m.GetClusterType() == nil {
		switch t := m.GetType(); t {
		case clusterv3.Cluster_EDS:
			c.Type = EDS
		case clusterv3.Cluster_STATIC:
			c.Type = Static
		case clusterv3.Cluster_STRICT_DNS:
			c.Type = StrictDNS
		default:
			errs = append(errs, fieldErr("type", t.String()+" is not supported (EDS, STATIC or STRICT_DNS)"))
		}
	}
	if p := m.GetLbPolicy(); p != clusterv3.Cluster_ROUND_ROBIN {
		errs = append(errs, fieldErr("lb_policy", p.String()+" is not supported (ROUND_ROBIN)"))
	}
	if m.ConnectTimeout != nil {
		d, err := positiveDuration(m.ConnectTimeout)
		if err != nil {
			errs = append(errs, fieldErr("connect_timeout", err.Error()))
		}
		c.ConnectTimeout = d
	}
	if cl := m.GetCommonLbConfig(); cl != nil {
		errs = append(errs, within("common_lb_config", decodeNoPanic(cl)))
	}
	switch c.Type {
	case EDS:
		eds := m.GetEdsClusterConfig()
		if eds == nil {
			errs = append(errs, fieldErr("eds_cluster_config", "is missing for type EDS"))
		} else {
			errs = append(errs, within("eds_cluster_config", decodeEDSConfig(eds)))
		}
		if m.GetLoadAssignment() != nil {
			errs = append(errs, fieldErr("load_assignment", "not supported with type EDS"))
		}
		c.ServiceName = eds.GetServiceName()
		if c.ServiceName == "" {
			c.ServiceName = c.Name
		}
	case Static, StrictDNS:
		if m.GetEdsClusterConfig() != nil {
			errs = append(errs, fieldErr("eds_cluster_config", "not supported with type "+c.Type.String()))
		}
		if m.GetLoadAssignment() == nil {
			errs = append(errs, fieldErr("load_assignment", "is missing for type "+c.Type.String()))
		} else {
			eps, err := decodeAssignment(m.GetLoadAssignment(), c.Type == StrictDNS)
			errs = append(errs, within("load_assignment", err))
			c.Endpoints = eps
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Cluster{}, err
	}
	return c, pgv(m)
}

// decodeNoPanic accepts only healthy_panic_threshold {value: 0}: the
// gateway never routes to an unhealthy endpoint, which is Envoy's panic
// mode turned off; any other threshold asks for routing it never does.
// The whole common_lb_config may be absent (federators before
// docs/gateway-xds.md named it sent none), and means the same to it.
func decodeNoPanic(cl *clusterv3.Cluster_CommonLbConfig) error {
	errs := []error{commonLbFields.check(cl)}
	switch pt := cl.GetHealthyPanicThreshold(); {
	case pt == nil:
		errs = append(errs, fieldErr("healthy_panic_threshold", "is missing: Envoy's default of 50% routes to unhealthy endpoints in panic, which the gateway never does (want {value: 0})"))
	case percentFields.check(pt) != nil:
		errs = append(errs, within("healthy_panic_threshold", percentFields.check(pt)))
	case pt.GetValue() != 0:
		errs = append(errs, fieldErr("healthy_panic_threshold.value", fmt.Sprintf("%v is not supported (0: the gateway never routes to unhealthy endpoints)", pt.GetValue())))
	}
	return errors.Join(errs...)
}

// decodeEDSConfig accepts only eds_config { ads {} }: endpoints come over
// the same ADS stream.
func decodeEDSConfig(eds *clusterv3.Cluster_EdsClusterConfig) error {
	errs := []error{edsClusterFields.check(eds)}
	src := eds.GetEdsConfig()
	switch {
	case src == nil:
		errs = append(errs, fieldErr("eds_config", "is missing (want ads {})"))
	case src.GetAds() == nil:
		errs = append(errs, fieldErr("eds_config", "only ads {} is supported"))
	default:
		errs = append(errs, within("eds_config", configSourceFields.check(src)))
		errs = append(errs, within("eds_config.ads", adsFields.check(src.GetAds())))
		if v := src.GetResourceApiVersion(); v != corev3.ApiVersion_AUTO && v != corev3.ApiVersion_V3 {
			errs = append(errs, fieldErr("eds_config.resource_api_version", v.String()+" is not supported (V3)"))
		}
	}
	return errors.Join(errs...)
}

// decodeAssignment decodes a ClusterLoadAssignment's endpoints; hostnames
// are allowed only in a STRICT_DNS cluster's inline assignment.
func decodeAssignment(m *endpointv3.ClusterLoadAssignment, hostnames bool) ([]Endpoint, error) {
	errs := []error{assignmentFields.check(m)}
	if m.GetClusterName() == "" {
		errs = append(errs, fieldErr("cluster_name", "is empty"))
	}
	n := 0
	for _, le := range m.GetEndpoints() {
		n += len(le.GetLbEndpoints())
	}
	eps := make([]Endpoint, 0, n)
	for i, le := range m.GetEndpoints() {
		var lerrs []error
		lerrs = append(lerrs, localityLbFields.check(le))
		lerrs = append(lerrs, within("locality", localityFields.check(le.GetLocality())))
		loc := Locality{Region: le.GetLocality().GetRegion(), Zone: le.GetLocality().GetZone(), SubZone: le.GetLocality().GetSubZone()}
		for j, lb := range le.GetLbEndpoints() {
			ep, err := decodeLbEndpoint(lb, hostnames)
			if err != nil {
				lerrs = append(lerrs, withinIndex("lb_endpoints", j, err))
				continue
			}
			ep.Locality = loc
			eps = append(eps, ep)
		}
		errs = append(errs, withinIndex("endpoints", i, errors.Join(lerrs...)))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return eps, nil
}

func decodeLbEndpoint(lb *endpointv3.LbEndpoint, hostnames bool) (Endpoint, error) {
	if err := lbEndpointFields.check(lb); err != nil {
		return Endpoint{}, err
	}
	e := lb.GetEndpoint()
	if e == nil {
		return Endpoint{}, fieldErr("endpoint", "is missing")
	}
	if err := endpointFields.check(e); err != nil {
		return Endpoint{}, within("endpoint", err)
	}
	if e.GetAddress() == nil {
		return Endpoint{}, fieldErr("endpoint.address", "is missing")
	}
	ep, err := decodeAddress(e.GetAddress(), hostnames)
	if err != nil {
		return Endpoint{}, within("endpoint.address", err)
	}
	switch lb.GetHealthStatus() {
	case corev3.HealthStatus_UNKNOWN, corev3.HealthStatus_HEALTHY:
		ep.Healthy = true
	}
	return ep, nil
}

// decodeAddress accepts a TCP socket_address with a port; the address is an
// IP, or with hostnames also a DNS name.
func decodeAddress(a *corev3.Address, hostnames bool) (Endpoint, error) {
	if err := addressFields.check(a); err != nil {
		return Endpoint{}, err
	}
	sa := a.GetSocketAddress()
	if sa == nil {
		return Endpoint{}, fieldErr("socket_address", "is missing")
	}
	if err := socketAddrFields.check(sa); err != nil {
		return Endpoint{}, within("socket_address", err)
	}
	var errs []error
	if p := sa.GetProtocol(); p != corev3.SocketAddress_TCP {
		errs = append(errs, fieldErr("socket_address.protocol", p.String()+" is not supported (TCP)"))
	}
	var ep Endpoint
	pv := sa.GetPortValue()
	if pv == 0 || pv > 65535 {
		errs = append(errs, fieldErr("socket_address.port_value", fmt.Sprintf("%d is not a port", pv)))
	}
	ep.Port = uint16(pv)
	host := sa.GetAddress()
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			errs = append(errs, fieldErr("socket_address.address", fmt.Sprintf("%q: zones are not supported", host)))
		}
		ep.Addr = netip.AddrPortFrom(ip.Unmap(), ep.Port)
	} else if !hostnames {
		errs = append(errs, fieldErr("socket_address.address", fmt.Sprintf("%q is not an IP address", host)))
	} else if err := validDNSName(host); err != nil {
		errs = append(errs, fieldErr("socket_address.address", fmt.Sprintf("%q is neither an IP address nor a DNS name: %v", host, err)))
	} else {
		ep.Host = strings.ToLower(host)
	}
	return ep, errors.Join(errs...)
}

// positiveDuration converts a duration field that must be above zero.
func positiveDuration(d *durationpb.Duration) (time.Duration, error) {
	if err := d.CheckValid(); err != nil {
		return 0, err
	}
	v := d.AsDuration()
	if v <= 0 {
		return 0, fmt.Errorf("%v is not above zero", v)
	}
	return v, nil
}

// validServerName accepts exact TLS server names: DNS labels of letters,
// digits, '-' and '_' (Istio's SNIs have underscores), at most 255 bytes.
// Wildcards ("*.example.com") are not in the subset. The gateway's
// NewRoutes applies the same grammar, so an accepted config always builds.
func validServerName(s string) error {
	if len(s) > 255 {
		return fmt.Errorf("%d bytes, longer than 255", len(s))
	}
	return labels(s)
}

// validDNSName accepts a hostname to resolve: at most 253 bytes of labels.
func validDNSName(s string) error {
	if len(s) > 253 {
		return fmt.Errorf("%d bytes, longer than 253", len(s))
	}
	return labels(s)
}

func labels(s string) error {
	if s == "" {
		return errors.New("empty")
	}
	label := 0
	for i := 0; i < len(s); i++ {
		switch b := s[i]; {
		case b == '.':
			if label == 0 {
				return errors.New("empty label")
			}
			label = 0
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9', b == '-', b == '_':
			label++
			if label > 63 {
				return errors.New("label longer than 63 bytes")
			}
		default:
			return fmt.Errorf("byte %#x at %d is not allowed", b, i)
		}
	}
	if label == 0 {
		return errors.New("ends with a dot")
	}
	return nil
}

func itoa(i int) string     { return strconv.Itoa(i) }
func quote(s string) string { return strconv.Quote(s) }
