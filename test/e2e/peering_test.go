package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// TestPeeringCLI links two real clusters' API objects with the operator's
// CLI, as `kubectl apply` could: token create in a records only a hash;
// join in b stores the token and creates the FederationPeer; every bad
// token is refused with a reason and changes nothing.
func TestPeeringCLI(t *testing.T) {
	env := localcluster.StartT(t, "a", "b")
	installIsthmus(t, env)
	a, b := env.Cluster("a"), env.Cluster("b")
	ctx := t.Context()
	startFederator(t, a)
	startFederator(t, b)

	cli := func(c *localcluster.Cluster, args ...string) (string, error) {
		_, kubeconfig, err := c.KubeconfigFor(localcluster.UserAdmin)
		require.NoError(t, err)
		out, err := c.Command(ctx, filepath.Join(binDir, "federator"), append(args, "--kubeconfig", kubeconfig)...).Output()
		return strings.TrimSpace(string(out)), err
	}
	stderrOf := func(err error) string {
		if err == nil {
			return ""
		}
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return string(ee.Stderr)
		}
		return err.Error()
	}

	token, err := cli(a, "token", "create", "--peer", "b", "--address", "10.254.0.1:15443")
	require.NoError(t, err, stderrOf(err))
	parsed, err := federation.DecodeToken(token)
	require.NoError(t, err)
	require.Equal(t, "a", parsed.ClusterName)
	require.Equal(t, "a.mesh", parsed.TrustDomain)
	require.Equal(t, "spiffe://a.mesh/ns/isthmus-system/sa/isthmus-federator", parsed.FederatorID)

	// Cluster a keeps only a hash of the secret.
	recs, err := a.Client().CoreV1().Secrets("isthmus-system").List(ctx, metav1.ListOptions{LabelSelector: federation.LabelTokenFor + "=b"})
	require.NoError(t, err)
	require.Len(t, recs.Items, 1)
	for _, v := range recs.Items[0].Data {
		require.NotContains(t, string(v), parsed.Secret)
	}
	require.True(t, federation.SecretMatches(parsed.Secret, string(recs.Items[0].Data["secret-sha256"])))

	// Bad tokens change nothing in b.
	otherPeer, err := cli(a, "token", "create", "--peer", "c", "--address", "10.254.0.1:15443")
	require.NoError(t, err)
	// The command refuses a TTL under a minute; an expired token is made
	// as if two hours ago.
	_, err = cli(a, "token", "create", "--peer", "b", "--address", "10.254.0.1:15443", "--ttl", "1ns")
	require.ErrorContains(t, err, "exit status")
	require.Contains(t, stderrOf(err), "--ttl")
	old, err := federation.CreateToken(ctx, a.Client(), federation.TokenOptions{Namespace: "isthmus-system", Peer: "b",
		Addresses: []string{"10.254.0.1:15443"}, Now: time.Now().Add(-2 * time.Hour), TTL: time.Hour})
	require.NoError(t, err)
	expired, err := old.Encode()
	require.NoError(t, err)
	_, err = cli(a, "token", "create", "--peer", "b")
	require.ErrorContains(t, err, "exit status")
	require.Contains(t, stderrOf(err), "--address is required")

	tokenFile := filepath.Join(t.TempDir(), "token")
	for _, tc := range []struct{ name, token, peerName, want string }{
		{"token for another cluster", otherPeer, "a", `created for cluster "c", this cluster is "b"`},
		{"expired token", expired, "a", "expired at"},
		{"tampered token", token[:len(token)-10], "a", "invalid peering token"},
		{"wrong name", token, "x", `--name "x" does not match`},
	} {
		require.NoError(t, os.WriteFile(tokenFile, []byte(tc.token), 0o600))
		_, err := cli(b, "join", "--name", tc.peerName, "--token-file", tokenFile)
		require.Error(t, err, tc.name)
		require.Contains(t, stderrOf(err), tc.want, tc.name)
	}
	cfgB, err := b.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(cfgB)
	require.NoError(t, err)
	list, err := dyn.Resource(v1alpha1.Resource).List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	require.Empty(t, list.Items, "no FederationPeer after refused joins")
	out, err := cli(b, "status")
	require.NoError(t, err, stderrOf(err))
	require.Equal(t, "no FederationPeers: link a cluster with `federator token create` / `federator join`", out)

	// The real join.
	require.NoError(t, os.WriteFile(tokenFile, []byte(token), 0o600))
	out, err = cli(b, "join", "--name", "a", "--token-file", tokenFile)
	require.NoError(t, err, stderrOf(err))
	require.Contains(t, out, "FederationPeer a created")
	u, err := dyn.Resource(v1alpha1.Resource).Get(ctx, "a", metav1.GetOptions{})
	require.NoError(t, err)
	var peer v1alpha1.FederationPeer
	require.NoError(t, runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &peer))
	require.Equal(t, "a.mesh", peer.Spec.TrustDomain)
	require.Equal(t, []string{"10.254.0.1:15443"}, peer.Spec.Addresses)
	sec, err := b.Client().CoreV1().Secrets("isthmus-system").Get(ctx, peer.Spec.TokenSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, token, string(sec.Data["token"]))

	// `federator status` shows the new peer, as a table and as JSON; the
	// state depends on whether b's federator got through to a, so only the
	// spec's fields are asserted here.
	out, err = cli(b, "status")
	require.NoError(t, err, stderrOf(err))
	t.Logf("federator status in b:\n%s", out)
	lines := strings.Split(out, "\n")
	require.GreaterOrEqual(t, len(lines), 2, out)
	require.Equal(t, []string{"NAME", "STATE", "TRUST", "DOMAIN"}, strings.Fields(lines[0])[:4], out)
	require.Equal(t, []string{"a"}, strings.Fields(lines[1])[:1], out)
	require.Contains(t, lines[1], "a.mesh")
	out, err = cli(b, "status", "-o", "json")
	require.NoError(t, err, stderrOf(err))
	var status struct {
		Peers []struct {
			Name string                      `json:"name"`
			Spec v1alpha1.FederationPeerSpec `json:"spec"`
		} `json:"peers"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &status), out)
	require.Len(t, status.Peers, 1)
	require.Equal(t, "a", status.Peers[0].Name)
	require.Equal(t, peer.Spec, status.Peers[0].Spec)
	_, err = cli(b, "status", "-o", "yaml")
	require.Contains(t, stderrOf(err), `unknown output format "yaml"`)

	_, err = cli(b, "join", "--name", "a", "--token-file", tokenFile)
	require.Contains(t, stderrOf(err), `FederationPeer "a" already exists`)
}
