package xds

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"slices"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

const (
	echoHost = "echo.demo.svc.clusterset.local"
	echoID   = "spiffe://a.mesh/ns/demo/sa/echo"
	echoIDB  = "spiffe://b.mesh/ns/demo/sa/echo"
	gwB      = "192.0.2.10:15443"
)

// localEcho is demo/echo exported by cluster a: one HTTP port, two pods
// in r1/z1, one of them ready.
func localEcho() catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "echo", Cluster: "a", Identities: []string{echoID},
		Ports: []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http", TargetPort: 8080}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1, NotReady: 1,
			Addresses: []catalog.Address{{IP: "10.0.1.2", Ready: true}, {IP: "10.0.1.3", Ready: false}}}},
	}
}

// peerEcho is demo/echo as peer exports it: counts per locality, its
// gateways, its own identity.
func peerEcho(peer string, loc catalog.Locality, ready, notReady int, gateways ...string) catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "echo", Cluster: peer,
		Identities: []string{"spiffe://" + peer + ".mesh/ns/demo/sa/echo"}, Gateways: gateways,
		Ports:     []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http"}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: loc, Ready: ready, NotReady: notReady}},
	}
}

func inClusterSnapshot(t testing.TB, svcs ...catalog.Service) *catalog.Snapshot {
	t.Helper()
	s, err := catalog.NewSnapshot(catalog.InClusterSource, svcs)
	require.NoError(t, err)
	return s
}

// inClusterEcho is demo/echo as an in-cluster service of a: localEcho
// with a ClusterIP.
func inClusterEcho() catalog.Service {
	s := localEcho()
	s.ClusterIP = "10.96.0.10"
	return s
}

func peerSnapshot(t testing.TB, peer string, svcs ...catalog.Service) *catalog.Snapshot {
	t.Helper()
	s, err := catalog.NewSnapshot(peer, svcs)
	require.NoError(t, err)
	return s
}

// sidecarCase is one catalog state: the local exports and each peer's.
type sidecarCase struct {
	name      string
	local     []catalog.Service
	peers     map[string][]catalog.Service
	inCluster []catalog.Service
	region    string
}

// input is the case's catalogs, peers in name order.
func (c sidecarCase) input(t testing.TB) SidecarInput {
	t.Helper()
	local, peers := c.snapshots(t)
	in := SidecarInput{Local: local, Peers: peers}
	if c.inCluster != nil {
		in.InCluster = inClusterSnapshot(t, c.inCluster...)
	}
	return in
}

// snapshots are the case's local catalog and its peers', in name order.
func (c sidecarCase) snapshots(t testing.TB) (*catalog.Snapshot, []*catalog.Snapshot) {
	t.Helper()
	var peers []*catalog.Snapshot
	for _, name := range slices.Sorted(maps.Keys(c.peers)) {
		peers = append(peers, peerSnapshot(t, name, c.peers[name]...))
	}
	return snapshotOf(t, c.local...), peers
}

func (c sidecarCase) translate(t testing.TB) (Resources, []Skipped) {
	t.Helper()
	in := c.input(t)
	r, skipped, err := TranslateSidecar(in, SidecarOptions{Region: c.region})
	require.NoError(t, err)
	return r, skipped
}

func sidecarCases() []sidecarCase {
	r1z1 := catalog.Locality{Region: "r1", Zone: "z1"}
	r1z2 := catalog.Locality{Region: "r1", Zone: "z2"}
	r2z1 := catalog.Locality{Region: "r2", Zone: "z1"}

	noneReady := localEcho()
	noneReady.Endpoints[0].Addresses[0].Ready = false
	noneReady.Endpoints[0].Ready, noneReady.Endpoints[0].NotReady = 0, 2
	// demo/api: exported by peers only, so the same-region peer is
	// priority 0.
	api := func(peer string, loc catalog.Locality, ready int, gw string) catalog.Service {
		s := peerEcho(peer, loc, ready, 0, gw)
		s.Name = "api"
		s.Identities = []string{"spiffe://" + peer + ".mesh/ns/demo/sa/api"}
		return s
	}

	mixed := catalog.Service{
		Namespace: "shop", Name: "mixed", Cluster: "a", Identities: []string{"spiffe://a.mesh/ns/shop/sa/mixed"},
		Ports: []catalog.Port{
			{Name: "postgres", Port: 5432, TargetPort: 5432},
			{Name: "grpc-api", Port: 9090, TargetPort: 9091},
			{Name: "tcp-x", Port: 8443, AppProtocol: "kubernetes.io/h2c", TargetPort: 8444},
			{Name: "http-ish", Port: 6379, AppProtocol: "redis"},
			{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP},
			{Name: "h2c", Port: 8080, AppProtocol: "H2C"},
		},
		Endpoints: []catalog.LocalityEndpoints{{Locality: r1z1, Ready: 1, Addresses: []catalog.Address{{IP: "10.0.2.5", Ready: true}}}},
	}
	grpcToo := catalog.Service{
		Namespace: "shop", Name: "orders", Cluster: "a", Identities: []string{"spiffe://a.mesh/ns/shop/sa/orders"},
		Ports: []catalog.Port{{Name: "grpc", Port: 9090}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: r1z1, Ready: 2, Addresses: []catalog.Address{
			{IP: "10.0.2.7", Ready: true}, {IP: "fd00::7", Ready: true}}}},
	}

	// Cluster a is the lowest name and defines port 80 as TCP; local
	// cluster b and peer c call it HTTP.
	conflictLocal := localEcho()
	conflictLocal.Cluster = "b"
	conflictLocal.Identities = []string{echoIDB}
	conflictA := peerEcho("a", r1z2, 1, 0, "192.0.2.1:15443")
	conflictA.Ports = []catalog.Port{{Name: "tcp-legacy", Port: 80}, {Name: "admin", Port: 81}}
	conflictC := peerEcho("c", r2z1, 4, 0, "198.51.100.3:15443")
	conflictC.Ports = append(conflictC.Ports, catalog.Port{Name: "metrics", Port: 81, Protocol: catalog.ProtocolSCTP})

	// svc134 and svc270 both hash to 240.240.48.147; svc15 hashes to
	// 240.240.34.0 and svc369 to 240.240.226.255, both skipped.
	var collide []catalog.Service
	for _, n := range []string{"svc270", "svc15", "svc134", "svc369"} {
		collide = append(collide, catalog.Service{
			Namespace: "demo", Name: n, Cluster: "a", Identities: []string{"spiffe://a.mesh/ns/demo/sa/" + n},
			Ports: []catalog.Port{{Name: "tcp", Port: 7000}},
		})
	}

	noID := peerEcho("d", r1z1, 3, 0, "192.0.2.40:15443")
	noID.Identities = nil

	// In-cluster services: echo (exported too), a TCP database, a gRPC
	// service on IPv6, and two left out.
	db := catalog.Service{
		Namespace: "shop", Name: "db", Cluster: "a", ClusterIP: "10.96.0.20", Identities: []string{"spiffe://a.mesh/ns/shop/sa/db"},
		Ports:     []catalog.Port{{Name: "postgres", Port: 5432, TargetPort: 5432}, {Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: r1z1, Ready: 1, Addresses: []catalog.Address{{IP: "10.0.3.4", Ready: true}}}},
	}
	greeter := catalog.Service{
		Namespace: "shop", Name: "greeter", Cluster: "a", ClusterIP: "fd00:96::30", Identities: []string{"spiffe://a.mesh/ns/shop/sa/greeter"},
		Ports: []catalog.Port{{Name: "grpc", Port: 9090, TargetPort: 9091}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: r1z2, Ready: 2, Addresses: []catalog.Address{
			{IP: "fd00::31", Ready: true}, {IP: "fd00::32", Ready: true}}}},
	}
	inVIPRange := db
	inVIPRange.Name, inVIPRange.ClusterIP = "odd", "240.240.0.9"
	anonymous := db
	anonymous.Name, anonymous.ClusterIP, anonymous.Identities = "anonymous", "10.96.0.21", nil

	return []sidecarCase{
		{name: "empty-catalog", region: "r1"},
		{name: "one-local-http-service", region: "r1", local: []catalog.Service{localEcho()}},
		{name: "import-from-one-peer", region: "r1", peers: map[string][]catalog.Service{
			"b": {peerEcho("b", r1z1, 3, 0, gwB)},
		}},
		{name: "local-and-peers-in-two-regions", region: "r1", local: []catalog.Service{noneReady},
			peers: map[string][]catalog.Service{
				"b": {peerEcho("b", r1z2, 2, 1, gwB, "192.0.2.11:15443"), api("b", r1z2, 1, gwB)},
				"c": {peerEcho("c", r2z1, 0, 2, "198.51.100.7:15443")},
				"d": {peerEcho("d", r2z1, 5, 0, "203.0.113.9:15443"), api("d", r2z1, 7, "203.0.113.9:15443")},
			}},
		{name: "tcp-grpc-h2c-ports", region: "r1", local: []catalog.Service{mixed, grpcToo}},
		{name: "port-conflict", region: "r1", local: []catalog.Service{conflictLocal},
			peers: map[string][]catalog.Service{"a": {conflictA}, "c": {conflictC}}},
		{name: "vip-collision", region: "r1", local: collide},
		{name: "in-cluster-services", region: "r1", local: []catalog.Service{localEcho()},
			inCluster: []catalog.Service{inClusterEcho(), db, greeter, inVIPRange, anonymous},
			peers:     map[string][]catalog.Service{"b": {peerEcho("b", r1z1, 3, 0, gwB)}}},
		{name: "hostname-gateway-skipped", region: "r1", peers: map[string][]catalog.Service{
			"b": {peerEcho("b", r1z1, 2, 0, "gw.b.example:15443", gwB)},
			"c": {peerEcho("c", r1z1, 2, 0, "gw.c.example:15443")},
			"d": {noID},
		}},
	}
}

// renderSidecar writes resources as renderGateway does, plus the route
// configurations and what was skipped.
func renderSidecar(t testing.TB, r Resources, skipped []Skipped) []byte {
	t.Helper()
	enc := func(m proto.Message) json.RawMessage {
		b, err := protojson.Marshal(m)
		require.NoError(t, err)
		return b
	}
	doc := struct {
		Version   string            `json:"version"`
		Versions  map[string]string `json:"versions"`
		Listeners []json.RawMessage `json:"listeners"`
		Routes    []json.RawMessage `json:"routes"`
		Clusters  []json.RawMessage `json:"clusters"`
		Endpoints []json.RawMessage `json:"endpoints"`
		Skipped   []Skipped         `json:"skipped"`
		// Profiles are the pods' inbound listeners (sidecar_inbound.go).
		Profiles map[string]renderedProfile `json:"profiles,omitempty"`
	}{Version: r.Version, Versions: r.TypeVersions(), Listeners: []json.RawMessage{}, Routes: []json.RawMessage{}, Clusters: []json.RawMessage{},
		Endpoints: []json.RawMessage{}, Skipped: skipped}
	if r.Inbound != nil {
		doc.Profiles = map[string]renderedProfile{}
		for k, pr := range r.Inbound.byKey {
			rp := renderedProfile{ListenersVersion: pr.version, Pods: []string{}, Inbound: enc(pr.listeners[0])}
			for ip, key := range r.Inbound.pods {
				if key == k {
					rp.Pods = append(rp.Pods, ip.String())
				}
			}
			slices.Sort(rp.Pods)
			require.Len(t, rp.Pods, pr.pods)
			require.Same(t, r.Listeners[1], pr.listeners[1], "every profile shares the outbound listener")
			doc.Profiles[k] = rp
		}
	}
	if doc.Skipped == nil {
		doc.Skipped = []Skipped{}
	}
	for _, l := range r.Listeners {
		doc.Listeners = append(doc.Listeners, enc(l))
	}
	for _, rc := range r.Routes {
		doc.Routes = append(doc.Routes, enc(rc))
	}
	for _, c := range r.Clusters {
		doc.Clusters = append(doc.Clusters, enc(c))
	}
	for _, e := range r.Endpoints {
		doc.Endpoints = append(doc.Endpoints, enc(e))
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	require.NoError(t, err)
	return append(out, '\n')
}

// renderedProfile is an inbound profile in a golden file.
type renderedProfile struct {
	ListenersVersion string          `json:"listenersVersion"`
	Pods             []string        `json:"pods"`
	Inbound          json.RawMessage `json:"inbound"`
}

// validateResources runs validateDeep on every resource of r.
func validateResources(t testing.TB, r Resources) {
	t.Helper()
	for _, l := range r.Listeners {
		validateDeep(t, "listener "+l.GetName(), l)
	}
	if r.Inbound != nil {
		for k, pr := range r.Inbound.byKey {
			validateDeep(t, "profile "+k+" listener "+pr.listeners[0].GetName(), pr.listeners[0])
		}
	}
	for _, rc := range r.Routes {
		validateDeep(t, "route "+rc.GetName(), rc)
	}
	for _, c := range r.Clusters {
		validateDeep(t, "cluster "+c.GetName(), c)
	}
	for _, e := range r.Endpoints {
		validateDeep(t, "endpoints "+e.GetClusterName(), e)
	}
}

// validateDeep runs Validate() on m and on every message packed in an
// Any anywhere inside it, so a typed config that a resource's own
// Validate() cannot see into is checked too.
func validateDeep(t testing.TB, where string, m proto.Message) {
	t.Helper()
	if v, ok := m.(interface{ Validate() error }); ok {
		require.NoError(t, v.Validate(), "%s: %T", where, m)
	}
	var walk func(protoreflect.Message)
	walk = func(msg protoreflect.Message) {
		if a, ok := msg.Interface().(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
			require.NoError(t, err, "%s: %s", where, a.GetTypeUrl())
			validateDeep(t, where+" > "+a.GetTypeUrl(), inner)
			return
		}
		msg.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := range v.List().Len() {
					walk(v.List().Get(i).Message())
				}
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(mv.Message())
					return true
				})
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(v.Message())
			}
			return true
		})
	}
	walk(m.ProtoReflect())
}

func TestTranslateSidecarGolden(t *testing.T) {
	for _, tc := range sidecarCases() {
		t.Run(tc.name, func(t *testing.T) {
			r, skipped := tc.translate(t)
			golden(t, "sidecar-"+tc.name+".json", renderSidecar(t, r, skipped))

			// Pure: the same input, the same output and version.
			again, skippedAgain := tc.translate(t)
			require.Equal(t, r.Version, again.Version)
			require.Equal(t, renderSidecar(t, r, skipped), renderSidecar(t, again, skippedAgain))

			// Every resource and every typed config in it is valid, and
			// the snapshot is consistent (every RDS name and EDS cluster
			// has its resource, and nothing else is there).
			validateResources(t, r)
			xs, err := r.Snapshot()
			require.NoError(t, err)
			require.NoError(t, xs.Consistent())
		})
	}
}

func caseNamed(t testing.TB, name string) sidecarCase {
	t.Helper()
	for _, c := range sidecarCases() {
		if c.name == name {
			return c
		}
	}
	t.Fatalf("no case %q", name)
	return sidecarCase{}
}

func clusterNamed(t testing.TB, r Resources, name string) *clusterv3.Cluster {
	t.Helper()
	for _, c := range r.Clusters {
		if c.GetName() == name {
			return c
		}
	}
	t.Fatalf("no cluster %q in %v", name, r.Names()[resource.ClusterType])
	return nil
}

func loadNamed(t testing.TB, r Resources, name string) *endpointv3.ClusterLoadAssignment {
	t.Helper()
	for _, e := range r.Endpoints {
		if e.GetClusterName() == name {
			return e
		}
	}
	t.Fatalf("no ClusterLoadAssignment %q", name)
	return nil
}

func listenerNamed(t testing.TB, r Resources, name string) *listenerv3.Listener {
	t.Helper()
	for _, l := range r.Listeners {
		if l.GetName() == name {
			return l
		}
	}
	t.Fatalf("no listener %q", name)
	return nil
}

// describeLoad writes a ClusterLoadAssignment as "priority locality
// weight: address health, …" lines.
func describeLoad(cla *endpointv3.ClusterLoadAssignment) []string {
	var out []string
	for _, le := range cla.GetEndpoints() {
		l := le.GetLocality()
		line := fmt.Sprintf("p%d %s/%s w%d:", le.GetPriority(), l.GetRegion(), l.GetZone(), le.GetLoadBalancingWeight().GetValue())
		for _, e := range le.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			line += fmt.Sprintf(" %s %s", netip.AddrPortFrom(netip.MustParseAddr(sa.GetAddress()), uint16(sa.GetPortValue())), e.GetHealthStatus())
		}
		out = append(out, line)
	}
	return out
}

// serviceMeta is a service cluster's metadata; nil for the passthrough
// clusters.
func serviceMeta(c *clusterv3.Cluster) map[string]any {
	st, ok := c.GetMetadata().GetFilterMetadata()["isthmus"]
	if !ok {
		return nil
	}
	return st.AsMap()
}

// upstreamHTTP names the HTTP version cluster c speaks upstream, from its
// HttpProtocolOptions: "HTTP/1.1", "HTTP/2", "downstream", or "" when it
// has none.
func upstreamHTTP(t testing.TB, c *clusterv3.Cluster) string {
	t.Helper()
	a, ok := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	if !ok {
		return ""
	}
	o := &httpv3.HttpProtocolOptions{}
	require.NoError(t, a.UnmarshalTo(o))
	switch {
	case o.GetUseDownstreamProtocolConfig() != nil:
		return "downstream"
	case o.GetExplicitHttpConfig().GetHttpProtocolOptions() != nil:
		return "HTTP/1.1"
	case o.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil:
		return "HTTP/2"
	}
	t.Fatalf("cluster %q: protocol options %v", c.GetName(), o)
	return ""
}

// The golden files are the contract in full; these tests say in words
// what matters most in them, so a careless -update is caught.
func TestSidecarClusterContract(t *testing.T) {
	r, skipped := caseNamed(t, "one-local-http-service").translate(t)
	require.Empty(t, skipped)
	require.Equal(t, map[string][]string{
		resource.ListenerType: {"inbound", "outbound"},
		resource.RouteType:    {"80", "explicit"},
		resource.ClusterType:  {"PassthroughCluster", "inbound-passthrough", "outbound|80||" + echoHost},
		resource.EndpointType: {"outbound|80||" + echoHost},
	}, r.Names())

	c := clusterNamed(t, r, "outbound|80||"+echoHost)
	require.Equal(t, clusterv3.Cluster_EDS, c.GetType())
	require.Equal(t, clusterv3.Cluster_ROUND_ROBIN, c.GetLbPolicy())
	require.Equal(t, int64(1), c.GetConnectTimeout().GetSeconds())
	require.NotNil(t, c.GetEdsClusterConfig().GetEdsConfig().GetAds())
	require.Zero(t, c.GetCommonLbConfig().GetHealthyPanicThreshold().GetValue(), "never panic-route to unhealthy endpoints")
	require.NotNil(t, c.GetCommonLbConfig().GetLocalityWeightedLbConfig(), "locality weights count in Envoy too")
	meta := serviceMeta(c)
	require.Equal(t, echoHost, meta["host"])
	require.Equal(t, float64(80), meta["port"])
	require.Equal(t, "HTTP", meta["protocol"])
	vip := netip.MustParseAddr(meta["vip"].(string))
	require.True(t, netip.MustParsePrefix("240.240.0.0/16").Contains(vip), vip)
	require.Equal(t, "HTTP/1.1", upstreamHTTP(t, c), "a port declared http speaks HTTP/1.1 upstream, as in Istio")

	up := &tlsv3.UpstreamTlsContext{}
	require.Equal(t, "envoy.transport_sockets.tls", c.GetTransportSocket().GetName())
	require.NoError(t, c.GetTransportSocket().GetTypedConfig().UnmarshalTo(up))
	require.Equal(t, "outbound_.80_._.echo.demo.svc.cluster.local", up.GetSni(), "the SNI the peers' gateways route")
	common := up.GetCommonTlsContext()
	require.Equal(t, []string{"istio-http/1.1", "istio-h2"}, common.GetAlpnProtocols())
	require.Len(t, common.GetTlsCertificateSdsSecretConfigs(), 1)
	require.Equal(t, "default", common.GetTlsCertificateSdsSecretConfigs()[0].GetName())
	require.Nil(t, common.GetTlsCertificateSdsSecretConfigs()[0].GetSdsConfig(), "the SVID is the proxy's own, never served")
	combined := common.GetCombinedValidationContext()
	require.Equal(t, "ROOTCA", combined.GetValidationContextSdsSecretConfig().GetName())
	require.NotNil(t, combined.GetValidationContextSdsSecretConfig().GetSdsConfig().GetAds())
	sans := combined.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	require.Len(t, sans, 1)
	require.Equal(t, tlsv3.SubjectAltNameMatcher_URI, sans[0].GetSanType())
	require.Equal(t, echoID, sans[0].GetMatcher().GetExact())

	require.Equal(t, []string{
		"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY",
	}, describeLoad(loadNamed(t, r, "outbound|80||"+echoHost)), "local pods at their target port, weighted by ready ones")
	require.Equal(t, uint32(100000), loadNamed(t, r, "outbound|80||"+echoHost).GetPolicy().GetOverprovisioningFactor().GetValue())

	for _, name := range []string{"PassthroughCluster", "inbound-passthrough"} {
		pc := clusterNamed(t, r, name)
		require.Equal(t, clusterv3.Cluster_ORIGINAL_DST, pc.GetType())
		require.Equal(t, clusterv3.Cluster_CLUSTER_PROVIDED, pc.GetLbPolicy())
		require.Nil(t, pc.GetTransportSocket())
	}
	require.Equal(t, "downstream", upstreamHTTP(t, clusterNamed(t, r, "inbound-passthrough")),
		"the app gets the version the calling sidecar chose")
	require.Empty(t, upstreamHTTP(t, clusterNamed(t, r, "PassthroughCluster")))
}

func TestSidecarPriorities(t *testing.T) {
	r, skipped := caseNamed(t, "local-and-peers-in-two-regions").translate(t)
	require.Empty(t, skipped)
	// No local pod is ready, but the local level stays priority 0: the
	// sidecar skips it for want of a healthy endpoint. Peer b shares the
	// region (1); c and d do not (2), and share a locality, so they share
	// one LocalityLbEndpoints weighted by their ready pods together.
	require.Equal(t, []string{
		"p0 r1/z1 w0: 10.0.1.2:8080 UNHEALTHY 10.0.1.3:8080 UNHEALTHY",
		"p1 r1/z2 w2: 192.0.2.10:15443 HEALTHY 192.0.2.11:15443 HEALTHY",
		"p2 r2/z1 w5: 198.51.100.7:15443 UNHEALTHY 203.0.113.9:15443 HEALTHY",
	}, describeLoad(loadNamed(t, r, "outbound|80||"+echoHost)))
	// Only peers export demo/api: priorities stay contiguous.
	require.Equal(t, []string{
		"p0 r1/z2 w1: 192.0.2.10:15443 HEALTHY",
		"p1 r2/z1 w7: 203.0.113.9:15443 HEALTHY",
	}, describeLoad(loadNamed(t, r, "outbound|80||api.demo.svc.clusterset.local")))

	// Every exporter's identity, sorted, and nobody else's.
	up := &tlsv3.UpstreamTlsContext{}
	require.NoError(t, clusterNamed(t, r, "outbound|80||"+echoHost).GetTransportSocket().GetTypedConfig().UnmarshalTo(up))
	var sans []string
	for _, m := range up.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		sans = append(sans, m.GetMatcher().GetExact())
	}
	require.Equal(t, []string{echoID, "spiffe://b.mesh/ns/demo/sa/echo", "spiffe://c.mesh/ns/demo/sa/echo", "spiffe://d.mesh/ns/demo/sa/echo"}, sans)

	// Another region: c and d are near, b is far.
	tc := caseNamed(t, "local-and-peers-in-two-regions")
	tc.region = "r2"
	r2, _ := tc.translate(t)
	require.Equal(t, []string{
		"p0 r1/z1 w0: 10.0.1.2:8080 UNHEALTHY 10.0.1.3:8080 UNHEALTHY",
		"p1 r2/z1 w5: 198.51.100.7:15443 UNHEALTHY 203.0.113.9:15443 HEALTHY",
		"p2 r1/z2 w2: 192.0.2.10:15443 HEALTHY 192.0.2.11:15443 HEALTHY",
	}, describeLoad(loadNamed(t, r2, "outbound|80||"+echoHost)))
	require.NotEqual(t, r.Version, r2.Version)
}

func TestSidecarListenersContract(t *testing.T) {
	r, skipped := caseNamed(t, "tcp-grpc-h2c-ports").translate(t)
	require.Empty(t, skipped, "a UDP port is not a clusterset port, silently")

	mixedVIP := serviceMeta(clusterNamed(t, r, "outbound|5432||mixed.shop.svc.clusterset.local"))["vip"].(string)
	ordersVIP := serviceMeta(clusterNamed(t, r, "outbound|9090||orders.shop.svc.clusterset.local"))["vip"].(string)
	protocols := map[int]string{}
	for _, c := range r.Clusters {
		if m := serviceMeta(c); m != nil && m["host"] == "mixed.shop.svc.clusterset.local" {
			protocols[int(m["port"].(float64))] = m["protocol"].(string)
		}
	}
	require.Equal(t, map[int]string{5432: "TCP", 6379: "TCP", 8080: "HTTP", 8443: "HTTP", 9090: "HTTP"}, protocols,
		"appProtocol first (case-insensitive), else the name's prefix")
	upstream := map[int]string{}
	for _, port := range []int{5432, 6379, 8080, 8443, 9090} {
		upstream[port] = upstreamHTTP(t, clusterNamed(t, r, fmt.Sprintf("outbound|%d||mixed.shop.svc.clusterset.local", port)))
	}
	require.Equal(t, map[int]string{5432: "", 6379: "", 8080: "HTTP/2", 8443: "HTTP/2", 9090: "HTTP/2"}, upstream,
		"h2c, kubernetes.io/h2c and gRPC ports speak HTTP/2 upstream whatever the app spoke")

	out := listenerNamed(t, r, "outbound")
	require.Equal(t, uint32(15001), out.GetAddress().GetSocketAddress().GetPortValue())
	require.Equal(t, "envoy.filters.listener.original_dst", out.GetListenerFilters()[0].GetName())
	type chain struct {
		port   uint32
		ranges []string
		filter string
		target string
	}
	var chains []chain
	for _, fc := range out.GetFilterChains() {
		c := chain{port: fc.GetFilterChainMatch().GetDestinationPort().GetValue(), filter: fc.GetFilters()[0].GetName()}
		for _, pr := range fc.GetFilterChainMatch().GetPrefixRanges() {
			c.ranges = append(c.ranges, fmt.Sprintf("%s/%d", pr.GetAddressPrefix(), pr.GetPrefixLen().GetValue()))
		}
		switch c.filter {
		case "envoy.filters.network.http_connection_manager":
			hcm := &hcmv3.HttpConnectionManager{}
			require.NoError(t, fc.GetFilters()[0].GetTypedConfig().UnmarshalTo(hcm))
			require.Equal(t, hcmv3.HttpConnectionManager_AUTO, hcm.GetCodecType())
			require.NotNil(t, hcm.GetRds().GetConfigSource().GetAds())
			c.target = "rds:" + hcm.GetRds().GetRouteConfigName()
		case "envoy.filters.network.tcp_proxy":
			p := &tcpproxyv3.TcpProxy{}
			require.NoError(t, fc.GetFilters()[0].GetTypedConfig().UnmarshalTo(p))
			c.target = p.GetCluster()
		}
		chains = append(chains, c)
	}
	ordered := []string{mixedVIP + "/32", ordersVIP + "/32"}
	if netip.MustParseAddr(ordersVIP).Less(netip.MustParseAddr(mixedVIP)) {
		ordered[0], ordered[1] = ordered[1], ordered[0]
	}
	hc := "envoy.filters.network.http_connection_manager"
	tp := "envoy.filters.network.tcp_proxy"
	require.Equal(t, []chain{
		{8080, []string{mixedVIP + "/32"}, hc, "rds:8080"},
		{8443, []string{mixedVIP + "/32"}, hc, "rds:8443"},
		{9090, ordered, hc, "rds:9090"},
		{5432, []string{mixedVIP + "/32"}, tp, "outbound|5432||mixed.shop.svc.clusterset.local"},
		{6379, []string{mixedVIP + "/32"}, tp, "outbound|6379||mixed.shop.svc.clusterset.local"},
		{15001, nil, hc, "rds:explicit"},
	}, chains, "HTTP ports (one chain per port, every VIP), TCP by VIP and port, explicit")
	def := &tcpproxyv3.TcpProxy{}
	require.NoError(t, out.GetDefaultFilterChain().GetFilters()[0].GetTypedConfig().UnmarshalTo(def))
	require.Equal(t, "PassthroughCluster", def.GetCluster())

	// Route "9090": one virtual host per service, every name it answers
	// to; "explicit": host:port only, and the bare host for port 80.
	var rc9090 []string
	for _, rc := range r.Routes {
		if rc.GetName() != "9090" {
			continue
		}
		for _, vh := range rc.GetVirtualHosts() {
			rc9090 = append(rc9090, vh.GetName()+" "+strings.Join(vh.GetDomains(), ",")+" → "+vh.GetRoutes()[0].GetRoute().GetCluster())
			require.Equal(t, "/", vh.GetRoutes()[0].GetMatch().GetPrefix())
			require.Zero(t, vh.GetRoutes()[0].GetRoute().GetTimeout().AsDuration(), "no route timeout")
		}
	}
	require.Equal(t, []string{
		"mixed.shop.svc.clusterset.local:9090 mixed.shop.svc.clusterset.local,mixed.shop.svc.clusterset.local:9090," + mixedVIP + "," + mixedVIP + ":9090 → outbound|9090||mixed.shop.svc.clusterset.local",
		"orders.shop.svc.clusterset.local:9090 orders.shop.svc.clusterset.local,orders.shop.svc.clusterset.local:9090," + ordersVIP + "," + ordersVIP + ":9090 → outbound|9090||orders.shop.svc.clusterset.local",
	}, rc9090)

	in := listenerNamed(t, r, "inbound")
	require.Equal(t, uint32(15006), in.GetAddress().GetSocketAddress().GetPortValue())
	require.Equal(t, []string{"envoy.filters.listener.original_dst", "envoy.filters.listener.tls_inspector"},
		[]string{in.GetListenerFilters()[0].GetName(), in.GetListenerFilters()[1].GetName()})
	require.Nil(t, in.GetDefaultFilterChain(), "plaintext reaches nothing")
	require.Len(t, in.GetFilterChains(), 2)
	for _, fc := range in.GetFilterChains() {
		require.Equal(t, "tls", fc.GetFilterChainMatch().GetTransportProtocol())
		down := &tlsv3.DownstreamTlsContext{}
		require.NoError(t, fc.GetTransportSocket().GetTypedConfig().UnmarshalTo(down))
		require.True(t, down.GetRequireClientCertificate().GetValue())
		require.Equal(t, "default", down.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs()[0].GetName())
		require.Equal(t, "ROOTCA", down.GetCommonTlsContext().GetValidationContextSdsSecretConfig().GetName())
		require.NotNil(t, down.GetCommonTlsContext().GetValidationContextSdsSecretConfig().GetSdsConfig().GetAds())
	}
	require.Equal(t, []string{"istio-http/1.1", "istio-h2"}, in.GetFilterChains()[0].GetFilterChainMatch().GetApplicationProtocols())
	hcm := &hcmv3.HttpConnectionManager{}
	require.NoError(t, in.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(hcm))
	require.Equal(t, hcmv3.HttpConnectionManager_SANITIZE_SET, hcm.GetForwardClientCertDetails())
	require.True(t, hcm.GetSetCurrentClientCertDetails().GetUri())
	require.Equal(t, "inbound-passthrough", hcm.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0].GetRoute().GetCluster())
	require.Equal(t, []string{"*"}, hcm.GetRouteConfig().GetVirtualHosts()[0].GetDomains())
	require.Empty(t, in.GetFilterChains()[1].GetFilterChainMatch().GetApplicationProtocols())
	inTCP := &tcpproxyv3.TcpProxy{}
	require.NoError(t, in.GetFilterChains()[1].GetFilters()[0].GetTypedConfig().UnmarshalTo(inTCP))
	require.Equal(t, "inbound-passthrough", inTCP.GetCluster())

	// TCP ports offer ALPN "istio".
	up := &tlsv3.UpstreamTlsContext{}
	require.NoError(t, clusterNamed(t, r, "outbound|5432||mixed.shop.svc.clusterset.local").GetTransportSocket().GetTypedConfig().UnmarshalTo(up))
	require.Equal(t, []string{"istio"}, up.GetCommonTlsContext().GetAlpnProtocols())
	require.Empty(t, clusterNamed(t, r, "outbound|5432||mixed.shop.svc.clusterset.local").GetTypedExtensionProtocolOptions())
	// An IPv6 pod is an endpoint like any other.
	require.Equal(t, []string{"p0 r1/z1 w2: 10.0.2.7:9090 HEALTHY [fd00::7]:9090 HEALTHY"},
		describeLoad(loadNamed(t, r, "outbound|9090||orders.shop.svc.clusterset.local")))
}

func TestSidecarExplicitRoutes(t *testing.T) {
	tc := caseNamed(t, "one-local-http-service")
	tc.local = append(tc.local, caseNamed(t, "tcp-grpc-h2c-ports").local...)
	r, _ := tc.translate(t)
	var explicit []string
	for _, rc := range r.Routes {
		if rc.GetName() == "explicit" {
			for _, vh := range rc.GetVirtualHosts() {
				explicit = append(explicit, strings.Join(vh.GetDomains(), ","))
			}
		}
	}
	require.Equal(t, []string{
		echoHost + ":80," + echoHost,
		"mixed.shop.svc.clusterset.local:8080",
		"mixed.shop.svc.clusterset.local:8443",
		"mixed.shop.svc.clusterset.local:9090",
		"orders.shop.svc.clusterset.local:9090",
	}, explicit)
}

func TestSidecarConflictsAndSkips(t *testing.T) {
	r, skipped := caseNamed(t, "port-conflict").translate(t)
	require.Equal(t, []Skipped{
		{Service: "demo/echo", Cluster: "b", Reason: `port 80 is HTTP/1.1 (name "http", appProtocol "http") here and TCP (name "tcp-legacy", appProtocol "") in cluster a, whose definition is used`},
		{Service: "demo/echo", Cluster: "c", Reason: `port 80 is HTTP/1.1 (name "http", appProtocol "http") here and TCP (name "tcp-legacy", appProtocol "") in cluster a, whose definition is used`},
	}, skipped)
	require.Equal(t, "TCP", serviceMeta(clusterNamed(t, r, "outbound|80||"+echoHost))["protocol"])
	// Port 81 is a's alone (c's is SCTP): only a's gateway serves it.
	require.Equal(t, []string{"p0 r1/z2 w1: 192.0.2.1:15443 HEALTHY"}, describeLoad(loadNamed(t, r, "outbound|81||"+echoHost)))
	// Port 80: the local pods (cluster b) still first, at their target port.
	require.Equal(t, []string{
		"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY",
		"p1 r1/z2 w1: 192.0.2.1:15443 HEALTHY",
		"p2 r2/z1 w4: 198.51.100.3:15443 HEALTHY",
	}, describeLoad(loadNamed(t, r, "outbound|80||"+echoHost)))

	r, skipped = caseNamed(t, "hostname-gateway-skipped").translate(t)
	require.Equal(t, []Skipped{
		{Service: "demo/echo", Cluster: "b", Reason: `gateway "gw.b.example:15443" is not an IP address and port: left out`},
		{Service: "demo/echo", Cluster: "c", Reason: `gateway "gw.c.example:15443" is not an IP address and port: left out`},
		{Service: "demo/echo", Cluster: "d", Reason: "names no SPIFFE identity, so its endpoints could not be verified: left out"},
	}, skipped)
	require.Equal(t, []string{"p0 r1/z1 w2: 192.0.2.10:15443 HEALTHY"}, describeLoad(loadNamed(t, r, "outbound|80||"+echoHost)))

	// Addresses no gateway can be reached at are left out the same way.
	tc := caseNamed(t, "hostname-gateway-skipped")
	for name, svcs := range tc.peers {
		for i := range svcs {
			if name == "b" {
				svcs[i].Gateways = append(slices.Clone(svcs[i].Gateways), "0.0.0.0:15443", "[ff02::1]:15443", "[::ffff:0.0.0.0]:15443")
			}
		}
	}
	r, skipped = tc.translate(t)
	require.Subset(t, skipped, []Skipped{
		{Service: "demo/echo", Cluster: "b", Reason: `gateway "0.0.0.0:15443" is not a unicast address: left out`},
		{Service: "demo/echo", Cluster: "b", Reason: `gateway "[ff02::1]:15443" is not a unicast address: left out`},
		{Service: "demo/echo", Cluster: "b", Reason: `gateway "[::ffff:0.0.0.0]:15443" is not a unicast address: left out`},
	})
	require.Equal(t, []string{"p0 r1/z1 w2: 192.0.2.10:15443 HEALTHY"}, describeLoad(loadNamed(t, r, "outbound|80||"+echoHost)))

	// A service nobody names an identity for is not served at all: an
	// empty SAN list would accept any identity.
	anon := localEcho()
	anon.Identities = nil
	r, skipped, err := TranslateSidecar(SidecarInput{Local: snapshotOf(t, anon)}, SidecarOptions{})
	require.NoError(t, err)
	require.Equal(t, []Skipped{{Service: "demo/echo", Cluster: "a", Reason: "names no SPIFFE identity, so its endpoints could not be verified: left out"}}, skipped)
	require.Equal(t, []string{"PassthroughCluster", "inbound-passthrough"}, r.Names()[resource.ClusterType])

	// Nor is one without a TCP port.
	udp := localEcho()
	udp.Ports = []catalog.Port{{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP}}
	_, skipped, err = TranslateSidecar(SidecarInput{Local: snapshotOf(t, udp)}, SidecarOptions{})
	require.NoError(t, err)
	require.Equal(t, []Skipped{{Service: "demo/echo", Reason: "no TCP port: not a clusterset service"}}, skipped)

	// Two peers advertising one gateway address: Envoy would keep only
	// the first endpoint, so the second is left out and said so.
	_, skipped, err = TranslateSidecar(SidecarInput{Local: nil, Peers: []*catalog.Snapshot{
		peerSnapshot(t, "b", peerEcho("b", catalog.Locality{}, 1, 0, gwB)),
		peerSnapshot(t, "c", peerEcho("c", catalog.Locality{}, 1, 0, gwB)),
	}},

		SidecarOptions{})

	require.NoError(t, err)
	require.Equal(t, []Skipped{{Service: "demo/echo", Cluster: "c", Reason: "gateway 192.0.2.10:15443 is also another exporter's: left out"}}, skipped)
}

// Two exporters that declare one port HTTP/1.1 and HTTP/2 disagree as
// much as HTTP and TCP: one cluster speaks one version upstream. The
// lowest cluster name's definition wins, and the incremental translator
// follows the change.
func TestSidecarHTTPVersionConflict(t *testing.T) {
	r1z1 := catalog.Locality{Region: "r1", Zone: "z1"}
	web := func(appProtocol string) []catalog.Port {
		return []catalog.Port{{Name: "web", Port: 80, AppProtocol: appProtocol, TargetPort: 8080}}
	}
	local := localEcho()
	local.Cluster = "b"
	local.Identities = []string{echoIDB}
	local.Ports = web("http")
	peerA := peerEcho("a", r1z1, 1, 0, "192.0.2.1:15443")
	peerA.Ports = web("http")
	in := func(peerAppProtocol string) SidecarInput {
		peerA.Ports = web(peerAppProtocol)
		return SidecarInput{Local: snapshotOf(t, local), Peers: []*catalog.Snapshot{peerSnapshot(t, "a", peerA)}}
	}
	tr, err := NewSidecarTranslator(SidecarOptions{Region: "r1"})
	require.NoError(t, err)

	agree, skipped, err := tr.Translate(in("http"))
	require.NoError(t, err)
	require.Empty(t, skipped)
	require.Equal(t, "HTTP/1.1", upstreamHTTP(t, clusterNamed(t, agree, "outbound|80||"+echoHost)))

	for _, tc := range []struct{ appProtocol, up, reason string }{
		{"grpc", "HTTP/2", `port 80 is HTTP/1.1 (name "web", appProtocol "http") here and HTTP/2 (name "web", appProtocol "grpc") in cluster a, whose definition is used`},
		{"kubernetes.io/h2c", "HTTP/2", `port 80 is HTTP/1.1 (name "web", appProtocol "http") here and HTTP/2 (name "web", appProtocol "kubernetes.io/h2c") in cluster a, whose definition is used`},
		{"HTTP", "HTTP/1.1", ""},
	} {
		want, wantSkipped, err := TranslateSidecar(in(tc.appProtocol), SidecarOptions{Region: "r1"})
		require.NoError(t, err)
		if tc.reason == "" {
			require.Empty(t, wantSkipped, tc.appProtocol)
		} else {
			require.Equal(t, []Skipped{{Service: "demo/echo", Cluster: "b", Reason: tc.reason}}, wantSkipped)
		}
		require.Equal(t, tc.up, upstreamHTTP(t, clusterNamed(t, want, "outbound|80||"+echoHost)), tc.appProtocol)
		require.Equal(t, "HTTP", serviceMeta(clusterNamed(t, want, "outbound|80||"+echoHost))["protocol"])
		got, gotSkipped, err := tr.Translate(in(tc.appProtocol))
		require.NoError(t, err)
		requireSameSidecar(t, want, got, wantSkipped, gotSkipped, tc.appProtocol)
	}
}

func TestSidecarVIPs(t *testing.T) {
	r, _ := caseNamed(t, "vip-collision").translate(t)
	vips := map[string]string{}
	for _, c := range r.Clusters {
		if m := serviceMeta(c); m != nil {
			vips[m["host"].(string)] = m["vip"].(string)
		}
	}
	require.Equal(t, map[string]string{
		"svc134.demo.svc.clusterset.local": "240.240.48.147", // its own hash
		"svc270.demo.svc.clusterset.local": "240.240.48.148", // the same hash, later in host order
		"svc15.demo.svc.clusterset.local":  "240.240.34.1",   // hash ends in .0
		"svc369.demo.svc.clusterset.local": "240.240.227.1",  // hash ends in .255: the next .0 is skipped too
	}, vips)

	// The same set of hosts gives the same VIPs whoever exports them.
	var fromPeers []catalog.Service
	for _, s := range caseNamed(t, "vip-collision").local {
		s.Cluster = "b"
		s.Gateways = []string{gwB}
		fromPeers = append(fromPeers, s)
	}
	rp, _, err := TranslateSidecar(SidecarInput{Local: nil, Peers: []*catalog.Snapshot{peerSnapshot(t, "b", fromPeers...)}}, SidecarOptions{})
	require.NoError(t, err)
	for _, c := range rp.Clusters {
		if m := serviceMeta(c); m != nil {
			require.Equal(t, vips[m["host"].(string)], m["vip"], m["host"])
		}
	}

	// Probing wraps, skips .0 and .255, and ends when the range is full.
	var table vipTable
	a, ok := table.take(0xfffe)
	require.True(t, ok)
	require.Equal(t, "240.240.255.254", a.String())
	a, _ = table.take(0xfffe)
	require.Equal(t, "240.240.0.1", a.String(), "wrapped past .255.255 and .0.0")
	for range 256*254 - 2 {
		_, ok = table.take(0x1234)
		require.True(t, ok)
	}
	_, ok = table.take(0x1234)
	require.False(t, ok, "65024 addresses, all taken")
}

func TestSidecarPeerOrderDoesNotMatter(t *testing.T) {
	tc := caseNamed(t, "local-and-peers-in-two-regions")
	r, _ := tc.translate(t)
	var peers []*catalog.Snapshot
	for _, name := range []string{"d", "b", "c"} {
		peers = append(peers, peerSnapshot(t, name, tc.peers[name]...))
	}
	shuffled, _, err := TranslateSidecar(SidecarInput{Local: snapshotOf(t, tc.local...), Peers: peers}, SidecarOptions{Region: tc.region})
	require.NoError(t, err)
	require.Equal(t, r.Version, shuffled.Version)
}

func TestSidecarVersionFollowsContent(t *testing.T) {
	tc := caseNamed(t, "local-and-peers-in-two-regions")
	base, _ := tc.translate(t)

	// A peer's pod turning ready is a new version.
	tc.peers["c"] = []catalog.Service{peerEcho("c", catalog.Locality{Region: "r2", Zone: "z1"}, 1, 1, "198.51.100.7:15443")}
	ready, _ := tc.translate(t)
	require.NotEqual(t, base.Version, ready.Version)

	// What the sidecar does not see leaves it alone: the peers a local
	// export is narrowed to.
	tc = caseNamed(t, "local-and-peers-in-two-regions")
	tc.local[0].Peers = []string{"b"}
	same, _ := tc.translate(t)
	require.Equal(t, base.Version, same.Version)

	// A route-only change (a new VIP for a new HTTP service) is in the
	// version too.
	tc = caseNamed(t, "one-local-http-service")
	one, _ := tc.translate(t)
	other := localEcho()
	other.Name = "echo2"
	tc.local = append(tc.local, other)
	two, _ := tc.translate(t)
	require.NotEqual(t, one.Version, two.Version)
}

func TestTranslateSidecarRefusesBadSources(t *testing.T) {
	_, _, err := TranslateSidecar(SidecarInput{Local: peerSnapshot(t, "b")}, SidecarOptions{})
	require.ErrorContains(t, err, `local catalog has source "b"`)
	_, _, err = TranslateSidecar(SidecarInput{Local: nil, Peers: []*catalog.Snapshot{peerSnapshot(t, "b"), peerSnapshot(t, "b")}}, SidecarOptions{})
	require.ErrorContains(t, err, `peer catalog source "b" is the local one or listed twice`)
	_, _, err = TranslateSidecar(SidecarInput{Local: nil, Peers: []*catalog.Snapshot{snapshotOf(t)}}, SidecarOptions{})
	require.ErrorContains(t, err, `peer catalog source "local"`)
}

// sidecarBenchCatalogs are n clusterset services over ten namespaces:
// every one exported locally with three pods in three zones, every
// second one also by peer b (same region), every fourth by peer c
// (another region); every third has a TCP port besides its HTTP one.
func sidecarBenchCatalogs(tb testing.TB, n int) (*catalog.Snapshot, []*catalog.Snapshot) {
	tb.Helper()
	local, b, c := catalog.NewBuilder(catalog.LocalSource), catalog.NewBuilder("b"), catalog.NewBuilder("c")
	for i := range n {
		ns, name := fmt.Sprintf("ns-%02d", i%10), fmt.Sprintf("svc-%05d", i)
		ports := []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http", TargetPort: 8080}}
		if i%3 == 0 {
			ports = append(ports, catalog.Port{Name: "tcp-db", Port: 5432, TargetPort: 5432})
		}
		svc := catalog.Service{Namespace: ns, Name: name, Cluster: "a", Ports: ports,
			Identities: []string{"spiffe://a.mesh/ns/" + ns + "/sa/" + name}}
		for z := range 3 {
			svc.Endpoints = append(svc.Endpoints, catalog.LocalityEndpoints{
				Locality: catalog.Locality{Region: "r1", Zone: fmt.Sprintf("z%d", z)}, Ready: 1,
				Addresses: []catalog.Address{{IP: fmt.Sprintf("10.%d.%d.%d", z, i/256%256, i%256), Ready: true}},
			})
		}
		require.NoError(tb, local.Put(svc))
		for _, p := range []struct {
			builder *catalog.Builder
			peer    string
			every   int
			region  string
			gateway string
		}{{b, "b", 2, "r1", "192.0.2.10:15443"}, {c, "c", 4, "r2", "198.51.100.7:15443"}} {
			if i%p.every != 0 {
				continue
			}
			imp := svc.Clone()
			imp.Cluster = p.peer
			imp.Identities = []string{"spiffe://" + imp.Cluster + ".mesh/ns/" + ns + "/sa/" + name}
			imp.Gateways = []string{p.gateway}
			imp.Endpoints = []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: p.region, Zone: "z1"}, Ready: 2}}
			for j := range imp.Ports {
				imp.Ports[j].TargetPort = 0
			}
			require.NoError(tb, p.builder.Put(imp))
		}
	}
	return local.Build(), []*catalog.Snapshot{b.Build(), c.Build()}
}

// podNotReady is a copy of svc, one of sidecarBenchCatalogs', whose pod
// in its locality loc (the only one there) is not ready.
func podNotReady(svc *catalog.Service, loc int) catalog.Service {
	c := svc.Clone()
	c.Endpoints[loc].Addresses[0].Ready = false
	c.Endpoints[loc].Ready, c.Endpoints[loc].NotReady = 0, 1
	return c
}

// BenchmarkTranslateSidecar is the sidecars' translation, which the
// federator runs on every change of the local catalog or of a peer's
// imports: from scratch (full, TranslateSidecar), and by the federator's
// SidecarTranslator on a change of one local service's endpoints
// (one-service-change: a pod turns not ready, then ready again) and on
// a service added or removed (one-service-added: new clusters, chains
// and virtual hosts, and VIPs that may move). Run with
//
//	go test -run '^$' -bench TranslateSidecar -benchmem ./pkg/xds/
func BenchmarkTranslateSidecar(b *testing.B) {
	opts := SidecarOptions{Region: "r1"}
	for _, n := range []int{1000, 10000} {
		local, peers := sidecarBenchCatalogs(b, n)
		b.Run(fmt.Sprintf("services=%d/full", n), func(b *testing.B) {
			var r Resources
			cpu := startCPU()
			for b.Loop() {
				var err error
				if r, _, err = TranslateSidecar(SidecarInput{Local: local, Peers: peers}, opts); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
			b.ReportMetric(float64(len(r.Clusters)), "clusters")
		})
		// Catalogs one service away from local: a pod of service i not
		// ready, for a few i spread over the catalog.
		keys := local.Keys()
		var changes []*catalog.Snapshot
		for _, i := range []int{0, n / 3, n / 2, n - 1} {
			svc, _ := local.Get(keys[i])
			c := podNotReady(svc, 0)
			bld := local.Builder()
			require.NoError(b, bld.Put(c))
			changes = append(changes, bld.Build())
		}
		b.Run(fmt.Sprintf("services=%d/one-service-change", n), func(b *testing.B) {
			tr, err := NewSidecarTranslator(opts)
			require.NoError(b, err)
			_, _, err = tr.Translate(SidecarInput{Local: local, Peers: peers})
			require.NoError(b, err)
			i := 0
			cpu := startCPU()
			for b.Loop() {
				// change 0, base, change 1, base, …: every translation
				// sees one service differ from the one before.
				snap := local
				if i%2 == 0 {
					snap = changes[i/2%len(changes)]
				}
				if _, _, err := tr.Translate(SidecarInput{Local: snap, Peers: peers}); err != nil {
					b.Fatal(err)
				}
				i++
			}
			cpu.report(b)
		})
		b.Run(fmt.Sprintf("services=%d/one-service-added", n), func(b *testing.B) {
			// A service exported locally and by peer b, with an HTTP
			// and a TCP port: the port 80 chain, route and explicit
			// route are made again, and the listener and every cluster
			// hashed again.
			bigger, biggerPeers := sidecarBenchCatalogs(b, n+1)
			svc, _ := bigger.Get(catalog.ServiceKey{Namespace: fmt.Sprintf("ns-%02d", n%10), Name: fmt.Sprintf("svc-%05d", n)})
			bld := local.Builder()
			require.NoError(b, bld.Put(*svc))
			more := bld.Build()
			imp, ok := biggerPeers[0].Get(svc.Key())
			require.True(b, ok, "every second service is imported from b")
			pb := peers[0].Builder()
			require.NoError(b, pb.Put(*imp))
			morePeers := []*catalog.Snapshot{pb.Build(), peers[1]}
			tr, err := NewSidecarTranslator(opts)
			require.NoError(b, err)
			_, _, err = tr.Translate(SidecarInput{Local: local, Peers: peers})
			require.NoError(b, err)
			i := 0
			cpu := startCPU()
			for b.Loop() {
				// Added, removed, added, …
				snap, ps := local, peers
				if i%2 == 0 {
					snap, ps = more, morePeers
				}
				if _, _, err := tr.Translate(SidecarInput{Local: snap, Peers: ps}); err != nil {
					b.Fatal(err)
				}
				i++
			}
			cpu.report(b)
		})
	}
}

// BenchmarkSidecarRetained reports the heap the federator keeps for the
// sidecars' configuration of a catalog: its SidecarTranslator (whose
// last result is the Resources served) and the go-control-plane
// snapshot; and, for comparison, TranslateSidecar's Resources with
// their snapshot, which is what it kept before.
func BenchmarkSidecarRetained(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		local, peers := sidecarBenchCatalogs(b, n)
		for _, incremental := range []bool{false, true} {
			name := "full"
			if incremental {
				name = "translator"
			}
			b.Run(fmt.Sprintf("services=%d/%s", n, name), func(b *testing.B) {
				var mb float64
				for b.Loop() {
					mb = retainedMB(func() any {
						var kept any
						var res Resources
						var err error
						if incremental {
							tr, terr := NewSidecarTranslator(SidecarOptions{Region: "r1"})
							require.NoError(b, terr)
							res, _, err = tr.Translate(SidecarInput{Local: local, Peers: peers})
							kept = tr
						} else {
							res, _, err = TranslateSidecar(SidecarInput{Local: local, Peers: peers}, SidecarOptions{Region: "r1"})
							kept = res
						}
						require.NoError(b, err)
						s, err := res.Snapshot()
						require.NoError(b, err)
						return []any{kept, s}
					})
				}
				b.ReportMetric(mb, "retained-MB")
			})
		}
	}
}

// The locality weights of one priority add up to a uint32 at most, as
// Envoy's API requires (a stock Envoy and gRPC's xDS client refuse the
// assignment otherwise): a peer reports up to MaxInt32 ready endpoints
// per locality, the peer's locality weighs them all (capped at the
// uint32 limit), and another peer's locality shares the priority. They
// are scaled down in proportion, each keeping a weight.
func TestLocalityWeightsOfAPriorityFitAUint32(t *testing.T) {
	b := peerEcho("b", catalog.Locality{Region: "r2", Zone: "z1"}, math.MaxInt32, 0, "192.0.2.1:15443")
	b.Endpoints = append(b.Endpoints,
		catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r2", Zone: "z2"}, Ready: math.MaxInt32},
		catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r2", Zone: "z3"}, Ready: math.MaxInt32})
	c := peerEcho("c", catalog.Locality{Region: "r3", Zone: "z9"}, 1, 0, "192.0.2.2:15443")
	res := sidecarTranslated(t, []catalog.Service{localEcho()}, map[string][]catalog.Service{"b": {b}, "c": {c}})
	checked := 0
	for _, cla := range res.Endpoints {
		require.NoError(t, cla.Validate())
		sums := map[uint32]uint64{}
		weights := map[string]uint32{}
		for _, lle := range cla.GetEndpoints() {
			sums[lle.GetPriority()] += uint64(lle.GetLoadBalancingWeight().GetValue())
			weights[lle.GetLocality().GetZone()] = lle.GetLoadBalancingWeight().GetValue()
		}
		for p, s := range sums {
			require.LessOrEqual(t, s, uint64(math.MaxUint32), "%s priority %d", cla.GetClusterName(), p)
		}
		if w, ok := weights["z9"]; ok {
			checked++
			require.Equal(t, uint32(1), w, "the small locality keeps a weight")
			require.Greater(t, weights["z1"], uint32(1<<31))
		}
	}
	require.Positive(t, checked)
}

// A peer that names another exporter's address, a local pod's or another
// peer's gateway, never shadows it with its own health: the local pods
// claim their addresses first, then the peers with the most ready
// endpoints, and the claimant loses the address and is reported. Before,
// the exporter whose cluster name sorted first kept the address, so a
// peer "aaa" with nothing ready made an honest peer's three ready
// endpoints (or a local pod) UNHEALTHY: the service was unreachable.
func TestPeerCannotShadowAnotherExportersAddress(t *testing.T) {
	r1 := catalog.Locality{Region: "r1", Zone: "z1"}
	honest := peerEcho("good", r1, 3, 0, gwB)
	claimant := peerEcho("aaa", r1, 0, 1, gwB)
	r, skipped, err := TranslateSidecar(SidecarInput{Peers: []*catalog.Snapshot{
		peerSnapshot(t, "good", honest), peerSnapshot(t, "aaa", claimant)}}, SidecarOptions{})
	require.NoError(t, err)
	load := describeLoad(loadNamed(t, r, "outbound|80||"+echoHost))
	require.Equal(t, []string{"p0 r1/z1 w3: " + gwB + " HEALTHY"}, load)
	require.Contains(t, fmt.Sprint(skipped), "aaa gateway "+gwB+" is also another exporter's: left out")

	local := localEcho()
	podAddr := netip.AddrPortFrom(netip.MustParseAddr(local.Endpoints[0].Addresses[0].IP), 8080).String()
	onPod := peerEcho("aaa", r1, 0, 1, podAddr)
	r, skipped, err = TranslateSidecar(SidecarInput{Local: snapshotOf(t, local), Peers: []*catalog.Snapshot{peerSnapshot(t, "aaa", onPod)}}, SidecarOptions{})
	require.NoError(t, err)
	load = describeLoad(loadNamed(t, r, "outbound|80||"+echoHost))
	require.Len(t, load, 1, "the claimant's priority is gone: %v", load)
	require.True(t, strings.HasPrefix(load[0], "p0 "), "%v", load)
	require.Contains(t, load[0], podAddr+" HEALTHY", "the local pod keeps its place and health")
	require.Contains(t, fmt.Sprint(skipped), "gateway "+podAddr+" is also another exporter's: left out")
}
