package caserver

import (
	"crypto/elliptic"
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func TestTokenReviewAuthenticator(t *testing.T) {
	const token = "projected-sa-token"
	ok := func(user string, audiences ...string) authv1.TokenReviewStatus {
		return authv1.TokenReviewStatus{Authenticated: true, Audiences: audiences, User: authv1.UserInfo{Username: user}}
	}
	tests := []struct {
		name          string
		audiences     []string // TokenReviewAuthenticator.Audiences
		status        authv1.TokenReviewStatus
		apiErr        error
		wantAudiences []string // what the review must ask for
		want          Caller
		wantErr       string
		wantRefusal   bool // errors.Is(err, ErrUnauthenticated)
	}{
		{
			name:          "authenticated ServiceAccount, default audience",
			status:        ok("system:serviceaccount:demo:web", DefaultAudience),
			wantAudiences: []string{DefaultAudience},
			want:          Caller{Namespace: "demo", ServiceAccount: "web"},
		},
		{
			name:          "one of several configured audiences",
			audiences:     []string{"isthmus-ca", "istio-ca"},
			status:        ok("system:serviceaccount:kube-system:coredns.v2", "istio-ca"),
			wantAudiences: []string{"isthmus-ca", "istio-ca"},
			want:          Caller{Namespace: "kube-system", ServiceAccount: "coredns.v2"},
		},
		{
			name:          "not authenticated (expired, forged, unknown ServiceAccount)",
			status:        authv1.TokenReviewStatus{Authenticated: false, Error: "[invalid bearer token, service account token has expired]"},
			wantAudiences: []string{DefaultAudience},
			wantErr:       "service account token has expired",
			wantRefusal:   true,
		},
		{
			name:          "not authenticated without reason",
			status:        authv1.TokenReviewStatus{},
			wantAudiences: []string{DefaultAudience},
			wantErr:       "token not authenticated",
			wantRefusal:   true,
		},
		{
			name:          "wrong audience",
			status:        ok("system:serviceaccount:demo:web", "https://kubernetes.default.svc"),
			wantAudiences: []string{DefaultAudience},
			wantErr:       "audiences",
			wantRefusal:   true,
		},
		{
			name:          "no audience confirmed",
			status:        ok("system:serviceaccount:demo:web"),
			wantAudiences: []string{DefaultAudience},
			wantErr:       "audiences",
			wantRefusal:   true,
		},
		{name: "a user, not a ServiceAccount", status: ok("alice", DefaultAudience), wantErr: "not a ServiceAccount", wantRefusal: true},
		{name: "a node", status: ok("system:node:worker-1", DefaultAudience), wantErr: "not a ServiceAccount", wantRefusal: true},
		{name: "no ServiceAccount name", status: ok("system:serviceaccount:demo", DefaultAudience), wantErr: "not of the form", wantRefusal: true},
		{name: "empty namespace", status: ok("system:serviceaccount::web", DefaultAudience), wantErr: "namespace", wantRefusal: true},
		{name: "extra segment", status: ok("system:serviceaccount:demo:web:x", DefaultAudience), wantErr: "ServiceAccount name", wantRefusal: true},
		{name: "path characters", status: ok("system:serviceaccount:demo:../admin", DefaultAudience), wantErr: "ServiceAccount name", wantRefusal: true},
		{
			name:    "API error",
			apiErr:  apierrors.NewServiceUnavailable("etcd is down"),
			wantErr: "etcd is down",
		},
		{
			name:    "no RBAC permission",
			apiErr:  apierrors.NewForbidden(schema.GroupResource{Group: "authentication.k8s.io", Resource: "tokenreviews"}, "", errors.New("nope")),
			wantErr: "forbidden",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs := fake.NewClientset()
			var asked *authv1.TokenReview
			cs.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
				asked = action.(k8stesting.CreateAction).GetObject().(*authv1.TokenReview).DeepCopy()
				if tt.apiErr != nil {
					return true, nil, tt.apiErr
				}
				out := asked.DeepCopy()
				out.Status = tt.status
				return true, out, nil
			})

			got, err := TokenReviewAuthenticator{Client: cs, Audiences: tt.audiences}.Authenticate(t.Context(), token)

			require.NotNil(t, asked, "a TokenReview was made")
			require.Equal(t, token, asked.Spec.Token)
			if tt.wantAudiences != nil {
				require.Equal(t, tt.wantAudiences, asked.Spec.Audiences)
			}
			if tt.wantErr == "" {
				require.NoError(t, err)
				require.Equal(t, tt.want, got)
				return
			}
			require.ErrorContains(t, err, tt.wantErr)
			require.Equal(t, tt.wantRefusal, errors.Is(err, ErrUnauthenticated), "refusal vs. could not decide: %v", err)
			require.NotContains(t, err.Error(), token)
			require.Equal(t, Caller{}, got)
		})
	}
}

// The server and the TokenReview authenticator together, over gRPC and TLS:
// the identity in the certificate is the one the API server vouched for.
func TestServerWithTokenReview(t *testing.T) {
	cs := fake.NewClientset()
	cs.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		tr := action.(k8stesting.CreateAction).GetObject().(*authv1.TokenReview).DeepCopy()
		switch tr.Spec.Token {
		case "web-token":
			tr.Status = authv1.TokenReviewStatus{Authenticated: true, Audiences: []string{DefaultAudience},
				User: authv1.UserInfo{Username: "system:serviceaccount:demo:web"}}
		case "api-token":
			tr.Status = authv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"https://kubernetes.default.svc"},
				User: authv1.UserInfo{Username: "system:serviceaccount:demo:web"}}
		case "apiserver-down":
			return true, nil, apierrors.NewServiceUnavailable("etcd is down")
		default:
			tr.Status = authv1.TokenReviewStatus{Error: "invalid bearer token"}
		}
		return true, tr, nil
	})
	signer := newTestSigner(t, testTD)
	addr := startCA(t, signer, TokenReviewAuthenticator{Client: cs}, nil)
	client := dialCA(t, addr, signer.Bundle())
	csr := makeCSR(t, ecKey(t, elliptic.P256()), webID.String())

	resp, err := client.CreateCertificate(withAuth(t.Context(), "Bearer web-token"), &pb.IstioCertificateRequest{Csr: csr})
	require.NoError(t, err)
	id, err := x509svid.IDFromCert(parseChain(t, resp.GetCertChain())[0])
	require.NoError(t, err)
	require.Equal(t, "spiffe://cluster-a.mesh/ns/demo/sa/web", id.String())

	for token, want := range map[string]codes.Code{
		"api-token":      codes.Unauthenticated,
		"forged":         codes.Unauthenticated,
		"apiserver-down": codes.Unavailable,
	} {
		_, err := client.CreateCertificate(withAuth(t.Context(), "Bearer "+token), &pb.IstioCertificateRequest{Csr: csr})
		require.Equal(t, want, status.Code(err), "%s: %v", token, err)
	}
}
