package federator

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// A flood of TokenReviews through the certificate service's client uses up
// that client's budget only: the federator's own requests still go out at
// once. Both budgets are one request, refilled every 1000 s, so a request
// that had to wait behind the reviews would fail at once with "would exceed
// context deadline" (client-go's limiter knows how long it would wait).
func TestTokenReviewsHaveTheirOwnRateLimit(t *testing.T) {
	var reviews, gets atomic.Int64
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == http.MethodPost && r.URL.Path == "/apis/authentication.k8s.io/v1/tokenreviews":
			reviews.Add(1)
			_ = json.NewEncoder(w).Encode(&authv1.TokenReview{
				TypeMeta: metav1.TypeMeta{APIVersion: "authentication.k8s.io/v1", Kind: "TokenReview"},
				Status:   authv1.TokenReviewStatus{Error: "invalid bearer token"},
			})
		case r.Method == http.MethodGet && r.URL.Path == "/api/v1/namespaces/isthmus-system/configmaps/cluster-info":
			gets.Add(1)
			_ = json.NewEncoder(w).Encode(&corev1.ConfigMap{
				TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "ConfigMap"},
				ObjectMeta: metav1.ObjectMeta{Namespace: "isthmus-system", Name: "cluster-info"},
			})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(api.Close)

	// As New builds them: the federator's client with its configured
	// budget (ample here), the review client from the same configuration
	// with a budget of its own (one request): a review client that kept
	// the base's budget, or shared its limiter, lets the flood through.
	restCfg := &rest.Config{Host: api.URL, QPS: 1e6, Burst: 1e6}
	kubeClient, err := kubernetes.NewForConfig(restCfg)
	require.NoError(t, err)
	reviewClient, err := tokenReviewClient(restCfg, 0.001, 1)
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	review := func() error {
		_, err := reviewClient.AuthenticationV1().TokenReviews().Create(ctx,
			&authv1.TokenReview{Spec: authv1.TokenReviewSpec{Token: "junk"}}, metav1.CreateOptions{})
		return err
	}
	// The flood: the first review spends the budget, the rest are held back.
	require.NoError(t, review())
	for range 10 {
		require.ErrorContains(t, review(), "rate")
	}
	require.Equal(t, int64(1), reviews.Load(), "the flood is held at the review client")

	// The federator's own request is not.
	cm, err := kubeClient.CoreV1().ConfigMaps("isthmus-system").Get(ctx, "cluster-info", metav1.GetOptions{})
	require.NoError(t, err, "a request of the federator's own waited behind the TokenReviews")
	require.Equal(t, "cluster-info", cm.Name)
	require.Equal(t, int64(1), gets.Load())
}
