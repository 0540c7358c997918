package xdsclient

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/stretchr/testify/require"
)

// services10k is a sidecar snapshot of 10,000 clusterset services, each
// with an HTTP port 80 and a TCP port 5000+i%100: 10,000 virtual hosts in
// route configuration "80", 10,100 outbound chains, 20,002 clusters.
func services10k(tb testing.TB) []scService {
	svcs := make([]scService, 10000)
	for i := range svcs {
		svcs[i] = scService{
			name: fmt.Sprintf("svc-%05d", i), ns: "bench",
			vip:   fmt.Sprintf("240.240.%d.%d", i/250, 1+i%250),
			ports: []scPort{{80, UpstreamHTTP1}, {uint32(5000 + i%100), UpstreamHTTPNone}},
			ids:   []string{fmt.Sprintf("spiffe://alpha.mesh/ns/bench/sa/svc-%05d", i)},
			locs: []scLocality{
				{priority: 0, region: "eu", zone: "eu-a", weight: 1, eps: []ep{{ip: fmt.Sprintf("10.%d.%d.1", i/250, i%250), port: 8080, healthy: true}}},
				{priority: 1, region: "eu", zone: "eu-b", weight: 2, eps: []ep{{ip: "192.0.2.10", port: 15443, healthy: true}}},
			},
		}
	}
	return svcs
}

func decode10k(b *testing.B) (*Config, []scService) {
	b.Helper()
	svcs := services10k(b)
	cfg, err := DecodeRole(RoleSidecar, buildSidecar(b, svcs...).anys(b)...)
	require.NoError(b, err)
	require.Len(b, cfg.Sidecar.Route("80").VirtualHosts, 10000)
	return cfg, svcs
}

// BenchmarkMatchOutbound picks the outbound chain for original
// destinations: half clusterset VIPs (HTTP and TCP ports), half other
// addresses that fall to the default chain.
func BenchmarkMatchOutbound(b *testing.B) {
	cfg, svcs := decode10k(b)
	l := cfg.Sidecar.Outbound
	var dsts []netip.AddrPort
	for i := 0; i < len(svcs); i += 7 {
		vip := netip.MustParseAddr(svcs[i].vip)
		dsts = append(dsts, netip.AddrPortFrom(vip, 80), netip.AddrPortFrom(vip, uint16(svcs[i].ports[1].port)),
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}), 443),
			netip.AddrPortFrom(vip, 81))
	}
	require.NotNil(b, l.Match(dsts[0]).HTTP)
	require.NotNil(b, l.Match(dsts[1]).TCP)
	require.Same(b, &l.Default, l.Match(dsts[2]))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if l.Match(dsts[i%len(dsts)]) == nil {
			b.Fatal("no chain")
		}
		i++
	}
}

// BenchmarkMatchInbound picks the inbound chain as a pod's sidecar does
// per connection: a pod with 20 declared ports (one chain each,
// HTTP or TCP) before the two chains by ALPN, dialled on declared ports
// and on others, offering what a sidecar offers (istio-http/1.1 and
// istio-h2, istio) or nothing.
func BenchmarkMatchInbound(b *testing.B) {
	m := newSidecarMutable(b)
	var chains []*listenerv3.FilterChain
	for i := range 20 {
		fc := onPort(m.in.FilterChains[i%2], uint32(8000+i))
		fc.FilterChainMatch.ApplicationProtocols = nil
		chains = append(chains, fc)
	}
	m.in.FilterChains = append(chains, m.in.FilterChains...)
	cfg, err := m.decode(b)
	require.NoError(b, err)
	l := cfg.Sidecar.Inbound
	type conn struct {
		port uint16
		alpn []string
	}
	var conns []conn
	for _, alpn := range [][]string{{"istio-http/1.1", "istio-h2"}, {"istio"}, nil} {
		for _, port := range []uint16{8000, 8001, 8019, 9090} {
			conns = append(conns, conn{port, alpn})
		}
	}
	require.Same(b, &l.Chains[0], l.Match(8000, []string{"istio"}))
	require.Same(b, &l.Chains[20], l.Match(9090, []string{"istio-h2"}))
	require.Same(b, &l.Chains[21], l.Match(9090, nil))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c := conns[i%len(conns)]
		if l.Match(c.port, c.alpn) == nil {
			b.Fatal("no chain")
		}
		i++
	}
}

// BenchmarkVirtualHost finds the virtual host for Host headers in route
// configuration "80" (10,000 virtual hosts): bare hosts, host:port, VIPs,
// mixed case (lowercased on the stack), and misses.
func BenchmarkVirtualHost(b *testing.B) {
	cfg, svcs := decode10k(b)
	rc := cfg.Sidecar.Route("80")
	var hosts []string
	for i := 0; i < len(svcs); i += 7 {
		h := svcs[i].host()
		hosts = append(hosts, h, h+":80", svcs[i].vip, strings.ToUpper(h[:1])+h[1:], "unknown-"+h)
	}
	require.NotNil(b, rc.VirtualHost(hosts[0]))
	require.NotNil(b, rc.VirtualHost(hosts[3]))
	require.Nil(b, rc.VirtualHost(hosts[4]))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		_ = rc.VirtualHost(hosts[i%len(hosts)])
		i++
	}
}

// BenchmarkLookupHost is the DNS proxy's name table lookup, with the
// trailing dot a question carries.
func BenchmarkLookupHost(b *testing.B) {
	cfg, svcs := decode10k(b)
	var names []string
	for i := 0; i < len(svcs); i += 7 {
		names = append(names, svcs[i].host()+".", "Other-"+svcs[i].host()+".")
	}
	_, ok := cfg.Sidecar.LookupHost(names[0])
	require.True(b, ok)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		_, _ = cfg.Sidecar.LookupHost(names[i%len(names)])
		i++
	}
}

// BenchmarkDecodeSidecar10kServices is what a full sidecar snapshot costs
// the client, indexes included.
func BenchmarkDecodeSidecar10kServices(b *testing.B) {
	res := buildSidecar(b, services10k(b)...).anys(b)
	size := 0
	for _, r := range res {
		size += len(r.GetValue())
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeRole(RoleSidecar, res...); err != nil {
			b.Fatal(err)
		}
	}
}
