package federation

import (
	"testing"
	"time"

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

// A TTL too short to use the token is refused, naming the floor; the
// expiry is rounded up to the second, never before now+TTL; no TTL is
// the default hour.
func TestCreateTokenTTL(t *testing.T) {
	a := newCluster(t, "a", nil)
	create := func(now time.Time, ttl time.Duration) (Token, error) {
		return CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "b", Addresses: []string{a.addr}, Now: now, TTL: ttl})
	}
	now := time.Now().Truncate(time.Second).Add(500 * time.Millisecond)
	for _, ttl := range []time.Duration{time.Millisecond, 59 * time.Second, -time.Hour} {
		_, err := create(now, ttl)
		require.ErrorContains(t, err, "--ttl "+ttl.String()+" is shorter than 1m0s")
	}
	_, err := create(now, MaxTokenTTL+time.Second)
	require.ErrorContains(t, err, "--ttl 168h0m1s is longer than 168h0m0s")

	tok, err := create(now, time.Minute)
	require.NoError(t, err)
	require.Equal(t, now.Add(time.Minute+500*time.Millisecond).UTC(), tok.Expires, "rounded up to the second")
	rec, err := a.kube.CoreV1().Secrets(testNS).Get(t.Context(), "isthmus-token-"+tok.ID, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, tok.Expires.Format(time.RFC3339), string(rec.Data[keyExpires]))

	whole := now.Truncate(time.Second)
	tok, err = create(whole, 0)
	require.NoError(t, err)
	require.Equal(t, whole.Add(DefaultTokenTTL).UTC(), tok.Expires)
}

// `federator join` without --name says the flag is required, and which
// name the token is from, not that "" does not match it.
func TestJoinWithoutName(t *testing.T) {
	a := newCluster(t, "a", nil)
	j := newCluster(t, "j", nil)
	tok, err := CreateToken(t.Context(), a.kube, TokenOptions{Namespace: testNS, Peer: "j", Addresses: []string{a.addr}})
	require.NoError(t, err)
	text, err := tok.Encode()
	require.NoError(t, err)
	_, err = Join(t.Context(), j.kube, j.dyn, JoinOptions{Namespace: testNS, Token: text})
	require.EqualError(t, err, "--name is required: the name of the cluster that created the token (--name a for this one)")
}
