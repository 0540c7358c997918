package gateway

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestNewRoutes(t *testing.T) {
	ep := netip.MustParseAddrPort("10.0.0.7:8080")
	r, err := NewRoutes([]Route{
		route("Outbound_.80_._.Echo.demo.svc.cluster.local", echoCluster, ep),
		{SNI: "federation.isthmus.internal", Cluster: "isthmus-federation", DNS: "federator.isthmus-system.svc:15443"},
	})
	require.NoError(t, err)
	require.Equal(t, 2, r.Len())
	got, ok := r.Route(echoSNI)
	require.True(t, ok, "matched case-insensitively")
	require.Equal(t, echoSNI, got.SNI, "stored lowercased")
	require.Equal(t, []Endpoint{{Addr: ep, Healthy: true}}, got.Endpoints)
	require.NotNil(t, r.lookup("OUTBOUND_.80_._.ECHO.DEMO.SVC.CLUSTER.LOCAL"))
	_, ok = r.Route("outbound_.80_._.other.demo.svc.cluster.local")
	require.False(t, ok)
	all := r.All()
	require.Len(t, all, 2)
	require.Equal(t, "federation.isthmus.internal", all[0].SNI, "sorted by SNI")

	var nilRoutes *Routes
	require.Zero(t, nilRoutes.Len())
	_, ok = nilRoutes.Route(echoSNI)
	require.False(t, ok)
}

// Every problem is reported at once, each naming its route: an xDS client
// can NACK with the error as it is.
func TestNewRoutesRejects(t *testing.T) {
	ep := Endpoint{Addr: netip.MustParseAddrPort("10.0.0.7:8080"), Healthy: true}
	_, err := NewRoutes([]Route{
		{SNI: "", Cluster: "c"},
		{SNI: "a b", Cluster: "c"},
		{SNI: "dup.example", Cluster: "c"},
		{SNI: "DUP.example", Cluster: "c"},
		{SNI: "no-cluster.example"},
		{SNI: "both.example", Cluster: "c", DNS: "h:1", Endpoints: []Endpoint{ep}},
		{SNI: "bad-dns.example", Cluster: "c", DNS: "no-port"},
		{SNI: "bad-ep.example", Cluster: "c", Endpoints: []Endpoint{{Addr: netip.MustParseAddrPort("10.0.0.1:0")}}},
		{SNI: "neg.example", Cluster: "c", IdleTimeout: -time.Second},
	})
	require.Error(t, err)
	for _, want := range []string{
		`route 0 (sni ""): server name is empty`,
		`route 1 (sni "a b"): server name has byte 0x20`,
		`route 3 (sni "DUP.example"): duplicate sni`,
		`route 4 (sni "no-cluster.example"): cluster name is empty`,
		`route 5 (sni "both.example"): both dns "h:1" and 1 endpoints are set`,
		`route 6 (sni "bad-dns.example"): dns "no-port" is not host:port`,
		`route 7 (sni "bad-ep.example"): endpoint 0: invalid address`,
		`route 8 (sni "neg.example"): negative timeout`,
	} {
		require.ErrorContains(t, err, want)
	}
}

func TestParseRoutesJSON(t *testing.T) {
	r, err := ParseRoutesJSON([]byte(`{"routes": [
	  {"sni": "outbound_.80_._.echo.demo.svc.cluster.local", "cluster": "outbound|80||echo.demo.svc.cluster.local",
	   "endpoints": [{"address": "10.0.0.7:8080"}, {"address": "10.0.0.8:8080", "healthy": false}],
	   "connectTimeout": "250ms", "idleTimeout": "1h"},
	  {"sni": "federation.isthmus.internal", "cluster": "isthmus-federation", "dns": "federator.isthmus-system.svc:15443"}]}`))
	require.NoError(t, err)
	got, ok := r.Route(echoSNI)
	require.True(t, ok)
	require.Equal(t, Route{
		SNI: echoSNI, Cluster: echoCluster,
		Endpoints: []Endpoint{
			{Addr: netip.MustParseAddrPort("10.0.0.7:8080"), Healthy: true},
			{Addr: netip.MustParseAddrPort("10.0.0.8:8080"), Healthy: false},
		},
		ConnectTimeout: 250 * time.Millisecond, IdleTimeout: time.Hour,
	}, got)
	require.Len(t, r.lookup(echoSNI).healthy, 1)

	for name, bad := range map[string]string{
		"unknown field":  `{"routes": [{"sni": "a.b", "cluster": "c", "weight": 3}]}`,
		"bad address":    `{"routes": [{"sni": "a.b", "cluster": "c", "endpoints": [{"address": "pod-7:80"}]}]}`,
		"bad duration":   `{"routes": [{"sni": "a.b", "cluster": "c", "idleTimeout": "forever"}]}`,
		"invalid routes": `{"routes": [{"sni": "a.b"}]}`,
	} {
		_, err := ParseRoutesJSON([]byte(bad))
		require.Error(t, err, name)
	}
}

func BenchmarkRouteLookup(b *testing.B) {
	routes := make([]Route, 1000)
	for i := range routes {
		routes[i] = route(fmt.Sprintf("outbound_.80_._.svc-%d.demo.svc.cluster.local", i), fmt.Sprintf("outbound|80||svc-%d.demo.svc.cluster.local", i),
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 8080))
	}
	r, err := NewRoutes(routes)
	if err != nil {
		b.Fatal(err)
	}
	sni := "outbound_.80_._.svc-777.demo.svc.cluster.local"
	b.ReportAllocs()
	for b.Loop() {
		if r.lookup(sni) == nil {
			b.Fatal("no route")
		}
	}
}
