package xds

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// echoService is demo/echo with two TCP ports in two localities, one
// endpoint not ready.
func echoService() catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "echo", Cluster: "a",
		Ports: []catalog.Port{
			{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, AppProtocol: "http", TargetPort: 8080},
			{Name: "grpc", Port: 9090, Protocol: catalog.ProtocolTCP, TargetPort: 9091},
		},
		Endpoints: []catalog.LocalityEndpoints{
			{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1, NotReady: 1, Addresses: []catalog.Address{
				{IP: "10.0.1.2", Ready: true}, {IP: "10.0.1.3", Ready: false},
			}},
			{Locality: catalog.Locality{Region: "r1", Zone: "z2", Subzone: "rack7"}, Ready: 1, Addresses: []catalog.Address{
				{IP: "10.0.2.2", Ready: true},
			}},
		},
	}
}

func snapshotOf(t testing.TB, svcs ...catalog.Service) *catalog.Snapshot {
	t.Helper()
	s, err := catalog.NewSnapshot(catalog.LocalSource, svcs)
	require.NoError(t, err)
	return s
}

// render writes resources as indented protojson, one list per type, in
// the Resources' own order. protojson's output is deliberately unstable
// in its whitespace, so it is compacted and indented again.
func render(t testing.TB, r Resources) []byte {
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
		Clusters  []json.RawMessage `json:"clusters"`
		Endpoints []json.RawMessage `json:"endpoints"`
	}{Version: r.Version, Versions: r.TypeVersions(), Listeners: []json.RawMessage{}, Clusters: []json.RawMessage{}, Endpoints: []json.RawMessage{}}
	for _, l := range r.Listeners {
		doc.Listeners = append(doc.Listeners, enc(l))
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

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		require.NoError(t, os.MkdirAll("testdata", 0o755))
		require.NoError(t, os.WriteFile(path, got, 0o644))
		return
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "run `go test ./pkg/xds -run TestTranslateGateway -update` to create it")
	require.Equal(t, string(want), string(got), "%s differs; rerun with -update if the change is intended", path)
}

func TestTranslateGatewayGolden(t *testing.T) {
	const ipUpstream = "10.96.0.19:15019"
	udp := catalog.Service{
		Namespace: "dns", Name: "resolver", Cluster: "a",
		Ports: []catalog.Port{
			{Name: "dns-udp", Port: 53, Protocol: catalog.ProtocolUDP, TargetPort: 5353},
			{Name: "dns-tcp", Port: 53, Protocol: catalog.ProtocolTCP, TargetPort: 5353},
			{Name: "sctp", Port: 3868, Protocol: catalog.ProtocolSCTP},
		},
		Endpoints: []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1"}, Ready: 1,
			Addresses: []catalog.Address{{IP: "10.0.3.4", Ready: true}}}},
	}
	noTarget := catalog.Service{
		Namespace: "shop", Name: "cart", Cluster: "a",
		Ports: []catalog.Port{{Port: 7000}},
		Endpoints: []catalog.LocalityEndpoints{{Ready: 2, Addresses: []catalog.Address{
			{IP: "fd00::2", Ready: true}, {IP: "10.0.4.1", Ready: true},
		}}},
	}
	tests := []struct {
		name     string
		services []catalog.Service
		upstream string
	}{
		{name: "no-services", upstream: ipUpstream},
		{name: "two-ports-two-localities", services: []catalog.Service{echoService()}, upstream: ipUpstream},
		{name: "udp-port-skipped", services: []catalog.Service{udp}, upstream: ipUpstream},
		{name: "hostname-federation-upstream", upstream: "isthmus-federator.isthmus-system.svc:15019"},
		{name: "no-target-port", services: []catalog.Service{noTarget}, upstream: ipUpstream},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			snap := snapshotOf(t, tc.services...)
			r, err := TranslateGateway(snap, GatewayOptions{FederationUpstream: tc.upstream})
			require.NoError(t, err)
			golden(t, tc.name+".json", render(t, r))

			// Pure: the same input, the same output and version.
			again, err := TranslateGateway(snapshotOf(t, tc.services...), GatewayOptions{FederationUpstream: tc.upstream})
			require.NoError(t, err)
			require.Equal(t, r.Version, again.Version)
			require.Equal(t, render(t, r), render(t, again))

			// Always a consistent snapshot.
			xs, err := r.Snapshot()
			require.NoError(t, err)
			require.NoError(t, xs.Consistent())
		})
	}
}

// The golden files are the contract in full; these assertions say in
// words what matters most in them, so a careless -update is caught.
func TestTranslateGatewayContract(t *testing.T) {
	r, err := TranslateGateway(snapshotOf(t, echoService()), GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)
	require.Len(t, r.Listeners, 1)
	lis := r.Listeners[0]
	require.Equal(t, "eastwest-gw", lis.GetName())
	require.Equal(t, uint32(15443), lis.GetAddress().GetSocketAddress().GetPortValue())
	require.Nil(t, lis.GetDefaultFilterChain(), "an unknown SNI must match nothing")

	var snis []string
	for _, fc := range lis.GetFilterChains() {
		snis = append(snis, fc.GetFilterChainMatch().GetServerNames()...)
	}
	require.Equal(t, []string{
		federation.ReservedSNI,
		"outbound_.80_._.echo.demo.svc.cluster.local",
		"outbound_.9090_._.echo.demo.svc.cluster.local",
	}, snis, "one chain per SNI, sorted")

	proxy := &tcpproxyv3.TcpProxy{}
	require.NoError(t, lis.GetFilterChains()[1].GetFilters()[0].GetTypedConfig().UnmarshalTo(proxy))
	require.Equal(t, "outbound|80||echo.demo.svc.cluster.local", proxy.GetCluster())

	require.Equal(t, map[string][]string{
		"type.googleapis.com/envoy.config.listener.v3.Listener": {"eastwest-gw"},
		"type.googleapis.com/envoy.config.cluster.v3.Cluster": {
			"isthmus-federation", "outbound|80||echo.demo.svc.cluster.local", "outbound|9090||echo.demo.svc.cluster.local",
		},
		"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": {
			"outbound|80||echo.demo.svc.cluster.local", "outbound|9090||echo.demo.svc.cluster.local",
		},
	}, r.Names())

	cla := r.Endpoints[0]
	require.Len(t, cla.GetEndpoints(), 2, "one LocalityLbEndpoints per locality")
	z1 := cla.GetEndpoints()[0]
	require.Equal(t, "z1", z1.GetLocality().GetZone())
	require.Equal(t, "10.0.1.2", z1.GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
	require.Equal(t, uint32(8080), z1.GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetPortValue(), "target port")
	require.Equal(t, "HEALTHY", z1.GetLbEndpoints()[0].GetHealthStatus().String())
	require.Equal(t, "UNHEALTHY", z1.GetLbEndpoints()[1].GetHealthStatus().String(), "a not-ready pod is listed but never picked")

	require.Equal(t, clusterv3.Cluster_STATIC, r.Clusters[0].GetType())
	host, err := TranslateGateway(snapshotOf(t), GatewayOptions{FederationUpstream: "federator.example:15019"})
	require.NoError(t, err)
	require.Equal(t, clusterv3.Cluster_STRICT_DNS, host.Clusters[0].GetType())
}

func TestTranslateGatewayVersionFollowsContent(t *testing.T) {
	opts := GatewayOptions{FederationUpstream: "10.96.0.19:15019"}
	base, err := TranslateGateway(snapshotOf(t, echoService()), opts)
	require.NoError(t, err)

	// A change the gateway does not see (the port's app protocol) leaves
	// the version alone: nothing is pushed.
	s := echoService()
	s.Ports[0].AppProtocol = "http2"
	s.Identities = []string{"spiffe://a.mesh/ns/demo/sa/echo"}
	same, err := TranslateGateway(snapshotOf(t, s), opts)
	require.NoError(t, err)
	require.Equal(t, base.Version, same.Version)

	// A pod turning ready is a new version.
	s = echoService()
	s.Endpoints[0].Addresses[1].Ready = true
	ready, err := TranslateGateway(snapshotOf(t, s), opts)
	require.NoError(t, err)
	require.NotEqual(t, base.Version, ready.Version)

	// So is another federation upstream.
	opts.FederationUpstream = "10.96.0.20:15019"
	moved, err := TranslateGateway(snapshotOf(t, echoService()), opts)
	require.NoError(t, err)
	require.NotEqual(t, base.Version, moved.Version)
}

func TestTranslateGatewayRefusesBadUpstream(t *testing.T) {
	for _, tc := range []struct{ upstream, want string }{
		{"", "no federation upstream"},
		{"10.0.0.1", "missing port"},
		{"10.0.0.1:0", "port must be between 1 and 65535"},
		{"10.0.0.1:http", `port "http" is not a number`},
		{":15019", "no host"},
		{"bad_name!:15019", "neither an IP nor a DNS name"},
		{"fe80::1%eth0:15019", "too many colons"},
		{"[fe80::1%eth0]:15019", "neither an IP nor a DNS name"},
	} {
		t.Run(tc.upstream, func(t *testing.T) {
			_, err := TranslateGateway(snapshotOf(t), GatewayOptions{FederationUpstream: tc.upstream})
			require.ErrorContains(t, err, `cluster "isthmus-federation"`)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// A resource that fails go-control-plane's Validate() is refused with its
// name, never emitted.
func TestResourcesValidateEach(t *testing.T) {
	bad := edsCluster("")
	_, err := newResources(nil, []*clusterv3.Cluster{bad}, nil)
	require.ErrorContains(t, err, `cluster "" is invalid`)
	require.ErrorContains(t, err, "Name")

	neg := edsCluster("outbound|1||x.y.svc.cluster.local")
	neg.ConnectTimeout.Seconds = -1
	_, err = newResources(nil, []*clusterv3.Cluster{neg}, nil)
	require.ErrorContains(t, err, `cluster "outbound|1||x.y.svc.cluster.local" is invalid`)
	require.ErrorContains(t, err, "ConnectTimeout")
}

func TestSnapshotRefusesInconsistency(t *testing.T) {
	r, err := TranslateGateway(snapshotOf(t, echoService()), GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)
	r.Endpoints = r.Endpoints[:1]
	_, err = r.Snapshot()
	require.ErrorContains(t, err, "inconsistent")
}

func TestRenderIsStable(t *testing.T) {
	r, err := TranslateGateway(snapshotOf(t, echoService()), GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)
	first := render(t, r)
	for range 20 {
		require.True(t, bytes.Equal(first, render(t, r)))
	}
}
