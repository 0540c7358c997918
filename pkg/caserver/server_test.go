package caserver

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

var (
	testTD      = spiffeid.RequireTrustDomainFromString("cluster-a.mesh")
	federatorID = spiffeid.RequireFromPath(testTD, "/ns/isthmus-system/sa/isthmus-federator")
	webID       = spiffeid.RequireFromPath(testTD, "/ns/demo/sa/web")
)

// fakeAuth accepts tokens "tok:<ns>:<sa>". "down" fails like an
// unreachable API server; "echo-..." is refused with an error that repeats
// the token, as a careless authenticator might.
type fakeAuth struct{}

func (fakeAuth) Authenticate(_ context.Context, token string) (Caller, error) {
	switch {
	case token == "down":
		return Caller{}, errors.New("token review: dial tcp 127.0.0.1:6443: connect: connection refused")
	case strings.HasPrefix(token, "echo-"):
		return Caller{}, fmt.Errorf("%w: token %s has expired", ErrUnauthenticated, token)
	}
	if rest, ok := strings.CutPrefix(token, "tok:"); ok {
		if ns, sa, ok := strings.Cut(rest, ":"); ok {
			return Caller{Namespace: ns, ServiceAccount: sa}, nil
		}
	}
	return Caller{}, fmt.Errorf("%w: token not authenticated", ErrUnauthenticated)
}

// logSink sends log lines to t.Logf and keeps them for assertions.
type logSink struct {
	tb testing.TB
	// mu guards buf.
	mu  sync.Mutex
	buf bytes.Buffer
}

func newLogSink(tb testing.TB) (*logSink, *slog.Logger) {
	s := &logSink{tb: tb}
	return s, slog.New(slog.NewTextHandler(s, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	s.buf.Write(p)
	s.mu.Unlock()
	s.tb.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// startCA serves the certificate service on 127.0.0.1:0 over TLS with a
// federator SVID from signer, the way the federator does.
func startCA(tb testing.TB, signer *testSigner, auth Authenticator, log *slog.Logger) string {
	tb.Helper()
	g := grpc.NewServer(ServerOptions(signer.issueSVID(tb, federatorID))...)
	New(signer, auth, Options{Logger: log}).Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(tb, err)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = g.Serve(lis)
	}()
	tb.Cleanup(func() {
		g.Stop()
		<-served
	})
	return lis.Addr().String()
}

func dialCA(tb testing.TB, addr string, bundle x509bundle.Source) pb.IstioCertificateServiceClient {
	tb.Helper()
	creds := credentials.NewTLS(tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(federatorID)))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = conn.Close() })
	return pb.NewIstioCertificateServiceClient(conn)
}

func withAuth(ctx context.Context, value string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", value)
}

func makeCSR(tb testing.TB, key crypto.Signer, uris ...string) string {
	tb.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		require.NoError(tb, err)
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(tb, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func ecKey(tb testing.TB, c elliptic.Curve) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	require.NoError(tb, err)
	return k
}

func parseChain(tb testing.TB, chain []string) []*x509.Certificate {
	tb.Helper()
	var out []*x509.Certificate
	for i, p := range chain {
		block, rest := pem.Decode([]byte(p))
		require.NotNil(tb, block, "element %d is not PEM", i)
		require.Empty(tb, bytes.TrimSpace(rest), "element %d has more than one block", i)
		c, err := x509.ParseCertificate(block.Bytes)
		require.NoError(tb, err)
		out = append(out, c)
	}
	return out
}

func TestCreateCertificateIssues(t *testing.T) {
	signer := newTestSigner(t, testTD)
	addr := startCA(t, signer, fakeAuth{}, nil)
	client := dialCA(t, addr, signer.Bundle())

	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)

	tests := []struct {
		name     string
		key      crypto.Signer
		uris     []string
		validity int64
		wantTTL  time.Duration
	}{
		{name: "P-256 with its SPIFFE ID, default validity", key: ecKey(t, elliptic.P256()), uris: []string{webID.String()}, wantTTL: time.Hour},
		{name: "P-384 without URI SAN", key: ecKey(t, elliptic.P384()), validity: 600, wantTTL: 10 * time.Minute},
		{name: "RSA 2048", key: rsaKey, uris: []string{webID.String()}, validity: 7200, wantTTL: 2 * time.Hour},
		{name: "validity beyond the maximum is cut", key: ecKey(t, elliptic.P256()), validity: 1 << 62, wantTTL: 24 * time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := client.CreateCertificate(withAuth(t.Context(), "Bearer tok:demo:web"),
				&pb.IstioCertificateRequest{Csr: makeCSR(t, tt.key, tt.uris...), ValidityDuration: tt.validity})
			require.NoError(t, err)
			certs := parseChain(t, resp.GetCertChain())
			require.Len(t, certs, 2, "leaf then root")
			leaf, root := certs[0], certs[1]

			id, err := x509svid.IDFromCert(leaf)
			require.NoError(t, err)
			require.Equal(t, webID, id)
			require.Len(t, leaf.URIs, 1)
			require.True(t, leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(tt.key.Public()))
			require.Equal(t, tt.wantTTL, leaf.NotAfter.Sub(leaf.NotBefore))
			require.True(t, root.Equal(signer.rootCert), "last element is the root")

			gotID, _, err := x509svid.Verify(certs[:1], x509bundle.FromX509Authorities(testTD, certs[1:]))
			require.NoError(t, err)
			require.Equal(t, webID, gotID)
		})
	}
}

func TestCreateCertificateRootRotation(t *testing.T) {
	signer := newTestSigner(t, testTD)
	oldRoot := signer.rootCert
	addr := startCA(t, signer, fakeAuth{}, nil)
	client := dialCA(t, addr, signer.Bundle())
	newRoot := signer.rotateRoot(t)

	resp, err := client.CreateCertificate(withAuth(t.Context(), "Bearer tok:demo:web"),
		&pb.IstioCertificateRequest{Csr: makeCSR(t, ecKey(t, elliptic.P256()), webID.String())})
	require.NoError(t, err)
	certs := parseChain(t, resp.GetCertChain())
	require.Len(t, certs, 3, "leaf, old root, new root")
	require.True(t, certs[1].Equal(oldRoot))
	require.True(t, certs[2].Equal(newRoot), "the root that signed the leaf comes last")
	require.NoError(t, certs[0].CheckSignatureFrom(certs[2]))
}

func TestCreateCertificateRefuses(t *testing.T) {
	signer := newTestSigner(t, testTD)
	addr := startCA(t, signer, fakeAuth{}, nil)
	client := dialCA(t, addr, signer.Bundle())

	good := makeCSR(t, ecKey(t, elliptic.P256()), webID.String())
	block, _ := pem.Decode([]byte(good))
	tampered := bytes.Clone(block.Bytes)
	tampered[len(tampered)-5] ^= 0xff // inside the signature
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	require.NoError(t, err)
	certPEM := encodePEM(signer.rootCert)

	tests := []struct {
		name     string
		auth     string // authorization metadata; empty sends none
		csr      string
		validity int64
		wantCode codes.Code
		wantMsg  []string
	}{
		{name: "no token", csr: good, wantCode: codes.Unauthenticated, wantMsg: []string{"missing authorization"}},
		{name: "basic auth", auth: "Basic dXNlcjpwYXNz", csr: good, wantCode: codes.Unauthenticated, wantMsg: []string{"Bearer"}},
		{name: "empty bearer", auth: "Bearer ", csr: good, wantCode: codes.Unauthenticated, wantMsg: []string{"malformed"}},
		{name: "unknown token", auth: "Bearer forged", csr: good, wantCode: codes.Unauthenticated, wantMsg: []string{"token refused", "not authenticated"}},
		{name: "token review down", auth: "Bearer down", csr: good, wantCode: codes.Unavailable, wantMsg: []string{"connection refused"}},
		{name: "negative validity", auth: "Bearer tok:demo:web", csr: good, validity: -1, wantCode: codes.InvalidArgument, wantMsg: []string{"validity_duration"}},
		{name: "empty CSR", auth: "Bearer tok:demo:web", csr: "", wantCode: codes.InvalidArgument, wantMsg: []string{"CSR is empty"}},
		{name: "not PEM", auth: "Bearer tok:demo:web", csr: "hello", wantCode: codes.InvalidArgument, wantMsg: []string{"not PEM"}},
		{name: "a certificate, not a CSR", auth: "Bearer tok:demo:web", csr: certPEM, wantCode: codes.InvalidArgument, wantMsg: []string{`"CERTIFICATE"`}},
		{name: "garbage DER", auth: "Bearer tok:demo:web", csr: pemCSR([]byte("garbage")), wantCode: codes.InvalidArgument, wantMsg: []string{"does not parse"}},
		{name: "two CSRs", auth: "Bearer tok:demo:web", csr: good + good, wantCode: codes.InvalidArgument, wantMsg: []string{"after its PEM block"}},
		{name: "bad signature", auth: "Bearer tok:demo:web", csr: pemCSR(tampered), wantCode: codes.InvalidArgument, wantMsg: []string{"signature"}},
		{name: "Ed25519", auth: "Bearer tok:demo:web", csr: makeCSR(t, edKey, webID.String()), wantCode: codes.InvalidArgument, wantMsg: []string{"ed25519"}},
		{name: "RSA 1024", auth: "Bearer tok:demo:web", csr: makeCSR(t, rsa1024, webID.String()), wantCode: codes.InvalidArgument, wantMsg: []string{"1024 bits is too small"}},
		{name: "P-521", auth: "Bearer tok:demo:web", csr: makeCSR(t, ecKey(t, elliptic.P521()), webID.String()), wantCode: codes.InvalidArgument, wantMsg: []string{"P-521"}},
		{name: "CSR over 64 KiB", auth: "Bearer tok:demo:web", csr: strings.Repeat("A", MaxCSRBytes+1), wantCode: codes.InvalidArgument, wantMsg: []string{"limit"}},
		{name: "message over the gRPC limit", auth: "Bearer tok:demo:web", csr: strings.Repeat("A", 4*MaxCSRBytes), wantCode: codes.ResourceExhausted},
		{
			name: "another namespace", auth: "Bearer tok:demo:web",
			csr:      makeCSR(t, ecKey(t, elliptic.P256()), "spiffe://cluster-a.mesh/ns/kube-system/sa/web"),
			wantCode: codes.PermissionDenied, wantMsg: []string{"spiffe://cluster-a.mesh/ns/kube-system/sa/web", webID.String()},
		},
		{
			name: "another ServiceAccount", auth: "Bearer tok:demo:web",
			csr:      makeCSR(t, ecKey(t, elliptic.P256()), "spiffe://cluster-a.mesh/ns/demo/sa/db"),
			wantCode: codes.PermissionDenied, wantMsg: []string{"spiffe://cluster-a.mesh/ns/demo/sa/db", webID.String()},
		},
		{
			name: "another trust domain", auth: "Bearer tok:demo:web",
			csr:      makeCSR(t, ecKey(t, elliptic.P256()), "spiffe://cluster-b.mesh/ns/demo/sa/web"),
			wantCode: codes.PermissionDenied, wantMsg: []string{"cluster-b.mesh"},
		},
		{
			name: "two URI SANs", auth: "Bearer tok:demo:web",
			csr:      makeCSR(t, ecKey(t, elliptic.P256()), webID.String(), "spiffe://cluster-a.mesh/ns/demo/sa/db"),
			wantCode: codes.InvalidArgument, wantMsg: []string{"2 URIs"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			if tt.auth != "" {
				ctx = withAuth(ctx, tt.auth)
			}
			resp, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: tt.csr, ValidityDuration: tt.validity})
			require.Error(t, err)
			require.Nil(t, resp)
			st := status.Convert(err)
			require.Equal(t, tt.wantCode, st.Code(), st.Message())
			for _, m := range tt.wantMsg {
				require.Contains(t, st.Message(), m)
			}
		})
	}
}

func pemCSR(der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func TestCreateCertificateSignerFailures(t *testing.T) {
	signer := newTestSigner(t, testTD)
	addr := startCA(t, signer, fakeAuth{}, nil)
	client := dialCA(t, addr, signer.Bundle())
	ctx := withAuth(t.Context(), "Bearer tok:demo:web")
	req := &pb.IstioCertificateRequest{Csr: makeCSR(t, ecKey(t, elliptic.P256()), webID.String())}

	// The signer's own refusals keep their meaning.
	signer.setErr(fmt.Errorf("%w: the CSR also asks for DNS names", ca.ErrInvalidCSR))
	_, err := client.CreateCertificate(ctx, req)
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	signer.setErr(fmt.Errorf("%w: not in trust domain", ca.ErrIdentityMismatch))
	_, err = client.CreateCertificate(ctx, req)
	require.Equal(t, codes.PermissionDenied, status.Code(err))

	signer.setErr(errors.New("root key unavailable"))
	_, err = client.CreateCertificate(ctx, req)
	require.Equal(t, codes.Internal, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "root key unavailable")

	// A chain that does not verify against the bundle never leaves the server.
	signer.setErr(nil)
	signer.setBadChain(true)
	_, err = client.CreateCertificate(ctx, req)
	require.Equal(t, codes.Internal, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "bad chain")

	signer.setBadChain(false)
	resp, err := client.CreateCertificate(ctx, req)
	require.NoError(t, err)
	require.Len(t, resp.GetCertChain(), 2)
}

// Every refusal is logged with the peer, the reason and the caller when
// known, and the token never appears, even when the authenticator's own
// error repeats it.
func TestRefusalsAreLoggedWithoutToken(t *testing.T) {
	const secret = "echo-eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLXZhbHVl.c2lnbmF0dXJl"
	const validSecret = "tok:demo:web" // a valid token, refused for its CSR
	sink, log := newLogSink(t)
	signer := newTestSigner(t, testTD)
	addr := startCA(t, signer, fakeAuth{}, log)
	client := dialCA(t, addr, signer.Bundle())

	_, err := client.CreateCertificate(withAuth(t.Context(), "Bearer "+secret),
		&pb.IstioCertificateRequest{Csr: makeCSR(t, ecKey(t, elliptic.P256()), webID.String())})
	require.Equal(t, codes.Unauthenticated, status.Code(err))
	require.NotContains(t, status.Convert(err).Message(), secret, "nor to the caller")
	require.Contains(t, status.Convert(err).Message(), "[token]")

	_, err = client.CreateCertificate(withAuth(t.Context(), "Bearer "+validSecret),
		&pb.IstioCertificateRequest{Csr: makeCSR(t, ecKey(t, elliptic.P256()), "spiffe://cluster-a.mesh/ns/demo/sa/db")})
	require.Equal(t, codes.PermissionDenied, status.Code(err))

	_, err = client.CreateCertificate(withAuth(t.Context(), "Bearer "+validSecret), &pb.IstioCertificateRequest{Csr: "junk"})
	require.Equal(t, codes.InvalidArgument, status.Code(err))

	out := sink.String()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 3, out)
	for _, l := range lines {
		require.Contains(t, l, "refused certificate request")
		require.Contains(t, l, "component=ca-server")
		require.Contains(t, l, "peer=127.0.0.1:")
		require.Contains(t, l, "reason=")
	}
	require.Contains(t, lines[0], "code=Unauthenticated")
	require.NotContains(t, lines[0], "caller=", "no caller identity before authentication")
	require.Contains(t, lines[1], "code=PermissionDenied")
	require.Contains(t, lines[1], "caller=demo/web")
	require.Contains(t, lines[1], "ns/demo/sa/db")
	require.Contains(t, lines[2], "code=InvalidArgument")
	require.Contains(t, lines[2], "not PEM")

	require.NotContains(t, out, secret)
	require.NotContains(t, out, "c2VjcmV0LXRva2VuLXZhbHVl", "no part of the token either")
	require.NotContains(t, out, validSecret)
}

// The service presents the federator's SPIFFE ID; a client pinned to
// another ID refuses to talk to it.
func TestServerIdentityIsChecked(t *testing.T) {
	signer := newTestSigner(t, testTD)
	addr := startCA(t, signer, fakeAuth{}, nil)
	creds := credentials.NewTLS(tlsconfig.TLSClientConfig(signer.Bundle(), tlsconfig.AuthorizeID(webID)))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	require.NoError(t, err)
	defer conn.Close()
	_, err = pb.NewIstioCertificateServiceClient(conn).CreateCertificate(withAuth(t.Context(), "Bearer tok:demo:web"),
		&pb.IstioCertificateRequest{Csr: makeCSR(t, ecKey(t, elliptic.P256()), webID.String())})
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.Contains(t, err.Error(), "unexpected ID")
}
