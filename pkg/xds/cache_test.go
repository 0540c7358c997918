package xds

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"github.com/stretchr/testify/require"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
)

var cacheTestTypes = []string{resource.ClusterType, resource.EndpointType, resource.ListenerType}

// snapGen makes random snapshots, each from the last as a translation
// does: a resource left alone is the same message, a changed one a new
// message, and now and then an unchanged one is a new message with the
// same content; a type is often left alone whole (a translation where
// only endpoints changed). A type's version changes exactly when its
// content does.
type snapGen struct {
	rng      *rand.Rand
	step     int
	items    map[string]map[string]types.Resource
	versions map[string]string
}

func newSnapGen(seed uint64) *snapGen {
	g := &snapGen{rng: rand.New(rand.NewPCG(seed, 11)), items: map[string]map[string]types.Resource{}, versions: map[string]string{}}
	for _, t := range cacheTestTypes {
		g.items[t] = map[string]types.Resource{}
	}
	return g
}

func (g *snapGen) message(typ, name string, v int) types.Resource {
	switch typ {
	case resource.ClusterType:
		return &clusterv3.Cluster{Name: name, ConnectTimeout: durationpb.New(time.Duration(v+1) * time.Second)}
	case resource.EndpointType:
		return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			Locality: &corev3.Locality{Zone: fmt.Sprintf("z%d", v)}}}}
	default:
		return &listenerv3.Listener{Name: name, StatPrefix: fmt.Sprint(v)}
	}
}

func (g *snapGen) next() *cache.Snapshot {
	g.step++
	snap := &cache.Snapshot{}
	for _, typ := range cacheTestTypes {
		changed := g.versions[typ] == ""
		// Left alone, a type keeps its messages and its version.
		alone := !changed && g.rng.IntN(3) == 0
		for n := 0; n < 6 && !alone; n++ {
			name := fmt.Sprintf("%s-%d", typ[strings.LastIndex(typ, ".")+1:], n)
			old, had := g.items[typ][name]
			switch r := g.rng.IntN(10); {
			case r < 5: // left alone
			case r < 6 && had: // the same content, another message
				g.items[typ][name] = cloneResource(old)
			case r < 8:
				g.items[typ][name] = g.message(typ, name, g.rng.IntN(3))
				changed = changed || !had || !equalResource(old, g.items[typ][name])
			default:
				delete(g.items[typ], name)
				changed = changed || had
			}
		}
		if changed {
			g.versions[typ] = fmt.Sprintf("v%d", g.step)
		}
		items := make([]types.Resource, 0, len(g.items[typ]))
		for _, r := range g.items[typ] {
			items = append(items, r)
		}
		snap.Resources[cache.GetResponseType(typ)] = cache.NewResources(g.versions[typ], items)
	}
	return snap
}

func cloneResource(r types.Resource) types.Resource {
	b, err := cache.MarshalResource(r)
	if err != nil {
		panic(err)
	}
	c := r.ProtoReflect().New().Interface()
	if err := proto.Unmarshal(b, c); err != nil {
		panic(err)
	}
	return c
}

func equalResource(a, b types.Resource) bool {
	x, _ := cache.MarshalResource(a)
	y, _ := cache.MarshalResource(b)
	return bytes.Equal(x, y)
}

// watchPair is one watch opened on both caches with the same request.
type watchPair struct {
	ref, enc             chan cache.Response
	refCancel, encCancel func()
}

type deltaPair struct {
	ref, enc             chan cache.DeltaResponse
	refCancel, encCancel func()
}

// sotwStream is a proxy's state-of-the-world stream as the server keeps
// it, once per cache: the subscriptions the caches read and the server
// updates.
type sotwStream struct {
	refSub, encSub map[string]*stream.Subscription
	acked          map[string]string
	open           map[string]*watchPair
	// refHeld and encHeld are the ClusterLoadAssignments each cache's
	// stream holds, by name, as a client keeps them: a response adds or
	// replaces the ones it carries.
	refHeld, encHeld map[string][]byte
}

type deltaStream struct {
	refSub, encSub map[string]*stream.Subscription
	nonce          map[string]string
	open           map[string]*deltaPair
}

// Property: for any sequence of snapshots, requests (ACKs, NACKs,
// resources named or not, all or some of them) and cancels, the
// encodedCache answers every watch when go-control-plane's snapshot
// cache does, with the same response: version, resources and their
// bytes, and the state it hands the server; delta likewise.
func TestEncodedCacheAnswersAsTheSnapshotCache(t *testing.T) {
	node := &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleGateway, IP: "10.0.0.1", Pod: "gw-0", Namespace: "ns"}.String()}
	// partial counts our answers that carried fewer assignments than
	// the snapshot cache's: the sequences must have had some.
	partial := 0
	defer func() {
		if !t.Failed() {
			require.Positive(t, partial, "no partial answer was tested")
		}
	}()
	for seed := range uint64(30) {
		rng := rand.New(rand.NewPCG(seed, 3))
		ref := cache.NewSnapshotCache(true, nodeGroups{}, nil)
		enc := newEncodedCache(nodeGroups{}, nil)
		gen := newSnapGen(seed)
		var current *cache.Snapshot
		sotw := make([]*sotwStream, 3)
		for i := range sotw {
			sotw[i] = &sotwStream{refSub: map[string]*stream.Subscription{}, encSub: map[string]*stream.Subscription{},
				acked: map[string]string{}, open: map[string]*watchPair{}, refHeld: map[string][]byte{}, encHeld: map[string][]byte{}}
		}
		deltas := make([]*deltaStream, 2)
		for i := range deltas {
			deltas[i] = &deltaStream{refSub: map[string]*stream.Subscription{}, encSub: map[string]*stream.Subscription{},
				nonce: map[string]string{}, open: map[string]*deltaPair{}}
		}
		var answered, deltaAnswered int
		check := func(step int) {
			for si, s := range sotw {
				for typ, w := range s.open {
					r, e := receive(w.ref), receive(w.enc)
					require.Equal(t, r == nil, e == nil, "seed %d step %d stream %d %s: answered by one cache only", seed, step, si, typ)
					if r != nil {
						if partialType(typ) {
							if requireSameHeld(t, s, r, e, "seed %d step %d stream %d %s", seed, step, si, typ) {
								partial++
							}
						} else {
							requireSameResponse(t, r, e, "seed %d step %d stream %d %s", seed, step, si, typ)
						}
						s.ack(typ, r, e)
						delete(s.open, typ)
						answered++
					}
				}
			}
			for si, d := range deltas {
				for typ, w := range d.open {
					r, e := receive(w.ref), receive(w.enc)
					require.Equal(t, r == nil, e == nil, "seed %d step %d delta stream %d %s: answered by one cache only", seed, step, si, typ)
					if r != nil {
						requireSameDelta(t, r, e, "seed %d step %d delta stream %d %s", seed, step, si, typ)
						d.ack(typ, r, e)
						delete(d.open, typ)
						deltaAnswered++
					}
				}
			}
		}
		for step := range 200 {
			switch a := rng.IntN(10); {
			case a < 2:
				current = gen.next()
				require.NoError(t, ref.SetSnapshot(context.Background(), gatewayGroup, current))
				require.NoError(t, enc.SetSnapshot(context.Background(), gatewayGroup, current))
			case a < 7:
				s := sotw[rng.IntN(len(sotw))]
				typ := cacheTestTypes[rng.IntN(len(cacheTestTypes))]
				if s.open[typ] != nil {
					continue
				}
				req := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ, VersionInfo: s.acked[typ], ResourceNames: names(rng, current, typ)}
				switch rng.IntN(8) {
				case 0: // a proxy that restarted
					req.VersionInfo = ""
				case 1: // a NACK of the last response, at the version before
					req.ErrorDetail = &rpcstatus.Status{Message: "refused"}
				}
				if s.refSub[typ] == nil {
					rs, es := stream.NewSotwSubscription(req.ResourceNames, true), stream.NewSotwSubscription(req.ResourceNames, true)
					s.refSub[typ], s.encSub[typ] = &rs, &es
				} else {
					s.refSub[typ].SetResourceSubscription(req.ResourceNames)
					s.encSub[typ].SetResourceSubscription(req.ResourceNames)
				}
				w := &watchPair{ref: make(chan cache.Response, 1), enc: make(chan cache.Response, 1)}
				var err error
				w.refCancel, err = ref.CreateWatch(req, s.refSub[typ], w.ref)
				require.NoError(t, err)
				w.encCancel, err = enc.CreateWatch(req, s.encSub[typ], w.enc)
				require.NoError(t, err)
				s.open[typ] = w
			case a < 9:
				d := deltas[rng.IntN(len(deltas))]
				typ := cacheTestTypes[rng.IntN(len(cacheTestTypes))]
				if d.open[typ] != nil {
					continue
				}
				req := &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ, ResponseNonce: d.nonce[typ]}
				if rng.IntN(3) == 0 {
					req.ResourceNamesSubscribe = names(rng, current, typ)
				}
				if d.refSub[typ] == nil {
					rs := stream.NewDeltaSubscription(req.ResourceNamesSubscribe, nil, nil, true)
					es := stream.NewDeltaSubscription(req.ResourceNamesSubscribe, nil, nil, true)
					d.refSub[typ], d.encSub[typ] = &rs, &es
				} else {
					if rng.IntN(4) == 0 {
						req.ResourceNamesUnsubscribe = names(rng, current, typ)
					}
					d.refSub[typ].UpdateResourceSubscriptions(req.ResourceNamesSubscribe, req.ResourceNamesUnsubscribe)
					d.encSub[typ].UpdateResourceSubscriptions(req.ResourceNamesSubscribe, req.ResourceNamesUnsubscribe)
				}
				w := &deltaPair{ref: make(chan cache.DeltaResponse, 1), enc: make(chan cache.DeltaResponse, 1)}
				var err error
				w.refCancel, err = ref.CreateDeltaWatch(req, d.refSub[typ], w.ref)
				require.NoError(t, err)
				w.encCancel, err = enc.CreateDeltaWatch(req, d.encSub[typ], w.enc)
				require.NoError(t, err)
				require.Equal(t, w.refCancel == nil, w.encCancel == nil, "seed %d step %d: a delta watch kept by one cache only", seed, step)
				d.open[typ] = w
			default: // a stream's watch ends (it closed, or asks again)
				s := sotw[rng.IntN(len(sotw))]
				for typ, w := range s.open {
					w.refCancel()
					w.encCancel()
					delete(s.open, typ)
					break
				}
			}
			check(step)
		}
		require.Positive(t, answered, "seed %d: no state-of-the-world response", seed)
		require.Positive(t, deltaAnswered, "seed %d: no delta response", seed)
	}
}

// names are, for a request, no names (wildcard), all of the snapshot's,
// some of them, or some with one it lacks.
func names(rng *rand.Rand, snap *cache.Snapshot, typ string) []string {
	var all []string
	for name := range snap.GetResources(typ) {
		all = append(all, name)
	}
	slices.Sort(all)
	switch rng.IntN(4) {
	case 0:
		return nil
	case 1:
		return all
	case 2:
		if len(all) > 0 {
			return all[:rng.IntN(len(all))]
		}
		return nil
	default:
		return append(all, "absent")
	}
}

func receive[R any](ch chan R) R {
	select {
	case r := <-ch:
		return r
	default:
		var zero R
		return zero
	}
}

func (s *sotwStream) ack(typ string, r, e cache.Response) {
	s.refSub[typ].SetReturnedResources(r.GetReturnedResources())
	s.encSub[typ].SetReturnedResources(e.GetReturnedResources())
	s.acked[typ] = r.GetResponseVersion()
}

func (d *deltaStream) ack(typ string, r, e cache.DeltaResponse) {
	d.refSub[typ].SetReturnedResources(r.GetNextVersionMap())
	d.encSub[typ].SetReturnedResources(e.GetNextVersionMap())
	d.nonce[typ] = "n"
}

// sameHeads returns both caches' responses, which must have one type and
// version.
func sameHeads(t *testing.T, ref, enc cache.Response, msg string) (r, e *discoveryv3.DiscoveryResponse) {
	t.Helper()
	r, err := ref.GetDiscoveryResponse()
	require.NoError(t, err)
	e, err = enc.GetDiscoveryResponse()
	require.NoError(t, err)
	require.Equal(t, r.GetVersionInfo(), e.GetVersionInfo(), msg)
	require.Equal(t, r.GetTypeUrl(), e.GetTypeUrl(), msg)
	require.Equal(t, ref.GetResponseVersion(), enc.GetResponseVersion(), msg)
	return r, e
}

func requireSameResponse(t *testing.T, ref, enc cache.Response, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	r, e := sameHeads(t, ref, enc, msg)
	sortAnys := func(rs *discoveryv3.DiscoveryResponse) [][]byte {
		var out [][]byte
		for _, a := range rs.GetResources() {
			require.Equal(t, rs.GetTypeUrl(), a.GetTypeUrl())
			out = append(out, a.GetValue())
		}
		slices.SortFunc(out, bytes.Compare)
		return out
	}
	require.Equal(t, sortAnys(r), sortAnys(e), msg)
	require.Equal(t, ref.GetReturnedResources(), enc.GetReturnedResources(), msg)
}

// requireSameHeld checks a partial type's responses: the same version,
// and, once each stream has added or replaced what its response carries,
// the same assignments held, with no more carried by ours than by the
// snapshot cache's (which carries them all). The returned resources name
// the same ones.
func requireSameHeld(t *testing.T, s *sotwStream, ref, enc cache.Response, format string, args ...any) (fewer bool) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	r, e := sameHeads(t, ref, enc, msg)
	require.LessOrEqual(t, len(e.GetResources()), len(r.GetResources()), msg)
	hold := func(held map[string][]byte, rs *discoveryv3.DiscoveryResponse) {
		for _, a := range rs.GetResources() {
			var cla endpointv3.ClusterLoadAssignment
			require.NoError(t, a.UnmarshalTo(&cla))
			held[cla.GetClusterName()] = a.GetValue()
		}
	}
	hold(s.refHeld, r)
	hold(s.encHeld, e)
	require.Equal(t, s.refHeld, s.encHeld, msg)
	names := func(m map[string]string) []string { return slices.Sorted(maps.Keys(m)) }
	require.ElementsMatch(t, names(ref.GetReturnedResources()), names(enc.GetReturnedResources()), msg)
	return len(e.GetResources()) < len(r.GetResources())
}

func requireSameDelta(t *testing.T, ref, enc cache.DeltaResponse, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	r, err := ref.GetDeltaDiscoveryResponse()
	require.NoError(t, err)
	e, err := enc.GetDeltaDiscoveryResponse()
	require.NoError(t, err)
	require.Equal(t, r.GetSystemVersionInfo(), e.GetSystemVersionInfo(), msg)
	require.Equal(t, r.GetTypeUrl(), e.GetTypeUrl(), msg)
	type res struct {
		name, version, typeURL string
		value                  []byte
	}
	flat := func(rs *discoveryv3.DeltaDiscoveryResponse) []res {
		var out []res
		for _, x := range rs.GetResources() {
			out = append(out, res{x.GetName(), x.GetVersion(), x.GetResource().GetTypeUrl(), x.GetResource().GetValue()})
		}
		slices.SortFunc(out, func(a, b res) int { return strings.Compare(a.name, b.name) })
		return out
	}
	require.Equal(t, flat(r), flat(e), msg)
	require.ElementsMatch(t, r.GetRemovedResources(), e.GetRemovedResources(), msg)
	require.Equal(t, ref.GetNextVersionMap(), enc.GetNextVersionMap(), msg)
}

// What the cache is for: a resource is encoded once, whichever streams
// it goes to, and a resource the next snapshot keeps (the same message)
// is not encoded again.
func TestEncodedCacheEncodesOnce(t *testing.T) {
	node := &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleGateway, IP: "10.0.0.1", Pod: "gw-0", Namespace: "ns"}.String()}
	c := newEncodedCache(nodeGroups{}, nil)
	kept := &clusterv3.Cluster{Name: "kept", ConnectTimeout: durationpb.New(time.Second)}
	changed := &clusterv3.Cluster{Name: "changed", ConnectTimeout: durationpb.New(time.Second)}
	set := func(version string, cls ...types.Resource) {
		snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{resource.ClusterType: cls})
		require.NoError(t, err)
		require.NoError(t, c.SetSnapshot(context.Background(), gatewayGroup, snap))
	}
	watch := func(version string) *discoveryv3.DiscoveryResponse {
		t.Helper()
		sub := stream.NewSotwSubscription(nil, true)
		ch := make(chan cache.Response, 1)
		_, err := c.CreateWatch(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType, VersionInfo: version}, &sub, ch)
		require.NoError(t, err)
		resp, err := receive(ch).GetDiscoveryResponse()
		require.NoError(t, err)
		return resp
	}
	byName := func(r *discoveryv3.DiscoveryResponse) map[string]*anypb.Any {
		out := map[string]*anypb.Any{}
		for _, a := range r.GetResources() {
			cl := &clusterv3.Cluster{}
			require.NoError(t, a.UnmarshalTo(cl))
			out[cl.GetName()] = a
		}
		return out
	}

	set("v1", kept, changed)
	a, b := watch(""), watch("")
	require.NotSame(t, a, b, "each stream has its own response: the server sets its nonce")
	require.Len(t, a.GetResources(), 2)
	for i := range a.GetResources() {
		require.Same(t, a.GetResources()[i], b.GetResources()[i], "two streams, one encoding")
	}
	first := byName(a)

	set("v2", kept, &clusterv3.Cluster{Name: "changed", ConnectTimeout: durationpb.New(2 * time.Second)})
	second := byName(watch("v1"))
	require.Same(t, first["kept"], second["kept"], "kept: not encoded again")
	require.NotSame(t, first["changed"], second["changed"])
	cl := &clusterv3.Cluster{}
	require.NoError(t, second["changed"].UnmarshalTo(cl))
	require.Equal(t, 2*time.Second, cl.GetConnectTimeout().AsDuration())

	// A TTL is refused with a reason, not served without it.
	ttl := time.Minute
	snap := &cache.Snapshot{}
	snap.Resources[types.Cluster] = cache.NewResourcesWithTTL("v3", []types.ResourceWithTTL{{Resource: kept, TTL: &ttl}})
	require.NoError(t, c.SetSnapshot(context.Background(), "other", snap))
	_, err := c.CreateWatch(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "x"}, TypeUrl: resource.ClusterType},
		&stream.Subscription{}, make(chan cache.Response, 1))
	require.NoError(t, err, "node x is unserved: no snapshot, the watch waits")
	c.mu.Lock()
	_, err = c.group("other").typ(resource.ClusterType, nil)
	c.mu.Unlock()
	require.ErrorContains(t, err, `"kept": resources with a TTL are not served`)
}

// A type a new snapshot keeps (its version and its very messages) is
// the one encoded before, whole: a push that changes the endpoints
// costs the clusters no new names, indexes or delta versions.
func TestEncodedCacheKeepsUnchangedTypes(t *testing.T) {
	c := newEncodedCache(nodeGroups{}, nil)
	cl := &clusterv3.Cluster{Name: "c", ConnectTimeout: durationpb.New(time.Second)}
	set := func(clusters, endpoints string, cls []types.Resource, cla *endpointv3.ClusterLoadAssignment) {
		t.Helper()
		snap := &cache.Snapshot{}
		snap.Resources[types.Cluster] = cache.NewResources(clusters, cls)
		snap.Resources[types.Endpoint] = cache.NewResources(endpoints, []types.Resource{cla})
		require.NoError(t, c.SetSnapshot(context.Background(), gatewayGroup, snap))
	}
	typ := func(typeURL string) *encodedType {
		t.Helper()
		c.mu.Lock()
		defer c.mu.Unlock()
		et, err := c.group(gatewayGroup).typ(typeURL, nil)
		require.NoError(t, err)
		return et
	}
	load := func(zone string) *endpointv3.ClusterLoadAssignment {
		return &endpointv3.ClusterLoadAssignment{ClusterName: "c", Endpoints: []*endpointv3.LocalityLbEndpoints{{Locality: &corev3.Locality{Zone: zone}}}}
	}

	set("c1", "e1", []types.Resource{cl}, load("z1"))
	clusters, endpoints := typ(resource.ClusterType), typ(resource.EndpointType)
	clusters.versionMap()
	set("c1", "e2", []types.Resource{cl}, load("z2"))
	require.Same(t, clusters, typ(resource.ClusterType), "the clusters did not change")
	require.NotSame(t, endpoints, typ(resource.EndpointType))
	require.Equal(t, "e2", typ(resource.EndpointType).version)

	// The same content in a new message: made again.
	clone := cloneResource(cl)
	set("c1", "e2", []types.Resource{clone}, load("z2"))
	again := typ(resource.ClusterType)
	require.NotSame(t, clusters, again)
	require.Equal(t, clusters.anys[0].GetValue(), again.anys[0].GetValue())
	// The same messages at another version: answered at that version.
	set("c2", "e2", []types.Resource{clone}, load("z2"))
	require.Equal(t, "c2", typ(resource.ClusterType).version)
	require.Equal(t, map[string]string{"c": "c2"}, typ(resource.ClusterType).returned)
}

// Fetch (REST) answers as the snapshot cache's: every resource, those
// named, nothing at the current version, an error without a snapshot.
func TestEncodedCacheFetchAsTheSnapshotCache(t *testing.T) {
	node := &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleGateway, IP: "10.0.0.1", Pod: "gw-0", Namespace: "ns"}.String()}
	ref := cache.NewSnapshotCache(true, nodeGroups{}, nil)
	enc := newEncodedCache(nodeGroups{}, nil)
	req := func(version string, names ...string) *discoveryv3.DiscoveryRequest {
		return &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType, VersionInfo: version, ResourceNames: names}
	}
	_, refErr := ref.Fetch(context.Background(), req(""))
	_, encErr := enc.Fetch(context.Background(), req(""))
	require.Error(t, refErr)
	require.EqualError(t, encErr, refErr.Error(), "no snapshot")

	cls := []types.Resource{
		&clusterv3.Cluster{Name: "a", ConnectTimeout: durationpb.New(time.Second)},
		&clusterv3.Cluster{Name: "b", ConnectTimeout: durationpb.New(2 * time.Second)},
		&clusterv3.Cluster{Name: "c", ConnectTimeout: durationpb.New(3 * time.Second)},
	}
	snap, err := cache.NewSnapshot("v1", map[resource.Type][]types.Resource{resource.ClusterType: cls})
	require.NoError(t, err)
	require.NoError(t, ref.SetSnapshot(context.Background(), gatewayGroup, snap))
	require.NoError(t, enc.SetSnapshot(context.Background(), gatewayGroup, snap))

	for _, r := range []*discoveryv3.DiscoveryRequest{req(""), req("v0"), req("", "b"), req("v0", "c", "a", "missing"), req("", "missing")} {
		want, err := ref.Fetch(context.Background(), r)
		require.NoError(t, err)
		got, err := enc.Fetch(context.Background(), r)
		require.NoError(t, err)
		requireSameResponse(t, want, got, "version %q names %q", r.GetVersionInfo(), r.GetResourceNames())
		// The returned map is the response's own: changing it changes
		// no later response.
		got.GetReturnedResources()["b"] = "changed"
	}
	all, err := enc.Fetch(context.Background(), req(""))
	require.NoError(t, err)
	require.Equal(t, map[string]string{"a": "v1", "b": "v1", "c": "v1"}, all.GetReturnedResources())

	_, err = enc.Fetch(context.Background(), req("v1"))
	var skip *types.SkipFetchError
	require.ErrorAs(t, err, &skip, "at the current version")
}

// edsStream is one stream's EDS subscription as the server keeps it:
// the subscription the cache reads, updated with each request, and the
// returned map of each response it sends.
type edsStream struct {
	t    *testing.T
	c    *encodedCache
	node *corev3.Node
	sub  *stream.Subscription
	// version is the last version sent; held the assignments the
	// stream holds, by name, as a client keeps them.
	version string
	held    map[string]string
	resp    chan cache.Response
}

func newEDSStream(t *testing.T, c *encodedCache, node *corev3.Node) *edsStream {
	return &edsStream{t: t, c: c, node: node, held: map[string]string{}}
}

// request sends a request for names at version (with an error: a
// NACK) and returns the response the cache answered it with, if it did
// at once.
func (s *edsStream) request(version string, nack bool, names ...string) cache.Response {
	s.t.Helper()
	if s.sub == nil {
		sub := stream.NewSotwSubscription(names, true)
		s.sub = &sub
	} else {
		s.sub.SetResourceSubscription(names)
	}
	req := &discoveryv3.DiscoveryRequest{Node: s.node, TypeUrl: resource.EndpointType, VersionInfo: version, ResourceNames: names}
	if nack {
		req.ErrorDetail = &rpcstatus.Status{Message: "refused"}
	}
	s.resp = make(chan cache.Response, 1)
	_, err := s.c.CreateWatch(req, *s.sub, s.resp)
	require.NoError(s.t, err)
	return receive(s.resp)
}

// send is the server sending r: the stream takes its returned map and
// the client the assignments it carries. It returns the names carried.
func (s *edsStream) send(r cache.Response) []string {
	s.t.Helper()
	require.NotNil(s.t, r, "no response")
	out, err := r.GetDiscoveryResponse()
	require.NoError(s.t, err)
	s.sub.SetReturnedResources(r.GetReturnedResources())
	s.version = out.GetVersionInfo()
	var carried []string
	for _, a := range out.GetResources() {
		var cla endpointv3.ClusterLoadAssignment
		require.NoError(s.t, a.UnmarshalTo(&cla))
		s.held[cla.GetClusterName()] = cla.GetEndpoints()[0].GetLocality().GetZone()
		carried = append(carried, cla.GetClusterName())
	}
	return carried
}

// The delta a push sends each stream is made once for the push and
// brings each stream's own returned map up to date where it is, when
// the server sends the response: what a stream costs a push is what
// changed. Streams a delta cannot serve get everything.
func TestEncodedCachePushCostsWhatChanged(t *testing.T) {
	node := &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleGateway, IP: "10.0.0.1", Pod: "gw-0", Namespace: "ns"}.String()}
	c := newEncodedCache(nodeGroups{}, nil)
	zones := map[string]string{}
	var all []string
	for i := range 50 {
		name := fmt.Sprintf("svc-%02d", i)
		zones[name] = "z0"
		all = append(all, name)
	}
	step := 0
	set := func(change func()) string {
		t.Helper()
		change()
		step++
		var cls []types.Resource
		for name, zone := range zones {
			cls = append(cls, &endpointv3.ClusterLoadAssignment{ClusterName: name,
				Endpoints: []*endpointv3.LocalityLbEndpoints{{Locality: &corev3.Locality{Zone: zone}}}})
		}
		version := fmt.Sprintf("v%d", step)
		snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{resource.EndpointType: cls})
		require.NoError(t, err)
		require.NoError(t, c.SetSnapshot(context.Background(), gatewayGroup, snap))
		return version
	}
	endpoints := func() *encodedType {
		t.Helper()
		c.mu.Lock()
		defer c.mu.Unlock()
		et, err := c.group(gatewayGroup).typ(resource.EndpointType, nil)
		require.NoError(t, err)
		return et
	}
	// requireHolds checks that s holds what the snapshot has, and that
	// its returned map names exactly that.
	requireHolds := func(s *edsStream) {
		t.Helper()
		require.Equal(t, zones, s.held)
		require.ElementsMatch(t, slices.Collect(maps.Keys(zones)), slices.Collect(maps.Keys(s.sub.ReturnedResources())))
	}
	mapOf := func(s *edsStream) uintptr { return reflect.ValueOf(s.sub.ReturnedResources()).Pointer() }

	v1 := set(func() {})
	streams := make([]*edsStream, 3)
	for i := range streams {
		s := newEDSStream(t, c, node)
		require.Len(t, s.send(s.request("", false, all...)), 50, "a new stream gets everything")
		require.Nil(t, s.request(v1, false, all...), "the ACK waits")
		requireHolds(s)
		streams[i] = s
	}

	// One assignment changes and one goes: each stream is sent the one
	// and drops the other, in the map it had.
	v2 := set(func() { zones["svc-10"] = "z1"; delete(zones, "svc-49") })
	for _, s := range streams {
		before := mapOf(s)
		require.Equal(t, []string{"svc-10"}, s.send(receive(s.resp)))
		require.Equal(t, before, mapOf(s), "the stream's map is updated, not copied")
		delete(s.held, "svc-49") // as the client does: its cluster went
		requireHolds(s)
		require.Nil(t, s.request(v2, false, all[:49]...))
	}
	require.Len(t, endpoints().diffs, 1, "one delta for three streams")

	// A response the server drops (a request came first) changes
	// nothing: the stream, still at v2, is sent what changed since v2.
	s := streams[0]
	set(func() { zones["svc-20"] = "z1" })
	require.NotNil(t, receive(s.resp), "answered, then dropped by the server")
	set(func() { zones["svc-30"] = "z1" })
	require.Equal(t, []string{"svc-20", "svc-30"}, s.send(s.request(v2, false, all[:49]...)))
	requireHolds(s)

	// A name unsubscribed and subscribed again is sent again, and only
	// it.
	s = streams[1]
	require.Equal(t, []string{"svc-20"}, s.send(receive(s.resp)), "at v3")
	require.Equal(t, []string{"svc-30"}, s.send(s.request(s.version, false, all[:49]...)), "its ACK of v3, at v4")
	require.Nil(t, s.request(s.version, false, all[:49]...))
	require.Nil(t, s.request(s.version, false, slices.Delete(slices.Clone(all[:49]), 5, 6)...), "not every name listed")
	require.Equal(t, []string{"svc-05"}, s.send(s.request(s.version, false, all[:49]...)))
	requireHolds(s)
	require.Nil(t, s.request(s.version, false, all[:49]...))
	v := set(func() { zones["svc-07"] = "z1" })
	require.Equal(t, []string{"svc-07"}, s.send(receive(s.resp)))
	requireHolds(s)
	require.Equal(t, v, s.version)

	// Everything, to a NACK; to a request at another version than the
	// one sent; and to a stream whose map lost the name that says which
	// version it holds (its first).
	require.Len(t, s.send(s.request(v1, true, all[:49]...)), 49, "NACK, at the version before")
	require.Len(t, s.send(s.request(v1, false, all[:49]...)), 49, "another version")
	require.Nil(t, s.request(v, false, all[1:49]...))
	require.Len(t, s.send(s.request(v, false, all[:49]...)), 49, "the first name dropped")
	requireHolds(s)

	// And to a stream too far behind.
	s = streams[2]
	at := s.version
	for i := range recentTypes {
		set(func() { zones["svc-40"] = fmt.Sprintf("z%d", i+2) })
	}
	require.Len(t, s.send(s.request(at, false, all[:49]...)), 49, "more than recentTypes behind")
	requireHolds(s)
}
