package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"
)

// SelfSource is the federator's own X.509 SVID, issued in process by its
// Authority (no CSR round trip) and renewed at half-life or as soon as the
// signing key changes. It is an x509svid.Source for go-spiffe's tlsconfig.
type SelfSource struct {
	a     *Authority
	id    spiffeid.ID
	clock clock.Clock

	// mu guards svid.
	mu   sync.RWMutex
	svid *x509svid.SVID
}

var _ x509svid.Source = (*SelfSource)(nil)

// NewSelfSource issues the first SVID for id; Run keeps it fresh.
func NewSelfSource(a *Authority, id spiffeid.ID, clk clock.Clock) (*SelfSource, error) {
	if clk == nil {
		clk = clock.RealClock{}
	}
	s := &SelfSource{a: a, id: id, clock: clk}
	if err := s.renew(); err != nil {
		return nil, err
	}
	return s, nil
}

// GetX509SVID implements x509svid.Source.
func (s *SelfSource) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.svid, nil
}

func (s *SelfSource) renew() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	chain, err := s.a.issue(key.Public(), s.id, s.a.defTTL)
	if err != nil {
		return fmt.Errorf("issue own SVID %s: %w", s.id, err)
	}
	s.mu.Lock()
	s.svid = &x509svid.SVID{ID: s.id, Certificates: chain, PrivateKey: key}
	s.mu.Unlock()
	return nil
}

// Run renews the SVID at half its lifetime, and at once when the
// Authority's signing key changes, until ctx ends.
func (s *SelfSource) Run(ctx context.Context) error {
	changed, cancel := s.a.Subscribe()
	defer cancel()
	for {
		svid, _ := s.GetX509SVID()
		leaf := svid.Certificates[0]
		wait := leaf.NotAfter.Sub(leaf.NotBefore)/2 - s.clock.Since(leaf.NotBefore)
		timer := s.clock.NewTimer(max(wait, time.Second))
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-changed:
		case <-timer.C():
		}
		timer.Stop()
		if err := s.renew(); err != nil {
			// The Authority signs in memory; failing here means the CA
			// itself is broken, which New would have refused.
			return err
		}
	}
}
