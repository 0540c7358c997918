package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	cryptorand "crypto/rand"
	"crypto/x509"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

const (
	// Retries after a failed request: 1 s, 2 s, 4 s, ... at most 1 min,
	// each ±retryJitter (but never over maxBackoff), so that the workloads
	// of a cluster that all lost the CA together do not all come back at
	// the same instant, again and again.
	initialBackoff = time.Second
	maxBackoff     = time.Minute
	retryJitter    = 0.2
	// renewJitter spreads renewals over ±10 % of the half-life, so that
	// workloads started together do not renew together.
	renewJitter = 0.1
	// callTimeout bounds one CreateCertificate call.
	callTimeout = 30 * time.Second
)

// Source holds a workload's X.509 SVID, issued by the cluster CA and
// renewed in the background, and the trust bundle of its trust domain.
// It is safe for concurrent use.
type Source struct {
	id     spiffeid.ID
	td     spiffeid.TrustDomain
	cfg    Config
	clock  Clock
	random func() float64
	log    *slog.Logger
	conn   *grpc.ClientConn
	client pb.IstioCertificateServiceClient

	updated   chan struct{}
	cancel    context.CancelFunc
	done      chan struct{} // closed when renewLoop returns
	closeOnce sync.Once
	closeErr  error

	// mu guards svid, received, bundle and closed. svid and bundle are
	// replaced, never modified, so readers may keep what they got.
	mu     sync.RWMutex
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
	closed bool
	// received is when svid came, on the Source's clock.
	received time.Time
}

var (
	_ x509svid.Source   = (*Source)(nil)
	_ x509bundle.Source = (*Source)(nil)
)

// New obtains the workload's first SVID from the CA and returns once it
// holds it, retrying with backoff until ctx ends; a refusal that retrying
// cannot fix (PermissionDenied, InvalidArgument) returns at once. ctx only
// bounds this first wait: renewal runs until Close.
func New(ctx context.Context, cfg Config) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("identity config: %w", err)
	}
	roots, _ := parseRoots(cfg.RootsPEM) // checked by Validate
	id, _ := cfg.ID()
	s := &Source{
		id:      id,
		td:      cfg.TrustDomain,
		cfg:     cfg,
		clock:   cfg.Clock,
		random:  cfg.random,
		log:     cfg.Logger,
		updated: make(chan struct{}, 1),
		done:    make(chan struct{}),
		bundle:  x509bundle.FromX509Authorities(cfg.TrustDomain, roots),
	}
	if s.clock == nil {
		s.clock = RealClock{}
	}
	if s.random == nil {
		s.random = rand.Float64
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "identity", "spiffe_id", id.String(), "ca", cfg.CAAddress)

	// The CA must prove cfg.CAID against our own bundle, which learns new
	// roots as the CA sends them, so a CA root rotation does not lock us out.
	creds := credentials.NewTLS(tlsconfig.TLSClientConfig(s, tlsconfig.AuthorizeID(cfg.CAID)))
	conn, err := grpc.NewClient(cfg.CAAddress, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, cfg.DialOptions...)...)
	if err != nil {
		return nil, fmt.Errorf("CA client for %s: %w", cfg.CAAddress, err)
	}
	s.conn = conn
	s.client = pb.NewIstioCertificateServiceClient(conn)

	if err := s.fetchFirst(ctx); err != nil {
		_ = conn.Close()
		return nil, err
	}
	loopCtx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go s.renewLoop(loopCtx)
	return s, nil
}

// GetX509SVID returns the current SVID. It implements x509svid.Source,
// which tlsconfig calls at every handshake.
func (s *Source) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, ErrClosed
	}
	if leaf := s.svid.Certificates[0]; s.clock.Now().After(leaf.NotAfter) {
		return nil, fmt.Errorf("%w: %s expired at %s and could not be renewed", ErrExpired, s.id, leaf.NotAfter.Format(time.RFC3339))
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain returns the roots of the workload's own trust
// domain: the configured ones until the first certificate arrives, then
// the set the CA sent with its latest certificate. It implements x509bundle.Source; other trust domains are not
// this Source's business and get an error.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, ErrClosed
	}
	if td != s.td {
		return nil, fmt.Errorf("identity: no bundle for trust domain %q, only for %q", td, s.td)
	}
	return s.bundle.Clone(), nil
}

// Updated receives a value after each renewal (not after the first SVID,
// which New returns with). It has capacity one: a slow reader misses
// nothing but intermediate states, and reads the Source again.
func (s *Source) Updated() <-chan struct{} { return s.updated }

// Close stops renewal and waits for it, then closes the connection to the
// CA. Established TLS connections are unaffected; new handshakes using the
// Source fail with ErrClosed. Close is idempotent.
func (s *Source) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		<-s.done
		s.closeErr = s.conn.Close()
	})
	return s.closeErr
}

// fetchFirst gets the first SVID, retrying until ctx ends.
func (s *Source) fetchFirst(ctx context.Context) error {
	backoff := initialBackoff
	for {
		err := s.renew(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("first SVID from %s: %w (last attempt: %w)", s.cfg.CAAddress, ctx.Err(), err)
		}
		if isPermanent(err) {
			return fmt.Errorf("first SVID from %s: %w", s.cfg.CAAddress, err)
		}
		wait := s.retryDelay(backoff)
		s.log.Warn("cannot get first SVID, retrying", "error", err, "retry_in", wait)
		if !s.sleep(ctx, wait) {
			return fmt.Errorf("first SVID from %s: %w (last attempt: %w)", s.cfg.CAAddress, ctx.Err(), err)
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// renewLoop renews the SVID at half its lifetime and retries failures with
// backoff, serving the current SVID meanwhile. It owns all writes after New.
func (s *Source) renewLoop(ctx context.Context) {
	defer close(s.done)
	dueBackoff := initialBackoff
	for {
		wait := s.untilRenewal()
		if wait > 0 {
			dueBackoff = initialBackoff
		} else {
			// Expired as soon as issued: our clock is well ahead of the
			// CA's. Renewing at once would only hammer the CA.
			wait = s.retryDelay(dueBackoff)
			s.log.Warn("new SVID has already expired by this clock; is it ahead of the CA's?", "retry_in", wait)
			dueBackoff = min(2*dueBackoff, maxBackoff)
		}
		if !s.sleep(ctx, wait) {
			return
		}
		backoff := initialBackoff
		for {
			err := s.renew(ctx)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
			wait := s.retryDelay(backoff)
			s.logFailure(err, wait)
			if !s.sleep(ctx, wait) {
				return
			}
			backoff = min(2*backoff, maxBackoff)
		}
		select {
		case s.updated <- struct{}{}:
		default:
		}
	}
}

func (s *Source) logFailure(err error, retryIn time.Duration) {
	s.mu.RLock()
	notAfter := s.svid.Certificates[0].NotAfter
	s.mu.RUnlock()
	if s.clock.Now().After(notAfter) {
		s.log.Error("cannot renew SVID, and it has expired", "error", err, "expired_at", notAfter, "retry_in", retryIn)
		return
	}
	s.log.Warn("cannot renew SVID, serving the current one", "error", err, "not_after", notAfter, "retry_in", retryIn)
}

// untilRenewal is the wait until the current SVID's half-life, ±10 % of
// it. The life counts from when it came, or from its NotBefore if that
// is later: the CA backdates NotBefore (a minute, for clock skew), which
// for a short TTL would put the half-life before the SVID even arrived.
func (s *Source) untilRenewal() time.Duration {
	s.mu.RLock()
	leaf, received := s.svid.Certificates[0], s.received
	s.mu.RUnlock()
	start := leaf.NotBefore
	if received.After(start) {
		start = received
	}
	half := leaf.NotAfter.Sub(start) / 2
	jitter := time.Duration((s.random()*2 - 1) * renewJitter * float64(half))
	return max(0, start.Add(half+jitter).Sub(s.clock.Now()))
}

// retryDelay is the wait before the next attempt at backoff step step:
// step ±retryJitter, at most maxBackoff.
func (s *Source) retryDelay(step time.Duration) time.Duration {
	return min(time.Duration(float64(step)*(1+retryJitter*(2*s.random()-1))), maxBackoff)
}

// sleep waits d on the Source's clock; false if ctx ended first.
func (s *Source) sleep(ctx context.Context, d time.Duration) bool {
	t := s.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C():
		return true
	}
}

// renew makes a new key, has the CA certify it, and installs the result
// if it checks out.
func (s *Source) renew(ctx context.Context) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), cryptorand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	csr, err := makeCSR(key, s.id)
	if err != nil {
		return err
	}
	token, err := s.token(ctx)
	if err != nil {
		return err
	}
	callCtx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := s.client.CreateCertificate(withBearer(callCtx, token), &pb.IstioCertificateRequest{
		Csr:              csr,
		ValidityDuration: int64(s.cfg.TTL / time.Second),
	})
	if err != nil {
		return fmt.Errorf("CreateCertificate at %s: %w", s.cfg.CAAddress, err)
	}
	svid, roots, err := s.check(resp.GetCertChain(), key)
	if err != nil {
		return fmt.Errorf("response from %s: %w", s.cfg.CAAddress, err)
	}
	s.install(svid, roots)
	return nil
}

// check turns a response into an SVID for our ID and key whose chain
// verifies against our bundle plus the roots the response carries. Those
// roots came from the CA over a TLS connection authenticated against our
// bundle, which is why they may be trusted: that is how a CA root rotation
// reaches us.
func (s *Source) check(certChain []string, key *ecdsa.PrivateKey) (*x509svid.SVID, []*x509.Certificate, error) {
	chain, roots, err := splitChain(certChain)
	if err != nil {
		return nil, nil, err
	}
	svid, err := newSVID(chain, key)
	if err != nil {
		return nil, nil, err
	}
	if svid.ID != s.id {
		return nil, nil, fmt.Errorf("CA issued %s, want %s", svid.ID, s.id)
	}
	candidate := s.currentBundle()
	for _, r := range roots {
		candidate.AddX509Authority(r)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, candidate, x509svid.WithTime(s.clock.Now())); err != nil {
		return nil, nil, fmt.Errorf("issued SVID does not verify: %w", err)
	}
	return svid, roots, nil
}

func (s *Source) currentBundle() *x509bundle.Bundle {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.bundle.Clone()
}

// install makes svid current and the response's roots the bundle. The CA
// sends its whole current bundle with every certificate, over a TLS
// connection authenticated against the bundle we held, so it is
// authoritative: a root the CA retired (after a rotation, perhaps because
// its key leaked) stops being trusted at our next renewal, not when it
// expires years later. During a rotation the CA sends old and new roots
// together, so nothing still valid is ever dropped.
func (s *Source) install(svid *x509svid.SVID, roots []*x509.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(roots) > 0 {
		b := x509bundle.FromX509Authorities(s.td, roots)
		for _, r := range roots {
			if !s.bundle.HasX509Authority(r) {
				s.log.Info("trust bundle gained a root", "subject", r.Subject.String(), "not_after", r.NotAfter)
			}
		}
		for _, r := range s.bundle.X509Authorities() {
			if !b.HasX509Authority(r) {
				s.log.Info("trust bundle dropped a root the CA no longer sends", "subject", r.Subject.String(), "not_after", r.NotAfter)
			}
		}
		s.bundle = b
	}
	s.svid, s.received = svid, s.clock.Now()
	leaf := svid.Certificates[0]
	s.log.Info("holding SVID", "serial", leaf.SerialNumber.String(), "not_after", leaf.NotAfter)
}

// isPermanent tells refusals that retrying the same request cannot fix.
func isPermanent(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.InvalidArgument:
		return true
	}
	return false
}
