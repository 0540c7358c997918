package deploy_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/deploy"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
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
		for _, bad := range []string{"10 minutes", "0s", "0", "-5m", "5", "1h 30m", " 5m", "5M", "1d", "", "0h0m0s", "3000000h"} {
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

// A FederationPeer stored before the staleness rule existed stays on the
// API server after the upgrade: the federator can still write its status
// (the Accepted condition that names the problem), `federator status`
// lists it with that problem beside the other peers, and fixing the
// value is accepted.
func TestFederationPeerStoredBeforeTheStalenessRule(t *testing.T) {
	env := localcluster.StartT(t, "a")
	cfg, err := env.Cluster("a").RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	ctx := t.Context()

	// The CRD as it was: durations were plain strings.
	var old map[string]any
	require.NoError(t, yaml.Unmarshal(deploy.FederationPeerCRD, &old))
	versions, _, _ := unstructured.NestedSlice(old, "spec", "versions")
	v := versions[0].(map[string]any)
	for _, f := range []string{"keepFor", "drainFor"} {
		unstructured.RemoveNestedField(v, "schema", "openAPIV3Schema", "properties", "spec", "properties", "staleness", "properties", f, "x-kubernetes-validations")
	}
	require.NoError(t, unstructured.SetNestedSlice(old, versions, "spec", "versions"))
	oldCRD, err := yaml.Marshal(old)
	require.NoError(t, err)
	require.NoError(t, install.Apply(ctx, cfg, oldCRD))

	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	peers := dyn.Resource(v1alpha1.Resource)
	for name, keepFor := range map[string]string{"east": "10 minutes", "west": "5m"} {
		_, err := peers.Create(ctx, &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": v1alpha1.GroupVersion.String(), "kind": "FederationPeer",
			"metadata": map[string]any{"name": name},
			"spec": map[string]any{"trustDomain": name + ".mesh", "federatorID": "spiffe://" + name + ".mesh/fed",
				"staleness": map[string]any{"keepFor": keepFor}},
		}}, metav1.CreateOptions{})
		require.NoError(t, err, name)
	}

	require.NoError(t, install.Apply(ctx, cfg, deploy.FederationPeerCRD))
	// The federator's status write goes through for the stored object.
	_, err = peers.Patch(ctx, "east", types.MergePatchType, []byte(`{"status":{"state":"Failed","conditions":[{
		"type":"Accepted","status":"False","reason":"InvalidSpec","lastTransitionTime":"2026-12-01T00:00:00Z",
		"message":"spec.staleness.keepFor: \"10 minutes\" is not a duration"}]}}`), metav1.PatchOptions{}, "status")
	require.NoError(t, err)

	got, err := federation.PeerStatuses(ctx, dyn)
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.Equal(t, "east", got[0].Name)
	require.Equal(t, v1alpha1.StateFailed, got[0].Status.State)
	c := meta.FindStatusCondition(got[0].Status.Conditions, v1alpha1.ConditionAccepted)
	require.NotNil(t, c)
	require.Equal(t, metav1.ConditionFalse, c.Status)
	require.Contains(t, c.Message, `spec.staleness.keepFor: "10 minutes" is not a duration`)
	require.Equal(t, "west", got[1].Name)
	require.Equal(t, 5*time.Minute, got[1].Spec.Staleness.KeepFor.Duration)

	// A new bad value is refused now; the fix is accepted.
	_, err = peers.Patch(ctx, "east", types.MergePatchType, []byte(`{"spec":{"staleness":{"keepFor":"0s"}}}`), metav1.PatchOptions{})
	require.ErrorContains(t, err, "keepFor must be a positive duration")
	_, err = peers.Patch(ctx, "east", types.MergePatchType, []byte(`{"spec":{"staleness":{"keepFor":"10m"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
}
