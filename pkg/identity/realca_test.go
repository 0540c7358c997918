package identity

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// The workload side against pkg/ca's real signer: a self-signed root, and
// an operator's plugged-in CA whose signing certificate is an intermediate
// (so the SVID carries leaf and intermediate, and the bundle only the root).
func TestWithRealCA(t *testing.T) {
	tests := []struct {
		name      string
		objects   func(t *testing.T) []*corev1.Secret
		wantChain int
	}{
		{name: "self-signed root", objects: func(*testing.T) []*corev1.Secret { return nil }, wantChain: 1},
		{name: "plugged-in cacerts with an intermediate", objects: pluggedCACerts, wantChain: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs := fake.NewClientset()
			for _, sec := range tt.objects(t) {
				_, err := cs.CoreV1().Secrets(sec.Namespace).Create(t.Context(), sec, metav1.CreateOptions{})
				require.NoError(t, err)
			}
			authority, err := ca.New(t.Context(), cs, ca.Options{TrustDomain: testTD, Namespace: "isthmus-system"})
			require.NoError(t, err)

			// The federator's serving SVID, from the same authority.
			fedKey := newKey(t)
			csr, err := x509.CreateCertificateRequest(randReader, &x509.CertificateRequest{URIs: []*url.URL{federatorID.URL()}}, fedKey)
			require.NoError(t, err)
			parsed, err := x509.ParseCertificateRequest(csr)
			require.NoError(t, err)
			fedChain, err := authority.Sign(t.Context(), parsed, federatorID, time.Hour)
			require.NoError(t, err)
			serving := &x509svid.SVID{ID: federatorID, Certificates: fedChain, PrivateKey: fedKey}
			srv := serveCA(t, authority, serving, nil, nil)

			var roots []byte
			for _, r := range authority.Bundle().X509Authorities() {
				roots = append(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
			}
			cfg := Config{
				CAAddress: srv.addr, CAID: federatorID, RootsPEM: roots,
				TrustDomain: testTD, Namespace: "demo", ServiceAccount: "web",
				TokenSource: staticToken("tok:demo:web"), TTL: 30 * time.Minute,
				Logger: testLogger(t),
			}
			s := newSource(t, cfg)

			svid, err := s.GetX509SVID()
			require.NoError(t, err)
			require.Equal(t, webID, svid.ID)
			require.Len(t, svid.Certificates, tt.wantChain, "leaf and intermediates, no root")
			leaf := svid.Certificates[0]
			require.WithinDuration(t, time.Now().Add(30*time.Minute), leaf.NotAfter, time.Minute, "the TTL asked for")
			id, chains, err := x509svid.Verify(svid.Certificates, s)
			require.NoError(t, err)
			require.Equal(t, webID, id)
			root := chains[0][len(chains[0])-1]
			require.True(t, authority.Bundle().HasX509Authority(root))
			b, err := s.GetX509BundleForTrustDomain(testTD)
			require.NoError(t, err)
			require.True(t, b.Equal(authority.Bundle()), "bundle is the CA's roots, nothing more")
		})
	}
}

// pluggedCACerts is an Istio-style "cacerts" Secret: root, and an
// intermediate that signs.
func pluggedCACerts(t *testing.T) []*corev1.Secret {
	rootKey, root := newRoot(t, "operator root", time.Now(), 365*24*time.Hour)
	interKey := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{Organization: []string{"isthmus test"}, CommonName: "cluster-a intermediate"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{testTD.ID().URL()},
	}
	der, err := x509.CreateCertificate(randReader, tmpl, root, interKey.Public(), rootKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalPKCS8PrivateKey(interKey)
	require.NoError(t, err)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	rootPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw})
	return []*corev1.Secret{{
		ObjectMeta: metav1.ObjectMeta{Namespace: "isthmus-system", Name: ca.PluggedSecretName},
		Data: map[string][]byte{
			ca.KeyCACert:    certPEM,
			ca.KeyCAKey:     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
			ca.KeyRootCert:  rootPEM,
			ca.KeyCertChain: append(append([]byte{}, certPEM...), rootPEM...),
		},
	}}
}
