package federator

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net/url"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// The certificate service setUpIdentity wires reviews tokens through the
// review client, never the federator's own, and through the cache: a
// caller repeating a junk token costs one TokenReview.
func TestCertificateServiceReviewsThroughItsOwnCachedClient(t *testing.T) {
	kube, review := fake.NewClientset(), fake.NewClientset()
	var reviews atomic.Int64
	review.PrependReactor("create", "tokenreviews", func(k8stesting.Action) (bool, runtime.Object, error) {
		reviews.Add(1)
		return true, &authv1.TokenReview{Status: authv1.TokenReviewStatus{Error: "invalid bearer token"}}, nil
	})
	kube.PrependReactor("create", "tokenreviews", func(k8stesting.Action) (bool, runtime.Object, error) {
		t.Error("a token was reviewed through the federator's own client")
		return true, &authv1.TokenReview{}, nil
	})
	cfg := DefaultConfig()
	cfg.ClusterName, cfg.Namespace = "a", "isthmus-system"
	f := &Federator{cfg: cfg, log: slog.New(slog.DiscardHandler), provider: sdkmetric.NewMeterProvider()}
	require.NoError(t, f.setUpIdentity(t.Context(), kube, review))

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{{Scheme: "spiffe", Host: "a.mesh", Path: "/ns/demo/sa/web"}},
	}, key)
	require.NoError(t, err)
	req := &pb.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))}
	ctx := metadata.NewIncomingContext(t.Context(), metadata.Pairs("authorization", "Bearer junk"))
	for range 5 {
		_, err := f.caServer.CreateCertificate(ctx, req)
		require.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
	}
	require.EqualValues(t, 1, reviews.Load(), "five requests with one junk token: one review")
}
