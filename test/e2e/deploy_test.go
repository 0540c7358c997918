package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	authzv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// kustomizeBinary finds kustomize: $ISTHMUS_KUSTOMIZE, the repository's
// bin/ (make tools puts it there), or PATH.
func kustomizeBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ISTHMUS_KUSTOMIZE"); p != "" {
		return p
	}
	if p, err := filepath.Abs("../../bin/kustomize"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, err := exec.LookPath("kustomize")
	require.NoError(t, err, "kustomize not found: run `make tools`")
	return p
}

// TestDeployManifests applies exactly what an operator applies
// (`kubectl apply -k deploy/multicluster`) to a real API server with strict
// field validation, and checks the federator's ServiceAccount gets what it
// needs and nothing more.
func TestDeployManifests(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, kustomizeBinary(t), "build", "../../deploy/multicluster").Output()
	require.NoError(t, err, "kustomize build deploy/multicluster")

	env := localcluster.StartT(t, "a")
	a := env.Cluster("a")
	cfg, err := a.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	require.NoError(t, install.Apply(ctx, cfg, out))

	_, err = a.Client().AppsV1().Deployments("isthmus-system").Get(ctx, "isthmus-federator", metav1.GetOptions{})
	require.NoError(t, err)

	sa := "system:serviceaccount:isthmus-system:isthmus-federator"
	can := func(verb, group, resource, ns, name string) bool {
		t.Helper()
		r, err := a.Client().AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{
			Spec: authzv1.SubjectAccessReviewSpec{User: sa, ResourceAttributes: &authzv1.ResourceAttributes{
				Verb: verb, Group: group, Resource: resource, Namespace: ns, Name: name,
			}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		return r.Status.Allowed
	}
	tests := []struct {
		verb, group, resource, ns, name string
		allowed                         bool
	}{
		{"watch", "", "services", "", "", true},
		{"list", "discovery.k8s.io", "endpointslices", "", "", true},
		{"list", "", "nodes", "", "", true},
		{"watch", "", "pods", "", "", true},
		{"get", "", "pods", "demo", "echo-0", true},
		{"watch", "multicluster.x-k8s.io", "serviceexports", "", "", true},
		{"update", "multicluster.x-k8s.io", "serviceexports/status", "demo", "echo", true},
		{"create", "authentication.k8s.io", "tokenreviews", "", "", true},
		{"get", "", "secrets", "isthmus-system", "isthmus-ca", true},
		{"update", "", "secrets", "isthmus-system", "isthmus-ca", true},
		{"get", "", "secrets", "isthmus-system", "cacerts", true},
		{"update", "", "configmaps", "isthmus-system", "isthmus-cluster", true},
		// Peering: token records and join tokens are read and spent, peer
		// bundles kept in ConfigMaps, all inside the federator's namespace.
		{"delete", "", "secrets", "isthmus-system", "isthmus-token-0123456789abcdef", true},
		{"get", "", "secrets", "isthmus-system", "isthmus-join-b", true},
		{"update", "", "configmaps", "isthmus-system", "isthmus-peer-b", true},
		{"watch", "federation.isthmus.dev", "federationpeers", "", "", true},
		{"create", "federation.isthmus.dev", "federationpeers", "", "", true},
		{"patch", "federation.isthmus.dev", "federationpeers/status", "", "b", true},
		{"create", "networking.istio.io", "serviceentries", "demo", "", true},
		{"delete", "multicluster.x-k8s.io", "serviceimports", "demo", "echo", true},
		{"watch", "", "namespaces", "", "", true},
		// Least privilege: nothing beyond that.
		{"update", "", "secrets", "isthmus-system", "cacerts", false},
		{"update", "", "secrets", "isthmus-system", "some-other-secret", false},
		{"get", "", "secrets", "demo", "some-other-secret", false},
		{"update", "federation.isthmus.dev", "federationpeers", "", "b", false},
		{"delete", "federation.isthmus.dev", "federationpeers", "", "b", false},
		{"create", "", "namespaces", "", "", false},
		{"create", "networking.istio.io", "virtualservices", "demo", "", false},
		{"list", "", "secrets", "", "", false},
		{"get", "", "secrets", "kube-system", "isthmus-ca", false},
		{"update", "multicluster.x-k8s.io", "serviceexports", "demo", "echo", false},
		{"delete", "", "services", "demo", "echo", false},
		{"create", "", "pods", "demo", "", false},
		{"delete", "", "pods", "demo", "echo-0", false},
		{"get", "", "pods/log", "demo", "echo-0", false},
	}
	for _, tc := range tests {
		require.Equal(t, tc.allowed, can(tc.verb, tc.group, tc.resource, tc.ns, tc.name),
			"%s %s/%s %s/%s", tc.verb, tc.group, tc.resource, tc.ns, tc.name)
	}
}
