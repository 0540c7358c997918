package catalog

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
)

// entry is a service with the hash of its canonical encoding, computed once
// when the service enters a snapshot and reused by every later snapshot
// that still holds it.
type entry struct {
	svc  Service
	hash [sha256.Size]byte
}

// Snapshot is an immutable set of services from one source, with a content
// version. The zero value is not usable; an empty snapshot comes from
// NewBuilder(source).Build().
type Snapshot struct {
	source  string
	version string
	entries map[ServiceKey]*entry
	ordered []ServiceKey
}

// Source names where the services came from: LocalSource for the cluster's
// own exports, a peer's name for what that peer exported.
func (s *Snapshot) Source() string { return s.source }

// Version is a hash of the snapshot's content: equal content, equal version.
func (s *Snapshot) Version() string { return s.version }

// Len is the number of services.
func (s *Snapshot) Len() int { return len(s.ordered) }

// Get returns the service with the given key. The result shares memory with
// the snapshot and must not be modified.
func (s *Snapshot) Get(key ServiceKey) (*Service, bool) {
	e, ok := s.entries[key]
	if !ok {
		return nil, false
	}
	return &e.svc, true
}

// All yields the services ordered by namespace and name. Yielded services
// share memory with the snapshot and must not be modified.
func (s *Snapshot) All() func(yield func(*Service) bool) {
	return func(yield func(*Service) bool) {
		for _, k := range s.ordered {
			if !yield(&s.entries[k].svc) {
				return
			}
		}
	}
}

// Keys returns the service keys in order (a copy).
func (s *Snapshot) Keys() []ServiceKey { return slices.Clone(s.ordered) }

// Services returns deep copies of every service, ordered; meant for
// printing and tests rather than hot paths.
func (s *Snapshot) Services() []Service {
	out := make([]Service, 0, len(s.ordered))
	for svc := range s.All() {
		out = append(out, svc.Clone())
	}
	return out
}

// Builder makes a new snapshot from an old one plus changes. It copies the
// old snapshot's entries only when the first change arrives, and rehashes
// only the services that changed. A Builder is not safe for concurrent use.
type Builder struct {
	source  string
	base    *Snapshot
	entries map[ServiceKey]*entry // nil until the first change
	// keysChanged is set when a key was added or removed since base, so
	// Build must order the keys again rather than reuse base's order.
	keysChanged bool
}

// NewBuilder starts an empty snapshot for source.
func NewBuilder(source string) *Builder {
	return &Builder{source: source, entries: map[ServiceKey]*entry{}}
}

// Builder starts a new snapshot from this one.
func (s *Snapshot) Builder() *Builder {
	return &Builder{source: s.source, base: s}
}

func (b *Builder) mutable() map[ServiceKey]*entry {
	if b.entries == nil {
		b.entries = maps.Clone(b.base.entries)
		if b.entries == nil {
			b.entries = map[ServiceKey]*entry{}
		}
	}
	return b.entries
}

// Put adds or replaces a service. The service is copied and normalized
// (lists sorted, duplicate localities merged, empty localities dropped);
// an invalid service is refused with an error naming every problem, and
// the builder is left as it was.
func (b *Builder) Put(svc Service) error {
	if err := svc.checkCounts(); err != nil {
		return err
	}
	c := svc.Clone()
	c.normalize()
	if err := c.validate(); err != nil {
		return err
	}
	e := &entry{svc: c, hash: hashService(&c)}
	old, ok := b.current(c.Key())
	if ok && old.hash == e.hash {
		return nil
	}
	b.keysChanged = b.keysChanged || !ok
	b.mutable()[c.Key()] = e
	return nil
}

// Delete removes a service; deleting an absent key is not an error.
func (b *Builder) Delete(key ServiceKey) {
	if _, ok := b.current(key); ok {
		delete(b.mutable(), key)
		b.keysChanged = true
	}
}

// Has reports whether the builder currently holds key.
func (b *Builder) Has(key ServiceKey) bool {
	_, ok := b.current(key)
	return ok
}

func (b *Builder) current(key ServiceKey) (*entry, bool) {
	if b.entries != nil {
		e, ok := b.entries[key]
		return e, ok
	}
	e, ok := b.base.entries[key]
	return e, ok
}

// Build returns the snapshot. When nothing changed since the base snapshot,
// the base itself is returned. The builder may keep being used; later
// changes do not affect snapshots already built.
func (b *Builder) Build() *Snapshot {
	if b.entries == nil {
		return b.base
	}
	entries := b.entries
	b.entries = nil
	var ordered []ServiceKey
	if b.base != nil && !b.keysChanged {
		// Only contents changed: the order is the base's (immutable, so
		// shared).
		ordered = b.base.ordered
	} else {
		ordered = slices.SortedFunc(maps.Keys(entries), CompareKeys)
	}
	b.keysChanged = false
	h := sha256.New()
	_, _ = h.Write([]byte(b.source))
	for _, k := range ordered {
		e := entries[k]
		_, _ = h.Write(e.hash[:])
	}
	snap := &Snapshot{
		source:  b.source,
		version: hex.EncodeToString(h.Sum(nil)[:12]),
		entries: entries,
		ordered: ordered,
	}
	b.base = snap
	return snap
}

// NewSnapshot builds a snapshot from a list of services, refusing the whole
// list (and naming every bad service) if any service is invalid or two
// share a key.
func NewSnapshot(source string, services []Service) (*Snapshot, error) {
	b := NewBuilder(source)
	var errs []error
	for _, svc := range services {
		if b.Has(svc.Key()) {
			errs = append(errs, fmt.Errorf("service %s: listed twice", svc.Key()))
			continue
		}
		if err := b.Put(svc); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return b.Build(), nil
}

// hashService hashes a normalized service's canonical encoding: every
// string length-prefixed, so no two different services encode alike.
func hashService(s *Service) [sha256.Size]byte {
	buf := make([]byte, 0, 256)
	str := func(v string) {
		buf = binary.AppendUvarint(buf, uint64(len(v)))
		buf = append(buf, v...)
	}
	num := func(v int64) { buf = binary.AppendVarint(buf, v) }
	str(s.Namespace)
	str(s.Name)
	str(s.Cluster)
	num(int64(len(s.Ports)))
	for _, p := range s.Ports {
		str(p.Name)
		num(int64(p.Port))
		str(string(p.Protocol))
		str(p.AppProtocol)
		num(int64(p.TargetPort))
	}
	num(int64(len(s.Endpoints)))
	for _, e := range s.Endpoints {
		str(e.Locality.Region)
		str(e.Locality.Zone)
		str(e.Locality.Subzone)
		num(int64(e.Ready))
		num(int64(e.NotReady))
		num(int64(len(e.Addresses)))
		for _, a := range e.Addresses {
			str(a.IP)
			// Bit 0 is Ready; bit 1 says a pod name follows (so that
			// the services without one hash as they always did).
			flags := int64(0)
			if a.Ready {
				flags = 1
			}
			if a.Pod != "" {
				flags |= 2
			}
			num(flags)
			if a.Pod != "" {
				str(a.Pod)
			}
		}
	}
	for _, list := range [][]string{s.Peers, s.Identities, s.Gateways} {
		num(int64(len(list)))
		for _, v := range list {
			str(v)
		}
	}
	// Only when set, so that the versions of catalogs without it stay
	// what they were; the encoding is longer, so none can collide.
	if s.ClusterIP != "" {
		str(s.ClusterIP)
	}
	return sha256.Sum256(buf)
}
