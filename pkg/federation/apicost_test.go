package federation

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// What federation costs the API server: anyone who reaches the federation
// port can call Establish, and the federator's API client, with its
// client-side rate limit, is shared by everything the federator does.

// countActions counts the requests of verb on resource made through
// actions, from index from on.
func countActions(actions []k8stesting.Action, from int, verb, resource string) int {
	n := 0
	for _, a := range actions[from:] {
		if a.GetVerb() == verb && a.GetResource().Resource == resource {
			n++
		}
	}
	return n
}

// Finding 5: an unauthenticated Establish cost two GETs (the token
// record and the FederationPeer), with no limit of its own.
func TestEstablishCostsLittleAndHasItsOwnLimit(t *testing.T) {
	a := newCluster(t, "a", func(c *Config) { c.EstablishRate, c.EstablishBurst = 0.001, 3 })
	j := newCluster(t, "j", nil)
	client := dialAs(t, a, j.self)
	junk := &fedv1.EstablishRequest{TokenId: "0123456789abcdef", Secret: "x", ClusterName: "nobody", FederatorId: fedID("j.mesh")}

	kubeFrom, dynFrom := len(a.kube.Actions()), len(a.dyn.Actions())
	_, err := client.Establish(t.Context(), junk)
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	require.Zero(t, countActions(a.dyn.Actions(), dynFrom, "get", "federationpeers"), "the FederationPeer is looked up in the cache")
	require.Equal(t, 1, countActions(a.kube.Actions(), kubeFrom, "get", "secrets"), "one read: the token record")

	_, err = client.Establish(t.Context(), junk)
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	_, err = client.Establish(t.Context(), junk)
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	kubeFrom = len(a.kube.Actions())
	_, err = client.Establish(t.Context(), junk)
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "Establish calls a second")
	require.Zero(t, countActions(a.kube.Actions(), kubeFrom, "get", "secrets"), "a call over the limit costs nothing")
}

// Finding 5: each new bundle sequence of a peer cost a GET and an UPDATE
// of its ConfigMap, and storing the bundle it already held cost both too.
func TestPeerBundleWritesCostOneUpdate(t *testing.T) {
	a := newCluster(t, "a", nil)
	// Stopped: its start-up sweep deletes a ConfigMap no FederationPeer
	// owns, as "p"'s is here, while the writes are counted.
	a.kill()
	td := spiffeid.RequireTrustDomainFromString("p.mesh")
	peerCA, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: td, Namespace: testNS})
	require.NoError(t, err)
	bundle := func(seq uint64) *spiffebundle.Bundle {
		b := spiffebundle.FromX509Authorities(td, peerCA.Bundle().X509Authorities())
		b.SetSequenceNumber(seq)
		return b
	}
	writes := func(seq uint64) (gets, writes int) {
		t.Helper()
		from := len(a.kube.Actions())
		require.NoError(t, a.manager.storePeerBundle(t.Context(), "p", bundle(seq)))
		acts := a.kube.Actions()
		return countActions(acts, from, "get", "configmaps"), countActions(acts, from, "create", "configmaps") + countActions(acts, from, "update", "configmaps")
	}
	g, w := writes(1)
	require.Equal(t, 1, w, "stored")
	require.LessOrEqual(t, g, 1)
	g, w = writes(1)
	require.Zero(t, g+w, "the bundle it holds is not written again")
	for seq := uint64(2); seq < 5; seq++ {
		g, w = writes(seq)
		require.Equal(t, [2]int{0, 1}, [2]int{g, w}, "a new sequence is one update")
	}
	stored, found, err := a.manager.loadPeerBundle(t.Context(), "p", td)
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, uint64(4), sequenceOf(stored))
}
