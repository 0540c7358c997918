package xdsclient

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/anypb"
)

// The accepted state, kept so that a response costs what it changes. A
// state-of-the-world response resends every resource of its type; the
// client remembers each resource it accepted with the SHA-256 of the
// bytes it was decoded from, so one sent again unchanged is neither
// unmarshaled nor validated again: it decoded and validated the same way
// before, and decoding is a pure function of the bytes. The indexes a
// Config is assembled from (the clusters with their endpoints, the
// references still unsatisfied, the sidecar's DNS name table, the EDS
// subscription) are updated by the changes alone, so the checks that
// span resources (duplicate names, consistency, one VIP per host) cover
// every resource without visiting the ones that did not change.
//
// States are never modified once built. A response leads to a new state
// that shares every map the response did not touch and copies each one
// it does the first time it does (tx): a NACK drops the new state and
// leaves the last good one as it was, and a published Config, which
// shares the maps of the state it was assembled from, never sees a later
// change.

// digest is the SHA-256 of a resource's bytes (its Any's value).
type digest [sha256.Size]byte

// entry is one accepted resource: its name, the digest of the bytes it
// was decoded from, and what they decoded to; for a resource decoded by
// parts, the digests of its parts (parts.go). Entries are shared between
// states and never modified.
type entry[V any] struct {
	name  string
	sum   digest
	v     V
	parts parts
}

// peekName is the name a resource's bytes carry in field 1 (the name of
// a Listener, RouteConfiguration, Cluster or Secret, the cluster_name of
// a ClusterLoadAssignment), read without unmarshaling: the key to find
// its previous entry by. It is only a hint: an entry is reused only when
// its digest matches the bytes, so a malformed or misleading field costs
// a decode, never a wrong result. Like proto.Unmarshal, it takes the
// last occurrence of the field.
func peekName(b []byte) []byte {
	var name []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil
			}
			name, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return nil
		}
		b = b[n:]
	}
	return name
}

// previous is prev's entry of the name r carries (nil: none).
func previous[V any](prev map[string]*entry[V], typeURL string, r *anypb.Any) *entry[V] {
	if r.GetTypeUrl() != typeURL || len(prev) == 0 {
		return nil
	}
	return prev[string(peekName(r.GetValue()))]
}

// reuse returns prev's entry for r when r's bytes, whose digest is sum,
// are the ones it was decoded from.
func reuse[V any](prev map[string]*entry[V], typeURL string, r *anypb.Any, sum digest) *entry[V] {
	if e := previous(prev, typeURL, r); e != nil && e.sum == sum {
		return e
	}
	return nil
}

func sumOf(r *anypb.Any) digest { return sha256.Sum256(r.GetValue()) }

// codec is how the resources of one type decode.
type codec[V any] struct {
	typeURL string
	// kind names the type in a NACK: "cluster", "route_configuration", …
	kind string
	// nameField and dup are the field and the reason of the error for a
	// name sent twice in one response.
	nameField, dup string
	// decode unmarshals and validates one resource; name is its name
	// whenever it unmarshaled, valid or not.
	decode func(r *anypb.Any) (name string, v V, err error)
	// byParts, if set, decodes a resource by parts, reusing those of its
	// previous version (nil: none); ok false when it cannot (the
	// resource is then decoded whole, for the errors).
	byParts func(r *anypb.Any, prev *entry[V]) (name string, v V, p parts, ok bool)
}

// change is one name whose entry a response changed: old is nil for a
// resource added, new nil for one removed.
type change[V any] struct {
	name     string
	old, new *entry[V]
}

// decodeResponse decodes one response's resources of cd's type against
// prev, the entries accepted: a resource whose bytes are those of prev's
// entry of its name is that entry; any other is decoded. It returns the
// changes to prev: every name whose entry is new and, when the response
// is the whole set of its type (sotw: LDS, CDS), every name of prev it
// does not carry. Problems come in the order the resources were sent,
// as a NACK reports them.
func decodeResponse[V any](cd *codec[V], prev map[string]*entry[V], resources []*anypb.Any, sotw bool) ([]change[V], []error) {
	var changes []change[V]
	var errs []error
	seen := make(map[string]struct{}, len(resources))
	kept := 0
	for i, r := range resources {
		sum := sumOf(r)
		e := previous(prev, cd.typeURL, r)
		if e == nil || e.sum != sum {
			var name string
			var err error
			if e, name, err = cd.decodeOne(r, sum, e); err != nil {
				errs = append(errs, &resourceError{kind: cd.kind, name: name, idx: i, err: err})
				continue
			}
		}
		if _, dup := seen[e.name]; dup {
			errs = append(errs, &resourceError{kind: cd.kind, name: e.name, idx: i, err: fieldErr(cd.nameField, cd.dup)})
			continue
		}
		seen[e.name] = struct{}{}
		old, had := prev[e.name]
		if had {
			kept++
		}
		if old != e {
			changes = append(changes, change[V]{name: e.name, old: old, new: e})
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	if sotw && kept < len(prev) {
		for name, old := range prev {
			if _, ok := seen[name]; !ok {
				changes = append(changes, change[V]{name: name, old: old})
			}
		}
	}
	return changes, nil
}

// decodeOne decodes r, whose digest is sum: by parts when the type has
// them, reusing those of before (r's previous version; nil: none), else
// whole. name is r's name when it unmarshaled, also when it is invalid.
func (cd *codec[V]) decodeOne(r *anypb.Any, sum digest, before *entry[V]) (e *entry[V], name string, err error) {
	if cd.byParts != nil {
		if name, v, p, ok := cd.byParts(r, before); ok {
			return &entry[V]{name: name, sum: sum, v: v, parts: p}, name, nil
		}
	}
	name, v, err := cd.decode(r)
	if err != nil {
		return nil, name, err
	}
	return &entry[V]{name: name, sum: sum, v: v}, name, nil
}

// state is what the client has accepted so far, by type and name, with
// the indexes a Config is assembled from. It is replaced, never
// modified: see tx.
type state struct {
	// listeners are the gateway role's; nil until the first LDS response.
	listeners map[string]*entry[Listener]
	// clusters are nil until the first CDS response.
	clusters map[string]*entry[Cluster]
	// assignments are the ClusterLoadAssignments by cluster_name.
	assignments map[string]*entry[loadAssignment]
	// secret holds the ROOTCA Secret's trust bundles; nil until the first.
	secret *entry[*x509bundle.Set]
	// sc is the sidecar role's own state; nil for the gateway role.
	sc *sidecarState

	// The indexes below follow every change (tx).

	// merged is Config.Clusters: every cluster, an EDS one with its
	// assignment's endpoints (none while the assignment is missing). Nil
	// until the first CDS response.
	merged map[string]Cluster
	// edsCount counts the EDS clusters by the ClusterLoadAssignment they
	// take their endpoints from; eds are its keys, sorted: the EDS
	// subscription. aliases are the EDS clusters whose assignment is not
	// named after them, by the assignment's name.
	edsCount map[string]int32
	eds      []string
	aliases  map[string][]string
	// orphans are the assignments held that no EDS cluster takes its
	// endpoints from.
	orphans map[string]struct{}
	// needs counts the references to each cluster name: from the
	// gateway's filter chains, or from the sidecar's listeners and the
	// route configurations the outbound listener names.
	needs map[string]int32
	// missingClusters counts the names needs holds that clusters does
	// not; missingAssignments the EDS clusters whose assignment is not
	// there.
	missingClusters, missingAssignments int
	// listenerList is Config.Listeners (gateway role): sorted by name.
	listenerList []Listener
	// dirty names the merged clusters changed since a config was last
	// published, or found to be the published one (sameContent); with
	// dirtyAll, more than maxDirty did and everything is compared.
	dirty    map[string]struct{}
	dirtyAll bool
}

// sidecarState is what the sidecar role has accepted beyond the state
// both roles share.
type sidecarState struct {
	// outbound and inbound are nil until the first LDS response.
	outbound *entry[*OutboundListener]
	inbound  *entry[*InboundListener]
	// routes are the RouteConfigurations by name; nil until the first
	// RDS response.
	routes map[string]*entry[*RouteConfig]
	// named are the route configurations the outbound listener names,
	// sorted: the RDS subscription. missingRoutes counts those routes
	// does not hold.
	named         []string
	missingRoutes int
	// hostVIP and vipHost are the DNS name table of the clusters'
	// ServiceMeta (Sidecar.LookupHost, LookupVIP); hostRefs counts the
	// clusters of each host. Nil until the first CDS response.
	hostVIP  map[string]netip.Addr
	vipHost  map[netip.Addr]string
	hostRefs map[string]int32
	// view is Config.Sidecar for this state; nil until the first LDS
	// response.
	view *Sidecar
}

// maxDirty bounds state.dirty: past it, sameContent compares every
// cluster, which costs no more than the changes that made it that big.
const maxDirty = 1024

// newState is the empty state of a role's client.
func newState(role string) (*state, error) {
	switch role {
	case RoleGateway:
		return &state{}, nil
	case RoleSidecar:
		return &state{sc: &sidecarState{}}, nil
	}
	return nil, fmt.Errorf("xdsclient: unknown role %q (%s or %s)", role, RoleGateway, RoleSidecar)
}

func (s *state) bundles() *x509bundle.Set {
	if s.secret == nil {
		return nil
	}
	return s.secret.v
}

// edsNames are the ClusterLoadAssignments the accepted clusters need,
// sorted: the EDS subscription. The slice is shared: callers must not
// modify it.
func (s *state) edsNames() []string { return s.eds }

// rdsNames are the route configurations the accepted listeners name,
// sorted: the RDS subscription. Nil for the gateway role. The slice is
// shared: callers must not modify it.
func (s *state) rdsNames() []string {
	if s.sc == nil {
		return nil
	}
	return s.sc.named
}

// apply decodes one response's resources of typeURL into a new state. LDS
// and CDS responses are the full set (state of the world); an EDS, RDS or
// SDS response adds or replaces the resources it carries, as Envoy treats
// them: an SDS response without ROOTCA leaves the bundles as they were.
func (s *state) apply(typeURL string, resources []*anypb.Any) (*state, error) {
	tx := s.begin()
	var errs []error
	switch {
	case typeURL == TypeListener && s.sc == nil:
		errs = tx.applyListeners(resources)
	case typeURL == TypeListener:
		errs = tx.applySidecarListeners(resources)
	case typeURL == TypeRouteConfiguration && s.sc != nil:
		errs = tx.applyRoutes(resources)
	case typeURL == TypeCluster:
		errs = tx.applyClusters(resources)
	case typeURL == TypeClusterLoadAssignment:
		errs = tx.applyAssignments(resources)
	case typeURL == TypeSecret:
		errs = tx.applySecret(resources)
	default:
		return nil, fmt.Errorf("unsupported type %q", typeURL)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return tx.finish(), nil
}

// keepAssignments returns a state holding only the assignments named (the
// current EDS subscription): a server's unrequested assignment is ignored,
// as Envoy does, and one no cluster needs any more is forgotten.
func (s *state) keepAssignments(names []string) *state {
	var drop []change[loadAssignment]
	if sameSlice(names, s.eds) || slices.Equal(names, s.eds) {
		// The assignments no cluster takes its endpoints from are known.
		for name := range s.orphans {
			drop = append(drop, change[loadAssignment]{name: name, old: s.assignments[name]})
		}
	} else {
		for name, e := range s.assignments {
			if _, ok := slices.BinarySearch(names, name); !ok {
				drop = append(drop, change[loadAssignment]{name: name, old: e})
			}
		}
	}
	if len(drop) == 0 {
		return s
	}
	tx := s.begin()
	tx.assignmentsChanged(drop)
	return tx.finish()
}

// keepRoutes returns a state holding only the route configurations named
// (the current RDS subscription), as keepAssignments does for EDS.
func (s *state) keepRoutes(names []string) *state {
	if s.sc == nil {
		return s
	}
	var drop []change[*RouteConfig]
	for name, e := range s.sc.routes {
		if _, ok := slices.BinarySearch(names, name); !ok {
			drop = append(drop, change[*RouteConfig]{name: name, old: e})
		}
	}
	if len(drop) == 0 {
		return s
	}
	tx := s.begin()
	tx.routesChanged(drop)
	return tx.finish()
}

// complete reports whether the state is consistent: a Config can be
// assembled from it.
func (s *state) complete() bool {
	if s.clusters == nil || s.missingClusters > 0 || s.missingAssignments > 0 {
		return false
	}
	if s.sc == nil {
		return s.listeners != nil
	}
	return s.sc.outbound != nil && s.sc.missingRoutes == 0 && s.secret != nil
}

// config is the Config of a complete state. It shares the state's maps,
// which no later state modifies.
func (s *state) config(versions map[string]string) *Config {
	cfg := &Config{Clusters: s.merged, Bundles: s.bundles(), Versions: versions}
	if s.sc != nil {
		cfg.Sidecar = s.sc.view
	} else {
		cfg.Listeners = s.listenerList
	}
	return cfg
}

// assemble combines the accepted resources into a Config, or reports
// (wrapping ErrIncomplete) what is still missing.
func (s *state) assemble(versions map[string]string) (*Config, error) {
	if s.complete() {
		return s.config(versions), nil
	}
	return nil, s.incomplete()
}

// clean is s with nothing changed since the config published last: the
// config assembled from s is published, or found the same as the one
// that is.
func (s *state) clean() *state {
	if s.dirty == nil && !s.dirtyAll {
		return s
	}
	next := *s
	next.dirty, next.dirtyAll = nil, false
	return &next
}

// sameContent reports whether cfg, assembled from s, routes and trusts
// as cur, the config published last: whatever cfg shares with cur is the
// same, of the clusters only those changed since cur (s.dirty) are
// compared, and the rest costs the size of what changed.
func (s *state) sameContent(cur, cfg *Config) bool {
	if !sameBundles(cur.Bundles, cfg.Bundles) {
		return false
	}
	if !sameSlice(cur.Listeners, cfg.Listeners) && !reflect.DeepEqual(cur.Listeners, cfg.Listeners) {
		return false
	}
	if a, b := cur.Sidecar, cfg.Sidecar; a != b {
		if a == nil || b == nil ||
			(a.Outbound != b.Outbound && !reflect.DeepEqual(a.Outbound, b.Outbound)) ||
			(a.Inbound != b.Inbound && !reflect.DeepEqual(a.Inbound, b.Inbound)) ||
			!maps.EqualFunc(a.Routes, b.Routes, func(x, y *RouteConfig) bool { return x == y || reflect.DeepEqual(x, y) }) {
			return false
		}
		// The name table is the clusters' metadata, compared next.
	}
	a, b := cur.Clusters, cfg.Clusters
	switch {
	case reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer():
		return true
	case len(a) != len(b):
		return false
	case s.dirtyAll:
		return reflect.DeepEqual(a, b)
	}
	for name := range s.dirty {
		x, inA := a[name]
		y, inB := b[name]
		if inA != inB || !reflect.DeepEqual(x, y) {
			return false
		}
	}
	return true
}

// sameSlice reports whether a and b are the same slice: same array,
// same length.
func sameSlice[E any](a, b []E) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// tx builds the state that follows another: a shallow copy whose maps
// are copied the first time the transition changes them and changed in
// place after that, before anyone else can see them.
type tx struct {
	s     *state
	owned owned
	// edsTouched are the assignment names whose place in the EDS
	// subscription may have changed.
	edsTouched []string
	// viewChanged: the sidecar's Config.Sidecar needs rebuilding.
	viewChanged bool
}

// owned records the maps a tx has copied.
type owned uint16

const (
	ownListeners owned = 1 << iota
	ownClusters
	ownAssignments
	ownMerged
	ownEDSCount
	ownAliases
	ownOrphans
	ownNeeds
	ownDirty
	ownRoutes
	ownHostVIP
	ownVIPHost
	ownHostRefs
)

// own returns *m, copied first if the tx has not already (a nil map
// becomes an empty one).
func own[K comparable, V any](tx *tx, bit owned, m *map[K]V) map[K]V {
	if tx.owned&bit == 0 {
		*m = maps.Clone(*m)
		if *m == nil {
			*m = make(map[K]V)
		}
		tx.owned |= bit
	}
	return *m
}

func (s *state) begin() *tx {
	next := *s
	if s.sc != nil {
		sc := *s.sc
		next.sc = &sc
	}
	return &tx{s: &next}
}

// finish rebuilds what depends on the whole of a changed index and
// returns the new state.
func (tx *tx) finish() *state {
	s := tx.s
	if len(tx.edsTouched) > 0 {
		s.eds = updateSorted(s.eds, tx.edsTouched, func(n string) bool { return s.edsCount[n] > 0 })
	}
	if tx.viewChanged {
		s.sc.view = s.sidecarView()
	}
	return s
}

// updateSorted is the sorted list old with each of touched in it or not
// as member says; old itself when that changes nothing.
func updateSorted(old, touched []string, member func(string) bool) []string {
	slices.Sort(touched)
	touched = slices.Compact(touched)
	out := make([]string, 0, len(old)+len(touched))
	changed := false
	i, j := 0, 0
	for i < len(old) || j < len(touched) {
		switch {
		case j == len(touched) || (i < len(old) && old[i] < touched[j]):
			out = append(out, old[i])
			i++
		case i == len(old) || touched[j] < old[i]:
			if member(touched[j]) {
				out = append(out, touched[j])
				changed = true
			}
			j++
		default:
			if member(old[i]) {
				out = append(out, old[i])
			} else {
				changed = true
			}
			i++
			j++
		}
	}
	switch {
	case !changed:
		return old
	case len(out) == 0:
		return nil
	}
	return out
}

func (tx *tx) markDirty(name string) {
	s := tx.s
	if s.dirtyAll {
		return
	}
	if len(s.dirty) >= maxDirty {
		s.dirty, s.dirtyAll = nil, true
		return
	}
	own(tx, ownDirty, &s.dirty)[name] = struct{}{}
}

// --- clusters and assignments ---

var (
	gatewayClusterCodec = &codec[Cluster]{
		typeURL: TypeCluster, kind: "cluster", nameField: "name", dup: "duplicate cluster name in the response",
		decode: func(r *anypb.Any) (string, Cluster, error) {
			m := new(clusterv3.Cluster)
			if err := unpack(r, TypeCluster, m); err != nil {
				return "", Cluster{}, err
			}
			c, err := decodeCluster(m)
			return m.GetName(), c, err
		},
	}
	sidecarClusterCodec = &codec[Cluster]{
		typeURL: TypeCluster, kind: "cluster", nameField: "name", dup: "duplicate cluster name in the response",
		decode: func(r *anypb.Any) (string, Cluster, error) {
			m := new(clusterv3.Cluster)
			if err := unpack(r, TypeCluster, m); err != nil {
				return "", Cluster{}, err
			}
			c, err := decodeSidecarCluster(m)
			return m.GetName(), c, err
		},
	}
	gatewayAssignmentCodec = &codec[loadAssignment]{
		typeURL: TypeClusterLoadAssignment, kind: "cluster_load_assignment",
		nameField: "cluster_name", dup: "duplicate cluster_name in the response",
		decode: func(r *anypb.Any) (string, loadAssignment, error) {
			m := new(endpointv3.ClusterLoadAssignment)
			if err := unpack(r, TypeClusterLoadAssignment, m); err != nil {
				return "", loadAssignment{}, err
			}
			eps, err := decodeAssignment(m, false)
			return m.GetClusterName(), loadAssignment{endpoints: eps}, err
		},
	}
	sidecarAssignmentCodec = &codec[loadAssignment]{
		typeURL: TypeClusterLoadAssignment, kind: "cluster_load_assignment",
		nameField: "cluster_name", dup: "duplicate cluster_name in the response",
		decode: func(r *anypb.Any) (string, loadAssignment, error) {
			m := new(endpointv3.ClusterLoadAssignment)
			if err := unpack(r, TypeClusterLoadAssignment, m); err != nil {
				return "", loadAssignment{}, err
			}
			a, err := decodeSidecarAssignment(m)
			return m.GetClusterName(), a, err
		},
	}
)

func (tx *tx) applyClusters(resources []*anypb.Any) []error {
	s := tx.s
	cd := gatewayClusterCodec
	if s.sc != nil {
		cd = sidecarClusterCodec
	}
	changes, errs := decodeResponse(cd, s.clusters, resources, true)
	if len(errs) > 0 {
		return errs
	}
	if s.clusters == nil {
		own(tx, ownClusters, &s.clusters)
		own(tx, ownMerged, &s.merged)
	}
	if len(changes) > 0 {
		clusters := own(tx, ownClusters, &s.clusters)
		for _, ch := range changes {
			if ch.new == nil {
				delete(clusters, ch.name)
			} else {
				clusters[ch.name] = ch.new
			}
		}
		for _, ch := range changes {
			tx.clusterChanged(ch)
		}
	}
	if s.sc != nil {
		if err := tx.updateNames(changes); err != nil {
			return []error{err}
		}
	}
	return nil
}

// clusterChanged follows one cluster's change in the indexes; s.clusters
// already has it.
func (tx *tx) clusterChanged(ch change[Cluster]) {
	s := tx.s
	if s.needs[ch.name] > 0 {
		switch {
		case ch.old == nil && ch.new != nil:
			s.missingClusters--
		case ch.old != nil && ch.new == nil:
			s.missingClusters++
		}
	}
	if ch.old != nil && ch.old.v.Type == EDS {
		tx.edsRef(ch.old.v.ServiceName, ch.name, -1)
	}
	if ch.new != nil && ch.new.v.Type == EDS {
		tx.edsRef(ch.new.v.ServiceName, ch.name, +1)
	}
	tx.remerge(ch.name)
}

// edsRef counts one EDS cluster more (d = 1) or less (-1) that takes its
// endpoints from the assignment svc.
func (tx *tx) edsRef(svc, cluster string, d int32) {
	s := tx.s
	counts := own(tx, ownEDSCount, &s.edsCount)
	before := counts[svc]
	after := before + d
	if after == 0 {
		delete(counts, svc)
	} else {
		counts[svc] = after
	}
	_, has := s.assignments[svc]
	if !has {
		s.missingAssignments += int(d)
	}
	if (before == 0) != (after == 0) {
		tx.edsTouched = append(tx.edsTouched, svc)
		if has {
			orphans := own(tx, ownOrphans, &s.orphans)
			if after == 0 {
				orphans[svc] = struct{}{}
			} else {
				delete(orphans, svc)
			}
		}
	}
	if svc != cluster {
		aliases := own(tx, ownAliases, &s.aliases)
		list := aliases[svc]
		if d > 0 {
			aliases[svc] = append(slices.Clip(list), cluster)
		} else if list = slices.DeleteFunc(slices.Clone(list), func(c string) bool { return c == cluster }); len(list) == 0 {
			delete(aliases, svc)
		} else {
			aliases[svc] = list
		}
	}
}

// remerge sets the merged cluster of name from its cluster and, for EDS,
// its assignment.
func (tx *tx) remerge(name string) {
	s := tx.s
	merged := own(tx, ownMerged, &s.merged)
	e := s.clusters[name]
	if e == nil {
		delete(merged, name)
	} else {
		c := e.v
		if c.Type == EDS {
			if a := s.assignments[c.ServiceName]; a != nil {
				c.Endpoints, c.Priorities, c.OverprovisioningFactor = a.v.endpoints, a.v.priorities, a.v.overprovisioning
			}
		}
		merged[name] = c
	}
	tx.markDirty(name)
}

func (tx *tx) applyAssignments(resources []*anypb.Any) []error {
	s := tx.s
	cd := gatewayAssignmentCodec
	if s.sc != nil {
		cd = sidecarAssignmentCodec
	}
	changes, errs := decodeResponse(cd, s.assignments, resources, false)
	if len(errs) > 0 {
		return errs
	}
	if s.assignments == nil {
		own(tx, ownAssignments, &s.assignments)
	}
	tx.assignmentsChanged(changes)
	return nil
}

// assignmentsChanged applies changes to the assignments and follows them
// in the indexes.
func (tx *tx) assignmentsChanged(changes []change[loadAssignment]) {
	if len(changes) == 0 {
		return
	}
	s := tx.s
	assignments := own(tx, ownAssignments, &s.assignments)
	for _, ch := range changes {
		if ch.new == nil {
			delete(assignments, ch.name)
		} else {
			assignments[ch.name] = ch.new
		}
	}
	for _, ch := range changes {
		n := s.edsCount[ch.name]
		added, removed := ch.old == nil && ch.new != nil, ch.old != nil && ch.new == nil
		switch {
		case added:
			s.missingAssignments -= int(n)
		case removed:
			s.missingAssignments += int(n)
		}
		if n == 0 && (added || removed) {
			orphans := own(tx, ownOrphans, &s.orphans)
			if added {
				orphans[ch.name] = struct{}{}
			} else {
				delete(orphans, ch.name)
			}
		}
		if n == 0 {
			continue
		}
		if c := s.clusters[ch.name]; c != nil && c.v.Type == EDS && c.v.ServiceName == ch.name {
			tx.remerge(ch.name)
		}
		for _, name := range s.aliases[ch.name] {
			tx.remerge(name)
		}
	}
}

// need counts d more references to the cluster name.
func (tx *tx) need(name string, d int32) {
	s := tx.s
	needs := own(tx, ownNeeds, &s.needs)
	before := needs[name]
	after := before + d
	if after == 0 {
		delete(needs, name)
	} else {
		needs[name] = after
	}
	if _, ok := s.clusters[name]; !ok && (before == 0) != (after == 0) {
		if after > 0 {
			s.missingClusters++
		} else {
			s.missingClusters--
		}
	}
}

// --- gateway listeners ---

var gatewayListenerCodec = &codec[Listener]{
	typeURL: TypeListener, kind: "listener", nameField: "name", dup: "duplicate listener name in the response",
	decode: func(r *anypb.Any) (string, Listener, error) {
		m := new(listenerv3.Listener)
		if err := unpack(r, TypeListener, m); err != nil {
			return "", Listener{}, err
		}
		l, err := decodeListener(m)
		return m.GetName(), l, err
	},
	byParts: gatewayListenerParts,
}

func (tx *tx) applyListeners(resources []*anypb.Any) []error {
	s := tx.s
	changes, errs := decodeResponse(gatewayListenerCodec, s.listeners, resources, true)
	if len(errs) > 0 {
		return errs
	}
	if s.listeners != nil && len(changes) == 0 {
		return nil
	}
	listeners := own(tx, ownListeners, &s.listeners)
	for _, ch := range changes {
		gone := func(i int32) { tx.need(ch.old.v.Chains[i].Cluster, -1) }
		came := func(i int32) { tx.need(ch.new.v.Chains[i].Cluster, +1) }
		if ch.old == nil || ch.new == nil || !changedParts(ch.old.parts, ch.new.parts, len(ch.old.v.Chains), len(ch.new.v.Chains), gone, came) {
			if ch.old != nil {
				for i := range ch.old.v.Chains {
					gone(int32(i))
				}
			}
			if ch.new != nil {
				for i := range ch.new.v.Chains {
					came(int32(i))
				}
			}
		}
		if ch.new == nil {
			delete(listeners, ch.name)
		} else {
			listeners[ch.name] = ch.new
		}
	}
	list := make([]Listener, 0, len(listeners))
	for _, e := range listeners {
		list = append(list, e.v)
	}
	slices.SortFunc(list, func(a, b Listener) int { return strings.Compare(a.Name, b.Name) })
	s.listenerList = list
	return nil
}

// --- secrets ---

func (tx *tx) applySecret(resources []*anypb.Any) []error {
	s := tx.s
	var prev map[string]*entry[*x509bundle.Set]
	if s.secret != nil {
		prev = map[string]*entry[*x509bundle.Set]{s.secret.name: s.secret}
	}
	var errs []error
	var found *entry[*x509bundle.Set]
	for i, r := range resources {
		sum := sumOf(r)
		e := reuse(prev, TypeSecret, r, sum)
		var err error
		if e == nil {
			m := new(tlsv3.Secret)
			if err := unpack(r, TypeSecret, m); err != nil {
				errs = append(errs, &resourceError{kind: "secret", idx: i, err: err})
				continue
			}
			var set *x509bundle.Set
			set, err = decodeSecret(m)
			e = &entry[*x509bundle.Set]{name: m.GetName(), sum: sum, v: set}
		}
		if err == nil && found != nil {
			err = fieldErr("name", "duplicate secret name in the response")
		}
		if err != nil {
			errs = append(errs, &resourceError{kind: "secret", name: e.name, idx: i, err: err})
			continue
		}
		found = e
	}
	if len(errs) > 0 {
		return errs
	}
	if found != nil {
		s.secret = found
	}
	return nil
}

// --- sidecar listeners and routes ---

func (tx *tx) applySidecarListeners(resources []*anypb.Any) []error {
	sc := tx.s.sc
	prevOut, prevIn := map[string]*entry[*OutboundListener]{}, map[string]*entry[*InboundListener]{}
	if sc.outbound != nil {
		prevOut[OutboundListenerName], prevIn[InboundListenerName] = sc.outbound, sc.inbound
	}
	var errs []error
	bad := func(name string, i int, err error) {
		errs = append(errs, &resourceError{kind: "listener", name: name, idx: i, err: err})
	}
	var out *entry[*OutboundListener]
	var in *entry[*InboundListener]
	for i, r := range resources {
		sum := sumOf(r)
		hitOut, hitIn := reuse(prevOut, TypeListener, r, sum), reuse(prevIn, TypeListener, r, sum)
		var m *listenerv3.Listener
		var name string
		var byParts *entry[*OutboundListener]
		switch {
		case hitOut != nil:
			name = OutboundListenerName
		case hitIn != nil:
			name = InboundListenerName
		default:
			if l, p, ok := outboundParts(r, sc.outbound); ok {
				name, byParts = OutboundListenerName, &entry[*OutboundListener]{name: OutboundListenerName, sum: sum, v: l, parts: p}
				break
			}
			m = new(listenerv3.Listener)
			if err := unpack(r, TypeListener, m); err != nil {
				bad("", i, err)
				continue
			}
			name = m.GetName()
		}
		var err error
		switch {
		case name == OutboundListenerName && out != nil, name == InboundListenerName && in != nil:
			err = fieldErr("name", "duplicate listener name in the response")
		case hitOut != nil:
			out = hitOut
		case hitIn != nil:
			in = hitIn
		case byParts != nil:
			out = byParts
		case name == OutboundListenerName:
			var l *OutboundListener
			if l, err = decodeOutbound(m); l != nil {
				out = &entry[*OutboundListener]{name: name, sum: sum, v: l}
			}
		case name == InboundListenerName:
			var l *InboundListener
			if l, err = decodeInbound(m); l != nil {
				in = &entry[*InboundListener]{name: name, sum: sum, v: l}
			}
		default:
			err = fieldErr("name", fmt.Sprintf("unsupported listener %q (a sidecar has %q and %q)", name, OutboundListenerName, InboundListenerName))
		}
		if err != nil {
			bad(name, i, err)
		}
	}
	if len(errs) == 0 {
		for _, l := range []struct {
			name    string
			missing bool
		}{{OutboundListenerName, out == nil}, {InboundListenerName, in == nil}} {
			if l.missing {
				bad(l.name, 0, fmt.Errorf("is missing from the response: a sidecar needs both %s and %s", OutboundListenerName, InboundListenerName))
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	if out != sc.outbound {
		tx.outboundChanged(sc.outbound, out)
		sc.outbound = out
		tx.viewChanged = true
	}
	if in != sc.inbound {
		if sc.inbound != nil {
			inboundRefs(sc.inbound.v, func(c string) { tx.need(c, -1) })
		}
		inboundRefs(in.v, func(c string) { tx.need(c, +1) })
		sc.inbound = in
		tx.viewChanged = true
	}
	return nil
}

// outboundChanged follows the outbound listener's change in the indexes:
// the clusters its tcp_proxies name, the route configurations its HTTP
// chains name, and the clusters those name.
func (tx *tx) outboundChanged(old, new *entry[*OutboundListener]) {
	sc := tx.s.sc
	refs := func(l *OutboundListener, d int32) func(int32) {
		return func(i int32) {
			chainRefs(l.Chains[i], func(c string) { tx.need(c, d) })
		}
	}
	if old != nil && changedParts(old.parts, new.parts, len(old.v.Chains), len(new.v.Chains), refs(old.v, -1), refs(new.v, +1)) {
		tx.need(old.v.Default.TCP.Cluster, -1)
		tx.need(new.v.Default.TCP.Cluster, +1)
	} else {
		if old != nil {
			outboundRefs(old.v, func(c string) { tx.need(c, -1) })
		}
		outboundRefs(new.v, func(c string) { tx.need(c, +1) })
	}
	named := routeNames(new.v)
	if slices.Equal(named, sc.named) {
		return
	}
	for _, n := range sc.named {
		if _, still := slices.BinarySearch(named, n); !still {
			tx.unname(n)
		}
	}
	for _, n := range named {
		if _, was := slices.BinarySearch(sc.named, n); !was {
			tx.name(n)
		}
	}
	sc.named = named
}

// name counts the route configuration n as named by the outbound
// listener; unname as no longer named.
func (tx *tx) name(n string) {
	sc := tx.s.sc
	if r := sc.routes[n]; r != nil {
		routeRefs(r.v, func(c string) { tx.need(c, +1) })
	} else {
		sc.missingRoutes++
	}
}

func (tx *tx) unname(n string) {
	sc := tx.s.sc
	if r := sc.routes[n]; r != nil {
		routeRefs(r.v, func(c string) { tx.need(c, -1) })
	} else {
		sc.missingRoutes--
	}
}

var routeCodec = &codec[*RouteConfig]{
	typeURL: TypeRouteConfiguration, kind: "route_configuration", nameField: "name", dup: "duplicate route configuration name in the response",
	decode: func(r *anypb.Any) (string, *RouteConfig, error) {
		m := new(routev3.RouteConfiguration)
		if err := unpack(r, TypeRouteConfiguration, m); err != nil {
			return "", nil, err
		}
		rc, err := decodeRouteConfig(m)
		return m.GetName(), rc, err
	},
	byParts: routeConfigParts,
}

func (tx *tx) applyRoutes(resources []*anypb.Any) []error {
	sc := tx.s.sc
	changes, errs := decodeResponse(routeCodec, sc.routes, resources, false)
	if len(errs) > 0 {
		return errs
	}
	if sc.routes == nil {
		own(tx, ownRoutes, &sc.routes)
	}
	tx.routesChanged(changes)
	return nil
}

// routesChanged applies changes to the route configurations and follows
// them in the indexes.
func (tx *tx) routesChanged(changes []change[*RouteConfig]) {
	if len(changes) == 0 {
		return
	}
	sc := tx.s.sc
	routes := own(tx, ownRoutes, &sc.routes)
	for _, ch := range changes {
		_, named := slices.BinarySearch(sc.named, ch.name)
		refs := func(rc *RouteConfig, d int32) func(int32) {
			return func(i int32) {
				for _, r := range rc.VirtualHosts[i].Routes {
					tx.need(r.Cluster, d)
				}
			}
		}
		// A route configuration replaced changes the references of the
		// virtual hosts that changed; one added or removed, all of them.
		diffed := named && ch.old != nil && ch.new != nil &&
			changedParts(ch.old.parts, ch.new.parts, len(ch.old.v.VirtualHosts), len(ch.new.v.VirtualHosts), refs(ch.old.v, -1), refs(ch.new.v, +1))
		if named && !diffed {
			tx.unname(ch.name)
		}
		if ch.new == nil {
			delete(routes, ch.name)
		} else {
			routes[ch.name] = ch.new
		}
		if named && !diffed {
			tx.name(ch.name)
		}
		if named {
			tx.viewChanged = true
		}
	}
}

// outboundRefs calls need with every cluster the outbound listener's
// tcp_proxies and inline routes name; routeNames are the route
// configurations its HTTP chains name over RDS, sorted.
func outboundRefs(l *OutboundListener, need func(string)) {
	for _, ch := range l.Chains {
		chainRefs(ch, need)
	}
	need(l.Default.TCP.Cluster)
}

// chainRefs calls need with every cluster one outbound chain names
// itself: its tcp_proxy's, or those of the route configuration it
// carries inline (a chain that names an RDS route configuration refers
// to it by name, followed apart).
func chainRefs(ch OutboundChain, need func(string)) {
	switch {
	case ch.TCP != nil:
		need(ch.TCP.Cluster)
	case ch.HTTP != nil && ch.HTTP.Routes != nil:
		routeRefs(ch.HTTP.Routes, need)
	}
}

func routeNames(l *OutboundListener) []string {
	var names []string
	for _, ch := range l.Chains {
		if ch.HTTP != nil && ch.HTTP.Routes == nil {
			names = append(names, ch.HTTP.RouteConfigName)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// inboundRefs calls need with every cluster the inbound listener names.
func inboundRefs(l *InboundListener, need func(string)) {
	for _, ch := range l.Chains {
		if ch.TCP != nil {
			need(ch.TCP.Cluster)
		} else {
			routeRefs(ch.HTTP.Routes, need)
		}
	}
}

// routeRefs calls need with every cluster a route configuration names.
func routeRefs(rc *RouteConfig, need func(string)) {
	for _, vh := range rc.VirtualHosts {
		for _, r := range vh.Routes {
			need(r.Cluster)
		}
	}
}

// updateNames follows the clusters' changes in the DNS name table: a host
// given two VIPs, or a VIP given two hosts, is refused with the problems
// indexNames reports for the whole set of clusters.
func (tx *tx) updateNames(changes []change[Cluster]) error {
	sc := tx.s.sc
	if sc.hostVIP == nil {
		own(tx, ownHostVIP, &sc.hostVIP)
		own(tx, ownVIPHost, &sc.vipHost)
		tx.viewChanged = true
	}
	meta := func(e *entry[Cluster]) *ServiceMeta {
		if e == nil {
			return nil
		}
		return e.v.Service
	}
	same := func(a, b *ServiceMeta) bool {
		return a == b || (a != nil && b != nil && a.Host == b.Host && a.VIP == b.VIP)
	}
	for _, ch := range changes {
		if m := meta(ch.old); m != nil && !same(m, meta(ch.new)) {
			refs := own(tx, ownHostRefs, &sc.hostRefs)
			if refs[m.Host]--; refs[m.Host] == 0 {
				delete(refs, m.Host)
				delete(own(tx, ownHostVIP, &sc.hostVIP), m.Host)
				delete(own(tx, ownVIPHost, &sc.vipHost), m.VIP)
			}
			tx.viewChanged = true
		}
	}
	for _, ch := range changes {
		m := meta(ch.new)
		if m == nil || same(m, meta(ch.old)) {
			continue
		}
		if vip, ok := sc.hostVIP[m.Host]; ok && vip != m.VIP {
			return tx.nameConflict()
		}
		if host, ok := sc.vipHost[m.VIP]; ok && host != m.Host {
			return tx.nameConflict()
		}
		own(tx, ownHostRefs, &sc.hostRefs)[m.Host]++
		own(tx, ownHostVIP, &sc.hostVIP)[m.Host] = m.VIP
		own(tx, ownVIPHost, &sc.vipHost)[m.VIP] = m.Host
		tx.viewChanged = true
	}
	return nil
}

// nameConflict is the error for the whole set of clusters, whose name
// table has a conflict: every problem, in the order of the cluster
// names, as a NACK reports them.
func (tx *tx) nameConflict() error {
	all := make(map[string]Cluster, len(tx.s.clusters))
	for name, e := range tx.s.clusters {
		all[name] = e.v
	}
	if err := (&Sidecar{}).indexNames(all); err != nil {
		return err
	}
	// Not reached: the table changed by pairs with no conflict.
	return fmt.Errorf("the DNS name table of the clusters is inconsistent")
}

// sidecarView is Config.Sidecar for s: the listeners, the route
// configurations the outbound listener names, and the name table.
func (s *state) sidecarView() *Sidecar {
	sc := s.sc
	if sc.outbound == nil {
		return nil
	}
	routes := make(map[string]*RouteConfig, len(sc.named))
	for _, n := range sc.named {
		if r := sc.routes[n]; r != nil {
			routes[n] = r.v
		}
	}
	return &Sidecar{
		Outbound: sc.outbound.v,
		Inbound:  sc.inbound.v,
		Routes:   routes,
		hostVIP:  sc.hostVIP,
		vipHost:  sc.vipHost,
	}
}

// incomplete is the error for a state that is not consistent: what is
// missing, at most ten things, sorted.
func (s *state) incomplete() error {
	missing := s.missing()
	if len(missing) == 0 {
		return fmt.Errorf("%w: the indexes of the accepted resources disagree with them", ErrIncomplete)
	}
	return fmt.Errorf("%w: %s", ErrIncomplete, strings.Join(missing, "; "))
}

// missing lists what keeps s from being consistent, at most ten things,
// sorted; none when it is. It visits every resource: the client, which
// only needs to know whether a state is complete, never calls it.
func (s *state) missing() []string {
	if s.clusters == nil || (s.sc == nil && s.listeners == nil) || (s.sc != nil && s.sc.outbound == nil) {
		return []string{"no listeners or clusters received yet"}
	}
	var missing []string
	note := func(format string, args ...any) {
		if len(missing) < 10 {
			missing = append(missing, fmt.Sprintf(format, args...))
		}
	}
	needCluster := func(owner, name string) {
		if _, ok := s.clusters[name]; !ok {
			note("%s names cluster %q, which is not there", owner, name)
		}
	}
	if s.sc == nil {
		for _, l := range s.listenerList {
			for _, ch := range l.Chains {
				needCluster(fmt.Sprintf("listener %q", l.Name), ch.Cluster)
			}
		}
	} else {
		sc := s.sc
		outbound := `listener "` + OutboundListenerName + `"`
		outboundRefs(sc.outbound.v, func(c string) { needCluster(outbound, c) })
		for _, name := range sc.named {
			if rc, ok := sc.routes[name]; ok {
				owner := fmt.Sprintf("route configuration %q", name)
				routeRefs(rc.v, func(c string) { needCluster(owner, c) })
			} else {
				note("listener %q names route configuration %q, which is not there", OutboundListenerName, name)
			}
		}
		inboundRefs(sc.inbound.v, func(c string) { needCluster(`listener "`+InboundListenerName+`"`, c) })
		if s.secret == nil {
			note("the TLS contexts name secret %q, which is not there", RootCASecretName)
		}
	}
	for name, c := range s.clusters {
		if c.v.Type == EDS {
			if _, ok := s.assignments[c.v.ServiceName]; !ok {
				note("cluster %q has no ClusterLoadAssignment %q", name, c.v.ServiceName)
			}
		}
	}
	slices.Sort(missing)
	return missing
}
