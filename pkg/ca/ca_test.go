package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	kubefake "k8s.io/client-go/kubernetes/fake"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("a.mesh")
	clientID = spiffeid.RequireFromString("spiffe://a.mesh/ns/demo/sa/client")
)

func newCSR(t testing.TB, key crypto.Signer, uris ...string) *x509.CertificateRequest {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		tmpl.URIs = append(tmpl.URIs, mustURL(t, u))
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	require.NoError(t, err)
	csr, err := x509.ParseCertificateRequest(der)
	require.NoError(t, err)
	return csr
}

func mustURL(t testing.TB, s string) *url.URL {
	u, err := url.Parse(s)
	require.NoError(t, err)
	return u
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

func newCA(t *testing.T, client kubernetes.Interface, clk *clocktesting.FakeClock) *CA {
	t.Helper()
	c, err := New(t.Context(), client, Options{
		TrustDomain: td, Namespace: "isthmus-system", Clock: clk,
		PublishDelay: time.Hour, SyncInterval: 10 * time.Second,
	})
	require.NoError(t, err)
	return c
}

// verify checks a chain the way a workload does: go-spiffe's X509-SVID
// verification against the trust domain's bundle.
func verify(t *testing.T, c *CA, chain []*x509.Certificate, at time.Time) spiffeid.ID {
	t.Helper()
	id, _, err := x509svid.Verify(chain, c.Bundle(), x509svid.WithTime(at))
	require.NoError(t, err)
	return id
}

func TestRootIsGeneratedOnceAndShared(t *testing.T) {
	client := kubefake.NewClientset()
	clk := clocktesting.NewFakeClock(time.Now())
	first := newCA(t, client, clk)
	sec, err := client.CoreV1().Secrets("isthmus-system").Get(t.Context(), DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEmpty(t, sec.Data[KeyCAKey])

	// A restart, or a second replica, uses the same root.
	second := newCA(t, client, clk)
	require.True(t, first.SigningCertificate().Equal(second.SigningCertificate()))
	require.False(t, second.Plugged())

	root := first.SigningCertificate()
	require.True(t, root.IsCA)
	require.IsType(t, &ecdsa.PublicKey{}, root.PublicKey)
	require.Equal(t, elliptic.P256(), root.PublicKey.(*ecdsa.PublicKey).Curve)
}

func TestSignIssuesOnlyTheCallersIdentity(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCA(t, kubefake.NewClientset(), clk)

	for _, tc := range []struct {
		name string
		csr  *x509.CertificateRequest
	}{
		{"no SAN in CSR", newCSR(t, ecKey(t))},
		{"matching SAN in CSR", newCSR(t, ecKey(t), clientID.String())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := c.Sign(t.Context(), tc.csr, clientID, 0)
			require.NoError(t, err)
			require.Len(t, chain, 1)
			leaf := chain[0]
			require.Len(t, leaf.URIs, 1)
			require.Equal(t, clientID.String(), leaf.URIs[0].String())
			require.Empty(t, leaf.DNSNames)
			require.False(t, leaf.IsCA)
			require.Equal(t, DefaultCertTTL+backdate, leaf.NotAfter.Sub(leaf.NotBefore))
			require.Equal(t, clientID, verify(t, c, chain, clk.Now()))
		})
	}

	chain, err := c.Sign(t.Context(), newCSR(t, ecKey(t)), clientID, 30*24*time.Hour)
	require.NoError(t, err)
	require.Equal(t, DefaultMaxTTL+backdate, chain[0].NotAfter.Sub(chain[0].NotBefore), "lifetime capped at the maximum")
}

func TestSignRefusesBadRequests(t *testing.T) {
	c := newCA(t, kubefake.NewClientset(), clocktesting.NewFakeClock(time.Now()))
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	require.NoError(t, err)
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	require.NoError(t, err)
	tampered := newCSR(t, ecKey(t))
	tampered.Signature[len(tampered.Signature)-1] ^= 0xff
	withDNS := func() *x509.CertificateRequest {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{"evil.example"}}, ecKey(t))
		require.NoError(t, err)
		csr, err := x509.ParseCertificateRequest(der)
		require.NoError(t, err)
		return csr
	}()

	tests := []struct {
		name    string
		csr     *x509.CertificateRequest
		id      spiffeid.ID
		wantErr error
		want    string
	}{
		{"another identity", newCSR(t, ecKey(t), "spiffe://a.mesh/ns/kube-system/sa/admin"), clientID, ErrIdentityMismatch, `asks for "spiffe://a.mesh/ns/kube-system/sa/admin"`},
		{"another trust domain", newCSR(t, ecKey(t)), spiffeid.RequireFromString("spiffe://b.mesh/ns/demo/sa/client"), ErrIdentityMismatch, "not in trust domain a.mesh"},
		{"two URIs", newCSR(t, ecKey(t), clientID.String(), "spiffe://a.mesh/x"), clientID, ErrInvalidCSR, "2 URIs"},
		{"DNS names", withDNS, clientID, ErrInvalidCSR, "DNS names"},
		{"RSA 1024", newCSR(t, rsa1024), clientID, ErrInvalidCSR, "1024 bits is too small"},
		{"Ed25519", newCSR(t, edKey), clientID, ErrInvalidCSR, "ed25519"},
		{"P-224", newCSR(t, p224), clientID, ErrInvalidCSR, "P-224 is not supported"},
		{"bad signature", tampered, clientID, ErrInvalidCSR, "signature does not verify"},
		{"nil", nil, clientID, ErrInvalidCSR, "no CSR"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := c.Sign(t.Context(), tc.csr, tc.id, 0)
			require.ErrorIs(t, err, tc.wantErr)
			require.ErrorContains(t, err, tc.want)
			require.Nil(t, chain)
		})
	}
}

// testPKI is an operator's own CA: a root and an intermediate that signs.
type testPKI struct {
	rootKey, interKey *ecdsa.PrivateKey
	root, inter       *x509.Certificate
}

func newTestPKI(t *testing.T, interIsCA bool) testPKI {
	t.Helper()
	p := testPKI{rootKey: ecKey(t), interKey: ecKey(t)}
	now := time.Now()
	rootTmpl := &x509.Certificate{SerialNumber: mustSerial(t), Subject: pkix.Name{CommonName: "corp root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * 365 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, p.rootKey.Public(), p.rootKey)
	require.NoError(t, err)
	p.root, err = x509.ParseCertificate(der)
	require.NoError(t, err)
	interTmpl := &x509.Certificate{SerialNumber: mustSerial(t), Subject: pkix.Name{CommonName: "a.mesh intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * 90 * time.Hour), IsCA: interIsCA, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err = x509.CreateCertificate(rand.Reader, interTmpl, p.root, p.interKey.Public(), p.rootKey)
	require.NoError(t, err)
	p.inter, err = x509.ParseCertificate(der)
	require.NoError(t, err)
	return p
}

func mustSerial(t *testing.T) *big.Int {
	s, err := randomSerial()
	require.NoError(t, err)
	return s
}

func (p testPKI) secret(t *testing.T) *corev1.Secret {
	key, err := encodeKey(p.interKey)
	require.NoError(t, err)
	return &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "isthmus-system", Name: PluggedSecretName},
		Data: map[string][]byte{
			KeyCACert:    encodeCerts(p.inter),
			KeyCAKey:     key,
			KeyRootCert:  encodeCerts(p.root),
			KeyCertChain: encodeCerts(p.inter, p.root),
		},
	}
}

func TestPluggedCA(t *testing.T) {
	p := newTestPKI(t, true)
	client := kubefake.NewClientset(p.secret(t))
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCA(t, client, clk)
	require.True(t, c.Plugged())

	chain, err := c.Sign(t.Context(), newCSR(t, ecKey(t)), clientID, 0)
	require.NoError(t, err)
	require.Len(t, chain, 2, "leaf and the intermediate; never the root")
	require.True(t, chain[1].Equal(p.inter))
	require.Equal(t, clientID, verify(t, c, chain, clk.Now()))
	require.True(t, c.Bundle().HasX509Authority(p.root))

	sec, err := client.CoreV1().Secrets("isthmus-system").Get(t.Context(), DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err, "the bundle number is kept")
	require.Empty(t, sec.Data, "no self-signed root is generated when a CA is plugged in")
	require.Equal(t, strconv.FormatUint(c.BundleSequence(), 10), sec.Annotations[annSequence])
	require.ErrorContains(t, RequestRotation(t.Context(), client, "isthmus-system", ""), "plugged-in CA")
}

func TestPluggedCARefusesBadMaterial(t *testing.T) {
	good := newTestPKI(t, true)
	other := newTestPKI(t, true)
	notCA := newTestPKI(t, false)
	otherKey, err := encodeKey(ecKey(t))
	require.NoError(t, err)
	tests := []struct {
		name string
		mut  func(*corev1.Secret)
		want string
	}{
		{"key does not match", func(s *corev1.Secret) { s.Data[KeyCAKey] = otherKey }, "ca-key.pem does not match"},
		{"not a CA", func(s *corev1.Secret) { *s = *notCA.secret(t) }, "not a CA certificate"},
		{"wrong root", func(s *corev1.Secret) { s.Data[KeyRootCert] = encodeCerts(other.root) }, "does not chain to root-cert.pem"},
		{"garbage cert", func(s *corev1.Secret) { s.Data[KeyCACert] = []byte("not pem") }, "ca-cert.pem: no PEM certificate"},
		{"missing key", func(s *corev1.Secret) { delete(s.Data, KeyCAKey) }, "ca-key.pem: no PEM private key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sec := good.secret(t)
			tc.mut(sec)
			_, err := New(t.Context(), kubefake.NewClientset(sec), Options{TrustDomain: td, Namespace: "isthmus-system"})
			require.ErrorIs(t, err, ErrInvalidCA)
			require.ErrorContains(t, err, "Secret isthmus-system/cacerts")
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestRootRotation(t *testing.T) {
	ctx := t.Context()
	client := kubefake.NewClientset()
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCA(t, client, clk)
	replica := newCA(t, client, clk)
	oldRoot := c.SigningCertificate()
	seq0 := c.BundleSequence()
	oldLeaf, err := c.Sign(ctx, newCSR(t, ecKey(t)), clientID, 0)
	require.NoError(t, err)

	require.NoError(t, RequestRotation(ctx, client, "isthmus-system", ""))
	require.NoError(t, RequestRotation(ctx, client, "isthmus-system", ""), "a second request before the first is taken is harmless")
	require.NoError(t, c.Reconcile(ctx))
	require.NoError(t, replica.Reconcile(ctx))

	// Prepared: both roots trusted, the old one still signs.
	require.Len(t, c.Bundle().X509Authorities(), 2)
	require.Greater(t, c.BundleSequence(), seq0)
	require.True(t, c.SigningCertificate().Equal(oldRoot), "the new root signs nothing before PublishDelay")
	require.True(t, replica.Bundle().Equal(c.Bundle()), "replicas agree")
	st, err := c.RotationStatus(ctx)
	require.NoError(t, err)
	require.Equal(t, phasePrepared, st.Phase)
	require.ErrorContains(t, RequestRotation(ctx, client, "isthmus-system", ""), "already in progress")

	clk.Step(30 * time.Minute)
	require.NoError(t, c.Reconcile(ctx))
	require.True(t, c.SigningCertificate().Equal(oldRoot))

	// Active: the new root signs; certificates from the old one still verify.
	clk.Step(31 * time.Minute)
	require.NoError(t, c.Reconcile(ctx))
	require.NoError(t, replica.Reconcile(ctx))
	newRoot := c.SigningCertificate()
	require.False(t, newRoot.Equal(oldRoot))
	require.True(t, replica.SigningCertificate().Equal(newRoot))
	newLeaf, err := c.Sign(ctx, newCSR(t, ecKey(t)), clientID, 0)
	require.NoError(t, err)
	verify(t, c, newLeaf, clk.Now())
	verify(t, c, oldLeaf, clk.Now())

	// Not yet retired while old certificates may live.
	clk.Step(DefaultMaxTTL - time.Hour)
	require.NoError(t, c.Reconcile(ctx))
	require.Len(t, c.Bundle().X509Authorities(), 2)

	// Retired: only the new root remains, after every old leaf expired.
	clk.Step(2 * time.Hour)
	require.True(t, clk.Now().After(oldLeaf[0].NotAfter))
	require.NoError(t, c.Reconcile(ctx))
	require.Equal(t, []*x509.Certificate{newRoot}, c.Bundle().X509Authorities())
	fresh, err := c.Sign(ctx, newCSR(t, ecKey(t)), clientID, 0)
	require.NoError(t, err)
	verify(t, c, fresh, clk.Now())
	_, _, err = x509svid.Verify(oldLeaf, c.Bundle(), x509svid.WithTime(oldLeaf[0].NotBefore.Add(time.Minute)))
	require.Error(t, err, "the old root is no longer trusted")
	st, err = c.RotationStatus(ctx)
	require.NoError(t, err)
	require.Empty(t, st.Phase)
	require.Equal(t, 1, st.Roots)
}

// The bundle's sequence number never goes down, whatever the source of the
// roots, and the same roots keep their number across restarts: peers
// refuse a bundle numbered lower than the one they hold, for good.
func TestBundleSequenceIsDurable(t *testing.T) {
	ctx := t.Context()
	secrets := func(c kubernetes.Interface) func() typedcorev1.SecretInterface {
		return func() typedcorev1.SecretInterface { return c.CoreV1().Secrets("isthmus-system") }
	}

	t.Run("plugged, self-signed, plugged, self-signed", func(t *testing.T) {
		first, second := newTestPKI(t, true), newTestPKI(t, true)
		client := kubefake.NewClientset(first.secret(t))
		sec := secrets(client)
		clk := clocktesting.NewFakeClock(time.Now())

		plugged := newCA(t, client, clk)
		require.True(t, plugged.Plugged())
		seq := plugged.BundleSequence()
		require.NotZero(t, seq)

		// Rolling restarts, hours apart, and a second replica: same roots,
		// same number.
		clk.Step(3 * time.Hour)
		require.Equal(t, seq, newCA(t, client, clk).BundleSequence())
		require.Equal(t, seq, newCA(t, client, clk).BundleSequence())
		st, err := ReadStatus(ctx, client, "isthmus-system")
		require.NoError(t, err)
		require.Equal(t, seq, st.Sequence)

		// The operator removes cacerts: a self-signed root, numbered
		// higher even at the same instant.
		require.NoError(t, sec().Delete(ctx, PluggedSecretName, metav1.DeleteOptions{}))
		self := newCA(t, client, clk)
		require.False(t, self.Plugged())
		require.Greater(t, self.BundleSequence(), seq)
		seq = self.BundleSequence()
		clk.Step(time.Hour)
		require.Equal(t, seq, newCA(t, client, clk).BundleSequence(), "a restart keeps the number")
		selfRoot := self.SigningCertificate()

		// Another corporate CA is plugged in, then removed again: the
		// self-signed root comes back, with a higher number than either.
		_, err = sec().Create(ctx, second.secret(t), metav1.CreateOptions{})
		require.NoError(t, err)
		again := newCA(t, client, clk)
		require.True(t, again.Plugged())
		require.Greater(t, again.BundleSequence(), seq)
		seq = again.BundleSequence()
		require.NoError(t, sec().Delete(ctx, PluggedSecretName, metav1.DeleteOptions{}))
		back := newCA(t, client, clk)
		require.True(t, back.SigningCertificate().Equal(selfRoot), "the self-signed root was kept")
		require.Greater(t, back.BundleSequence(), seq)
	})

	t.Run("plugged-in CA changes while running", func(t *testing.T) {
		first, second := newTestPKI(t, true), newTestPKI(t, true)
		client := kubefake.NewClientset(first.secret(t))
		clk := clocktesting.NewFakeClock(time.Now())
		c := newCA(t, client, clk)
		seq := c.BundleSequence()
		require.NoError(t, c.Reconcile(ctx))
		require.Equal(t, seq, c.BundleSequence())
		_, err := secrets(client)().Update(ctx, second.secret(t), metav1.UpdateOptions{})
		require.NoError(t, err)
		require.NoError(t, c.Reconcile(ctx))
		require.True(t, c.Bundle().HasX509Authority(second.root))
		require.Greater(t, c.BundleSequence(), seq)
	})

	t.Run("CA Secret recreated", func(t *testing.T) {
		client := kubefake.NewClientset()
		clk := clocktesting.NewFakeClock(time.Now())
		c := newCA(t, client, clk)
		// A rotation or two have moved the number on.
		for range 2 {
			require.NoError(t, RequestRotation(ctx, client, "isthmus-system", ""))
			require.NoError(t, c.Reconcile(ctx))
			clk.Step(2 * time.Hour)
			require.NoError(t, c.Reconcile(ctx))
			clk.Step(DefaultMaxTTL + time.Hour)
			require.NoError(t, c.Reconcile(ctx))
		}
		seq := c.BundleSequence()

		require.NoError(t, secrets(client)().Delete(ctx, DefaultSecretName, metav1.DeleteOptions{}))
		clk.Step(time.Minute)
		fresh := newCA(t, client, clk)
		require.False(t, fresh.SigningCertificate().Equal(c.SigningCertificate()), "a new root")
		require.Greater(t, fresh.BundleSequence(), seq)
	})

	t.Run("number kept before the roots were named", func(t *testing.T) {
		client := kubefake.NewClientset()
		clk := clocktesting.NewFakeClock(time.Now())
		newCA(t, client, clk)
		s, err := secrets(client)().Get(ctx, DefaultSecretName, metav1.GetOptions{})
		require.NoError(t, err)
		delete(s.Annotations, annRootsDigest)
		s.Annotations[annSequence] = "7"
		_, err = secrets(client)().Update(ctx, s, metav1.UpdateOptions{})
		require.NoError(t, err)
		require.Equal(t, uint64(7), newCA(t, client, clk).BundleSequence(), "an upgrade keeps the number peers hold")
	})
}

// publishedRotation is a CA whose rotation was asked for and has
// published its new root (the prepared phase).
func publishedRotation(t *testing.T) (*kubefake.Clientset, *clocktesting.FakeClock, *CA) {
	t.Helper()
	client := kubefake.NewClientset()
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCA(t, client, clk)
	require.NoError(t, RequestRotation(t.Context(), client, "isthmus-system", ""))
	require.NoError(t, c.Reconcile(t.Context()))
	return client, clk, c
}

// In the prepared phase of a rotation the Secret must hold the next root
// in root-cert.pem, its matching key and its activation time: a Secret
// that lost any is refused, and the CA keeps the bundle it had rather than drop the root
// every workload must trust before it signs.
func TestPreparedRotationStateIsChecked(t *testing.T) {
	otherKey, err := encodeKey(ecKey(t))
	require.NoError(t, err)
	tests := []struct {
		name string
		mut  func(t *testing.T, s *corev1.Secret)
		want string
	}{
		{"next root dropped from the roots", func(t *testing.T, s *corev1.Secret) {
			roots, err := parseCerts(s.Data[KeyRootCert])
			require.NoError(t, err)
			s.Data[KeyRootCert] = encodeCerts(roots[0])
		}, "next-ca-cert.pem is not among the roots in root-cert.pem"},
		{"roots truncated in the next root", func(t *testing.T, s *corev1.Secret) {
			s.Data[KeyRootCert] = s.Data[KeyRootCert][:len(s.Data[KeyRootCert])-100]
		}, "root-cert.pem: PEM block 2 is truncated or corrupt"},
		{"next key is another key", func(t *testing.T, s *corev1.Secret) {
			s.Data[keyNextKey] = otherKey
		}, "next-ca-key.pem does not match the public key of next-ca-cert.pem"},
		// Without its time, the new root would sign at once, before
		// workloads trust it.
		{"activation time lost", func(t *testing.T, s *corev1.Secret) {
			delete(s.Annotations, annActivateAt)
		}, `rotation phase "prepared" without annotation ` + annActivateAt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			client, clk, c := publishedRotation(t)
			bundle, seq := c.Bundle(), c.BundleSequence()
			require.Len(t, bundle.X509Authorities(), 2)

			secrets := client.CoreV1().Secrets("isthmus-system")
			sec, err := secrets.Get(ctx, DefaultSecretName, metav1.GetOptions{})
			require.NoError(t, err)
			tc.mut(t, sec)
			_, err = secrets.Update(ctx, sec, metav1.UpdateOptions{})
			require.NoError(t, err)

			err = c.Reconcile(ctx)
			require.ErrorIs(t, err, ErrInvalidCA)
			require.ErrorContains(t, err, tc.want)
			require.True(t, c.Bundle().Equal(bundle), "the bundle is kept")
			require.Equal(t, seq, c.BundleSequence())
			_, err = c.RotationStatus(ctx)
			require.ErrorContains(t, err, tc.want)

			// Not even at activation time does the CA take it.
			clk.Step(2 * time.Hour)
			require.ErrorIs(t, c.Reconcile(ctx), ErrInvalidCA)
			require.True(t, c.Bundle().Equal(bundle))
		})
	}
}

func TestSelfSourceRenews(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCA(t, kubefake.NewClientset(), clk)
	fedID := spiffeid.RequireFromString("spiffe://a.mesh/ns/isthmus-system/sa/isthmus-federator")
	s, err := NewSelfSource(c.Authority, fedID, clk)
	require.NoError(t, err)
	first, err := s.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, fedID, first.ID)

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	require.Eventually(t, clk.HasWaiters, 5*time.Second, time.Millisecond)
	clk.Step(DefaultCertTTL/2 + time.Minute)
	require.Eventually(t, func() bool {
		svid, _ := s.GetX509SVID()
		return !svid.Certificates[0].Equal(first.Certificates[0])
	}, 5*time.Second, time.Millisecond)
	cancel()
	require.NoError(t, <-done)
}

func BenchmarkSign(b *testing.B) {
	c, err := New(b.Context(), kubefake.NewClientset(), Options{TrustDomain: td, Namespace: "isthmus-system"})
	require.NoError(b, err)
	csr := newCSR(b, ecKey(b), clientID.String())
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Sign(b.Context(), csr, clientID, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}

// TestPublishRoots: the roots ConfigMap a pod mounts to trust the CA
// follows the bundle through a rotation, is not rewritten when nothing
// changed, and a tampered copy is put right at the next publish.
func TestPublishRoots(t *testing.T) {
	ctx := t.Context()
	client := kubefake.NewClientset()
	clk := clocktesting.NewFakeClock(time.Now())
	c := newCA(t, client, clk)
	published := func() []*x509.Certificate {
		t.Helper()
		cm, err := client.CoreV1().ConfigMaps("isthmus-system").Get(ctx, RootsConfigMapName, metav1.GetOptions{})
		require.NoError(t, err)
		require.Equal(t, "isthmus", cm.Labels["app.kubernetes.io/part-of"])
		require.Equal(t, "isthmus", cm.Labels["app.kubernetes.io/managed-by"], "so the federator's roots publisher keeps it too")
		roots, err := parseCerts([]byte(cm.Data[KeyRootCert]))
		require.NoError(t, err)
		return roots
	}
	writes := func() int {
		n := 0
		for _, a := range client.Actions() {
			if a.GetResource().Resource == "configmaps" && (a.GetVerb() == "create" || a.GetVerb() == "update") {
				n++
			}
		}
		return n
	}

	require.NoError(t, c.PublishRoots(ctx))
	require.Equal(t, c.Bundle().X509Authorities(), published())
	require.NotContains(t, configMapData(t, client), "PRIVATE KEY", "roots only, never a key")
	require.NoError(t, c.PublishRoots(ctx))
	require.Equal(t, 1, writes(), "an unchanged bundle is not written again")

	// A rotation publishes the new root next to the old one before it signs.
	require.NoError(t, RequestRotation(ctx, client, "isthmus-system", ""))
	require.NoError(t, c.Reconcile(ctx))
	require.NoError(t, c.PublishRoots(ctx))
	require.Len(t, published(), 2)
	require.Equal(t, c.Bundle().X509Authorities(), published())

	// Someone edits the ConfigMap: the next publish restores the roots and
	// keeps the other keys.
	cm, err := client.CoreV1().ConfigMaps("isthmus-system").Get(ctx, RootsConfigMapName, metav1.GetOptions{})
	require.NoError(t, err)
	cm.Data[KeyRootCert] = string(encodeCerts(c.Bundle().X509Authorities()[0]))
	cm.Data["note"] = "kept"
	_, err = client.CoreV1().ConfigMaps("isthmus-system").Update(ctx, cm, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.NoError(t, c.PublishRoots(ctx))
	require.Len(t, published(), 2)
	cm, err = client.CoreV1().ConfigMaps("isthmus-system").Get(ctx, RootsConfigMapName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "kept", cm.Data["note"])

	// A ConfigMap from before the label (or made by hand) is labelled.
	delete(cm.Labels, "app.kubernetes.io/managed-by")
	_, err = client.CoreV1().ConfigMaps("isthmus-system").Update(ctx, cm, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.NoError(t, c.PublishRoots(ctx))
	require.Len(t, published(), 2)
}

// configMapData joins the data of every ConfigMap in isthmus-system.
func configMapData(t *testing.T, client kubernetes.Interface) string {
	t.Helper()
	list, err := client.CoreV1().ConfigMaps("isthmus-system").List(t.Context(), metav1.ListOptions{})
	require.NoError(t, err)
	var all string
	for _, cm := range list.Items {
		for _, v := range cm.Data {
			all += v
		}
	}
	return all
}

// Replicas race to write the CA Secret. The loser reads again and takes
// what the winner wrote rather than overwrite it; a Secret that keeps
// changing is an error after a bounded number of attempts.
func TestSecretWriteRaces(t *testing.T) {
	ctx := t.Context()
	t.Run("plugged: another replica numbered the roots first", func(t *testing.T) {
		p := newTestPKI(t, true)
		client := kubefake.NewClientset(p.secret(t))
		lost := false
		client.PrependReactor("create", "secrets", func(a k8stesting.Action) (bool, runtime.Object, error) {
			sec := a.(k8stesting.CreateAction).GetObject().(*corev1.Secret)
			if lost || sec.Name != DefaultSecretName {
				return false, nil, nil
			}
			lost = true
			winner := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: sec.Namespace, Name: sec.Name,
				Annotations: map[string]string{annSequence: "42", annRootsDigest: rootsDigest([]*x509.Certificate{p.root})}}}
			require.NoError(t, client.Tracker().Add(winner))
			return true, nil, apierrors.NewAlreadyExists(corev1.Resource("secrets"), sec.Name)
		})
		c := newCA(t, client, clocktesting.NewFakeClock(time.Now()))
		require.True(t, lost)
		require.Equal(t, uint64(42), c.BundleSequence(), "the winner's number")
	})
	t.Run("self-signed: updates keep conflicting", func(t *testing.T) {
		client := kubefake.NewClientset()
		c := newCA(t, client, clocktesting.NewFakeClock(time.Now()))
		bundle := c.Bundle()
		require.NoError(t, RequestRotation(ctx, client, "isthmus-system", ""))
		updates := 0
		client.PrependReactor("update", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
			updates++
			return true, nil, apierrors.NewConflict(corev1.Resource("secrets"), DefaultSecretName, nil)
		})
		require.ErrorContains(t, c.Reconcile(ctx), "kept changing under us")
		require.Equal(t, 5, updates, "bounded")
		require.True(t, c.Bundle().Equal(bundle), "the bundle is kept")
	})
}

// A plugged-in CA whose intermediate expires before its signer: a leaf
// never outlives the intermediate (it stopped verifying at the
// intermediate's expiry, long before its renewal), and a renewed
// intermediate put in cert-chain.pem is used from the next Reconcile,
// without a restart.
func TestPluggedCALeavesEndWithTheirChain(t *testing.T) {
	now := time.Now()
	rootKey, midKey, signerKey := ecKey(t), ecKey(t), ecKey(t)
	certify := func(tmpl, parent *x509.Certificate, pub any, key *ecdsa.PrivateKey) *x509.Certificate {
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
		require.NoError(t, err)
		c, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		return c
	}
	ca := func(name string, notAfter time.Time) *x509.Certificate {
		return &x509.Certificate{SerialNumber: mustSerial(t), Subject: pkix.Name{CommonName: name},
			NotBefore: now.Add(-time.Hour), NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	}
	rootTmpl := ca("corp root", now.Add(10*365*24*time.Hour))
	root := certify(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	mid := certify(ca("corp mid", now.Add(2*time.Hour)), root, midKey.Public(), rootKey)
	signer := certify(ca("a.mesh signer", now.Add(90*24*time.Hour)), mid, signerKey.Public(), midKey)
	key, err := encodeKey(signerKey)
	require.NoError(t, err)
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "isthmus-system", Name: PluggedSecretName},
		Data: map[string][]byte{KeyCACert: encodeCerts(signer), KeyCAKey: key, KeyRootCert: encodeCerts(root),
			KeyCertChain: encodeCerts(signer, mid, root)},
	}
	client := kubefake.NewClientset(sec)
	clk := clocktesting.NewFakeClock(now)
	c := newCA(t, client, clk)

	chain, err := c.Sign(t.Context(), newCSR(t, ecKey(t)), clientID, 24*time.Hour)
	require.NoError(t, err)
	require.False(t, chain[0].NotAfter.After(mid.NotAfter), "the leaf ends by its intermediate: %s after %s", chain[0].NotAfter, mid.NotAfter)

	// The operator renews the intermediate (same key) and updates
	// cert-chain.pem.
	mid2 := certify(ca("corp mid", now.Add(365*24*time.Hour)), root, midKey.Public(), rootKey)
	sec.Data[KeyCertChain] = encodeCerts(signer, mid2, root)
	_, err = client.CoreV1().Secrets("isthmus-system").Update(t.Context(), sec, metav1.UpdateOptions{})
	require.NoError(t, err)
	seq := c.BundleSequence()
	require.NoError(t, c.Reconcile(t.Context()))
	chain, err = c.Sign(t.Context(), newCSR(t, ecKey(t)), clientID, 24*time.Hour)
	require.NoError(t, err)
	require.True(t, chain[len(chain)-1].Equal(mid2), "the leaf carries the renewed intermediate")
	require.WithinDuration(t, now.Add(24*time.Hour), chain[0].NotAfter, time.Second, "and its whole TTL")
	require.Equal(t, clientID, verify(t, c, chain, now.Add(3*time.Hour)))
	require.Equal(t, seq, c.BundleSequence(), "the roots did not change: the bundle is the same")
}

// After activation the old root stays in the bundle until its retirement
// time: a Secret that lost that time is refused, rather than taken as
// "retire now" while leaves the old root signed are still valid.
func TestActiveRotationNeedsItsRetirementTime(t *testing.T) {
	ctx := t.Context()
	client, clk, c := publishedRotation(t)
	clk.Step(2 * time.Hour) // past the publish delay
	require.NoError(t, c.Reconcile(ctx))
	bundle := c.Bundle()
	require.Len(t, bundle.X509Authorities(), 2, "active: both roots trusted")

	secrets := client.CoreV1().Secrets("isthmus-system")
	sec, err := secrets.Get(ctx, DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, phaseActive, sec.Annotations[annPhase])
	delete(sec.Annotations, annRetireAt)
	_, err = secrets.Update(ctx, sec, metav1.UpdateOptions{})
	require.NoError(t, err)
	err = c.Reconcile(ctx)
	require.ErrorIs(t, err, ErrInvalidCA)
	require.ErrorContains(t, err, `rotation phase "active" without annotation `+annRetireAt)
	require.True(t, c.Bundle().Equal(bundle), "the old root is still trusted")
}
