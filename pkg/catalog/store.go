package catalog

import (
	"maps"
	"slices"
	"sync"

	"github.com/isthmus-mesh/isthmus/internal/notify"
)

// LocalSource is the source name of the cluster's own exported services.
const LocalSource = "local"

// InClusterSource is the source name of the cluster's in-cluster
// services: every Service, exported or not, whose pods are all meshed
// (docs/sidecar-xds.md). They live in a Store of their own, never in the
// one the federation and the import writer read.
const InClusterSource = "in-cluster"

// DeclaredSource is the source name, in the in-cluster services' Store,
// of every Service of the cluster that has endpoints, headless ones and
// ones whose pods are not all meshed included: the ports each pod's
// Services declare, which its sidecar's inbound chains follow
// (docs/sidecar-xds.md, "Inbound profiles"). Nothing routes to them.
const DeclaredSource = "declared"

// Store holds the newest snapshot of each source and tells subscribers when
// any of them changes. Notifications coalesce: a subscriber that is slow
// sees one pending signal, however many changes happened, and then reads
// the current snapshots. The zero value is not usable; use NewStore.
type Store struct {
	// mu guards snaps.
	mu    sync.RWMutex
	snaps map[string]*Snapshot
	hub   notify.Hub
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{snaps: map[string]*Snapshot{}}
}

// Set makes snap the current snapshot of its source. It reports whether
// anything changed; setting a snapshot with the current version does not
// notify anyone.
func (s *Store) Set(snap *Snapshot) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.snaps[snap.Source()]; ok && old.Version() == snap.Version() {
		return false
	}
	s.snaps[snap.Source()] = snap
	s.hub.Notify()
	return true
}

// Delete forgets a source.
func (s *Store) Delete(source string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.snaps[source]; !ok {
		return
	}
	delete(s.snaps, source)
	s.hub.Notify()
}

// Get returns the current snapshot of source, or an empty snapshot of that
// source when there is none.
func (s *Store) Get(source string) *Snapshot {
	s.mu.RLock()
	snap, ok := s.snaps[source]
	s.mu.RUnlock()
	if !ok {
		return NewBuilder(source).Build()
	}
	return snap
}

// Sources returns the names of every source with a snapshot, sorted.
func (s *Store) Sources() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Sorted(maps.Keys(s.snaps))
}

// Subscribe returns a channel that receives a value after every change
// (coalesced, capacity one) and a function that ends the subscription.
// The channel starts with a pending signal so a new subscriber reads the
// current state once.
func (s *Store) Subscribe() (<-chan struct{}, func()) { return s.hub.Subscribe(true) }
