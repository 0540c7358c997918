package xdsclient

import (
	"errors"
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
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// TypeRouteConfiguration is RDS, which only the sidecar subscribes to.
const TypeRouteConfiguration = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

// Extension names and typed_config types of the sidecar subset.
const (
	originalDstName         = "envoy.filters.listener.original_dst"
	originalDstType         = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
	hcmName                 = "envoy.filters.network.http_connection_manager"
	hcmType                 = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
	routerName              = "envoy.filters.http.router"
	routerType              = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
	tlsSocketName           = "envoy.transport_sockets.tls"
	downstreamTLSType       = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
	upstreamTLSType         = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
	httpProtocolOptionsKey  = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
	httpProtocolOptionsType = "type.googleapis.com/" + httpProtocolOptionsKey
	// CertSecretName is the only certificate a sidecar's TLS contexts may
	// name: its own SVID, made in the pod and never sent over xDS.
	CertSecretName = "default"
)

// Envoy's defaults for the sidecar subset.
const defaultOverprovisioningFactor = 140

// The sidecar subset of docs/sidecar-xds.md as allow-lists, as for the
// gateway (fields.go): anything else a server sets is refused by name.
var (
	scOutboundFields     = allow[*listenerv3.Listener]("name", "address", "listener_filters", "filter_chains", "default_filter_chain")
	scInboundFields      = allow[*listenerv3.Listener]("name", "address", "listener_filters", "filter_chains")
	scOriginalDstFields  = allow[*originaldstv3.OriginalDst]()
	scOutboundChain      = allow[*listenerv3.FilterChain]("filter_chain_match", "filters")
	scDefaultChain       = allow[*listenerv3.FilterChain]("filters")
	scInboundChain       = allow[*listenerv3.FilterChain]("filter_chain_match", "filters", "transport_socket")
	scOutboundMatch      = allow[*listenerv3.FilterChainMatch]("destination_port", "prefix_ranges")
	scInboundMatch       = allow[*listenerv3.FilterChainMatch]("destination_port", "transport_protocol", "application_protocols")
	scCidrFields         = allow[*corev3.CidrRange]("address_prefix", "prefix_len")
	scOutboundHCM        = allow[*hcmv3.HttpConnectionManager]("codec_type", "stat_prefix", "rds", "route_config", "http_filters")
	scInboundHCM         = allow[*hcmv3.HttpConnectionManager]("codec_type", "stat_prefix", "route_config", "http_filters", "forward_client_cert_details", "set_current_client_cert_details", "normalize_path")
	scRdsFields          = allow[*hcmv3.Rds]("config_source", "route_config_name")
	scHTTPFilterFields   = allow[*hcmv3.HttpFilter]("name", "typed_config")
	scRouterFields       = allow[*routerv3.Router]()
	scClientCertFields   = allow[*hcmv3.HttpConnectionManager_SetCurrentClientCertDetails]("uri")
	scTransportSocket    = allow[*corev3.TransportSocket]("name", "typed_config")
	scDownstreamTLS      = allow[*tlsv3.DownstreamTlsContext]("common_tls_context", "require_client_certificate")
	scDownstreamCommon   = allow[*tlsv3.CommonTlsContext]("tls_certificate_sds_secret_configs", "validation_context_sds_secret_config")
	scUpstreamTLS        = allow[*tlsv3.UpstreamTlsContext]("common_tls_context", "sni")
	scUpstreamCommon     = allow[*tlsv3.CommonTlsContext]("tls_certificate_sds_secret_configs", "combined_validation_context", "alpn_protocols")
	scSdsSecretFields    = allow[*tlsv3.SdsSecretConfig]("name", "sds_config")
	scCombinedValidation = allow[*tlsv3.CommonTlsContext_CombinedCertificateValidationContext]("default_validation_context", "validation_context_sds_secret_config")
	scSANValidation      = allow[*tlsv3.CertificateValidationContext]("match_typed_subject_alt_names")
	scSANMatcher         = allow[*tlsv3.SubjectAltNameMatcher]("san_type", "matcher")
	scStringMatcher      = allow[*matcherv3.StringMatcher]("exact")
	scRouteConfigFields  = allow[*routev3.RouteConfiguration]("name", "virtual_hosts")
	scVirtualHostFields  = allow[*routev3.VirtualHost]("name", "domains", "routes")
	scRouteFields        = allow[*routev3.Route]("match", "route")
	scRouteMatchFields   = allow[*routev3.RouteMatch]("prefix")
	scRouteActionFields  = allow[*routev3.RouteAction]("cluster", "timeout")
	scEDSClusterFields   = allow[*clusterv3.Cluster]("name", "type", "eds_cluster_config", "connect_timeout", "lb_policy",
		"common_lb_config", "metadata", "transport_socket", "typed_extension_protocol_options")
	scOrigDstClusterFields   = allow[*clusterv3.Cluster]("name", "type", "connect_timeout", "lb_policy", "typed_extension_protocol_options")
	scCommonLbFields         = allow[*clusterv3.Cluster_CommonLbConfig]("healthy_panic_threshold", "locality_weighted_lb_config")
	scPercentFields          = allow[*typev3.Percent]("value")
	scLocalityWeightedFields = allow[*clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig]()
	scMetadataFields         = allow[*corev3.Metadata]("filter_metadata")
	scHTTPOptionsFields      = allow[*httpv3.HttpProtocolOptions]("use_downstream_protocol_config", "explicit_http_config")
	scUseDownstreamFields    = allow[*httpv3.HttpProtocolOptions_UseDownstreamHttpConfig]()
	scExplicitHTTPFields     = allow[*httpv3.HttpProtocolOptions_ExplicitHttpConfig]("http_protocol_options", "http2_protocol_options")
	scHTTP1OptionsFields     = allow[*corev3.Http1ProtocolOptions]()
	scHTTP2OptionsFields     = allow[*corev3.Http2ProtocolOptions]()
	scAssignmentFields       = allow[*endpointv3.ClusterLoadAssignment]("cluster_name", "endpoints", "policy")
	scLocalityLbFields       = allow[*endpointv3.LocalityLbEndpoints]("locality", "lb_endpoints", "load_balancing_weight", "priority")
	scPolicyFields           = allow[*endpointv3.ClusterLoadAssignment_Policy]("overprovisioning_factor")
)

// --- listeners ---

func decodeListenerAddress(m *listenerv3.Listener) (netip.Addr, uint16, error) {
	if m.GetAddress() == nil {
		return netip.Addr{}, 0, fieldErr("address", "is missing")
	}
	ep, err := decodeAddress(m.GetAddress(), false)
	return ep.Addr.Addr(), ep.Port, within("address", err)
}

func decodeOutbound(m *listenerv3.Listener) (*OutboundListener, error) {
	chains := m.GetFilterChains()
	return decodeOutboundWith(m, len(chains), func(i int) (OutboundChain, error) { return decodeOutboundChain(chains[i]) })
}

// decodeOutboundWith is decodeOutbound with the n filter chains coming
// from chain (m's own are ignored), as decodeListenerWith.
func decodeOutboundWith(m *listenerv3.Listener, n int, chain func(i int) (OutboundChain, error)) (*OutboundListener, error) {
	l := &OutboundListener{Name: m.GetName()}
	errs := []error{scOutboundFields.check(m)}
	var err error
	l.Addr, l.Port, err = decodeListenerAddress(m)
	errs = append(errs, err)

	found := 0
	for i, f := range m.GetListenerFilters() {
		err := decodeOriginalDst(f)
		if err == nil {
			found++
		}
		errs = append(errs, withinIndex("listener_filters", i, err))
	}
	if found != 1 && len(m.GetListenerFilters()) == found {
		errs = append(errs, fieldErr("listener_filters", "want exactly one "+originalDstName+", got "+itoa(found)))
	}

	if n > 0 {
		l.Chains = make([]OutboundChain, 0, n)
	}
	for i := range n {
		ch, err := chain(i)
		if err != nil {
			errs = append(errs, withinIndex("filter_chains", i, err))
			continue
		}
		l.Chains = append(l.Chains, ch)
	}
	if dc := m.GetDefaultFilterChain(); dc == nil {
		errs = append(errs, fieldErr("default_filter_chain", "is missing (want a tcp_proxy to "+PassthroughCluster+")"))
	} else {
		errs = append(errs, within("default_filter_chain", scDefaultChain.check(dc)))
		if n := len(dc.GetFilters()); n != 1 {
			errs = append(errs, fieldErr("default_filter_chain.filters", "want exactly one "+tcpProxyName+", got "+itoa(n)+" filters"))
		}
		for i, f := range dc.GetFilters() {
			tp, err := decodeNetworkFilter(f)
			errs = append(errs, within("default_filter_chain", withinIndex("filters", i, err)))
			l.Default.TCP = &TCPProxy{Cluster: tp.Cluster, StatPrefix: tp.StatPrefix, IdleTimeout: tp.IdleTimeout}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := l.index(); err != nil {
		return nil, err
	}
	return l, pgv(m)
}

func decodeOriginalDst(f *listenerv3.ListenerFilter) error {
	if err := listenerFilterFields.check(f); err != nil {
		return err
	}
	if f.GetName() != originalDstName {
		return fieldErr("name", fmt.Sprintf("unsupported listener filter %q (only %s)", f.GetName(), originalDstName))
	}
	if f.GetTypedConfig() == nil {
		return nil
	}
	od := new(originaldstv3.OriginalDst)
	if err := unpackTyped(f.GetTypedConfig(), originalDstType, od); err != nil {
		return err
	}
	return within("typed_config", scOriginalDstFields.check(od))
}

func decodeOutboundChain(fc *listenerv3.FilterChain) (OutboundChain, error) {
	errs := []error{scOutboundChain.check(fc)}
	var ch OutboundChain
	match := fc.GetFilterChainMatch()
	if match == nil {
		errs = append(errs, fieldErr("filter_chain_match", "is missing: every outbound chain matches a destination port"))
	} else {
		errs = append(errs, within("filter_chain_match", scOutboundMatch.check(match)))
		switch dp := match.GetDestinationPort(); {
		case dp == nil:
			errs = append(errs, fieldErr("filter_chain_match.destination_port", "is missing"))
		case dp.GetValue() == 0 || dp.GetValue() > 65535:
			errs = append(errs, fieldErr("filter_chain_match.destination_port", fmt.Sprintf("%d is not a port", dp.GetValue())))
		default:
			ch.Port = uint16(dp.GetValue())
		}
		for i, r := range match.GetPrefixRanges() {
			vip, err := decodeHostPrefix(r)
			if err != nil {
				errs = append(errs, withinIndex("filter_chain_match.prefix_ranges", i, err))
				continue
			}
			ch.VIPs = append(ch.VIPs, vip)
		}
	}
	var err error
	ch.HTTP, ch.TCP, _, err = decodeChainFilters(fc.GetFilters(), false)
	errs = append(errs, err)
	if ch.HTTP != nil && ch.HTTP.Routes != nil && len(ch.VIPs) != 1 {
		errs = append(errs, fieldErr("filters[0].typed_config.route_config", fmt.Sprintf("an inline route is for the chain of one address (an in-cluster service's port), not of %d", len(ch.VIPs))))
	}
	return ch, errors.Join(errs...)
}

// decodeHostPrefix accepts a CIDR range that is one address: the
// outbound chains match VIPs, and only exact matches keep the lookup a
// map lookup.
func decodeHostPrefix(r *corev3.CidrRange) (netip.Addr, error) {
	if err := scCidrFields.check(r); err != nil {
		return netip.Addr{}, err
	}
	ip, err := netip.ParseAddr(r.GetAddressPrefix())
	if err != nil || ip.Zone() != "" {
		return netip.Addr{}, fieldErr("address_prefix", fmt.Sprintf("%q is not an IP address", r.GetAddressPrefix()))
	}
	want := uint32(ip.BitLen())
	if pl := r.GetPrefixLen(); pl == nil || pl.GetValue() != want {
		return netip.Addr{}, fieldErr("prefix_len", fmt.Sprintf("/%d is not supported: a prefix range is one address (/%d)", pl.GetValue(), want))
	}
	return ip.Unmap(), nil
}

// decodeChainFilters decodes a chain's network filters: on an inbound
// chain, at most two envoy.filters.network.rbac (DENY, then ALLOW), then
// its one terminal filter, an HTTP connection manager (outbound: RDS;
// inbound: inline routes and XFCC) or a tcp_proxy. The outbound listener
// has the terminal filter alone.
func decodeChainFilters(filters []*listenerv3.Filter, inbound bool) (*HTTPConnectionManager, *TCPProxy, *NetworkRBAC, error) {
	nRBAC, lead, errs := rbacPlacement("filters", rbacName, "the terminal filter", len(filters),
		func(i int) string { return filters[i].GetName() }, inbound)
	var rbac *NetworkRBAC
	if lead > 0 {
		var err error
		rbac, err = decodeRBACFilters(filters[:lead])
		errs = append(errs, err)
	}
	if n := len(filters) - nRBAC; n != 1 {
		errs = append(errs, fieldErr("filters", "want exactly one "+hcmName+" or "+tcpProxyName+", got "+itoa(n)+" filters"))
		return nil, nil, nil, errors.Join(errs...)
	}
	t := 0
	for filters[t].GetName() == rbacName {
		t++
	}
	f := filters[t]
	switch f.GetName() {
	case hcmName:
		h, err := decodeHCM(f, inbound)
		errs = append(errs, withinIndex("filters", t, err))
		return h, nil, rbac, errors.Join(errs...)
	case tcpProxyName:
		tp, err := decodeNetworkFilter(f)
		if err != nil {
			errs = append(errs, withinIndex("filters", t, err))
			return nil, nil, nil, errors.Join(errs...)
		}
		return nil, &TCPProxy{Cluster: tp.Cluster, StatPrefix: tp.StatPrefix, IdleTimeout: tp.IdleTimeout}, rbac, errors.Join(errs...)
	}
	if err := filterFields.check(f); err != nil {
		errs = append(errs, withinIndex("filters", t, err))
		return nil, nil, nil, errors.Join(errs...)
	}
	want := hcmName + " or " + tcpProxyName
	if inbound {
		want += ", after at most two " + rbacName
	}
	errs = append(errs, fieldErr("filters["+itoa(t)+"].name", fmt.Sprintf("unsupported network filter %q (only %s)", f.GetName(), want)))
	return nil, nil, nil, errors.Join(errs...)
}

func decodeHCM(f *listenerv3.Filter, inbound bool) (*HTTPConnectionManager, error) {
	if err := filterFields.check(f); err != nil {
		return nil, err
	}
	if f.GetTypedConfig() == nil {
		return nil, fieldErr("typed_config", "is missing")
	}
	h := new(hcmv3.HttpConnectionManager)
	if err := unpackTyped(f.GetTypedConfig(), hcmType, h); err != nil {
		return nil, err
	}
	fields := scOutboundHCM
	if inbound {
		fields = scInboundHCM
	}
	errs := []error{fields.check(h)}
	out := &HTTPConnectionManager{StatPrefix: h.GetStatPrefix()}
	if c := h.GetCodecType(); c != hcmv3.HttpConnectionManager_AUTO {
		errs = append(errs, fieldErr("codec_type", c.String()+" is not supported (AUTO)"))
	}
	if out.StatPrefix == "" {
		errs = append(errs, fieldErr("stat_prefix", "is empty"))
	}
	// Inbound, at most two envoy.filters.http.rbac (DENY, then ALLOW)
	// before the router.
	hfs := h.GetHttpFilters()
	nRBAC, lead, perrs := rbacPlacement("http_filters", httpRBACName, "the router", len(hfs),
		func(i int) string { return hfs[i].GetName() }, inbound)
	errs = append(errs, perrs...)
	if lead > 0 {
		var err error
		out.RBAC, err = decodeHTTPRBACFilters(hfs[:lead])
		errs = append(errs, err)
	}
	if n := len(hfs) - nRBAC; n != 1 {
		errs = append(errs, fieldErr("http_filters", "want exactly one "+routerName+", got "+itoa(n)+" filters"))
	}
	for i, hf := range hfs {
		if hf.GetName() != httpRBACName {
			errs = append(errs, withinIndex("http_filters", i, decodeRouter(hf, inbound)))
		}
	}
	if !inbound {
		// An in-cluster service's chain routes inline: its address
		// already names the service.
		rds := h.GetRds()
		switch rc := h.GetRouteConfig(); {
		case rc != nil:
			var err error
			out.Routes, err = decodeRouteConfig(rc)
			errs = append(errs, within("route_config", err))
		case rds == nil:
			errs = append(errs, fieldErr("rds", "is missing: the outbound side's routes come over RDS, or inline for one address"))
		default:
			errs = append(errs, within("rds", scRdsFields.check(rds)))
			if out.RouteConfigName = rds.GetRouteConfigName(); out.RouteConfigName == "" {
				errs = append(errs, fieldErr("rds.route_config_name", "is empty"))
			}
			errs = append(errs, within("rds.config_source", decodeADSSource(rds.GetConfigSource())))
		}
	} else {
		if rc := h.GetRouteConfig(); rc == nil {
			errs = append(errs, fieldErr("route_config", "is missing: the inbound side's routes are inline"))
		} else {
			var err error
			out.Routes, err = decodeRouteConfig(rc)
			errs = append(errs, within("route_config", err))
		}
		switch d := h.GetForwardClientCertDetails(); d {
		case hcmv3.HttpConnectionManager_SANITIZE:
			out.ForwardClientCert = Sanitize
		case hcmv3.HttpConnectionManager_SANITIZE_SET:
			out.ForwardClientCert = SanitizeSet
		default:
			errs = append(errs, fieldErr("forward_client_cert_details", d.String()+" is not supported (SANITIZE or SANITIZE_SET): the app never sees an XFCC header the caller sent"))
		}
		if d := h.GetSetCurrentClientCertDetails(); d != nil {
			errs = append(errs, within("set_current_client_cert_details", scClientCertFields.check(d)))
			if out.ForwardClientCert != SanitizeSet {
				errs = append(errs, fieldErr("set_current_client_cert_details", "is only used with forward_client_cert_details SANITIZE_SET"))
			}
			out.SetClientCertURI = d.GetUri()
		}
		// Istio's pathNormalization BASE; merge_slashes and
		// path_with_escaped_slashes_action stay refused by name.
		out.NormalizePath = h.GetNormalizePath().GetValue()
	}
	if err := errors.Join(errs...); err != nil {
		return nil, within("typed_config", err)
	}
	return out, within("typed_config", pgv(h))
}

func decodeRouter(hf *hcmv3.HttpFilter, inbound bool) error {
	if err := scHTTPFilterFields.check(hf); err != nil {
		return err
	}
	if hf.GetName() != routerName {
		want := routerName
		if inbound {
			want += ", after at most two " + httpRBACName
		}
		return fieldErr("name", fmt.Sprintf("unsupported HTTP filter %q (only %s)", hf.GetName(), want))
	}
	if hf.GetTypedConfig() == nil {
		return nil
	}
	r := new(routerv3.Router)
	if err := unpackTyped(hf.GetTypedConfig(), routerType, r); err != nil {
		return err
	}
	return within("typed_config", scRouterFields.check(r))
}

// decodeADSSource accepts only { ads {} }: everything comes over the
// one ADS stream. Paths are relative to the ConfigSource.
func decodeADSSource(src *corev3.ConfigSource) error {
	switch {
	case src == nil:
		return fieldErr("", "is missing (want ads {})")
	case src.GetAds() == nil:
		return fieldErr("", "only ads {} is supported")
	}
	errs := []error{configSourceFields.check(src), within("ads", adsFields.check(src.GetAds()))}
	if v := src.GetResourceApiVersion(); v != corev3.ApiVersion_AUTO && v != corev3.ApiVersion_V3 {
		errs = append(errs, fieldErr("resource_api_version", v.String()+" is not supported (V3)"))
	}
	return errors.Join(errs...)
}

func decodeInbound(m *listenerv3.Listener) (*InboundListener, error) {
	l := &InboundListener{Name: m.GetName()}
	errs := []error{scInboundFields.check(m)}
	var err error
	l.Addr, l.Port, err = decodeListenerAddress(m)
	errs = append(errs, err)

	// original_dst, so that inbound-passthrough dials the port the caller
	// dialled (and the chains' destination_port match), and tls_inspector
	// for the chains' transport_protocol and ALPN match.
	var origDst, inspectors int
	for i, f := range m.GetListenerFilters() {
		var err error
		switch f.GetName() {
		case originalDstName:
			if err = decodeOriginalDst(f); err == nil {
				origDst++
			}
		case tlsInspectorName:
			if err = decodeListenerFilter(f); err == nil {
				inspectors++
			}
		default:
			if err = listenerFilterFields.check(f); err == nil {
				err = fieldErr("name", fmt.Sprintf("unsupported listener filter %q (only %s and %s)", f.GetName(), originalDstName, tlsInspectorName))
			}
		}
		errs = append(errs, withinIndex("listener_filters", i, err))
	}
	if (origDst != 1 || inspectors != 1) && len(m.GetListenerFilters()) == origDst+inspectors {
		errs = append(errs, fieldErr("listener_filters", fmt.Sprintf("want exactly one %s and one %s, got %d and %d",
			originalDstName, tlsInspectorName, origDst, inspectors)))
	}

	if len(m.GetFilterChains()) == 0 {
		errs = append(errs, fieldErr("filter_chains", "is empty"))
	}
	for i, fc := range m.GetFilterChains() {
		ch, err := decodeInboundChain(fc)
		if err != nil {
			errs = append(errs, withinIndex("filter_chains", i, err))
			continue
		}
		l.Chains = append(l.Chains, ch)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := l.index(); err != nil {
		return nil, err
	}
	return l, pgv(m)
}

// decodeInboundChain decodes one inbound chain: mTLS (transport_protocol
// "tls", a DownstreamTlsContext requiring a client certificate), or
// plaintext (transport_protocol "raw_buffer", a PERMISSIVE port: no
// transport_socket, no application_protocols, since a plaintext
// connection offers none); either with the same filters.
func decodeInboundChain(fc *listenerv3.FilterChain) (InboundChain, error) {
	errs := []error{scInboundChain.check(fc)}
	var ch InboundChain
	// raw: a "raw_buffer" chain; unknown: a transport_protocol refused,
	// whose transport_socket is not judged.
	raw, unknown := false, false
	match := fc.GetFilterChainMatch()
	if match == nil {
		errs = append(errs, fieldErr("filter_chain_match", `is missing: every inbound chain matches transport_protocol "tls" or "raw_buffer"`))
	} else {
		errs = append(errs, within("filter_chain_match", scInboundMatch.check(match)))
		// Unset: any port. Set: the app's port, which Envoy matches
		// before the transport and the ALPN.
		if dp := match.GetDestinationPort(); dp != nil {
			if dp.GetValue() == 0 || dp.GetValue() > 65535 {
				errs = append(errs, fieldErr("filter_chain_match.destination_port", fmt.Sprintf("%d is not a port", dp.GetValue())))
			} else {
				ch.Port = uint16(dp.GetValue())
			}
		}
		switch tp := match.GetTransportProtocol(); tp {
		case "tls":
		case "raw_buffer":
			raw = true
			if len(match.GetApplicationProtocols()) > 0 {
				errs = append(errs, fieldErr("filter_chain_match.application_protocols",
					`is set on a "raw_buffer" chain: a plaintext connection offers no application protocol`))
			}
		default:
			unknown = true
			errs = append(errs, fieldErr("filter_chain_match.transport_protocol",
				fmt.Sprintf(`%q is not supported: an inbound chain is mTLS ("tls") or plaintext ("raw_buffer")`, tp)))
		}
		if !raw {
			for i, p := range match.GetApplicationProtocols() {
				if p == "" {
					errs = append(errs, fieldErr("filter_chain_match.application_protocols["+itoa(i)+"]", "is empty"))
					continue
				}
				ch.ALPN = append(ch.ALPN, p)
			}
		}
	}
	switch ts := fc.GetTransportSocket(); {
	case unknown:
	case raw && ts != nil:
		errs = append(errs, fieldErr("transport_socket", `is set on a "raw_buffer" chain: its connections are plaintext`))
	case raw:
	case ts == nil:
		errs = append(errs, fieldErr("transport_socket", `is missing: a "tls" chain terminates mTLS`))
	default:
		t, err := decodeDownstreamTLS(ts)
		errs = append(errs, within("transport_socket", err))
		ch.TLS = &t
	}
	var err error
	ch.HTTP, ch.TCP, ch.RBAC, err = decodeChainFilters(fc.GetFilters(), true)
	errs = append(errs, err)
	return ch, errors.Join(errs...)
}

// --- TLS ---

// tlsSocket checks a transport_socket's envelope and unmarshals its
// typed_config into m.
func tlsSocket(ts *corev3.TransportSocket, typeURL string, m proto.Message) error {
	if err := scTransportSocket.check(ts); err != nil {
		return err
	}
	if ts.GetName() != tlsSocketName {
		return fieldErr("name", fmt.Sprintf("unsupported transport socket %q (only %s)", ts.GetName(), tlsSocketName))
	}
	if ts.GetTypedConfig() == nil {
		return fieldErr("typed_config", "is missing")
	}
	return unpackTyped(ts.GetTypedConfig(), typeURL, m)
}

func decodeDownstreamTLS(ts *corev3.TransportSocket) (DownstreamTLS, error) {
	dt := new(tlsv3.DownstreamTlsContext)
	if err := tlsSocket(ts, downstreamTLSType, dt); err != nil {
		return DownstreamTLS{}, err
	}
	var out DownstreamTLS
	errs := []error{scDownstreamTLS.check(dt)}
	if !dt.GetRequireClientCertificate().GetValue() {
		errs = append(errs, fieldErr("require_client_certificate", "must be true: every caller presents its SVID"))
	}
	ctx := dt.GetCommonTlsContext()
	if ctx == nil {
		errs = append(errs, fieldErr("common_tls_context", "is missing"))
	} else {
		errs = append(errs, within("common_tls_context", scDownstreamCommon.check(ctx)))
		var err error
		out.CertSecret, err = decodeCertSDS(ctx.GetTlsCertificateSdsSecretConfigs())
		errs = append(errs, within("common_tls_context.tls_certificate_sds_secret_configs", err))
		out.ValidationSecret, err = decodeValidationSDS(ctx.GetValidationContextSdsSecretConfig())
		errs = append(errs, within("common_tls_context.validation_context_sds_secret_config", err))
	}
	if err := errors.Join(errs...); err != nil {
		return DownstreamTLS{}, within("typed_config", err)
	}
	return out, within("typed_config", pgv(dt))
}

// decodeCertSDS accepts exactly [{name: "default"}]: the sidecar's own
// SVID, which it makes and keeps itself.
func decodeCertSDS(list []*tlsv3.SdsSecretConfig) (string, error) {
	if len(list) != 1 {
		return "", fieldErr("", fmt.Sprintf("want exactly one {name: %q}, got %d", CertSecretName, len(list)))
	}
	c := list[0]
	if err := scSdsSecretFields.check(c); err != nil {
		return "", within("[0]", err)
	}
	var errs []error
	if c.GetName() != CertSecretName {
		errs = append(errs, fieldErr("[0].name", fmt.Sprintf("%q is not supported: a sidecar's only certificate is %q, its own SVID", c.GetName(), CertSecretName)))
	}
	if c.GetSdsConfig() != nil {
		errs = append(errs, fieldErr("[0].sds_config", "not supported: the sidecar's own SVID is made in the pod, never fetched"))
	}
	return c.GetName(), errors.Join(errs...)
}

// decodeValidationSDS accepts {name: "ROOTCA", sds_config: {ads: {}}}:
// the trust bundles, over the ADS stream.
func decodeValidationSDS(c *tlsv3.SdsSecretConfig) (string, error) {
	if c == nil {
		return "", fieldErr("", fmt.Sprintf("is missing (want {name: %q, sds_config: {ads: {}}})", RootCASecretName))
	}
	errs := []error{scSdsSecretFields.check(c)}
	if c.GetName() != RootCASecretName {
		errs = append(errs, fieldErr("name", fmt.Sprintf("%q is not served: the trust bundles are %q", c.GetName(), RootCASecretName)))
	}
	errs = append(errs, within("sds_config", decodeADSSource(c.GetSdsConfig())))
	return c.GetName(), errors.Join(errs...)
}

func decodeUpstreamTLS(ts *corev3.TransportSocket) (*UpstreamTLS, error) {
	ut := new(tlsv3.UpstreamTlsContext)
	if err := tlsSocket(ts, upstreamTLSType, ut); err != nil {
		return nil, err
	}
	out := &UpstreamTLS{SNI: strings.ToLower(ut.GetSni())}
	errs := []error{scUpstreamTLS.check(ut)}
	if err := validServerName(ut.GetSni()); err != nil {
		errs = append(errs, fieldErr("sni", fmt.Sprintf("%q: %v", ut.GetSni(), err)))
	}
	ctx := ut.GetCommonTlsContext()
	if ctx == nil {
		errs = append(errs, fieldErr("common_tls_context", "is missing"))
	} else {
		errs = append(errs, within("common_tls_context", decodeUpstreamCommon(ctx, out)))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, within("typed_config", err)
	}
	return out, within("typed_config", pgv(ut))
}

func decodeUpstreamCommon(ctx *tlsv3.CommonTlsContext, out *UpstreamTLS) error {
	errs := []error{scUpstreamCommon.check(ctx)}
	var err error
	out.CertSecret, err = decodeCertSDS(ctx.GetTlsCertificateSdsSecretConfigs())
	errs = append(errs, within("tls_certificate_sds_secret_configs", err))
	if cvc := ctx.GetCombinedValidationContext(); cvc == nil {
		errs = append(errs, fieldErr("combined_validation_context", "is missing"))
	} else {
		errs = append(errs, within("combined_validation_context", scCombinedValidation.check(cvc)))
		out.ValidationSecret, err = decodeValidationSDS(cvc.GetValidationContextSdsSecretConfig())
		errs = append(errs, within("combined_validation_context.validation_context_sds_secret_config", err))
		if dvc := cvc.GetDefaultValidationContext(); dvc == nil {
			errs = append(errs, fieldErr("combined_validation_context.default_validation_context", "is missing"))
		} else {
			errs = append(errs, within("combined_validation_context.default_validation_context", scSANValidation.check(dvc)))
			seen := make(map[spiffeid.ID]int, len(dvc.GetMatchTypedSubjectAltNames()))
			for i, san := range dvc.GetMatchTypedSubjectAltNames() {
				id, err := decodeSANMatcher(san)
				if err == nil {
					if j, dup := seen[id]; dup {
						err = fieldErr("matcher.exact", fmt.Sprintf("%q is also match_typed_subject_alt_names[%d]", id, j))
					}
				}
				if err != nil {
					errs = append(errs, within("combined_validation_context.default_validation_context", withinIndex("match_typed_subject_alt_names", i, err)))
					continue
				}
				seen[id] = i
				out.SANs = append(out.SANs, id)
			}
		}
	}
	if len(ctx.GetAlpnProtocols()) == 0 {
		errs = append(errs, fieldErr("alpn_protocols", "is empty"))
	}
	for i, p := range ctx.GetAlpnProtocols() {
		if p == "" || len(p) > 255 {
			errs = append(errs, fieldErr("alpn_protocols["+itoa(i)+"]", fmt.Sprintf("%q is not a protocol name (1 to 255 bytes)", p)))
		}
	}
	out.ALPN = ctx.GetAlpnProtocols()
	return errors.Join(errs...)
}

// decodeSANMatcher accepts {san_type: URI, matcher: {exact: <SPIFFE ID>}}.
func decodeSANMatcher(san *tlsv3.SubjectAltNameMatcher) (spiffeid.ID, error) {
	errs := []error{scSANMatcher.check(san)}
	if t := san.GetSanType(); t != tlsv3.SubjectAltNameMatcher_URI {
		errs = append(errs, fieldErr("san_type", t.String()+" is not supported (URI)"))
	}
	var id spiffeid.ID
	if m := san.GetMatcher(); m == nil {
		errs = append(errs, fieldErr("matcher", "is missing"))
	} else if err := scStringMatcher.check(m); err != nil {
		errs = append(errs, within("matcher", err))
	} else {
		var err error
		if id, err = spiffeid.FromString(m.GetExact()); err != nil {
			errs = append(errs, fieldErr("matcher.exact", fmt.Sprintf("%q is not a SPIFFE ID: %v", m.GetExact(), err)))
		}
	}
	return id, errors.Join(errs...)
}

// --- routes ---

func decodeRouteConfig(m *routev3.RouteConfiguration) (*RouteConfig, error) {
	vhosts := m.GetVirtualHosts()
	return decodeRouteConfigWith(m, len(vhosts), func(i int) (VirtualHost, error) { return decodeVirtualHost(vhosts[i]) })
}

// decodeRouteConfigWith is decodeRouteConfig with the n virtual hosts
// coming from vhost (m's own are ignored), as decodeListenerWith.
func decodeRouteConfigWith(m *routev3.RouteConfiguration, n int, vhost func(i int) (VirtualHost, error)) (*RouteConfig, error) {
	rc := &RouteConfig{Name: m.GetName()}
	errs := []error{scRouteConfigFields.check(m)}
	if rc.Name == "" {
		errs = append(errs, fieldErr("name", "is empty"))
	}
	names := make(map[string]int, n)
	if n > 0 {
		rc.VirtualHosts = make([]VirtualHost, 0, n)
	}
	for i := range n {
		vh, err := vhost(i)
		if err == nil {
			if j, dup := names[vh.Name]; dup {
				err = fieldErr("name", fmt.Sprintf("%q is also the name of virtual_hosts[%d]", vh.Name, j))
			}
		}
		if err != nil {
			errs = append(errs, withinIndex("virtual_hosts", i, err))
			continue
		}
		names[vh.Name] = i
		rc.VirtualHosts = append(rc.VirtualHosts, vh)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := rc.index(); err != nil {
		return nil, err
	}
	return rc, pgv(m)
}

func decodeVirtualHost(m *routev3.VirtualHost) (VirtualHost, error) {
	vh := VirtualHost{Name: m.GetName()}
	errs := []error{scVirtualHostFields.check(m)}
	if vh.Name == "" {
		errs = append(errs, fieldErr("name", "is empty"))
	}
	if len(m.GetDomains()) == 0 {
		errs = append(errs, fieldErr("domains", "is empty"))
	}
	for i, d := range m.GetDomains() {
		if err := validDomain(d); err != nil {
			errs = append(errs, fieldErr("domains["+itoa(i)+"]", fmt.Sprintf("%q: %v", d, err)))
			continue
		}
		vh.Domains = append(vh.Domains, strings.ToLower(d))
	}
	if len(m.GetRoutes()) == 0 {
		errs = append(errs, fieldErr("routes", "is empty"))
	}
	for i, r := range m.GetRoutes() {
		route, err := decodeRoute(r)
		if err != nil {
			errs = append(errs, withinIndex("routes", i, err))
			continue
		}
		vh.Routes = append(vh.Routes, route)
	}
	return vh, errors.Join(errs...)
}

// validDomain accepts the domains the contract emits: "*", or an exact
// host (a DNS name, an IPv4 address or a bracketed IPv6 address) with an
// optional ":port". Envoy's partial wildcards ("*.example.com",
// "example.*") are not in the subset.
func validDomain(d string) error {
	if d == "*" {
		return nil
	}
	if strings.Contains(d, "*") {
		return errors.New(`wildcard domains are not supported (only "*" alone)`)
	}
	host, port := d, ""
	if strings.HasPrefix(d, "[") {
		end := strings.IndexByte(d, ']')
		if end < 0 {
			return errors.New("unterminated [")
		}
		host, port = d[1:end], d[end+1:]
		if ip, err := netip.ParseAddr(host); err != nil || !ip.Is6() || ip.Zone() != "" {
			return errors.New("not an IPv6 address in brackets")
		}
		if port != "" && port[0] != ':' {
			return errors.New("junk after ]")
		}
		port = strings.TrimPrefix(port, ":")
		if port == "" && strings.HasSuffix(d, ":") {
			return errors.New("empty port")
		}
	} else {
		if i := strings.LastIndexByte(d, ':'); i >= 0 {
			host, port = d[:i], d[i+1:]
			if port == "" {
				return errors.New("empty port")
			}
		}
		if _, err := netip.ParseAddr(host); err != nil {
			if err := validDNSName(host); err != nil {
				return fmt.Errorf("not a host name or IP address: %v", err)
			}
		}
	}
	if port != "" {
		v, err := strconv.ParseUint(port, 10, 16)
		if err != nil || v == 0 || strconv.FormatUint(v, 10) != port {
			return fmt.Errorf("%q is not a port", port)
		}
	}
	return nil
}

func decodeRoute(m *routev3.Route) (Route, error) {
	errs := []error{scRouteFields.check(m)}
	var r Route
	if match := m.GetMatch(); match == nil {
		errs = append(errs, fieldErr("match", "is missing"))
	} else if err := scRouteMatchFields.check(match); err != nil {
		errs = append(errs, within("match", err))
	} else if r.Prefix = match.GetPrefix(); !strings.HasPrefix(r.Prefix, "/") {
		errs = append(errs, fieldErr("match.prefix", fmt.Sprintf("%q does not start with /", r.Prefix)))
	}
	action := m.GetRoute()
	if action == nil {
		errs = append(errs, fieldErr("route", "is missing"))
		return Route{}, errors.Join(errs...)
	}
	errs = append(errs, within("route", scRouteActionFields.check(action)))
	if r.Cluster = action.GetCluster(); r.Cluster == "" {
		errs = append(errs, fieldErr("route.cluster", "is empty"))
	}
	r.Timeout = defaultRouteTimeout
	if t := action.GetTimeout(); t != nil {
		if err := t.CheckValid(); err != nil {
			errs = append(errs, fieldErr("route.timeout", err.Error()))
		} else if r.Timeout = t.AsDuration(); r.Timeout < 0 {
			errs = append(errs, fieldErr("route.timeout", fmt.Sprintf("%v is negative", r.Timeout)))
		}
	}
	return r, errors.Join(errs...)
}

// --- clusters ---

func decodeSidecarCluster(m *clusterv3.Cluster) (Cluster, error) {
	c := Cluster{Name: m.GetName(), ConnectTimeout: defaultConnectTimeout}
	fields := scEDSClusterFields
	var errs []error
	if m.GetClusterType() == nil {
		switch t := m.GetType(); t {
		case clusterv3.Cluster_EDS:
			c.Type = EDS
		case clusterv3.Cluster_ORIGINAL_DST:
			c.Type, fields = OriginalDst, scOrigDstClusterFields
		default:
			errs = append(errs, fieldErr("type", t.String()+" is not supported (EDS or ORIGINAL_DST)"))
		}
	}
	errs = append(errs, fields.check(m))
	if c.Name == "" {
		errs = append(errs, fieldErr("name", "is empty"))
	}
	if m.ConnectTimeout != nil {
		d, err := positiveDuration(m.ConnectTimeout)
		if err != nil {
			errs = append(errs, fieldErr("connect_timeout", err.Error()))
		}
		c.ConnectTimeout = d
	}
	switch c.Type {
	case OriginalDst:
		if p := m.GetLbPolicy(); p != clusterv3.Cluster_CLUSTER_PROVIDED {
			errs = append(errs, fieldErr("lb_policy", p.String()+" is not supported with ORIGINAL_DST (CLUSTER_PROVIDED)"))
		}
		var err error
		c.UpstreamHTTP, err = decodeProtocolOptions(m.GetTypedExtensionProtocolOptions())
		errs = append(errs, within("typed_extension_protocol_options", err))
	case EDS:
		if p := m.GetLbPolicy(); p != clusterv3.Cluster_ROUND_ROBIN {
			errs = append(errs, fieldErr("lb_policy", p.String()+" is not supported (ROUND_ROBIN)"))
		}
		eds := m.GetEdsClusterConfig()
		if eds == nil {
			errs = append(errs, fieldErr("eds_cluster_config", "is missing for type EDS"))
		} else {
			errs = append(errs, within("eds_cluster_config", decodeEDSConfig(eds)))
		}
		if c.ServiceName = eds.GetServiceName(); c.ServiceName == "" {
			c.ServiceName = c.Name
		}
		errs = append(errs, within("common_lb_config", decodeCommonLb(m.GetCommonLbConfig())))
		var err error
		c.Service, err = decodeServiceMeta(m.GetMetadata())
		errs = append(errs, within("metadata", err))
		if ts := m.GetTransportSocket(); ts == nil {
			errs = append(errs, fieldErr("transport_socket", "is missing: sidecars speak mTLS to each other and to gateways"))
		} else {
			c.TLS, err = decodeUpstreamTLS(ts)
			errs = append(errs, within("transport_socket", err))
		}
		c.UpstreamHTTP, err = decodeProtocolOptions(m.GetTypedExtensionProtocolOptions())
		errs = append(errs, within("typed_extension_protocol_options", err))
		if err == nil && c.Service != nil {
			switch {
			case c.Service.Protocol == ProtocolHTTP && c.UpstreamHTTP == UpstreamHTTPNone:
				errs = append(errs, fieldErr("typed_extension_protocol_options",
					"want ["+quote(httpProtocolOptionsKey)+"] with "+upstreamHTTPForms+" for an HTTP port"))
			case c.Service.Protocol == ProtocolTCP && c.UpstreamHTTP != UpstreamHTTPNone:
				errs = append(errs, fieldErr("typed_extension_protocol_options["+quote(httpProtocolOptionsKey)+"]", "not supported for a TCP port"))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Cluster{}, err
	}
	return c, pgv(m)
}

// decodeCommonLb accepts exactly the balancing the Go sidecar does:
// localities weighted (locality_weighted_lb_config {}) and no panic
// routing to unhealthy endpoints (healthy_panic_threshold 0). Without
// them Envoy would balance differently, so they are required.
func decodeCommonLb(cl *clusterv3.Cluster_CommonLbConfig) error {
	if cl == nil {
		return fieldErr("", "is missing (want {healthy_panic_threshold: {value: 0}, locality_weighted_lb_config: {}}: the sidecar weighs localities and never routes to unhealthy endpoints)")
	}
	errs := []error{scCommonLbFields.check(cl)}
	switch pt := cl.GetHealthyPanicThreshold(); {
	case pt == nil:
		errs = append(errs, fieldErr("healthy_panic_threshold", "is missing: Envoy's default of 50% routes to unhealthy endpoints in panic, which the sidecar never does (want {value: 0})"))
	case scPercentFields.check(pt) != nil:
		errs = append(errs, within("healthy_panic_threshold", scPercentFields.check(pt)))
	case pt.GetValue() != 0:
		errs = append(errs, fieldErr("healthy_panic_threshold.value", fmt.Sprintf("%v is not supported (0: no panic routing)", pt.GetValue())))
	}
	if lw := cl.GetLocalityWeightedLbConfig(); lw == nil {
		errs = append(errs, fieldErr("locality_weighted_lb_config", "is missing: the sidecar weighs localities by load_balancing_weight"))
	} else {
		errs = append(errs, within("locality_weighted_lb_config", scLocalityWeightedFields.check(lw)))
	}
	return errors.Join(errs...)
}

// decodeServiceMeta reads filter_metadata["isthmus"] = {host, vip, port,
// protocol}, every one required and nothing else.
func decodeServiceMeta(md *corev3.Metadata) (*ServiceMeta, error) {
	const key = `filter_metadata["` + ServiceMetadataKey + `"]`
	if md == nil {
		return nil, fieldErr("", "is missing: a service cluster carries "+key+" {host, vip, port, protocol}")
	}
	errs := []error{scMetadataFields.check(md)}
	for _, k := range sortedNames(md.GetFilterMetadata()) {
		if k != ServiceMetadataKey {
			errs = append(errs, fieldErr("filter_metadata["+quote(k)+"]", "not supported (only "+quote(ServiceMetadataKey)+")"))
		}
	}
	st, ok := md.GetFilterMetadata()[ServiceMetadataKey]
	if !ok {
		errs = append(errs, fieldErr(key, "is missing"))
		return nil, errors.Join(errs...)
	}
	fields := st.GetFields()
	for _, k := range sortedNames(fields) {
		switch k {
		case "host", "vip", "port", "protocol":
		default:
			errs = append(errs, fieldErr(key+"."+k, "not supported (host, vip, port, protocol)"))
		}
	}
	meta := &ServiceMeta{}
	str := func(name string) (string, bool) {
		v, ok := fields[name]
		switch {
		case !ok:
			errs = append(errs, fieldErr(key+"."+name, "is missing"))
		case v.GetKind() == nil:
			errs = append(errs, fieldErr(key+"."+name, "is not a string"))
		default:
			if s, isStr := v.GetKind().(*structpb.Value_StringValue); isStr {
				return s.StringValue, true
			}
			errs = append(errs, fieldErr(key+"."+name, "is not a string"))
		}
		return "", false
	}
	if host, ok := str("host"); ok {
		if err := validDNSName(host); err != nil {
			errs = append(errs, fieldErr(key+".host", fmt.Sprintf("%q is not a DNS name: %v", host, err)))
		} else if !strings.Contains(host, ".") {
			// The DNS proxy serves names of two labels or more: a
			// resolver never asks for a single label as it is (it
			// appends the search domains first), so such a host could
			// not be resolved, and the name table refuses it.
			errs = append(errs, fieldErr(key+".host", fmt.Sprintf("%q is a single label: a service host is a fully qualified name", host)))
		}
		meta.Host = strings.ToLower(host)
	}
	if vip, ok := str("vip"); ok {
		ip, err := netip.ParseAddr(vip)
		switch {
		case err != nil || ip.Zone() != "":
			errs = append(errs, fieldErr(key+".vip", fmt.Sprintf("%q is not an IP address", vip)))
		case ip.IsUnspecified():
			errs = append(errs, fieldErr(key+".vip", fmt.Sprintf("%q is the unspecified address, which no connection is made to", vip)))
		}
		meta.VIP = ip.Unmap()
	}
	if proto, ok := str("protocol"); ok {
		switch proto {
		case "HTTP":
			meta.Protocol = ProtocolHTTP
		case "TCP":
			meta.Protocol = ProtocolTCP
		default:
			errs = append(errs, fieldErr(key+".protocol", fmt.Sprintf("%q is not supported (HTTP or TCP)", proto)))
		}
	}
	switch v, ok := fields["port"]; {
	case !ok:
		errs = append(errs, fieldErr(key+".port", "is missing"))
	default:
		n, isNum := v.GetKind().(*structpb.Value_NumberValue)
		if !isNum {
			errs = append(errs, fieldErr(key+".port", "is not a number"))
		} else if p := n.NumberValue; p != math.Trunc(p) || p < 1 || p > 65535 {
			errs = append(errs, fieldErr(key+".port", fmt.Sprintf("%v is not a port", p)))
		} else {
			meta.Port = uint16(p)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return meta, nil
}

// upstreamHTTPForms are the upstream_protocol_options of an
// HttpProtocolOptions the sidecar accepts, for error messages.
const upstreamHTTPForms = "explicit_http_config {http_protocol_options {}}, explicit_http_config {http2_protocol_options {}} or use_downstream_protocol_config {}"

// decodeProtocolOptions accepts at most the HttpProtocolOptions, with
// nothing but its upstream HTTP version set: one of upstreamHTTPForms,
// each with every field left at its default (the Go sidecar has no
// knobs for them). UpstreamHTTPNone when there are none.
func decodeProtocolOptions(opts map[string]*anypb.Any) (UpstreamHTTP, error) {
	var errs []error
	for _, k := range sortedNames(opts) {
		if k != httpProtocolOptionsKey {
			errs = append(errs, fieldErr("["+quote(k)+"]", "not supported (only "+httpProtocolOptionsKey+")"))
		}
	}
	a, ok := opts[httpProtocolOptionsKey]
	if !ok || len(errs) > 0 {
		return UpstreamHTTPNone, errors.Join(errs...)
	}
	path := "[" + quote(httpProtocolOptionsKey) + "]"
	o := new(httpv3.HttpProtocolOptions)
	if err := unpackTyped(a, httpProtocolOptionsType, o); err != nil {
		var fe *fieldError
		if errors.As(err, &fe) {
			return UpstreamHTTPNone, fieldErr(path, fe.msg)
		}
		return UpstreamHTTPNone, within(path, err)
	}
	if err := scHTTPOptionsFields.check(o); err != nil {
		return UpstreamHTTPNone, within(path, err)
	}
	var u UpstreamHTTP
	switch v := o.GetUpstreamProtocolOptions().(type) {
	case *httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig:
		if err := scUseDownstreamFields.check(v.UseDownstreamProtocolConfig); err != nil {
			return UpstreamHTTPNone, within(path+".use_downstream_protocol_config", err)
		}
		u = UpstreamHTTPDownstream
	case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_:
		var err error
		if u, err = decodeExplicitHTTP(v.ExplicitHttpConfig); err != nil {
			return UpstreamHTTPNone, within(path+".explicit_http_config", err)
		}
	default:
		return UpstreamHTTPNone, fieldErr(path, "sets no upstream HTTP version (want "+upstreamHTTPForms+")")
	}
	if err := pgv(o); err != nil {
		return UpstreamHTTPNone, within(path, err)
	}
	return u, nil
}

// decodeExplicitHTTP accepts an explicit_http_config of HTTP/1.1 or
// HTTP/2 with default options; HTTP/3 is refused by its allow-list.
func decodeExplicitHTTP(e *httpv3.HttpProtocolOptions_ExplicitHttpConfig) (UpstreamHTTP, error) {
	if err := scExplicitHTTPFields.check(e); err != nil {
		return UpstreamHTTPNone, err
	}
	switch v := e.GetProtocolConfig().(type) {
	case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions:
		return UpstreamHTTP1, within("http_protocol_options", scHTTP1OptionsFields.check(v.HttpProtocolOptions))
	case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions:
		return UpstreamHTTP2, within("http2_protocol_options", scHTTP2OptionsFields.check(v.Http2ProtocolOptions))
	}
	return UpstreamHTTPNone, fieldErr("", "sets no HTTP version (want http_protocol_options {} or http2_protocol_options {})")
}

// --- endpoints ---

// loadAssignment is one accepted ClusterLoadAssignment. The gateway role
// fills only endpoints.
type loadAssignment struct {
	endpoints []Endpoint
	// priorities slice endpoints by priority and locality; nil for the
	// gateway role.
	priorities []Priority
	// overprovisioning is policy.overprovisioning_factor; zero for the
	// gateway role.
	overprovisioning uint32
}

func decodeSidecarAssignment(m *endpointv3.ClusterLoadAssignment) (loadAssignment, error) {
	a := loadAssignment{overprovisioning: defaultOverprovisioningFactor}
	errs := []error{scAssignmentFields.check(m)}
	if m.GetClusterName() == "" {
		errs = append(errs, fieldErr("cluster_name", "is empty"))
	}
	if p := m.GetPolicy(); p != nil {
		errs = append(errs, within("policy", scPolicyFields.check(p)))
		if f := p.GetOverprovisioningFactor(); f != nil {
			if f.GetValue() == 0 {
				errs = append(errs, fieldErr("policy.overprovisioning_factor", "0 is not above zero"))
			}
			a.overprovisioning = f.GetValue()
		}
	}
	// Levels are dense: priority p needs p+1 levels, and a response
	// cannot carry more localities than that without repeating one.
	les := m.GetEndpoints()
	levels := 0
	n := 0
	for i, le := range les {
		n += len(le.GetLbEndpoints())
		p := le.GetPriority()
		if int64(p) >= int64(len(les)) {
			errs = append(errs, fieldErr("endpoints["+itoa(i)+"].priority",
				fmt.Sprintf("%d leaves a priority without localities: priorities are contiguous from 0", p)))
			continue
		}
		levels = max(levels, int(p)+1)
	}
	count := make([]int, levels)
	for _, le := range les {
		if p := int(le.GetPriority()); p < levels {
			count[p]++
		}
	}
	for p, c := range count {
		if c == 0 {
			errs = append(errs, fieldErr("endpoints", fmt.Sprintf("no locality has priority %d: priorities are contiguous from 0", p)))
		}
	}
	// Endpoints ordered by priority (stable), so each locality's
	// endpoints are a sub-slice of one array sized up front.
	order := make([]int, len(les))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(x, y int) int {
		return int(les[x].GetPriority()) - int(les[y].GetPriority())
	})
	eps := make([]Endpoint, 0, n)
	a.priorities = make([]Priority, levels)
	// Envoy keeps only the first endpoint of an address: a second one is
	// refused rather than silently dropped.
	var seen map[netip.AddrPort][2]int
	if n > 1 {
		seen = make(map[netip.AddrPort][2]int, n)
	}
	for _, i := range order {
		le := les[i]
		var lerrs []error
		lerrs = append(lerrs, scLocalityLbFields.check(le))
		lerrs = append(lerrs, within("locality", localityFields.check(le.GetLocality())))
		loc := Locality{Region: le.GetLocality().GetRegion(), Zone: le.GetLocality().GetZone(), SubZone: le.GetLocality().GetSubZone()}
		var weight uint32
		if w := le.GetLoadBalancingWeight(); w != nil {
			if weight = w.GetValue(); weight == 0 {
				lerrs = append(lerrs, fieldErr("load_balancing_weight", "0 is not above zero"))
			}
		}
		start := len(eps)
		for j, lb := range le.GetLbEndpoints() {
			ep, err := decodeLbEndpoint(lb, false)
			if err != nil {
				lerrs = append(lerrs, withinIndex("lb_endpoints", j, err))
				continue
			}
			if seen != nil {
				if at, dup := seen[ep.Addr]; dup {
					lerrs = append(lerrs, fieldErr("lb_endpoints["+itoa(j)+"].endpoint.address",
						fmt.Sprintf("%v is also endpoints[%d].lb_endpoints[%d]: Envoy would keep only the first", ep.Addr, at[0], at[1])))
					continue
				}
				seen[ep.Addr] = [2]int{i, j}
			}
			ep.Locality = loc
			eps = append(eps, ep)
		}
		if err := errors.Join(lerrs...); err != nil {
			errs = append(errs, withinIndex("endpoints", i, err))
			continue
		}
		if p := int(le.GetPriority()); p < levels {
			a.priorities[p].Localities = append(a.priorities[p].Localities, LocalityEndpoints{
				Locality: loc, Weight: weight, Endpoints: eps[start:len(eps):len(eps)],
			})
		}
	}
	if err := errors.Join(errs...); err != nil {
		return loadAssignment{}, err
	}
	a.endpoints = eps
	if levels == 0 {
		a.priorities = nil
	}
	return a, pgv(m)
}

// --- roles ---

// SidecarTypes are the resource types a sidecar subscribes to, in the
// order the client subscribes: LDS, RDS for the route configurations the
// listeners name, CDS, EDS for the clusters CDS names, and SDS for the
// ROOTCA Secret.
func SidecarTypes() []string {
	return []string{TypeListener, TypeRouteConfiguration, TypeCluster, TypeClusterLoadAssignment, TypeSecret}
}

// TypesFor are the types a proxy of role subscribes to by default; nil
// for a role the client does not know.
func TypesFor(role string) []string {
	switch role {
	case RoleGateway:
		return GatewayTypes()
	case RoleSidecar:
		return SidecarTypes()
	}
	return nil
}

// requiredTypes are the types a Config of role is assembled from: a
// client of that role must subscribe to all of them. The sidecar's TLS
// contexts all name ROOTCA, so it needs SDS too.
func requiredTypes(role string) []string {
	if role == RoleSidecar {
		return SidecarTypes()
	}
	return routingTypes
}

// decodeOrder is the order Decode applies a role's types in: the
// resources other resources name come after them.
func decodeOrder(role string) []string {
	return TypesFor(role)
}
