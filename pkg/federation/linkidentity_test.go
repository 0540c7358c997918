package federation

import (
	"context"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// A link's identity is its trust domain and federator ID: each belongs to
// one link, a change of either is applied, and nothing of an old identity
// stays trusted.

// createPeer creates FederationPeer name on c as an accepting side's
// (no token), with trust domain td and federator ID id.
func (c *cluster) createPeer(t *testing.T, name, td, id string) {
	t.Helper()
	_, err := c.dyn.Resource(v1alpha1.Resource).Create(t.Context(), &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.GroupVersion.String(), "kind": "FederationPeer",
		"metadata": map[string]any{"name": name},
		"spec":     map[string]any{"trustDomain": td, "federatorID": id},
	}}, metav1.CreateOptions{})
	require.NoError(t, err)
}

// trusts reports whether c trusts trust domain td with exactly roots'
// roots.
func (c *cluster) trusts(td string, roots *cluster) bool {
	b, err := c.trust.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString(td))
	return err == nil && roots != nil && b.Equal(roots.ca.Bundle())
}

// trustsNothingOf reports whether c holds no bundle for td.
func (c *cluster) trustsNothingOf(td string) bool {
	_, err := c.trust.GetBundleForTrustDomain(spiffeid.RequireTrustDomainFromString(td))
	return err != nil
}

func fedID(td string) string { return "spiffe://" + td + "/ns/" + testNS + "/sa/isthmus-federator" }

// Finding 2: `token create --peer evil --peer-trust-domain c.mesh` was
// accepted while c's link held c.mesh.
func TestCreateTokenRefusesATrustDomainALinkHolds(t *testing.T) {
	a := newCluster(t, "a", nil)
	c := newCluster(t, "c", nil)
	link(t, a, c)
	eventually(t, "linked", func() bool { return a.status("c").State == v1alpha1.StateConnected })

	_, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "evil", PeerTrustDomain: "c.mesh", Addresses: []string{a.addr}})
	require.ErrorContains(t, err, `--peer-trust-domain c.mesh belongs to this cluster's link with "c"`)
	// The joining side holds the acceptor's trust domain the same way.
	_, err = CreateToken(t.Context(), c.kube, TokenOptions{Namespace: testNS, Peer: "evil", PeerTrustDomain: "spiffe://a.mesh", Addresses: []string{c.addr}})
	require.ErrorContains(t, err, `--peer-trust-domain a.mesh belongs to this cluster's link with "a"`)
	// A FederationPeer made by hand, when the FederationPeers are read.
	a.createPeer(t, "x", "x.mesh", fedID("x.mesh"))
	_, err = CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "y", PeerTrustDomain: "x.mesh", Addresses: []string{a.addr}, Peers: a.dyn})
	require.ErrorContains(t, err, `--peer-trust-domain x.mesh belongs to this cluster's link with "x"`)
	_, err = CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "evil", PeerTrustDomain: "a.mesh", Addresses: []string{a.addr}})
	require.ErrorContains(t, err, "--peer-trust-domain a.mesh is this cluster's own")

	// The peer itself may have a new token (the federator answers a
	// linked peer AlreadyExists), and so may a new trust domain.
	_, err = CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "c", Addresses: []string{a.addr}, Peers: a.dyn})
	require.NoError(t, err)
	_, err = CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "d", Addresses: []string{a.addr}, Peers: a.dyn})
	require.NoError(t, err)
}

// Finding 2: a joiner with a token for another name took an existing
// peer's trust domain at Establish, and a's c.mesh bundle became the
// joiner's root.
func TestEstablishRefusesATrustDomainAnotherLinkHolds(t *testing.T) {
	a := newCluster(t, "a", nil)
	c := newCluster(t, "c", nil)
	// Made before c linked: nothing held c.mesh then.
	tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "evil", PeerTrustDomain: "c.mesh", Addresses: []string{a.addr}})
	require.NoError(t, err)
	link(t, a, c)
	eventually(t, "linked", func() bool {
		return a.status("c").State == v1alpha1.StateConnected && a.trusts("c.mesh", c)
	})

	evil := newClusterIn(t, "evil", "c.mesh", nil)
	_, err = evil.manager.establish(t.Context(), tok)
	require.ErrorContains(t, err, `the joiner's trust domain c.mesh belongs to this cluster's link with "c"`)
	require.True(t, isPermanent(err), "refused for good: %v", err)

	require.True(t, a.trusts("c.mesh", c), "a's c.mesh bundle is still c's")
	_, err = a.dyn.Resource(v1alpha1.Resource).Get(t.Context(), "evil", metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "no FederationPeer for the joiner: %v", err)
	_, err = a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("evil"), metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "no bundle stored for the joiner: %v", err)
	require.Equal(t, v1alpha1.StateConnected, a.status("c").State)
}

// Two FederationPeers claiming one trust domain: the newer is refused
// (Accepted False, InvalidSpec) whatever order the federator sees them
// in; it never drops the older's bundle, and takes the trust domain once
// the older is gone.
func TestNewerFederationPeerForATrustDomainIsRefused(t *testing.T) {
	a := newCluster(t, "a", nil)
	c := newCluster(t, "c", nil)
	link(t, a, c)
	c.export(t, echoService(1))
	eventually(t, "linked", func() bool { return a.status("c").State == v1alpha1.StateConnected && len(a.imported("c")) == 1 })

	refused := func(name string) {
		t.Helper()
		eventually(t, name+" refused", func() bool {
			cond := a.accepted(t, name)
			return a.status(name).State == v1alpha1.StateFailed && cond != nil && cond.Status == metav1.ConditionFalse &&
				cond.Reason == v1alpha1.ReasonInvalidSpec && strings.Contains(cond.Message, `spec.trustDomain c.mesh is the trust domain of FederationPeer "c"`)
		})
	}
	cLinked := func() bool {
		return a.status("c").State == v1alpha1.StateConnected && c.status("a").State == v1alpha1.StateConnected && a.trusts("c.mesh", c)
	}
	// The same federator ID as c's: c's streams must still find c.
	a.createPeer(t, "evil", "c.mesh", fedID("c.mesh"))
	refused("evil")
	require.True(t, cLinked())

	a.kill()
	a.start(t)
	refused("evil")
	eventually(t, "c links again after a's restart", cLinked)
	eventually(t, "c's imports are back", func() bool { return len(a.imported("c")) == 1 })

	require.NoError(t, a.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "evil", metav1.DeleteOptions{}))
	eventually(t, "evil removed", func() bool { return a.entry("evil") == nil })
	require.True(t, cLinked(), "removing the refused peer drops nothing of c's link")
	require.Len(t, a.imported("c"), 1)

	a.createPeer(t, "evil2", "c.mesh", fedID("c.mesh"))
	refused("evil2")
	require.NoError(t, a.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "c", metav1.DeleteOptions{}))
	eventually(t, "evil2 holds c.mesh once c is gone, with nothing of c's", func() bool {
		cond := a.accepted(t, "evil2")
		return cond != nil && cond.Status == metav1.ConditionTrue &&
			strings.Contains(a.status("evil2").Reason, "no trust bundle is stored") && a.trustsNothingOf("c.mesh")
	})
}

// Finding 3: a changed spec.federatorID was never applied, and the old
// federator identity stayed authorized.
func TestChangedFederatorIDIsApplied(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	b.export(t, echoService(1))
	eventually(t, "linked", func() bool { return a.status("b").State == v1alpha1.StateConnected && len(a.imported("b")) == 1 })

	moved := "spiffe://b.mesh/ns/elsewhere/sa/isthmus-federator"
	a.patchPeer(t, "b", `{"federatorID":"`+moved+`"}`)
	eventually(t, "b's federator, as its old identity, is refused", func() bool {
		return a.entry("b").p.id.String() == moved && a.status("b").State != v1alpha1.StateConnected &&
			strings.Contains(b.status("a").Reason, "no FederationPeer expects federator "+fedID("b.mesh"))
	})
	require.Len(t, a.imported("b"), 1, "what b exported is kept, ageing, while the new identity is awaited")
	require.True(t, a.trusts("b.mesh", b), "the trust domain is the same: its bundle stays")

	a.patchPeer(t, "b", `{"federatorID":"`+fedID("b.mesh")+`"}`)
	eventually(t, "linked again", func() bool {
		return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected
	})
	require.Len(t, a.imported("b"), 1)
}

// Finding 3: reconcile rewrote the peer's persistBundle while the stream
// the peer opened stored a new bundle with it (run with -race).
func TestSpecChangesWhileBundlesArrive(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	eventually(t, "linked", func() bool { return a.status("b").State == v1alpha1.StateConnected })
	roots := b.ca.Bundle().X509Authorities()
	seq := b.ca.BundleSequence()
	const n = 100
	patched := make(chan struct{})
	go func() {
		defer close(patched)
		for i := 1; i <= n; i++ {
			_, err := a.dyn.Resource(v1alpha1.Resource).Patch(t.Context(), "b", types.MergePatchType,
				[]byte(`{"spec":{"staleness":{"keepFor":"`+strconv.Itoa(60+i)+`s"}}}`), metav1.PatchOptions{})
			if err != nil {
				t.Errorf("patch: %v", err)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	for i := 1; i <= n; i++ {
		b.trust.SetLocal(roots, seq+uint64(i), 0)
		time.Sleep(time.Millisecond)
	}
	<-patched
	eventually(t, "a stored b's last bundle", func() bool {
		stored, found, err := a.manager.loadPeerBundle(t.Context(), "b", spiffeid.RequireTrustDomainFromString("b.mesh"))
		return err == nil && found && sequenceOf(stored) == seq+n
	})
}

// Finding 9: a changed trust domain left the old bundle trusted and the
// old imports in the catalog, never ageing.
func TestChangedTrustDomainForgetsTheOldLink(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	b.export(t, echoService(1))
	eventually(t, "linked", func() bool { return a.status("b").State == v1alpha1.StateConnected && len(a.imported("b")) == 1 })

	a.patchPeer(t, "b", `{"trustDomain":"z.mesh","federatorID":"spiffe://z.mesh/fed"}`)
	eventually(t, "a forgot b.mesh's link", func() bool {
		_, err := a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("b"), metav1.GetOptions{})
		return apierrors.IsNotFound(err) && len(a.imported("b")) == 0 && a.trustsNothingOf("b.mesh")
	})
	eventually(t, "the new trust domain needs a new link, and says so", func() bool {
		s := a.status("b")
		return s.State == v1alpha1.StateFailed && strings.Contains(s.Reason, "no trust bundle is stored")
	})
	require.NotContains(t, a.store.Sources(), "b")

	// The joining side: the same, and it says a new join is needed.
	require.NoError(t, b.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "a", metav1.DeleteOptions{}))
	require.NoError(t, a.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "b", metav1.DeleteOptions{}))
	link(t, a, b)
	eventually(t, "linked again", func() bool { return b.status("a").State == v1alpha1.StateConnected && len(a.imported("b")) == 1 })
	a.export(t, echoService(1))
	eventually(t, "b imports a's echo", func() bool { return len(b.imported("a")) == 1 })
	b.patchPeer(t, "a", `{"trustDomain":"y.mesh","federatorID":"spiffe://y.mesh/fed"}`)
	eventually(t, "b forgot a.mesh's link", func() bool {
		_, err := b.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("a"), metav1.GetOptions{})
		s := b.status("a")
		return apierrors.IsNotFound(err) && len(b.imported("a")) == 0 && b.trustsNothingOf("a.mesh") &&
			s.State == v1alpha1.StateFailed && strings.Contains(s.Reason, "trust domain y.mesh") && strings.Contains(s.Reason, "join again with a new token")
	})
}

// Finding 10: a FederationPeer deleted while the federator was down left
// its ConfigMap; the federator deletes such ConfigMaps when it starts.
func TestStartDeletesLeftoverPeerConfigMaps(t *testing.T) {
	a := newCluster(t, "a", nil)
	a.kill()
	leftover := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("ghost.mesh"), a.ca.Bundle().X509Authorities())
	require.NoError(t, a.manager.storePeerBundle(t.Context(), "ghost", leftover))
	kept := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("kept.mesh"), a.ca.Bundle().X509Authorities())
	require.NoError(t, a.manager.storePeerBundle(t.Context(), "kept", kept))
	a.createPeer(t, "kept", "kept.mesh", fedID("kept.mesh"))
	// Labelled, but not a peer ConfigMap of the federator's naming.
	_, err := a.kube.CoreV1().ConfigMaps(testNS).Create(t.Context(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: "someone-elses", Labels: map[string]string{LabelPeer: "ghost"}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	a.start(t)
	eventually(t, "the leftover is deleted", func() bool {
		_, err := a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("ghost"), metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	for _, name := range []string{peerConfigMapName("kept"), "someone-elses"} {
		_, err := a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), name, metav1.GetOptions{})
		require.NoError(t, err, name)
	}
	eventually(t, "kept's stored bundle is used", func() bool { return a.status("kept").BundleRoots == 1 })
}

// Finding 10: a join found a bundle an earlier link of the same name had
// stored, skipped Establish and trusted the old roots for ever. Here b is
// down while the leftover is written and the join made, as when a link
// was deleted and made again while the federator was down (a running
// federator's start-up sweep could otherwise delete the leftover first,
// and the test would pass without testing anything).
func TestJoinEstablishesDespiteALeftoverBundle(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	b.kill()
	old, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: a.trust.LocalTrustDomain(), Namespace: testNS})
	require.NoError(t, err)
	require.NoError(t, b.manager.storePeerBundle(t.Context(), "a", spiffebundle.FromX509Authorities(a.trust.LocalTrustDomain(), old.Bundle().X509Authorities())))
	a.export(t, echoService(1))

	link(t, a, b)
	b.start(t)
	eventually(t, "linked with a's own roots", func() bool {
		return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected &&
			b.trusts("a.mesh", a) && len(b.imported("a")) == 1
	})
	stored, found, err := b.manager.loadPeerBundle(t.Context(), "a", a.trust.LocalTrustDomain())
	require.NoError(t, err)
	require.True(t, found)
	require.True(t, stored.X509Bundle().Equal(a.ca.Bundle()), "the stored copy is a's bundle")
	_, err = b.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-join-a", metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "the spent token is deleted: %v", err)
}

// relinkedByA links a and b, then a ends the link (its FederationPeer b
// deleted) and makes a new token for b: b still has its old link, as
// when both sides are deleted and b has yet to join again. linked
// reports whether both sides are connected.
func relinkedByA(t *testing.T) (a, b *cluster, tok Token, text string, linked func() bool) {
	t.Helper()
	a = newCluster(t, "a", nil)
	b = newCluster(t, "b", nil)
	link(t, a, b)
	linked = func() bool {
		return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected
	}
	eventually(t, "linked", linked)
	require.NoError(t, a.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "b", metav1.DeleteOptions{}))
	eventually(t, "a ended its link", func() bool { return len(a.manager.Statuses()) == 0 })
	tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{a.addr}})
	require.NoError(t, err)
	text, err = tok.Encode()
	require.NoError(t, err)
	return a, b, tok, text, linked
}

// A FederationPeer deleted and joined again at once (`kubectl delete`,
// then `federator join` with a new token, before the federator saw the
// deletion) links with the new token. Ending the old link deleted the
// join Secret by name, and so the new token with it: the new link was
// refused for a token Secret that "is gone".
func TestJoinAgainAtOnceKeepsTheNewToken(t *testing.T) {
	_, b, tok, text, linked := relinkedByA(t)

	// The join runs when b's federator, ending the old link, first reads
	// the join Secret (the old one was deleted once spent): what Join
	// writes is in place by then.
	var joined atomic.Bool
	join := k8stesting.ReactionFunc(func(a k8stesting.Action) (bool, runtime.Object, error) {
		if !a.Matches("get", "secrets") || a.(k8stesting.GetAction).GetName() != "isthmus-join-a" || joined.Swap(true) {
			return false, nil, nil
		}
		sec, fp := joinObjects(&tok, testNS, text)
		if err := b.kube.Tracker().Create(corev1.SchemeGroupVersion.WithResource("secrets"), sec, testNS); err != nil {
			t.Errorf("store the new token: %v", err)
		}
		obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(fp)
		if err == nil {
			_, err = b.dyn.Resource(v1alpha1.Resource).Create(context.WithoutCancel(t.Context()), &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
		}
		if err != nil {
			t.Errorf("create the new FederationPeer: %v", err)
		}
		return false, nil, nil
	})
	b.react.Store(&join)
	require.NoError(t, b.dyn.Resource(v1alpha1.Resource).Delete(t.Context(), "a", metav1.DeleteOptions{}))
	eventually(t, "linked again with the new token", func() bool { return joined.Load() && linked() })
}

// A FederationPeer deleted and made again before the federator saw the
// deletion is seen as one object whose uid changed: it is a new link
// (here, from a new token), not the old one going on with the old
// link's state.
func TestFederationPeerWithANewUIDIsANewLink(t *testing.T) {
	_, b, tok, text, linked := relinkedByA(t)

	sec, fp := joinObjects(&tok, testNS, text)
	_, err := b.kube.CoreV1().Secrets(testNS).Create(t.Context(), sec, metav1.CreateOptions{})
	require.NoError(t, err)
	old := b.entry("a")
	u, err := b.dyn.Resource(v1alpha1.Resource).Get(t.Context(), "a", metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEmpty(t, u.GetUID())
	u.SetUID(types.UID("recreated-" + string(u.GetUID())))
	u.SetAnnotations(fp.Annotations)
	_, err = b.dyn.Resource(v1alpha1.Resource).Update(t.Context(), u, metav1.UpdateOptions{})
	require.NoError(t, err)
	eventually(t, "linked again with the new token", func() bool { return b.entry("a") != old && linked() })
}

// On the accepting side, a FederationPeer seen with a new uid and the
// same trust domain was made by Establish for the joiner's new link,
// just after it stored the joiner's new bundle: ending the old link
// keeps that bundle, and tells the joiner nothing (a Terminate would end
// its new link for good).
func TestAcceptorKeepsTheBundleOfAFederationPeerMadeAgain(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	b.export(t, echoService(1))
	linked := func() bool {
		return a.status("b").State == v1alpha1.StateConnected && b.status("a").State == v1alpha1.StateConnected &&
			len(a.imported("b")) == 1
	}
	eventually(t, "linked", linked)

	old := a.entry("b")
	u, err := a.dyn.Resource(v1alpha1.Resource).Get(t.Context(), "b", metav1.GetOptions{})
	require.NoError(t, err)
	u.SetUID(types.UID("recreated-" + string(u.GetUID())))
	_, err = a.dyn.Resource(v1alpha1.Resource).Update(t.Context(), u, metav1.UpdateOptions{})
	require.NoError(t, err)
	eventually(t, "the new object's link is up", func() bool { return a.entry("b") != old && linked() })
	_, err = a.kube.CoreV1().ConfigMaps(testNS).Get(t.Context(), peerConfigMapName("b"), metav1.GetOptions{})
	require.NoError(t, err, "the stored bundle is kept")
	require.False(t, b.status("a").Terminated, "the joiner was told its link ended: %s", b.status("a").Reason)
}

// A link still trying to establish does not spend a token joined since
// (the same Secret name, another token ID): that token is the new
// link's. It stops, as a link whose token is gone does.
func TestOldLinkLeavesANewTokenAlone(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	// A port nothing listens on: b's link retries establishing.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closed := ln.Addr().String()
	require.NoError(t, ln.Close())
	tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{closed}})
	require.NoError(t, err)
	text, err := tok.Encode()
	require.NoError(t, err)
	_, err = Join(t.Context(), b.kube, b.dyn, JoinOptions{Namespace: testNS, Name: "a", Token: text})
	require.NoError(t, err)
	eventually(t, "b tries to establish", func() bool { return b.status("a").Reason != "" })

	sec, err := b.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-join-a", metav1.GetOptions{})
	require.NoError(t, err)
	sec.Annotations[AnnotationTokenID] = "another-token"
	_, err = b.kube.CoreV1().Secrets(testNS).Update(t.Context(), sec, metav1.UpdateOptions{})
	require.NoError(t, err)
	eventually(t, "b's old link stops", func() bool {
		s := b.status("a")
		return s.State == v1alpha1.StateFailed && strings.Contains(s.Reason, "token Secret")
	})
	_, err = b.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-join-a", metav1.GetOptions{})
	require.NoError(t, err, "the new token is kept")
}
