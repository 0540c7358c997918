package trust_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

var (
	tdA = spiffeid.RequireTrustDomainFromString("a.mesh")
	tdB = spiffeid.RequireTrustDomainFromString("b.mesh")
)

func newCA(t *testing.T, td spiffeid.TrustDomain) *ca.CA {
	t.Helper()
	c, err := ca.New(t.Context(), kubefake.NewClientset(), ca.Options{TrustDomain: td, Namespace: "isthmus-system"})
	require.NoError(t, err)
	return c
}

func TestBundlesStaySeparate(t *testing.T) {
	a, b := newCA(t, tdA), newCA(t, tdB)
	s := trust.NewStore(tdA)
	updates, cancel := s.Subscribe()
	defer cancel()

	s.SetLocal(a.Bundle().X509Authorities(), 1, 0)
	<-updates
	peer := spiffebundle.FromX509Authorities(tdB, b.Bundle().X509Authorities())
	peer.SetSequenceNumber(7)
	require.NoError(t, s.SetPeer(peer))
	<-updates

	gotA, err := s.GetX509BundleForTrustDomain(tdA)
	require.NoError(t, err)
	gotB, err := s.GetX509BundleForTrustDomain(tdB)
	require.NoError(t, err)
	require.True(t, gotA.Equal(a.Bundle()))
	require.True(t, gotB.Equal(b.Bundle()))
	require.False(t, gotA.HasX509Authority(b.SigningCertificate()), "bundles are never merged")
	require.Equal(t, []spiffeid.TrustDomain{tdA, tdB}, s.TrustDomains())

	local, err := s.GetBundleForTrustDomain(tdA)
	require.NoError(t, err)
	seq, _ := local.SequenceNumber()
	hint, _ := local.RefreshHint()
	require.Equal(t, uint64(1), seq)
	require.Equal(t, trust.DefaultRefreshHint, hint)

	_, err = s.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("c.mesh"))
	require.ErrorContains(t, err, `no bundle for trust domain "c.mesh"`)

	s.DeletePeer(tdB)
	<-updates
	require.Equal(t, []spiffeid.TrustDomain{tdA}, s.TrustDomains())
}

func TestSetPeerRefusesBadBundles(t *testing.T) {
	a, b := newCA(t, tdA), newCA(t, tdB)
	s := trust.NewStore(tdA)
	s.SetLocal(a.Bundle().X509Authorities(), 1, 0)

	// A peer may not speak for the local trust domain.
	err := s.SetPeer(spiffebundle.FromX509Authorities(tdA, b.Bundle().X509Authorities()))
	require.ErrorIs(t, err, trust.ErrLocalTrustDomain)
	got, _ := s.GetX509BundleForTrustDomain(tdA)
	require.True(t, got.Equal(a.Bundle()), "local bundle untouched")

	// An empty bundle would silently cut the peer off.
	require.ErrorContains(t, s.SetPeer(spiffebundle.New(tdB)), "no X.509 authorities")

	// Sequence numbers only move forward.
	newer := spiffebundle.FromX509Authorities(tdB, b.Bundle().X509Authorities())
	newer.SetSequenceNumber(5)
	require.NoError(t, s.SetPeer(newer))
	older := spiffebundle.FromX509Authorities(tdB, a.Bundle().X509Authorities())
	older.SetSequenceNumber(4)
	require.ErrorIs(t, s.SetPeer(older), trust.ErrStaleBundle)
	gotB, _ := s.GetX509BundleForTrustDomain(tdB)
	require.True(t, gotB.Equal(b.Bundle()))
}

// Concurrent SetPeer calls race to replace one peer's bundle; whatever the
// interleaving, the newest sequence number must be the one left standing,
// never an older bundle written after the check that should have refused it.
func TestSetPeerConcurrentKeepsHighestSequence(t *testing.T) {
	b := newCA(t, tdB)
	roots := b.Bundle().X509Authorities()
	const writers = 8
	bundles := make([]*spiffebundle.Bundle, writers)
	for i := range bundles {
		bundles[i] = spiffebundle.FromX509Authorities(tdB, roots)
		bundles[i].SetSequenceNumber(uint64(i + 1))
	}
	for round := range 3000 {
		s := trust.NewStore(tdA)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for _, pb := range bundles {
			wg.Go(func() {
				<-start
				_ = s.SetPeer(pb) // refusals of stale bundles are expected
			})
		}
		close(start)
		wg.Wait()
		got, err := s.GetBundleForTrustDomain(tdB)
		require.NoError(t, err)
		seq, _ := got.SequenceNumber()
		require.Equal(t, uint64(writers), seq, "round %d: an older bundle overwrote a newer one", round)
	}
}

// A SPIFFE bundle endpoint client (what a SPIRE server uses to federate)
// fetches the local bundle over https_spiffe, authenticating the endpoint
// with the bundle it already has.
func TestBundleEndpointServesHTTPSSPIFFE(t *testing.T) {
	a := newCA(t, tdA)
	s := trust.NewStore(tdA)
	s.SetLocal(a.Bundle().X509Authorities(), 3, time.Minute)
	fedID := spiffeid.RequireFromString("spiffe://a.mesh/ns/isthmus-system/sa/isthmus-federator")
	self, err := ca.NewSelfSource(a.Authority, fedID, nil)
	require.NoError(t, err)

	srv, err := trust.NewBundleEndpoint("127.0.0.1:0", s, self)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { _ = srv.Close() })
	url := "https://" + ln.Addr().String()

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got, err := federation.FetchBundle(ctx, tdA, url, federation.WithSPIFFEAuth(a.Bundle(), fedID))
	require.NoError(t, err)
	require.True(t, got.X509Bundle().Equal(a.Bundle()))
	seq, ok := got.SequenceNumber()
	require.True(t, ok)
	require.Equal(t, uint64(3), seq)
	hint, ok := got.RefreshHint()
	require.True(t, ok)
	require.Equal(t, time.Minute, hint)

	// Expecting another endpoint identity fails the TLS authentication.
	_, err = federation.FetchBundle(ctx, tdA, url, federation.WithSPIFFEAuth(a.Bundle(), spiffeid.RequireFromString("spiffe://a.mesh/somebody-else")))
	require.Error(t, err)
	// So does authenticating with another trust domain's bundle.
	b := newCA(t, tdB)
	_, err = federation.FetchBundle(ctx, tdA, url, federation.WithSPIFFEAuth(b.Bundle(), fedID))
	require.Error(t, err)
}
