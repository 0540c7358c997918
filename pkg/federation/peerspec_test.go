package federation

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// patchPeer merge-patches FederationPeer name's spec, as kubectl patch
// does; the fake API server checks nothing, as an API server with a CRD
// from before a rule does not.
func (c *cluster) patchPeer(t *testing.T, name, spec string) {
	t.Helper()
	_, err := c.dyn.Resource(v1alpha1.Resource).Patch(t.Context(), name, types.MergePatchType,
		[]byte(`{"spec":`+spec+`}`), metav1.PatchOptions{})
	require.NoError(t, err)
}

// accepted is FederationPeer name's Accepted condition as the federator
// last wrote it, nil before it did.
func (c *cluster) accepted(t *testing.T, name string) *metav1.Condition {
	t.Helper()
	return meta.FindStatusCondition(c.conditions(t, name), v1alpha1.ConditionAccepted)
}

// conditions are FederationPeer name's conditions as the federator last
// wrote them.
func (c *cluster) conditions(t *testing.T, name string) []metav1.Condition {
	t.Helper()
	u, err := c.dyn.Resource(v1alpha1.Resource).Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	raw, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	var conds []metav1.Condition
	for _, r := range raw {
		var c metav1.Condition
		if m, ok := r.(map[string]any); ok && runtime.DefaultUnstructuredConverter.FromUnstructured(m, &c) == nil {
			conds = append(conds, c)
		}
	}
	return conds
}

// Every condition says which generation of the spec it is about
// (observedGeneration, as kubectl wait and Istio's own status compare
// it): a new generation with the same spec (edited and edited back) is
// said without restarting the link, and a refused one is said of its
// own generation. The fake API server keeps no generation, so the test
// sets it as the API server would.
func TestConditionsCarryTheObservedGeneration(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	eventually(t, "linked", func() bool { return b.status("a").State == v1alpha1.StateConnected })
	observed := func(gen int64) func() bool {
		return func() bool {
			conds := b.conditions(t, "a")
			for _, c := range conds {
				if c.ObservedGeneration != gen {
					return false
				}
			}
			return len(conds) >= 5
		}
	}
	_, err := b.dyn.Resource(v1alpha1.Resource).Patch(t.Context(), "a", types.MergePatchType,
		[]byte(`{"metadata":{"generation":4}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	e := b.entry("a")
	eventually(t, "every condition observed generation 4", observed(4))
	require.Same(t, e, b.entry("a"), "the same spec does not restart the link")
	require.Equal(t, v1alpha1.StateConnected, b.status("a").State)

	_, err = b.dyn.Resource(v1alpha1.Resource).Patch(t.Context(), "a", types.MergePatchType,
		[]byte(`{"metadata":{"generation":5},"spec":{"staleness":{"keepFor":"0s"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	eventually(t, "the refusal is of generation 5", func() bool {
		c := b.accepted(t, "a")
		return c != nil && c.Status == metav1.ConditionFalse && c.ObservedGeneration == 5 && observed(5)()
	})
}

func (c *cluster) entry(name string) *peerEntry {
	c.manager.mu.Lock()
	defer c.manager.mu.Unlock()
	return c.manager.peers[name]
}

// A FederationPeer whose staleness the federator cannot read (stored
// before the CRD checked it) is Failed with a False Accepted condition
// naming the field and its value, is not retried for ever, and holds up
// no other peer; zero and negative durations are refused the same way,
// not read as the default.
func TestUnreadableSpecIsReportedNotRetried(t *testing.T) {
	b := newCluster(t, "b", nil)
	c := newCluster(t, "c", nil)
	link(t, c, b)
	c.export(t, echoService(1))

	_, err := b.dyn.Resource(v1alpha1.Resource).Create(t.Context(), &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.GroupVersion.String(), "kind": "FederationPeer",
		"metadata": map[string]any{"name": "east"},
		"spec": map[string]any{
			"trustDomain": "east.mesh", "federatorID": "spiffe://east.mesh/fed",
			"staleness": map[string]any{"keepFor": "10 minutes"},
		},
	}}, metav1.CreateOptions{})
	require.NoError(t, err)

	refused := func(what, want string) {
		t.Helper()
		eventually(t, "east refused: "+what, func() bool {
			s := b.status("east")
			c := b.accepted(t, "east")
			return s.State == v1alpha1.StateFailed && strings.Contains(s.Reason, want) &&
				c != nil && c.Status == metav1.ConditionFalse && c.Reason == v1alpha1.ReasonInvalidSpec && strings.Contains(c.Message, want)
		})
		require.Zero(t, b.manager.queue.NumRequeues("east"), "a spec that cannot be followed is not retried")
	}
	refused("unreadable", `spec.staleness.keepFor: "10 minutes" is not a duration`)
	eventually(t, "the other peer is untouched", func() bool {
		return b.status("c").State == v1alpha1.StateConnected && len(b.imported("c")) == 1
	})

	b.patchPeer(t, "east", `{"staleness":{"keepFor":"0s"}}`)
	refused("zero", "spec.staleness.keepFor is 0s: it must be a positive duration")
	b.patchPeer(t, "east", `{"staleness":{"keepFor":"10m","drainFor":"-5m"}}`)
	refused("negative", "spec.staleness.drainFor is -5m0s: it must be a positive duration")

	b.patchPeer(t, "east", `{"staleness":{"keepFor":"10m","drainFor":"2m"}}`)
	eventually(t, "a fixed spec is accepted", func() bool {
		c := b.accepted(t, "east")
		return c != nil && c.Status == metav1.ConditionTrue
	})
	e := b.entry("east")
	require.Equal(t, 10*time.Minute, e.keepFor)
	require.Equal(t, 2*time.Minute, e.drainFor)
	require.Equal(t, v1alpha1.StateConnected, b.status("c").State)
}

// A running link whose FederationPeer changes to a spec its federator
// cannot follow stops, on either side, rather than running on the old
// spec while the object says another; what was imported ages as after
// any loss. Fixing the spec brings the link back.
func TestRefusedSpecStopsTheLink(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	a.export(t, echoService(1))
	connected := func() bool {
		return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected &&
			len(b.imported("a")) == 1
	}
	eventually(t, "linked", connected)

	// The accepting side: the stream the joiner opened ends, and the
	// joiner is told why its new ones are refused.
	a.patchPeer(t, "b", `{"staleness":{"keepFor":"10 minutes"}}`)
	eventually(t, "a refuses b's streams", func() bool {
		return strings.Contains(b.status("a").Reason, "not accepted by its federator")
	})
	s := a.status("b")
	require.Equal(t, v1alpha1.StateFailed, s.State, s.Reason)
	require.Contains(t, s.Reason, `spec.staleness.keepFor: "10 minutes" is not a duration`)
	require.Len(t, b.imported("a"), 1, "b keeps a's imports for keepFor")

	a.patchPeer(t, "b", `{"staleness":{"keepFor":"10m"}}`)
	eventually(t, "linked again once the spec is fixed", connected)
	require.Equal(t, 10*time.Minute, a.entry("b").keepFor)

	// The joining side: it stops dialling.
	b.patchPeer(t, "a", `{"staleness":{"drainFor":"1 hour"}}`)
	eventually(t, "b stops the link", func() bool {
		return b.status("a").State == v1alpha1.StateFailed && a.status("b").State != v1alpha1.StateConnected
	})
	require.Contains(t, b.status("a").Reason, `spec.staleness.drainFor: "1 hour" is not a duration`)
	require.Len(t, b.imported("a"), 1, "b keeps a's imports for keepFor")

	b.patchPeer(t, "a", `{"staleness":{"drainFor":"1h"}}`)
	eventually(t, "linked again once the spec is fixed", connected)
}
