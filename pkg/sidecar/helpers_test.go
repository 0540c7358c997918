package sidecar

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/internal/testlog"
	"github.com/isthmus-mesh/isthmus/pkg/sidecar/capture"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// waitFor bounds every wait in these tests: behaviour, not speed.
const waitFor = 15 * time.Second

// testLogger logs through t, except under a fuzz target, where
// testing.F forbids logging from the code it runs.
func testLogger(t testing.TB) *slog.Logger {
	if _, ok := t.(*testing.F); ok {
		return slog.New(slog.DiscardHandler)
	}
	return testlog.New(t)
}

// --- a test CA per trust domain ---

type testCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	trustDomain := spiffeid.RequireTrustDomainFromString(td)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{td}, CommonName: td + " root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trustDomain.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{td: trustDomain, cert: cert, key: key}
}

func (ca *testCA) id(ns, sa string) spiffeid.ID {
	return spiffeid.RequireFromSegments(ca.td, "ns", ns, "sa", sa)
}

// svid issues an X.509 SVID for id.
func (ca *testCA) svid(t testing.TB, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{Organization: []string{ca.td.Name()}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(12 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

// tlsCert is the SVID as a tls.Certificate, for hand-made clients.
func tlsCert(s *x509svid.SVID) tls.Certificate {
	return tls.Certificate{Certificate: [][]byte{s.Certificates[0].Raw}, PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
}

// --- xDS resources, as the federator emits them (docs/sidecar-xds.md) ---

type svcPort struct {
	port uint32
	http bool
}

type ep struct {
	addr    netip.AddrPort
	healthy bool
}

type locSpec struct {
	priority uint32
	zone     string
	weight   uint32 // 0: unset
	eps      []ep
}

// svc is a clusterset service; every port has the same endpoints.
type svc struct {
	name, ns string
	vip      string
	ports    []svcPort
	ids      []spiffeid.ID
	locs     []locSpec
	// timeout is the route.timeout of its HTTP ports' routes; 0 (none)
	// is what the federator sends.
	timeout time.Duration
	// upstream is the HTTP version its HTTP ports' clusters speak:
	// UpstreamHTTP1 or UpstreamHTTP2 (explicit_http_config); zero:
	// use_downstream_protocol_config.
	upstream xdsclient.UpstreamHTTP
}

func (s svc) host() string { return s.name + "." + s.ns + ".svc.clusterset.local" }
func (s svc) cluster(port uint32) string {
	return fmt.Sprintf("outbound|%d||%s", port, s.host())
}

func mustAny(tb testing.TB, m proto.Message) *anypb.Any {
	tb.Helper()
	a, err := anypb.New(m)
	require.NoError(tb, err)
	return a
}

var adsSource = &corev3.ConfigSource{
	ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	ResourceApiVersion:    corev3.ApiVersion_V3,
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
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
		CodecType:      hcmv3.HttpConnectionManager_AUTO,
		StatPrefix:     statPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: routeName, ConfigSource: adsSource}},
		HttpFilters:    routerFilter(tb),
	})
}

func tcpProxyFilter(tb testing.TB, cluster string) *listenerv3.Filter {
	return typedFilter(tb, "envoy.filters.network.tcp_proxy", &tcpproxyv3.TcpProxy{
		StatPrefix:       cluster,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
		IdleTimeout:      durationpb.New(time.Hour),
	})
}

func sdsDefault() []*tlsv3.SdsSecretConfig { return []*tlsv3.SdsSecretConfig{{Name: "default"}} }
func sdsRootCA() *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: xdsclient.RootCASecretName, SdsConfig: adsSource}
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

// vhost routes every path of domains to cluster, within timeout (0:
// none).
func vhost(name, cluster string, timeout time.Duration, domains ...string) *routev3.VirtualHost {
	return &routev3.VirtualHost{Name: name, Domains: domains, Routes: []*routev3.Route{{
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
			Timeout:          durationpb.New(timeout),
		}},
	}}}
}

func useDownstreamProtocol(tb testing.TB) map[string]*anypb.Any {
	return map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(tb, &httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
			UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{}},
	})}
}

// explicitHTTP is the protocol options of a cluster that speaks HTTP/2
// (h2) or HTTP/1.1 upstream whatever the downstream spoke.
func explicitHTTP(tb testing.TB, h2 bool) map[string]*anypb.Any {
	e := &httpv3.HttpProtocolOptions_ExplicitHttpConfig{ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{
		HttpProtocolOptions: &corev3.Http1ProtocolOptions{}}}
	if h2 {
		e.ProtocolConfig = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}
	}
	return map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(tb, &httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: e},
	})}
}

func originalDstCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy: clusterv3.Cluster_CLUSTER_PROVIDED, ConnectTimeout: durationpb.New(time.Second)}
}

func serviceCluster(tb testing.TB, s svc, p svcPort) *clusterv3.Cluster {
	c := &clusterv3.Cluster{
		Name:                 s.cluster(p.port),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource},
		ConnectTimeout:       durationpb.New(time.Second),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		CommonLbConfig: &clusterv3.Cluster_CommonLbConfig{
			HealthyPanicThreshold: &typev3.Percent{Value: 0},
			LocalityConfigSpecifier: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig_{
				LocalityWeightedLbConfig: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig{}},
		},
	}
	protocol, alpn := "TCP", []string{"istio"}
	if p.http {
		protocol, alpn = "HTTP", []string{"istio-http/1.1", "istio-h2"}
		switch s.upstream {
		case xdsclient.UpstreamHTTP1:
			c.TypedExtensionProtocolOptions = explicitHTTP(tb, false)
		case xdsclient.UpstreamHTTP2:
			c.TypedExtensionProtocolOptions = explicitHTTP(tb, true)
		default:
			c.TypedExtensionProtocolOptions = useDownstreamProtocol(tb)
		}
	}
	meta, err := structpb.NewStruct(map[string]any{"host": s.host(), "vip": s.vip, "port": float64(p.port), "protocol": protocol})
	require.NoError(tb, err)
	c.Metadata = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"isthmus": meta}}
	var sans []*tlsv3.SubjectAltNameMatcher
	for _, id := range s.ids {
		sans = append(sans, &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id.String()}}})
	}
	c.TransportSocket = tlsTransport(tb, &tlsv3.UpstreamTlsContext{
		Sni: fmt.Sprintf("outbound_.%d_._.%s.%s.svc.cluster.local", p.port, s.name, s.ns),
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

func serviceAssignment(s svc, port uint32) *endpointv3.ClusterLoadAssignment {
	cla := &endpointv3.ClusterLoadAssignment{
		ClusterName: s.cluster(port),
		Policy:      &endpointv3.ClusterLoadAssignment_Policy{OverprovisioningFactor: wrapperspb.UInt32(100000)},
	}
	for _, l := range s.locs {
		le := &endpointv3.LocalityLbEndpoints{Priority: l.priority, Locality: &corev3.Locality{Zone: l.zone}}
		if l.weight > 0 {
			le.LoadBalancingWeight = wrapperspb.UInt32(l.weight)
		}
		for _, e := range l.eps {
			hs := corev3.HealthStatus_HEALTHY
			if !e.healthy {
				hs = corev3.HealthStatus_UNHEALTHY
			}
			le.LbEndpoints = append(le.LbEndpoints, &endpointv3.LbEndpoint{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: socketAddress(e.addr.Addr().String(), uint32(e.addr.Port()))}},
				HealthStatus: hs,
			})
		}
		cla.Endpoints = append(cla.Endpoints, le)
	}
	return cla
}

func inboundListener(tb testing.TB) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name:    xdsclient.InboundListenerName,
		Address: socketAddress("0.0.0.0", 15006),
		ListenerFilters: []*listenerv3.ListenerFilter{
			{Name: "envoy.filters.listener.original_dst", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &originaldstv3.OriginalDst{})}},
			{Name: "envoy.filters.listener.tls_inspector", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &tlsinspectorv3.TlsInspector{})}},
		},
		FilterChains: []*listenerv3.FilterChain{
			{
				FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: "tls", ApplicationProtocols: []string{alpnHTTP1, alpnHTTP2}},
				TransportSocket:  downstreamTLS(tb),
				Filters: []*listenerv3.Filter{typedFilter(tb, "envoy.filters.network.http_connection_manager", &hcmv3.HttpConnectionManager{
					CodecType:                   hcmv3.HttpConnectionManager_AUTO,
					StatPrefix:                  "inbound",
					ForwardClientCertDetails:    hcmv3.HttpConnectionManager_SANITIZE_SET,
					SetCurrentClientCertDetails: &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true},
					RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
						Name: "inbound", VirtualHosts: []*routev3.VirtualHost{vhost("inbound", xdsclient.InboundPassthroughCluster, 0, "*")}}},
					HttpFilters: routerFilter(tb),
				})},
			},
			{
				FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: "tls"},
				TransportSocket:  downstreamTLS(tb),
				Filters: []*listenerv3.Filter{typedFilter(tb, "envoy.filters.network.tcp_proxy", &tcpproxyv3.TcpProxy{
					StatPrefix: xdsclient.InboundPassthroughCluster, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: xdsclient.InboundPassthroughCluster},
					IdleTimeout: durationpb.New(time.Hour)})},
			},
		},
	}
}

// rootCA is the ROOTCA Secret: one bundle per trust domain.
func rootCA(tb testing.TB, cas ...*testCA) *tlsv3.Secret {
	var tds []*tlsv3.SPIFFECertValidatorConfig_TrustDomain
	for _, ca := range cas {
		tds = append(tds, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{Name: ca.td.Name(), TrustBundle: &corev3.DataSource{
			Specifier: &corev3.DataSource_InlineBytes{InlineBytes: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})}}})
	}
	return &tlsv3.Secret{Name: xdsclient.RootCASecretName, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: "envoy.tls.cert_validator.spiffe",
			TypedConfig: mustAny(tb, &tlsv3.SPIFFECertValidatorConfig{TrustDomains: tds})}}}}
}

// snapshot is what the federator serves every sidecar for svcs, trusting
// the bundles of cas.
func snapshot(tb testing.TB, version string, cas []*testCA, svcs ...svc) *cache.Snapshot {
	tb.Helper()
	byVIP := slices.Clone(svcs)
	slices.SortFunc(byVIP, func(a, b svc) int { return netip.MustParseAddr(a.vip).Compare(netip.MustParseAddr(b.vip)) })
	byHost := slices.Clone(svcs)
	slices.SortFunc(byHost, func(a, b svc) int { return strings.Compare(a.host(), b.host()) })
	httpPorts := map[uint32][]svc{}
	for _, s := range byVIP {
		for _, p := range s.ports {
			if p.http {
				httpPorts[p.port] = append(httpPorts[p.port], s)
			}
		}
	}
	var ports []uint32
	for p := range httpPorts {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	var chains []*listenerv3.FilterChain
	for _, port := range ports {
		var ranges []*corev3.CidrRange
		for _, s := range httpPorts[port] {
			ranges = append(ranges, &corev3.CidrRange{AddressPrefix: s.vip, PrefixLen: wrapperspb.UInt32(32)})
		}
		chains = append(chains, &listenerv3.FilterChain{
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(port), PrefixRanges: ranges},
			Filters:          []*listenerv3.Filter{outboundHCM(tb, fmt.Sprintf("outbound_%d", port), fmt.Sprint(port))},
		})
	}
	for _, s := range byVIP {
		for _, p := range s.ports {
			if !p.http {
				chains = append(chains, &listenerv3.FilterChain{
					FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(p.port),
						PrefixRanges: []*corev3.CidrRange{{AddressPrefix: s.vip, PrefixLen: wrapperspb.UInt32(32)}}},
					Filters: []*listenerv3.Filter{tcpProxyFilter(tb, s.cluster(p.port))},
				})
			}
		}
	}
	chains = append(chains, &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(15001)},
		Filters:          []*listenerv3.Filter{outboundHCM(tb, "explicit", "explicit")},
	})
	listeners := []types.Resource{
		&listenerv3.Listener{
			Name:    xdsclient.OutboundListenerName,
			Address: socketAddress("0.0.0.0", 15001),
			ListenerFilters: []*listenerv3.ListenerFilter{{Name: "envoy.filters.listener.original_dst",
				ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(tb, &originaldstv3.OriginalDst{})}}},
			FilterChains:       chains,
			DefaultFilterChain: &listenerv3.FilterChain{Filters: []*listenerv3.Filter{tcpProxyFilter(tb, xdsclient.PassthroughCluster)}},
		},
		inboundListener(tb),
	}
	var routes []types.Resource
	explicit := &routev3.RouteConfiguration{Name: "explicit"}
	for _, port := range ports {
		rc := &routev3.RouteConfiguration{Name: fmt.Sprint(port)}
		for _, s := range byHost {
			if !slices.Contains(s.ports, svcPort{port, true}) {
				continue
			}
			hp := fmt.Sprintf("%s:%d", s.host(), port)
			rc.VirtualHosts = append(rc.VirtualHosts, vhost(hp, s.cluster(port), s.timeout, s.host(), hp, s.vip, fmt.Sprintf("%s:%d", s.vip, port)))
			domains := []string{hp}
			if port == 80 {
				domains = append(domains, s.host())
			}
			explicit.VirtualHosts = append(explicit.VirtualHosts, vhost(hp, s.cluster(port), s.timeout, domains...))
		}
		routes = append(routes, rc)
	}
	slices.SortFunc(explicit.VirtualHosts, func(a, b *routev3.VirtualHost) int { return strings.Compare(a.Name, b.Name) })
	routes = append(routes, explicit)
	inboundPassthrough := originalDstCluster(xdsclient.InboundPassthroughCluster)
	inboundPassthrough.TypedExtensionProtocolOptions = useDownstreamProtocol(tb)
	clusters := []types.Resource{originalDstCluster(xdsclient.PassthroughCluster), inboundPassthrough}
	var assignments []types.Resource
	for _, s := range byHost {
		for _, p := range s.ports {
			clusters = append(clusters, serviceCluster(tb, s, p))
			assignments = append(assignments, serviceAssignment(s, p.port))
		}
	}
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ListenerType: listeners,
		resource.RouteType:    routes,
		resource.ClusterType:  clusters,
		resource.EndpointType: assignments,
		resource.SecretType:   {rootCA(tb, cas...)},
	})
	require.NoError(tb, err)
	require.NoError(tb, snap.Consistent())
	return snap
}

// decoded is the snapshot as the xDS client decodes it, for tests that
// feed the proxy without a server.
func decoded(tb testing.TB, snap *cache.Snapshot) *xdsclient.Config {
	tb.Helper()
	var anys []*anypb.Any
	for _, typ := range []resource.Type{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType, resource.SecretType} {
		for _, r := range snap.GetResources(typ) {
			anys = append(anys, mustAny(tb, r))
		}
	}
	cfg, err := xdsclient.DecodeRole(xdsclient.RoleSidecar, anys...)
	require.NoError(tb, err)
	return cfg
}

// --- the federator: go-control-plane's ADS server ---

// oneGroup serves every node the same snapshot, as the federator serves
// every sidecar of a cluster.
type oneGroup struct{}

func (oneGroup) ID(*corev3.Node) string { return "sidecar" }

type xdsServer struct {
	cache cache.SnapshotCache
	addr  string
}

func startXDSServer(t testing.TB) *xdsServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &xdsServer{cache: cache.NewSnapshotCache(true, oneGroup{}, nil), addr: lis.Addr().String()}
	ctx, cancel := context.WithCancel(context.Background())
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, s.cache, nil))
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = gs.Serve(lis)
	}()
	t.Cleanup(func() {
		gs.Stop()
		cancel()
		<-done
	})
	return s
}

func (s *xdsServer) set(t testing.TB, snap *cache.Snapshot) {
	t.Helper()
	require.NoError(t, s.cache.SetSnapshot(context.Background(), "sidecar", snap))
}

// staticSource is a ConfigSource that publishes what the test sets.
type staticSource struct {
	cur     atomic.Pointer[xdsclient.Config]
	updated chan struct{}
}

func newStaticSource(cfg *xdsclient.Config) *staticSource {
	s := &staticSource{updated: make(chan struct{}, 1)}
	if cfg != nil {
		s.set(cfg)
	}
	return s
}

func (s *staticSource) Current() *xdsclient.Config { return s.cur.Load() }
func (s *staticSource) Updated() <-chan struct{}   { return s.updated }
func (s *staticSource) set(cfg *xdsclient.Config) {
	s.cur.Store(cfg)
	select {
	case s.updated <- struct{}{}:
	default:
	}
}

// --- capture without iptables ---

// testNAT stands in for iptables REDIRECT on the outbound side: its
// dialer binds the client's socket first and records where the app meant
// to go, and OriginalDst reads it back, as SO_ORIGINAL_DST would. A
// connection it did not make was not redirected.
type testNAT struct {
	to netip.AddrPort // the outbound listener
	// mu guards dst: client address → original destination.
	mu  sync.Mutex
	dst map[netip.AddrPort]netip.AddrPort
	// hosts resolves service names as the DNS proxy would.
	hosts map[string]netip.Addr
}

func newTestNAT(hosts map[string]netip.Addr) *testNAT {
	return &testNAT{dst: map[netip.AddrPort]netip.AddrPort{}, hosts: hosts}
}

// dial connects to addr (host:port, a service name or an IP) the way
// the app's connection would reach the sidecar under iptables.
func (n *testNAT) dial(ctx context.Context, addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		var ok bool
		if ip, ok = n.hosts[host]; !ok {
			return nil, fmt.Errorf("test NAT: no address for %q", host)
		}
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, err
	}
	dst := netip.AddrPortFrom(ip, uint16(port))
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var berr error
		err := c.Control(func(fd uintptr) {
			if berr = syscall.Bind(int(fd), &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); berr != nil {
				return
			}
			var sa syscall.Sockaddr
			if sa, berr = syscall.Getsockname(int(fd)); berr != nil {
				return
			}
			in := sa.(*syscall.SockaddrInet4)
			n.mu.Lock()
			n.dst[netip.AddrPortFrom(netip.AddrFrom4(in.Addr), uint16(in.Port))] = dst
			n.mu.Unlock()
		})
		return errors.Join(err, berr)
	}}
	return d.DialContext(ctx, "tcp", n.to.String())
}

func (n *testNAT) originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	remote := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	if dst, ok := n.dst[netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())]; ok {
		return dst, nil
	}
	return netip.AddrPort{}, capture.ErrNoOriginalDst
}

// httpClient sends requests through the sidecar as a captured app
// would: HTTP/1.1, or h2c with prior knowledge.
func (n *testNAT) httpClient(h2 bool) *http.Client {
	var protos http.Protocols
	if h2 {
		protos.SetUnencryptedHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	return &http.Client{Timeout: waitFor, Transport: &http.Transport{Protocols: &protos,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return n.dial(ctx, addr) }}}
}

// --- the apps ---

// echoReply is what the HTTP backend answers.
type echoReply struct {
	Pod   string   `json:"pod"`
	Proto string   `json:"proto"`
	Host  string   `json:"host"`
	Path  string   `json:"path"`
	XFCC  []string `json:"xfcc"`
	Body  int      `json:"body"`
}

// backend is a pod's HTTP app (HTTP/1.1 and h2c), counting requests.
type backend struct {
	addr     netip.AddrPort
	requests atomic.Int64
	// lastTarget is the request target of the last request the app
	// received, before its ServeMux cleans or redirects it.
	lastTarget atomic.Pointer[string]
}

func startHTTPBackend(t testing.TB, pod string) *backend {
	t.Helper()
	b := &backend{}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		b.requests.Add(1)
		n, _ := io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(echoReply{Pod: pod, Proto: r.Proto, Host: r.Host, Path: r.URL.Path,
			XFCC: r.Header.Values(xfccHeader), Body: int(n)})
	})
	// /stream writes a line every 20 ms, flushing each, for ?n= lines.
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		b.requests.Add(1)
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		every, err := time.ParseDuration(r.URL.Query().Get("every"))
		if err != nil {
			every = 20 * time.Millisecond
		}
		for i := range n {
			if _, err := fmt.Fprintf(w, "line %d\n", i); err != nil {
				return
			}
			_ = http.NewResponseController(w).Flush()
			select {
			case <-time.After(every):
			case <-r.Context().Done():
				return
			}
		}
	})
	// /slow answers after ?d=.
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		b.requests.Add(1)
		d, _ := time.ParseDuration(r.URL.Query().Get("d"))
		select {
		case <-time.After(d):
			_, _ = io.WriteString(w, "slow done")
		case <-r.Context().Done():
		}
	})
	b.addr = serveApp(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.lastTarget.Store(&r.RequestURI)
		mux.ServeHTTP(w, r)
	}))
	return b
}

// serveApp serves h as a pod's app on loopback, HTTP/1.1 and h2c, until
// the test ends, and returns its address.
func serveApp(t testing.TB, h http.Handler) netip.AddrPort {
	t.Helper()
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &protos, ReadHeaderTimeout: waitFor}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// grpcBackend is a pod's gRPC app: the standard health service, whose
// Check is a unary call and Watch a server stream.
type grpcBackend struct {
	addr   netip.AddrPort
	health *health.Server
}

func startGRPCBackend(t testing.TB) *grpcBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	g := &grpcBackend{addr: ln.Addr().(*net.TCPAddr).AddrPort(), health: health.NewServer()}
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, g.health)
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(ln) }()
	t.Cleanup(func() { g.health.Shutdown(); gs.Stop(); <-done })
	return g
}

// tcpEcho is a pod's TCP app: it echoes until the client's end of
// stream, then closes its side.
type tcpEcho struct {
	addr     netip.AddrPort
	accepted atomic.Int64
}

func startTCPEcho(t testing.TB) *tcpEcho {
	t.Helper()
	e := &tcpEcho{}
	e.addr = serveTCP(t, func(c net.Conn) {
		e.accepted.Add(1)
		_ = c.SetDeadline(time.Now().Add(waitFor))
		_, _ = io.Copy(c, c)
		_ = c.(*net.TCPConn).CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	})
	return e
}

// getNoHang sends a GET of url with rt and reads the whole answer. Any
// status, and any error, is returned; a round trip or a body that does
// not end within waitFor fails t.
func getNoHang(t testing.TB, rt func(*http.Request) (*http.Response, error), url string) (code int, body string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := rt(req)
	require.NotErrorIs(t, err, context.DeadlineExceeded, "no answer came")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NotErrorIs(t, err, context.DeadlineExceeded, "the response body hung")
	return resp.StatusCode, string(b), err
}

// serveTCP listens on loopback and runs serve on each connection, on its
// own goroutine, then closes it; the test's cleanup closes the listener
// and waits for every serve to return.
func serveTCP(t testing.TB, serve func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				serve(c)
			})
		}
	})
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// --- a pod: its sidecar and its apps ---

// The loopback addresses a pod's inbound listener tells its apps apart
// by, standing in for iptables' original destination (the pod IP and
// the app's port): an endpoint <ip>:<inbound port> reaches that app.
var (
	ipHTTP = netip.MustParseAddr("127.0.0.2")
	ipGRPC = netip.MustParseAddr("127.0.0.3")
	ipTCP  = netip.MustParseAddr("127.0.0.4")
)

type pod struct {
	name  string
	id    spiffeid.ID
	svid  *x509svid.SVID
	proxy *Proxy
	nat   *testNAT
	http  *backend
	grpc  *grpcBackend
	tcp   *tcpEcho
	// apps maps the inbound address an endpoint uses to its app. Set
	// before any connection reads it, or with setApp.
	apps   map[netip.Addr]netip.AddrPort
	appsMu sync.RWMutex
	cancel context.CancelFunc
	done   chan error
}

type podOptions struct {
	// source feeds the proxy; nil: an xDS client to xds.
	source ConfigSource
	xds    *xdsServer
	edit   func(*Config)
	// inboundPort binds the inbound listener there (0: any).
	inboundPort uint16
	// prep, if not nil, may change the Proxy before Run.
	prep func(*Proxy)
}

func startPod(t testing.TB, name string, ca *testCA, hosts map[string]netip.Addr, o podOptions) *pod {
	t.Helper()
	p := &pod{name: name, id: ca.id("demo", name), nat: newTestNAT(hosts), http: startHTTPBackend(t, name),
		grpc: startGRPCBackend(t), tcp: startTCPEcho(t), done: make(chan error, 1)}
	p.svid = ca.svid(t, p.id)
	p.apps = map[netip.Addr]netip.AddrPort{ipHTTP: p.http.addr, ipGRPC: p.grpc.addr, ipTCP: p.tcp.addr}
	cfg := DefaultConfig()
	cfg.OutboundAddr = "127.0.0.1:0"
	cfg.InboundAddr = net.JoinHostPort("0.0.0.0", strconv.Itoa(int(o.inboundPort)))
	cfg.AdminAddr = "127.0.0.1:0"
	cfg.HealthAddr = "127.0.0.1:0"
	cfg.DrainTimeout = 2 * time.Second
	cfg.EjectionTime = 300 * time.Millisecond
	if o.edit != nil {
		o.edit(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	src := o.source
	var client *xdsclient.Client
	if src == nil {
		var err error
		client, err = xdsclient.New(xdsclient.ClientConfig{
			Server: o.xds.addr, Plaintext: true, Check: Check, Logger: testLogger(t).With("pod", name),
			Node:       xdsclient.SidecarNode("test", "10.0.0.1", name, "demo"),
			BackoffMin: 50 * time.Millisecond, BackoffMax: time.Second,
		})
		require.NoError(t, err)
		src = client
	}
	proxy, err := New(cfg, src, p.svid, Options{
		Logger: testLogger(t).With("pod", name),
		OriginalDst: func(c *net.TCPConn) (netip.AddrPort, error) {
			local := c.LocalAddr().(*net.TCPAddr).AddrPort()
			local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
			if local.Port() == p.proxy.inLn.Addr().(*net.TCPAddr).AddrPort().Port() {
				p.appsMu.RLock()
				app, ok := p.apps[local.Addr()]
				p.appsMu.RUnlock()
				if ok {
					return netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), app.Port()), nil
				}
				return local, nil // not redirected
			}
			return p.nat.originalDst(c)
		},
	})
	require.NoError(t, err)
	p.proxy = proxy
	p.nat.to = proxy.OutboundAddr().(*net.TCPAddr).AddrPort()
	var clientDone chan struct{}
	if client != nil {
		clientDone = make(chan struct{})
		go func() { defer close(clientDone); _ = client.Run(ctx) }()
	}
	if o.prep != nil {
		o.prep(proxy)
	}
	go func() { p.done <- proxy.Run(ctx) }()
	t.Cleanup(func() {
		p.stop(t)
		if clientDone != nil {
			<-clientDone
		}
	})
	return p
}

// stop ends the pod's sidecar and checks Run returned in time (it waits
// for every goroutine it started).
func (p *pod) stop(t testing.TB) {
	p.cancel()
	select {
	case err, ok := <-p.done:
		if ok {
			require.NoError(t, err)
			close(p.done)
		}
	case <-time.After(waitFor):
		buf := make([]byte, 1<<20)
		t.Errorf("pod %s: Run did not return after its context ended\n%s", p.name, buf[:runtime.Stack(buf, true)])
	}
}

// endpoint is the address another sidecar reaches the app at.
// setApp maps ip to app while the pod serves.
func (p *pod) setApp(ip netip.Addr, app netip.AddrPort) {
	p.appsMu.Lock()
	defer p.appsMu.Unlock()
	p.apps[ip] = app
}

func (p *pod) endpoint(app netip.Addr) netip.AddrPort {
	return netip.AddrPortFrom(app, p.proxy.InboundAddr().(*net.TCPAddr).AddrPort().Port())
}

// waitReady waits until the pod's sidecar adopted the configuration of
// version (the endpoints' version: the xDS client keeps a type's older
// version in a config when a response changed nothing).
func (p *pod) waitReady(t testing.TB, version string) {
	t.Helper()
	require.Eventually(t, func() bool {
		st := p.proxy.state.Load()
		return st != nil && (version == "" || st.cfg.Versions == nil || st.cfg.Versions[resource.EndpointType] == version)
	}, waitFor, 10*time.Millisecond, "pod %s never adopted version %q", p.name, version)
}

// get sends a GET through the pod's sidecar and decodes the echo.
func (p *pod) get(t testing.TB, h2 bool, url string, header http.Header) (int, echoReply, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	require.NoError(t, err)
	maps := req.Header
	for k, v := range header {
		maps[k] = v
	}
	resp, err := p.nat.httpClient(h2).Do(req)
	require.NoError(t, err)
	return readEcho(t, resp)
}

// readEcho reads and closes resp: its status, the echo app's reply when
// it is 200, and the body.
func readEcho(t testing.TB, resp *http.Response) (int, echoReply, string) {
	t.Helper()
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var reply echoReply
	if resp.StatusCode == http.StatusOK {
		require.NoError(t, json.Unmarshal(body, &reply), "body %q", body)
	}
	return resp.StatusCode, reply, string(body)
}

// scrape reads the pod's metrics from the health port.
func (p *pod) scrape(t testing.TB) string {
	t.Helper()
	resp, err := http.Get("http://" + p.proxy.HealthAddr().String() + "/stats/prometheus")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

// metricValue finds the sample of name whose labels include every one of
// labels ("k=v"), or -1.
func metricValue(t testing.TB, text, name string, labels ...string) float64 {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			if !strings.Contains(line, k+`="`+v+`"`) {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		require.NoError(t, err)
		return f
	}
	return -1
}

// startServiceMesh is a mesh of two pods where s is served on b by h, its
// app at ip; editA and editB, when not nil, change each pod's Config.
func startServiceMesh(t testing.TB, s svc, ip netip.Addr, h http.Handler, editA, editB func(*Config)) *mesh {
	t.Helper()
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(s)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: editA})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds, edit: editB})
	m.b.apps[ip] = serveApp(t, h)
	m.set(t, "v1", m.onB(s, ip))
	return m
}
