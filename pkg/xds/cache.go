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

	// status, like the snapshot cache's statusInfo, exists once a node
	// of the group opened a watch.
	status *groupStatus
}

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
	// returned is what a state-of-the-world response returns (every
	// name at version; for a partial type, at "<version>/<its delta
	// version>": what a stream holds, and the response it came in);
	// each response gets a copy, which the server may modify.
	returned map[string]string
	// partial: a response carries only what the stream lacks.
	partial bool
	// versions are the delta versions by name, made on the first delta
	// watch; nil before.
	versions map[string]string
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
		g = &cacheGroup{types: map[string]*encodedType{}, encoded: map[string]*encodedType{}}
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

// typ returns the snapshot's resources of typeURL, encoded; an unknown
// type, or one the snapshot lacks, has none at version "". A type the
// snapshot keeps as the previous one had it (the same version, the same
// messages: a translation keeps what did not change) is the previous
// one's, names, Anys and delta versions included, so a push that
// changes one type costs the others a walk over their messages.
func (g *cacheGroup) typ(typeURL string) (*encodedType, error) {
	if t, ok := g.types[typeURL]; ok {
		return t, nil
	}
	res := g.snap.GetResourcesAndTTL(typeURL)
	version := g.snap.GetVersion(typeURL)
	if prev := g.encoded[typeURL]; prev.holds(version, res) {
		g.types[typeURL] = prev
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
	prev := g.encoded[typeURL]
	for i, name := range t.names {
		r := res[name]
		if r.TTL != nil {
			return nil, fmt.Errorf("%s %q: resources with a TTL are not served", typeURL, name)
		}
		e := prev.find(r.Resource)
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
			t.returned[name] = t.version + "/" + e.deltaResource(name).GetVersion()
		} else {
			t.returned[name] = t.version
		}
	}
	g.types[typeURL] = t
	g.encoded[typeURL] = t
	return t, nil
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
	// types to reuse.
	clear(g.types)
	if g.status == nil {
		return nil
	}
	for _, id := range orderedIDs(g.status.watches, func(w sotwWatch) int { return w.order }) {
		w := g.status.watches[id]
		t, err := g.typ(w.req.GetTypeUrl())
		if err != nil {
			return err
		}
		if t.version == w.req.GetVersionInfo() {
			continue
		}
		c.log.Debugf("respond open watch %d %s with new version %q", id, w.req.GetTypeUrl(), t.version)
		if err := c.respond(ctx, w, t); err != nil {
			return err
		}
		delete(g.status.watches, id)
	}
	for _, id := range orderedIDs(g.status.deltaWatches, func(w deltaWatch) int { return w.order }) {
		w := g.status.deltaWatches[id]
		t, err := g.typ(w.req.GetTypeUrl())
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
	t, err := g.typ(req.GetTypeUrl())
	if err != nil {
		return nil, err
	}
	if req.GetVersionInfo() == t.version && !lacksResource(t, sub) {
		return c.addWatch(id, st, w), nil
	}
	if err := c.respond(context.Background(), w, t); err != nil {
		c.log.Errorf("failed to send a response for %s to nodeID %q: %s", req.GetTypeUrl(), id, err)
		return nil, fmt.Errorf("failed to send the response: %w", err)
	}
	return func() {}, nil
}

// lacksResource reports whether sub is subscribed to a resource of t
// that was not returned to it (newly subscribed, or newly wildcard).
func lacksResource(t *encodedType, sub cache.Subscription) bool {
	known := sub.ReturnedResources()
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
// names it learnt), and then with all of t.
func (c *encodedCache) respond(ctx context.Context, w sotwWatch, t *encodedType) error {
	if names := w.req.GetResourceNames(); len(names) != 0 {
		if missing, ok := namesAll(t, names); !ok {
			c.log.Warnf("ADS mode: not responding to request %s: %q not listed", w.req.GetTypeUrl(), missing)
			return nil
		}
	}
	resp := &sotwResponse{req: w.req, version: t.version, anys: t.anys, returned: maps.Clone(t.returned), ctx: ctx}
	if t.partial {
		resp.anys = t.lacking(w)
	}
	c.log.Debugf("respond %s version %q with version %q and %d of %d resources", w.req.GetTypeUrl(), w.req.GetVersionInfo(), t.version, len(resp.anys), len(t.anys))
	select {
	case w.resp <- resp:
		return nil
	case <-ctx.Done():
		return context.Canceled
	}
}

// lacking is what a partial type's response to w carries: the resources
// whose version the stream does not hold, or all of them when it
// NACKed, holds nothing yet, or asks at another version than the one it
// was last sent (it did not take that response).
//
// The stream's returned resources say what it holds: each name at
// "<version of the response it came in>/<delta version>" (the server
// drops the names a request no longer subscribes to, so the version of
// the last response rides on every name rather than under a key of its
// own).
func (t *encodedType) lacking(w sotwWatch) []*anypb.Any {
	known := w.sub.ReturnedResources()
	if w.req.GetErrorDetail() != nil || len(known) == 0 {
		return t.anys
	}
	var sent string
	for _, v := range known {
		sent, _, _ = strings.Cut(v, "/")
		break
	}
	if sent == "" || sent != w.req.GetVersionInfo() {
		return t.anys
	}
	out := []*anypb.Any{}
	for i, name := range t.names {
		v, ok := known[name]
		_, held, _ := strings.Cut(v, "/")
		_, now, _ := strings.Cut(t.returned[name], "/")
		if !ok || held != now {
			out = append(out, t.anys[i])
		}
	}
	return out
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
	req      *cache.Request
	version  string
	anys     []*anypb.Any
	returned map[string]string
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
func (r *sotwResponse) GetReturnedResources() map[string]string   { return r.returned }
func (r *sotwResponse) GetContext() context.Context               { return r.ctx }

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
		t, err := g.typ(req.GetTypeUrl())
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
	t, err := g.typ(req.GetTypeUrl())
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
