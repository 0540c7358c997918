package xds

import (
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

const sidecarNode = "sidecar~10.0.1.2~web-0.demo~demo.svc.cluster.local"

// sidecarTranslated is what TranslateSidecar gives for local and peers
// (by name), in region r1.
func sidecarTranslated(t testing.TB, local []catalog.Service, peers map[string][]catalog.Service) Resources {
	t.Helper()
	var snaps []*catalog.Snapshot
	for name, svcs := range peers {
		snaps = append(snaps, peerSnapshot(t, name, svcs...))
	}
	r, _, err := TranslateSidecar(SidecarInput{Local: snapshotOf(t, local...), Peers: snaps}, SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	return r
}

// sidecarADS drives a state-of-the-world ADS stream the way a sidecar
// does: clusters, listeners and the ROOTCA secret first; then the
// endpoints of every EDS cluster and the route configurations every
// listener names; every response ACKed.
type sidecarADS struct {
	*adsClient
	listeners map[string]*listenerv3.Listener
	routes    map[string]*routev3.RouteConfiguration
	secrets   map[string]*tlsv3.Secret
}

func openSidecarADS(t *testing.T, conn *grpc.ClientConn) *sidecarADS {
	t.Helper()
	c := &sidecarADS{adsClient: openADS(t, conn, sidecarNode)}
	c.send(resource.ClusterType, nil, "")
	c.send(resource.ListenerType, nil, "")
	c.send(resource.SecretType, []string{RootCASecretName}, "")
	return c
}

func hcmOf(t testing.TB, f *listenerv3.Filter) *hcmv3.HttpConnectionManager {
	t.Helper()
	hcm := &hcmv3.HttpConnectionManager{}
	require.NoError(t, f.GetTypedConfig().UnmarshalTo(hcm))
	return hcm
}

func (c *sidecarADS) routeNames() []string { return rdsNames(c.t, c.listeners) }

// rdsNames are the route configurations the listeners name over RDS,
// sorted.
func rdsNames(t testing.TB, listeners map[string]*listenerv3.Listener) []string {
	var names []string
	for _, l := range listeners {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				if f.GetName() != "envoy.filters.network.http_connection_manager" {
					continue
				}
				if n := hcmOf(t, f).GetRds().GetRouteConfigName(); n != "" && !slices.Contains(names, n) {
					names = append(names, n)
				}
			}
		}
	}
	slices.Sort(names)
	return names
}

func (c *sidecarADS) apply(r *discoveryv3.DiscoveryResponse) {
	c.t.Helper()
	typ := r.GetTypeUrl()
	c.versions[typ], c.nonces[typ] = r.GetVersionInfo(), r.GetNonce()
	switch typ {
	case resource.ClusterType:
		c.clusters = nil
		for _, a := range r.GetResources() {
			c.clusters = append(c.clusters, unpack[*clusterv3.Cluster](c.t, a))
		}
		c.send(typ, nil, "")
		c.send(resource.EndpointType, c.edsNames(), "")
	case resource.EndpointType:
		c.holdAssignments(r)
		c.send(typ, c.edsNames(), "")
	case resource.ListenerType:
		c.listeners = map[string]*listenerv3.Listener{}
		for _, a := range r.GetResources() {
			l := unpack[*listenerv3.Listener](c.t, a)
			c.listeners[l.GetName()] = l
		}
		c.send(typ, nil, "")
		c.send(resource.RouteType, c.routeNames(), "")
	case resource.RouteType:
		c.routes = map[string]*routev3.RouteConfiguration{}
		for _, a := range r.GetResources() {
			rc := unpack[*routev3.RouteConfiguration](c.t, a)
			c.routes[rc.GetName()] = rc
		}
		c.send(typ, c.routeNames(), "")
	case resource.SecretType:
		c.secrets = map[string]*tlsv3.Secret{}
		for _, a := range r.GetResources() {
			s := unpack[*tlsv3.Secret](c.t, a)
			c.secrets[s.GetName()] = s
		}
		c.send(typ, []string{RootCASecretName}, "")
	default:
		c.t.Fatalf("unexpected type %s", typ)
	}
}

// syncTo applies responses until every type is at r's version of it
// (the Secrets at secrets).
func (c *sidecarADS) syncTo(r Resources, secrets string) {
	c.t.Helper()
	c.pushed(r, secrets)
}

func (c *sidecarADS) describe(cluster string) []string {
	c.t.Helper()
	cla, ok := c.loads[cluster]
	require.True(c.t, ok, "no endpoints for %s", cluster)
	return describeLoad(cla)
}

// A sidecar gets the clusterset services of the local catalog and of
// every peer's imports, with the ROOTCA secret, and follows both; the
// gateway's configuration does not move for an import.
func TestSidecarFollowsCatalogAndImports(t *testing.T) {
	f := newFixture(t, Options{Sidecar: SidecarOptions{Region: "r1"}})
	f.setCatalog(localEcho())
	sc := openSidecarADS(t, f.dialTLS(svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))))
	v1 := sidecarTranslated(t, []catalog.Service{localEcho()}, nil)
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == v1.Version }, wait, 5*time.Millisecond)
	secrets := f.srv.Status().Sidecar.SecretsVersion
	require.NotEmpty(t, secrets)
	require.Equal(t, f.srv.Status().Gateway.SecretsVersion, secrets, "one ROOTCA for every proxy")
	sc.syncTo(v1, secrets)

	require.Contains(t, sc.listeners, "inbound")
	require.Contains(t, sc.listeners, "outbound")
	require.Equal(t, []string{"80", "explicit"}, sc.routeNames())
	require.Contains(t, sc.routes, "80")
	require.Contains(t, sc.secrets, RootCASecretName)
	echo := "outbound|80||" + echoHost
	require.Equal(t, []string{"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY"}, sc.describe(echo))
	gateway := f.srv.Status().Gateway.Version
	require.Equal(t, translated(t, localEcho()).Version, gateway)

	// Peer b imports demo/echo: the same cluster gains b's gateway at
	// priority 1; the hostname gateway is left out and said so.
	peerB := map[string][]catalog.Service{"b": {peerEcho("b", catalog.Locality{Region: "r1", Zone: "z2"}, 2, 0, "gw.b.example:15443", gwB)}}
	imported := peerSnapshot(t, "b", peerB["b"]...)
	f.store.Set(imported)
	v2 := sidecarTranslated(t, []catalog.Service{localEcho()}, peerB)
	require.NotEqual(t, v1.Version, v2.Version)
	sc.syncTo(v2, secrets)
	require.Equal(t, []string{
		"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY",
		"p1 r1/z2 w2: 192.0.2.10:15443 HEALTHY",
	}, sc.describe(echo))
	// The snapshot reaches the stream before the status records it; the
	// status shows a version with the imports it was made from, never
	// with those of the one before.
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == v2.Version }, wait, time.Millisecond)
	st := f.srv.Status()
	require.Equal(t, map[string]string{"b": imported.Version()}, st.Sidecar.Imports)
	require.Equal(t, []Skipped{{Service: "demo/echo", Cluster: "b", Reason: `gateway "gw.b.example:15443" is not an IP address and port: left out`}}, st.Sidecar.Skipped)
	require.Equal(t, f.store.Get(catalog.LocalSource).Version(), st.Sidecar.CatalogVersion)
	require.Equal(t, []string{"80", "explicit"}, st.Sidecar.Resources[resource.RouteType])
	require.Empty(t, st.Sidecar.Error)
	require.Equal(t, gateway, st.Gateway.Version, "an import does not change the gateway")

	// An import-only service gets its own cluster, VIP and routes.
	api := peerEcho("b", catalog.Locality{Region: "r1", Zone: "z2"}, 1, 0, gwB)
	api.Name = "api"
	peerB["b"] = append(peerB["b"], api)
	f.store.Set(peerSnapshot(t, "b", peerB["b"]...))
	v3 := sidecarTranslated(t, []catalog.Service{localEcho()}, peerB)
	sc.syncTo(v3, secrets)
	require.Equal(t, []string{"p0 r1/z2 w1: 192.0.2.10:15443 HEALTHY"}, sc.describe("outbound|80||api.demo.svc.clusterset.local"))
	require.Len(t, sc.routes["80"].GetVirtualHosts(), 2)

	// The peer goes: back to the local pods alone.
	f.store.Delete("b")
	sc.syncTo(v1, secrets)
	require.NotContains(t, sc.loads, "outbound|80||api.demo.svc.clusterset.local")
	require.Equal(t, []string{"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY"}, sc.describe(echo))
	// The snapshot reaches the stream before the status records it.
	require.Eventually(t, func() bool { return len(f.srv.Status().Sidecar.Imports) == 0 }, wait, 5*time.Millisecond)
	require.Equal(t, int64(4), f.metric("isthmus_xds_snapshot_updates", "role=sidecar"))
	require.Equal(t, int64(1), f.metric("isthmus_xds_snapshot_updates", "role=eastwest-gw"))

	// The server saw the sidecar's ACKs of all five types.
	require.Eventually(t, func() bool {
		ps := f.srv.Status().Proxies
		return len(ps) == 1 && len(ps[0].Acked) == 5
	}, wait, 5*time.Millisecond)
	require.Equal(t, sidecarNode, f.srv.Status().Proxies[0].Node)
}

// Imports that arrive before the local catalog is published wait for
// it, as the gateway's configuration does: a restarted federator never
// serves sidecars a configuration without the local services.
func TestSidecarWaitsForTheLocalCatalog(t *testing.T) {
	f := newFixture(t, Options{Sidecar: SidecarOptions{Region: "r1"}})
	sc := openSidecarADS(t, f.dialTLS(svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))))
	peerB := map[string][]catalog.Service{"b": {peerEcho("b", catalog.Locality{Region: "r1"}, 1, 0, gwB)}}
	imported := peerSnapshot(t, "b", peerB["b"]...)
	f.store.Set(imported)
	sc.nothing("sidecar configuration served before the local catalog was published")
	require.Empty(t, f.srv.Status().Sidecar.Version)

	f.setCatalog(localEcho())
	want := sidecarTranslated(t, []catalog.Service{localEcho()}, peerB)
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == want.Version }, wait, 5*time.Millisecond)
	sc.syncTo(want, f.srv.Status().Sidecar.SecretsVersion)
	require.Equal(t, []string{
		"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY",
		"p1 r1/ w1: 192.0.2.10:15443 HEALTHY",
	}, sc.describe("outbound|80||"+echoHost))
}
