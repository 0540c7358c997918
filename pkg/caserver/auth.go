package caserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
)

// DefaultAudience is the audience a workload's projected ServiceAccount
// token must be bound to for the CA to accept it.
const DefaultAudience = "isthmus-ca"

// Caller is the authenticated Kubernetes identity behind a request.
type Caller struct {
	Namespace      string
	ServiceAccount string
}

// String returns "namespace/serviceaccount".
func (c Caller) String() string { return c.Namespace + "/" + c.ServiceAccount }

// Authenticator turns a bearer token into the identity of its holder.
// A refusal wraps ErrUnauthenticated; any other error means the
// authenticator could not decide (for example the API server is down).
// Implementations must not put the token in their errors.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Caller, error)
}

var _ Authenticator = TokenReviewAuthenticator{}

// TokenReviewAuthenticator authenticates ServiceAccount tokens with the
// authentication.k8s.io/v1 TokenReview API, so that the API server decides
// signature, expiry, audience and whether the ServiceAccount (and the Pod a
// bound token names) still exists.
type TokenReviewAuthenticator struct {
	// Client talks to the API server of the cluster whose workloads call.
	// It needs RBAC permission to create tokenreviews.
	Client kubernetes.Interface
	// Audiences the token must be bound to: the review asks for them and
	// at least one must be confirmed. Empty means []string{DefaultAudience}.
	Audiences []string
}

const saUserPrefix = "system:serviceaccount:"

// Authenticate implements Authenticator.
func (a TokenReviewAuthenticator) Authenticate(ctx context.Context, token string) (Caller, error) {
	if a.Client == nil {
		return Caller{}, errors.New("token review: no Kubernetes client")
	}
	audiences := a.Audiences
	if len(audiences) == 0 {
		audiences = []string{DefaultAudience}
	}
	review, err := a.Client.AuthenticationV1().TokenReviews().Create(ctx, &authv1.TokenReview{
		Spec: authv1.TokenReviewSpec{Token: token, Audiences: audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return Caller{}, fmt.Errorf("token review: %w", err)
	}
	st := review.Status
	if !st.Authenticated {
		reason := st.Error
		if reason == "" {
			reason = "token not authenticated"
		}
		return Caller{}, fmt.Errorf("%w: token review: %s", ErrUnauthenticated, reason)
	}
	if !slices.ContainsFunc(st.Audiences, func(got string) bool { return slices.Contains(audiences, got) }) {
		return Caller{}, fmt.Errorf("%w: token review: token is for audiences %q, want one of %q",
			ErrUnauthenticated, st.Audiences, audiences)
	}
	c, err := callerFromUsername(st.User.Username)
	if err != nil {
		return Caller{}, fmt.Errorf("%w: token review: %w", ErrUnauthenticated, err)
	}
	return c, nil
}

// callerFromUsername parses "system:serviceaccount:<ns>:<sa>", the only
// form the API server gives ServiceAccount tokens. Anything else (a user, a
// node, a malformed name) is not a workload.
func callerFromUsername(u string) (Caller, error) {
	rest, ok := strings.CutPrefix(u, saUserPrefix)
	if !ok {
		return Caller{}, fmt.Errorf("user %q is not a ServiceAccount", u)
	}
	ns, sa, ok := strings.Cut(rest, ":")
	if !ok {
		return Caller{}, fmt.Errorf("user %q is not of the form %s<namespace>:<name>", u, saUserPrefix)
	}
	if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
		return Caller{}, fmt.Errorf("user %q: namespace %q is invalid: %s", u, ns, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(sa); len(errs) > 0 {
		return Caller{}, fmt.Errorf("user %q: ServiceAccount name %q is invalid: %s", u, sa, strings.Join(errs, "; "))
	}
	return Caller{Namespace: ns, ServiceAccount: sa}, nil
}
