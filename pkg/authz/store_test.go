package authz

import (
	"testing"

	"github.com/stretchr/testify/require"
	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

func selector(app string) *typev1beta1.WorkloadSelector {
	return &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": app}}
}

// names are the policies that select pod, "namespace/name" each.
func names(t *testing.T, s *Store, pod string) []string {
	t.Helper()
	set, ok := s.Snapshot().Pod(pod)
	if !ok {
		return nil
	}
	var out []string
	for _, p := range set.Policies {
		out = append(out, p.Ref())
	}
	return out
}

// Istio's selection: a namespace's policy selects its pods whose labels
// match (all of them without a selector), the root namespace's the pods
// of every namespace, a policy with a targetRef none; a relabelled pod
// moves; deleting a policy or pod forgets it.
func TestStoreSelects(t *testing.T) {
	s := NewStore("mesh-root")
	sub, cancel := s.Subscribe()
	defer cancel()
	<-sub // primed

	s.SetPod("demo", "web-0", map[string]string{"app": "web"})
	s.SetPod("demo", "db-0", map[string]string{"app": "db"})
	s.SetPod("other", "web-0", map[string]string{"app": "web"})
	select {
	case <-sub:
		t.Fatal("pods no policy selects changed what a snapshot says")
	default:
	}
	require.False(t, s.Snapshot().Synced)
	s.SetSynced()
	require.True(t, s.Snapshot().Synced)
	<-sub

	s.SetPolicy(Policy{Namespace: "demo", Name: "web", Spec: &securityv1beta1.AuthorizationPolicy{Selector: selector("web")}})
	s.SetPolicy(Policy{Namespace: "demo", Name: "all", Spec: &securityv1beta1.AuthorizationPolicy{}})
	s.SetPolicy(Policy{Namespace: "mesh-root", Name: "webs", Spec: &securityv1beta1.AuthorizationPolicy{Selector: selector("web")}})
	s.SetPolicy(Policy{Namespace: "demo", Name: "waypoint", Spec: &securityv1beta1.AuthorizationPolicy{
		TargetRefs: []*typev1beta1.PolicyTargetReference{{Kind: "Service", Name: "web"}},
	}})
	<-sub
	require.Equal(t, []string{"demo/all", "demo/web", "mesh-root/webs"}, names(t, s, "demo/web-0"))
	require.Equal(t, []string{"demo/all"}, names(t, s, "demo/db-0"))
	require.Equal(t, []string{"mesh-root/webs"}, names(t, s, "other/web-0"))

	// The same spec again changes nothing.
	v := s.Snapshot().Version
	s.SetPolicy(Policy{Namespace: "demo", Name: "web", Spec: &securityv1beta1.AuthorizationPolicy{Selector: selector("web")}})
	require.Equal(t, v, s.Snapshot().Version)

	// Pods with the same policies share a set.
	s.SetPod("demo", "web-1", map[string]string{"app": "web", "v": "2"})
	a, _ := s.Snapshot().Pod("demo/web-0")
	b, _ := s.Snapshot().Pod("demo/web-1")
	require.Same(t, a, b)

	s.SetPod("demo", "web-0", map[string]string{"app": "db"})
	require.Equal(t, []string{"demo/all"}, names(t, s, "demo/web-0"))
	s.DeletePolicy("demo", "all")
	require.Nil(t, names(t, s, "demo/db-0"))
	require.Nil(t, names(t, s, "demo/web-0"))
	s.DeletePolicy("mesh-root", "webs")
	require.Nil(t, names(t, s, "other/web-0"))
	require.Equal(t, []string{"demo/web"}, names(t, s, "demo/web-1"))
	s.DeletePod("demo", "web-1")
	require.Nil(t, names(t, s, "demo/web-1"))
	n := 0
	for range s.Snapshot().Pods() {
		n++
	}
	require.Zero(t, n)
}
