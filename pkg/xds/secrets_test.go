package xds

import (
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

var _ TrustBundles = (*trust.Store)(nil)

// goldenRoots reads a fixed root certificate from testdata/roots, so the
// golden files do not change from run to run.
func goldenRoots(t testing.TB, names ...string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join("testdata", "roots", n+".pem"))
		require.NoError(t, err)
		certs, err := pemutil.ParseCertificates(b)
		require.NoError(t, err)
		out = append(out, certs...)
	}
	return out
}

func bundleOf(t testing.TB, td string, roots ...string) *x509bundle.Bundle {
	t.Helper()
	return x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(td), goldenRoots(t, roots...))
}

func renderSecrets(t testing.TB, secrets []*tlsv3.Secret, version string) []byte {
	t.Helper()
	doc := struct {
		Version string            `json:"secretsVersion"`
		Secrets []json.RawMessage `json:"secrets"`
	}{Version: version, Secrets: []json.RawMessage{}}
	for _, s := range secrets {
		b, err := protojson.Marshal(s)
		require.NoError(t, err)
		doc.Secrets = append(doc.Secrets, b)
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	require.NoError(t, err)
	return append(out, '\n')
}

func TestTranslateSecretsGolden(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bundles func(t testing.TB) []*x509bundle.Bundle
	}{
		{"secrets-local-only", func(t testing.TB) []*x509bundle.Bundle {
			return []*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh")}
		}},
		{"secrets-local-and-peer", func(t testing.TB) []*x509bundle.Bundle {
			return []*x509bundle.Bundle{bundleOf(t, "b.mesh", "b.mesh"), bundleOf(t, "a.mesh", "a.mesh")}
		}},
		{"secrets-root-rotation", func(t testing.TB) []*x509bundle.Bundle {
			// The new root is published next to the old one well before it
			// signs anything.
			return []*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh", "a.mesh-next"), bundleOf(t, "b.mesh", "b.mesh")}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			secrets, version, err := TranslateSecrets(tc.bundles(t))
			require.NoError(t, err)
			golden(t, tc.name+".json", renderSecrets(t, secrets, version))

			// Pure: the same bundles in another order give the same
			// Secret and version.
			bundles := tc.bundles(t)
			for i, j := 0, len(bundles)-1; i < j; i, j = i+1, j-1 {
				bundles[i], bundles[j] = bundles[j], bundles[i]
			}
			again, againVersion, err := TranslateSecrets(bundles)
			require.NoError(t, err)
			require.Equal(t, version, againVersion)
			require.Equal(t, renderSecrets(t, secrets, version), renderSecrets(t, again, againVersion))
		})
	}
}

// The golden files are the contract in full; this says in words what
// matters most, and checks it with the proxies' own decoder.
func TestTranslateSecretsContract(t *testing.T) {
	a, b := bundleOf(t, "a.mesh", "a.mesh", "a.mesh-next"), bundleOf(t, "b.mesh", "b.mesh")
	secrets, version, err := TranslateSecrets([]*x509bundle.Bundle{b, a})
	require.NoError(t, err)
	require.NotEmpty(t, version)
	require.Len(t, secrets, 1)
	s := secrets[0]
	require.Equal(t, "ROOTCA", s.GetName())
	require.Nil(t, s.GetTlsCertificate(), "private keys never leave the pod")
	vc := s.GetValidationContext()
	require.Nil(t, vc.GetTrustedCa(), "one CA list would merge trust domains")
	require.Equal(t, "envoy.tls.cert_validator.spiffe", vc.GetCustomValidatorConfig().GetName())
	require.NoError(t, s.ValidateAll())
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	require.NoError(t, vc.GetCustomValidatorConfig().GetTypedConfig().UnmarshalTo(cfg))
	require.NoError(t, cfg.ValidateAll())
	require.Len(t, cfg.GetTrustDomains(), 2)
	require.Equal(t, "a.mesh", cfg.GetTrustDomains()[0].GetName(), "sorted by name")
	require.Equal(t, "b.mesh", cfg.GetTrustDomains()[1].GetName())

	// What the proxies accept: each trust domain with exactly its own
	// roots.
	any, err := anypb.New(s)
	require.NoError(t, err)
	require.Equal(t, resource.SecretType, any.GetTypeUrl())
	got, err := xdsclient.Decode(any)
	require.NoError(t, err)
	require.Equal(t, 2, got.Bundles.Len())
	gotA, ok := got.Bundles.Get(tdA)
	require.True(t, ok)
	require.True(t, gotA.Equal(a))
	gotB, ok := got.Bundles.Get(tdB)
	require.True(t, ok)
	require.True(t, gotB.Equal(b))
	require.False(t, gotA.HasX509Authority(b.X509Authorities()[0]), "bundles are never merged")
}

func TestTranslateSecretsEdges(t *testing.T) {
	t.Run("no bundles, no Secret", func(t *testing.T) {
		secrets, version, err := TranslateSecrets(nil)
		require.NoError(t, err)
		require.Empty(t, secrets)
		require.Empty(t, version)
	})
	t.Run("a bundle without X.509 roots is left out", func(t *testing.T) {
		secrets, version, err := TranslateSecrets([]*x509bundle.Bundle{x509bundle.New(tdB), bundleOf(t, "a.mesh", "a.mesh")})
		require.NoError(t, err)
		only, onlyVersion, err := TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh")})
		require.NoError(t, err)
		require.Equal(t, onlyVersion, version)
		require.Equal(t, renderSecrets(t, only, onlyVersion), renderSecrets(t, secrets, version))

		secrets, version, err = TranslateSecrets([]*x509bundle.Bundle{x509bundle.New(tdB)})
		require.NoError(t, err)
		require.Empty(t, secrets)
		require.Empty(t, version)
	})
	t.Run("two bundles of one trust domain", func(t *testing.T) {
		_, _, err := TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh"), bundleOf(t, "a.mesh", "a.mesh-next")})
		require.EqualError(t, err, `secret "ROOTCA": two bundles for trust domain "a.mesh"`)
	})
	t.Run("the version follows the roots", func(t *testing.T) {
		_, v1, err := TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh")})
		require.NoError(t, err)
		_, v2, err := TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh", "a.mesh-next")})
		require.NoError(t, err)
		_, v3, err := TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh"), bundleOf(t, "b.mesh", "b.mesh")})
		require.NoError(t, err)
		require.NotEqual(t, v1, v2)
		require.NotEqual(t, v1, v3)
		require.NotEqual(t, v2, v3)
	})
}

// The snapshot serves the Secret at its own version, next to the rest.
func TestSnapshotServesSecretsAtTheirVersion(t *testing.T) {
	r, err := TranslateGateway(snapshotOf(t, echoService()), GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)
	r.Secrets, r.SecretsVersion, err = TranslateSecrets([]*x509bundle.Bundle{bundleOf(t, "a.mesh", "a.mesh")})
	require.NoError(t, err)
	snap, err := r.Snapshot()
	require.NoError(t, err)
	require.Equal(t, r.SecretsVersion, snap.GetVersion(resource.SecretType))
	require.Equal(t, r.ListenersVersion, snap.GetVersion(resource.ListenerType))
	require.Equal(t, r.ClustersVersion, snap.GetVersion(resource.ClusterType))
	require.Equal(t, r.EndpointsVersion, snap.GetVersion(resource.EndpointType))
	require.NotEqual(t, r.Version, r.SecretsVersion)
	require.Equal(t, r.TypeVersions()[resource.SecretType], r.SecretsVersion)
	require.Contains(t, snap.GetResources(resource.SecretType), "ROOTCA")
	require.Equal(t, []string{"ROOTCA"}, r.Names()[resource.SecretType])
}
