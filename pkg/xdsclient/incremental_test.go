package xdsclient

import (
	"crypto/x509"
	"fmt"
	"maps"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// The client keeps what it accepted and decodes only what a response
// changes. These tests hold it to what a from-scratch decode of the same
// resources gives, over random sequences of responses that add, change
// and remove resources, some of them invalid, some resending the same
// content with other bytes:
//
//   - a response is NACKed exactly when a fresh state refuses it, with
//     the same reason;
//   - a NACK leaves the accepted state and the published config as they
//     were;
//   - after every response, the accepted state is consistent exactly
//     when DecodeRole of the resources the client holds is, and then
//     assembles the same Config; every index the client keeps equals
//     the one recomputed from its resources;
//   - a config is published exactly when its content differs from the
//     one published before, and a published config never changes
//     afterwards.

func TestIncrementalMatchesScratchGateway(t *testing.T) {
	g := newGatewayGen(t)
	runIncremental(t, gatewayNode, []string{TypeListener, TypeCluster, TypeClusterLoadAssignment, TypeSecret}, g.response)
}

func TestIncrementalMatchesScratchSidecar(t *testing.T) {
	g := newSidecarGen(t)
	runIncremental(t, sidecarNode, SidecarTypes(), g.response)
}

// genFunc makes a response of type t, drawing from rnd.
type genFunc func(t *testing.T, rnd *rand.Rand, typ string) []*anypb.Any

func runIncremental(t *testing.T, node Node, types []string, gen genFunc) {
	sequences, steps := 24, 80
	if testing.Short() {
		sequences = 6
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	var tally tally
	for seq := range sequences {
		rnd := rand.New(rand.NewPCG(seed, uint64(seq)))
		t.Run(fmt.Sprint(seq), func(t *testing.T) {
			c, err := New(ClientConfig{Server: "127.0.0.1:15010", Plaintext: true, Node: node})
			require.NoError(t, err)
			m := &model{role: node.Role(), eds: map[string]*anypb.Any{}, rds: map[string]*anypb.Any{}}
			var history []publishedConfig
			for step := range steps {
				typ := types[rnd.IntN(len(types))]
				res := gen(t, rnd, typ)
				checkStep(t, c, m, typ, fmt.Sprintf("v%d", step), res, &history, &tally)
				if t.Failed() {
					t.Fatalf("seed %d, sequence %d, step %d (%s)", seed, seq, step, shortType(typ))
				}
			}
			for i, p := range history {
				require.True(t, contentEqual(p.cfg, p.ref), "published config %d changed after it was published", i)
			}
		})
	}
	t.Logf("%+v", tally)
	// The generators reach every outcome.
	require.Positive(t, tally.nacked)
	require.Positive(t, tally.incomplete)
	require.Positive(t, tally.unchanged)
	require.Positive(t, tally.published)
}

// tally counts the outcomes of a run's responses.
type tally struct{ nacked, incomplete, unchanged, published int }

// publishedConfig is a config the client published and the same content
// decoded separately, which nothing shares.
type publishedConfig struct{ cfg, ref *Config }

// checkStep hands the client one response and checks it against the
// model.
func checkStep(t *testing.T, c *Client, m *model, typ, version string, res []*anypb.Any, history *[]publishedConfig, tally *tally) {
	t.Helper()
	names, _ := c.subscription(typ)
	accBefore, curBefore := c.acc, c.Current()
	fresh, err := newState(m.role)
	require.NoError(t, err)
	_, refused := fresh.apply(typ, res)

	cfg, out, err := c.accept(typ, res, version, names)
	if refused != nil {
		require.Error(t, err, "a fresh state refuses the %s response: %v", shortType(typ), refused)
		require.Equal(t, nackMessage(refused), nackMessage(err), "the NACK's reason")
		require.Same(t, accBefore, c.acc, "a NACK keeps the accepted state")
		require.Same(t, curBefore, c.Current(), "a NACK keeps the published config")
		tally.nacked++
		checkIndexes(t, c.acc)
		requireScratch(t, c.acc, m)
		return
	}
	require.NoError(t, err)
	m.accept(t, typ, res)
	checkIndexes(t, c.acc)
	ref := requireScratch(t, c.acc, m)
	switch {
	case ref == nil:
		require.Equal(t, incomplete, out)
		require.Same(t, curBefore, c.Current())
		tally.incomplete++
	case curBefore != nil && contentEqual(curBefore, ref):
		require.Equal(t, unchanged, out, "nothing changed for the proxy")
		require.Same(t, curBefore, c.Current())
		tally.unchanged++
	default:
		tally.published++
		require.Equal(t, published, out, "the content changed")
		require.Same(t, cfg, c.Current())
		require.True(t, contentEqual(cfg, ref))
		require.Equal(t, version, cfg.Versions[typ])
		*history = append(*history, publishedConfig{cfg: cfg, ref: ref})
	}
}

// requireScratch checks the state against DecodeRole of the resources
// the model holds, and returns that Config (nil while incomplete).
func requireScratch(t *testing.T, s *state, m *model) *Config {
	t.Helper()
	if m.lds == nil || m.cds == nil {
		// DecodeRole takes no resources of a type for an empty response.
		require.False(t, s.complete(), "no LDS or CDS response accepted yet")
		return nil
	}
	ref, err := DecodeRole(m.role, m.all()...)
	if err != nil {
		require.ErrorIs(t, err, ErrIncomplete, "the model holds only accepted resources")
		require.False(t, s.complete(), "DecodeRole: %v", err)
		return nil
	}
	require.True(t, s.complete(), "DecodeRole gives a config; the client: %v", s.missing())
	got := s.config(nil)
	require.True(t, contentEqual(ref, got))
	return ref
}

// contentEqual is sameContent the slow way: everything compared.
func contentEqual(a, b *Config) bool {
	return reflect.DeepEqual(a.Listeners, b.Listeners) && reflect.DeepEqual(a.Clusters, b.Clusters) &&
		reflect.DeepEqual(a.Sidecar, b.Sidecar) && sameBundles(a.Bundles, b.Bundles)
}

// model is what the client should hold after the responses it accepted:
// the last LDS and CDS responses (nil before the first), the EDS and RDS resources by name, each
// kept while subscribed (named by a cluster, by the outbound listener),
// and the last ROOTCA.
type model struct {
	role     string
	lds, cds []*anypb.Any
	eds, rds map[string]*anypb.Any
	sds      *anypb.Any
}

func (m *model) all() []*anypb.Any {
	out := slices.Concat(m.lds, m.cds, slices.Collect(maps.Values(m.eds)), slices.Collect(maps.Values(m.rds)))
	if m.sds != nil {
		out = append(out, m.sds)
	}
	return out
}

func (m *model) accept(t *testing.T, typ string, res []*anypb.Any) {
	switch typ {
	case TypeListener:
		m.lds = append([]*anypb.Any{}, res...)
	case TypeCluster:
		m.cds = append([]*anypb.Any{}, res...)
	case TypeClusterLoadAssignment:
		for _, r := range res {
			m.eds[anyMessage(t, r).(*endpointv3.ClusterLoadAssignment).GetClusterName()] = r
		}
	case TypeRouteConfiguration:
		for _, r := range res {
			m.rds[anyMessage(t, r).(*routev3.RouteConfiguration).GetName()] = r
		}
	case TypeSecret:
		if len(res) > 0 {
			m.sds = res[len(res)-1]
		}
	}
	// What is no longer subscribed is forgotten.
	s, err := newState(m.role)
	require.NoError(t, err)
	s, err = s.apply(TypeCluster, m.cds)
	require.NoError(t, err)
	keep(m.eds, s.edsNames())
	if m.role == RoleSidecar {
		var names []string // nothing is subscribed before the first LDS response
		if m.lds != nil {
			s, _ = newState(m.role)
			s, err = s.apply(TypeListener, m.lds)
			require.NoError(t, err)
			names = s.rdsNames()
		}
		keep(m.rds, names)
	}
}

func keep(m map[string]*anypb.Any, names []string) {
	for n := range m {
		if !slices.Contains(names, n) {
			delete(m, n)
		}
	}
}

// checkIndexes recomputes every index of s from its resources.
func checkIndexes(t *testing.T, s *state) {
	t.Helper()
	require.Equal(t, s.complete(), len(s.missing()) == 0, "complete() and missing() %v", s.missing())
	if s.clusters == nil {
		require.Nil(t, s.merged)
	} else {
		merged := map[string]Cluster{}
		for name, e := range s.clusters {
			c := e.v
			if a, ok := s.assignments[c.ServiceName]; ok && c.Type == EDS {
				c.Endpoints, c.Priorities, c.OverprovisioningFactor = a.v.endpoints, a.v.priorities, a.v.overprovisioning
			}
			merged[name] = c
		}
		require.Equal(t, merged, s.merged)
	}
	counts, aliases := map[string]int32{}, map[string][]string{}
	missingAssignments := 0
	for name, e := range s.clusters {
		require.Equal(t, name, e.name)
		if e.v.Type != EDS {
			continue
		}
		counts[e.v.ServiceName]++
		if e.v.ServiceName != name {
			aliases[e.v.ServiceName] = append(aliases[e.v.ServiceName], name)
		}
		if _, ok := s.assignments[e.v.ServiceName]; !ok {
			missingAssignments++
		}
	}
	require.Equal(t, counts, nonNil(s.edsCount))
	gotAliases := map[string][]string{}
	for k, v := range s.aliases {
		gotAliases[k] = slices.Sorted(slices.Values(v))
	}
	for k := range aliases {
		slices.Sort(aliases[k])
	}
	require.Equal(t, aliases, gotAliases)
	var eds []string
	if len(counts) > 0 {
		eds = slices.Sorted(maps.Keys(counts))
	}
	require.Equal(t, eds, s.eds)
	orphans := map[string]struct{}{}
	for name := range s.assignments {
		if counts[name] == 0 {
			orphans[name] = struct{}{}
		}
	}
	require.Equal(t, orphans, nonNil(s.orphans))
	require.Equal(t, missingAssignments, s.missingAssignments)

	needs := map[string]int32{}
	need := func(c string) { needs[c]++ }
	if s.sc == nil {
		var list []Listener
		for name, e := range s.listeners {
			require.Equal(t, name, e.name)
			list = append(list, e.v)
			for _, ch := range e.v.Chains {
				need(ch.Cluster)
			}
		}
		slices.SortFunc(list, func(a, b Listener) int { return cmpString(a.Name, b.Name) })
		if s.listeners != nil && list == nil {
			list = []Listener{}
		}
		require.Equal(t, list, s.listenerList)
	} else if sc := s.sc; sc.outbound != nil {
		outboundRefs(sc.outbound.v, need)
		inboundRefs(sc.inbound.v, need)
		named := routeNames(sc.outbound.v)
		require.Equal(t, named, sc.named)
		missingRoutes := 0
		for _, n := range named {
			if r, ok := sc.routes[n]; ok {
				routeRefs(r.v, need)
			} else {
				missingRoutes++
			}
		}
		require.Equal(t, missingRoutes, sc.missingRoutes)
		require.Equal(t, s.sidecarView(), sc.view)
	}
	require.Equal(t, needs, nonNil(s.needs))
	missingClusters := 0
	for c := range needs {
		if _, ok := s.clusters[c]; !ok {
			missingClusters++
		}
	}
	require.Equal(t, missingClusters, s.missingClusters)

	if s.sc != nil && s.clusters != nil {
		all := map[string]Cluster{}
		refs := map[string]int32{}
		for name, e := range s.clusters {
			all[name] = e.v
			if e.v.Service != nil {
				refs[e.v.Service.Host]++
			}
		}
		table := &Sidecar{}
		require.NoError(t, table.indexNames(all), "an accepted state has no name conflict")
		require.Equal(t, table.hostVIP, s.sc.hostVIP)
		require.Equal(t, table.vipHost, s.sc.vipHost)
		require.Equal(t, refs, nonNil(s.sc.hostRefs))
	}
}

func nonNil[K comparable, V any](m map[K]V) map[K]V {
	if m == nil {
		return map[K]V{}
	}
	return m
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

// withUnknownField is r with a field no proto defines appended: the same
// content (unknown fields are not set fields), other bytes.
func withUnknownField(r *anypb.Any) *anypb.Any {
	b := protowire.AppendTag(slices.Clone(r.GetValue()), 4999, protowire.VarintType)
	return &anypb.Any{TypeUrl: r.GetTypeUrl(), Value: protowire.AppendVarint(b, 7)}
}

// mutateList sometimes drops, duplicates or resends with other bytes
// one resource of a response.
func mutateList(rnd *rand.Rand, res []*anypb.Any) []*anypb.Any {
	res = slices.Clone(res)
	if len(res) == 0 {
		return res
	}
	i := rnd.IntN(len(res))
	switch p := rnd.Float64(); {
	case p < 0.08:
		res = slices.Delete(res, i, i+1)
	case p < 0.12:
		res = append(res, res[i])
	case p < 0.25:
		res[i] = withUnknownField(res[i])
	}
	rnd.Shuffle(len(res), func(a, b int) { res[a], res[b] = res[b], res[a] })
	return res
}

// subset is a random part of res, for EDS and RDS responses, which name
// their resources.
func subset(rnd *rand.Rand, res []*anypb.Any) []*anypb.Any {
	if rnd.IntN(3) == 0 {
		return res
	}
	var out []*anypb.Any
	for _, r := range res {
		if rnd.IntN(2) == 0 {
			out = append(out, r)
		}
	}
	return out
}

// --- the gateway's resources ---

// gatewayGen makes the gateway's responses from a world that changes a
// little at every step: services exported and unexported, their
// clusters and endpoints changed. A response carries the world as it is
// for its type, so types sent at different steps disagree for a while,
// and now and then an invalid resource, a duplicate, one missing, or one
// with the same content in other bytes.
type gatewayGen struct {
	svcs []service
	// clusters and assignments per service: two valid variants, then an
	// invalid one.
	clusters, assignments [][]*anypb.Any
	fed                   []*anypb.Any
	// alias is an EDS cluster that takes svcs[0]'s assignment.
	alias   *anypb.Any
	secrets []*anypb.Any

	// The world: per service, whether it is exported and the variants of
	// its cluster and assignment; the alias and its chain, a second
	// listener, the federation cluster's variant, the secret's.
	present              []bool
	clusterV, assignV    []int
	withAlias, withOther bool
	fedV, secretV        int
}

func newGatewayGen(tb testing.TB) *gatewayGen {
	g := &gatewayGen{svcs: []service{echo, api, cart}}
	for i := range 3 {
		g.svcs = append(g.svcs, service{name: fmt.Sprintf("svc-%d", i), ns: "gen", port: 8080,
			eps: []ep{{ip: fmt.Sprintf("10.9.%d.1", i), port: 8080, healthy: true, region: "eu", zone: "eu-a"}}})
	}
	for _, s := range g.svcs {
		c1, c2, bad := edsCluster(s.cluster()), edsCluster(s.cluster()), edsCluster(s.cluster())
		c2.ConnectTimeout = durationpb.New(2 * time.Second)
		bad.LbPolicy = clusterv3.Cluster_RANDOM
		g.clusters = append(g.clusters, []*anypb.Any{deterministicAny(tb, c1), deterministicAny(tb, c2), deterministicAny(tb, bad)})
		other := slices.Clone(s.eps)
		other[0].healthy = !other[0].healthy
		other = append(other, ep{ip: "10.8.0.1", port: 9999, healthy: true})
		badA := assignment(s.cluster(), s.eps...)
		badA.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().Address = "not-an-ip"
		g.assignments = append(g.assignments, []*anypb.Any{
			deterministicAny(tb, assignment(s.cluster(), s.eps...)), deterministicAny(tb, assignment(s.cluster(), other...)),
			deterministicAny(tb, badA),
		})
	}
	alias := edsCluster("alias-of-echo")
	alias.EdsClusterConfig.ServiceName = echo.cluster()
	g.alias = deterministicAny(tb, alias)
	g.fed = []*anypb.Any{deterministicAny(tb, fedClusterFor("10.0.0.5", 15012)), deterministicAny(tb, fedClusterFor("federator.example", 15012))}
	alpha, beta := testRoot(tb, "alpha.mesh"), testRoot(tb, "beta.mesh")
	g.secrets = []*anypb.Any{
		deterministicAny(tb, rootCA(tb, map[string][]*x509.Certificate{"alpha.mesh": {alpha}})),
		deterministicAny(tb, rootCA(tb, map[string][]*x509.Certificate{"alpha.mesh": {alpha}, "beta.mesh": {beta}})),
		deterministicAny(tb, &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{}}}),
	}
	n := len(g.svcs)
	g.present, g.clusterV, g.assignV = make([]bool, n), make([]int, n), make([]int, n)
	for i := range n {
		g.present[i] = i%2 == 0
	}
	return g
}

// evolve changes the world a little.
func (g *gatewayGen) evolve(rnd *rand.Rand) {
	i := rnd.IntN(len(g.svcs))
	switch rnd.IntN(8) {
	case 0, 1:
		g.present[i] = !g.present[i]
	case 2:
		g.clusterV[i] = 1 - g.clusterV[i]
	case 3, 4:
		g.assignV[i] = 1 - g.assignV[i]
	case 5:
		g.withAlias = !g.withAlias
	case 6:
		g.withOther = !g.withOther
	case 7:
		g.fedV, g.secretV = rnd.IntN(2), rnd.IntN(2)
	}
}

func (g *gatewayGen) response(t *testing.T, rnd *rand.Rand, typ string) []*anypb.Any {
	if rnd.IntN(3) == 0 {
		g.evolve(rnd)
	}
	invalid := rnd.IntN(20) == 0
	var res []*anypb.Any
	switch typ {
	case TypeListener:
		chains := []*listenerv3.FilterChain{tcpChain(t, fedSNI, fedCluster)}
		for i, s := range g.svcs {
			if g.present[i] {
				chains = append(chains, tcpChain(t, s.sni(), s.cluster()))
			}
		}
		if g.withAlias {
			chains = append(chains, tcpChain(t, "alias.example", "alias-of-echo"))
		}
		if invalid {
			bad := tcpChain(t, "web.example.com", echo.cluster())
			bad.Filters[0].Name = "envoy.filters.network.http_connection_manager"
			bad.Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, &hcmv3.HttpConnectionManager{StatPrefix: "web"})}
			chains = append(chains, bad)
		}
		sortChains(chains)
		res = append(res, deterministicAny(t, gatewayListener(t, chains...)))
		if g.withOther {
			other := gatewayListener(t, tcpChain(t, "other.example", fedCluster))
			other.Name = "other"
			res = append(res, deterministicAny(t, other))
		}
	case TypeCluster:
		res = append(res, g.fed[g.fedV])
		for i := range g.svcs {
			if g.present[i] {
				res = append(res, g.clusters[i][g.clusterV[i]])
			}
		}
		if g.withAlias {
			res = append(res, g.alias)
		}
		if invalid {
			i := rnd.IntN(len(g.svcs))
			res = append(res, g.clusters[i][2])
		}
	case TypeClusterLoadAssignment:
		for i := range g.svcs {
			if g.present[i] || rnd.IntN(6) == 0 { // now and then one not subscribed
				res = append(res, g.assignments[i][g.assignV[i]])
			}
		}
		if rnd.IntN(4) == 0 {
			res = subset(rnd, res)
		}
		if invalid {
			i := rnd.IntN(len(g.svcs))
			res = append(res, g.assignments[i][2])
		}
	case TypeSecret:
		switch {
		case invalid:
			res = []*anypb.Any{g.secrets[2]}
		case rnd.IntN(10) > 0:
			res = []*anypb.Any{g.secrets[g.secretV]}
		}
	}
	return mutateList(rnd, res)
}

// --- the sidecar's resources ---

// sidecarGen makes the sidecar's responses, as gatewayGen does the
// gateway's: from a world of services, each exported or not and changed
// (other endpoints, another VIP, another port), translated whole by
// buildSidecar; now and then a response gives two services one VIP, or
// carries an invalid resource.
type sidecarGen struct {
	svcs    []scService
	secrets []*anypb.Any
	present []bool
	change  []int
	secretV int
}

func newSidecarGen(tb testing.TB) *sidecarGen {
	g := &sidecarGen{svcs: []scService{scEcho, scGreeter, scDB}}
	for i := range 3 {
		g.svcs = append(g.svcs, scService{
			name: fmt.Sprintf("svc-%d", i), ns: "gen", vip: fmt.Sprintf("240.240.99.%d", i+1),
			ports: []scPort{{80, UpstreamHTTP1}, {uint32(7000 + i), UpstreamHTTPNone}},
			ids:   []string{fmt.Sprintf("spiffe://alpha.mesh/ns/gen/sa/svc-%d", i)},
			locs: []scLocality{{priority: 0, region: "eu", zone: "eu-a", weight: 1,
				eps: []ep{{ip: fmt.Sprintf("10.9.%d.1", i), port: 8080, healthy: true}}}},
		})
	}
	g.secrets = []*anypb.Any{
		deterministicAny(tb, sidecarRootCA(tb)),
		deterministicAny(tb, rootCA(tb, map[string][]*x509.Certificate{"alpha.mesh": {testRoot(tb, "alpha.mesh")}, "beta.mesh": {testRoot(tb, "beta.mesh")}})),
	}
	g.present, g.change = make([]bool, len(g.svcs)), make([]int, len(g.svcs))
	for i := range g.present {
		g.present[i] = i%2 == 0
	}
	return g
}

func (g *sidecarGen) evolve(rnd *rand.Rand) {
	i := rnd.IntN(len(g.svcs))
	switch rnd.IntN(4) {
	case 0, 1:
		g.present[i] = !g.present[i]
	case 2:
		g.change[i] = rnd.IntN(4)
	case 3:
		g.secretV = rnd.IntN(2)
	}
}

// snapshot is what the federator sends for the world; with conflict,
// one service takes another's VIP.
func (g *sidecarGen) snapshot(t *testing.T, rnd *rand.Rand, conflict bool) responses {
	var svcs []scService
	for i, s := range g.svcs {
		if !g.present[i] {
			continue
		}
		switch g.change[i] {
		case 1:
			s.locs = slices.Clone(s.locs)
			s.locs[0].eps = []ep{{ip: fmt.Sprintf("10.7.%d.9", i), port: 8081, healthy: true}}
		case 2:
			s.vip = fmt.Sprintf("240.241.0.%d", i+1)
		case 3:
			s.ports = append(slices.Clone(s.ports), scPort{9000 + uint32(i), []UpstreamHTTP{UpstreamHTTP2, UpstreamHTTPNone}[i%2]})
		}
		svcs = append(svcs, s)
	}
	if conflict && len(svcs) > 1 {
		svcs[0].vip = svcs[1].vip
	}
	return byType(t, buildSidecar(t, svcs...).anys(t))
}

func (g *sidecarGen) response(t *testing.T, rnd *rand.Rand, typ string) []*anypb.Any {
	if rnd.IntN(3) == 0 {
		g.evolve(rnd)
	}
	if typ == TypeSecret {
		var res []*anypb.Any
		if rnd.IntN(10) > 0 {
			res = []*anypb.Any{g.secrets[g.secretV]}
		}
		return mutateList(rnd, res)
	}
	res := g.snapshot(t, rnd, rnd.IntN(25) == 0)[typ]
	if rnd.IntN(20) == 0 && len(res) > 0 {
		i := rnd.IntN(len(res))
		m := anyMessage(t, res[i])
		switch m := m.(type) {
		case *listenerv3.Listener:
			m.ListenerFilters = nil
		case *routev3.RouteConfiguration:
			if len(m.VirtualHosts) > 0 {
				m.VirtualHosts[0].Domains = append(m.VirtualHosts[0].Domains, "*.example.com")
			}
		case *clusterv3.Cluster:
			if m.GetMetadata() != nil && rnd.IntN(2) == 0 {
				// Its host now has two VIPs, when the service has two ports.
				editMeta(t, m, func(f map[string]*structpb.Value) { f["vip"] = structpb.NewStringValue("240.242.0.1") })
			} else {
				m.LbPolicy = clusterv3.Cluster_RANDOM
			}
		case *endpointv3.ClusterLoadAssignment:
			m.Endpoints = append(m.Endpoints, &endpointv3.LocalityLbEndpoints{Priority: 5,
				LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{
					Endpoint: &endpointv3.Endpoint{Address: socketAddress("10.6.6.6", 1)}}}}})
		}
		res = slices.Clone(res)
		res[i] = deterministicAny(t, m)
	}
	if (typ == TypeClusterLoadAssignment || typ == TypeRouteConfiguration) && rnd.IntN(4) == 0 {
		res = subset(rnd, res)
	}
	return mutateList(rnd, res)
}

// TestReuseOnlyTheSameBytes: what the client reuses and what it decodes
// again, whatever stream the resources come on.
func TestReuseOnlyTheSameBytes(t *testing.T) {
	checks := 0
	c, err := New(ClientConfig{Server: "127.0.0.1:15010", Plaintext: true, Node: gatewayNode,
		Check: func(*Config) error { checks++; return nil }})
	require.NoError(t, err)
	r := byType(t, buildGateway(t, "10.0.0.5", echo, api).anys(t))
	for _, typ := range []string{TypeListener, TypeCluster, TypeClusterLoadAssignment} {
		names, _ := c.subscription(typ)
		_, _, err := c.accept(typ, r[typ], "v1", names)
		require.NoError(t, err)
	}
	v1 := c.Current()
	require.NotNil(t, v1)
	held := c.acc.clusters[echo.cluster()]

	// The same bytes again (a resend, or a new stream after a reconnect):
	// the same entry, nothing published.
	_, out, err := c.accept(TypeCluster, r[TypeCluster], "v1", nil)
	require.NoError(t, err)
	require.Equal(t, unchanged, out)
	require.Same(t, held, c.acc.clusters[echo.cluster()])

	// The same content in other bytes: decoded and validated again, and
	// still nothing to publish.
	other := slices.Clone(r[TypeCluster])
	i := slices.IndexFunc(other, func(a *anypb.Any) bool { return string(peekName(a.GetValue())) == echo.cluster() })
	other[i] = withUnknownField(other[i])
	_, out, err = c.accept(TypeCluster, other, "v2", nil)
	require.NoError(t, err)
	require.Equal(t, unchanged, out)
	require.NotSame(t, held, c.acc.clusters[echo.cluster()])
	require.Equal(t, held.v, c.acc.clusters[echo.cluster()].v)
	require.Same(t, v1, c.Current())
	require.Equal(t, 1, checks, "Check ran for the config published, not for the same again")

	// Other bytes under a name the client holds are never taken for it: an
	// invalid echo cluster is NACKed and the state kept.
	bad := edsCluster(echo.cluster())
	bad.LbPolicy = clusterv3.Cluster_MAGLEV
	other[i] = deterministicAny(t, bad)
	acc := c.acc
	_, _, err = c.accept(TypeCluster, other, "v3", nil)
	require.ErrorContains(t, err, `cluster "outbound|80||echo.demo.svc.cluster.local": lb_policy: MAGLEV is not supported`)
	require.Same(t, acc, c.acc)
	require.Same(t, v1, c.Current())
}
