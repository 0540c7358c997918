package xds

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Each type is served at its own version: a push carries the types
// whose resources changed, and no other. These tests watch what real
// sidecar streams (state of the world, delta, and the Go proxies' own
// client) receive through a catalog's changes.

// echoReadyAgain is localEcho with its not-ready pod ready: one
// endpoint's readiness, the commonest change of all.
func echoReadyAgain() catalog.Service {
	svc := localEcho()
	svc.Endpoints[0].Addresses[1].Ready = true
	svc.Endpoints[0].Ready, svc.Endpoints[0].NotReady = 2, 0
	return svc
}

// localAPI is demo/api exported by cluster a: an HTTP port 80 like
// echo's, so that adding it changes a cluster, an assignment, the
// outbound listener's port-80 chain and the "80" and "explicit" routes.
func localAPI() catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "api", Cluster: "a", Identities: []string{"spiffe://a.mesh/ns/demo/sa/api"},
		Ports: []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http", TargetPort: 8080}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1,
			Addresses: []catalog.Address{{IP: "10.0.1.7", Ready: true}}}},
	}
}

// requireTypesChanged checks which per-type versions moved from a to b.
func requireTypesChanged(t testing.TB, a, b Resources, changed ...string) {
	t.Helper()
	av, bv := a.TypeVersions(), b.TypeVersions()
	var got []string
	for _, typ := range slices.Sorted(maps.Keys(bv)) {
		if av[typ] != bv[typ] {
			got = append(got, typ)
		}
	}
	slices.Sort(changed)
	require.Equal(t, changed, got, "types whose version changed")
	require.NotEqual(t, a.Version, b.Version)
}

// pushed applies responses until every type is at r's version (the
// Secrets at secrets), and returns how many responses of each type it
// took.
func (c *sidecarADS) pushed(r Resources, secrets string) map[string]int {
	c.t.Helper()
	got := map[string]int{}
	for !atVersions(c.versions, r, secrets) {
		resp := c.next()
		got[resp.GetTypeUrl()]++
		c.apply(resp)
	}
	return got
}

// State of the world: one endpoint's readiness pushes the endpoints and
// nothing else; a new service pushes the clusters, endpoints, listeners
// and routes, and not the Secret.
func TestSidecarPushSendsOnlyChangedTypes(t *testing.T) {
	f := newFixture(t, Options{Sidecar: SidecarOptions{Region: "r1"}})
	f.setCatalog(localEcho())
	sc := openSidecarADS(t, f.dialTLS(svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))))
	v1 := sidecarTranslated(t, []catalog.Service{localEcho()}, nil)
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == v1.Version }, wait, 5*time.Millisecond)
	secrets := f.srv.Status().Sidecar.SecretsVersion
	sc.syncTo(v1, secrets)
	sc.nothing("more after the first configuration")

	f.setCatalog(echoReadyAgain())
	v2 := sidecarTranslated(t, []catalog.Service{echoReadyAgain()}, nil)
	requireTypesChanged(t, v1, v2, resource.EndpointType)
	require.Equal(t, map[string]int{resource.EndpointType: 1}, sc.pushed(v2, secrets))
	sc.nothing("a listener, cluster, route or Secret pushed for an endpoint's readiness")
	require.Equal(t, []string{"p0 r1/z1 w2: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 HEALTHY"}, sc.describe("outbound|80||"+echoHost))
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == v2.Version }, wait, 5*time.Millisecond)
	require.Equal(t, v2.TypeVersions()[resource.ListenerType], f.srv.Status().Sidecar.Versions[resource.ListenerType])
	require.Equal(t, v2.EndpointsVersion, f.srv.Status().Sidecar.Versions[resource.EndpointType])

	f.setCatalog(echoReadyAgain(), localAPI())
	v3 := sidecarTranslated(t, []catalog.Service{echoReadyAgain(), localAPI()}, nil)
	requireTypesChanged(t, v2, v3, resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType)
	got := sc.pushed(v3, secrets)
	for _, typ := range []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType} {
		require.Positive(t, got[typ], "no %s response for a new service", typ)
	}
	require.Zero(t, got[resource.SecretType], "the Secret pushed for a new service")
	sc.nothing("more after the new service")
	require.Equal(t, []string{"p0 r1/z1 w1: 10.0.1.7:8080 HEALTHY"}, sc.describe("outbound|80||api.demo.svc.clusterset.local"))
	require.Len(t, sc.routes["80"].GetVirtualHosts(), 2)
}

// The gateway likewise: an endpoint's readiness pushes its
// ClusterLoadAssignments, not the listener of every SNI chain nor the
// clusters.
func TestGatewayPushSendsOnlyChangedTypes(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.subscribe()
	v1 := translated(t, echoService())
	gw.syncTo(v1)
	gw.nothing("more after the first configuration")

	ready := echoService()
	ready.Endpoints[0].Addresses[1].Ready = true
	ready.Endpoints[0].Ready, ready.Endpoints[0].NotReady = 2, 0
	f.setCatalog(ready)
	v2 := translated(t, ready)
	requireTypesChanged(t, v1, v2, resource.EndpointType)
	r := gw.next()
	require.Equal(t, resource.EndpointType, r.GetTypeUrl())
	require.Equal(t, v2.EndpointsVersion, r.GetVersionInfo())
	gw.apply(r)
	gw.nothing("a listener or cluster pushed for an endpoint's readiness")
	require.Equal(t, map[string]string{
		resource.ListenerType: v1.ListenersVersion, resource.ClusterType: v1.ClustersVersion, resource.EndpointType: v2.EndpointsVersion,
	}, gw.versions)
}

// deltaADS is a delta ADS stream driven as a sidecar would: clusters
// and listeners as wildcards, then the assignments of the EDS clusters,
// the route configurations the listeners name and ROOTCA by name, each
// response ACKed. It keeps, by type, the resources it holds and the
// system version last received.
type deltaADS struct {
	t      *testing.T
	stream discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	node   *corev3.Node
	resps  chan *discoveryv3.DeltaDiscoveryResponse
	err    chan error

	versions   map[string]string
	subscribed map[string][]string
	clusters   map[string]*clusterv3.Cluster
	listeners  map[string]*listenerv3.Listener
	loads      map[string]*endpointv3.ClusterLoadAssignment
}

func openDeltaADS(t *testing.T, conn *grpc.ClientConn, nodeID string) *deltaADS {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	require.NoError(t, err)
	c := &deltaADS{
		t: t, stream: stream, node: &corev3.Node{Id: nodeID, Cluster: "a"},
		resps: make(chan *discoveryv3.DeltaDiscoveryResponse, 16), err: make(chan error, 1),
		versions: map[string]string{}, subscribed: map[string][]string{},
		clusters: map[string]*clusterv3.Cluster{}, listeners: map[string]*listenerv3.Listener{},
		loads: map[string]*endpointv3.ClusterLoadAssignment{},
	}
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				c.err <- err
				return
			}
			c.resps <- r
		}
	}()
	c.subscribe(resource.ClusterType, "*")
	c.subscribe(resource.ListenerType, "*")
	c.subscribe(resource.SecretType, RootCASecretName)
	return c
}

// subscribe adds names to the subscription of typ, those it lacks.
func (c *deltaADS) subscribe(typ string, names ...string) {
	c.t.Helper()
	var add []string
	for _, n := range names {
		if !slices.Contains(c.subscribed[typ], n) {
			add = append(add, n)
		}
	}
	if len(add) == 0 {
		return
	}
	c.subscribed[typ] = append(c.subscribed[typ], add...)
	require.NoError(c.t, c.stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: c.node, TypeUrl: typ, ResourceNamesSubscribe: add}))
}

func (c *deltaADS) next() *discoveryv3.DeltaDiscoveryResponse {
	c.t.Helper()
	return nextResponse(c.t, c.resps, c.err, "delta")
}

func (c *deltaADS) nothing(why string) {
	c.t.Helper()
	if r, ok := quietFor(c.resps); ok {
		c.t.Fatalf("%s: got a %s response with %d resources", why, r.GetTypeUrl(), len(r.GetResources()))
	}
}

// apply takes in one response, ACKs it, and subscribes to what its
// clusters or listeners name.
func (c *deltaADS) apply(r *discoveryv3.DeltaDiscoveryResponse) {
	c.t.Helper()
	typ := r.GetTypeUrl()
	c.versions[typ] = r.GetSystemVersionInfo()
	require.NoError(c.t, c.stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: c.node, TypeUrl: typ, ResponseNonce: r.GetNonce()}))
	for _, res := range r.GetResources() {
		switch typ {
		case resource.ClusterType:
			c.clusters[res.GetName()] = unpack[*clusterv3.Cluster](c.t, res.GetResource())
		case resource.ListenerType:
			c.listeners[res.GetName()] = unpack[*listenerv3.Listener](c.t, res.GetResource())
		case resource.EndpointType:
			c.loads[res.GetName()] = unpack[*endpointv3.ClusterLoadAssignment](c.t, res.GetResource())
		}
	}
	for _, name := range r.GetRemovedResources() {
		delete(c.clusters, name)
		delete(c.listeners, name)
		delete(c.loads, name)
	}
	switch typ {
	case resource.ClusterType:
		var eds []string
		for name, cl := range c.clusters {
			if cl.GetType() == clusterv3.Cluster_EDS {
				eds = append(eds, name)
			}
		}
		slices.Sort(eds)
		c.subscribe(resource.EndpointType, eds...)
	case resource.ListenerType:
		c.subscribe(resource.RouteType, rdsNames(c.t, c.listeners)...)
	}
}

// pushed applies responses until every type is at r's version (the
// Secrets at secrets), and returns the names each response of a type
// carried, in order.
func (c *deltaADS) pushed(r Resources, secrets string) map[string][][]string {
	c.t.Helper()
	got := map[string][][]string{}
	for !atVersions(c.versions, r, secrets) {
		resp := c.next()
		names := []string{}
		for _, res := range resp.GetResources() {
			names = append(names, res.GetName())
		}
		for _, n := range resp.GetRemovedResources() {
			names = append(names, "-"+n)
		}
		slices.Sort(names)
		got[resp.GetTypeUrl()] = append(got[resp.GetTypeUrl()], names)
		c.apply(resp)
	}
	return got
}

// Delta: a push carries the resources that changed, at their type's
// version: the one assignment for an endpoint's readiness; for a new
// service its cluster, its assignment, the outbound listener and the
// two route configurations that gained its virtual host.
func TestSidecarDeltaPushSendsOnlyChangedResources(t *testing.T) {
	f := newFixture(t, Options{Sidecar: SidecarOptions{Region: "r1"}})
	f.setCatalog(localEcho())
	v1 := sidecarTranslated(t, []catalog.Service{localEcho()}, nil)
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == v1.Version }, wait, 5*time.Millisecond)
	secrets := f.srv.Status().Sidecar.SecretsVersion
	d := openDeltaADS(t, f.dialTLS(svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))), sidecarNode)
	first := d.pushed(v1, secrets)
	require.Equal(t, [][]string{{"PassthroughCluster", "inbound-passthrough", "outbound|80||" + echoHost}}, first[resource.ClusterType])
	require.Equal(t, [][]string{{"80", "explicit"}}, first[resource.RouteType])
	d.nothing("more after the first configuration")

	f.setCatalog(echoReadyAgain())
	v2 := sidecarTranslated(t, []catalog.Service{echoReadyAgain()}, nil)
	require.Equal(t, map[string][][]string{resource.EndpointType: {{"outbound|80||" + echoHost}}}, d.pushed(v2, secrets))
	d.nothing("anything but the changed assignment pushed for an endpoint's readiness")
	require.Equal(t, []string{"p0 r1/z1 w2: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 HEALTHY"}, describeLoad(d.loads["outbound|80||"+echoHost]))

	f.setCatalog(echoReadyAgain(), localAPI())
	v3 := sidecarTranslated(t, []catalog.Service{echoReadyAgain(), localAPI()}, nil)
	api := "outbound|80||api.demo.svc.clusterset.local"
	require.Equal(t, map[string][][]string{
		resource.ClusterType:  {{api}},
		resource.EndpointType: {{api}},
		resource.ListenerType: {{OutboundListenerName}},
		resource.RouteType:    {{"80", "explicit"}},
	}, d.pushed(v3, secrets))
	d.nothing("more after the new service")
}

// The Go proxies' client follows per-type pushes: types arrive on their
// own, every Config it publishes is consistent, an endpoint's readiness
// costs it one response, and what it ACKs is what /debug/xds says is
// served.
func TestXDSClientFollowsPerTypePushes(t *testing.T) {
	f := newFixture(t, Options{Sidecar: SidecarOptions{Region: "r1"}})
	f.setCatalog(localEcho())
	client, err := xdsclient.New(xdsclient.ClientConfig{
		Server: f.plainAddr, Plaintext: true, Node: xdsclient.SidecarNode("a", "10.0.1.2", "web-0", "demo"),
		BackoffMin: 10 * time.Millisecond, BackoffMax: 100 * time.Millisecond, Logger: f.srv.log,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- client.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	// follows waits until the client's Config is made of r's versions
	// (and the ROOTCA's), which the server serves and has seen it ACK.
	follows := func(r Resources) *xdsclient.Config {
		t.Helper()
		var last string
		for deadline := time.Now().Add(wait); ; time.Sleep(5 * time.Millisecond) {
			cfg, st := client.Current(), f.srv.Status()
			// web-0 is an endpoint of echo: its listeners are those of
			// echo's ports' profile.
			want, base := r.TypeVersionsFor(sidecarNode), r.TypeVersions()
			want[resource.SecretType] = st.Sidecar.SecretsVersion
			base[resource.SecretType] = st.Sidecar.SecretsVersion
			served := st.Sidecar.Profiles["8080/HTTP"].ListenersVersion
			if cfg != nil && len(st.Proxies) == 1 {
				if maps.Equal(want, cfg.Versions) && maps.Equal(base, st.Sidecar.Versions) && served == want[resource.ListenerType] &&
					maps.Equal(want, st.Proxies[0].Acked) {
					return cfg
				}
				last = fmt.Sprintf("config %v, served %v (profile 8080/HTTP %s), acked %v", cfg.Versions, st.Sidecar.Versions, served, st.Proxies[0].Acked)
			}
			if time.Now().After(deadline) {
				t.Fatalf("the client never held %v; last: %s", want, last)
			}
		}
	}
	healthy := func(cfg *xdsclient.Config, cluster string) []bool {
		var out []bool
		for _, e := range cfg.Clusters[cluster].Endpoints {
			out = append(out, e.Healthy)
		}
		return out
	}

	v1 := sidecarTranslated(t, []catalog.Service{localEcho()}, nil)
	cfg := follows(v1)
	require.Equal(t, []bool{true, false}, healthy(cfg, "outbound|80||"+echoHost))
	before := client.Stats()

	f.setCatalog(echoReadyAgain())
	v2 := sidecarTranslated(t, []catalog.Service{echoReadyAgain()}, nil)
	cfg = follows(v2)
	require.Equal(t, []bool{true, true}, healthy(cfg, "outbound|80||"+echoHost))
	time.Sleep(quiet) // anything else on its way arrives
	after := client.Stats()
	require.Equal(t, before.Accepted+1, after.Accepted, "one response, the endpoints, for an endpoint's readiness")
	require.Equal(t, before.Published+1, after.Published)

	f.setCatalog(echoReadyAgain(), localAPI())
	v3 := sidecarTranslated(t, []catalog.Service{echoReadyAgain(), localAPI()}, nil)
	cfg = follows(v3)
	vip, ok := cfg.Sidecar.LookupHost("api.demo.svc.clusterset.local")
	require.True(t, ok, "the new service's name")
	require.True(t, vip.IsValid())
	require.Equal(t, []bool{true}, healthy(cfg, "outbound|80||api.demo.svc.clusterset.local"))
	require.Len(t, cfg.Sidecar.Route("80").VirtualHosts, 2)
	require.Len(t, cfg.Sidecar.Route("explicit").VirtualHosts, 2)
	require.Zero(t, client.Stats().Rejected, client.Stats().LastNACK)
}

// atVersions reports whether a stream's versions by type are r's (the
// Secrets at secrets).
func atVersions(versions map[string]string, r Resources, secrets string) bool {
	for typ, v := range r.TypeVersionsFor(sidecarNode) {
		if versions[typ] != v {
			return false
		}
	}
	return versions[resource.SecretType] == secrets
}
