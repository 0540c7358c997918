// Package trust keeps the trust bundles a cluster knows: its own, from its
// CA, and one per federated peer trust domain. Bundles of different trust
// domains are never merged: a peer certificate is validated against the
// bundle of the trust domain in its own SPIFFE ID, which is what go-spiffe's
// tlsconfig does with an x509bundle.Source.
//
//	cluster CA ──► local bundle ─┬─► SDS validation contexts, workloads
//	                             ├─► federation (sent to peers)
//	                             └─► SPIFFE bundle endpoint (https_spiffe)
//	peers ──► peer bundles ──────┘
package trust

import (
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/internal/notify"
)

// DefaultRefreshHint is the refresh hint published with the local bundle:
// how often a federating party should fetch it again.
const DefaultRefreshHint = 5 * time.Minute

// Errors from Store.
var (
	// ErrLocalTrustDomain: a peer tried to set the local trust domain's
	// bundle. Only the local CA may.
	ErrLocalTrustDomain = errors.New("bundle is for the local trust domain")
	// ErrStaleBundle: the bundle's sequence number is lower than the one
	// already held.
	ErrStaleBundle = errors.New("bundle sequence number is older than the current one")
)

// Store holds one bundle per trust domain. It is an x509bundle.Source and a
// spiffebundle.Source, safe for concurrent use.
type Store struct {
	local spiffeid.TrustDomain

	// mu guards bundles.
	mu      sync.RWMutex
	bundles map[spiffeid.TrustDomain]*spiffebundle.Bundle
	hub     notify.Hub
}

var (
	_ x509bundle.Source   = (*Store)(nil)
	_ spiffebundle.Source = (*Store)(nil)
)

// NewStore returns a store for the local trust domain, with no bundles yet.
func NewStore(local spiffeid.TrustDomain) *Store {
	return &Store{local: local, bundles: map[spiffeid.TrustDomain]*spiffebundle.Bundle{}}
}

// LocalTrustDomain is the cluster's own trust domain.
func (s *Store) LocalTrustDomain() spiffeid.TrustDomain { return s.local }

// SetLocal replaces the local bundle with roots, numbered sequence.
func (s *Store) SetLocal(roots []*x509.Certificate, sequence uint64, refreshHint time.Duration) {
	b := spiffebundle.FromX509Authorities(s.local, roots)
	b.SetSequenceNumber(sequence)
	if refreshHint <= 0 {
		refreshHint = DefaultRefreshHint
	}
	b.SetRefreshHint(refreshHint)
	s.put(b)
}

// SetPeer replaces a peer trust domain's bundle. The local trust domain is
// refused, and so is a bundle older (by sequence number) than the one
// held; an empty bundle is refused too, since it would trust nothing and
// silently cut the peer off.
func (s *Store) SetPeer(b *spiffebundle.Bundle) error {
	td := b.TrustDomain()
	if td == s.local {
		return fmt.Errorf("%w %s", ErrLocalTrustDomain, td)
	}
	if len(b.X509Authorities()) == 0 {
		return fmt.Errorf("bundle for %s has no X.509 authorities", td)
	}
	b = b.Clone()
	// The check and the write happen under one lock: checked under a read
	// lock and written later, two racing calls could both pass the check
	// and leave the older bundle in place.
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.bundles[td]; ok {
		oldSeq, _ := old.SequenceNumber()
		newSeq, _ := b.SequenceNumber()
		if newSeq < oldSeq {
			return fmt.Errorf("%w: %s has %d, got %d", ErrStaleBundle, td, oldSeq, newSeq)
		}
	}
	s.putLocked(b)
	return nil
}

// DeletePeer forgets a peer trust domain's bundle.
func (s *Store) DeletePeer(td spiffeid.TrustDomain) {
	if td == s.local {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.bundles[td]; ok {
		delete(s.bundles, td)
		s.hub.Notify()
	}
}

func (s *Store) put(b *spiffebundle.Bundle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.putLocked(b)
}

// putLocked stores b and notifies subscribers if it differs from the bundle
// held. s.mu must be held for writing.
func (s *Store) putLocked(b *spiffebundle.Bundle) {
	if old, ok := s.bundles[b.TrustDomain()]; ok && old.Equal(b) {
		return
	}
	s.bundles[b.TrustDomain()] = b
	s.hub.Notify()
}

// GetBundleForTrustDomain implements spiffebundle.Source.
func (s *Store) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	b, ok := s.bundles[td]
	if !ok {
		return nil, fmt.Errorf("trust: no bundle for trust domain %q", td)
	}
	return b.Clone(), nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s *Store) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := s.GetBundleForTrustDomain(td)
	if err != nil {
		return nil, err
	}
	return b.X509Bundle(), nil
}

// TrustDomains lists the trust domains with a bundle, sorted.
func (s *Store) TrustDomains() []spiffeid.TrustDomain {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.SortedFunc(maps.Keys(s.bundles), func(a, b spiffeid.TrustDomain) int {
		return strings.Compare(a.Name(), b.Name())
	})
}

// Subscribe returns a channel signalled (coalesced) on every change, and a
// function that ends the subscription.
func (s *Store) Subscribe() (<-chan struct{}, func()) { return s.hub.Subscribe(false) }
