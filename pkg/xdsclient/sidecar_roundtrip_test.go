package xdsclient

import (
	"crypto/x509"
	"fmt"
	"net/netip"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// The best proof that the translation and the client agree on
// docs/sidecar-xds.md: what xds.TranslateSidecar emits, the sidecar's
// Decode accepts, with every reference resolved.

// translatedAnys is r as one ADS stream carries it, with a ROOTCA for
// a.mesh in the shape the federator serves (secrets_test.go; the SDS
// translation has its own round trip in pkg/xds).
func translatedAnys(t testing.TB, r xds.Resources) []*anypb.Any {
	t.Helper()
	secrets := []*tlsv3.Secret{rootCA(t, map[string][]*x509.Certificate{"a.mesh": {testRoot(t, "a.mesh")}})}
	var ms []proto.Message
	for _, l := range r.Listeners {
		ms = append(ms, l)
	}
	for _, rc := range r.Routes {
		ms = append(ms, rc)
	}
	for _, c := range r.Clusters {
		ms = append(ms, c)
	}
	for _, e := range r.Endpoints {
		ms = append(ms, e)
	}
	for _, s := range secrets {
		ms = append(ms, s)
	}
	out := make([]*anypb.Any, len(ms))
	for i, m := range ms {
		out[i] = mustAny(t, m)
	}
	return out
}

func roundTripCatalog(t testing.TB) (*catalog.Snapshot, []*catalog.Snapshot) {
	t.Helper()
	r1z1 := catalog.Locality{Region: "r1", Zone: "z1"}
	r1z2 := catalog.Locality{Region: "r1", Zone: "z2"}
	r2z1 := catalog.Locality{Region: "r2", Zone: "z1"}
	local, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{
		{
			Namespace: "demo", Name: "echo", Cluster: "a", Identities: []string{"spiffe://a.mesh/ns/demo/sa/echo"},
			Ports: []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http", TargetPort: 8080}, {Name: "tcp-admin", Port: 9000, TargetPort: 9000}},
			Endpoints: []catalog.LocalityEndpoints{
				{Locality: r1z1, Ready: 1, NotReady: 1, Addresses: []catalog.Address{{IP: "10.0.1.2", Ready: true}, {IP: "10.0.1.3"}}},
				{Locality: r1z2, Ready: 1, Addresses: []catalog.Address{{IP: "10.0.2.2", Ready: true}}},
			},
		},
		{
			Namespace: "shop", Name: "db", Cluster: "a", Identities: []string{"spiffe://a.mesh/ns/shop/sa/db"},
			Ports:     []catalog.Port{{Name: "postgres", Port: 5432}},
			Endpoints: []catalog.LocalityEndpoints{{Locality: r1z1, Ready: 1, Addresses: []catalog.Address{{IP: "10.0.3.4", Ready: true}}}},
		},
	})
	require.NoError(t, err)
	peer := func(name string, loc catalog.Locality, ready int, gw string, svcs ...catalog.Service) *catalog.Snapshot {
		for i := range svcs {
			svcs[i].Cluster = name
			svcs[i].Gateways = []string{gw}
			svcs[i].Endpoints = []catalog.LocalityEndpoints{{Locality: loc, Ready: ready}}
			svcs[i].Identities = []string{"spiffe://" + name + ".mesh/ns/" + svcs[i].Namespace + "/sa/" + svcs[i].Name}
		}
		s, err := catalog.NewSnapshot(name, svcs)
		require.NoError(t, err)
		return s
	}
	echoPort := []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http"}}
	greeter := func() catalog.Service {
		return catalog.Service{Namespace: "shop", Name: "greeter", Ports: []catalog.Port{{Name: "grpc", Port: 9090}, {Name: "http", Port: 80}}}
	}
	return local, []*catalog.Snapshot{
		peer("b", r1z2, 3, "192.0.2.10:15443", catalog.Service{Namespace: "demo", Name: "echo", Ports: echoPort}, greeter()),
		peer("c", r2z1, 0, "198.51.100.7:15443", catalog.Service{Namespace: "demo", Name: "echo", Ports: echoPort}, greeter()),
	}
}

func TestTranslateSidecarRoundTrip(t *testing.T) {
	local, peers := roundTripCatalog(t)
	r, skipped, err := xds.TranslateSidecar(xds.SidecarInput{Local: local, Peers: peers}, xds.SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	require.Empty(t, skipped)
	cfg, err := DecodeRole(RoleSidecar, translatedAnys(t, r)...)
	require.NoError(t, err, "the sidecar NACKs what the federator emits")
	requireSidecarConsistent(t, cfg)
	sc := cfg.Sidecar

	// Every clusterset service is in the name table, and its VIP:port
	// reaches its cluster through the chain and the route a proxy would
	// use; an HTTP port's cluster speaks the version Istio picks for the
	// port's declared protocol.
	for _, tc := range []struct {
		host     string
		port     uint16
		up       UpstreamHTTP
		cluster  string
		priority int // levels in the assignment
	}{
		{"echo.demo.svc.clusterset.local", 80, UpstreamHTTP1, "outbound|80||echo.demo.svc.clusterset.local", 3},
		{"echo.demo.svc.clusterset.local", 9000, UpstreamHTTPNone, "outbound|9000||echo.demo.svc.clusterset.local", 1},
		{"db.shop.svc.clusterset.local", 5432, UpstreamHTTPNone, "outbound|5432||db.shop.svc.clusterset.local", 1},
		{"greeter.shop.svc.clusterset.local", 9090, UpstreamHTTP2, "outbound|9090||greeter.shop.svc.clusterset.local", 2},
		{"greeter.shop.svc.clusterset.local", 80, UpstreamHTTP1, "outbound|80||greeter.shop.svc.clusterset.local", 2},
	} {
		http := tc.up != UpstreamHTTPNone
		vip, ok := sc.LookupHost(tc.host)
		require.True(t, ok, tc.host)
		require.True(t, netip.MustParsePrefix("240.240.0.0/16").Contains(vip), "%s has VIP %v", tc.host, vip)
		ch := sc.Outbound.Match(netip.AddrPortFrom(vip, tc.port))
		require.NotSame(t, &sc.Outbound.Default, ch, "%s:%d", tc.host, tc.port)
		if http {
			require.NotNil(t, ch.HTTP, "%s:%d", tc.host, tc.port)
			vh := sc.Route(ch.HTTP.RouteConfigName).VirtualHost(tc.host)
			require.NotNil(t, vh, "%s:%d", tc.host, tc.port)
			require.Equal(t, tc.cluster, vh.Route("/x").Cluster)
			require.Zero(t, vh.Route("/x").Timeout)
		} else {
			require.Equal(t, tc.cluster, ch.TCP.Cluster)
		}
		c := cfg.Clusters[tc.cluster]
		require.Len(t, c.Priorities, tc.priority, tc.cluster)
		require.Equal(t, &ServiceMeta{Host: tc.host, VIP: vip, Port: tc.port, Protocol: map[bool]Protocol{true: ProtocolHTTP, false: ProtocolTCP}[http]}, c.Service)
		require.Equal(t, tc.up, c.UpstreamHTTP, tc.cluster)
		require.NotEmpty(t, c.TLS.SANs)
	}
	explicit := sc.Route("explicit")
	require.Equal(t, "outbound|80||echo.demo.svc.clusterset.local", explicit.VirtualHost("echo.demo.svc.clusterset.local").Route("/").Cluster)
	require.Equal(t, "outbound|9090||greeter.shop.svc.clusterset.local", explicit.VirtualHost("greeter.shop.svc.clusterset.local:9090").Route("/").Cluster)
	require.Same(t, &sc.Outbound.Default, sc.Outbound.Match(netip.MustParseAddrPort("10.96.0.1:443")))

	// echo: local pods, then b's gateway (same region), then c's.
	echo := cfg.Clusters["outbound|80||echo.demo.svc.clusterset.local"]
	require.EqualValues(t, 100000, echo.OverprovisioningFactor)
	require.Equal(t, "192.0.2.10:15443", echo.Priorities[1].Localities[0].Endpoints[0].Addr.String())
	require.EqualValues(t, 3, echo.Priorities[1].Localities[0].Weight)
	require.Equal(t, "198.51.100.7:15443", echo.Priorities[2].Localities[0].Endpoints[0].Addr.String())
	require.False(t, echo.Priorities[2].Localities[0].Endpoints[0].Healthy, "c has no ready endpoint")
	require.Equal(t, []spiffeid.ID{
		spiffeid.RequireFromString("spiffe://a.mesh/ns/demo/sa/echo"),
		spiffeid.RequireFromString("spiffe://b.mesh/ns/demo/sa/echo"),
		spiffeid.RequireFromString("spiffe://c.mesh/ns/demo/sa/echo"),
	}, echo.TLS.SANs)
	require.Equal(t, "outbound_.80_._.echo.demo.svc.cluster.local", echo.TLS.SNI)

	// The inbound side, for a port without chains of its own: the
	// chains picked by ALPN alone.
	in := sc.Inbound
	const port = 7070
	httpIn := in.Match(port, []string{"istio-http/1.1"})
	require.NotNil(t, httpIn.HTTP)
	require.Equal(t, SanitizeSet, httpIn.HTTP.ForwardClientCert)
	require.True(t, httpIn.HTTP.SetClientCertURI)
	require.Equal(t, InboundPassthroughCluster, httpIn.HTTP.Routes.VirtualHost("anything:8080").Route("/").Cluster)
	require.Equal(t, InboundPassthroughCluster, in.Match(port, []string{"istio"}).TCP.Cluster)
	require.Equal(t, UpstreamHTTPDownstream, cfg.Clusters[InboundPassthroughCluster].UpstreamHTTP, "the app gets the version the caller's sidecar chose")
	require.Equal(t, UpstreamHTTPNone, cfg.Clusters[PassthroughCluster].UpstreamHTTP)
}

// With nothing exported anywhere the sidecar still gets a working
// config: passthrough out, mTLS in, an empty explicit route.
func TestTranslateSidecarRoundTripEmpty(t *testing.T) {
	local, err := catalog.NewSnapshot(catalog.LocalSource, nil)
	require.NoError(t, err)
	r, _, err := xds.TranslateSidecar(xds.SidecarInput{Local: local}, xds.SidecarOptions{})
	require.NoError(t, err)
	cfg, err := DecodeRole(RoleSidecar, translatedAnys(t, r)...)
	require.NoError(t, err)
	requireSidecarConsistent(t, cfg)
	require.Zero(t, cfg.Sidecar.Hosts())
	require.Same(t, &cfg.Sidecar.Outbound.Default, cfg.Sidecar.Outbound.Match(netip.MustParseAddrPort("240.240.1.1:80")))
	require.Nil(t, cfg.Sidecar.Route("explicit").VirtualHost("echo.demo.svc.clusterset.local"))
}

// In-cluster services: each port's ClusterIP chain reaches its cluster
// (HTTP whatever the Host, TCP by tcp_proxy), the name table answers the
// cluster.local host with the ClusterIP, and the clusterset service of
// the same namespace/name keeps its own cluster.
func TestTranslateSidecarRoundTripInCluster(t *testing.T) {
	r := inClusterTranslation(t)
	cfg, err := DecodeRole(RoleSidecar, translatedAnys(t, r)...)
	require.NoError(t, err, "the sidecar NACKs what the federator emits")
	requireSidecarConsistent(t, cfg)
	sc := cfg.Sidecar

	vip, ok := sc.LookupHost("echo.demo.svc.cluster.local.")
	require.True(t, ok)
	require.Equal(t, netip.MustParseAddr("10.96.0.10"), vip)
	ch := sc.Outbound.Match(netip.MustParseAddrPort("10.96.0.10:80"))
	require.NotNil(t, ch.HTTP)
	require.Empty(t, ch.HTTP.RouteConfigName)
	for _, host := range []string{"echo", "echo.demo", "10.96.0.10:80", "anything.example"} {
		require.Equal(t, "outbound|80||echo.demo.svc.cluster.local", ch.HTTP.Routes.VirtualHost(host).Route("/x").Cluster, host)
	}
	c := cfg.Clusters["outbound|80||echo.demo.svc.cluster.local"]
	require.Len(t, c.Priorities, 1, "local pods only")
	require.Equal(t, "outbound_.80_._.echo.demo.svc.cluster.local", c.TLS.SNI)
	require.Equal(t, []spiffeid.ID{spiffeid.RequireFromString("spiffe://a.mesh/ns/demo/sa/echo")}, c.TLS.SANs)
	require.Equal(t, "outbound|9000||echo.demo.svc.cluster.local", sc.Outbound.Match(netip.MustParseAddrPort("10.96.0.10:9000")).TCP.Cluster)
	require.Same(t, &sc.Outbound.Default, sc.Outbound.Match(netip.MustParseAddrPort("10.96.0.10:81")), "another port of the address is not the service's")

	require.Equal(t, "outbound|5432||db.shop.svc.cluster.local", sc.Outbound.Match(netip.MustParseAddrPort("[fd00:96::20]:5432")).TCP.Cluster)
	require.Equal(t, "outbound|80||echo.demo.svc.cluster.local", sc.Route("explicit").VirtualHost("echo.demo.svc.cluster.local").Route("/").Cluster)

	// The clusterset service is still there, with its peers.
	require.Len(t, cfg.Clusters["outbound|80||echo.demo.svc.clusterset.local"].Priorities, 3)
}

// inClusterTranslation is roundTripCatalog's translation with demo/echo
// and shop/db in-cluster services too (ClusterIPs 10.96.0.10 and
// fd00:96::20).
func inClusterTranslation(tb testing.TB) xds.Resources {
	return inClusterTranslationOf(tb, true, true)
}

// inClusterTranslationOf is roundTripCatalog's translation with the
// in-cluster services chosen: demo/echo (HTTP port 80, TCP port 9000) and
// shop/db (TCP port 5432).
func inClusterTranslationOf(tb testing.TB, withEcho, withDB bool) xds.Resources {
	tb.Helper()
	local, peers := roundTripCatalog(tb)
	echo, ok := local.Get(catalog.ServiceKey{Namespace: "demo", Name: "echo"})
	require.True(tb, ok)
	db, ok := local.Get(catalog.ServiceKey{Namespace: "shop", Name: "db"})
	require.True(tb, ok)
	e, d := echo.Clone(), db.Clone()
	e.ClusterIP, d.ClusterIP = "10.96.0.10", "fd00:96::20"
	var in []catalog.Service
	if withEcho {
		in = append(in, e)
	}
	if withDB {
		in = append(in, d)
	}
	inCluster, err := catalog.NewSnapshot(catalog.InClusterSource, in)
	require.NoError(tb, err)
	r, skipped, err := xds.TranslateSidecar(xds.SidecarInput{Local: local, InCluster: inCluster, Peers: peers}, xds.SidecarOptions{Region: "r1"})
	require.NoError(tb, err)
	require.Empty(tb, skipped)
	return r
}

// An in-cluster HTTP service's outbound chain carries its route inline.
// When the service leaves the cluster (deleted, or no longer meshed) and
// comes back, the clusters that route names are followed like any
// chain's: whatever order the types arrive in, every step's state is the
// one decoding the same resources from scratch gives. Before the fix the
// chain's clusters were left counted when it went, so the client waited
// for ever on a cluster CDS no longer sent and published nothing again.
func TestInClusterServiceLeavesAndComes(t *testing.T) {
	both := byType(t, translatedAnys(t, inClusterTranslation(t)))
	dbOnly := byType(t, translatedAnys(t, inClusterTranslationOf(t, false, true)))
	// The echo chain's only cluster of its own is the one its inline route
	// names; without db, echo's TCP port would mask a missed count.
	echoOnly := byType(t, translatedAnys(t, inClusterTranslationOf(t, true, false)))
	none := byType(t, translatedAnys(t, inClusterTranslationOf(t, false, false)))
	orders := [][]string{
		{TypeListener, TypeRouteConfiguration, TypeCluster, TypeClusterLoadAssignment, TypeSecret},
		{TypeCluster, TypeClusterLoadAssignment, TypeListener, TypeRouteConfiguration, TypeSecret},
		{TypeClusterLoadAssignment, TypeCluster, TypeRouteConfiguration, TypeListener, TypeSecret},
	}
	for i, order := range orders {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			c, err := New(ClientConfig{Server: "127.0.0.1:15010", Plaintext: true, Node: sidecarNode})
			require.NoError(t, err)
			m := &model{role: RoleSidecar, eds: map[string]*anypb.Any{}, rds: map[string]*anypb.Any{}}
			var history []publishedConfig
			var tally tally
			step := 0
			for j, target := range []responses{both, dbOnly, both, none, echoOnly, none, echoOnly} {
				// Then RDS and EDS again, as a server answers the
				// subscriptions the new LDS and CDS made.
				for _, typ := range append(order, TypeRouteConfiguration, TypeClusterLoadAssignment) {
					checkStep(t, c, m, typ, fmt.Sprintf("v%d", step), target[typ], &history, &tally)
					step++
				}
				cfg, err := DecodeRole(RoleSidecar, m.all()...)
				require.NoError(t, err, "target %d", j)
				require.True(t, contentEqual(cfg, c.Current()), "target %d: the client publishes the target's config", j)
			}
		})
	}
}
