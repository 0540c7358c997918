package xdsclient

import (
	"crypto/x509"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

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
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The sidecar's resources built by hand from docs/sidecar-xds.md, as the
// federator emits them; the round trip with pkg/xds's translation is in
// the xds package's tests.

// scLocality is one LocalityLbEndpoints of a service port's assignment.
type scLocality struct {
	priority uint32
	region   string
	zone     string
	weight   uint32 // 0: unset
	eps      []ep
}

// scPort is a service port: TCP when up is UpstreamHTTPNone, else HTTP
// with the upstream version the federator picks for it.
type scPort struct {
	port uint32
	up   UpstreamHTTP
}

func (p scPort) http() bool { return p.up != UpstreamHTTPNone }

// scService is a clusterset service as the federator sees it.
type scService struct {
	name, ns string
	vip      string
	ports    []scPort
	ids      []string // SPIFFE IDs that serve it, sorted
	locs     []scLocality
}

func (s scService) host() string { return s.name + "." + s.ns + ".svc.clusterset.local" }
func (s scService) cluster(port uint32) string {
	return fmt.Sprintf("outbound|%d||%s", port, s.host())
}
func (s scService) sni(port uint32) string {
	return fmt.Sprintf("outbound_.%d_._.%s.%s.svc.cluster.local", port, s.name, s.ns)
}

// The services the sidecar tests use: an HTTP service with local pods
// and a peer's gateway behind them, a gRPC service on an HTTP port only
// a peer serves, and a TCP database.
var (
	scEcho = scService{name: "echo", ns: "demo", vip: "240.240.12.7", ports: []scPort{{80, UpstreamHTTP1}, {9000, UpstreamHTTPNone}},
		ids: []string{"spiffe://alpha.mesh/ns/demo/sa/echo", "spiffe://beta.mesh/ns/demo/sa/echo"},
		locs: []scLocality{
			{priority: 0, region: "eu", zone: "eu-a", weight: 1, eps: []ep{{ip: "10.1.0.1", port: 8080, healthy: true}, {ip: "10.1.0.2", port: 8080}}},
			{priority: 0, region: "eu", zone: "eu-b", weight: 1, eps: []ep{{ip: "10.1.1.1", port: 8080, healthy: true}}},
			{priority: 1, region: "eu", zone: "eu-c", weight: 3, eps: []ep{{ip: "192.0.2.10", port: 15443, healthy: true}}},
		}}
	scGreeter = scService{name: "greeter", ns: "shop", vip: "240.240.40.2", ports: []scPort{{80, UpstreamHTTP1}, {9090, UpstreamHTTP2}},
		ids: []string{"spiffe://beta.mesh/ns/shop/sa/greeter"},
		locs: []scLocality{
			{priority: 0, region: "us", zone: "us-a", weight: 2, eps: []ep{{ip: "198.51.100.7", port: 15443, healthy: true}}},
		}}
	scDB = scService{name: "db", ns: "shop", vip: "240.240.3.9", ports: []scPort{{5432, UpstreamHTTPNone}},
		ids: []string{"spiffe://alpha.mesh/ns/shop/sa/db"},
		locs: []scLocality{
			{priority: 0, weight: 1, eps: []ep{{ip: "10.2.0.5", port: 5432, healthy: true}}},
		}}
)

// sidecarResources is one snapshot for the sidecars.
type sidecarResources struct {
	listeners, routes, clusters, assignments, secrets []proto.Message
}

func (r sidecarResources) anys(tb testing.TB) []*anypb.Any {
	var out []*anypb.Any
	for _, list := range [][]proto.Message{r.listeners, r.routes, r.clusters, r.assignments, r.secrets} {
		for _, m := range list {
			out = append(out, mustAny(tb, m))
		}
	}
	return out
}

var adsSource = &corev3.ConfigSource{
	ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	ResourceApiVersion:    corev3.ApiVersion_V3,
}

func typedFilter(tb testing.TB, name string, m proto.Message) *listenerv3.Filter {
	return &listenerv3.Filter{Name: name, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tb, m)}}
}

func routerFilter(tb testing.TB) []*hcmv3.HttpFilter {
	return []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router",
		ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(tb, &routerv3.Router{})}}}
}

func outboundHCM(tb testing.TB, statPrefix, routeName string) *listenerv3.Filter {
	return typedFilter(tb, "envoy.filters.network.http_connection_manager", &hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: statPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			RouteConfigName: routeName, ConfigSource: adsSource,
		}},
		HttpFilters: routerFilter(tb),
	})
}

func tcpProxyFilter(tb testing.TB, cluster string) *listenerv3.Filter {
	return typedFilter(tb, "envoy.filters.network.tcp_proxy", &tcpproxyv3.TcpProxy{
		StatPrefix:       cluster,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
		IdleTimeout:      durationpb.New(time.Hour),
	})
}

func hostRange(vip string) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: vip, PrefixLen: wrapperspb.UInt32(32)}
}

func sdsDefault() []*tlsv3.SdsSecretConfig { return []*tlsv3.SdsSecretConfig{{Name: "default"}} }
func sdsRootCA() *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: RootCASecretName, SdsConfig: adsSource}
}

func tlsTransport(tb testing.TB, m proto.Message) *corev3.TransportSocket {
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls",
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(tb, m)}}
}

func downstreamTLS(tb testing.TB) *corev3.TransportSocket {
	return tlsTransport(tb, &tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: sdsDefault(),
			ValidationContextType:          &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{ValidationContextSdsSecretConfig: sdsRootCA()},
		},
	})
}

func vhost(name string, cluster string, domains ...string) *routev3.VirtualHost {
	return &routev3.VirtualHost{
		Name:    name,
		Domains: domains,
		Routes: []*routev3.Route{{
			Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
				Timeout:          durationpb.New(0),
			}},
		}},
	}
}

func inboundListener(tb testing.TB) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name:    InboundListenerName,
		Address: socketAddress("0.0.0.0", 15006),
		ListenerFilters: []*listenerv3.ListenerFilter{
			{
				Name:       "envoy.filters.listener.original_dst",
				ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &originaldstv3.OriginalDst{})},
			},
			{
				Name:       "envoy.filters.listener.tls_inspector",
				ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &tlsinspectorv3.TlsInspector{})},
			},
		},
		FilterChains: []*listenerv3.FilterChain{
			{
				FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: "tls", ApplicationProtocols: []string{"istio-http/1.1", "istio-h2"}},
				TransportSocket:  downstreamTLS(tb),
				Filters: []*listenerv3.Filter{typedFilter(tb, "envoy.filters.network.http_connection_manager", &hcmv3.HttpConnectionManager{
					CodecType:                   hcmv3.HttpConnectionManager_AUTO,
					StatPrefix:                  "inbound",
					ForwardClientCertDetails:    hcmv3.HttpConnectionManager_SANITIZE_SET,
					SetCurrentClientCertDetails: &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true},
					RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
						Name:         "inbound",
						VirtualHosts: []*routev3.VirtualHost{vhost("inbound", InboundPassthroughCluster, "*")},
					}},
					HttpFilters: routerFilter(tb),
				})},
			},
			{
				FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: "tls"},
				TransportSocket:  downstreamTLS(tb),
				Filters:          []*listenerv3.Filter{tcpProxyFilter(tb, InboundPassthroughCluster)},
			},
		},
	}
}

func originalDstCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:       durationpb.New(time.Second),
	}
}

// httpProtocolOptions are the typed_extension_protocol_options that
// make a cluster speak u upstream.
func httpProtocolOptions(tb testing.TB, u UpstreamHTTP) map[string]*anypb.Any {
	o := &httpv3.HttpProtocolOptions{}
	switch u {
	case UpstreamHTTPDownstream:
		o.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
			UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{},
		}
	case UpstreamHTTP1:
		o.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}},
		}}
	case UpstreamHTTP2:
		o.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}}
	default:
		tb.Fatalf("no protocol options for %v", u)
	}
	return map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(tb, o)}
}

func serviceCluster(tb testing.TB, s scService, p scPort) *clusterv3.Cluster {
	c := edsCluster(s.cluster(p.port))
	c.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{
		HealthyPanicThreshold: &typev3.Percent{Value: 0},
		LocalityConfigSpecifier: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig_{
			LocalityWeightedLbConfig: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig{},
		},
	}
	proto := "TCP"
	alpn := []string{"istio"}
	if p.http() {
		proto = "HTTP"
		alpn = []string{"istio-http/1.1", "istio-h2"}
		c.TypedExtensionProtocolOptions = httpProtocolOptions(tb, p.up)
	}
	meta, err := structpb.NewStruct(map[string]any{"host": s.host(), "vip": s.vip, "port": float64(p.port), "protocol": proto})
	require.NoError(tb, err)
	c.Metadata = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"isthmus": meta}}
	var sans []*tlsv3.SubjectAltNameMatcher
	for _, id := range s.ids {
		sans = append(sans, &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}},
		})
	}
	c.TransportSocket = tlsTransport(tb, &tlsv3.UpstreamTlsContext{
		Sni: s.sni(p.port),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: sdsDefault(),
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: sans},
				ValidationContextSdsSecretConfig: sdsRootCA(),
			}},
			AlpnProtocols: alpn,
		},
	})
	return c
}

func serviceAssignment(s scService, port uint32) *endpointv3.ClusterLoadAssignment {
	cla := &endpointv3.ClusterLoadAssignment{
		ClusterName: s.cluster(port),
		Policy:      &endpointv3.ClusterLoadAssignment_Policy{OverprovisioningFactor: wrapperspb.UInt32(100000)},
	}
	for _, l := range s.locs {
		le := &endpointv3.LocalityLbEndpoints{Priority: l.priority}
		if l.region != "" || l.zone != "" {
			le.Locality = &corev3.Locality{Region: l.region, Zone: l.zone}
		}
		if l.weight > 0 {
			le.LoadBalancingWeight = wrapperspb.UInt32(l.weight)
		}
		for _, e := range l.eps {
			hs := corev3.HealthStatus_HEALTHY
			if !e.healthy {
				hs = corev3.HealthStatus_UNHEALTHY
			}
			le.LbEndpoints = append(le.LbEndpoints, &endpointv3.LbEndpoint{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(e.ip, e.port)}},
				HealthStatus:   hs,
			})
		}
		cla.Endpoints = append(cla.Endpoints, le)
	}
	return cla
}

// buildSidecar is what the federator emits for these clusterset
// services, per docs/sidecar-xds.md, plus a ROOTCA for alpha.mesh.
func buildSidecar(tb testing.TB, svcs ...scService) sidecarResources {
	var r sidecarResources
	byVIP := slices.Clone(svcs)
	slices.SortFunc(byVIP, func(a, b scService) int {
		return netip.MustParseAddr(a.vip).Compare(netip.MustParseAddr(b.vip))
	})
	byHost := slices.Clone(svcs)
	slices.SortFunc(byHost, func(a, b scService) int { return strings.Compare(a.host(), b.host()) })

	// HTTP port numbers, and per port the services (by VIP) with it.
	httpPorts := map[uint32][]scService{}
	for _, s := range byVIP {
		for _, p := range s.ports {
			if p.http() {
				httpPorts[p.port] = append(httpPorts[p.port], s)
			}
		}
	}
	var chains []*listenerv3.FilterChain
	for _, port := range sortedPorts(httpPorts) {
		var ranges []*corev3.CidrRange
		for _, s := range httpPorts[port] {
			ranges = append(ranges, hostRange(s.vip))
		}
		chains = append(chains, &listenerv3.FilterChain{
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(port), PrefixRanges: ranges},
			Filters:          []*listenerv3.Filter{outboundHCM(tb, fmt.Sprintf("outbound_%d", port), fmt.Sprint(port))},
		})
	}
	for _, s := range byVIP {
		for _, p := range s.ports {
			if !p.http() {
				chains = append(chains, &listenerv3.FilterChain{
					FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(p.port), PrefixRanges: []*corev3.CidrRange{hostRange(s.vip)}},
					Filters:          []*listenerv3.Filter{tcpProxyFilter(tb, s.cluster(p.port))},
				})
			}
		}
	}
	chains = append(chains, &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(15001)},
		Filters:          []*listenerv3.Filter{outboundHCM(tb, "explicit", "explicit")},
	})
	r.listeners = []proto.Message{
		&listenerv3.Listener{
			Name:    OutboundListenerName,
			Address: socketAddress("0.0.0.0", 15001),
			ListenerFilters: []*listenerv3.ListenerFilter{{
				Name:       "envoy.filters.listener.original_dst",
				ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &originaldstv3.OriginalDst{})},
			}},
			FilterChains:       chains,
			DefaultFilterChain: &listenerv3.FilterChain{Filters: []*listenerv3.Filter{tcpProxyFilter(tb, PassthroughCluster)}},
		},
		inboundListener(tb),
	}

	explicit := &routev3.RouteConfiguration{Name: "explicit"}
	for _, port := range sortedPorts(httpPorts) {
		rc := &routev3.RouteConfiguration{Name: fmt.Sprint(port)}
		for _, s := range byHost {
			if !slices.ContainsFunc(s.ports, func(p scPort) bool { return p.port == port && p.http() }) {
				continue
			}
			hp := fmt.Sprintf("%s:%d", s.host(), port)
			rc.VirtualHosts = append(rc.VirtualHosts, vhost(hp, s.cluster(port), s.host(), hp, s.vip, fmt.Sprintf("%s:%d", s.vip, port)))
			domains := []string{hp}
			if port == 80 {
				domains = append(domains, s.host())
			}
			explicit.VirtualHosts = append(explicit.VirtualHosts, vhost(hp, s.cluster(port), domains...))
		}
		r.routes = append(r.routes, rc)
	}
	slices.SortFunc(explicit.VirtualHosts, func(a, b *routev3.VirtualHost) int { return strings.Compare(a.Name, b.Name) })
	r.routes = append(r.routes, explicit)

	inboundPassthrough := originalDstCluster(InboundPassthroughCluster)
	inboundPassthrough.TypedExtensionProtocolOptions = httpProtocolOptions(tb, UpstreamHTTPDownstream)
	r.clusters = []proto.Message{originalDstCluster(PassthroughCluster), inboundPassthrough}
	for _, s := range byHost {
		for _, p := range s.ports {
			r.clusters = append(r.clusters, serviceCluster(tb, s, p))
			r.assignments = append(r.assignments, serviceAssignment(s, p.port))
		}
	}
	r.secrets = []proto.Message{sidecarRootCA(tb)}
	return r
}

// sidecarRootCA is a ROOTCA with one root for alpha.mesh.
func sidecarRootCA(tb testing.TB) *tlsv3.Secret {
	return rootCA(tb, map[string][]*x509.Certificate{"alpha.mesh": {testRoot(tb, "alpha.mesh")}})
}

func sortedPorts(m map[uint32][]scService) []uint32 {
	var ports []uint32
	for p := range m {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	return ports
}

// requireSidecarConsistent checks what a published sidecar Config
// promises, through the lookups a proxy uses.
func requireSidecarConsistent(t testing.TB, cfg *Config) {
	t.Helper()
	sc := cfg.Sidecar
	require.NotNil(t, sc)
	require.NotNil(t, sc.Outbound)
	require.NotNil(t, sc.Inbound)
	hasCluster := func(name string) {
		t.Helper()
		_, ok := cfg.Clusters[name]
		require.True(t, ok, "cluster %q is named but not there", name)
	}
	checkRoutes := func(rc *RouteConfig) {
		t.Helper()
		require.NotNil(t, rc)
		for i := range rc.VirtualHosts {
			vh := &rc.VirtualHosts[i]
			require.NotEmpty(t, vh.Domains)
			require.NotEmpty(t, vh.Routes)
			for _, d := range vh.Domains {
				require.Same(t, vh, rc.VirtualHost(d), "domain %q", d)
				require.Same(t, vh, rc.VirtualHost(strings.ToUpper(d)), "domain %q", d)
			}
			for _, r := range vh.Routes {
				require.True(t, strings.HasPrefix(r.Prefix, "/"))
				require.GreaterOrEqual(t, r.Timeout, time.Duration(0))
				hasCluster(r.Cluster)
			}
		}
	}
	l := sc.Outbound
	require.NotNil(t, l.Default.TCP)
	hasCluster(l.Default.TCP.Cluster)
	for i := range l.Chains {
		ch := &l.Chains[i]
		require.NotZero(t, ch.Port)
		require.True(t, (ch.HTTP == nil) != (ch.TCP == nil), "chain %d: exactly one filter", i)
		if ch.TCP != nil {
			hasCluster(ch.TCP.Cluster)
			require.Positive(t, ch.TCP.IdleTimeout)
		} else if ch.HTTP.Routes != nil {
			// An in-cluster service's port: inline, on one address.
			require.Empty(t, ch.HTTP.RouteConfigName)
			require.Len(t, ch.VIPs, 1)
			checkRoutes(ch.HTTP.Routes)
		} else {
			checkRoutes(sc.Route(ch.HTTP.RouteConfigName))
		}
		if local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ch.Port); len(ch.VIPs) == 0 {
			if _, listed := l.exact[local]; !listed {
				require.Same(t, ch, l.Match(local))
			}
		}
		for _, vip := range ch.VIPs {
			require.Same(t, ch, l.Match(netip.AddrPortFrom(vip, ch.Port)))
		}
	}
	require.NotEmpty(t, sc.Inbound.Chains)
	for i := range sc.Inbound.Chains {
		ch := &sc.Inbound.Chains[i]
		if ch.TLS == nil {
			require.Equal(t, TransportRaw, ch.Transport())
			require.Empty(t, ch.ALPN, "inbound chain %d: a raw_buffer chain lists no ALPN", i)
			require.True(t, sc.Inbound.Plaintext())
			require.Same(t, ch, sc.Inbound.MatchPlaintext(ch.Port))
		} else {
			require.Equal(t, CertSecretName, ch.TLS.CertSecret)
			require.Equal(t, RootCASecretName, ch.TLS.ValidationSecret)
		}
		require.True(t, (ch.HTTP == nil) != (ch.TCP == nil), "inbound chain %d: exactly one filter", i)
		if ch.TCP != nil {
			hasCluster(ch.TCP.Cluster)
		} else {
			require.Empty(t, ch.HTTP.RouteConfigName)
			checkRoutes(ch.HTTP.Routes)
		}
		if ch.TLS != nil && len(ch.ALPN) == 0 {
			require.Same(t, ch, sc.Inbound.Match(ch.Port, nil))
		}
		for _, p := range ch.ALPN {
			require.Same(t, ch, sc.Inbound.Match(ch.Port, []string{p}))
		}
	}
	require.Equal(t, slices.ContainsFunc(sc.Inbound.Chains, func(ch InboundChain) bool { return ch.TLS == nil }), sc.Inbound.Plaintext())
	for name, c := range cfg.Clusters {
		require.Equal(t, name, c.Name)
		require.Positive(t, c.ConnectTimeout)
		switch c.Type {
		case OriginalDst:
			require.Empty(t, c.Endpoints)
			require.Nil(t, c.TLS)
		case EDS:
			require.NotNil(t, c.Service)
			require.NotNil(t, c.TLS)
			vip, ok := sc.LookupHost(c.Service.Host)
			require.True(t, ok)
			require.Equal(t, c.Service.VIP, vip)
			require.Equal(t, c.Service.Protocol == ProtocolHTTP, c.UpstreamHTTP != UpstreamHTTPNone)
			require.Positive(t, c.OverprovisioningFactor)
			n := 0
			for p, level := range c.Priorities {
				require.NotEmpty(t, level.Localities, "cluster %q: priority %d is empty", name, p)
				for _, loc := range level.Localities {
					n += len(loc.Endpoints)
					for _, e := range loc.Endpoints {
						require.True(t, e.Addr.IsValid())
						require.Equal(t, loc.Locality, e.Locality)
					}
				}
			}
			require.Len(t, c.Endpoints, n)
		default:
			t.Fatalf("cluster %q has type %v", name, c.Type)
		}
	}
	require.NotNil(t, cfg.Bundles)
}
