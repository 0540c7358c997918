package kube

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
)

// Accounts are shared by the pods that run as them and forgotten with the
// last one, so namespaces that come and go leave nothing behind.
func TestPodAccountsShareAndForget(t *testing.T) {
	a := newPodAccounts(spiffeid.RequireTrustDomainFromString("a.mesh"))
	require.True(t, a.set(pod("demo", "p1", "echo")))
	require.True(t, a.set(pod("demo", "p2", "echo")))
	require.False(t, a.set(pod("demo", "p2", "echo")), "same account again is no change")
	require.True(t, a.set(pod("other", "p1", "")))

	p1, p2 := a.account("demo", "p1"), a.account("demo", "p2")
	require.Same(t, p1, p2, "pods of one ServiceAccount share its account")
	require.Equal(t, []string{"spiffe://a.mesh/ns/demo/sa/echo"}, a.identities([]*account{p1}))
	other := a.account("other", "p1")
	require.Equal(t, "spiffe://a.mesh/ns/other/sa/default", other.id)
	require.Equal(t, []string{"spiffe://a.mesh/ns/demo/sa/echo", "spiffe://a.mesh/ns/other/sa/default"},
		a.identities([]*account{p1, other}))
	require.Nil(t, a.identities(nil))
	require.Len(t, a.accounts, 2)

	require.True(t, a.set(pod("demo", "p2", "worker")), "a pod changing account")
	require.Equal(t, "spiffe://a.mesh/ns/demo/sa/worker", a.account("demo", "p2").id)
	require.True(t, a.remove("demo", "p1"))
	require.False(t, a.remove("demo", "p1"), "removing twice")
	require.Nil(t, a.account("demo", "p1"))
	require.True(t, a.remove("demo", "p2"))
	require.True(t, a.remove("other", "p1"))
	require.Empty(t, a.byPod)
	require.Empty(t, a.accounts, "accounts without pods are forgotten")
}
