package gwroutes

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// gatewayConfig is a gateway's config holding n exported services (and
// the federation chain), as BenchmarkApplyOneChangeGateway's.
func gatewayConfig(n int) *xdsclient.Config {
	cfg := &xdsclient.Config{Clusters: make(map[string]xdsclient.Cluster, n+1)}
	chains := make([]xdsclient.Chain, 0, n+1)
	for i := range n {
		name := fmt.Sprintf("outbound|8080||svc-%05d.bench.svc.cluster.local", i)
		chains = append(chains, xdsclient.Chain{SNIs: []string{fmt.Sprintf("outbound_.8080_._.svc-%05d.bench.svc.cluster.local", i)},
			Cluster: name, StatPrefix: name, IdleTimeout: time.Hour})
		cl := xdsclient.Cluster{Name: name, Type: xdsclient.EDS, ServiceName: name, ConnectTimeout: time.Second}
		for k := range 3 {
			cl.Endpoints = append(cl.Endpoints, xdsclient.Endpoint{
				Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i / 256), byte(i % 256), byte(k + 1)}), 8080),
				Port: 8080, Healthy: k < 2, Locality: xdsclient.Locality{Region: "eu", Zone: fmt.Sprintf("eu-%c", 'a'+k)},
			})
		}
		cfg.Clusters[name] = cl
	}
	chains = append(chains, xdsclient.Chain{SNIs: []string{fedSNI}, Cluster: fedCluster, StatPrefix: fedCluster, IdleTimeout: time.Hour})
	cfg.Clusters[fedCluster] = xdsclient.Cluster{Name: fedCluster, Type: xdsclient.Static, ConnectTimeout: time.Second,
		Endpoints: []xdsclient.Endpoint{{Addr: netip.MustParseAddrPort("10.0.0.5:15012"), Port: 15012, Healthy: true}}}
	slices.SortFunc(chains, func(a, b xdsclient.Chain) int { return cmpString(a.SNIs[0], b.SNIs[0]) })
	cfg.Listeners = []xdsclient.Listener{{Name: "eastwest-gw", Port: 15443, Chains: chains}}
	return cfg
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// withChange is cfg with one service's endpoint turned unhealthy, the
// rest shared as the xDS client shares what a response did not change.
func withChange(cfg *xdsclient.Config, k int) *xdsclient.Config {
	next := *cfg
	next.Clusters = maps.Clone(cfg.Clusters)
	name := fmt.Sprintf("outbound|8080||svc-%05d.bench.svc.cluster.local", k)
	cl := next.Clusters[name]
	cl.Endpoints = slices.Clone(cl.Endpoints)
	cl.Endpoints[0].Healthy = !cl.Endpoints[0].Healthy
	next.Clusters[name] = cl
	return &next
}

// withExport is cfg with one more service exported.
func withExport(cfg *xdsclient.Config) *xdsclient.Config {
	next := *cfg
	next.Clusters = maps.Clone(cfg.Clusters)
	name := "outbound|8080||new-export.bench.svc.cluster.local"
	next.Clusters[name] = xdsclient.Cluster{Name: name, Type: xdsclient.EDS, ServiceName: name, ConnectTimeout: time.Second,
		Endpoints: []xdsclient.Endpoint{{Addr: netip.MustParseAddrPort("10.250.0.1:8080"), Port: 8080, Healthy: true}}}
	l := cfg.Listeners[0]
	l.Chains = append(slices.Clone(l.Chains), xdsclient.Chain{SNIs: []string{"outbound_.8080_._.new-export.bench.svc.cluster.local"},
		Cluster: name, StatPrefix: name, IdleTimeout: time.Hour})
	slices.SortFunc(l.Chains, func(a, b xdsclient.Chain) int { return cmpString(a.SNIs[0], b.SNIs[0]) })
	next.Listeners = []xdsclient.Listener{l}
	return &next
}

// BenchmarkUpdate10k is what one xDS update costs the gateway holding
// 10,000 exported services, from the client's Check to the table the
// Source swaps in: "change" turns one endpoint of one service unhealthy
// and back, "export" exports a 10,001st service and unexports it.
// "scratch" is Routes for Check and again for the Source (before the
// Builder); "builder" is one Builder doing both.
func BenchmarkUpdate10k(b *testing.B) {
	base := gatewayConfig(10000)
	for _, tc := range []struct {
		name string
		next *xdsclient.Config
	}{
		{"change", withChange(base, 5000)},
		{"export", withExport(base)},
	} {
		cfgs := [2]*xdsclient.Config{tc.next, base}
		b.Run(tc.name+"/scratch", func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				cfg := cfgs[i%2]
				i++
				require.NoError(b, Check(cfg))
				if _, err := Routes(cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+"/builder", func(b *testing.B) {
			bl := NewBuilder()
			_, err := bl.Build(base)
			require.NoError(b, err)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				cfg := cfgs[i%2]
				i++
				if err := bl.Check(cfg); err != nil {
					b.Fatal(err)
				}
				if _, err := bl.Build(cfg); err != nil {
					b.Fatal(err)
				}
			}
			require.Positive(b, bl.updates)
		})
	}
}
