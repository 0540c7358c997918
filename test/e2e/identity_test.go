package e2e

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	pb "istio.io/api/security/v1alpha1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	clocktesting "k8s.io/utils/clock/testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/identity"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

const audience = "isthmus-ca"

var (
	td          = spiffeid.RequireTrustDomainFromString("a.mesh")
	federatorID = spiffeid.RequireFromString("spiffe://a.mesh/ns/isthmus-system/sa/isthmus-federator")
)

// lockedBuffer collects the CA server's log so the test can show no token
// ever reaches it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// caFixture is the federator's identity stack, run in process on a fake
// clock against a real API server, authenticating with real TokenReviews
// as the least-privileged federator user.
type caFixture struct {
	ca    *ca.CA
	addr  string
	clock *clocktesting.FakeClock
	logs  *lockedBuffer
}

func startCA(t *testing.T, c *localcluster.Cluster, clk *clocktesting.FakeClock) *caFixture {
	t.Helper()
	fedClient, err := c.ClientFor(localcluster.UserFederator)
	require.NoError(t, err)
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	authority, err := ca.New(t.Context(), fedClient, ca.Options{
		TrustDomain: td, Namespace: "isthmus-system", Clock: clk,
		SyncInterval: 10 * time.Second, Logger: log, // PublishDelay: the safe default
	})
	require.NoError(t, err)
	self, err := ca.NewSelfSource(authority.Authority, federatorID, clk)
	require.NoError(t, err)
	srv := caserver.New(authority, caserver.TokenReviewAuthenticator{Client: fedClient, Audiences: []string{audience}},
		caserver.Options{Logger: log, Now: clk.Now})
	g := grpc.NewServer(caserver.ServerOptions(self)...)
	srv.Register(g)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)
	return &caFixture{ca: authority, addr: ln.Addr().String(), clock: clk, logs: logs}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

// fakeClock adapts the Kubernetes fake clock to identity.Clock.
type fakeClock struct{ *clocktesting.FakeClock }

func (f fakeClock) NewTimer(d time.Duration) identity.Timer { return f.FakeClock.NewTimer(d) }

func saToken(t *testing.T, kc kubernetes.Interface, ns, sa string, aud ...string) string {
	t.Helper()
	tr, err := kc.CoreV1().ServiceAccounts(ns).CreateToken(t.Context(), sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: aud, ExpirationSeconds: new(int64(600))},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return tr.Status.Token
}

func ensureSA(t *testing.T, kc kubernetes.Interface, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	_, _ = kc.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	sa, err := kc.CoreV1().ServiceAccounts(ns).Create(t.Context(), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	return sa
}

// forgeToken signs a ServiceAccount token with key, the way the API server
// signs them, but expired an hour ago.
func forgeToken(t *testing.T, key crypto.Signer, sa *corev1.ServiceAccount, expired bool) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	require.NoError(t, err)
	now := time.Now()
	exp := now.Add(10 * time.Minute)
	if expired {
		exp = now.Add(-time.Hour)
	}
	claims := jwt.Claims{
		Issuer:    "https://kubernetes.default.svc",
		Subject:   "system:serviceaccount:" + sa.Namespace + ":" + sa.Name,
		Audience:  jwt.Audience{audience},
		IssuedAt:  jwt.NewNumericDate(exp.Add(-10 * time.Minute)),
		NotBefore: jwt.NewNumericDate(exp.Add(-10 * time.Minute)),
		Expiry:    jwt.NewNumericDate(exp),
	}
	private := map[string]any{"kubernetes.io": map[string]any{
		"namespace":      sa.Namespace,
		"serviceaccount": map[string]any{"name": sa.Name, "uid": string(sa.UID)},
	}}
	tok, err := jwt.Signed(signer).Claims(claims).Claims(private).Serialize()
	require.NoError(t, err)
	return tok
}

func loadKey(t *testing.T, path string) crypto.Signer {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	blk, _ := pem.Decode(b)
	require.NotNil(t, blk)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	require.NoError(t, err)
	return k.(crypto.Signer)
}

func csrPEM(t *testing.T, uris ...string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		id := spiffeid.RequireFromString(u)
		tmpl.URIs = append(tmpl.URIs, id.URL())
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// rawCall calls the certificate service as an unprepared client would:
// verifying the server against the bundle, with any token and CSR.
func rawCall(t *testing.T, f *caFixture, token, csr string) (*pb.IstioCertificateResponse, error) {
	t.Helper()
	creds := credentials.NewTLS(tlsconfig.TLSClientConfig(f.ca.Bundle(), tlsconfig.AuthorizeID(federatorID)))
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(creds))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	return pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr})
}

func rootsPEM(f *caFixture) []byte {
	var b []byte
	for _, r := range f.ca.Bundle().X509Authorities() {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	return b
}

func newIdentity(t *testing.T, f *caFixture, kc kubernetes.Interface, ns, sa string) *identity.Source {
	t.Helper()
	src, err := identity.New(t.Context(), identity.Config{
		CAAddress: f.addr, CAID: federatorID, RootsPEM: rootsPEM(f),
		TrustDomain: td, Namespace: ns, ServiceAccount: sa,
		TokenSource: func(ctx context.Context) (string, error) {
			tr, err := kc.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
				Spec: authenticationv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: new(int64(600))},
			}, metav1.CreateOptions{})
			if err != nil {
				return "", err
			}
			return tr.Status.Token, nil
		},
		Clock: fakeClock{f.clock},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = src.Close() })
	return src
}

// TestIdentity issues certificates to real ServiceAccount tokens from a
// real API server, refuses every bad input, keeps its root across a restart,
// and rotates workload certificates and the root under a live mTLS
// connection.
func TestIdentity(t *testing.T) {
	env := localcluster.StartT(t, "a")
	installIsthmus(t, env)
	a := env.Cluster("a")
	kc := a.Client()
	clk := clocktesting.NewFakeClock(time.Now())
	f := startCA(t, a, clk)

	clientSA := ensureSA(t, kc, "demo", "client")
	ensureSA(t, kc, "demo", "server")
	ensureSA(t, kc, "prod", "db")

	t.Run("real token gets its SVID", func(t *testing.T) {
		resp, err := rawCall(t, f, saToken(t, kc, "demo", "client", audience), csrPEM(t))
		require.NoError(t, err)
		var chain []*x509.Certificate
		for _, p := range resp.CertChain {
			blk, _ := pem.Decode([]byte(p))
			c, err := x509.ParseCertificate(blk.Bytes)
			require.NoError(t, err)
			chain = append(chain, c)
		}
		require.Len(t, chain[0].URIs, 1, "the only URI SAN is the SPIFFE ID")
		require.Equal(t, "spiffe://a.mesh/ns/demo/sa/client", chain[0].URIs[0].String())
		id, _, err := x509svid.Verify(chain[:len(chain)-1], f.ca.Bundle(), x509svid.WithTime(clk.Now()))
		require.NoError(t, err)
		require.Equal(t, "spiffe://a.mesh/ns/demo/sa/client", id.String())
		require.True(t, chain[len(chain)-1].Equal(f.ca.SigningCertificate()), "root last")
	})

	t.Run("bad input is refused", func(t *testing.T) {
		saKey := loadKey(t, a.ServiceAccountSigningKeyFile())
		otherKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		ensureSA(t, kc, "demo", "gone")
		goneToken := saToken(t, kc, "demo", "gone", audience)
		require.NoError(t, kc.CoreV1().ServiceAccounts("demo").Delete(t.Context(), "gone", metav1.DeleteOptions{}))

		good := saToken(t, kc, "demo", "client", audience)
		tests := []struct {
			name, token, csr string
			code             codes.Code
			want             string
		}{
			{"no token", "", csrPEM(t), codes.Unauthenticated, "no bearer token"},
			{"forged token (another key)", forgeToken(t, otherKey, clientSA, false), csrPEM(t), codes.Unauthenticated, "token refused"},
			{"expired token (the API server's own key)", forgeToken(t, saKey, clientSA, true), csrPEM(t), codes.Unauthenticated, "token refused"},
			{"wrong audience", saToken(t, kc, "demo", "client", "https://kubernetes.default.svc"), csrPEM(t), codes.Unauthenticated, "token refused"},
			{"deleted ServiceAccount", goneToken, csrPEM(t), codes.Unauthenticated, "token refused"},
			{"CSR for another identity", good, csrPEM(t, "spiffe://a.mesh/ns/demo/sa/server"), codes.PermissionDenied, "spiffe://a.mesh/ns/demo/sa/server"},
			{"CSR for another namespace", good, csrPEM(t, "spiffe://a.mesh/ns/prod/sa/db"), codes.PermissionDenied, "spiffe://a.mesh/ns/prod/sa/db"},
			{"garbage CSR", good, "\x00\x01garbage", codes.InvalidArgument, "not PEM"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				resp, err := rawCall(t, f, tc.token, tc.csr)
				require.Nil(t, resp, "no certificate")
				st, _ := status.FromError(err)
				require.Equal(t, tc.code, st.Code(), st.Message())
				require.Contains(t, st.Message(), tc.want)
				if tc.token != "" {
					require.NotContains(t, f.logs.String(), tc.token, "the token never reaches the log")
				}
			})
		}
		require.Contains(t, f.logs.String(), "refused certificate request")
	})

	t.Run("restart keeps the root", func(t *testing.T) {
		again := startCA(t, a, clk)
		require.True(t, again.ca.SigningCertificate().Equal(f.ca.SigningCertificate()))
	})

	t.Run("mTLS stays up across certificate and root rotation", func(t *testing.T) {
		client := newIdentity(t, f, kc, "demo", "client")
		server := newIdentity(t, f, kc, "demo", "server")
		conn, serverSerials := mtlsPair(t, clk, client, server)

		echoOK := func(msg string) {
			t.Helper()
			require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
			_, err := conn.Write([]byte(msg))
			require.NoError(t, err)
			buf := make([]byte, len(msg))
			_, err = io.ReadFull(conn, buf)
			require.NoError(t, err)
			require.Equal(t, msg, string(buf))
		}
		echoOK("before")
		first, _ := client.GetX509SVID()

		// Workload certificate rotation at half-life.
		advance(t, f, ca.DefaultCertTTL/2+2*time.Hour, client, server)
		renewed, _ := client.GetX509SVID()
		require.NotEqual(t, first.Certificates[0].SerialNumber, renewed.Certificates[0].SerialNumber)
		echoOK("after workload rotation")

		// Root rotation: publish, activate, renew, retire.
		oldRoot := f.ca.SigningCertificate()
		require.NoError(t, ca.RequestRotation(t.Context(), kc, "isthmus-system", ""))
		require.NoError(t, f.ca.Reconcile(t.Context()))
		// Until the publish delay has passed, the old root signs, and every
		// workload renews at least once, learning the new root.
		advance(t, f, ca.MinPublishDelay(ca.DefaultMaxTTL)-time.Hour, client, server)
		require.True(t, f.ca.SigningCertificate().Equal(oldRoot))
		for _, w := range []*identity.Source{client, server} {
			b, err := w.GetX509BundleForTrustDomain(td)
			require.NoError(t, err)
			require.Len(t, b.X509Authorities(), 2, "every workload trusts the new root before it signs")
		}
		echoOK("new root published")
		advance(t, f, 2*time.Hour, client, server)
		newRoot := f.ca.SigningCertificate()
		require.False(t, newRoot.Equal(oldRoot), "new root signs after the publish delay")
		advance(t, f, ca.DefaultCertTTL/2+2*time.Hour, client, server)
		svid, _ := client.GetX509SVID()
		require.NoError(t, svid.Certificates[0].CheckSignatureFrom(newRoot), "workloads renewed under the new root")
		echoOK("after root activation")

		// A new connection now uses the new certificates.
		_, serials := mtlsPair(t, clk, client, server)
		require.NotEqual(t, serverSerials, serials)

		advance(t, f, ca.DefaultMaxTTL, client, server)
		require.NoError(t, f.ca.Reconcile(t.Context()))
		require.Len(t, f.ca.Bundle().X509Authorities(), 1, "old root retired")
		echoOK("after the old root retired")
		advance(t, f, ca.DefaultCertTTL/2+2*time.Hour, client, server)
		for _, w := range []*identity.Source{client, server} {
			b, err := w.GetX509BundleForTrustDomain(td)
			require.NoError(t, err)
			require.Equal(t, []*x509.Certificate{newRoot}, b.X509Authorities(), "workloads stop trusting the retired root at their next renewal")
		}
		echoOK("after workloads dropped the retired root")
		mtlsPair(t, clk, client, server)
	})

	t.Run("plugged-in cacerts is used", func(t *testing.T) {
		root, inter, interKey := corporatePKI(t)
		keyDER, err := x509.MarshalPKCS8PrivateKey(interKey)
		require.NoError(t, err)
		pemCert := func(c *x509.Certificate) []byte {
			return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
		}
		_, err = kc.CoreV1().Secrets("isthmus-system").Create(t.Context(), &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: "isthmus-system", Name: ca.PluggedSecretName},
			Data: map[string][]byte{
				ca.KeyCACert:    pemCert(inter),
				ca.KeyCAKey:     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
				ca.KeyRootCert:  pemCert(root),
				ca.KeyCertChain: append(pemCert(inter), pemCert(root)...),
			},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		plugged := startCA(t, a, clocktesting.NewFakeClock(time.Now()))
		require.True(t, plugged.ca.Plugged())
		src := newIdentity(t, plugged, kc, "demo", "client")
		svid, err := src.GetX509SVID()
		require.NoError(t, err)
		require.Len(t, svid.Certificates, 2, "leaf and the corporate intermediate")
		require.True(t, svid.Certificates[1].Equal(inter))
		require.NoError(t, svid.Certificates[0].CheckSignatureFrom(inter))
	})

	if !env.Isolated() {
		t.Log("e2e: not running as root: isolation is NOT enforced")
	}
}

// corporatePKI is an operator's own CA: a root, and an intermediate for
// the cluster that signs.
func corporatePKI(t *testing.T) (root, inter *x509.Certificate, interKey *ecdsa.PrivateKey) {
	t.Helper()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	interKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	now := time.Now()
	mk := func(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
		require.NoError(t, err)
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		return c
	}
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "corp root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	root = mk(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	inter = mk(&x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "a.mesh intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}, root, interKey.Public(), rootKey)
	return root, inter, interKey
}

// advance moves the fake clock by total in one-hour steps, taking any due
// CA step and waiting for each workload whose certificate passed its
// renewal point (half-life plus the 10% jitter) to renew, as they would
// in real time.
func advance(t *testing.T, f *caFixture, total time.Duration, sources ...*identity.Source) {
	t.Helper()
	const step = time.Hour
	for moved := time.Duration(0); moved < total; moved += step {
		before := make([]string, len(sources))
		for i, s := range sources {
			svid, _ := s.GetX509SVID()
			before[i] = svid.Certificates[0].SerialNumber.String()
		}
		f.clock.Step(step)
		require.NoError(t, f.ca.Reconcile(t.Context()))
		// Give renewals that became due time to finish.
		for i, s := range sources {
			svid, _ := s.GetX509SVID()
			leaf := svid.Certificates[0]
			if f.clock.Now().Sub(leaf.NotBefore) > leaf.NotAfter.Sub(leaf.NotBefore)*56/100 {
				require.Eventually(t, func() bool {
					svid, _ := s.GetX509SVID()
					return svid.Certificates[0].SerialNumber.String() != before[i]
				}, 30*time.Second, 10*time.Millisecond, "workload %d did not renew", i)
			}
		}
	}
}

// mtlsConfig is go-spiffe's mTLS configuration (certificate from the
// source at every handshake, peer verified against the bundle of its own
// trust domain, then authorized) with one change: verification happens at
// the fake clock's time, because the CA runs on that clock and its
// certificates are valid in the fake future, not at the wall clock's time.
func mtlsConfig(src *identity.Source, clk *clocktesting.FakeClock, authorized spiffeid.Matcher, server bool) *tls.Config {
	getCert := func() (*tls.Certificate, error) {
		svid, err := src.GetX509SVID()
		if err != nil {
			return nil, err
		}
		c := &tls.Certificate{PrivateKey: svid.PrivateKey}
		for _, cert := range svid.Certificates {
			c.Certificate = append(c.Certificate, cert.Raw)
		}
		return c, nil
	}
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, _, err := x509svid.ParseAndVerify(raw, src, x509svid.WithTime(clk.Now()))
			if err != nil {
				return err
			}
			return authorized(id)
		},
	}
	if server {
		cfg.ClientAuth = tls.RequireAnyClientCert
		cfg.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return getCert() }
	} else {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return getCert() }
	}
	return cfg
}

// mtlsPair connects client to an echo server using server's SVID, both
// sides authorizing members of the trust domain, and returns the client
// connection and the serial of the certificate the server presented.
func mtlsPair(t *testing.T, clk *clocktesting.FakeClock, client, server *identity.Source) (*tls.Conn, string) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", mtlsConfig(server, clk, spiffeid.MatchMemberOf(td), true))
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	conn, err := tls.Dial("tcp", ln.Addr().String(), mtlsConfig(client, clk, spiffeid.MatchID(spiffeid.RequireFromString("spiffe://a.mesh/ns/demo/sa/server")), false))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	require.NoError(t, conn.Handshake())
	return conn, conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
}
