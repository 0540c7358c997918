package xds

import (
	"fmt"
	"hash"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// requireSame fails unless got is want: the same versions, of each
// type and of all, and, in the same order, resources that are
// proto.Equal.
func requireSame(t testing.TB, want, got Resources) {
	t.Helper()
	require.Equal(t, want.Version, got.Version, "version")
	require.Equal(t, want.TypeVersions(), got.TypeVersions(), "versions by type")
	require.Len(t, got.Listeners, len(want.Listeners), "listeners")
	for i := range want.Listeners {
		require.True(t, proto.Equal(want.Listeners[i], got.Listeners[i]), "listener %q", want.Listeners[i].GetName())
	}
	require.Len(t, got.Clusters, len(want.Clusters), "clusters")
	for i := range want.Clusters {
		require.True(t, proto.Equal(want.Clusters[i], got.Clusters[i]), "cluster %q", want.Clusters[i].GetName())
	}
	require.Len(t, got.Endpoints, len(want.Endpoints), "endpoints")
	for i := range want.Endpoints {
		require.True(t, proto.Equal(want.Endpoints[i], got.Endpoints[i]), "endpoints %q", want.Endpoints[i].GetClusterName())
	}
}

// step is one catalog change, applied to a Builder as pkg/kube applies
// them.
type step struct {
	name   string
	change func(b *catalog.Builder) error
}

func put(svc catalog.Service) func(*catalog.Builder) error {
	return func(b *catalog.Builder) error { return b.Put(svc) }
}

func del(ns, name string) func(*catalog.Builder) error {
	return func(b *catalog.Builder) error {
		b.Delete(catalog.ServiceKey{Namespace: ns, Name: name})
		return nil
	}
}

func TestGatewayTranslatorEqualsFromScratch(t *testing.T) {
	opts := GatewayOptions{FederationUpstream: "10.96.0.19:15019"}
	echo := echoService()
	web := webService()
	dns := catalog.Service{
		Namespace: "dns", Name: "resolver", Cluster: "a",
		Ports:     []catalog.Port{{Port: 53, Protocol: catalog.ProtocolUDP, TargetPort: 5353}},
		Endpoints: []catalog.LocalityEndpoints{{Ready: 1, Addresses: []catalog.Address{{IP: "10.0.3.4", Ready: true}}}},
	}
	with := func(base catalog.Service, edit func(*catalog.Service)) catalog.Service {
		s := base.Clone()
		edit(&s)
		return s
	}
	steps := []step{
		{"echo and a UDP-only service", func(b *catalog.Builder) error {
			if err := b.Put(echo); err != nil {
				return err
			}
			return b.Put(dns)
		}},
		{"add web", put(web)},
		{"an endpoint turns ready", put(with(echo, func(s *catalog.Service) {
			s.Endpoints[0].Addresses[1].Ready = true
			s.Endpoints[0].Ready, s.Endpoints[0].NotReady = 2, 0
		}))},
		{"it turns not ready again", put(echo)},
		{"a new target port", put(with(web, func(s *catalog.Service) { s.Ports[0].TargetPort = 8443 }))},
		{"only what the gateway does not read", put(with(echo, func(s *catalog.Service) {
			s.Ports[0].AppProtocol = "http2"
			s.Identities = []string{"spiffe://a.mesh/ns/demo/sa/echo"}
		}))},
		{"a port added", put(with(echo, func(s *catalog.Service) {
			s.Ports = append(s.Ports, catalog.Port{Name: "admin", Port: 15000, Protocol: catalog.ProtocolTCP})
		}))},
		{"a port turns UDP", put(with(echo, func(s *catalog.Service) {
			s.Ports = append(s.Ports, catalog.Port{Name: "admin", Port: 15000, Protocol: catalog.ProtocolUDP})
		}))},
		{"an endpoint moves zone", put(with(echo, func(s *catalog.Service) {
			s.Endpoints[1].Locality.Zone = "z3"
		}))},
		{"an endpoint leaves", put(with(echo, func(s *catalog.Service) {
			s.Endpoints = s.Endpoints[:1]
		}))},
		{"the UDP-only service gets a TCP port", put(with(dns, func(s *catalog.Service) {
			s.Ports = append(s.Ports, catalog.Port{Port: 53, Protocol: catalog.ProtocolTCP, TargetPort: 5353})
		}))},
		{"remove web", del("demo", "web")},
		{"remove echo", del("demo", "echo")},
		{"remove the last service", del("dns", "resolver")},
		{"nothing at all, again", func(*catalog.Builder) error { return nil }},
		{"add echo back", put(echo)},
	}

	tr, err := NewGatewayTranslator(opts)
	require.NoError(t, err)
	b := catalog.NewBuilder(catalog.LocalSource)
	var prev Resources
	for _, st := range steps {
		require.NoError(t, st.change(b), st.name)
		snap := b.Build()
		want, err := TranslateGateway(snap, opts)
		require.NoError(t, err, st.name)
		got, err := tr.Translate(snap)
		require.NoError(t, err, st.name)
		requireSame(t, want, got)
		if st.name == "only what the gateway does not read" || st.name == "nothing at all, again" {
			require.Equal(t, prev.Version, got.Version, st.name)
		} else {
			require.NotEqual(t, prev.Version, got.Version, st.name)
		}
		// The same catalog built from scratch has new entries for every
		// service, equal in content: nothing changes.
		again, err := tr.Translate(snapshotOf(t, snap.Services()...))
		require.NoError(t, err, st.name)
		requireSame(t, want, again)
		prev = got
	}

	// No services and no snapshot at all are the same thing.
	empty, err := TranslateGateway(nil, opts)
	require.NoError(t, err)
	fromNil, err := tr.Translate(nil)
	require.NoError(t, err)
	requireSame(t, empty, fromNil)
}

// A service that did not change keeps its very messages; the one whose
// endpoints changed gets a new ClusterLoadAssignment, and the listener,
// whose chains did not change, is the same message: only the endpoints'
// version moves.
func TestGatewayTranslatorReusesUnchangedServices(t *testing.T) {
	tr, err := NewGatewayTranslator(GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)
	base := snapshotOf(t, echoService(), webService())
	first, err := tr.Translate(base)
	require.NoError(t, err)
	// isthmus-federation, echo:80, web:8080, echo:9090.
	require.Len(t, first.Clusters, 4)

	b := base.Builder()
	web := webService()
	web.Endpoints[0].Addresses[0].Ready = false
	web.Endpoints[0].Ready, web.Endpoints[0].NotReady = 0, 1
	require.NoError(t, b.Put(web))
	second, err := tr.Translate(b.Build())
	require.NoError(t, err)
	require.NotEqual(t, first.Version, second.Version)
	require.NotEqual(t, first.EndpointsVersion, second.EndpointsVersion)
	require.Equal(t, first.ListenersVersion, second.ListenersVersion)
	require.Equal(t, first.ClustersVersion, second.ClustersVersion)
	// Clusters and chains depend on the names alone.
	for i, c := range second.Clusters {
		require.Same(t, first.Clusters[i], c, c.GetName())
	}
	for i, e := range second.Endpoints {
		if e.GetClusterName() == "outbound|8080||web.demo.svc.cluster.local" {
			require.NotSame(t, first.Endpoints[i], e)
			require.Equal(t, "UNHEALTHY", e.GetEndpoints()[0].GetLbEndpoints()[0].GetHealthStatus().String())
			continue
		}
		require.Same(t, first.Endpoints[i], e, e.GetClusterName())
	}
	for i, fc := range second.Listeners[0].GetFilterChains() {
		require.Same(t, first.Listeners[0].GetFilterChains()[i], fc)
	}
	require.Same(t, first.Listeners[0], second.Listeners[0])
	// The first result was not touched.
	require.Len(t, first.Listeners[0].GetFilterChains(), 4)

	// A catalog with nothing new for the gateway gives the last result.
	third, err := tr.Translate(b.Build())
	require.NoError(t, err)
	require.Same(t, second.Listeners[0], third.Listeners[0])
}

// Random changes to a catalog of a few dozen services, each translated
// incrementally and from scratch.
func TestGatewayTranslatorRandomChanges(t *testing.T) {
	opts := GatewayOptions{FederationUpstream: "10.96.0.19:15019"}
	rng := rand.New(rand.NewPCG(1, 2))
	svc := func(i int) catalog.Service {
		s := catalog.Service{Namespace: fmt.Sprintf("ns%d", i%3), Name: fmt.Sprintf("s%d", i), Cluster: "a"}
		for p := range 1 + rng.IntN(3) {
			proto := catalog.ProtocolTCP
			if rng.IntN(5) == 0 {
				proto = catalog.ProtocolUDP
			}
			s.Ports = append(s.Ports, catalog.Port{Port: int32(80 + 1000*p + rng.IntN(3)), Protocol: proto, TargetPort: int32(rng.IntN(2) * 8080)})
		}
		for z := range rng.IntN(3) {
			le := catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r", Zone: fmt.Sprintf("z%d", z)}}
			for a := range 1 + rng.IntN(3) {
				ready := rng.IntN(3) > 0
				le.Addresses = append(le.Addresses, catalog.Address{IP: fmt.Sprintf("10.%d.%d.%d", i, z, a), Ready: ready})
				if ready {
					le.Ready++
				} else {
					le.NotReady++
				}
			}
			s.Endpoints = append(s.Endpoints, le)
		}
		return s
	}
	tr, err := NewGatewayTranslator(opts)
	require.NoError(t, err)
	b := catalog.NewBuilder(catalog.LocalSource)
	for round := range 300 {
		for range 1 + rng.IntN(3) {
			i := rng.IntN(40)
			if rng.IntN(4) == 0 {
				b.Delete(catalog.ServiceKey{Namespace: fmt.Sprintf("ns%d", i%3), Name: fmt.Sprintf("s%d", i)})
				continue
			}
			require.NoError(t, b.Put(svc(i)))
		}
		snap := b.Build()
		want, err := TranslateGateway(snap, opts)
		require.NoError(t, err)
		got, err := tr.Translate(snap)
		require.NoError(t, err)
		require.Equal(t, want.Version, got.Version, "round %d", round)
		requireSame(t, want, got)
		// The kept encodings hash as every resource encoded anew.
		fresh, err := newResources(got.Listeners, got.Clusters, got.Endpoints)
		require.NoError(t, err)
		require.Equal(t, fresh.TypeVersions(), got.TypeVersions(), "round %d", round)
		require.Equal(t, fresh.Version, got.Version, "round %d", round)
	}
}

// The listener's encoding made of its parts is its encoding; and when
// it were not, the translator encodes it whole, with the same result.
func TestGatewayTranslatorListenerEncoding(t *testing.T) {
	opts := GatewayOptions{FederationUpstream: "10.96.0.19:15019", ListenerPort: 16443}
	snap := snapshotOf(t, echoService(), webService())
	spliced, err := NewGatewayTranslator(opts)
	require.NoError(t, err)
	require.True(t, spliced.splice, "head, chains and tail are the listener's encoding")
	got, err := spliced.Translate(snap)
	require.NoError(t, err)

	// newResources hashes every resource's own encoding.
	want, err := newResources(got.Listeners, got.Clusters, got.Endpoints)
	require.NoError(t, err)
	require.Equal(t, want.Version, got.Version)
	require.Equal(t, want.TypeVersions(), got.TypeVersions())

	whole, err := NewGatewayTranslator(opts)
	require.NoError(t, err)
	whole.splice = false
	got, err = whole.Translate(snap)
	require.NoError(t, err)
	requireSame(t, want, got)
}

// Two ports whose cluster names collide are refused, and the translator
// goes on from what it had.
func TestGatewayTranslatorRefusesCollidingNames(t *testing.T) {
	opts := GatewayOptions{FederationUpstream: "10.96.0.19:15019"}
	tr, err := NewGatewayTranslator(opts)
	require.NoError(t, err)
	good := snapshotOf(t, echoService())
	_, err = tr.Translate(good)
	require.NoError(t, err)

	// "c.a" in "b" and "c" in "a.b" are both c.a.b.svc.cluster.local.
	one := catalog.Service{Namespace: "b", Name: "c.a", Cluster: "a", Ports: []catalog.Port{{Port: 80}}}
	two := catalog.Service{Namespace: "a.b", Name: "c", Cluster: "a", Ports: []catalog.Port{{Port: 80}}}
	b := good.Builder()
	require.NoError(t, b.Put(one))
	require.NoError(t, b.Put(two))
	_, err = tr.Translate(b.Build())
	require.ErrorContains(t, err, `cluster "outbound|80||c.a.b.svc.cluster.local"`)
	_, err = TranslateGateway(b.Build(), opts)
	require.ErrorContains(t, err, `cluster "outbound|80||c.a.b.svc.cluster.local"`)

	b.Delete(two.Key())
	fixed := b.Build()
	got, err := tr.Translate(fixed)
	require.NoError(t, err)
	want, err := TranslateGateway(fixed, opts)
	require.NoError(t, err)
	requireSame(t, want, got)
}

// requireResumed checks that next, a translation after last where only
// endpoints changed, kept the other types' versions and messages and
// resumed the endpoints' hash: the checkpoints before the block of the
// first changed ClusterLoadAssignment are last's own, not hashed again.
func requireResumed(t testing.TB, last Resources, lastCheckpoints []hash.Hash, next Resources, nextCheckpoints []hash.Hash) {
	t.Helper()
	require.Equal(t, last.ListenersVersion, next.ListenersVersion)
	require.Equal(t, last.ClustersVersion, next.ClustersVersion)
	require.Equal(t, last.RoutesVersion, next.RoutesVersion)
	require.NotEqual(t, last.EndpointsVersion, next.EndpointsVersion)
	require.Len(t, next.Listeners, len(last.Listeners))
	for i, l := range next.Listeners {
		require.Same(t, last.Listeners[i], l, "listener %s", l.GetName())
	}
	require.Len(t, next.Endpoints, len(last.Endpoints))
	first := 0
	for next.Endpoints[first] == last.Endpoints[first] {
		first++
	}
	require.Len(t, nextCheckpoints, len(lastCheckpoints))
	for k := range nextCheckpoints {
		if k < first/claBlock {
			require.Same(t, lastCheckpoints[k], nextCheckpoints[k], "checkpoint %d, before the change at %d", k, first)
		} else {
			require.NotSame(t, lastCheckpoints[k], nextCheckpoints[k], "checkpoint %d, after the change at %d", k, first)
		}
	}
}

// Endpoint changes anywhere among more ClusterLoadAssignments than one
// checkpoint of the endpoints' hash covers, then services added and
// removed: each result is the from-scratch one, and an endpoint change
// resumes the hash at its block.
func TestGatewayTranslatorResumesTheHash(t *testing.T) {
	opts := GatewayOptions{FederationUpstream: "10.96.0.19:15019"}
	const n = 2*claBlock + 100
	tr, err := NewGatewayTranslator(opts)
	require.NoError(t, err)
	b := catalog.NewBuilder(catalog.LocalSource)
	for i := range n {
		require.NoError(t, b.Put(benchService(i, 3, true)))
	}
	check := func(what string) {
		t.Helper()
		snap := b.Build()
		want, err := TranslateGateway(snap, opts)
		require.NoError(t, err, what)
		got, err := tr.Translate(snap)
		require.NoError(t, err, what)
		requireSame(t, want, got)
	}
	check("all")
	require.Len(t, tr.checkpoints, n/claBlock+1)
	for _, i := range []int{0, claBlock - 1, claBlock, claBlock + 1, 2 * claBlock, n - 1} {
		// Keys sort as ns-<i%10>/svc-<i>: these land in every block.
		require.NoError(t, b.Put(benchService(i, 3, false)), i)
		last, lastCheckpoints := tr.last, tr.checkpoints
		check(fmt.Sprintf("endpoints of %d", i))
		requireResumed(t, last, lastCheckpoints, tr.last, tr.checkpoints)
		require.NoError(t, b.Put(benchService(i, 3, true)), i)
		check(fmt.Sprintf("endpoints of %d back", i))
	}
	b.Delete(benchService(7, 3, true).Key())
	check("one removed")
	require.NoError(t, b.Put(benchService(n, 3, true)))
	check("one added")
	require.NoError(t, b.Put(benchService(n+1, 0, true)))
	check("one without endpoints added")
}
