package authz

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"hash/fnv"
	"iter"
	"maps"
	"slices"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"
	securityv1beta1 "istio.io/api/security/v1beta1"

	"github.com/isthmus-mesh/isthmus/internal/notify"
)

// DefaultRootNamespace is Istio's root namespace: a policy there applies
// to the workloads of every namespace.
const DefaultRootNamespace = "istio-system"

// Policy is one AuthorizationPolicy as the cluster holds it.
type Policy struct {
	Namespace, Name string
	// Spec is the policy's spec; never modified once given to a Store.
	Spec *securityv1beta1.AuthorizationPolicy
}

// Ref is "namespace/name".
func (p Policy) Ref() string { return p.Namespace + "/" + p.Name }

// Set is the policies that apply to one or more pods, in namespace/name
// order. Immutable.
type Set struct {
	// Key is a hash of the policies' names and specs: two pods with the
	// same Key have the same policies.
	Key      string
	Policies []Policy
	// MTLS is what the pods' PeerAuthentications say; the zero value
	// (Strict everywhere) when none does more.
	MTLS MTLS
}

// Store keeps the cluster's AuthorizationPolicies and PeerAuthentications
// and the labels of its pods, and which AuthorizationPolicies select each
// pod (Istio's rules: a policy applies to the pods of its namespace its
// selector's matchLabels match, every pod of the namespace without a
// selector; one in the root namespace to the pods of every namespace)
// and what mutual TLS its PeerAuthentications say (mtlsOf). Safe for concurrent use;
// subscribers are told, coalesced, when anything changed, and then read a
// Snapshot. The zero value is not usable; use NewStore.
type Store struct {
	root string
	hub  notify.Hub

	// mu guards every field below.
	mu       sync.Mutex
	policies map[string]map[string]*policy // by namespace, by name
	peers    map[string]map[string]*peerPolicy
	pods     map[string]map[string]*pod // by namespace, by name
	// sets are the sets some pod has, by key, each with how many pods.
	sets   map[string]*Set
	counts map[string]int
	synced bool
	// snap is the last snapshot made; nil when something changed since.
	snap *Snapshot
	// seq counts the changes, for Snapshot.Version.
	seq uint64
}

type policy struct {
	Policy
	// hash is the spec's deterministic encoding's hash.
	hash [sha256.Size]byte
}

type pod struct {
	// ref is "namespace/name", made once.
	ref    string
	labels map[string]string
	// set is the key of its set; empty when no policy selects it.
	set string
}

// NewStore returns an empty, unsynced store whose root namespace is root
// (DefaultRootNamespace when empty).
func NewStore(root string) *Store {
	return &Store{
		root:     cmp.Or(root, DefaultRootNamespace),
		policies: map[string]map[string]*policy{},
		peers:    map[string]map[string]*peerPolicy{},
		pods:     map[string]map[string]*pod{},
		sets:     map[string]*Set{},
		counts:   map[string]int{},
	}
}

// RootNamespace is the namespace whose policies apply everywhere.
func (s *Store) RootNamespace() string { return s.root }

// Subscribe returns a channel signalled (coalesced) after every change,
// with a pending signal to start with, and a function that ends the
// subscription.
func (s *Store) Subscribe() (<-chan struct{}, func()) { return s.hub.Subscribe(true) }

// SetPolicy adds p or replaces the policy of its name.
func (s *Store) SetPolicy(p Policy) {
	np := &policy{Policy: p, hash: specHash(p.Spec, nil)}
	s.mu.Lock()
	defer s.mu.Unlock()
	if put(s.policies, p.Namespace, p.Name, np) {
		s.policyChanged(p.Namespace)
		// Which namespaces policies cover may have changed too.
		s.changed()
	}
}

// DeletePolicy forgets the policy namespace/name.
func (s *Store) DeletePolicy(namespace, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if remove(s.policies, namespace, name) {
		s.policyChanged(namespace)
		s.changed()
	}
}

// specHash is the hash of spec's deterministic encoding followed by
// extra. A message that does not encode cannot be told apart from the
// next one: it hashes its error, never equal to a good one's.
func specHash(spec proto.Message, extra []byte) [sha256.Size]byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(spec)
	if err != nil {
		b = []byte(err.Error())
	}
	return sha256.Sum256(append(b, extra...))
}

// hashed is a policy that knows the hash of what it says.
type hashed interface{ contentHash() [sha256.Size]byte }

func (p *policy) contentHash() [sha256.Size]byte     { return p.hash }
func (p *peerPolicy) contentHash() [sha256.Size]byte { return p.hash }

// put makes v the policy namespace/name of byNS, reporting false when
// the one there already says the same.
func put[T hashed](byNS map[string]map[string]T, namespace, name string, v T) bool {
	byName := byNS[namespace]
	if old, ok := byName[name]; ok && old.contentHash() == v.contentHash() {
		return false
	}
	if byName == nil {
		byName = map[string]T{}
		byNS[namespace] = byName
	}
	byName[name] = v
	return true
}

// remove deletes the policy namespace/name of byNS, reporting false when
// there was none.
func remove[T any](byNS map[string]map[string]T, namespace, name string) bool {
	byName := byNS[namespace]
	if _, ok := byName[name]; !ok {
		return false
	}
	delete(byName, name)
	if len(byName) == 0 {
		delete(byNS, namespace)
	}
	return true
}

// SetPod records the labels of the pod namespace/name. The store keeps
// labels as given: the caller must not modify them afterwards.
func (s *Store) SetPod(namespace, name string, labels map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	byName := s.pods[namespace]
	p := byName[name]
	if p != nil && maps.Equal(p.labels, labels) {
		return
	}
	if byName == nil {
		byName = map[string]*pod{}
		s.pods[namespace] = byName
	}
	if p == nil {
		p = &pod{ref: namespace + "/" + name}
		byName[name] = p
		if s.mayApply(namespace) {
			// Known now: a snapshot says so (Snapshot.Unknown).
			defer s.changed()
		}
	}
	p.labels = labels
	s.redo(namespace, p)
}

// mayApply reports whether some policy may select pods of namespace:
// one of the namespace's or of the root namespace.
func (s *Store) mayApply(namespace string) bool {
	return len(s.policies[namespace]) > 0 || len(s.policies[s.root]) > 0
}

// DeletePod forgets the pod namespace/name.
func (s *Store) DeletePod(namespace, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	byName := s.pods[namespace]
	p := byName[name]
	if p == nil {
		return
	}
	s.assign(p, "", nil, MTLS{})
	delete(byName, name)
	if len(byName) == 0 {
		delete(s.pods, namespace)
	}
	if s.mayApply(namespace) {
		s.changed()
	}
}

// SetSynced says that the store holds every policy and pod of the
// cluster: until then, Snapshot.Synced is false and nobody should
// enforce what it says (a policy not read yet would be missing).
func (s *Store) SetSynced() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.synced {
		s.synced = true
		s.changed()
	}
}

// policyChanged recomputes the sets of the pods a policy of namespace
// may select.
func (s *Store) policyChanged(namespace string) {
	if namespace == s.root {
		for ns, byName := range s.pods {
			for _, p := range byName {
				s.redo(ns, p)
			}
		}
		return
	}
	for _, p := range s.pods[namespace] {
		s.redo(namespace, p)
	}
}

// redo recomputes which policies select p, a pod of namespace, and its
// mutual TLS.
func (s *Store) redo(namespace string, p *pod) {
	mtls := s.mtlsOf(namespace, p.labels)
	var sel []*policy
	for _, ns := range []string{s.root, namespace} {
		for _, pol := range s.policies[ns] {
			if selects(pol.Spec, p.labels) {
				sel = append(sel, pol)
			}
		}
		if namespace == s.root {
			break
		}
	}
	if len(sel) == 0 && mtls == (MTLS{}) {
		s.assign(p, "", nil, mtls)
		return
	}
	slices.SortFunc(sel, func(a, b *policy) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	h := sha256.New()
	for _, pol := range sel {
		h.Write([]byte(pol.Namespace))
		h.Write([]byte{0})
		h.Write([]byte(pol.Name))
		h.Write([]byte{0})
		h.Write(pol.hash[:])
	}
	if mtls != (MTLS{}) {
		h.Write([]byte("\x00mtls\x00" + mtls.String()))
	}
	key := hex.EncodeToString(h.Sum(nil)[:8])
	s.assign(p, key, sel, mtls)
}

// assign gives p the set key (of the policies sel and mtls), keeping
// the sets and their counts.
func (s *Store) assign(p *pod, key string, sel []*policy, mtls MTLS) {
	if p.set == key {
		return
	}
	if p.set != "" {
		if s.counts[p.set]--; s.counts[p.set] == 0 {
			delete(s.counts, p.set)
			delete(s.sets, p.set)
		}
	}
	p.set = key
	if key != "" {
		if s.counts[key]++; s.counts[key] == 1 {
			set := &Set{Key: key, Policies: make([]Policy, len(sel)), MTLS: mtls}
			for i, pol := range sel {
				set.Policies[i] = pol.Policy
			}
			s.sets[key] = set
		}
	}
	s.changed()
}

func (s *Store) changed() {
	s.seq++
	s.snap = nil
	s.hub.Notify()
}

// selects reports whether spec applies to a sidecar pod with labels:
// its selector's matchLabels are all the pod's. A policy with a
// targetRef applies to gateways and waypoints, never to sidecars.
func selects(spec *securityv1beta1.AuthorizationPolicy, labels map[string]string) bool {
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return false
	}
	return selectsLabels(spec.GetSelector().GetMatchLabels(), labels)
}

// Snapshot is which policies select each pod, at one moment. Immutable.
type Snapshot struct {
	// pods maps "namespace/name" to its set's key, for the pods some
	// policy selects.
	pods map[string]string
	sets map[string]*Set
	// known are the pods of the namespaces covered: those the
	// namespace's or the root namespace's policies for sidecars may
	// select.
	known, covered map[string]bool
	root           string
	knownSum       uint64
	// peerNotes are PeerNotes'.
	peerNotes []Note
	// Version changes whenever the store changed.
	Version uint64
	// Synced is Store.SetSynced's.
	Synced bool
}

// Snapshot returns what the store holds now.
func (s *Store) Snapshot() *Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap != nil {
		return s.snap
	}
	snap := &Snapshot{pods: map[string]string{}, sets: maps.Clone(s.sets), known: map[string]bool{}, covered: map[string]bool{},
		Version: s.seq, Synced: s.synced}
	for ns, byName := range s.policies {
		for _, p := range byName {
			if p.Spec.GetTargetRef() == nil && len(p.Spec.GetTargetRefs()) == 0 {
				snap.covered[ns] = true
				break
			}
		}
	}
	for ns, byName := range s.pods {
		for _, p := range byName {
			if p.set != "" {
				snap.pods[p.ref] = p.set
			}
			if snap.covered[ns] || snap.covered[s.root] {
				snap.known[p.ref] = true
			}
		}
	}
	snap.root = s.root
	snap.peerNotes = s.peerNotes()
	h := fnv.New64a()
	for ref := range snap.known {
		h.Reset()
		h.Write([]byte(ref))
		snap.knownSum += h.Sum64()
	}
	// Which namespaces are covered decides which unknown pods let
	// nobody in: it counts too, apart from the pods.
	for ns := range snap.covered {
		h.Reset()
		h.Write([]byte{0})
		h.Write([]byte(ns))
		snap.knownSum += h.Sum64()
	}
	s.snap = snap
	return snap
}

// PeerNotes are what Isthmus reads differently from Istio in the
// PeerAuthentications, or ignores as Istio does, sorted; none for a nil
// snapshot.
func (s *Snapshot) PeerNotes() []Note {
	if s == nil {
		return nil
	}
	return s.peerNotes
}

// Covers reports whether policies for sidecars exist in some namespace.
func (s *Snapshot) Covers() bool { return s != nil && len(s.covered) > 0 }

// KnownSum is a sum of the pods Unknown says are known and of the
// namespaces policies cover: it changes when one of them comes or goes,
// so whenever Unknown's answer for some pod does.
func (s *Snapshot) KnownSum() uint64 {
	if s == nil {
		return 0
	}
	return s.knownSum
}

// Unknown reports whether the pod "namespace/name" is one the store
// has not seen in a namespace some policy may cover (its own or the
// root namespace has a policy for sidecars): its labels, so its
// policies, are unknown, and its sidecar should let nobody in until
// they are. False for a nil snapshot.
func (s *Snapshot) Unknown(namespace, name string) bool {
	if s == nil || (!s.covered[namespace] && !s.covered[s.root]) {
		return false
	}
	return !s.known[namespace+"/"+name]
}

// Pod returns the policies that select the pod "namespace/name"; false
// when none does (or s is nil).
func (s *Snapshot) Pod(ref string) (*Set, bool) {
	if s == nil {
		return nil, false
	}
	k, ok := s.pods[ref]
	if !ok {
		return nil, false
	}
	return s.sets[k], true
}

// Pods yields every pod some policy selects ("namespace/name") with its
// set, in no order.
func (s *Snapshot) Pods() iter.Seq2[string, *Set] {
	return func(yield func(string, *Set) bool) {
		if s == nil {
			return
		}
		for ref, k := range s.pods {
			if !yield(ref, s.sets[k]) {
				return
			}
		}
	}
}

// Set returns the set of key.
func (s *Snapshot) Set(key string) (*Set, bool) {
	if s == nil {
		return nil, false
	}
	set, ok := s.sets[key]
	return set, ok
}
