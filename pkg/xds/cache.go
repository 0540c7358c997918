package xds

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// encodedCache is go-control-plane's snapshot cache (cache.NewSnapshotCache
// with ADS) with every resource encoded once, not once per stream.
//
// go-control-plane v0.14's snapshot cache makes a new RawResponse for
// every watch it answers, and a RawResponse encodes each of its resources
// again (cachedResource marshals lazily, per response): a push of the
// gateway's 10,000 services cost every gateway stream some 30,000
// encodings. Here a snapshot's resources are encoded when a watch first
// needs their type, once for every stream, and a resource of the
// previous snapshot (the same message: translations keep what did not
// change, and Resources are immutable) keeps its encoding, so a push
// costs one encoding per changed resource. A response is then a shell
// around the shared encodings: the Anys for state of the world, the
// discovery.Resources (name, encoding, version) for delta.
//
// What a proxy sees is what the snapshot cache sends: the same watches
// answered at the same moments with the same versions, the ADS rule
// that a state-of-the-world request naming resources is answered only
// when it names every resource of the snapshot (and the response then
// holds every resource), delta versions that are go-control-plane's
// (cache.HashResource of the deterministic encoding), and watches
// answered by type in ADS order when a snapshot is set. Two things
// differ, neither visible to a proxy: resources come sorted by name
// rather than in map order, and TTLs are refused (SetSnapshot fails), as
// no translation sets one.
//
// One thing differs on purpose: a state-of-the-world response of
// ClusterLoadAssignments carries only those the stream does not hold
// already, which the xDS protocol allows for every type but listeners
// and clusters (a client keeps the ones a response leaves out; Envoy
// does, and so does pkg/xdsclient). One pod turning not ready then sends
// each stream one assignment, not all 10,000 (about 4 MB). A stream that
// NACKed, or asks at any version but the one it was last sent, gets them
// all again. The per-resource versions this needs are the delta ones.
// What a push costs each such stream is what changed, not the number of
// assignments: see heldUpdate.
type encodedCache struct {
	hash cache.NodeHash
	log  log.Logger

	// mu guards groups and watchID. Watches are answered with it held,
	// as the snapshot cache does: a response channel always has room
	// (the server buffers one per type), so sends do not block.
	mu      sync.Mutex
	groups  map[string]*cacheGroup
	watchID int64
}

var _ cache.SnapshotCache = (*encodedCache)(nil)

// newEncodedCache returns an ADS cache grouping nodes by hash; a nil
// logger discards.
func newEncodedCache(hash cache.NodeHash, logger log.Logger) *encodedCache {
	if logger == nil {
		logger = log.NewDefaultLogger()
	}
	return &encodedCache{hash: hash, log: logger, groups: map[string]*cacheGroup{}}
}

// cacheGroup is one node group: its snapshot, the encodings of its
// types, and the watches open on it.
type cacheGroup struct {
	snap cache.ResourceSnapshot
	// types are the snapshot's types encoded so far, by type URL;
	// encoded, those of earlier snapshots, whose encodings a type reuses.
	types   map[string]*encodedType
	encoded map[string]*encodedType

	// recent are the last recentTypes encodings of each type, oldest
	// first: those a stream of a partial type may have been sent last.
	recent map[string][]*encodedType

	// status, like the snapshot cache's statusInfo, exists once a node
	// of the group opened a watch.
	status *groupStatus
}

// recentTypes is how many encodings of a type a group remembers for the
// streams that were sent one: a stream further behind (more snapshots
// were set while its response was on the way) gets the whole type again.
const recentTypes = 4

// typeGen numbers the encodedTypes of the process, for their anchors.
var typeGen atomic.Uint64

type groupStatus struct {
	node                 *corev3.Node
	watches              map[int64]sotwWatch
	deltaWatches         map[int64]deltaWatch
	lastWatch, lastDelta time.Time
}

type sotwWatch struct {
	req   *cache.Request
	resp  chan cache.Response
	sub   cache.Subscription
	order int
}

type deltaWatch struct {
	req   *cache.DeltaRequest
	resp  chan cache.DeltaResponse
	sub   cache.Subscription
	order int
}

// encodedType is every resource of one type of a snapshot, encoded.
type encodedType struct {
	typeURL string
	version string
	// names are sorted; items[i] is names[i]'s, anys[i] its Any.
	names []string
	items []*encodedResource
	anys  []*anypb.Any
	index map[string]int
	// byMessage finds the encoding of a message, for the next snapshot.
	byMessage map[types.Resource]*encodedResource
	// returned is what a state-of-the-world response returns: every
	// name at version, or for a partial type at its delta version (what
	// a stream holds). Each response gets a map of its own, which the
	// server may modify (see heldUpdate).
	returned map[string]string
	// partial: a response carries only what the stream lacks.
	partial bool
	// gen is a number no other encoding has. anchor is, for a partial
	// type with names, the value a stream's returned map holds under
	// names[0] once the stream was sent this encoding: its delta
	// version, the type's version and gen.
	gen    uint64
	anchor string
	// diffs are the changes from each earlier encoding of the type that
	// a stream was last sent, by its gen (not the encoding itself, which
	// would keep every earlier one), made when first needed.
	diffs map[uint64]*typeDiff
	// versions are the delta versions by name, made on the first delta
	// watch; nil before (for a partial type, returned).
	versions map[string]string
}

// typeDiff is what changed from one encoding of a type to a later one.
type typeDiff struct {
	// changed are the indexes, in the later one's names, of the names
	// new or at another delta version, in order.
	changed []int
	// removed are the names only the earlier one has.
	removed []string
}

// partialType reports whether state-of-the-world responses of typeURL
// carry only the resources a stream lacks.
func partialType(typeURL string) bool { return typeURL == resource.EndpointType }

// encodedResource is one resource's encoding, shared by every response
// that carries it.
type encodedResource struct {
	any *anypb.Any
	// delta is the resource as a delta response carries it, made when
	// first needed (its version is a hash of the encoding).
	delta *discoveryv3.Resource
}

func (r *encodedResource) deltaResource(name string) *discoveryv3.Resource {
	if r.delta == nil {
		r.delta = &discoveryv3.Resource{Name: name, Resource: r.any, Version: cache.HashResource(r.any.GetValue())}
	}
	return r.delta
}

// group returns the group named id, made if new.
func (c *encodedCache) group(id string) *cacheGroup {
	g, ok := c.groups[id]
	if !ok {
		g = &cacheGroup{types: map[string]*encodedType{}, encoded: map[string]*encodedType{}, recent: map[string][]*encodedType{}}
		c.groups[id] = g
	}
	return g
}

// status returns the group's status, made for node if new.
func (g *cacheGroup) statusFor(node *corev3.Node) *groupStatus {
	if g.status == nil {
		g.status = &groupStatus{node: node, watches: map[int64]sotwWatch{}, deltaWatches: map[int64]deltaWatch{}}
	}
	return g.status
}

// variedSnapshot is a snapshot some of whose types differ by node: the
// sidecars' listeners, by the ports the pod declares (profiledSnapshot).
type variedSnapshot interface {
	cache.ResourceSnapshot
	// variant returns node's variant of typeURL, its name and resources
	// and version; ok is false when node gets the snapshot's own.
	variant(node *corev3.Node, typeURL string) (name string, res map[string]types.ResourceWithTTL, version string, ok bool)
	// hasVariant reports whether the snapshot has the variant name.
	hasVariant(name string) bool
}

// variantSep separates a type URL from a variant's name in the keys of
// a group's encodings.
const variantSep = "\x00"

// typ returns the snapshot's resources of typeURL as node is served
// them, encoded; an unknown type, or one the snapshot lacks, has none
// at version "". A type the snapshot keeps as the previous one had it
// (the same version, the same messages: a translation keeps what did
// not change) is the previous one's, names, Anys and delta versions
// included, so a push that changes one type costs the others a walk
// over their messages. Each variant of a type (variedSnapshot) is
// encoded on its own, reusing the encodings of the type's other
// variants and of the snapshot's own.
func (g *cacheGroup) typ(typeURL string, node *corev3.Node) (*encodedType, error) {
	key := typeURL
	var res map[string]types.ResourceWithTTL
	var version string
	varied := false
	v, hasVariants := g.snap.(variedSnapshot)
	if hasVariants {
		var name string
		if name, res, version, varied = v.variant(node, typeURL); varied {
			key = typeURL + variantSep + name
		}
	}
	if t, ok := g.types[key]; ok {
		return t, nil
	}
	if !varied {
		res = g.snap.GetResourcesAndTTL(typeURL)
		version = g.snap.GetVersion(typeURL)
	}
	if prev := g.encoded[key]; prev.holds(version, res) {
		g.types[key] = prev
		return prev, nil
	}
	t := &encodedType{
		typeURL: typeURL, version: version,
		names: slices.Sorted(maps.Keys(res)), index: make(map[string]int, len(res)),
		byMessage: make(map[types.Resource]*encodedResource, len(res)), returned: make(map[string]string, len(res)+1),
		partial: partialType(typeURL),
	}
	t.items = make([]*encodedResource, len(t.names))
	t.anys = make([]*anypb.Any, len(t.names))
	prev := g.encoded[key]
	for i, name := range t.names {
		r := res[name]
		if r.TTL != nil {
			return nil, fmt.Errorf("%s %q: resources with a TTL are not served", typeURL, name)
		}
		e := prev.find(r.Resource)
		if e == nil && hasVariants {
			// The resources a type's variants share (the sidecars'
			// outbound listener) are encoded once.
			e = g.sharedEncoding(typeURL, key, r.Resource)
		}
		if e == nil {
			b, err := cache.MarshalResource(r.Resource)
			if err != nil {
				return nil, fmt.Errorf("%s %q: encode: %w", typeURL, name, err)
			}
			e = &encodedResource{any: &anypb.Any{TypeUrl: typeURL, Value: b}}
		}
		t.items[i], t.anys[i] = e, e.any
		t.index[name] = i
		t.byMessage[r.Resource] = e
		if t.partial {
			t.returned[name] = e.deltaResource(name).GetVersion()
		} else {
			t.returned[name] = t.version
		}
	}
	t.gen = typeGen.Add(1)
	if t.partial {
		t.versions = t.returned
		if len(t.names) > 0 {
			t.anchor = fmt.Sprintf("%s@%s#%d", t.returned[t.names[0]], t.version, t.gen)
		}
	}
	g.types[key] = t
	g.encoded[key] = t
	if prev != nil {
		// Only the newest encoding lends its encodings to the next.
		prev.byMessage = nil
	}
	if t.partial {
		recent := append(g.recent[key], t)
		if len(recent) > recentTypes {
			recent = slices.Delete(recent, 0, len(recent)-recentTypes)
		}
		g.recent[key] = recent
	}
	return t, nil
}

// sharedEncoding finds m's encoding among the newest encodings of
// typeURL's other variants, or of the type itself, but key's; nil when
// none has it.
func (g *cacheGroup) sharedEncoding(typeURL, key string, m types.Resource) *encodedResource {
	for k, t := range g.encoded {
		if k == key || (k != typeURL && !strings.HasPrefix(k, typeURL+variantSep)) {
			continue
		}
		if e := t.find(m); e != nil {
			return e
		}
	}
	return nil
}

// sent returns the recent encoding of typeURL at version that a
// stream's returned map held says it was sent last (its anchor is
// there), or nil: none was, the stream holds nothing, or the map lost
// the anchor's name (the stream no longer subscribes to it).
func (g *cacheGroup) sent(typeURL, version string, held map[string]string) *encodedType {
	if len(held) == 0 {
		return nil
	}
	recent := g.recent[typeURL]
	for i := len(recent) - 1; i >= 0; i-- {
		if t := recent[i]; t.version == version && t.anchor != "" && held[t.names[0]] == t.anchor {
			return t
		}
	}
	return nil
}

// diffFrom returns what changed from the earlier encoding from to t,
// made once for the pair: a walk over both types' sorted names.
func (t *encodedType) diffFrom(from *encodedType) *typeDiff {
	if d, ok := t.diffs[from.gen]; ok {
		return d
	}
	d := &typeDiff{}
	i, j := 0, 0
	for i < len(from.names) || j < len(t.names) {
		switch {
		case j == len(t.names) || i < len(from.names) && from.names[i] < t.names[j]:
			d.removed = append(d.removed, from.names[i])
			i++
		case i == len(from.names) || t.names[j] < from.names[i]:
			d.changed = append(d.changed, j)
			j++
		default:
			name := t.names[j]
			if from.items[i] != t.items[j] && from.returned[name] != t.returned[name] {
				d.changed = append(d.changed, j)
			}
			i++
			j++
		}
	}
	if t.diffs == nil {
		t.diffs = map[uint64]*typeDiff{}
	}
	t.diffs[from.gen] = d
	return d
}

// holds reports whether t is res at version: each name with the very
// message t encoded for it, and no other.
func (t *encodedType) holds(version string, res map[string]types.ResourceWithTTL) bool {
	if t == nil || t.version != version || len(t.names) != len(res) {
		return false
	}
	for name, r := range res {
		i, ok := t.index[name]
		if !ok || r.TTL != nil || t.byMessage[r.Resource] != t.items[i] {
			return false
		}
	}
	return true
}

func (t *encodedType) find(m types.Resource) *encodedResource {
	if t == nil {
		return nil
	}
	return t.byMessage[m]
}

// versionMap is the delta versions by name.
func (t *encodedType) versionMap() map[string]string {
	if t.versions == nil {
		t.versions = make(map[string]string, len(t.names))
		for i, name := range t.names {
			t.versions[name] = t.items[i].deltaResource(name).GetVersion()
		}
	}
	return t.versions
}

// SetSnapshot sets the group's snapshot and answers the watches whose
// version it changes, state of the world then delta, each by type in
// ADS order, as the snapshot cache does.
func (c *encodedCache) SetSnapshot(ctx context.Context, node string, snap cache.ResourceSnapshot) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if snap == nil {
		return errors.New("no snapshot")
	}
	c.log.Debugf("setting snapshot for node %s", node)
	g := c.group(node)
	g.snap = snap
	// The types' encodings stay in g.encoded, for the new snapshot's
	// types to reuse; those of variants it no longer has go.
	clear(g.types)
	v, varied := snap.(variedSnapshot)
	for key := range g.encoded {
		if _, name, ok := strings.Cut(key, variantSep); ok && (!varied || !v.hasVariant(name)) {
			delete(g.encoded, key)
		}
	}
	if g.status == nil {
		return nil
	}
	for _, id := range orderedIDs(g.status.watches, func(w sotwWatch) int { return w.order }) {
		w := g.status.watches[id]
		t, err := g.typ(w.req.GetTypeUrl(), w.req.GetNode())
		if err != nil {
			return err
		}
		if t.version == w.req.GetVersionInfo() {
			continue
		}
		c.log.Debugf("respond open watch %d %s with new version %q", id, w.req.GetTypeUrl(), t.version)
		if err := c.respond(ctx, g, w, t); err != nil {
			return err
		}
		delete(g.status.watches, id)
	}
	for _, id := range orderedIDs(g.status.deltaWatches, func(w deltaWatch) int { return w.order }) {
		w := g.status.deltaWatches[id]
		t, err := g.typ(w.req.GetTypeUrl(), w.req.GetNode())
		if err != nil {
			return err
		}
		sent, err := c.respondDelta(ctx, t, w)
		if err != nil {
			return err
		}
		if sent {
			delete(g.status.deltaWatches, id)
		}
	}
	return nil
}

// orderedIDs are the watches' IDs in ADS order: by type (clusters,
// endpoints, listeners, routes, …), then by age.
func orderedIDs[W any](watches map[int64]W, order func(W) int) []int64 {
	ids := slices.Collect(maps.Keys(watches))
	slices.SortFunc(ids, func(a, b int64) int {
		if d := order(watches[a]) - order(watches[b]); d != 0 {
			return d
		}
		return cmp.Compare(a, b)
	})
	return ids
}

// GetSnapshot returns the group's snapshot.
func (c *encodedCache) GetSnapshot(node string) (cache.ResourceSnapshot, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if g, ok := c.groups[node]; ok && g.snap != nil {
		return g.snap, nil
	}
	return nil, fmt.Errorf("no snapshot found for node %s", node)
}

// ClearSnapshot forgets the group: its snapshot, encodings and watches.
func (c *encodedCache) ClearSnapshot(node string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.groups, node)
}

// GetStatusInfo reports the group's watches; nil if none was opened.
func (c *encodedCache) GetStatusInfo(node string) cache.StatusInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	g, ok := c.groups[node]
	if !ok || g.status == nil {
		return nil
	}
	return statusInfo{node: g.status.node, watches: len(g.status.watches), deltaWatches: len(g.status.deltaWatches),
		lastWatch: g.status.lastWatch, lastDelta: g.status.lastDelta}
}

// GetStatusKeys lists the groups whose nodes opened watches.
func (c *encodedCache) GetStatusKeys() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for id, g := range c.groups {
		if g.status != nil {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// statusInfo is a copy of a group's status.
type statusInfo struct {
	node                  *corev3.Node
	watches, deltaWatches int
	lastWatch, lastDelta  time.Time
}

func (s statusInfo) GetNode() *corev3.Node                   { return s.node }
func (s statusInfo) GetNumWatches() int                      { return s.watches }
func (s statusInfo) GetNumDeltaWatches() int                 { return s.deltaWatches }
func (s statusInfo) GetLastWatchRequestTime() time.Time      { return s.lastWatch }
func (s statusInfo) GetLastDeltaWatchRequestTime() time.Time { return s.lastDelta }

// CreateWatch answers a state-of-the-world request at once when the
// snapshot's version of its type differs from the request's, or the
// proxy lacks a resource it subscribes to; otherwise the watch waits for
// a snapshot that changes the version.
func (c *encodedCache) CreateWatch(req *cache.Request, sub cache.Subscription, value chan cache.Response) (func(), error) {
	id := c.hash.ID(req.GetNode())
	c.mu.Lock()
	defer c.mu.Unlock()
	g := c.group(id)
	st := g.statusFor(req.GetNode())
	st.lastWatch = time.Now()
	w := sotwWatch{req: req, resp: value, sub: sub, order: int(cache.GetResponseType(req.GetTypeUrl()))}
	if g.snap == nil {
		return c.addWatch(id, st, w), nil
	}
	t, err := g.typ(req.GetTypeUrl(), req.GetNode())
	if err != nil {
		return nil, err
	}
	if req.GetVersionInfo() == t.version && !g.lacksResource(t, sub) {
		return c.addWatch(id, st, w), nil
	}
	if err := c.respond(context.Background(), g, w, t); err != nil {
		c.log.Errorf("failed to send a response for %s to nodeID %q: %s", req.GetTypeUrl(), id, err)
		return nil, fmt.Errorf("failed to send the response: %w", err)
	}
	return func() {}, nil
}

// lacksResource reports whether sub is subscribed to a resource of t
// that was not returned to it (newly subscribed, or newly wildcard).
// A stream of a partial type that was sent t last, and holds as many
// names as t has, holds them all (it holds no other: see heldUpdate).
func (g *cacheGroup) lacksResource(t *encodedType, sub cache.Subscription) bool {
	known := sub.ReturnedResources()
	if t.partial && len(known) == len(t.names) && g.sent(t.typeURL, t.version, known) == t {
		return false
	}
	if !sub.IsWildcard() {
		for name := range sub.SubscribedResources() {
			if _, ok := known[name]; !ok {
				if _, ok := t.index[name]; ok {
					return true
				}
			}
		}
		return false
	}
	for _, name := range t.names {
		if _, ok := known[name]; !ok {
			return true
		}
	}
	return false
}

func (c *encodedCache) addWatch(group string, st *groupStatus, w sotwWatch) func() {
	c.watchID++
	id := c.watchID
	c.log.Debugf("open watch %d for %s from nodeID %q, version %q", id, w.req.GetTypeUrl(), group, w.req.GetVersionInfo())
	st.watches[id] = w
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if g, ok := c.groups[group]; ok && g.status != nil {
			delete(g.status.watches, id)
		}
	}
}

// respond sends t to the watch. An ADS request that names resources is
// answered only when it names all of t (the proxy asks again with the
// names it learnt), and then with all of t (of a partial type, all that
// the stream lacks).
func (c *encodedCache) respond(ctx context.Context, g *cacheGroup, w sotwWatch, t *encodedType) error {
	var u *heldUpdate
	if t.partial {
		u = g.update(w, t)
	}
	if names := w.req.GetResourceNames(); len(names) != 0 && !u.subscribesAll(w.sub) {
		if missing, ok := namesAll(t, names); !ok {
			c.log.Warnf("ADS mode: not responding to request %s: %q not listed", w.req.GetTypeUrl(), missing)
			return nil
		}
	}
	resp := &sotwResponse{req: w.req, version: t.version, anys: t.anys, ctx: ctx}
	if u != nil {
		resp.update = u
		if u.held != nil {
			resp.anys = make([]*anypb.Any, len(u.send))
			for i, j := range u.send {
				resp.anys[i] = t.anys[j]
			}
		}
	} else {
		resp.returned = maps.Clone(t.returned)
	}
	c.log.Debugf("respond %s version %q with version %q and %d of %d resources", w.req.GetTypeUrl(), w.req.GetVersionInfo(), t.version, len(resp.anys), len(t.anys))
	select {
	case w.resp <- resp:
		return nil
	case <-ctx.Done():
		return context.Canceled
	}
}

// heldUpdate is what a response of a partial type carries and how it
// changes what its stream holds.
//
// The server keeps, per stream and type, the map of the last response
// it sent (GetReturnedResources), hands it to the cache with each
// request, and deletes from it the names a request no longer
// subscribes to. For a partial type that map holds each name the stream
// was sent at its delta version, and under the first name of the
// encoding last sent, that encoding's anchor. Right after a send it
// holds exactly that encoding's names; later, those less the ones the
// server deleted.
//
// A stream whose map holds the anchor of a recent encoding (from), and
// that asks at from's version without an error, holds from's
// assignments: it is sent only what changed from from to t (computed
// once for the pair, however many streams were sent from) and the
// names of t it no longer holds (unsubscribed and subscribed again;
// counted, and only then looked for). Its own map is brought up to t in
// place when the server sends the response, not before: a response the
// server drops (a new request came first) changes nothing. Sharing one
// map per version between streams is not possible, as the server
// deletes from the maps it holds.
//
// Any other stream (new, NACKing, at another version, or too far
// behind) is sent all of t, and a new map.
type heldUpdate struct {
	to *encodedType
	// held is the stream's map, nil when the response carries all of
	// to; from is the encoding held, and send the indexes, in to's
	// names, of what the response carries.
	held    map[string]string
	from    *encodedType
	removed []string
	send    []int
}

// update is what a response of t to w carries and does.
func (g *cacheGroup) update(w sotwWatch, t *encodedType) *heldUpdate {
	u := &heldUpdate{to: t}
	held := w.sub.ReturnedResources()
	if w.req.GetErrorDetail() != nil {
		return u
	}
	from := g.sent(t.typeURL, w.req.GetVersionInfo(), held)
	if from == nil {
		return u
	}
	d := t.diffFrom(from)
	// held is some of from's names; those of them t keeps unchanged
	// must be all of t's unchanged ones.
	stale := 0
	for _, name := range d.removed {
		if _, ok := held[name]; ok {
			stale++
		}
	}
	for _, i := range d.changed {
		if _, ok := held[t.names[i]]; ok {
			stale++
		}
	}
	u.held, u.from, u.removed, u.send = held, from, d.removed, d.changed
	if len(held)-stale == len(t.names)-len(d.changed) {
		return u
	}
	u.send = nil
	changed := d.changed
	for i, name := range t.names {
		_, ok := held[name]
		if len(changed) > 0 && changed[0] == i {
			changed = changed[1:]
			ok = false
		}
		if !ok {
			u.send = append(u.send, i)
		}
	}
	return u
}

// subscribesAll reports, where it can tell without a walk over every
// name, that sub subscribes to every name of u.to; false where it
// cannot tell. A named subscription's map holds only names it
// subscribes to (the server deletes the others), and the names of
// u.to the response does not carry are in it.
func (u *heldUpdate) subscribesAll(sub cache.Subscription) bool {
	if u == nil || u.held == nil || sub.IsWildcard() {
		return false
	}
	subscribed := sub.SubscribedResources()
	for _, i := range u.send {
		if _, ok := subscribed[u.to.names[i]]; !ok {
			return false
		}
	}
	return true
}

// apply returns the stream's map once the response is sent: the held
// one brought up to u.to in place, or a new one.
func (u *heldUpdate) apply() map[string]string {
	t := u.to
	held := u.held
	if held == nil {
		held = maps.Clone(t.returned)
	} else {
		for _, name := range u.removed {
			delete(held, name)
		}
		for _, i := range u.send {
			held[t.names[i]] = t.returned[t.names[i]]
		}
		if name := u.from.names[0]; held[name] == u.from.anchor {
			held[name] = t.returned[name]
		}
	}
	if t.anchor != "" {
		held[t.names[0]] = t.anchor
	}
	return held
}

// namesAll reports whether names holds every name of t; if not, one
// that it lacks.
func namesAll(t *encodedType, names []string) (string, bool) {
	if len(names) >= len(t.names) {
		seen := make([]uint64, (len(t.names)+63)/64)
		n := 0
		for _, name := range names {
			if i, ok := t.index[name]; ok && seen[i/64]&(1<<(i%64)) == 0 {
				seen[i/64] |= 1 << (i % 64)
				n++
			}
		}
		if n == len(t.names) {
			return "", true
		}
	}
	listed := make(map[string]bool, len(names))
	for _, name := range names {
		listed[name] = true
	}
	for _, name := range t.names {
		if !listed[name] {
			return name, false
		}
	}
	return "", true
}

// sotwResponse is a state-of-the-world response over shared encodings.
type sotwResponse struct {
	req     *cache.Request
	version string
	anys    []*anypb.Any
	// returned is made by update, if set, when first asked for.
	returned map[string]string
	update   *heldUpdate
	ctx      context.Context
}

var _ cache.Response = (*sotwResponse)(nil)

// GetDiscoveryResponse returns a new message each time: the server sets
// its nonce. Its Anys are shared and never modified.
func (r *sotwResponse) GetDiscoveryResponse() (*discoveryv3.DiscoveryResponse, error) {
	return &discoveryv3.DiscoveryResponse{VersionInfo: r.version, Resources: r.anys, TypeUrl: r.req.GetTypeUrl()}, nil
}
func (r *sotwResponse) GetRequest() *discoveryv3.DiscoveryRequest { return r.req }
func (r *sotwResponse) GetVersion() (string, error)               { return r.version, nil }
func (r *sotwResponse) GetResponseVersion() string                { return r.version }
func (r *sotwResponse) GetContext() context.Context               { return r.ctx }

// GetReturnedResources is called by the server as it sends the
// response, on the stream's goroutine: only then does a partial type's
// response update the stream's map (see heldUpdate).
func (r *sotwResponse) GetReturnedResources() map[string]string {
	if r.update != nil {
		r.returned, r.update = r.update.apply(), nil
	}
	return r.returned
}

// CreateDeltaWatch answers a delta request at once when the proxy lacks
// a resource version, holds one no longer there, or opens a wildcard
// subscription; otherwise the watch waits for a snapshot that changes
// what it is subscribed to.
func (c *encodedCache) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, value chan cache.DeltaResponse) (func(), error) {
	id := c.hash.ID(req.GetNode())
	c.mu.Lock()
	defer c.mu.Unlock()
	g := c.group(id)
	st := g.statusFor(req.GetNode())
	st.lastDelta = time.Now()
	w := deltaWatch{req: req, resp: value, sub: sub, order: int(cache.GetResponseType(req.GetTypeUrl()))}
	if g.snap != nil {
		t, err := g.typ(req.GetTypeUrl(), req.GetNode())
		if err != nil {
			c.log.Errorf("failed to encode the snapshot's %s: %s", req.GetTypeUrl(), err)
		} else {
			sent, err := c.respondDelta(context.Background(), t, w)
			if err != nil {
				c.log.Errorf("failed to respond with delta response: %s", err)
			}
			if sent {
				return nil, nil
			}
		}
	}
	c.watchID++
	wid := c.watchID
	c.log.Debugf("open delta watch %d for %s from nodeID %q", wid, req.GetTypeUrl(), id)
	st.deltaWatches[wid] = w
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if g, ok := c.groups[id]; ok && g.status != nil {
			delete(g.status.deltaWatches, wid)
		}
	}, nil
}

// respondDelta sends the watch what changed for it in t, if anything
// did (or it is a wildcard subscription's first request), and reports
// whether it sent.
func (c *encodedCache) respondDelta(ctx context.Context, t *encodedType, w deltaWatch) (bool, error) {
	versions := t.versionMap()
	returned := w.sub.ReturnedResources()
	var changed []*discoveryv3.Resource
	var removed []string
	var next map[string]string
	if w.sub.IsWildcard() {
		next = maps.Clone(versions)
		if next == nil {
			next = map[string]string{}
		}
		for i, name := range t.names {
			if v, ok := returned[name]; !ok || v != versions[name] {
				changed = append(changed, t.items[i].deltaResource(name))
			}
		}
		for name := range returned {
			if _, ok := t.index[name]; !ok {
				removed = append(removed, name)
			}
		}
	} else {
		subscribed := w.sub.SubscribedResources()
		next = make(map[string]string, len(subscribed))
		for name := range subscribed {
			prev, had := returned[name]
			if i, ok := t.index[name]; ok {
				if v := versions[name]; prev != v || !had {
					changed = append(changed, t.items[i].deltaResource(name))
				}
				next[name] = versions[name]
			} else if had {
				removed = append(removed, name)
			}
		}
	}
	slices.Sort(removed)
	if len(changed) == 0 && len(removed) == 0 && (!w.sub.IsWildcard() || w.req.GetResponseNonce() != "") {
		return false, nil
	}
	c.log.Debugf("node: %s, sending delta response for typeURL %s with %d resources, %d removed, wildcard %t",
		w.req.GetNode().GetId(), w.req.GetTypeUrl(), len(changed), len(removed), w.sub.IsWildcard())
	resp := &deltaResponse{req: w.req, version: t.version, resources: changed, removed: removed, next: next, ctx: ctx}
	select {
	case w.resp <- resp:
		return true, nil
	case <-ctx.Done():
		return true, context.Canceled
	}
}

// deltaResponse is a delta response over shared encodings.
type deltaResponse struct {
	req       *cache.DeltaRequest
	version   string
	resources []*discoveryv3.Resource
	removed   []string
	next      map[string]string
	ctx       context.Context
}

var _ cache.DeltaResponse = (*deltaResponse)(nil)

// GetDeltaDiscoveryResponse returns a new message each time: the server
// sets its nonce. Its Resources are shared and never modified.
func (r *deltaResponse) GetDeltaDiscoveryResponse() (*discoveryv3.DeltaDiscoveryResponse, error) {
	return &discoveryv3.DeltaDiscoveryResponse{Resources: r.resources, RemovedResources: r.removed,
		TypeUrl: r.req.GetTypeUrl(), SystemVersionInfo: r.version}, nil
}
func (r *deltaResponse) GetDeltaRequest() *discoveryv3.DeltaDiscoveryRequest { return r.req }
func (r *deltaResponse) GetSystemVersion() (string, error)                   { return r.version, nil }
func (r *deltaResponse) GetResponseVersion() string                          { return r.version }
func (r *deltaResponse) GetNextVersionMap() map[string]string                { return r.next }
func (r *deltaResponse) GetReturnedResources() map[string]string             { return r.next }
func (r *deltaResponse) GetContext() context.Context                         { return r.ctx }

// Fetch answers a REST request (not served by the federator; here so
// the cache is a whole cache.Cache): the snapshot's resources of the
// type, those named if any are, unless the request is at its version.
func (c *encodedCache) Fetch(ctx context.Context, req *cache.Request) (cache.Response, error) {
	id := c.hash.ID(req.GetNode())
	c.mu.Lock()
	defer c.mu.Unlock()
	g, ok := c.groups[id]
	if !ok || g.snap == nil {
		return nil, fmt.Errorf("missing snapshot for %q", id)
	}
	t, err := g.typ(req.GetTypeUrl(), req.GetNode())
	if err != nil {
		return nil, err
	}
	if req.GetVersionInfo() == t.version {
		c.log.Warnf("skip fetch: version up to date")
		return nil, &types.SkipFetchError{}
	}
	resp := &sotwResponse{req: req, version: t.version, anys: t.anys, ctx: ctx}
	if names := req.GetResourceNames(); len(names) == 0 {
		resp.returned = make(map[string]string, len(t.names))
		for _, name := range t.names {
			resp.returned[name] = t.version
		}
	} else {
		resp.anys, resp.returned = nil, map[string]string{}
		listed := make(map[string]bool, len(names))
		for _, name := range names {
			listed[name] = true
		}
		for i, name := range t.names {
			if listed[name] {
				resp.anys = append(resp.anys, t.anys[i])
				resp.returned[name] = t.version
			}
		}
	}
	return resp, nil
}
