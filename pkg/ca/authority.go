package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"

	"github.com/isthmus-mesh/isthmus/internal/notify"
)

// Defaults for certificate lifetimes.
const (
	DefaultCertTTL = 24 * time.Hour
	DefaultMaxTTL  = 48 * time.Hour
	DefaultRootTTL = 10 * 365 * 24 * time.Hour
	// backdate is how far NotBefore is set in the past, to tolerate clock
	// skew between the federator and the workloads.
	backdate = time.Minute
)

// keySet is the CA's signing material at one moment. It is immutable and
// replaced as a whole, so a signature never mixes two generations.
type keySet struct {
	key  crypto.Signer
	cert *x509.Certificate
	// chain is what follows a leaf up to, not including, the root: empty
	// for a self-signed root; for a plugged-in CA, its signing certificate
	// and any intermediates above it.
	chain []*x509.Certificate
	// roots is the trust bundle: every root a valid chain may end in.
	roots []*x509.Certificate
	// sequence numbers the bundle; it grows whenever roots change.
	sequence uint64
}

// needed are the certificates a leaf's chain needs to verify: the
// signer, the intermediates above it, and the roots that issued the last
// of them (by name and key ID). A signer that is itself a root (the
// self-signed CA, whose bundle also holds the other root of a rotation)
// needs nothing more.
func (ks *keySet) needed() []*x509.Certificate {
	out := slices.Concat([]*x509.Certificate{ks.cert}, ks.chain)
	top := out[len(out)-1]
	if slices.ContainsFunc(ks.roots, top.Equal) {
		return out
	}
	for _, r := range ks.roots {
		if bytes.Equal(r.RawSubject, top.RawIssuer) &&
			(len(top.AuthorityKeyId) == 0 || len(r.SubjectKeyId) == 0 || bytes.Equal(r.SubjectKeyId, top.AuthorityKeyId)) {
			out = append(out, r)
		}
	}
	return out
}

// Authority signs X.509 SVIDs for one trust domain. Its keys come from a
// Keeper (pkg/ca's Secret-backed store in production). It is safe for
// concurrent use.
type Authority struct {
	td      spiffeid.TrustDomain
	clock   clock.PassiveClock
	defTTL  time.Duration
	maxTTL  time.Duration
	current atomic.Pointer[keySet]
	hub     notify.Hub
}

// AuthorityOptions tunes an Authority; zero values mean the defaults.
type AuthorityOptions struct {
	// DefaultTTL is the lifetime of a certificate when the caller does not
	// ask for one; default 24h.
	DefaultTTL time.Duration
	// MaxTTL caps every lifetime; default 48h. A root rotation retires the
	// old root MaxTTL after the new one starts signing.
	MaxTTL time.Duration
	// Clock is the time source; default the real clock.
	Clock clock.PassiveClock
}

var _ Signer = (*Authority)(nil)

func newAuthority(td spiffeid.TrustDomain, opts AuthorityOptions) *Authority {
	if opts.DefaultTTL <= 0 {
		opts.DefaultTTL = DefaultCertTTL
	}
	if opts.MaxTTL <= 0 {
		opts.MaxTTL = DefaultMaxTTL
	}
	if opts.DefaultTTL > opts.MaxTTL {
		opts.DefaultTTL = opts.MaxTTL
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	return &Authority{td: td, clock: opts.Clock, defTTL: opts.DefaultTTL, maxTTL: opts.MaxTTL}
}

// TrustDomain is the trust domain the authority issues for.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// MaxTTL is the longest lifetime the authority issues.
func (a *Authority) MaxTTL() time.Duration { return a.maxTTL }

// Bundle is the current trust bundle of the trust domain.
func (a *Authority) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(a.td, a.current.Load().roots)
}

// BundleSequence numbers the current bundle; it grows whenever the roots
// change.
func (a *Authority) BundleSequence() uint64 { return a.current.Load().sequence }

// SigningCertificate is the certificate whose key signs new SVIDs.
func (a *Authority) SigningCertificate() *x509.Certificate { return a.current.Load().cert }

// Subscribe returns a channel that is signalled (coalesced, capacity one)
// whenever the signing key or the bundle changes, and a function ending
// the subscription.
func (a *Authority) Subscribe() (<-chan struct{}, func()) { return a.hub.Subscribe(false) }

func (a *Authority) set(ks *keySet) {
	old := a.current.Swap(ks)
	if old != nil && old.cert.Equal(ks.cert) && sameCerts(old.roots, ks.roots) && old.sequence == ks.sequence {
		return
	}
	a.hub.Notify()
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

// RSA key sizes a CSR may use. The upper bound keeps signature checks
// cheap: a huge RSA key costs the CA, not the caller.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

// CheckCSR checks a CSR's key, then its signature, and that the only
// identity it may ask for is id: CheckCSRForm, then CheckCSRIdentity.
// Errors wrap ErrInvalidCSR or ErrIdentityMismatch and never quote more
// than 256 bytes of the input.
func CheckCSR(csr *x509.CertificateRequest, id spiffeid.ID) error {
	if err := CheckCSRForm(csr); err != nil {
		return err
	}
	return CheckCSRIdentity(csr, id)
}

// CheckCSRForm checks everything about a CSR that does not depend on who
// sends it: the key, then the signature, and that it asks for no DNS name,
// IP or email address and at most one URI. The key comes first:
// "unsupported key" is clearer than a signature error, and a huge RSA key
// is refused before any arithmetic with it. It needs nothing but the CSR,
// so a server can run it before it spends anything on authenticating the
// caller. Errors wrap ErrInvalidCSR.
func CheckCSRForm(csr *x509.CertificateRequest) error {
	if csr == nil {
		return fmt.Errorf("%w: no CSR", ErrInvalidCSR)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("%w: ECDSA curve %s is not supported (use P-256 or P-384)", ErrInvalidCSR, k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		switch bits := k.N.BitLen(); {
		case bits < minRSABits:
			return fmt.Errorf("%w: RSA key of %d bits is too small (at least %d)", ErrInvalidCSR, bits, minRSABits)
		case bits > maxRSABits:
			return fmt.Errorf("%w: RSA key of %d bits is too large (at most %d)", ErrInvalidCSR, bits, maxRSABits)
		}
	case nil:
		return fmt.Errorf("%w: unknown key algorithm (use ECDSA P-256/P-384 or RSA >= 2048)", ErrInvalidCSR)
	default:
		return fmt.Errorf("%w: key type %T is not supported (use ECDSA P-256/P-384 or RSA >= 2048)", ErrInvalidCSR, csr.PublicKey)
	}
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("%w: signature does not verify: %v", ErrInvalidCSR, err)
	}
	if len(csr.DNSNames) > 0 || len(csr.IPAddresses) > 0 || len(csr.EmailAddresses) > 0 {
		return fmt.Errorf("%w: only a SPIFFE ID is issued; the CSR also asks for DNS names, IP or email addresses", ErrInvalidCSR)
	}
	if n := len(csr.URIs); n > 1 {
		return fmt.Errorf("%w: CSR asks for %d URIs, an SVID has exactly one", ErrInvalidCSR, n)
	}
	return nil
}

// CheckCSRIdentity checks that the only identity a CSR asks for, if any,
// is id. It does not look at the key or the signature (CheckCSRForm does).
// Errors wrap ErrInvalidCSR or ErrIdentityMismatch and never quote more
// than 256 bytes of the input.
func CheckCSRIdentity(csr *x509.CertificateRequest, id spiffeid.ID) error {
	if csr == nil {
		return fmt.Errorf("%w: no CSR", ErrInvalidCSR)
	}
	switch len(csr.URIs) {
	case 0:
	case 1:
		if asked := csr.URIs[0].String(); asked != id.String() {
			if len(asked) > 256 {
				asked = asked[:256] + "..."
			}
			return fmt.Errorf("%w: CSR asks for %q but the caller is %q", ErrIdentityMismatch, asked, id.String())
		}
	default:
		return fmt.Errorf("%w: CSR asks for %d URIs, an SVID has exactly one", ErrInvalidCSR, len(csr.URIs))
	}
	return nil
}

// Sign implements Signer.
func (a *Authority) Sign(_ context.Context, csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if !id.MemberOf(a.td) {
		return nil, fmt.Errorf("%w: %s is not in trust domain %s", ErrIdentityMismatch, id, a.td)
	}
	if err := CheckCSR(csr, id); err != nil {
		return nil, err
	}
	return a.issue(csr.PublicKey, id, ttl)
}

// issue makes a leaf for pub with the SPIFFE ID as its only SAN.
func (a *Authority) issue(pub crypto.PublicKey, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	ks := a.current.Load()
	if ks == nil {
		return nil, errors.New("certificate authority not initialized")
	}
	switch {
	case ttl <= 0:
		ttl = a.defTTL
	case ttl > a.maxTTL:
		ttl = a.maxTTL
	}
	now := a.clock.Now()
	// Never past any certificate the leaf's chain needs: the signer, the
	// intermediates above it and the root they end in (a plugged-in CA's
	// may expire before its signer does).
	notAfter := now.Add(ttl)
	for _, c := range ks.needed() {
		if notAfter.After(c.NotAfter) {
			notAfter = c.NotAfter
		}
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	u := id.URL()
	usage := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{a.td.Name()}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		URIs:                  []*url.URL{u},
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ks.cert, pub, ks.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	chain := make([]*x509.Certificate, 0, 1+len(ks.chain))
	chain = append(chain, leaf)
	chain = append(chain, ks.chain...)
	return chain, nil
}

func randomSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}
