package federation

import (
	"testing"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
)

// --peer-trust-domain takes a SPIFFE URI as go-spiffe does, and the token
// and its record carry the trust domain's name, which is what the joiner
// presents: the token is used, not refused for ever.
func TestCreateTokenPeerTrustDomainAsURI(t *testing.T) {
	a := newCluster(t, "a", nil)
	j := newCluster(t, "j", nil)
	tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "j", PeerTrustDomain: "spiffe://j.mesh", Addresses: []string{a.addr}})
	require.NoError(t, err)
	require.Equal(t, "j.mesh", tok.PeerTrustDomain)
	rec, err := a.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-token-"+tok.ID, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "j.mesh", string(rec.Data[keyPeerTrustDomain]))

	text, err := tok.Encode()
	require.NoError(t, err)
	_, err = Join(t.Context(), j.kube, j.dyn, JoinOptions{Namespace: testNS, Name: "a", Token: text})
	require.NoError(t, err)
	eventually(t, "a has a connected FederationPeer for j", func() bool { return a.status("j").State == v1alpha1.StateConnected })

	for _, bad := range []string{"spiffe://j.mesh/ns/x", "J_Mesh", "https://j.mesh"} {
		_, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "j", PeerTrustDomain: bad, Addresses: []string{a.addr}})
		require.ErrorContains(t, err, `--peer-trust-domain "`+bad+`"`)
	}
}
