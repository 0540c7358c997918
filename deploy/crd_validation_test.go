package deploy_test

import (
	"testing"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/deploy"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// The FederationPeer CRD's own rules, on a real API server: a joining
// side (tokenSecretName set) needs an address to dial; the accepting side
// may have none.
func TestFederationPeerValidation(t *testing.T) {
	env := localcluster.StartT(t, "a")
	cfg, err := env.Cluster("a").RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	require.NoError(t, install.Apply(t.Context(), cfg, deploy.FederationPeerCRD))
	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	create := func(name string, spec map[string]any) error {
		spec["trustDomain"], spec["federatorID"] = "b.mesh", "spiffe://b.mesh/fed"
		_, err := dyn.Resource(v1alpha1.Resource).Create(t.Context(), &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": v1alpha1.GroupVersion.String(), "kind": "FederationPeer",
			"metadata": map[string]any{"name": name}, "spec": spec,
		}}, metav1.CreateOptions{})
		return err
	}
	require.ErrorContains(t, create("joined-nowhere", map[string]any{"tokenSecretName": "isthmus-join-b"}),
		"addresses must name at least one address of the peer's federator")
	require.ErrorContains(t, create("joined-empty", map[string]any{"tokenSecretName": "isthmus-join-b", "addresses": []any{}}),
		"addresses must name at least one address of the peer's federator")
	require.NoError(t, create("joined", map[string]any{"tokenSecretName": "isthmus-join-b", "addresses": []any{"fed.b.example:15443"}}))
	require.NoError(t, create("accepted", map[string]any{}))
}
