package xdsclient

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func TestRouteTypeURLMatchesGoControlPlane(t *testing.T) {
	require.Equal(t, resource.RouteType, TypeRouteConfiguration)
}

func TestSidecarNodeAndRole(t *testing.T) {
	n := SidecarNode("alpha", "10.1.0.1", "echo-0", "demo")
	require.Equal(t, "sidecar~10.1.0.1~echo-0.demo~demo.svc.cluster.local", n.ID)
	require.Equal(t, "alpha", n.Cluster)
	require.Equal(t, RoleSidecar, n.Role())
	require.Equal(t, RoleGateway, GatewayNode("alpha", "10.0.0.9", "gw-0", "isthmus-system").Role())
	require.Equal(t, RoleSidecar, Node{ID: "sidecar~1.2.3.4~a.b~b.svc.cluster.local"}.Role(), "from the id without metadata")

	_, err := New(ClientConfig{Server: "127.0.0.1:1", Plaintext: true, Node: Node{ID: "router~1.2.3.4~a.b~b.svc.cluster.local"}})
	require.ErrorContains(t, err, `node role "router" is not supported (eastwest-gw or sidecar)`)
	bad := SidecarNode("alpha", "10.1.0.1", "echo-0", "demo")
	bad.ID = "eastwest-gw~10.1.0.1~echo-0.demo~demo.svc.cluster.local"
	_, err = New(ClientConfig{Server: "127.0.0.1:1", Plaintext: true, Node: bad})
	require.ErrorContains(t, err, `does not start with "sidecar~", the role in its metadata`)
	_, err = New(ClientConfig{Server: "127.0.0.1:1", Plaintext: true, Node: n,
		Types: []string{TypeListener, TypeCluster, TypeClusterLoadAssignment, TypeSecret}})
	require.ErrorContains(t, err, `type "`+TypeRouteConfiguration+`" is required`)
	c, err := New(ClientConfig{Server: "127.0.0.1:1", Plaintext: true, Node: n})
	require.NoError(t, err)
	require.Equal(t, SidecarTypes(), c.cfg.Types)

	_, err = DecodeRole("router")
	require.ErrorContains(t, err, `unknown role "router"`)
}

func TestSidecarDecodeAccepts(t *testing.T) {
	r := buildSidecar(t, scEcho, scGreeter, scDB)
	cfg, err := DecodeRole(RoleSidecar, r.anys(t)...)
	require.NoError(t, err)
	requireSidecarConsistent(t, cfg)
	require.Empty(t, cfg.Listeners, "the sidecar's listeners are in Sidecar")
	sc := cfg.Sidecar

	vip := netip.MustParseAddr
	echo80, echo9000 := scEcho.cluster(80), scEcho.cluster(9000)
	greeter80, greeter9090 := scGreeter.cluster(80), scGreeter.cluster(9090)
	db := scDB.cluster(5432)
	tcp := func(cluster string) *TCPProxy {
		return &TCPProxy{Cluster: cluster, StatPrefix: cluster, IdleTimeout: time.Hour}
	}
	rds := func(port, name string) *HTTPConnectionManager {
		return &HTTPConnectionManager{StatPrefix: "outbound_" + port, RouteConfigName: name}
	}

	// The outbound listener, chain by chain, in the order sent.
	out := sc.Outbound
	require.Equal(t, OutboundListenerName, out.Name)
	require.Equal(t, vip("0.0.0.0"), out.Addr)
	require.EqualValues(t, 15001, out.Port)
	require.Equal(t, []OutboundChain{
		{Port: 80, VIPs: []netip.Addr{vip("240.240.12.7"), vip("240.240.40.2")}, HTTP: rds("80", "80")},
		{Port: 9090, VIPs: []netip.Addr{vip("240.240.40.2")}, HTTP: rds("9090", "9090")},
		{Port: 5432, VIPs: []netip.Addr{vip("240.240.3.9")}, TCP: tcp(db)},
		{Port: 9000, VIPs: []netip.Addr{vip("240.240.12.7")}, TCP: tcp(echo9000)},
		{Port: 15001, HTTP: &HTTPConnectionManager{StatPrefix: "explicit", RouteConfigName: "explicit"}},
	}, out.Chains)
	require.Equal(t, OutboundChain{TCP: tcp(PassthroughCluster)}, out.Default)
	for dst, want := range map[string]*OutboundChain{
		"240.240.12.7:80":   &out.Chains[0],
		"240.240.40.2:80":   &out.Chains[0],
		"240.240.40.2:9090": &out.Chains[1],
		"240.240.12.7:9090": &out.Default, // echo has no 9090
		"240.240.3.9:5432":  &out.Chains[2],
		"240.240.12.7:9000": &out.Chains[3],
		"127.0.0.1:15001":   &out.Chains[4],
		"10.96.0.10:443":    &out.Default,
		"10.96.0.10:80":     &out.Default,
	} {
		require.Same(t, want, out.Match(netip.MustParseAddrPort(dst)), dst)
	}

	// Routes: by port, port-aware and case-insensitive, and explicit.
	require.Equal(t, []string{"80", "9090", "explicit"}, slices.Sorted(mapKeys(sc.Routes)))
	for _, tc := range []struct{ route, authority, cluster string }{
		{"80", "echo.demo.svc.clusterset.local", echo80},
		{"80", "Echo.Demo.svc.clusterset.local:80", echo80},
		{"80", "240.240.12.7", echo80},
		{"80", "240.240.12.7:80", echo80},
		{"80", "greeter.shop.svc.clusterset.local", greeter80},
		{"80", "greeter.shop.svc.clusterset.local:8080", ""},
		{"80", "db.shop.svc.clusterset.local", ""},
		{"9090", "greeter.shop.svc.clusterset.local:9090", greeter9090},
		{"9090", "greeter.shop.svc.clusterset.local", greeter9090},
		{"explicit", "greeter.shop.svc.clusterset.local:9090", greeter9090},
		{"explicit", "greeter.shop.svc.clusterset.local", greeter80},
		{"explicit", "echo.demo.svc.clusterset.local:80", echo80},
		{"explicit", "240.240.12.7", ""},
	} {
		vh := sc.Route(tc.route).VirtualHost(tc.authority)
		if tc.cluster == "" {
			require.Nil(t, vh, "%s %s", tc.route, tc.authority)
			continue
		}
		require.NotNil(t, vh, "%s %s", tc.route, tc.authority)
		route := vh.Route("/any/path")
		require.Equal(t, &Route{Prefix: "/", Cluster: tc.cluster, Timeout: 0}, route)
	}
	require.Equal(t, VirtualHost{
		Name:    "echo.demo.svc.clusterset.local:80",
		Domains: []string{"echo.demo.svc.clusterset.local", "echo.demo.svc.clusterset.local:80", "240.240.12.7", "240.240.12.7:80"},
		Routes:  []Route{{Prefix: "/", Cluster: echo80}},
	}, sc.Routes["80"].VirtualHosts[0])

	// The inbound listener.
	in := sc.Inbound
	require.EqualValues(t, 15006, in.Port)
	tlsCtx := &DownstreamTLS{CertSecret: "default", ValidationSecret: "ROOTCA"}
	require.Len(t, in.Chains, 2)
	httpIn := in.Chains[0]
	require.Equal(t, []string{"istio-http/1.1", "istio-h2"}, httpIn.ALPN)
	require.Equal(t, tlsCtx, httpIn.TLS)
	require.Equal(t, "inbound", httpIn.HTTP.StatPrefix)
	require.Equal(t, SanitizeSet, httpIn.HTTP.ForwardClientCert)
	require.True(t, httpIn.HTTP.SetClientCertURI)
	require.Equal(t, &Route{Prefix: "/", Cluster: InboundPassthroughCluster},
		httpIn.HTTP.Routes.VirtualHost("echo.demo.svc.cluster.local:8080").Route("/"))
	require.Equal(t, InboundChain{TLS: tlsCtx, TCP: tcp(InboundPassthroughCluster)}, in.Chains[1])
	require.Same(t, &in.Chains[0], in.Match(8080, []string{"istio-h2"}))
	require.Same(t, &in.Chains[1], in.Match(8080, []string{"istio"}))

	// Clusters.
	require.Equal(t, Cluster{Name: PassthroughCluster, Type: OriginalDst, ConnectTimeout: time.Second}, cfg.Clusters[PassthroughCluster])
	require.Equal(t, Cluster{Name: InboundPassthroughCluster, Type: OriginalDst, ConnectTimeout: time.Second, UpstreamHTTP: UpstreamHTTPDownstream},
		cfg.Clusters[InboundPassthroughCluster])
	eu := func(zone string) Locality { return Locality{Region: "eu", Zone: zone} }
	local := []Endpoint{
		{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Port: 8080, Healthy: true, Locality: eu("eu-a")},
		{Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Port: 8080, Healthy: false, Locality: eu("eu-a")},
		{Addr: netip.MustParseAddrPort("10.1.1.1:8080"), Port: 8080, Healthy: true, Locality: eu("eu-b")},
	}
	peer := []Endpoint{{Addr: netip.MustParseAddrPort("192.0.2.10:15443"), Port: 15443, Healthy: true, Locality: eu("eu-c")}}
	require.Equal(t, Cluster{
		Name: echo80, Type: EDS, ServiceName: echo80, ConnectTimeout: time.Second,
		Endpoints: append(slices.Clone(local), peer...),
		Priorities: []Priority{
			{Localities: []LocalityEndpoints{{Locality: eu("eu-a"), Weight: 1, Endpoints: local[:2]}, {Locality: eu("eu-b"), Weight: 1, Endpoints: local[2:]}}},
			{Localities: []LocalityEndpoints{{Locality: eu("eu-c"), Weight: 3, Endpoints: peer}}},
		},
		OverprovisioningFactor: 100000,
		Service:                &ServiceMeta{Host: "echo.demo.svc.clusterset.local", VIP: vip("240.240.12.7"), Port: 80, Protocol: ProtocolHTTP},
		TLS: &UpstreamTLS{
			SNI: "outbound_.80_._.echo.demo.svc.cluster.local", CertSecret: "default", ValidationSecret: "ROOTCA",
			SANs: []spiffeid.ID{spiffeid.RequireFromString("spiffe://alpha.mesh/ns/demo/sa/echo"), spiffeid.RequireFromString("spiffe://beta.mesh/ns/demo/sa/echo")},
			ALPN: []string{"istio-http/1.1", "istio-h2"},
		},
		UpstreamHTTP: UpstreamHTTP1,
	}, cfg.Clusters[echo80])
	require.Equal(t, UpstreamHTTP2, cfg.Clusters[greeter9090].UpstreamHTTP)
	dbc := cfg.Clusters[db]
	require.Equal(t, &ServiceMeta{Host: "db.shop.svc.clusterset.local", VIP: vip("240.240.3.9"), Port: 5432, Protocol: ProtocolTCP}, dbc.Service)
	require.Equal(t, UpstreamHTTPNone, dbc.UpstreamHTTP)
	require.Equal(t, []string{"istio"}, dbc.TLS.ALPN)
	require.Equal(t, []Priority{{Localities: []LocalityEndpoints{{Weight: 1, Endpoints: dbc.Endpoints}}}}, dbc.Priorities)

	// The DNS name table.
	for host, want := range map[string]string{
		"echo.demo.svc.clusterset.local":     "240.240.12.7",
		"greeter.shop.svc.clusterset.local.": "240.240.40.2",
		"DB.shop.svc.clusterset.local":       "240.240.3.9",
	} {
		got, ok := sc.LookupHost(host)
		require.True(t, ok, host)
		require.Equal(t, vip(want), got, host)
	}
	_, ok := sc.LookupHost("echo.demo.svc.cluster.local")
	require.False(t, ok)
	host, ok := sc.LookupVIP(vip("240.240.40.2"))
	require.True(t, ok)
	require.Equal(t, "greeter.shop.svc.clusterset.local", host)
	require.Equal(t, 3, sc.Hosts())
	require.NotNil(t, cfg.Bundles)

	// The same resources in another order decode the same.
	res := r.anys(t)
	slices.Reverse(res)
	again, err := DecodeRole(RoleSidecar, res...)
	require.NoError(t, err)
	require.Equal(t, cfg.Sidecar, again.Sidecar)
	require.Equal(t, cfg.Clusters, again.Clusters)
}

func TestSidecarDecodeAcceptsEnvoyDefaults(t *testing.T) {
	m := newSidecarMutable(t)
	cla := m.clas[scEcho.cluster(80)]
	cla.Policy = nil
	cla.Endpoints[2].LoadBalancingWeight = nil
	m.out.ListenerFilters[0].ConfigType = nil
	editFilter(t, m.out.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) {
		h.HttpFilters[0].ConfigType = nil
		h.GetRds().GetConfigSource().ResourceApiVersion = corev3.ApiVersion_AUTO
	})
	m.routes["80"].VirtualHosts[0].Routes[0].GetRoute().Timeout = nil
	editFilter(t, m.in.FilterChains[0].Filters[0], func(h *hcmv3.HttpConnectionManager) {
		h.ForwardClientCertDetails = hcmv3.HttpConnectionManager_SANITIZE
		h.SetCurrentClientCertDetails = nil
	})
	m.clusters[scGreeter.cluster(80)].ConnectTimeout = nil
	cfg, err := m.decode(t)
	require.NoError(t, err)
	c := cfg.Clusters[scEcho.cluster(80)]
	require.EqualValues(t, 140, c.OverprovisioningFactor)
	require.Zero(t, c.Priorities[1].Localities[0].Weight)
	require.Equal(t, 15*time.Second, cfg.Sidecar.Route("80").VirtualHost("echo.demo.svc.clusterset.local").Route("/").Timeout)
	require.Equal(t, Sanitize, cfg.Sidecar.Inbound.Chains[0].HTTP.ForwardClientCert)
	require.False(t, cfg.Sidecar.Inbound.Chains[0].HTTP.SetClientCertURI)
	require.Equal(t, 5*time.Second, cfg.Clusters[scGreeter.cluster(80)].ConnectTimeout)
}

// onPort is a copy of the inbound chain fc matching destination_port
// port.
func onPort(fc *listenerv3.FilterChain, port uint32) *listenerv3.FilterChain {
	c := proto.Clone(fc).(*listenerv3.FilterChain)
	c.FilterChainMatch.DestinationPort = wrapperspb.UInt32(port)
	return c
}

// The inbound chains Istio sends per declared port, before the two
// chains by ALPN: the port's own chain decides, whatever the ALPN.
func TestSidecarDecodeInboundPortChains(t *testing.T) {
	m := newSidecarMutable(t)
	httpPort := onPort(m.in.FilterChains[0], 8080)
	httpPort.FilterChainMatch.ApplicationProtocols = nil
	m.in.FilterChains = append([]*listenerv3.FilterChain{httpPort, onPort(m.in.FilterChains[1], 9000)}, m.in.FilterChains...)
	cfg, err := m.decode(t)
	require.NoError(t, err)
	requireSidecarConsistent(t, cfg)
	in := cfg.Sidecar.Inbound
	require.Len(t, in.Chains, 4)
	for i, want := range []struct {
		port uint16
		alpn []string
		http bool
	}{{8080, nil, true}, {9000, nil, false}, {0, []string{"istio-http/1.1", "istio-h2"}, true}, {0, nil, false}} {
		ch := in.Chains[i]
		require.Equal(t, want.port, ch.Port, "chain %d", i)
		require.Equal(t, want.alpn, ch.ALPN, "chain %d", i)
		require.Equal(t, want.http, ch.HTTP != nil, "chain %d", i)
		require.Equal(t, &DownstreamTLS{CertSecret: "default", ValidationSecret: "ROOTCA"}, ch.TLS)
	}
	require.Equal(t, SanitizeSet, in.Chains[0].HTTP.ForwardClientCert)
	require.Equal(t, InboundPassthroughCluster, in.Chains[1].TCP.Cluster)
	for _, tc := range []struct {
		port uint16
		alpn []string
		want int
	}{
		{8080, []string{"istio"}, 0},
		{8080, nil, 0},
		{8080, []string{"istio-h2"}, 0},
		{9000, []string{"istio-http/1.1"}, 1},
		{9000, nil, 1},
		{8081, []string{"istio-http/1.1"}, 2},
		{8081, []string{"istio"}, 3},
		{8081, nil, 3},
	} {
		require.Same(t, &in.Chains[tc.want], in.Match(tc.port, tc.alpn), "port %d, ALPN %q", tc.port, tc.alpn)
	}
}

// rawChain is a copy of the inbound chain fc made plaintext, as Istio
// sends it for a PERMISSIVE port: transport_protocol "raw_buffer", no
// application_protocols, no transport_socket, the same filters.
func rawChain(fc *listenerv3.FilterChain) *listenerv3.FilterChain {
	c := proto.Clone(fc).(*listenerv3.FilterChain)
	c.FilterChainMatch.TransportProtocol = "raw_buffer"
	c.FilterChainMatch.ApplicationProtocols = nil
	c.TransportSocket = nil
	return c
}

// The plaintext chains a PeerAuthentication PERMISSIVE adds beside the
// TLS ones: matched by destination_port first, then transport_protocol,
// never going back to the chains of any port.
func TestSidecarDecodeInboundPlaintextChains(t *testing.T) {
	m := newSidecarMutable(t)
	require.False(t, func() bool { cfg, err := m.decode(t); require.NoError(t, err); return cfg.Sidecar.Inbound.Plaintext() }(),
		"the contract's chains are all TLS")
	httpTLS, tcpTLS := m.in.FilterChains[0], m.in.FilterChains[1]
	httpPort := onPort(httpTLS, 8080)
	httpPort.FilterChainMatch.ApplicationProtocols = nil
	m.in.FilterChains = []*listenerv3.FilterChain{
		httpPort,                        // 0: 8080, TLS
		onPort(rawChain(httpTLS), 8080), // 1: 8080, plaintext HTTP
		onPort(tcpTLS, 9000),            // 2: 9000, TLS only (STRICT)
		onPort(rawChain(tcpTLS), 9001),  // 3: 9001, plaintext only
		httpTLS,                         // 4: any port, TLS by ALPN
		tcpTLS,                          // 5: any port, TLS
		rawChain(tcpTLS),                // 6: any port, plaintext TCP
	}
	cfg, err := m.decode(t)
	require.NoError(t, err)
	requireSidecarConsistent(t, cfg)
	in := cfg.Sidecar.Inbound
	require.True(t, in.Plaintext())
	require.Len(t, in.Chains, 7)
	for i, want := range []Transport{TransportTLS, TransportRaw, TransportTLS, TransportRaw, TransportTLS, TransportTLS, TransportRaw} {
		require.Equal(t, want, in.Chains[i].Transport(), "chain %d", i)
		require.Equal(t, want == TransportRaw, in.Chains[i].TLS == nil, "chain %d", i)
	}
	require.Equal(t, "raw_buffer", TransportRaw.String())
	raw := in.Chains[1]
	require.Empty(t, raw.ALPN)
	require.Equal(t, SanitizeSet, raw.HTTP.ForwardClientCert, "the same manager as on the TLS chain")
	require.True(t, raw.HTTP.SetClientCertURI)
	require.Equal(t, InboundPassthroughCluster, in.Chains[6].TCP.Cluster)
	for _, tc := range []struct {
		name string
		port uint16
		t    Transport
		alpn []string
		want int // -1: nothing
	}{
		{"permissive port, plaintext", 8080, TransportRaw, nil, 1},
		{"permissive port, TLS", 8080, TransportTLS, []string{"istio-http/1.1"}, 0},
		{"strict port, plaintext: no fallback to any port's", 9000, TransportRaw, nil, -1},
		{"strict port, TLS", 9000, TransportTLS, nil, 2},
		{"plaintext-only port, TLS: no fallback", 9001, TransportTLS, []string{"istio"}, -1},
		{"plaintext-only port, plaintext", 9001, TransportRaw, nil, 3},
		{"undeclared port, plaintext", 8081, TransportRaw, nil, 6},
		{"undeclared port, TLS HTTP", 8081, TransportTLS, []string{"istio-h2"}, 4},
		{"undeclared port, TLS", 8081, TransportTLS, nil, 5},
	} {
		got := in.MatchIndex(tc.port, tc.t, tc.alpn)
		require.Equal(t, tc.want, got, tc.name)
	}

	require.Same(t, &in.Chains[1], in.MatchPlaintext(8080))
	require.Nil(t, in.MatchPlaintext(9000))
	require.Same(t, &in.Chains[0], in.Match(8080, nil), "Match is a TLS connection's")

	// Without a plaintext chain of any port, an undeclared port is
	// STRICT.
	m.in.FilterChains = m.in.FilterChains[:6]
	cfg, err = m.decode(t)
	require.NoError(t, err)
	require.Equal(t, -1, cfg.Sidecar.Inbound.MatchIndex(8081, TransportRaw, nil))
	require.True(t, cfg.Sidecar.Inbound.Plaintext())
}

func TestSidecarDecodeServiceWithoutEndpoints(t *testing.T) {
	m := newSidecarMutable(t)
	m.clas[scDB.cluster(5432)].Endpoints = nil
	cfg, err := m.decode(t)
	require.NoError(t, err)
	c := cfg.Clusters[scDB.cluster(5432)]
	require.Empty(t, c.Endpoints)
	require.Nil(t, c.Priorities)
}

// scMutable is one fresh copy of the sidecar's resources (echo, greeter
// and db) for a case to break.
type scMutable struct {
	out, in  *listenerv3.Listener
	routes   map[string]*routev3.RouteConfiguration
	clusters map[string]*clusterv3.Cluster
	clas     map[string]*endpointv3.ClusterLoadAssignment
	secret   *tlsv3.Secret
}

func newSidecarMutable(tb testing.TB) *scMutable {
	r := buildSidecar(tb, scEcho, scGreeter, scDB)
	m := &scMutable{
		out:      r.listeners[0].(*listenerv3.Listener),
		in:       r.listeners[1].(*listenerv3.Listener),
		routes:   map[string]*routev3.RouteConfiguration{},
		clusters: map[string]*clusterv3.Cluster{},
		clas:     map[string]*endpointv3.ClusterLoadAssignment{},
		secret:   r.secrets[0].(*tlsv3.Secret),
	}
	for _, rc := range r.routes {
		m.routes[rc.(*routev3.RouteConfiguration).Name] = rc.(*routev3.RouteConfiguration)
	}
	for _, c := range r.clusters {
		m.clusters[c.(*clusterv3.Cluster).Name] = c.(*clusterv3.Cluster)
	}
	for _, c := range r.assignments {
		m.clas[c.(*endpointv3.ClusterLoadAssignment).ClusterName] = c.(*endpointv3.ClusterLoadAssignment)
	}
	return m
}

func (m *scMutable) anys(tb testing.TB) []*anypb.Any {
	var out []*anypb.Any
	for _, l := range []*listenerv3.Listener{m.out, m.in} {
		if l != nil {
			out = append(out, mustAny(tb, l))
		}
	}
	for _, k := range slices.Sorted(mapKeys(m.routes)) {
		out = append(out, mustAny(tb, m.routes[k]))
	}
	for _, k := range slices.Sorted(mapKeys(m.clusters)) {
		out = append(out, mustAny(tb, m.clusters[k]))
	}
	for _, k := range slices.Sorted(mapKeys(m.clas)) {
		out = append(out, mustAny(tb, m.clas[k]))
	}
	if m.secret != nil {
		out = append(out, mustAny(tb, m.secret))
	}
	return out
}

func (m *scMutable) decode(tb testing.TB) (*Config, error) {
	return DecodeRole(RoleSidecar, m.anys(tb)...)
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// editTyped unpacks a, lets fn change it, and packs it again.
func editTyped[M proto.Message](tb testing.TB, a *anypb.Any, fn func(M)) *anypb.Any {
	tb.Helper()
	msg, err := a.UnmarshalNew()
	require.NoError(tb, err)
	fn(msg.(M))
	return mustAny(tb, msg)
}

func editFilter[M proto.Message](tb testing.TB, f *listenerv3.Filter, fn func(M)) {
	f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: editTyped(tb, f.GetTypedConfig(), fn)}
}

func editSocket[M proto.Message](tb testing.TB, ts *corev3.TransportSocket, fn func(M)) {
	ts.ConfigType = &corev3.TransportSocket_TypedConfig{TypedConfig: editTyped(tb, ts.GetTypedConfig(), fn)}
}

// setHTTPOptions replaces cluster's HttpProtocolOptions with a.
func setHTTPOptions(tb testing.TB, m *scMutable, cluster string, a *anypb.Any) {
	tb.Helper()
	c, ok := m.clusters[cluster]
	require.True(tb, ok, cluster)
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpProtocolOptionsKey: a}
}

// explicitHTTP is the HttpProtocolOptions with explicit_http_config e.
func explicitHTTP(tb testing.TB, e *httpv3.HttpProtocolOptions_ExplicitHttpConfig) *anypb.Any {
	return mustAny(tb, &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: e}})
}

// concatHTTPOptions is the HttpProtocolOptions of first and then last,
// encoded one after the other: what proto.Unmarshal reads as their merge.
func concatHTTPOptions(first, last map[string]*anypb.Any) *anypb.Any {
	a := proto.Clone(first[httpProtocolOptionsKey]).(*anypb.Any)
	a.Value = append(a.Value, last[httpProtocolOptionsKey].GetValue()...)
	return a
}

func editMeta(tb testing.TB, c *clusterv3.Cluster, fn func(map[string]*structpb.Value)) {
	fn(c.Metadata.FilterMetadata["isthmus"].Fields)
}

func TestSidecarDecodeRefusesWhatTheContractDoesNotDescribe(t *testing.T) {
	const (
		out = `listener "outbound": `
		in  = `listener "inbound": `
	)
	var (
		echo80  = scEcho.cluster(80)
		db      = scDB.cluster(5432)
		echoCl  = `cluster "` + echo80 + `": `
		dbCl    = `cluster "` + db + `": `
		passCl  = `cluster "` + PassthroughCluster + `": `
		echoCLA = `cluster_load_assignment "` + echo80 + `": `
		rt80    = `route_configuration "80": `
		hcm     = `filter_chains[0].filters[0].typed_config.`
		inTLS   = `filter_chains[0].transport_socket.typed_config.`
		upTLS   = `transport_socket.typed_config.common_tls_context.`
		// httpOpts is the path of the HttpProtocolOptions.
		httpOpts = `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]`
	)
	outHCM := func(t *testing.T, m *scMutable, fn func(*hcmv3.HttpConnectionManager)) {
		editFilter(t, m.out.FilterChains[0].Filters[0], fn)
	}
	inHCM := func(t *testing.T, m *scMutable, fn func(*hcmv3.HttpConnectionManager)) {
		editFilter(t, m.in.FilterChains[0].Filters[0], fn)
	}
	inTLSCtx := func(t *testing.T, m *scMutable, fn func(*tlsv3.DownstreamTlsContext)) {
		editSocket(t, m.in.FilterChains[0].TransportSocket, fn)
	}
	upTLSCtx := func(t *testing.T, m *scMutable, fn func(*tlsv3.UpstreamTlsContext)) {
		editSocket(t, m.clusters[echo80].TransportSocket, fn)
	}
	firstSAN := func(u *tlsv3.UpstreamTlsContext) *tlsv3.SubjectAltNameMatcher {
		return u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0]
	}
	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T, m *scMutable)
		want   []string
	}{
		// Listeners.
		{"unknown listener", func(t *testing.T, m *scMutable) {
			m.in.Name = "virtualInbound"
		}, []string{`listener "virtualInbound": name: unsupported listener "virtualInbound" (a sidecar has "outbound" and "inbound")`}},
		{"missing inbound listener", func(t *testing.T, m *scMutable) {
			m.in = nil
		}, []string{`listener "inbound": is missing from the response: a sidecar needs both outbound and inbound`}},
		{"two outbound listeners", func(t *testing.T, m *scMutable) {
			m.in = proto.Clone(m.out).(*listenerv3.Listener)
		}, []string{out + `name: duplicate listener name in the response`}},
		{"outbound without original_dst", func(t *testing.T, m *scMutable) {
			m.out.ListenerFilters = nil
		}, []string{out + `listener_filters: want exactly one envoy.filters.listener.original_dst, got 0`}},
		{"outbound with tls_inspector", func(t *testing.T, m *scMutable) {
			m.out.ListenerFilters = m.in.ListenerFilters
		}, []string{out + `listener_filters[1].name: unsupported listener filter "envoy.filters.listener.tls_inspector" (only envoy.filters.listener.original_dst)`}},
		{"use_original_dst", func(t *testing.T, m *scMutable) {
			m.out.UseOriginalDst = wrapperspb.Bool(true)
		}, []string{out + `use_original_dst: not supported`}},
		{"chain without a port", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].FilterChainMatch.DestinationPort = nil
		}, []string{out + `filter_chains[0].filter_chain_match.destination_port: is missing`}},
		{"chain without a match", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[2].FilterChainMatch = nil
		}, []string{out + `filter_chains[2].filter_chain_match: is missing: every outbound chain matches a destination port`}},
		{"a /24 prefix range", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].FilterChainMatch.PrefixRanges[0].PrefixLen = wrapperspb.UInt32(24)
		}, []string{out + `filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len: /24 is not supported: a prefix range is one address (/32)`}},
		{"a prefix range without length", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].FilterChainMatch.PrefixRanges[0].PrefixLen = nil
		}, []string{out + `filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len: /0 is not supported`}},
		{"a prefix range that is a name", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].FilterChainMatch.PrefixRanges[0].AddressPrefix = "echo.demo"
		}, []string{out + `filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix: "echo.demo" is not an IP address`}},
		{"match on server names", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].FilterChainMatch.ServerNames = []string{"echo"}
		}, []string{out + `filter_chains[0].filter_chain_match.server_names: not supported`}},
		{"match on source", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].FilterChainMatch.SourcePrefixRanges = []*corev3.CidrRange{hostRange("10.0.0.1")}
		}, []string{out + `filter_chains[0].filter_chain_match.source_prefix_ranges: not supported`}},
		{"one VIP and port in two chains", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[3].FilterChainMatch.DestinationPort = wrapperspb.UInt32(80)
		}, []string{out + `filter_chains[3].filter_chain_match.prefix_ranges[0]: 240.240.12.7:80 is also matched by filter_chains[0]`}},
		{"two any-address chains on one port", func(t *testing.T, m *scMutable) {
			m.out.FilterChains = append(m.out.FilterChains, m.out.FilterChains[4])
		}, []string{out + `filter_chains[5].filter_chain_match: destination_port 15001 with any address is also matched by filter_chains[4]`}},
		{"no default chain", func(t *testing.T, m *scMutable) {
			m.out.DefaultFilterChain = nil
		}, []string{out + `default_filter_chain: is missing (want a tcp_proxy to PassthroughCluster)`}},
		{"HTTP default chain", func(t *testing.T, m *scMutable) {
			m.out.DefaultFilterChain.Filters = m.out.FilterChains[0].Filters
		}, []string{out + `default_filter_chain.filters[0].name: unsupported network filter "envoy.filters.network.http_connection_manager" (only envoy.filters.network.tcp_proxy)`}},
		{"default chain with a match", func(t *testing.T, m *scMutable) {
			m.out.DefaultFilterChain.FilterChainMatch = &listenerv3.FilterChainMatch{}
		}, []string{out + `default_filter_chain.filter_chain_match: not supported`}},
		{"chain with TLS outbound", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[0].TransportSocket = m.in.FilterChains[0].TransportSocket
		}, []string{out + `filter_chains[0].transport_socket: not supported`}},
		{"two network filters", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[2].Filters = append(m.out.FilterChains[2].Filters, m.out.FilterChains[3].Filters...)
		}, []string{out + `filter_chains[2].filters: want exactly one envoy.filters.network.http_connection_manager or envoy.filters.network.tcp_proxy, got 2 filters`}},
		{"redis", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[2].Filters[0].Name = "envoy.filters.network.redis_proxy"
		}, []string{out + `filter_chains[2].filters[0].name: unsupported network filter "envoy.filters.network.redis_proxy" (only envoy.filters.network.http_connection_manager or envoy.filters.network.tcp_proxy)`}},
		{"HCM name, tcp_proxy config", func(t *testing.T, m *scMutable) {
			m.out.FilterChains[2].Filters[0].Name = "envoy.filters.network.http_connection_manager"
		}, []string{out + `filter_chains[2].filters[0].typed_config: unsupported type "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" (want type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager)`}},
		{"HTTP/2 only codec", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) { h.CodecType = hcmv3.HttpConnectionManager_HTTP2 })
		}, []string{out + hcm + `codec_type: HTTP2 is not supported (AUTO)`}},
		{"inline routes on a chain of two addresses", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.RouteSpecifier = &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: m.routes["80"]}
			})
		}, []string{out + `filter_chains[0].filters[0].typed_config.route_config: an inline route is for the chain of one address (an in-cluster service's port), not of 2`}},
		{"RDS from a file", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.GetRds().ConfigSource = &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_PathConfigSource{PathConfigSource: &corev3.PathConfigSource{Path: "/etc/rds.yaml"}}}
			})
		}, []string{out + hcm + `rds.config_source: only ads {} is supported`}},
		{"RDS without a name", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) { h.GetRds().RouteConfigName = "" })
		}, []string{out + hcm + `rds.route_config_name: is empty`}},
		{"fault filter", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.HttpFilters = append([]*hcmv3.HttpFilter{{Name: "envoy.filters.http.fault",
					ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &faultv3.HTTPFault{})}}}, h.HttpFilters...)
			})
		}, []string{out + hcm + `http_filters: want exactly one envoy.filters.http.router, got 2 filters`,
			hcm + `http_filters[0].name: unsupported HTTP filter "envoy.filters.http.fault" (only envoy.filters.http.router)`}},
		{"router option", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.HttpFilters[0].ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &routerv3.Router{SuppressEnvoyHeaders: true})}
			})
		}, []string{out + hcm + `http_filters[0].typed_config.suppress_envoy_headers: not supported`}},
		{"use_remote_address", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) { h.UseRemoteAddress = wrapperspb.Bool(true) })
		}, []string{out + hcm + `use_remote_address: not supported`}},
		{"XFCC outbound", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.ForwardClientCertDetails = hcmv3.HttpConnectionManager_SANITIZE_SET
			})
		}, []string{out + hcm + `forward_client_cert_details: not supported`}},
		{"idle timeout disabled", func(t *testing.T, m *scMutable) {
			editFilter(t, m.out.FilterChains[2].Filters[0], func(tp *tcpproxyv3.TcpProxy) { tp.IdleTimeout = durationpb.New(0) })
		}, []string{out + `filter_chains[2].filters[0].typed_config.idle_timeout: 0s is not above zero`}},

		// The inbound listener.
		{"inbound without tls_inspector", func(t *testing.T, m *scMutable) {
			m.in.ListenerFilters = m.out.ListenerFilters
		}, []string{in + `listener_filters: want exactly one envoy.filters.listener.original_dst and one envoy.filters.listener.tls_inspector, got 1 and 0`}},
		{"inbound without original_dst", func(t *testing.T, m *scMutable) {
			m.in.ListenerFilters = m.in.ListenerFilters[1:]
		}, []string{in + `listener_filters: want exactly one envoy.filters.listener.original_dst and one envoy.filters.listener.tls_inspector, got 0 and 1`}},
		{"inbound http_inspector", func(t *testing.T, m *scMutable) {
			m.in.ListenerFilters[1].Name = "envoy.filters.listener.http_inspector"
			m.in.ListenerFilters[1].ConfigType = nil
		}, []string{in + `listener_filters[1].name: unsupported listener filter "envoy.filters.listener.http_inspector" (only envoy.filters.listener.original_dst and envoy.filters.listener.tls_inspector)`}},
		{"tls_inspector option", func(t *testing.T, m *scMutable) {
			m.in.ListenerFilters[1].ConfigType = &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(t, &tlsinspectorv3.TlsInspector{EnableJa3Fingerprinting: wrapperspb.Bool(true)})}
		}, []string{in + `listener_filters[1].typed_config.enable_ja3_fingerprinting: not supported`}},
		{"inbound default chain", func(t *testing.T, m *scMutable) {
			m.in.DefaultFilterChain = m.in.FilterChains[1]
		}, []string{in + `default_filter_chain: not supported`}},
		{"no inbound chains", func(t *testing.T, m *scMutable) {
			m.in.FilterChains = nil
		}, []string{in + `filter_chains: is empty`}},
		{"tls chain without TLS", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].TransportSocket = nil
		}, []string{in + `filter_chains[1].transport_socket: is missing: a "tls" chain terminates mTLS`}},
		{"raw_buffer chain with TLS", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].FilterChainMatch.TransportProtocol = "raw_buffer"
		}, []string{in + `filter_chains[1].transport_socket: is set on a "raw_buffer" chain: its connections are plaintext`}},
		{"raw_buffer chain with ALPN", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[0].FilterChainMatch.TransportProtocol = "raw_buffer"
			m.in.FilterChains[0].TransportSocket = nil
		}, []string{in + `filter_chains[0].filter_chain_match.application_protocols: is set on a "raw_buffer" chain: a plaintext connection offers no application protocol`}},
		{"two raw_buffer chains of a port", func(t *testing.T, m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, onPort(rawChain(m.in.FilterChains[1]), 9000), onPort(rawChain(m.in.FilterChains[0]), 9000))
		}, []string{in + `filter_chains[3].filter_chain_match.transport_protocol: "raw_buffer" is also matched by filter_chains[2] of the same destination port: two chains match the same connections`}},
		{"two raw_buffer chains of any port", func(t *testing.T, m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, rawChain(m.in.FilterChains[1]), rawChain(m.in.FilterChains[0]))
		}, []string{in + `filter_chains[3].filter_chain_match.transport_protocol: "raw_buffer" is also matched by filter_chains[2] of the same destination port: two chains match the same connections`}},
		{"no transport_protocol", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].FilterChainMatch.TransportProtocol = ""
		}, []string{in + `filter_chains[1].filter_chain_match.transport_protocol: "" is not supported: an inbound chain is mTLS ("tls") or plaintext ("raw_buffer")`}},
		{"another transport_protocol", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].FilterChainMatch.TransportProtocol = "quic"
		}, []string{in + `filter_chains[1].filter_chain_match.transport_protocol: "quic" is not supported: an inbound chain is mTLS ("tls") or plaintext ("raw_buffer")`}},
		{"client certificate optional beside a raw_buffer chain", func(t *testing.T, m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, rawChain(m.in.FilterChains[1]))
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) { d.RequireClientCertificate = nil })
		}, []string{in + inTLS + `require_client_certificate: must be true: every caller presents its SVID`}},
		{"inbound port 0", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].FilterChainMatch.DestinationPort = wrapperspb.UInt32(0)
		}, []string{in + `filter_chains[1].filter_chain_match.destination_port: 0 is not a port`}},
		{"inbound port above 65535", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[0].FilterChainMatch.DestinationPort = wrapperspb.UInt32(65536 + 8080)
		}, []string{in + `filter_chains[0].filter_chain_match.destination_port: 73616 is not a port`}},
		{"inbound match on a source", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].FilterChainMatch.SourcePorts = []uint32{8080}
		}, []string{in + `filter_chains[1].filter_chain_match.source_ports: not supported`}},
		{"one ALPN in two chains of a port", func(t *testing.T, m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, onPort(m.in.FilterChains[0], 8080), onPort(m.in.FilterChains[0], 8080))
		}, []string{in + `filter_chains[3].filter_chain_match.application_protocols[0]: "istio-http/1.1" is also matched by filter_chains[2]`}},
		{"two catch-all chains of a port", func(t *testing.T, m *scMutable) {
			m.in.FilterChains = append(m.in.FilterChains, onPort(m.in.FilterChains[1], 9000), onPort(m.in.FilterChains[1], 9000))
		}, []string{in + `filter_chains[3].filter_chain_match.application_protocols: is empty, as in filter_chains[2]: two chains match the same connections`}},
		{"one ALPN in two chains", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[1].FilterChainMatch.ApplicationProtocols = []string{"istio", "istio-h2"}
		}, []string{in + `filter_chains[1].filter_chain_match.application_protocols[1]: "istio-h2" is also matched by filter_chains[0]`}},
		{"two catch-all chains", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[0].FilterChainMatch.ApplicationProtocols = nil
		}, []string{in + `filter_chains[1].filter_chain_match.application_protocols: is empty, as in filter_chains[0]: two chains match the same connections`}},
		{"client certificate optional", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) { d.RequireClientCertificate = nil })
		}, []string{in + inTLS + `require_client_certificate: must be true: every caller presents its SVID`}},
		{"another certificate", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].Name = "spiffe://alpha.mesh/ns/demo/sa/echo"
			})
		}, []string{in + inTLS + `common_tls_context.tls_certificate_sds_secret_configs[0].name: "spiffe://alpha.mesh/ns/demo/sa/echo" is not supported: a sidecar's only certificate is "default", its own SVID`}},
		{"certificate fetched over SDS", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].SdsConfig = adsSource
			})
		}, []string{in + inTLS + `common_tls_context.tls_certificate_sds_secret_configs[0].sds_config: not supported: the sidecar's own SVID is made in the pod, never fetched`}},
		{"inline certificate", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.TlsCertificates = []*tlsv3.TlsCertificate{{}}
				d.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil
			})
		}, []string{in + inTLS + `common_tls_context.tls_certificates: not supported`, inTLS + `common_tls_context.tls_certificate_sds_secret_configs: want exactly one {name: "default"}, got 0`}},
		{"ROOTCA from a static secret", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.GetValidationContextSdsSecretConfig().SdsConfig = nil
			})
		}, []string{in + inTLS + `common_tls_context.validation_context_sds_secret_config.sds_config: is missing (want ads {})`}},
		{"another validation secret", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.GetValidationContextSdsSecretConfig().Name = "beta"
			})
		}, []string{in + inTLS + `common_tls_context.validation_context_sds_secret_config.name: "beta" is not served: the trust bundles are "ROOTCA"`}},
		{"inline validation context", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{}}
			})
		}, []string{in + inTLS + `common_tls_context.validation_context: not supported`, inTLS + `common_tls_context.validation_context_sds_secret_config: is missing`}},
		{"OCSP policy", func(t *testing.T, m *scMutable) {
			inTLSCtx(t, m, func(d *tlsv3.DownstreamTlsContext) { d.OcspStaplePolicy = tlsv3.DownstreamTlsContext_MUST_STAPLE })
		}, []string{in + inTLS + `ocsp_staple_policy: not supported`}},
		{"raw_buffer socket", func(t *testing.T, m *scMutable) {
			m.in.FilterChains[0].TransportSocket.Name = "envoy.transport_sockets.raw_buffer"
		}, []string{in + `filter_chains[0].transport_socket.name: unsupported transport socket "envoy.transport_sockets.raw_buffer" (only envoy.transport_sockets.tls)`}},
		{"XFCC forwarded", func(t *testing.T, m *scMutable) {
			inHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.ForwardClientCertDetails = hcmv3.HttpConnectionManager_APPEND_FORWARD
			})
		}, []string{in + hcm + `forward_client_cert_details: APPEND_FORWARD is not supported (SANITIZE or SANITIZE_SET): the app never sees an XFCC header the caller sent`,
			hcm + `set_current_client_cert_details: is only used with forward_client_cert_details SANITIZE_SET`}},
		{"XFCC subject", func(t *testing.T, m *scMutable) {
			inHCM(t, m, func(h *hcmv3.HttpConnectionManager) { h.SetCurrentClientCertDetails.Subject = wrapperspb.Bool(true) })
		}, []string{in + hcm + `set_current_client_cert_details.subject: not supported`}},
		{"normalize_path outbound", func(t *testing.T, m *scMutable) {
			outHCM(t, m, func(h *hcmv3.HttpConnectionManager) { h.NormalizePath = wrapperspb.Bool(true) })
		}, []string{out + hcm + `normalize_path: not supported`}},
		{"merge_slashes inbound", func(t *testing.T, m *scMutable) {
			inHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.NormalizePath = wrapperspb.Bool(true)
				h.MergeSlashes = true
			})
		}, []string{in + hcm + `merge_slashes: not supported`}},
		{"escaped slashes action inbound", func(t *testing.T, m *scMutable) {
			inHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.NormalizePath = wrapperspb.Bool(true)
				h.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT
			})
		}, []string{in + hcm + `path_with_escaped_slashes_action: not supported`}},
		{"inbound over RDS", func(t *testing.T, m *scMutable) {
			inHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.RouteSpecifier = &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "inbound", ConfigSource: adsSource}}
			})
		}, []string{in + hcm + `rds: not supported`, hcm + `route_config: is missing: the inbound side's routes are inline`}},
		{"inbound route to a header's cluster", func(t *testing.T, m *scMutable) {
			inHCM(t, m, func(h *hcmv3.HttpConnectionManager) {
				h.GetRouteConfig().VirtualHosts[0].Routes[0].GetRoute().ClusterSpecifier = &routev3.RouteAction_ClusterHeader{ClusterHeader: "x-cluster"}
			})
		}, []string{in + hcm + `route_config.virtual_hosts[0].routes[0].route.cluster_header: not supported`, hcm + `route_config.virtual_hosts[0].routes[0].route.cluster: is empty`}},

		// Routes.
		{"wildcard suffix domain", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Domains[0] = "*.demo.svc.clusterset.local"
		}, []string{rt80 + `virtual_hosts[0].domains[0]: "*.demo.svc.clusterset.local": wildcard domains are not supported (only "*" alone)`}},
		{"one domain in two virtual hosts", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[1].Domains[2] = "240.240.12.7"
		}, []string{rt80 + `virtual_hosts[1].domains[2]: "240.240.12.7" is also a domain of virtual_hosts[0]`}},
		{"domains differing in case", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[1].Domains[0] = "ECHO.demo.svc.clusterset.local"
		}, []string{rt80 + `virtual_hosts[1].domains[0]: "echo.demo.svc.clusterset.local" is also a domain of virtual_hosts[0]`}},
		{"two virtual hosts named alike", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[1].Name = m.routes["80"].VirtualHosts[0].Name
		}, []string{rt80 + `virtual_hosts[1].name: "echo.demo.svc.clusterset.local:80" is also the name of virtual_hosts[0]`}},
		{"domain with an empty port", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Domains[0] = "echo.demo.svc.clusterset.local:"
		}, []string{rt80 + `virtual_hosts[0].domains[0]: "echo.demo.svc.clusterset.local:": empty port`}},
		{"domain with a bad port", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Domains[0] = "echo.demo.svc.clusterset.local:080"
		}, []string{rt80 + `virtual_hosts[0].domains[0]: "echo.demo.svc.clusterset.local:080": "080" is not a port`}},
		{"no domains", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Domains = nil
		}, []string{rt80 + `virtual_hosts[0].domains: is empty`}},
		{"no routes", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes = nil
		}, []string{rt80 + `virtual_hosts[0].routes: is empty`}},
		{"TLS required", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].RequireTls = routev3.VirtualHost_ALL
		}, []string{rt80 + `virtual_hosts[0].require_tls: not supported`}},
		{"regex match", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].Match.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: ".*"}}
		}, []string{rt80 + `virtual_hosts[0].routes[0].match.safe_regex: not supported`}},
		{"header match", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].Match.Headers = []*routev3.HeaderMatcher{{Name: "x-canary"}}
		}, []string{rt80 + `virtual_hosts[0].routes[0].match.headers: not supported`}},
		{"relative prefix", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].Match.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: "api"}
		}, []string{rt80 + `virtual_hosts[0].routes[0].match.prefix: "api" does not start with /`}},
		{"weighted clusters", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].GetRoute().ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{
				Clusters: []*routev3.WeightedCluster_ClusterWeight{{Name: echo80, Weight: wrapperspb.UInt32(1)}}}}
		}, []string{rt80 + `virtual_hosts[0].routes[0].route.weighted_clusters: not supported`}},
		{"retries", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].GetRoute().RetryPolicy = &routev3.RetryPolicy{RetryOn: "5xx"}
		}, []string{rt80 + `virtual_hosts[0].routes[0].route.retry_policy: not supported`}},
		{"redirect", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].Action = &routev3.Route_Redirect{Redirect: &routev3.RedirectAction{}}
		}, []string{rt80 + `virtual_hosts[0].routes[0].redirect: not supported`, `virtual_hosts[0].routes[0].route: is missing`}},
		{"negative timeout", func(t *testing.T, m *scMutable) {
			m.routes["80"].VirtualHosts[0].Routes[0].GetRoute().Timeout = durationpb.New(-time.Second)
		}, []string{rt80 + `virtual_hosts[0].routes[0].route.timeout: -1s is negative`}},
		{"request headers added", func(t *testing.T, m *scMutable) {
			m.routes["80"].RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x", Value: "y"}}}
		}, []string{rt80 + `request_headers_to_add: not supported`}},
		{"unnamed route configuration", func(t *testing.T, m *scMutable) {
			m.routes["80"].Name = ""
		}, []string{`route_configuration #0: name: is empty`}},

		// Clusters.
		{"STATIC cluster", func(t *testing.T, m *scMutable) {
			m.clusters[db].ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC}
		}, []string{dbCl + `type: STATIC is not supported (EDS or ORIGINAL_DST)`}},
		{"passthrough round robin", func(t *testing.T, m *scMutable) {
			m.clusters[PassthroughCluster].LbPolicy = clusterv3.Cluster_ROUND_ROBIN
		}, []string{passCl + `lb_policy: ROUND_ROBIN is not supported with ORIGINAL_DST (CLUSTER_PROVIDED)`}},
		{"passthrough with TLS", func(t *testing.T, m *scMutable) {
			m.clusters[PassthroughCluster].TransportSocket = m.clusters[db].TransportSocket
		}, []string{passCl + `transport_socket: not supported`}},
		{"passthrough with metadata", func(t *testing.T, m *scMutable) {
			m.clusters[PassthroughCluster].Metadata = m.clusters[db].Metadata
		}, []string{passCl + `metadata: not supported`}},
		{"original_dst_lb_config", func(t *testing.T, m *scMutable) {
			m.clusters[PassthroughCluster].LbConfig = &clusterv3.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &clusterv3.Cluster_OriginalDstLbConfig{UseHttpHeader: true}}
		}, []string{passCl + `original_dst_lb_config: not supported`}},
		{"no common_lb_config", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].CommonLbConfig = nil
		}, []string{echoCl + `common_lb_config: is missing (want {healthy_panic_threshold: {value: 0}, locality_weighted_lb_config: {}}`}},
		{"panic routing", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].CommonLbConfig.HealthyPanicThreshold.Value = 50
		}, []string{echoCl + `common_lb_config.healthy_panic_threshold.value: 50 is not supported (0: no panic routing)`}},
		{"Envoy's panic threshold", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].CommonLbConfig.HealthyPanicThreshold = nil
		}, []string{echoCl + `common_lb_config.healthy_panic_threshold: is missing: Envoy's default of 50% routes to unhealthy endpoints in panic`}},
		{"zone-aware balancing", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].CommonLbConfig.LocalityConfigSpecifier = &clusterv3.Cluster_CommonLbConfig_ZoneAwareLbConfig_{ZoneAwareLbConfig: &clusterv3.Cluster_CommonLbConfig_ZoneAwareLbConfig{}}
		}, []string{echoCl + `common_lb_config.zone_aware_lb_config: not supported`, `common_lb_config.locality_weighted_lb_config: is missing: the sidecar weighs localities by load_balancing_weight`}},
		{"slow start", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].CommonLbConfig.UpdateMergeWindow = durationpb.New(time.Second)
		}, []string{echoCl + `common_lb_config.update_merge_window: not supported`}},
		{"least request", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].LbPolicy = clusterv3.Cluster_LEAST_REQUEST
		}, []string{echoCl + `lb_policy: LEAST_REQUEST is not supported (ROUND_ROBIN)`}},
		{"outlier detection", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].OutlierDetection = &clusterv3.OutlierDetection{}
		}, []string{echoCl + `outlier_detection: not supported`}},
		{"no metadata", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].Metadata = nil
		}, []string{echoCl + `metadata: is missing: a service cluster carries filter_metadata["isthmus"] {host, vip, port, protocol}`}},
		{"istio metadata", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].Metadata.FilterMetadata["istio"] = &structpb.Struct{}
		}, []string{echoCl + `metadata.filter_metadata["istio"]: not supported (only "isthmus")`}},
		{"typed metadata", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].Metadata.TypedFilterMetadata = map[string]*anypb.Any{"isthmus": mustAny(t, &structpb.Struct{})}
		}, []string{echoCl + `metadata.typed_filter_metadata: not supported`}},
		{"metadata without a VIP", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { delete(f, "vip") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].vip: is missing`}},
		{"metadata port as a string", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["port"] = structpb.NewStringValue("80") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].port: is not a number`}},
		{"metadata port out of range", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["port"] = structpb.NewNumberValue(80.5) })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].port: 80.5 is not a port`}},
		{"metadata protocol UDP", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["protocol"] = structpb.NewStringValue("UDP") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].protocol: "UDP" is not supported (HTTP or TCP)`}},
		{"metadata VIP not an address", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["vip"] = structpb.NewStringValue("echo") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].vip: "echo" is not an IP address`}},
		{"metadata host not a name", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["host"] = structpb.NewStringValue("echo demo") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].host: "echo demo" is not a DNS name`}},
		{"metadata host of one label", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["host"] = structpb.NewStringValue("echo") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].host: "echo" is a single label: a service host is a fully qualified name`}},
		{"metadata VIP unspecified", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["vip"] = structpb.NewStringValue("::") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].vip: "::" is the unspecified address, which no connection is made to`}},
		{"metadata extra field", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[echo80], func(f map[string]*structpb.Value) { f["weight"] = structpb.NewNumberValue(1) })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].weight: not supported (host, vip, port, protocol)`}},
		{"one host, two VIPs", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[scEcho.cluster(9000)], func(f map[string]*structpb.Value) { f["vip"] = structpb.NewStringValue("240.240.12.8") })
		}, []string{`cluster "outbound|9000||echo.demo.svc.clusterset.local": metadata.filter_metadata["isthmus"].vip: host "echo.demo.svc.clusterset.local" has VIP 240.240.12.8, but 240.240.12.7 in cluster "outbound|80||echo.demo.svc.clusterset.local"`}},
		{"one VIP, two hosts", func(t *testing.T, m *scMutable) {
			editMeta(t, m.clusters[db], func(f map[string]*structpb.Value) { f["vip"] = structpb.NewStringValue("240.240.12.7") })
		}, []string{echoCl + `metadata.filter_metadata["isthmus"].vip: 240.240.12.7 is also the VIP of host "db.shop.svc.clusterset.local" (cluster "outbound|5432||db.shop.svc.clusterset.local")`}},
		{"plaintext upstream", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].TransportSocket = nil
		}, []string{echoCl + `transport_socket: is missing: sidecars speak mTLS to each other and to gateways`}},
		{"no SNI", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) { u.Sni = "" })
		}, []string{echoCl + `transport_socket.typed_config.sni: "": empty`}},
		{"DNS SAN", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) { firstSAN(u).SanType = tlsv3.SubjectAltNameMatcher_DNS })
		}, []string{echoCl + upTLS + `combined_validation_context.default_validation_context.match_typed_subject_alt_names[0].san_type: DNS is not supported (URI)`}},
		{"prefix SAN", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) {
				firstSAN(u).Matcher = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://alpha.mesh/"}}
			})
		}, []string{echoCl + upTLS + `combined_validation_context.default_validation_context.match_typed_subject_alt_names[0].matcher.prefix: not supported`}},
		{"SAN not a SPIFFE ID", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) {
				firstSAN(u).Matcher = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "https://echo.demo"}}
			})
		}, []string{echoCl + upTLS + `combined_validation_context.default_validation_context.match_typed_subject_alt_names[0].matcher.exact: "https://echo.demo" is not a SPIFFE ID`}},
		{"SAN twice", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) {
				v := u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext
				v.MatchTypedSubjectAltNames = append(v.MatchTypedSubjectAltNames, v.MatchTypedSubjectAltNames[0])
			})
		}, []string{echoCl + upTLS + `combined_validation_context.default_validation_context.match_typed_subject_alt_names[2].matcher.exact: "spiffe://alpha.mesh/ns/demo/sa/echo" is also match_typed_subject_alt_names[0]`}},
		{"inline trusted CA", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) {
				u.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.TrustedCa = &corev3.DataSource{}
			})
		}, []string{echoCl + upTLS + `combined_validation_context.default_validation_context.trusted_ca: not supported`}},
		{"validation without ROOTCA", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) {
				u.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{}}
			})
		}, []string{echoCl + upTLS + `validation_context: not supported`, upTLS + `combined_validation_context: is missing`}},
		{"no ALPN", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) { u.CommonTlsContext.AlpnProtocols = nil })
		}, []string{echoCl + upTLS + `alpn_protocols: is empty`}},
		{"TLS 1.2 only", func(t *testing.T, m *scMutable) {
			upTLSCtx(t, m, func(u *tlsv3.UpstreamTlsContext) { u.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{} })
		}, []string{echoCl + upTLS + `tls_params: not supported`}},
		{"upstream HTTP/3", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, explicitHTTP(t, &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http3ProtocolOptions{Http3ProtocolOptions: &corev3.Http3ProtocolOptions{}}}))
		}, []string{echoCl + httpOpts + `.explicit_http_config.http3_protocol_options: not supported`}},
		{"an HTTP/2 option", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, explicitHTTP(t, &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{
					MaxConcurrentStreams: wrapperspb.UInt32(100)}}}))
		}, []string{echoCl + httpOpts + `.explicit_http_config.http2_protocol_options.max_concurrent_streams: not supported`}},
		{"an HTTP/1.1 option", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, explicitHTTP(t, &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{
					AcceptHttp_10: true}}}))
		}, []string{echoCl + httpOpts + `.explicit_http_config.http_protocol_options.accept_http_10: not supported`}},
		{"a downstream-protocol option", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, mustAny(t, &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
				UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}}}))
		}, []string{echoCl + httpOpts + `.use_downstream_protocol_config.http2_protocol_options: not supported`}},
		{"explicit HTTP without a version", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, explicitHTTP(t, &httpv3.HttpProtocolOptions_ExplicitHttpConfig{}))
		}, []string{echoCl + httpOpts + `.explicit_http_config: sets no HTTP version (want http_protocol_options {} or http2_protocol_options {})`}},
		{"automatic upstream HTTP", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, mustAny(t, &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_AutoConfig{
				AutoConfig: &httpv3.HttpProtocolOptions_AutoHttpConfig{}}}))
		}, []string{echoCl + httpOpts + `.auto_config: not supported`}},
		{"no upstream HTTP version", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, mustAny(t, &httpv3.HttpProtocolOptions{}))
		}, []string{echoCl + httpOpts + `: sets no upstream HTTP version (want explicit_http_config {http_protocol_options {}}, explicit_http_config {http2_protocol_options {}} or use_downstream_protocol_config {})`}},
		{"common HTTP options", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, echo80, mustAny(t, &httpv3.HttpProtocolOptions{
				CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{IdleTimeout: durationpb.New(time.Minute)},
				UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
					UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{}}}))
		}, []string{echoCl + httpOpts + `.common_http_protocol_options: not supported`}},
		{"HTTP port without protocol options", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].TypedExtensionProtocolOptions = nil
		}, []string{echoCl + `typed_extension_protocol_options: want ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] with explicit_http_config {http_protocol_options {}}, explicit_http_config {http2_protocol_options {}} or use_downstream_protocol_config {} for an HTTP port`}},
		{"inbound passthrough with HTTP/3", func(t *testing.T, m *scMutable) {
			setHTTPOptions(t, m, InboundPassthroughCluster, explicitHTTP(t, &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http3ProtocolOptions{Http3ProtocolOptions: &corev3.Http3ProtocolOptions{}}}))
		}, []string{`cluster "inbound-passthrough": ` + httpOpts + `.explicit_http_config.http3_protocol_options: not supported`}},
		{"TCP port with HTTP options", func(t *testing.T, m *scMutable) {
			m.clusters[db].TypedExtensionProtocolOptions = m.clusters[echo80].TypedExtensionProtocolOptions
		}, []string{dbCl + `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]: not supported for a TCP port`}},
		{"other protocol options", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].TypedExtensionProtocolOptions["envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"] = mustAny(t, &structpb.Struct{})
		}, []string{echoCl + `typed_extension_protocol_options["envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"]: not supported (only envoy.extensions.upstreams.http.v3.HttpProtocolOptions)`}},
		{"HTTP protocol options of another type", func(t *testing.T, m *scMutable) {
			m.clusters[echo80].TypedExtensionProtocolOptions["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] = mustAny(t, &structpb.Struct{})
		}, []string{echoCl + `typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]: unsupported type "type.googleapis.com/google.protobuf.Struct"`}},

		// Endpoints.
		{"a gap in the priorities", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Endpoints[2].Priority = 2
		}, []string{echoCLA + `endpoints: no locality has priority 1: priorities are contiguous from 0`}},
		{"no priority 0", func(t *testing.T, m *scMutable) {
			m.clas[scGreeter.cluster(9090)].Endpoints[0].Priority = 1
		}, []string{`cluster_load_assignment "outbound|9090||greeter.shop.svc.clusterset.local": endpoints[0].priority: 1 leaves a priority without localities: priorities are contiguous from 0`}},
		{"zero locality weight", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Endpoints[2].LoadBalancingWeight = wrapperspb.UInt32(0)
		}, []string{echoCLA + `endpoints[2].load_balancing_weight: 0 is not above zero`}},
		{"zero overprovisioning", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Policy.OverprovisioningFactor = wrapperspb.UInt32(0)
		}, []string{echoCLA + `policy.overprovisioning_factor: 0 is not above zero`}},
		{"drop overloads", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Policy.DropOverloads = []*endpointv3.ClusterLoadAssignment_Policy_DropOverload{{Category: "x"}}
		}, []string{echoCLA + `policy.drop_overloads: not supported`}},
		{"weighted endpoint", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Endpoints[0].LbEndpoints[0].LoadBalancingWeight = wrapperspb.UInt32(2)
		}, []string{echoCLA + `endpoints[0].lb_endpoints[0].load_balancing_weight: not supported`}},
		{"named endpoints", func(t *testing.T, m *scMutable) {
			m.clas[echo80].NamedEndpoints = map[string]*endpointv3.Endpoint{"a": {}}
		}, []string{echoCLA + `named_endpoints: not supported`}},
		{"hostname endpoint", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Endpoints[2].LbEndpoints[0].GetEndpoint().Address = socketAddress("gw.beta.example", 15443)
		}, []string{echoCLA + `endpoints[2].lb_endpoints[0].endpoint.address.socket_address.address: "gw.beta.example" is not an IP address`}},
		{"one address twice", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Endpoints[1].LbEndpoints[0].GetEndpoint().Address = socketAddress("10.1.0.2", 8080)
		}, []string{echoCLA + `endpoints[1].lb_endpoints[0].endpoint.address: 10.1.0.2:8080 is also endpoints[0].lb_endpoints[1]: Envoy would keep only the first`}},
		{"locality proximity", func(t *testing.T, m *scMutable) {
			m.clas[echo80].Endpoints[0].Proximity = wrapperspb.UInt32(1)
		}, []string{echoCLA + `endpoints[0].proximity: not supported`}},

		// The Secret keeps the gateway's rules.
		{"a certificate over SDS", func(t *testing.T, m *scMutable) {
			m.secret = &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{}}}
		}, []string{`secret "default": name: "default" is not served`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newSidecarMutable(t)
			tc.mutate(t, m)
			requireNACK(t, m, tc.want...)
		})
	}
}

// Each accepted upstream_protocol_options decodes to its version, on a
// service cluster and on inbound-passthrough alike.
func TestSidecarDecodeUpstreamHTTP(t *testing.T) {
	echo80 := scEcho.cluster(80)
	for _, want := range []UpstreamHTTP{UpstreamHTTPDownstream, UpstreamHTTP1, UpstreamHTTP2} {
		t.Run(want.String(), func(t *testing.T) {
			m := newSidecarMutable(t)
			m.clusters[echo80].TypedExtensionProtocolOptions = httpProtocolOptions(t, want)
			m.clusters[InboundPassthroughCluster].TypedExtensionProtocolOptions = httpProtocolOptions(t, want)
			cfg, err := m.decode(t)
			require.NoError(t, err)
			require.Equal(t, want, cfg.Clusters[echo80].UpstreamHTTP)
			require.Equal(t, want, cfg.Clusters[InboundPassthroughCluster].UpstreamHTTP)
		})
	}
	// Two members of the oneof on the wire: the last one counts, as in
	// protobuf's and so Envoy's reading of it.
	m := newSidecarMutable(t)
	setHTTPOptions(t, m, echo80, concatHTTPOptions(httpProtocolOptions(t, UpstreamHTTP2), httpProtocolOptions(t, UpstreamHTTP1)))
	cfg, err := m.decode(t)
	require.NoError(t, err)
	require.Equal(t, UpstreamHTTP1, cfg.Clusters[echo80].UpstreamHTTP)

	require.Equal(t, "none", UpstreamHTTPNone.String())
	require.Equal(t, "UpstreamHTTP(9)", UpstreamHTTP(9).String())
}

func TestSidecarDecodeIncomplete(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(m *scMutable)
		want   string
	}{
		{"a route configuration missing", func(m *scMutable) { delete(m.routes, "9090") },
			`listener "outbound" names route configuration "9090", which is not there`},
		{"no RDS at all", func(m *scMutable) { m.routes = nil },
			`listener "outbound" names route configuration "80", which is not there`},
		{"a route's cluster missing", func(m *scMutable) { delete(m.clusters, scGreeter.cluster(9090)) },
			`route configuration "9090" names cluster "outbound|9090||greeter.shop.svc.clusterset.local", which is not there`},
		{"a tcp_proxy's cluster missing", func(m *scMutable) { delete(m.clusters, scDB.cluster(5432)) },
			`listener "outbound" names cluster "outbound|5432||db.shop.svc.clusterset.local", which is not there`},
		{"the passthrough cluster missing", func(m *scMutable) { delete(m.clusters, PassthroughCluster) },
			`listener "outbound" names cluster "PassthroughCluster", which is not there`},
		{"the inbound passthrough missing", func(m *scMutable) { delete(m.clusters, InboundPassthroughCluster) },
			`listener "inbound" names cluster "inbound-passthrough", which is not there`},
		{"an assignment missing", func(m *scMutable) { delete(m.clas, scEcho.cluster(80)) },
			`cluster "outbound|80||echo.demo.svc.clusterset.local" has no ClusterLoadAssignment "outbound|80||echo.demo.svc.clusterset.local"`},
		{"no ROOTCA", func(m *scMutable) { m.secret = nil },
			`the TLS contexts name secret "ROOTCA", which is not there`},
		{"no listeners", func(m *scMutable) { m.out, m.in = nil, nil },
			`no listeners or clusters received yet`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newSidecarMutable(t)
			tc.mutate(m)
			var res []*anypb.Any
			if m.out == nil {
				// No LDS response at all: decode the state directly.
				s, err := newState(RoleSidecar)
				require.NoError(t, err)
				for _, typ := range []string{TypeCluster, TypeClusterLoadAssignment} {
					s, err = s.apply(typ, filterType(m.anys(t), typ))
					require.NoError(t, err)
				}
				_, err = s.assemble(nil)
				require.ErrorIs(t, err, ErrIncomplete)
				require.ErrorContains(t, err, tc.want)
				return
			}
			res = m.anys(t)
			cfg, err := DecodeRole(RoleSidecar, res...)
			require.Nil(t, cfg)
			require.ErrorIs(t, err, ErrIncomplete)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func filterType(res []*anypb.Any, typeURL string) []*anypb.Any {
	var out []*anypb.Any
	for _, r := range res {
		if r.GetTypeUrl() == typeURL {
			out = append(out, r)
		}
	}
	return out
}

func TestGatewayRefusesSidecarResources(t *testing.T) {
	r := buildSidecar(t, scEcho)
	_, err := Decode(r.anys(t)...)
	require.ErrorContains(t, err, `resource #2: unsupported type "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"`)
	require.ErrorContains(t, err, `listener_filters[0].name: unsupported listener filter "envoy.filters.listener.original_dst"`)
	require.ErrorContains(t, err, `cluster "PassthroughCluster": type: ORIGINAL_DST is not supported`)
	require.ErrorContains(t, err, `metadata: not supported`)
	require.ErrorContains(t, err, `cluster_load_assignment "outbound|80||echo.demo.svc.clusterset.local": policy: not supported`)

	// And the sidecar refuses the gateway's.
	g := buildGateway(t, "10.0.0.5", echo)
	_, err = DecodeRole(RoleSidecar, g.anys(t)...)
	require.ErrorContains(t, err, `listener "eastwest-gw": name: unsupported listener "eastwest-gw" (a sidecar has "outbound" and "inbound")`)
	require.ErrorContains(t, err, `cluster "isthmus-federation": type: STATIC is not supported (EDS or ORIGINAL_DST)`)
	require.ErrorContains(t, err, `metadata: is missing`)
}

// requireNACK decodes m and checks it is refused as a NACK (not as an
// incomplete configuration) whose message holds every one of want.
func requireNACK(t *testing.T, m *scMutable, want ...string) {
	t.Helper()
	cfg, err := m.decode(t)
	require.Nil(t, cfg)
	require.Error(t, err)
	require.NotErrorIs(t, err, ErrIncomplete)
	for _, w := range want {
		require.Contains(t, nackMessage(err), w)
	}
}
