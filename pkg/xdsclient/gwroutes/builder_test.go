package gwroutes

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// configGen makes random gateway configs, each from the last as the xDS
// client makes them: a service left alone keeps its chain and its
// cluster's endpoint slice.
type configGen struct {
	rng  *rand.Rand
	svcs map[int]genService
}

type genService struct {
	chain   xdsclient.Chain
	cluster xdsclient.Cluster
}

func (g *configGen) service(i int) genService {
	name := fmt.Sprintf("outbound|80||svc-%d.demo.svc.cluster.local", i)
	ch := xdsclient.Chain{SNIs: []string{fmt.Sprintf("outbound_.80_._.svc-%02d.demo.svc.cluster.local", i)}, Cluster: name,
		IdleTimeout: []time.Duration{time.Hour, 2 * time.Minute}[g.rng.IntN(2)]}
	switch g.rng.IntN(10) {
	case 0: // an alias, sometimes another service's name: a duplicate
		ch.SNIs = append(ch.SNIs, fmt.Sprintf("outbound_.80_._.svc-%02d.demo.svc.cluster.local", g.rng.IntN(20)))
	case 1:
		ch.SNIs = append(ch.SNIs, fmt.Sprintf("alias-%d.example", i))
	}
	cl := xdsclient.Cluster{Name: name, Type: xdsclient.EDS, ServiceName: name,
		ConnectTimeout: []time.Duration{time.Second, 2 * time.Second}[g.rng.IntN(2)]}
	switch g.rng.IntN(20) {
	case 0: // one hostname: a DNS route
		cl.Type, cl.ServiceName = xdsclient.StrictDNS, ""
		cl.Endpoints = []xdsclient.Endpoint{{Host: "federator.example", Port: 15012, Healthy: g.rng.IntN(2) == 0}}
	case 1: // two: the gateway refuses it
		cl.Type, cl.ServiceName = xdsclient.StrictDNS, ""
		cl.Endpoints = []xdsclient.Endpoint{{Host: "a.example", Port: 1, Healthy: true}, {Host: "b.example", Port: 1, Healthy: true}}
	case 2: // a chain without its cluster
		cl.Name = ""
	default:
		for k := range g.rng.IntN(4) {
			cl.Endpoints = append(cl.Endpoints, xdsclient.Endpoint{
				Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, byte(k + g.rng.IntN(2))}), 8080), Port: 8080,
				Healthy: g.rng.IntN(3) != 0,
			})
		}
	}
	return genService{ch, cl}
}

// next changes a few services (or none), then makes the config; now and
// then its chains are out of order, or it has a second listener.
func (g *configGen) next() *xdsclient.Config {
	for range g.rng.IntN(4) {
		i := g.rng.IntN(20)
		switch g.rng.IntN(4) {
		case 0:
			delete(g.svcs, i)
		case 1: // the same content in new slices: compared, not pointer-equal
			if s, ok := g.svcs[i]; ok {
				s.cluster.Endpoints = slices.Clone(s.cluster.Endpoints)
				s.chain.SNIs = slices.Clone(s.chain.SNIs)
				g.svcs[i] = s
			}
		default:
			g.svcs[i] = g.service(i)
		}
	}
	cfg := &xdsclient.Config{Clusters: map[string]xdsclient.Cluster{}}
	var chains []xdsclient.Chain
	for _, i := range slices.Sorted(maps.Keys(g.svcs)) {
		s := g.svcs[i]
		chains = append(chains, s.chain)
		if s.cluster.Name != "" {
			cfg.Clusters[s.cluster.Name] = s.cluster
		}
	}
	if g.rng.IntN(15) == 0 && len(chains) > 1 {
		g.rng.Shuffle(len(chains), func(a, b int) { chains[a], chains[b] = chains[b], chains[a] })
	}
	cfg.Listeners = []xdsclient.Listener{{Name: "eastwest-gw", Port: 15443, Chains: chains}}
	if g.rng.IntN(30) == 0 {
		cfg.Listeners = append(cfg.Listeners, xdsclient.Listener{Name: "another"})
	}
	return cfg
}

// Property: whatever sequence of configs a Builder sees, each table (or
// error) it gives is Routes's for that config, from scratch.
func TestBuilderEqualsFromScratch(t *testing.T) {
	for seed := range uint64(20) {
		g := &configGen{rng: rand.New(rand.NewPCG(seed, 7)), svcs: map[int]genService{}}
		b := NewBuilder()
		var built, failed int
		for step := range 300 {
			cfg := g.next()
			want, wantErr := Routes(cfg)
			got, err := b.Build(cfg)
			if wantErr != nil {
				require.EqualError(t, err, wantErr.Error(), "seed %d step %d", seed, step)
				failed++
				continue
			}
			require.NoError(t, err, "seed %d step %d", seed, step)
			require.Equal(t, want.All(), got.All(), "seed %d step %d", seed, step)
			again, err := b.Build(cfg)
			require.NoError(t, err)
			require.Same(t, got, again, "the same config, the same table")
			built++
		}
		require.Positive(t, built, "seed %d built nothing", seed)
		require.Positive(t, failed, "seed %d never failed", seed)
		require.Greater(t, b.updates, built/2, "seed %d: most tables are made from the last", seed)
	}
}

// What an update keeps: the routes of chains that did not change are
// the previous table's own, and a config that changes no route gives
// the same table.
func TestBuilderKeepsWhatDidNotChange(t *testing.T) {
	static := xdsclient.Cluster{Name: fedCluster, Type: xdsclient.Static, ConnectTimeout: 3 * time.Second,
		Endpoints: []xdsclient.Endpoint{{Addr: netip.MustParseAddrPort("10.0.0.5:15012"), Port: 15012, Healthy: true}}}
	b := NewBuilder()
	first := config(static)
	r1, err := b.Build(first)
	require.NoError(t, err)

	// Only the bundles or versions differ: the same table.
	second := *first
	second.Versions = map[string]string{"x": "2"}
	r2, err := b.Build(&second)
	require.NoError(t, err)
	require.Same(t, r1, r2)

	// The echo cluster's endpoint turns unhealthy: the federation route
	// is untouched, the echo routes follow.
	third := *first
	third.Clusters = maps.Clone(first.Clusters)
	echo := third.Clusters[echoCluster]
	echo.Endpoints = slices.Clone(echo.Endpoints)
	echo.Endpoints[0].Healthy = false
	third.Clusters[echoCluster] = echo
	r3, err := b.Build(&third)
	require.NoError(t, err)
	rt, ok := r3.Route(echoSNI)
	require.True(t, ok)
	require.Equal(t, []gateway.Endpoint{
		{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Healthy: false},
		{Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Healthy: false},
	}, rt.Endpoints)
	want, err := Routes(&third)
	require.NoError(t, err)
	require.Equal(t, want.All(), r3.All())
	old, _ := r1.Route(echoSNI)
	require.True(t, old.Endpoints[0].Healthy, "the previous table is unchanged")
}
