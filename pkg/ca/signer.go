package ca

import (
	"context"
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Signer issues X.509 SVIDs. The identity always comes from the caller's
// authenticated credentials, never from the CSR: a CSR that asks for any
// other identity is refused.
type Signer interface {
	// Sign checks csr (its signature, key type and size, and that any URI
	// SAN it carries is exactly id) and returns the chain for id: the
	// leaf first, then any intermediates, not including the root. ttl is
	// the requested lifetime; zero means the default, and longer than the
	// maximum is cut to the maximum. Errors wrap ErrInvalidCSR or
	// ErrIdentityMismatch when the request is at fault.
	Sign(ctx context.Context, csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error)
	// TrustDomain is the trust domain the signer issues for.
	TrustDomain() spiffeid.TrustDomain
	// Bundle is the current set of roots of the trust domain (during a
	// root rotation, old and new together).
	Bundle() *x509bundle.Bundle
}
