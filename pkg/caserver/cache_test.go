package caserver

import (
	"context"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	authv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// reviewCounter is a fake API server that answers TokenReviews and counts
// them: "web-token" and tokens starting "jwt." are demo/web, "down" fails
// like an unreachable API server, anything else is refused.
type reviewCounter struct {
	cs      *fake.Clientset
	reviews atomic.Int64
	// release, when not nil, holds every review until it is closed.
	release chan struct{}
}

func newReviewCounter() *reviewCounter {
	r := &reviewCounter{cs: fake.NewClientset()}
	r.cs.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		r.reviews.Add(1)
		if r.release != nil {
			<-r.release
		}
		tr := action.(k8stesting.CreateAction).GetObject().(*authv1.TokenReview).DeepCopy()
		switch tok := tr.Spec.Token; {
		case tok == "web-token" || strings.HasPrefix(tok, "jwt."):
			tr.Status = authv1.TokenReviewStatus{Authenticated: true, Audiences: []string{DefaultAudience},
				User: authv1.UserInfo{Username: "system:serviceaccount:demo:web"}}
		case tok == "down":
			return true, nil, apierrors.NewServiceUnavailable("etcd is down")
		default:
			tr.Status = authv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, tr, nil
	})
	return r
}

// fakeClock is a settable clock, safe for concurrent use.
type fakeClock struct {
	// mu guards t.
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// A flood of requests with the same junk token costs the API server one
// TokenReview, not one per request; requests with a junk CSR cost none.
func TestJunkTokenFloodCostsOneReview(t *testing.T) {
	rc := newReviewCounter()
	rc.release = make(chan struct{})
	signer := newTestSigner(t, testTD)
	auth := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{})
	addr := startCA(t, signer, auth, nil)
	client := dialCA(t, addr, signer.Bundle())
	csr := makeCSR(t, ecKey(t, elliptic.P256()), webID.String())

	// Concurrent requests wait for the review the first one started.
	const n = 40
	codesSeen := make(chan codes.Code, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			_, err := client.CreateCertificate(withAuth(t.Context(), "Bearer junk"), &pb.IstioCertificateRequest{Csr: csr})
			codesSeen <- status.Code(err)
		})
	}
	require.Eventually(t, func() bool { return rc.reviews.Load() >= 1 }, 30*time.Second, 5*time.Millisecond)
	close(rc.release)
	wg.Wait()
	close(codesSeen)
	for c := range codesSeen {
		require.Equal(t, codes.Unauthenticated, c)
	}
	// Later ones are answered from the cache.
	for range n {
		_, err := client.CreateCertificate(withAuth(t.Context(), "Bearer junk"), &pb.IstioCertificateRequest{Csr: csr})
		require.Equal(t, codes.Unauthenticated, status.Code(err))
	}
	require.Equal(t, int64(1), rc.reviews.Load(), "one TokenReview for %d requests with the same token", 2*n)

	// A request whose CSR is junk is refused before any review.
	for _, bad := range []string{"", "junk", makeCSR(t, ecKey(t, elliptic.P521()), webID.String())} {
		_, err := client.CreateCertificate(withAuth(t.Context(), "Bearer other-junk"), &pb.IstioCertificateRequest{Csr: bad})
		require.Equal(t, codes.InvalidArgument, status.Code(err))
	}
	// So is a token far longer than any ServiceAccount token.
	_, err := client.CreateCertificate(withAuth(t.Context(), "Bearer "+strings.Repeat("x", MaxTokenBytes+1)), &pb.IstioCertificateRequest{Csr: csr})
	require.Equal(t, codes.Unauthenticated, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "limit")
	require.Equal(t, int64(1), rc.reviews.Load(), "no review for a request refused on its own")
}

func TestCachingAuthenticatorLifetimes(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	ctx := t.Context()
	jwt := func(exp time.Time) string {
		claims := fmt.Sprintf(`{"aud":["isthmus-ca"],"exp":%d,"sub":"system:serviceaccount:demo:web"}`, exp.Unix())
		return "jwt." + base64.RawURLEncoding.EncodeToString([]byte(claims)) + ".c2ln"
	}
	web := Caller{Namespace: "demo", ServiceAccount: "web"}

	t.Run("acceptance lasts TTL", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now})
		for range 3 {
			got, err := a.Authenticate(ctx, "web-token")
			require.NoError(t, err)
			require.Equal(t, web, got)
		}
		require.Equal(t, int64(1), rc.reviews.Load())
		clock.Add(DefaultCacheTTL - time.Second)
		_, err := a.Authenticate(ctx, "web-token")
		require.NoError(t, err)
		require.Equal(t, int64(1), rc.reviews.Load())
		clock.Add(2 * time.Second)
		_, err = a.Authenticate(ctx, "web-token")
		require.NoError(t, err)
		require.Equal(t, int64(2), rc.reviews.Load(), "reviewed again once the TTL passed")
	})
	t.Run("acceptance ends with the token", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now})
		tok := jwt(clock.Now().Add(10 * time.Second))
		_, err := a.Authenticate(ctx, tok)
		require.NoError(t, err)
		clock.Add(9 * time.Second)
		_, err = a.Authenticate(ctx, tok)
		require.NoError(t, err)
		require.Equal(t, int64(1), rc.reviews.Load())
		clock.Add(2 * time.Second)
		_, err = a.Authenticate(ctx, tok)
		require.NoError(t, err, "the fake API server does not check exp; the cache does not decide")
		require.Equal(t, int64(2), rc.reviews.Load(), "not remembered past the token's exp")

		expired := jwt(clock.Now().Add(-time.Second))
		_, _ = a.Authenticate(ctx, expired)
		_, _ = a.Authenticate(ctx, expired)
		require.Equal(t, int64(4), rc.reviews.Load(), "an expired token is never remembered")
	})
	t.Run("refusal lasts the negative TTL", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now})
		for range 3 {
			_, err := a.Authenticate(ctx, "junk")
			require.ErrorIs(t, err, ErrUnauthenticated)
			require.ErrorContains(t, err, "invalid bearer token")
		}
		require.Equal(t, int64(1), rc.reviews.Load())
		clock.Add(DefaultNegativeCacheTTL + time.Second)
		_, err := a.Authenticate(ctx, "junk")
		require.ErrorIs(t, err, ErrUnauthenticated)
		require.Equal(t, int64(2), rc.reviews.Load())
	})
	t.Run("could not decide is not remembered", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now})
		for i := range 3 {
			_, err := a.Authenticate(ctx, "down")
			require.Error(t, err)
			require.NotErrorIs(t, err, ErrUnauthenticated)
			require.Equal(t, int64(i+1), rc.reviews.Load())
		}
	})
	t.Run("bounded, least recently used leaves", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now, Size: 2})
		for _, tok := range []string{"jwt.1", "jwt.2", "jwt.3", "jwt.1", "junk-1", "junk-2", "junk-3", "junk-1"} {
			_, _ = a.Authenticate(ctx, tok)
		}
		require.Equal(t, int64(8), rc.reviews.Load(), "jwt.1 and junk-1 were each pushed out by two others of their kind")
		require.Equal(t, 2, a.accepted.Len())
		require.Equal(t, 2, a.refused.Len())
	})
	t.Run("junk tokens never push out an acceptance", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now, Size: 16})
		_, err := a.Authenticate(ctx, "web-token")
		require.NoError(t, err)
		for i := range 100 {
			_, err := a.Authenticate(ctx, fmt.Sprintf("junk-%d", i))
			require.ErrorIs(t, err, ErrUnauthenticated)
		}
		require.Equal(t, int64(101), rc.reviews.Load())
		got, err := a.Authenticate(ctx, "web-token")
		require.NoError(t, err)
		require.Equal(t, web, got)
		require.Equal(t, int64(101), rc.reviews.Load(), "the acceptance outlived a flood of junk tokens")
	})
	t.Run("keyed by a hash, never the token", func(t *testing.T) {
		rc := newReviewCounter()
		a := NewCachingAuthenticator(TokenReviewAuthenticator{Client: rc.cs}, CacheOptions{Now: clock.Now})
		_, _ = a.Authenticate(ctx, "web-token")
		_, _ = a.Authenticate(ctx, "junk")
		for _, cache := range []*lru.Cache[[sha256.Size]byte, cachedAnswer]{a.accepted, a.refused} {
			require.Equal(t, 1, cache.Len())
			for _, k := range cache.Keys() {
				require.NotContains(t, string(k[:]), "web-token")
				require.NotContains(t, string(k[:]), "junk")
				v, _ := cache.Peek(k)
				require.NotContains(t, fmt.Sprintf("%+v", v), "web-token")
			}
		}
		require.True(t, a.accepted.Contains(sha256.Sum256([]byte("web-token"))))
		require.True(t, a.refused.Contains(sha256.Sum256([]byte("junk"))))
	})
	t.Run("a waiting caller that gives up does not fail the others", func(t *testing.T) {
		rc := newReviewCounter()
		rc.release = make(chan struct{})
		// The review gives up with its context, as a real API request
		// does (the fake clientset's reactor would not).
		a := NewCachingAuthenticator(ctxBound{TokenReviewAuthenticator{Client: rc.cs}}, CacheOptions{Now: clock.Now})
		impatient, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			_, err := a.Authenticate(impatient, "web-token")
			done <- err
		}()
		require.Eventually(t, func() bool { return rc.reviews.Load() == 1 }, 30*time.Second, 5*time.Millisecond)
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
		patient := make(chan error, 1)
		go func() {
			_, err := a.Authenticate(ctx, "web-token")
			patient <- err
		}()
		close(rc.release)
		require.NoError(t, <-patient)
		require.Equal(t, int64(1), rc.reviews.Load())
	})
}

func TestTokenExpiry(t *testing.T) {
	enc := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	for name, tt := range map[string]struct {
		token string
		want  time.Time
		ok    bool
	}{
		"integer exp":            {token: "h." + enc(`{"exp":1800000000}`) + ".s", want: time.Unix(1_800_000_000, 0), ok: true},
		"fraction":               {token: "h." + enc(`{"exp":1800000000.5}`) + ".s", want: time.Unix(1_800_000_000, 5e8), ok: true},
		"no exp":                 {token: "h." + enc(`{"sub":"x"}`) + ".s"},
		"not a JWT":              {token: "opaque-token"},
		"not base64":             {token: "h.!!!.s"},
		"not JSON":               {token: "h." + enc("exp") + ".s"},
		"exp a string":           {token: "h." + enc(`{"exp":"soon"}`) + ".s"},
		"negative":               {token: "h." + enc(`{"exp":-5}`) + ".s"},
		"huge":                   {token: "h." + enc(`{"exp":1e300}`) + ".s"},
		"payload over the bound": {token: "h." + enc(`{"exp":1800000000,"x":"`+strings.Repeat("a", maxClaimsBytes)+`"}`) + ".s"},
	} {
		t.Run(name, func(t *testing.T) {
			got, ok := tokenExpiry(tt.token)
			require.Equal(t, tt.ok, ok)
			if ok {
				require.True(t, tt.want.Equal(got), "got %s", got)
			}
		})
	}
}

// On a gRPC server shared with xDS (whose bound is 4 MiB) the certificate
// service still refuses a request over its own bound, before anything
// else and without a review.
func TestRequestSizeBoundOnSharedServer(t *testing.T) {
	rc := newReviewCounter()
	signer := newTestSigner(t, testTD)
	g := grpc.NewServer(grpc.Creds(ServerCredentials(signer.issueSVID(t, federatorID))), grpc.MaxRecvMsgSize(4<<20))
	New(signer, TokenReviewAuthenticator{Client: rc.cs}, Options{}).Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	client := dialCA(t, lis.Addr().String(), signer.Bundle())
	csr := makeCSR(t, ecKey(t, elliptic.P256()), webID.String())
	ctx := withAuth(t.Context(), "Bearer web-token")

	big, err := structpb.NewStruct(map[string]any{"padding": strings.Repeat("p", maxRequestBytes)})
	require.NoError(t, err)
	_, err = client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr, Metadata: big})
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "certificate service's limit")
	require.Zero(t, rc.reviews.Load(), "refused before the token was reviewed")

	// Metadata within the bound is fine.
	small, err := structpb.NewStruct(map[string]any{"CLUSTER_ID": "east"})
	require.NoError(t, err)
	resp, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr, Metadata: small})
	require.NoError(t, err)
	require.Len(t, resp.GetCertChain(), 2)
}

// ctxBound gives up on its context while the authenticator it wraps
// works on, as a request to a real API server does.
type ctxBound struct{ inner Authenticator }

func (b ctxBound) Authenticate(ctx context.Context, token string) (Caller, error) {
	type result struct {
		c   Caller
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := b.inner.Authenticate(ctx, token)
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-ctx.Done():
		return Caller{}, ctx.Err()
	}
}
