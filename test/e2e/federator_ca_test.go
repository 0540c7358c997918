package e2e

import (
	"context"
	"encoding/json"
	"maps"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/federator"
	"github.com/isthmus-mesh/isthmus/pkg/identity"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// TestFederatorCA drives the real federator binary's identity services as
// an operator and a workload would: a workload gets its SVID from :15012
// with a real ServiceAccount token, a SPIFFE bundle endpoint client fetches
// the bundle from :8443, and `federator ca rotate` publishes a second root
// that the running federator picks up.
func TestFederatorCA(t *testing.T) {
	env := localcluster.StartT(t, "a")
	installIsthmus(t, env)
	a := env.Cluster("a")
	kc := a.Client()
	ctx := t.Context()
	f := startFederator(t, a)

	// The roots a proxy pod mounts to verify the CA: the bundle, no key.
	require.Equal(t, rootsInSecret(t, kc), publishedRoots(t, kc))

	src, roots := svidFromFederator(t, kc, f, "demo", "client")
	svid, err := src.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, "spiffe://a.mesh/ns/demo/sa/client", svid.ID.String())
	bundle, err := x509bundle.Parse(td, roots)
	require.NoError(t, err)
	_, _, err = x509svid.Verify(svid.Certificates, bundle)
	require.NoError(t, err)

	metrics, err := f.Metrics(ctx)
	require.NoError(t, err)
	require.Contains(t, metrics, "isthmus_ca_certificates_issued_total 1")
	require.Contains(t, metrics, `isthmus_trust_bundle_roots{trust_domain="a.mesh"} 1`)
	require.Contains(t, metrics, "isthmus_ca_root_configmap_conflicts 0")

	fetchCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	fetched, err := federation.FetchBundle(fetchCtx, td, f.BundleEndpoint, federation.WithSPIFFEAuth(bundle, federatorID))
	require.NoError(t, err)
	require.True(t, fetched.X509Bundle().Equal(bundle))

	// The operator's CLI starts a root rotation through the API server.
	_, adminKubeconfig, err := a.KubeconfigFor(localcluster.UserAdmin)
	require.NoError(t, err)
	out, err := a.Command(ctx, filepath.Join(binDir, "federator"), "ca", "rotate", "--kubeconfig", adminKubeconfig).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "root rotation requested")

	var trust federator.TrustDump
	require.Eventually(t, func() bool {
		body, err := f.Get(ctx, "/debug/trust")
		if err != nil || json.Unmarshal(body, &trust) != nil {
			return false
		}
		return trust.Rotation.Phase == "prepared" && len(trust.Bundles) == 1 && len(trust.Bundles[0].Roots) == 2
	}, 60*time.Second, 200*time.Millisecond, "the federator publishes the new root (last: %+v)", trust)

	// The mounted roots follow: both, before the new one signs anything.
	require.Eventually(t, func() bool {
		b, err := x509bundle.Parse(td, publishedRoots(t, kc))
		return err == nil && len(b.X509Authorities()) == 2
	}, 30*time.Second, 200*time.Millisecond, "the roots ConfigMap carries the new root")
	require.Equal(t, rootsInSecret(t, kc), publishedRoots(t, kc))
	// So do the copies in the other namespaces, which workloads mount.
	for _, ns := range []string{"default", "demo"} {
		var last string
		require.Eventually(t, func() bool {
			cm, err := kc.CoreV1().ConfigMaps(ns).Get(ctx, ca.RootsConfigMapName, metav1.GetOptions{})
			if err != nil {
				last = err.Error()
				return false
			}
			last = cm.Data[ca.KeyRootCert]
			return last == string(rootsInSecret(t, kc)) && cm.Labels["app.kubernetes.io/managed-by"] == "isthmus"
		}, 30*time.Second, 200*time.Millisecond, "ConfigMap %s/%s carries both roots (last: %s)", ns, ca.RootsConfigMapName, last)
	}

	out, err = a.Command(ctx, filepath.Join(binDir, "federator"), "ca", "status", "-o", "json", "--kubeconfig", adminKubeconfig).CombinedOutput()
	require.NoError(t, err, "%s", out)
	var st ca.RotationStatus
	require.NoError(t, json.Unmarshal(out, &st), "%s", out)
	require.Equal(t, "prepared", st.Phase)
	require.Equal(t, 2, st.Roots)
	require.False(t, st.ActivateAt.IsZero())

	out, err = a.Command(ctx, filepath.Join(binDir, "federator"), "ca", "rotate", "--kubeconfig", adminKubeconfig).CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "already in progress")
}

// publishedRoots reads the roots ConfigMap the federator keeps for proxy
// pods to mount, and checks it holds certificates only.
func publishedRoots(t *testing.T, kc kubernetes.Interface) []byte {
	t.Helper()
	cm, err := kc.CoreV1().ConfigMaps("isthmus-system").Get(t.Context(), ca.RootsConfigMapName, metav1.GetOptions{})
	require.NoError(t, err, "the federator publishes its roots with its own least-privileged credentials")
	require.Equal(t, []string{ca.KeyRootCert}, slices.Collect(maps.Keys(cm.Data)))
	require.NotContains(t, cm.Data[ca.KeyRootCert], "PRIVATE KEY")
	return []byte(cm.Data[ca.KeyRootCert])
}

// rootsInSecret reads the roots the CA keeps in its Secret.
func rootsInSecret(t *testing.T, kc kubernetes.Interface) []byte {
	t.Helper()
	sec, err := kc.CoreV1().Secrets("isthmus-system").Get(t.Context(), ca.DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	return sec.Data[ca.KeyRootCert]
}

// svidFromFederator gets an SVID for ns/sa from the federator's CA, as a
// workload does: with a real ServiceAccount token, verifying the federator
// with the root it keeps in its Secret (returned too, as PEM).
func svidFromFederator(t *testing.T, kc kubernetes.Interface, f *fedproc.Federator, ns, sa string) (*identity.Source, []byte) {
	t.Helper()
	ctx := t.Context()
	sec, err := kc.CoreV1().Secrets("isthmus-system").Get(ctx, ca.DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err, "the federator generated its root with its own least-privileged credentials")
	roots := sec.Data[ca.KeyRootCert]
	ensureSA(t, kc, ns, sa)
	src, err := identity.New(ctx, identity.Config{
		CAAddress: f.CAAddr, CAID: federatorID, RootsPEM: roots,
		TrustDomain: td, Namespace: ns, ServiceAccount: sa,
		TokenSource: func(ctx context.Context) (string, error) {
			tr, err := kc.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
				Spec: authenticationv1.TokenRequestSpec{Audiences: []string{audience}},
			}, metav1.CreateOptions{})
			if err != nil {
				return "", err
			}
			return tr.Status.Token, nil
		},
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = src.Close() })
	return src, roots
}
