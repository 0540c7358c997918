package caserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// testSigner stands in for pkg/ca: an ECDSA P-256 root that signs leaves
// whose only URI SAN is the SPIFFE ID.
type testSigner struct {
	td         spiffeid.TrustDomain
	defaultTTL time.Duration
	maxTTL     time.Duration

	// mu guards the fields below.
	mu       sync.Mutex
	rootKey  *ecdsa.PrivateKey
	rootCert *x509.Certificate
	bundle   []*x509.Certificate
	err      error // returned by Sign when set
	badChain bool  // sign with impostorKey, whose root is in no bundle

	impostorKey  *ecdsa.PrivateKey
	impostorCert *x509.Certificate
}

var _ ca.Signer = (*testSigner)(nil)

func newTestSigner(tb testing.TB, td spiffeid.TrustDomain) *testSigner {
	tb.Helper()
	s := &testSigner{td: td, defaultTTL: time.Hour, maxTTL: 24 * time.Hour}
	key, cert := newTestRoot(tb, td)
	s.rootKey, s.rootCert, s.bundle = key, cert, []*x509.Certificate{cert}
	s.impostorKey, s.impostorCert = newTestRoot(tb, td)
	return s
}

func newTestRoot(tb testing.TB, td spiffeid.TrustDomain) (*ecdsa.PrivateKey, *x509.Certificate) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(tb, err)
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(tb),
		Subject:               pkix.Name{Organization: []string{"isthmus test"}, CommonName: td.Name() + " root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(tb, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(tb, err)
	return key, cert
}

func randomSerial(tb testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	require.NoError(tb, err)
	return n
}

func (s *testSigner) Sign(_ context.Context, csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	if len(csr.URIs) > 1 || (len(csr.URIs) == 1 && csr.URIs[0].String() != id.String()) {
		return nil, errors.New("CSR asks for another identity")
	}
	switch {
	case ttl == 0:
		ttl = s.defaultTTL
	case ttl < time.Minute:
		ttl = time.Minute
	case ttl > s.maxTTL:
		ttl = s.maxTTL
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	// Backdated for clock skew, as real CAs do; the lifetime stays ttl.
	notBefore := time.Now().Add(-min(time.Minute, ttl/4))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(ttl),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	parent, key := s.rootCert, s.rootKey
	if s.badChain {
		key, parent = s.impostorKey, s.impostorCert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, csr.PublicKey, key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf}, nil
}

func (s *testSigner) TrustDomain() spiffeid.TrustDomain { return s.td }

func (s *testSigner) Bundle() *x509bundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return x509bundle.FromX509Authorities(s.td, s.bundle)
}

func (s *testSigner) setErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

func (s *testSigner) setBadChain(bad bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.badChain = bad
}

// rotateRoot makes a new root sign from now on, keeping the old one in the
// bundle, as pkg/ca does during a root rotation.
func (s *testSigner) rotateRoot(tb testing.TB) *x509.Certificate {
	key, cert := newTestRoot(tb, s.td)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rootKey, s.rootCert = key, cert
	s.bundle = append(s.bundle, cert)
	return cert
}

// issueSVID issues an SVID for id with a fresh key, as the federator's own
// serving certificate would be.
func (s *testSigner) issueSVID(tb testing.TB, id spiffeid.ID) *x509svid.SVID {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(tb, err)
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	require.NoError(tb, err)
	csr, err := x509.ParseCertificateRequest(csrDER)
	require.NoError(tb, err)
	chain, err := s.Sign(tb.Context(), csr, id, 0)
	require.NoError(tb, err)
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}
