package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/testlog"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
)

var (
	testTD      = spiffeid.RequireTrustDomainFromString("cluster-a.mesh")
	federatorID = spiffeid.RequireFromPath(testTD, "/ns/isthmus-system/sa/isthmus-federator")
	webID       = spiffeid.RequireFromPath(testTD, "/ns/demo/sa/web")
)

// testSigner stands in for pkg/ca: ECDSA P-256 roots that sign leaves whose
// only URI SAN is the SPIFFE ID.
type testSigner struct {
	td         spiffeid.TrustDomain
	defaultTTL time.Duration
	now        func() time.Time

	// mu guards the fields below.
	mu       sync.Mutex
	rootKey  *ecdsa.PrivateKey
	rootCert *x509.Certificate
	bundle   []*x509.Certificate
	err      error // returned by Sign when set
}

var _ ca.Signer = (*testSigner)(nil)

func newTestSigner(tb testing.TB, now func() time.Time) *testSigner {
	tb.Helper()
	s := &testSigner{td: testTD, defaultTTL: time.Hour, now: now}
	s.rootKey, s.rootCert = newRoot(tb, "root 1", now(), 365*24*time.Hour)
	s.bundle = []*x509.Certificate{s.rootCert}
	return s
}

func newRoot(tb testing.TB, name string, now time.Time, life time.Duration) (*ecdsa.PrivateKey, *x509.Certificate) {
	tb.Helper()
	key := newKey(tb)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(tb),
		Subject:               pkix.Name{Organization: []string{"isthmus test"}, CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(life),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{testTD.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(tb, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(tb, err)
	return key, cert
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(tb, err)
	return k
}

func serial(tb testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	require.NoError(tb, err)
	return n
}

// issueLeaf signs an SVID leaf for id and pub with parent.
func issueLeaf(parent *x509.Certificate, parentKey crypto.Signer, pub crypto.PublicKey, id spiffeid.ID, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          n,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func (s *testSigner) Sign(_ context.Context, csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	if ttl == 0 {
		ttl = s.defaultTTL
	}
	notBefore := s.now().Add(-time.Minute)
	leaf, err := issueLeaf(s.rootCert, s.rootKey, csr.PublicKey, id, notBefore, notBefore.Add(ttl))
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

// rotateRoot makes a new root sign from now on, keeping the old one in the
// bundle, as pkg/ca does during a root rotation.
func (s *testSigner) rotateRoot(tb testing.TB) *x509.Certificate {
	key, cert := newRoot(tb, "root 2", s.now(), 365*24*time.Hour)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rootKey, s.rootCert = key, cert
	s.bundle = append(s.bundle, cert)
	return cert
}

func (s *testSigner) rootsPEM() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []byte
	for _, c := range s.bundle {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

func (s *testSigner) issueSVID(tb testing.TB, id spiffeid.ID) *x509svid.SVID {
	tb.Helper()
	key := newKey(tb)
	s.mu.Lock()
	leaf, err := issueLeaf(s.rootCert, s.rootKey, key.Public(), id, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	s.mu.Unlock()
	require.NoError(tb, err)
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}
}

// testAuth accepts tokens "tok:<ns>:<sa>[#n]" and records what it saw.
// Blocking makes it wait for the request to be cancelled.
type testAuth struct {
	// mu guards the fields below.
	mu       sync.Mutex
	seen     []string
	blocking bool
}

func (a *testAuth) Authenticate(ctx context.Context, token string) (caserver.Caller, error) {
	a.mu.Lock()
	a.seen = append(a.seen, token)
	blocking := a.blocking
	a.mu.Unlock()
	if blocking {
		<-ctx.Done()
		return caserver.Caller{}, ctx.Err()
	}
	// "#..." tells apart tokens of the same ServiceAccount.
	token, _, _ = strings.Cut(token, "#")
	if rest, ok := strings.CutPrefix(token, "tok:"); ok {
		if ns, sa, ok := strings.Cut(rest, ":"); ok {
			return caserver.Caller{Namespace: ns, ServiceAccount: sa}, nil
		}
	}
	return caserver.Caller{}, fmt.Errorf("%w: token not authenticated", caserver.ErrUnauthenticated)
}

func (a *testAuth) tokens() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.seen...)
}

func (a *testAuth) setBlocking(b bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.blocking = b
}

// testCA is the federator's CA service on 127.0.0.1:0 over real TLS.
type testCA struct {
	signer *testSigner
	auth   *testAuth
	addr   string
}

// startTestCA serves signer's CA. tamper, if set, rewrites every
// cert_chain the real service returns, to play a misbehaving CA.
func startTestCA(tb testing.TB, signer *testSigner, tamper func([]string) []string) *testCA {
	tb.Helper()
	c := serveCA(tb, signer, signer.issueSVID(tb, federatorID), signer.now, tamper)
	c.signer = signer
	return c
}

// serveCA serves the certificate service for any ca.Signer over TLS with
// the given serving SVID, as the federator does.
func serveCA(tb testing.TB, signer ca.Signer, serving *x509svid.SVID, now func() time.Time, tamper func([]string) []string) *testCA {
	tb.Helper()
	c := &testCA{auth: &testAuth{}}
	g := grpc.NewServer(caserver.ServerOptions(serving)...)
	srv := caserver.New(signer, c.auth, caserver.Options{Logger: testLogger(tb), Now: now})
	if tamper != nil {
		pb.RegisterIstioCertificateServiceServer(g, &tamperingCA{inner: srv, tamper: tamper})
	} else {
		srv.Register(g)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(tb, err)
	c.addr = lis.Addr().String()
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = g.Serve(lis)
	}()
	tb.Cleanup(func() {
		g.Stop()
		<-served
	})
	return c
}

type tamperingCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	inner  *caserver.Server
	tamper func([]string) []string
}

func (t *tamperingCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	resp, err := t.inner.CreateCertificate(ctx, req)
	if err != nil {
		return nil, err
	}
	return &pb.IstioCertificateResponse{CertChain: t.tamper(resp.GetCertChain())}, nil
}

// config is a valid Config for webID against c, with a TokenSource. Its
// random source always returns the middle of the range, so renewals come
// at exactly half-life and retries at exactly 1 s, 2 s, 4 s, ...;
// TestRetriesAreJittered covers the jitter.
func (c *testCA) config(tb testing.TB, clk Clock) Config {
	return Config{
		random:         func() float64 { return 0.5 },
		CAAddress:      c.addr,
		CAID:           federatorID,
		RootsPEM:       c.signer.rootsPEM(),
		TrustDomain:    testTD,
		Namespace:      "demo",
		ServiceAccount: "web",
		TokenSource:    func(context.Context) (string, error) { return "tok:demo:web", nil },
		Clock:          clk,
		Logger:         testLogger(tb),
	}
}

// testLogger writes to t.Logf, and stops when the test is over.
func testLogger(tb testing.TB) *slog.Logger { return testlog.New(tb) }

// fakeClock only moves when told to. It records every timer asked for, so
// a test can wait until the code under test is waiting.
type fakeClock struct {
	created chan time.Duration

	// mu guards now and timers.
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	clk *fakeClock
	c   chan time.Time
	at  time.Time
}

var _ Clock = (*fakeClock)(nil)

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Now(), created: make(chan time.Duration, 1000)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{clk: c, c: make(chan time.Time, 1), at: c.now.Add(d)}
	if d <= 0 {
		t.c <- c.now
	} else {
		c.timers = append(c.timers, t)
	}
	c.created <- d
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Stop() bool {
	t.clk.mu.Lock()
	defer t.clk.mu.Unlock()
	for i, p := range t.clk.timers {
		if p == t {
			t.clk.timers = append(t.clk.timers[:i], t.clk.timers[i+1:]...)
			return true
		}
	}
	return false
}

// Advance moves time and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	pending := c.timers[:0]
	for _, t := range c.timers {
		if t.at.After(c.now) {
			pending = append(pending, t)
			continue
		}
		t.c <- c.now
	}
	c.timers = pending
}

// nextTimer waits until the code under test asks for a timer and returns
// its duration.
func (c *fakeClock) nextTimer(tb testing.TB) time.Duration {
	tb.Helper()
	select {
	case d := <-c.created:
		return d
	case <-time.After(10 * time.Second):
		tb.Fatal("no timer was set")
		return 0
	}
}

// newSource is New, bounded, closed at the end of the test.
func newSource(tb testing.TB, cfg Config) *Source {
	tb.Helper()
	ctx, cancel := context.WithTimeout(tb.Context(), 10*time.Second)
	defer cancel()
	s, err := New(ctx, cfg)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = s.Close() })
	return s
}

func waitUpdated(tb testing.TB, s *Source) {
	tb.Helper()
	select {
	case <-s.Updated():
	case <-time.After(10 * time.Second):
		tb.Fatal("no update")
	}
}

var errSignerDown = errors.New("signer is down")

var randReader = rand.Reader

func staticToken(tok string) TokenSource {
	return func(context.Context) (string, error) { return tok, nil }
}
