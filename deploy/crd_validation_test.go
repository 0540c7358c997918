package deploy_test

import (
	"fmt"
	"strings"
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

	// Staleness durations: Go's syntax, positive. Zero and negative are
	// refused rather than read as the default; leaving the field out is
	// how the default is asked for.
	for _, field := range []string{"keepFor", "drainFor"} {
		for _, bad := range []string{"10 minutes", "0s", "0", "-5m", "5", "1h 30m", " 5m", "5M", "1d", "", "0h0m0s"} {
			err := create("bad-"+strings.ToLower(field), map[string]any{"staleness": map[string]any{field: bad}})
			require.ErrorContains(t, err, "spec.staleness."+field, "%s %q", field, bad)
			require.ErrorContains(t, err, field+" must be a positive duration such as 30s, 5m or 1h30m", "%s %q", field, bad)
		}
		for i, good := range []string{"30s", "5m", "1h30m", "1.5h", "500ms", "90m"} {
			require.NoError(t, create(fmt.Sprintf("good-%s-%d", strings.ToLower(field), i),
				map[string]any{"staleness": map[string]any{field: good}}), "%s %q", field, good)
		}
	}
}
