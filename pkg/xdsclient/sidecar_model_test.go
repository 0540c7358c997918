package xdsclient

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestOutboundMatch(t *testing.T) {
	vipA, vipB := netip.MustParseAddr("240.240.1.1"), netip.MustParseAddr("240.240.2.2")
	l := &OutboundListener{
		Chains: []OutboundChain{
			{Port: 80, VIPs: []netip.Addr{vipA, vipB}, HTTP: &HTTPConnectionManager{RouteConfigName: "80"}},
			{Port: 5432, VIPs: []netip.Addr{vipB}, TCP: &TCPProxy{Cluster: "outbound|5432||b"}},
			{Port: 15001, HTTP: &HTTPConnectionManager{RouteConfigName: "explicit"}},
		},
		Default: OutboundChain{TCP: &TCPProxy{Cluster: PassthroughCluster}},
	}
	require.NoError(t, l.index())
	for _, tc := range []struct {
		dst  string
		want *OutboundChain
	}{
		{"240.240.1.1:80", &l.Chains[0]},
		{"240.240.2.2:80", &l.Chains[0]},
		{"[::ffff:240.240.2.2]:80", &l.Chains[0]},
		{"240.240.2.2:5432", &l.Chains[1]},
		{"240.240.1.1:5432", &l.Default},
		{"127.0.0.1:15001", &l.Chains[2]},
		{"10.0.0.1:15001", &l.Chains[2]},
		{"10.0.0.1:80", &l.Default},
		{"240.240.1.1:81", &l.Default},
	} {
		require.Same(t, tc.want, l.Match(netip.MustParseAddrPort(tc.dst)), tc.dst)
	}

	l.Chains = append(l.Chains, OutboundChain{Port: 80, VIPs: []netip.Addr{vipB}}, OutboundChain{Port: 15001})
	require.EqualError(t, l.index(), "filter_chains[3].filter_chain_match.prefix_ranges[0]: 240.240.2.2:80 is also matched by filter_chains[0]\n"+
		"filter_chains[4].filter_chain_match: destination_port 15001 with any address is also matched by filter_chains[2]")
}

func TestVirtualHostLookup(t *testing.T) {
	rc := &RouteConfig{Name: "80", VirtualHosts: []VirtualHost{
		{Name: "echo.demo.svc.clusterset.local:80", Domains: []string{"echo.demo.svc.clusterset.local", "echo.demo.svc.clusterset.local:80", "240.240.1.1", "240.240.1.1:80"}},
		{Name: "web.demo.svc.clusterset.local:80", Domains: []string{"web.demo.svc.clusterset.local", "web.demo.svc.clusterset.local:80"}},
	}}
	require.NoError(t, rc.index())
	for host, want := range map[string]int{
		"echo.demo.svc.clusterset.local":    0,
		"ECHO.Demo.svc.clusterset.local:80": 0,
		"240.240.1.1:80":                    0,
		"web.demo.svc.clusterset.local":     1,
		"web.demo.svc.clusterset.local:81":  -1,
		"echo.demo.svc.cluster.local":       -1,
		"":                                  -1,
	} {
		got := rc.VirtualHost(host)
		if want < 0 {
			require.Nil(t, got, host)
			continue
		}
		require.Same(t, &rc.VirtualHosts[want], got, host)
	}

	inbound := &RouteConfig{Name: "inbound", VirtualHosts: []VirtualHost{{Name: "inbound", Domains: []string{"*"},
		Routes: []Route{{Prefix: "/", Cluster: InboundPassthroughCluster}}}}}
	require.NoError(t, inbound.index())
	vh := inbound.VirtualHost("Anything:1234")
	require.Same(t, &inbound.VirtualHosts[0], vh)
	require.Equal(t, InboundPassthroughCluster, vh.Route("/x").Cluster)

	rc.VirtualHosts[1].Domains = append(rc.VirtualHosts[1].Domains, "240.240.1.1")
	require.EqualError(t, rc.index(), `virtual_hosts[1].domains[2]: "240.240.1.1" is also a domain of virtual_hosts[0]`)
}

// mtlsCtx is an inbound chain's TLS: the chains of the tests below are
// mTLS unless they say otherwise.
var mtlsCtx = &DownstreamTLS{CertSecret: CertSecretName, ValidationSecret: RootCASecretName}

func TestInboundMatch(t *testing.T) {
	l := &InboundListener{Chains: []InboundChain{
		{TLS: mtlsCtx, ALPN: []string{"istio-http/1.1", "istio-h2"}, HTTP: &HTTPConnectionManager{StatPrefix: "inbound"}},
		{TLS: mtlsCtx, TCP: &TCPProxy{Cluster: InboundPassthroughCluster}},
	}}
	require.NoError(t, l.index())
	require.Same(t, &l.Chains[0], l.Match(8080, []string{"istio-h2"}))
	require.Same(t, &l.Chains[0], l.Match(8080, []string{"h2", "istio-http/1.1"}))
	require.Same(t, &l.Chains[1], l.Match(8080, []string{"istio"}))
	require.Same(t, &l.Chains[1], l.Match(8080, nil))
	l.Chains = l.Chains[:1]
	require.NoError(t, l.index())
	require.Nil(t, l.Match(8080, []string{"istio"}))
}

// Chains of a destination port are matched before the ALPN, as in
// Envoy: a port with chains considers only those, whatever the client
// offers, and never falls back to the chains of any port.
func TestInboundMatchByPort(t *testing.T) {
	hcm := &HTTPConnectionManager{StatPrefix: "inbound", ForwardClientCert: SanitizeSet}
	tcp := &TCPProxy{Cluster: InboundPassthroughCluster}
	l := &InboundListener{Chains: []InboundChain{
		{TLS: mtlsCtx, Port: 8080, HTTP: hcm},
		{TLS: mtlsCtx, Port: 9000, TCP: tcp},
		{TLS: mtlsCtx, Port: 9443, ALPN: []string{"istio-http/1.1", "istio-h2"}, HTTP: hcm},
		{TLS: mtlsCtx, Port: 7000, ALPN: []string{"istio"}, TCP: tcp},
		{TLS: mtlsCtx, Port: 7000, ALPN: []string{"istio-h2"}, HTTP: hcm},
		{TLS: mtlsCtx, Port: 7000, HTTP: hcm},
		{TLS: mtlsCtx, ALPN: []string{"istio-http/1.1", "istio-h2"}, HTTP: hcm},
		{TLS: mtlsCtx, TCP: tcp},
	}}
	require.NoError(t, l.index())
	for _, tc := range []struct {
		name string
		port uint16
		alpn []string
		want int // -1: nil
	}{
		{"HTTP port, ALPN istio", 8080, []string{"istio"}, 0},
		{"HTTP port, no ALPN", 8080, nil, 0},
		{"HTTP port, ALPN istio-http/1.1", 8080, []string{"istio-http/1.1"}, 0},
		{"TCP port, ALPN istio-http/1.1", 9000, []string{"istio-http/1.1"}, 1},
		{"TCP port, ALPN istio-h2", 9000, []string{"istio-h2", "istio"}, 1},
		{"port with an ALPN chain, offered", 9443, []string{"istio-h2"}, 2},
		{"port with an ALPN chain, not offered: no fallback", 9443, []string{"istio"}, -1},
		{"port with an ALPN chain, nothing offered: no fallback", 9443, nil, -1},
		{"port's chains by ALPN, first offered wins", 7000, []string{"h2", "istio-h2", "istio"}, 4},
		{"port's chains by ALPN", 7000, []string{"istio"}, 3},
		{"port's chain listing none", 7000, []string{"istio-http/1.1"}, 5},
		{"port's chain listing none, nothing offered", 7000, nil, 5},
		{"undeclared port, istio-http/1.1", 8081, []string{"istio-http/1.1"}, 6},
		{"undeclared port, istio", 8081, []string{"istio"}, 7},
		{"undeclared port, nothing offered", 8081, nil, 7},
		{"port 0 is any port's", 0, []string{"istio-h2"}, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := l.Match(tc.port, tc.alpn)
			if tc.want < 0 {
				require.Nil(t, got)
				return
			}
			require.Same(t, &l.Chains[tc.want], got)
		})
	}

	// Without chains for any port, an undeclared port matches nothing.
	l.Chains = l.Chains[:6]
	require.NoError(t, l.index())
	require.Same(t, &l.Chains[0], l.Match(8080, []string{"istio"}))
	require.Nil(t, l.Match(8081, []string{"istio-http/1.1"}))
	require.Nil(t, l.Match(8081, nil))

	// The same protocol, or none, on two ports, or on a port and any
	// port, is no conflict; on one port it is, named by both chains.
	l.Chains = []InboundChain{
		{TLS: mtlsCtx, Port: 8080, ALPN: []string{"istio-h2"}, HTTP: hcm},
		{TLS: mtlsCtx, Port: 8081, ALPN: []string{"istio-h2"}, HTTP: hcm},
		{TLS: mtlsCtx, ALPN: []string{"istio-h2"}, HTTP: hcm},
		{TLS: mtlsCtx, Port: 8080, TCP: tcp},
		{TLS: mtlsCtx, TCP: tcp},
	}
	require.NoError(t, l.index())
	l.Chains = append(l.Chains,
		InboundChain{TLS: mtlsCtx, Port: 8080, ALPN: []string{"istio", "istio-h2"}, TCP: tcp},
		InboundChain{TLS: mtlsCtx, Port: 8080, HTTP: hcm},
		InboundChain{TLS: mtlsCtx, ALPN: []string{"istio-h2"}, HTTP: hcm},
		InboundChain{TLS: mtlsCtx, TCP: tcp},
	)
	require.EqualError(t, l.index(), `filter_chains[5].filter_chain_match.application_protocols[1]: "istio-h2" is also matched by filter_chains[0]`+"\n"+
		"filter_chains[6].filter_chain_match.application_protocols: is empty, as in filter_chains[3]: two chains match the same connections\n"+
		`filter_chains[7].filter_chain_match.application_protocols[0]: "istio-h2" is also matched by filter_chains[2]`+"\n"+
		"filter_chains[8].filter_chain_match.application_protocols: is empty, as in filter_chains[4]: two chains match the same connections")
}

// Match is on every inbound connection's path: it allocates nothing.
func TestInboundMatchAllocatesNothing(t *testing.T) {
	l := &InboundListener{Chains: []InboundChain{
		{TLS: mtlsCtx, Port: 8080, HTTP: &HTTPConnectionManager{}},
		{TLS: mtlsCtx, ALPN: []string{"istio-http/1.1", "istio-h2"}, HTTP: &HTTPConnectionManager{}},
		{TLS: mtlsCtx, TCP: &TCPProxy{Cluster: InboundPassthroughCluster}},
		{Port: 8080, HTTP: &HTTPConnectionManager{}}, // plaintext
		{TCP: &TCPProxy{Cluster: InboundPassthroughCluster}},
	}}
	require.NoError(t, l.index())
	offers := [][]string{{"istio"}, nil, {"h2", "istio-h2"}}
	allocs := testing.AllocsPerRun(100, func() {
		for _, port := range []uint16{8080, 8081} {
			for _, alpn := range offers {
				if l.Match(port, alpn) == nil {
					panic("no chain")
				}
			}
			if l.MatchPlaintext(port) == nil {
				panic("no plaintext chain")
			}
		}
	})
	require.Zero(t, allocs)
}

func TestNameTable(t *testing.T) {
	meta := func(host, vip string, port uint16) *ServiceMeta {
		return &ServiceMeta{Host: host, VIP: netip.MustParseAddr(vip), Port: port, Protocol: ProtocolHTTP}
	}
	s := &Sidecar{}
	require.NoError(t, s.indexNames(map[string]Cluster{
		"outbound|80||echo.demo.svc.clusterset.local":   {Service: meta("echo.demo.svc.clusterset.local", "240.240.1.1", 80)},
		"outbound|8080||echo.demo.svc.clusterset.local": {Service: meta("echo.demo.svc.clusterset.local", "240.240.1.1", 8080)},
		PassthroughCluster: {Type: OriginalDst},
	}))
	vip, ok := s.LookupHost("Echo.demo.svc.clusterset.local.")
	require.True(t, ok)
	require.Equal(t, netip.MustParseAddr("240.240.1.1"), vip)
	host, ok := s.LookupVIP(vip)
	require.True(t, ok)
	require.Equal(t, "echo.demo.svc.clusterset.local", host)
	_, ok = s.LookupHost("web.demo.svc.clusterset.local")
	require.False(t, ok)
	require.Equal(t, 1, s.Hosts())
	table := s.NameTable()
	require.Equal(t, map[string]netip.Addr{"echo.demo.svc.clusterset.local": netip.MustParseAddr("240.240.1.1")}, table)
	table["x"] = netip.Addr{}
	require.Equal(t, 1, s.Hosts(), "NameTable is a copy")

	err := s.indexNames(map[string]Cluster{
		"a": {Service: meta("echo.demo.svc.clusterset.local", "240.240.1.1", 80)},
		"b": {Service: meta("echo.demo.svc.clusterset.local", "240.240.1.2", 81)},
		"c": {Service: meta("web.demo.svc.clusterset.local", "240.240.1.1", 80)},
	})
	require.ErrorContains(t, err, `cluster "b": metadata.filter_metadata["isthmus"].vip: host "echo.demo.svc.clusterset.local" has VIP 240.240.1.2, but 240.240.1.1 in cluster "a"`)
	require.ErrorContains(t, err, `cluster "c": metadata.filter_metadata["isthmus"].vip: 240.240.1.1 is also the VIP of host "echo.demo.svc.clusterset.local" (cluster "a")`)
}
