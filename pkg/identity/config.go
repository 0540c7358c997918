package identity

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
)

// TokenSource returns the bearer token to present to the CA: a
// ServiceAccount token bound to the CA's audience ("isthmus-ca").
type TokenSource func(ctx context.Context) (string, error)

// Config says who the workload is, where its CA is and what to trust.
type Config struct {
	// CAAddress is the CA server's host:port: the federator, port 15012.
	CAAddress string
	// CAID is the SPIFFE ID the CA server must present, normally
	// spiffe://<trust domain>/ns/isthmus-system/sa/isthmus-federator.
	// It must belong to TrustDomain.
	CAID spiffeid.ID
	// RootsPEM holds the root certificates of TrustDomain (PEM
	// "CERTIFICATE" blocks), used to verify the CA server and the issued
	// SVIDs until responses bring more.
	RootsPEM []byte

	// TrustDomain, Namespace and ServiceAccount give the workload's ID,
	// spiffe://<TrustDomain>/ns/<Namespace>/sa/<ServiceAccount>. An SVID
	// for any other ID is refused.
	TrustDomain    spiffeid.TrustDomain
	Namespace      string
	ServiceAccount string

	// TokenFile is the path of the projected ServiceAccount token. It is
	// read at every request, because kubelet rotates it. Exactly one of
	// TokenFile and TokenSource must be set.
	TokenFile string
	// TokenSource supplies the token instead of TokenFile.
	TokenSource TokenSource

	// TTL is the SVID lifetime to ask for, in whole seconds; zero asks
	// for the CA's default. The CA may cut it.
	TTL time.Duration
	// Clock drives renewal and retries. Nil means RealClock.
	Clock Clock
	// Logger receives renewals (Info) and failed attempts (Warn). Nil
	// discards.
	Logger *slog.Logger
	// DialOptions are appended to the options of the gRPC client to the
	// CA, after its transport credentials (for example a dialer).
	DialOptions []grpc.DialOption

	// random returns numbers uniform in [0, 1) for the jitter of renewals
	// and retries; nil means math/rand/v2. Tests set it.
	random func() float64
}

// ID is the SPIFFE ID the workload expects.
func (c Config) ID() (spiffeid.ID, error) {
	return spiffeid.FromSegments(c.TrustDomain, "ns", c.Namespace, "sa", c.ServiceAccount)
}

// Validate reports every problem in c at once.
func (c Config) Validate() error {
	var errs []error
	if c.CAAddress == "" {
		errs = append(errs, errors.New("CAAddress is empty"))
	}
	if c.TrustDomain.IsZero() {
		errs = append(errs, errors.New("TrustDomain is empty"))
	}
	switch {
	case c.CAID.IsZero():
		errs = append(errs, errors.New("CAID is empty"))
	case !c.TrustDomain.IsZero() && !c.CAID.MemberOf(c.TrustDomain):
		errs = append(errs, fmt.Errorf("CAID %s is not in trust domain %s", c.CAID, c.TrustDomain))
	}
	if _, err := parseRoots(c.RootsPEM); err != nil {
		errs = append(errs, fmt.Errorf("RootsPEM: %w", err))
	}
	if c.Namespace == "" || c.ServiceAccount == "" {
		errs = append(errs, errors.New("namespace and ServiceAccount are required"))
	} else if !c.TrustDomain.IsZero() {
		if _, err := c.ID(); err != nil {
			errs = append(errs, fmt.Errorf("workload ID: %w", err))
		}
	}
	switch {
	case c.TokenFile == "" && c.TokenSource == nil:
		errs = append(errs, errors.New("one of TokenFile and TokenSource is required"))
	case c.TokenFile != "" && c.TokenSource != nil:
		errs = append(errs, errors.New("TokenFile and TokenSource are exclusive"))
	}
	if c.TTL < 0 || (c.TTL > 0 && c.TTL < time.Second) {
		// Sent in whole seconds: under one would be 0, the CA's default.
		errs = append(errs, fmt.Errorf("TTL is %s, want 0 (CA default) or a second or more", c.TTL))
	}
	return errors.Join(errs...)
}

func parseRoots(b []byte) ([]*x509.Certificate, error) { return pemutil.ParseCertificates(b) }
