package kube

import (
	"encoding/json"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	networkingapi "istio.io/api/networking/v1alpha3"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// importSvc is demo/echo as one peer exports it.
func importSvc(peer string, gateways []string, eps ...catalog.LocalityEndpoints) catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "echo", Cluster: peer,
		Ports: []catalog.Port{
			{Name: "http", Port: 80, AppProtocol: "http"},
			{Name: "grpc-api", Port: 9090},
		},
		Endpoints:  eps,
		Identities: []string{"spiffe://" + peer + ".mesh/ns/demo/sa/echo"},
		Gateways:   gateways,
	}
}

func loc(region, zone, subzone string, ready, notReady int) catalog.LocalityEndpoints {
	return catalog.LocalityEndpoints{Locality: catalog.Locality{Region: region, Zone: zone, Subzone: subzone}, Ready: ready, NotReady: notReady}
}

func snapOf(t testing.TB, source string, svcs ...catalog.Service) *catalog.Snapshot {
	t.Helper()
	s, err := catalog.NewSnapshot(source, svcs)
	require.NoError(t, err)
	return s
}

func noNamespaceProblem(string) string { return "" }

// specJSON renders a ServiceEntry spec the way the API server stores it,
// so that a failed comparison shows a readable diff.
func specJSON(t testing.TB, spec *networkingapi.ServiceEntry) string {
	t.Helper()
	b, err := json.Marshal(spec)
	require.NoError(t, err)
	return string(b)
}

func TestPlanTwoPeersOneServiceEntry(t *testing.T) {
	b := importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "z1", "", 2, 0), loc("r1", "z2", "", 0, 1))
	c := importSvc("c", []string{"10.2.0.1:15443"}, loc("r2", "z1", "s1", 3, 0))
	c.Ports = append(c.Ports, catalog.Port{Name: "admin", Port: 8443, AppProtocol: "https"})
	own := importSvc("a", []string{"10.9.0.1:15443"}, loc("r9", "", "", 5, 0))
	plan := planImports("a", []*catalog.Snapshot{
		snapOf(t, "b", b), snapOf(t, "c", c),
		snapOf(t, "a", own),                 // this cluster's name: not a peer
		snapOf(t, catalog.LocalSource, own), // the local exports: not a peer
	}, noNamespaceProblem)

	require.Empty(t, plan.skipped.normalize())
	require.Len(t, plan.services, 1)
	svc := plan.services[0]
	require.Equal(t, []string{"b", "c"}, svc.peers)
	require.Equal(t, "echo.clusterset.local", svc.se.Name)
	require.Equal(t, "demo", svc.se.Namespace)
	require.Equal(t, map[string]string{LabelManagedBy: ManagedByIsthmus, LabelServiceName: "echo"}, svc.se.Labels)

	epLabels := func(peer string) map[string]string {
		return map[string]string{LabelSourceCluster: peer, LabelServiceName: "echo"}
	}
	gwPorts := map[string]uint32{"http": 15443, "admin": 15443, "grpc-api": 15443}
	want := &networkingapi.ServiceEntry{
		Hosts:      []string{"echo.demo.svc.clusterset.local"},
		Location:   networkingapi.ServiceEntry_MESH_INTERNAL,
		Resolution: networkingapi.ServiceEntry_STATIC,
		// The union of both peers' ports; protocols from appProtocol, else
		// from the name's prefix.
		Ports: []*networkingapi.ServicePort{
			{Number: 80, Protocol: "HTTP", Name: "http"},
			{Number: 8443, Protocol: "TLS", Name: "admin"},
			{Number: 9090, Protocol: "GRPC", Name: "grpc-api"},
		},
		SubjectAltNames: []string{"spiffe://b.mesh/ns/demo/sa/echo", "spiffe://c.mesh/ns/demo/sa/echo"},
		Endpoints: []*networkingapi.WorkloadEntry{
			// r1/z2 has no ready endpoint: no endpoint at all, not weight 0.
			{Address: "10.1.0.1", Ports: gwPorts, Labels: epLabels("b"), Network: "b", Locality: "r1/z1", Weight: 2},
			{Address: "10.2.0.1", Ports: gwPorts, Labels: epLabels("c"), Network: "c", Locality: "r2/z1/s1", Weight: 3},
		},
	}
	require.JSONEq(t, specJSON(t, want), specJSON(t, &svc.se.Spec))

	require.Equal(t, "echo", svc.si.Name)
	require.Equal(t, "ClusterSetIP", string(svc.si.Spec.Type))
	require.Len(t, svc.si.Spec.Ports, 3)
	require.Equal(t, "admin", svc.si.Spec.Ports[1].Name)
	require.Equal(t, "https", *svc.si.Spec.Ports[1].AppProtocol)
	require.Equal(t, int32(8443), svc.si.Spec.Ports[1].Port)
	require.Len(t, svc.si.Status.Clusters, 2)
	require.Equal(t, "b", svc.si.Status.Clusters[0].Cluster)
	require.Equal(t, "c", svc.si.Status.Clusters[1].Cluster)
}

func TestPlanIsDeterministic(t *testing.T) {
	b := importSvc("b", []string{"gw-b.example.net:15443", "10.1.0.1:15443"}, loc("r1", "z1", "", 2, 0), loc("r1", "z2", "", 1, 0))
	c := importSvc("c", []string{"10.2.0.1:15443"}, loc("r2", "z1", "", 3, 0))
	snaps := []*catalog.Snapshot{snapOf(t, "b", b), snapOf(t, "c", c)}
	first := planImports("a", snaps, noNamespaceProblem)
	for range 20 {
		again := planImports("a", []*catalog.Snapshot{snaps[1], snaps[0]}, noNamespaceProblem)
		require.JSONEq(t, specJSON(t, &first.services[0].se.Spec), specJSON(t, &again.services[0].se.Spec))
	}
}

func TestPlanGatewaysAndResolution(t *testing.T) {
	tests := []struct {
		name        string
		gateways    []string
		eps         []catalog.LocalityEndpoints
		resolution  networkingapi.ServiceEntry_Resolution
		endpoints   []string // address@locality=weight
		skipReasons []string
	}{
		{
			name: "IP gateways are STATIC", gateways: []string{"10.1.0.1:15443"},
			eps: []catalog.LocalityEndpoints{loc("r1", "", "", 4, 0)}, resolution: networkingapi.ServiceEntry_STATIC,
			endpoints: []string{"10.1.0.1@r1=4"},
		},
		{
			name: "IPv6 gateway is STATIC", gateways: []string{"[fd00::1]:15443"},
			eps: []catalog.LocalityEndpoints{loc("r1", "z1", "", 1, 0)}, resolution: networkingapi.ServiceEntry_STATIC,
			endpoints: []string{"fd00::1@r1/z1=1"},
		},
		{
			name: "a hostname gateway makes it DNS", gateways: []string{"10.1.0.1:15443", "GW.Example.NET.:15443"},
			eps: []catalog.LocalityEndpoints{loc("r1", "z1", "", 4, 0)}, resolution: networkingapi.ServiceEntry_DNS,
			// The two gateways share the locality's four ready endpoints.
			endpoints: []string{"10.1.0.1@r1/z1=2", "gw.example.net@r1/z1=2"},
		},
		{
			name: "an odd count goes to the first gateways", gateways: []string{"10.1.0.2:15443", "10.1.0.1:15443", "10.1.0.3:15443"},
			eps: []catalog.LocalityEndpoints{loc("r1", "", "", 4, 0), loc("r2", "", "", 1, 2)}, resolution: networkingapi.ServiceEntry_STATIC,
			endpoints: []string{"10.1.0.1@r1=2", "10.1.0.2@r1=1", "10.1.0.3@r1=1", "10.1.0.1@r2=1"},
		},
		{
			name: "all drained: no endpoints, still STATIC", gateways: []string{"gw.example.net:15443"},
			eps: []catalog.LocalityEndpoints{loc("r1", "", "", 0, 3)}, resolution: networkingapi.ServiceEntry_STATIC,
		},
		{
			name: "bad gateways are reported", gateways: []string{"10.1.0.1", "10.1.0.1:0", "bad_host:1", "10.1.0.2.:1", "1.2.3:1",
				"0.0.0.0:15443", "[::]:15443", "[ff02::1]:15443", "[::ffff:224.0.0.1]:15443", "10.1.0.9:15443"},
			eps: []catalog.LocalityEndpoints{loc("", "", "", 1, 0)}, resolution: networkingapi.ServiceEntry_STATIC,
			endpoints: []string{"10.1.0.9@=1"},
			skipReasons: []string{
				`gateway "10.1.0.1" ignored: address 10.1.0.1: missing port in address`,
				`gateway "10.1.0.1:0" ignored: port "0" is not 1-65535`,
				`gateway "bad_host:1" ignored: "bad_host" is neither an IP address nor a DNS name: ` +
					`a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')`,
				`gateway "10.1.0.2.:1" ignored: "10.1.0.2" is neither an IP address nor a DNS name: its last label is all digits`,
				`gateway "1.2.3:1" ignored: "1.2.3" is neither an IP address nor a DNS name: its last label is all digits`,
				`gateway "0.0.0.0:15443" ignored: 0.0.0.0 is not a unicast address`,
				`gateway "[::]:15443" ignored: :: is not a unicast address`,
				`gateway "[ff02::1]:15443" ignored: ff02::1 is not a unicast address`,
				`gateway "[::ffff:224.0.0.1]:15443" ignored: 224.0.0.1 is not a unicast address`,
			},
		},
		{
			name: "no gateway at all", eps: []catalog.LocalityEndpoints{loc("r1", "", "", 2, 0)}, resolution: networkingapi.ServiceEntry_STATIC,
			skipReasons: []string{"no usable gateway address: the peer's 2 ready endpoints cannot be reached"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			plan := planImports("a", []*catalog.Snapshot{snapOf(t, "b", importSvc("b", tc.gateways, tc.eps...))}, noNamespaceProblem)
			require.Len(t, plan.services, 1)
			se := plan.services[0].se
			require.Equal(t, tc.resolution, se.Spec.Resolution)
			var got []string
			for _, ep := range se.Spec.Endpoints {
				got = append(got, ep.Address+"@"+ep.Locality+"="+strconv.Itoa(int(ep.Weight)))
				require.Equal(t, "b", ep.Network)
				require.NotZero(t, ep.Weight, "Istio reads weight 0 as 1")
			}
			require.Equal(t, tc.endpoints, got)
			var reasons []string
			for _, s := range plan.skipped.normalize()["b"] {
				reasons = append(reasons, s.Reason)
			}
			require.ElementsMatch(t, tc.skipReasons, reasons)
		})
	}
}

func TestPlanPorts(t *testing.T) {
	b := importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0))
	b.Ports = []catalog.Port{
		{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP},
		{Name: "http", Port: 80, AppProtocol: "http"},
		{Name: "", Port: 81},
		{Name: "web", Port: 82, AppProtocol: "kubernetes.io/h2c"},
		{Name: "Not_A_Label", Port: 83, AppProtocol: "grpc"},
		{Name: "sctp", Port: 84, Protocol: catalog.ProtocolSCTP},
		// A valid Service port name Istio's ServiceEntry CRD refuses as
		// an endpoint port key (it takes fewer than 63 characters).
		{Name: strings.Repeat("p", 63), Port: 85},
	}
	c := importSvc("c", []string{"10.2.0.1:15443"}, loc("r1", "", "", 1, 0))
	c.Ports = []catalog.Port{
		{Name: "web", Port: 80, AppProtocol: "http"}, // disagrees with b on the name
		{Name: "http", Port: 8080},                   // b's port 80 took "http": falls back to <protocol>-<port>
	}
	plan := planImports("a", []*catalog.Snapshot{snapOf(t, "b", b), snapOf(t, "c", c)}, noNamespaceProblem)
	require.Len(t, plan.services, 1)
	var got []string
	for _, p := range plan.services[0].se.Spec.Ports {
		got = append(got, p.Name+"/"+p.Protocol+"/"+strconv.Itoa(int(p.Number)))
	}
	require.Equal(t, []string{"http/HTTP/80", "tcp-81/TCP/81", "web/HTTP2/82", "grpc-83/GRPC/83", "tcp-85/TCP/85", "http-8080/HTTP/8080"}, got)
	require.Equal(t, map[string][]SkippedImport{
		"b": {
			{Namespace: "demo", Name: "echo", Reason: "port 53/UDP not imported: ServiceEntry ports carry only TCP-based protocols"},
			{Namespace: "demo", Name: "echo", Reason: "port 84/SCTP not imported: ServiceEntry ports carry only TCP-based protocols"},
		},
		"c": {
			{Namespace: "demo", Name: "echo", Reason: `port 80 defined differently (name "web", protocol HTTP) than by peer b (name "http", protocol HTTP); b's definition is used`},
		},
	}, plan.skipped.normalize())

	// Only UDP: nothing to write.
	d := importSvc("d", []string{"10.3.0.1:15443"}, loc("r1", "", "", 1, 0))
	d.Ports = []catalog.Port{{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP}}
	plan = planImports("a", []*catalog.Snapshot{snapOf(t, "d", d)}, noNamespaceProblem)
	require.Empty(t, plan.services)
	require.Contains(t, plan.skipped.normalize()["d"], SkippedImport{Namespace: "demo", Name: "echo", Reason: "no TCP port to import"})
}

func TestIstioProtocol(t *testing.T) {
	tests := []struct {
		port catalog.Port
		want string
	}{
		{catalog.Port{AppProtocol: "http"}, "HTTP"},
		{catalog.Port{AppProtocol: "HTTP"}, "HTTP"},
		{catalog.Port{AppProtocol: "http2"}, "HTTP2"},
		{catalog.Port{AppProtocol: "h2c"}, "HTTP2"},
		{catalog.Port{AppProtocol: "kubernetes.io/h2c"}, "HTTP2"},
		{catalog.Port{AppProtocol: "grpc"}, "GRPC"},
		{catalog.Port{AppProtocol: "https"}, "TLS"},
		{catalog.Port{AppProtocol: "tls"}, "TLS"},
		{catalog.Port{AppProtocol: "example.com/custom"}, "TCP"},
		{catalog.Port{Name: "http-web"}, "HTTP"},
		{catalog.Port{Name: "grpc"}, "GRPC"},
		{catalog.Port{Name: "web"}, "TCP"},
		{catalog.Port{Name: "http", AppProtocol: "tcp"}, "TCP"},
		{catalog.Port{}, "TCP"},
	}
	for _, tc := range tests {
		require.Equal(t, tc.want, istioProtocol(tc.port), "%+v", tc.port)
	}
}

func TestPlanRefusesBadNamesAndNamespaces(t *testing.T) {
	ok := importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0))
	sys := ok
	sys.Namespace = "kube-system"
	gone := ok
	gone.Namespace = "gone"
	plan := planImports("a", []*catalog.Snapshot{snapOf(t, "b", ok, sys, gone)}, func(ns string) string {
		switch ns {
		case "kube-system":
			return "namespace kube-system is reserved"
		case "gone":
			return "namespace gone does not exist in this cluster"
		}
		return ""
	})
	require.Len(t, plan.services, 1)
	require.Equal(t, "demo", plan.services[0].key.Namespace)
	require.Equal(t, []SkippedImport{
		{Namespace: "gone", Name: "echo", Reason: "namespace gone does not exist in this cluster"},
		{Namespace: "kube-system", Name: "echo", Reason: "namespace kube-system is reserved"},
	}, plan.skipped.normalize()["b"])
}

// FuzzParseGateway feeds gateway addresses as a peer could send them: what
// parses must be something Istio accepts as an endpoint address (an IP, or
// a DNS name for DNS resolution) with a port in range.
func FuzzParseGateway(f *testing.F) {
	for _, s := range []string{"10.1.0.1:15443", "[fd00::1]:15443", "gw.example.net:443", "GW.example.NET.:1",
		"10.1.0.1", ":15443", "[fe80::1%eth0]:15443", "host:0", "host:65536", "a_b:1", "[::ffff:10.0.0.1]:80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		gw, err := parseGateway(s)
		if err != nil {
			return
		}
		require.NotEmpty(t, gw.host)
		require.True(t, gw.port >= 1 && gw.port <= 65535, "port %d", gw.port)
		addr, ipErr := netip.ParseAddr(gw.host)
		require.Equal(t, gw.ip, ipErr == nil, "ip flag for %q", gw.host)
		if gw.ip {
			require.Empty(t, addr.Zone())
			require.False(t, addr.IsUnspecified() || addr.IsMulticast(), "%s", addr)
			return
		}
		require.Empty(t, validation.IsDNS1123Subdomain(gw.host))
		require.NotEmpty(t, strings.Trim(gw.host[strings.LastIndexByte(gw.host, '.')+1:], "0123456789"), "all-digit last label in %q", gw.host)
	})
}
