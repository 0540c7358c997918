package caserver

import (
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// Options are the optional knobs of a Server. The zero value is usable.
type Options struct {
	// Logger receives one Warn line per refused request and one Debug
	// line per issued certificate. Nil discards.
	Logger *slog.Logger
	// Now is the time at which an issued chain is checked before it is
	// returned; it should be the Signer's clock. Nil means time.Now.
	Now func() time.Time
	// Meter records isthmus_ca_certificates_issued and
	// isthmus_ca_requests_refused (by gRPC code). Nil records nothing.
	Meter metric.Meter
}

// Server implements Istio's IstioCertificateService on top of a ca.Signer.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer

	signer  ca.Signer
	auth    Authenticator
	log     *slog.Logger
	now     func() time.Time
	issued  metric.Int64Counter
	refused metric.Int64Counter
}

var _ pb.IstioCertificateServiceServer = (*Server)(nil)

// New returns a Server issuing certificates from signer to callers that
// auth accepts.
func New(signer ca.Signer, auth Authenticator, opts Options) *Server {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	meter := opts.Meter
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	// Instrument creation only fails for invalid names, which these are not;
	// the SDK then hands back a working no-op instrument anyway.
	issued, _ := meter.Int64Counter("isthmus_ca_certificates_issued",
		metric.WithDescription("Workload certificates issued by the certificate service."))
	refused, _ := meter.Int64Counter("isthmus_ca_requests_refused",
		metric.WithDescription("Certificate requests refused, by gRPC status code."))
	return &Server{signer: signer, auth: auth, log: log.With("component", "ca-server"), now: now, issued: issued, refused: refused}
}

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) {
	pb.RegisterIstioCertificateServiceServer(g, s)
}

// ServerCredentials returns server-only TLS credentials presenting the
// SVID that svid currently holds. The SVID is read at every handshake, so a
// rotated serving certificate is picked up without a restart.
func ServerCredentials(svid x509svid.Source) credentials.TransportCredentials {
	return credentials.NewTLS(tlsconfig.TLSServerConfig(svid))
}

// ServerOptions returns the grpc.ServerOptions the CA service needs when
// it has a gRPC server of its own: ServerCredentials(svid) and a bound on
// the request size that the transport applies before decoding. A server
// shared with other services (the federator serves xDS next to it) has
// their larger bound instead; CreateCertificate then still refuses a
// request over the CA's bound, but only once it is decoded.
func ServerOptions(svid x509svid.Source) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(ServerCredentials(svid)),
		grpc.MaxRecvMsgSize(maxRequestBytes),
	}
}

// CreateCertificate checks the request and the CSR, authenticates the
// caller's bearer token and returns the caller's SVID chain followed by
// the trust domain's roots, one PEM certificate per element, the root that
// signed the chain last.
//
// Everything that needs only the request is checked before the token is
// sent to the Authenticator (a TokenReview, a request to the API server):
// a malformed request costs the caller an error, not the API server a
// review.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	log := s.log.With("peer", peerAddr(ctx))

	// On a gRPC server shared with xDS the transport lets larger messages
	// through (see ServerOptions).
	if n := proto.Size(req); n > maxRequestBytes {
		return nil, s.refuse(ctx, log, codes.ResourceExhausted,
			fmt.Sprintf("request is %d bytes, the certificate service's limit is %d", n, maxRequestBytes))
	}
	token, err := bearerToken(ctx)
	if err != nil {
		return nil, s.refuse(ctx, log, codes.Unauthenticated, err.Error())
	}
	if req.GetValidityDuration() < 0 {
		return nil, s.refuse(ctx, log, codes.InvalidArgument,
			fmt.Sprintf("validity_duration is %d s, want 0 (default) or more", req.GetValidityDuration()))
	}
	// The signer cuts the TTL to its maximum; here it only must not overflow.
	ttl := time.Duration(min(req.GetValidityDuration(), math.MaxInt64/int64(time.Second))) * time.Second
	csr, err := parseCSR([]byte(req.GetCsr()))
	if err != nil {
		return nil, s.refuse(ctx, log, codes.InvalidArgument, err.Error())
	}
	if err := ca.CheckCSRForm(csr); err != nil {
		return nil, s.refuse(ctx, log, csrErrorCode(err), err.Error())
	}

	caller, err := s.auth.Authenticate(ctx, token)
	if err != nil {
		// The error text goes to the log and to the caller: make sure an
		// authenticator that echoes its input cannot leak the token.
		reason := redact(err.Error(), token)
		if errors.Is(err, ErrUnauthenticated) {
			return nil, s.refuse(ctx, log, codes.Unauthenticated, "token refused: "+reason)
		}
		return nil, s.refuse(ctx, log, codes.Unavailable, "cannot authenticate token: "+reason)
	}
	log = log.With("caller", caller.String())

	td := s.signer.TrustDomain()
	id, err := spiffeid.FromSegments(td, "ns", caller.Namespace, "sa", caller.ServiceAccount)
	if err != nil {
		return nil, s.refuse(ctx, log, codes.Unauthenticated,
			fmt.Sprintf("caller %s has no valid SPIFFE ID in %s: %v", caller, td, err))
	}
	log = log.With("spiffe_id", id.String())
	if err := ca.CheckCSRIdentity(csr, id); err != nil {
		return nil, s.refuse(ctx, log, csrErrorCode(err), err.Error())
	}

	chain, err := s.signer.Sign(ctx, csr, id, ttl)
	if err != nil {
		code := csrErrorCode(err)
		if code == codes.Internal && ctx.Err() != nil {
			code = status.FromContextError(ctx.Err()).Code()
		}
		return nil, s.refuse(ctx, log, code, "sign: "+err.Error())
	}
	root, others, err := s.checkIssued(chain, csr, id)
	if err != nil {
		return nil, s.refuse(ctx, log, codes.Internal, "signer returned a bad chain: "+err.Error())
	}

	resp := &pb.IstioCertificateResponse{CertChain: make([]string, 0, len(chain)+len(others)+1)}
	for _, c := range chain {
		resp.CertChain = append(resp.CertChain, encodePEM(c))
	}
	for _, c := range others {
		resp.CertChain = append(resp.CertChain, encodePEM(c))
	}
	resp.CertChain = append(resp.CertChain, encodePEM(root))
	s.issued.Add(ctx, 1)
	log.Debug("issued certificate", "serial", chain[0].SerialNumber.String(), "not_after", chain[0].NotAfter)
	return resp, nil
}

// checkIssued makes sure that what goes back to the caller is an SVID for
// id, with the CSR's key, that verifies against the bundle it ships with.
// It returns the root the chain verifies to and the bundle's other roots.
func (s *Server) checkIssued(chain []*x509.Certificate, csr *x509.CertificateRequest, id spiffeid.ID) (*x509.Certificate, []*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, nil, errors.New("empty chain")
	}
	type publicKey interface{ Equal(crypto.PublicKey) bool }
	if pk, ok := chain[0].PublicKey.(publicKey); !ok || !pk.Equal(csr.PublicKey) {
		return nil, nil, errors.New("leaf key is not the CSR's key")
	}
	bundle := s.signer.Bundle()
	if bundle == nil || bundle.Empty() {
		return nil, nil, errors.New("trust bundle is empty")
	}
	got, verified, err := x509svid.Verify(chain, bundle, x509svid.WithTime(s.now()))
	if err != nil {
		return nil, nil, err
	}
	if got != id {
		return nil, nil, fmt.Errorf("leaf is %q, want %q", got, id)
	}
	first := verified[0]
	root := first[len(first)-1]
	var others []*x509.Certificate
	for _, r := range bundle.X509Authorities() {
		if !r.Equal(root) {
			others = append(others, r)
		}
	}
	return root, others, nil
}

// csrErrorCode maps the CA's request errors to gRPC codes; anything else
// is the CA's own fault.
func csrErrorCode(err error) codes.Code {
	switch {
	case errors.Is(err, ca.ErrIdentityMismatch):
		return codes.PermissionDenied
	case errors.Is(err, ca.ErrInvalidCSR):
		return codes.InvalidArgument
	default:
		return codes.Internal
	}
}

// refuse logs a refused request and returns its gRPC status.
func (s *Server) refuse(ctx context.Context, log *slog.Logger, code codes.Code, reason string) error {
	s.refused.Add(ctx, 1, metric.WithAttributes(attribute.String("code", code.String())))
	log.LogAttrs(ctx, slog.LevelWarn, "refused certificate request",
		slog.String("code", code.String()), slog.String("reason", reason))
	return status.Error(code, reason)
}

// bearerToken reads Istio's "authorization: Bearer <token>" metadata.
func bearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	switch len(vals) {
	case 0:
		return "", errors.New("no bearer token: missing authorization metadata")
	case 1:
	default:
		return "", fmt.Errorf("malformed authorization metadata: %d values, want 1", len(vals))
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", errors.New("malformed authorization metadata: want \"Bearer <token>\"")
	}
	token = strings.TrimSpace(token)
	if token == "" || strings.ContainsAny(token, " \t\r\n") {
		return "", errors.New("malformed authorization metadata: empty or blank-separated token")
	}
	if len(token) > MaxTokenBytes {
		return "", fmt.Errorf("bearer token is %d bytes, the limit is %d", len(token), MaxTokenBytes)
	}
	return token, nil
}

func redact(s, token string) string {
	if token == "" {
		return s
	}
	return strings.ReplaceAll(s, token, "[token]")
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return "unknown"
}

func encodePEM(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}
