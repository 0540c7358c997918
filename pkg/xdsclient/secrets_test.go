package xdsclient

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
)

// The ROOTCA Secret as the federator emits it (docs/gateway-xds.md,
// "Secrets (SDS)").

// testRoot is a self-signed CA certificate for trust domain td.
func testRoot(tb testing.TB, td string) *x509.Certificate {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(tb, err)
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	require.NoError(tb, err)
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{td}, CommonName: "root"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: td}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(tb, err)
	c, err := x509.ParseCertificate(der)
	require.NoError(tb, err)
	return c
}

// trustDomainEntry is one entry of the SPIFFE validator's list.
func trustDomainEntry(name string, pemBytes []byte) *tlsv3.SPIFFECertValidatorConfig_TrustDomain {
	return &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
		Name:        name,
		TrustBundle: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: pemBytes}},
	}
}

// spiffeSecret is a ROOTCA Secret whose validator lists entries.
func spiffeSecret(tb testing.TB, entries ...*tlsv3.SPIFFECertValidatorConfig_TrustDomain) *tlsv3.Secret {
	return &tlsv3.Secret{
		Name: RootCASecretName,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			CustomValidatorConfig: &corev3.TypedExtensionConfig{
				Name:        "envoy.tls.cert_validator.spiffe",
				TypedConfig: mustAny(tb, &tlsv3.SPIFFECertValidatorConfig{TrustDomains: entries}),
			},
		}},
	}
}

// rootCA is the federator's ROOTCA for the given roots by trust domain.
func rootCA(tb testing.TB, roots map[string][]*x509.Certificate) *tlsv3.Secret {
	var entries []*tlsv3.SPIFFECertValidatorConfig_TrustDomain
	for _, td := range sortedDomains(roots) {
		entries = append(entries, trustDomainEntry(td, pemutil.EncodeCertificates(roots[td]...)))
	}
	return spiffeSecret(tb, entries...)
}

func sortedDomains(m map[string][]*x509.Certificate) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
	return keys
}

// validatorConfig unpacks the secret's SPIFFE validator config, for a
// case to change and pack again with setValidatorConfig.
func validatorConfig(tb testing.TB, s *tlsv3.Secret) *tlsv3.SPIFFECertValidatorConfig {
	cfg := new(tlsv3.SPIFFECertValidatorConfig)
	require.NoError(tb, s.GetValidationContext().GetCustomValidatorConfig().GetTypedConfig().UnmarshalTo(cfg))
	return cfg
}

func setValidatorConfig(tb testing.TB, s *tlsv3.Secret, cfg *tlsv3.SPIFFECertValidatorConfig) {
	s.GetValidationContext().GetCustomValidatorConfig().TypedConfig = mustAny(tb, cfg)
}

func bundleRoots(t testing.TB, s *x509bundle.Set, td string) []*x509.Certificate {
	t.Helper()
	b, ok := s.Get(spiffeid.RequireTrustDomainFromString(td))
	require.True(t, ok, "no bundle for %s", td)
	return b.X509Authorities()
}

func TestDecodeSecretAccepted(t *testing.T) {
	alpha1, alpha2, beta := testRoot(t, "alpha.mesh"), testRoot(t, "alpha.mesh"), testRoot(t, "beta.mesh")
	// During a root rotation a domain carries its old and new roots; the
	// entries' order does not matter.
	secret := spiffeSecret(t,
		trustDomainEntry("beta.mesh", pemutil.EncodeCertificates(beta)),
		trustDomainEntry("alpha.mesh", append([]byte("\n"), pemutil.EncodeCertificates(alpha1, alpha2)...)),
	)
	cfg, err := Decode(append(buildGateway(t, "10.0.0.5", echo).anys(t), mustAny(t, secret))...)
	require.NoError(t, err)
	require.Equal(t, 2, cfg.Bundles.Len())
	var tds []string
	for _, b := range cfg.Bundles.Bundles() {
		tds = append(tds, b.TrustDomain().Name())
	}
	require.Equal(t, []string{"alpha.mesh", "beta.mesh"}, tds)
	require.Equal(t, []*x509.Certificate{alpha1, alpha2}, bundleRoots(t, cfg.Bundles, "alpha.mesh"))
	require.Equal(t, []*x509.Certificate{beta}, bundleRoots(t, cfg.Bundles, "beta.mesh"), "bundles are never merged")
	require.Contains(t, cfg.Clusters, echo.cluster(), "the routing part is decoded as before")

	// No Secret: no bundles.
	cfg, err = Decode(buildGateway(t, "10.0.0.5", echo).anys(t)...)
	require.NoError(t, err)
	require.Nil(t, cfg.Bundles)
}

func TestDecodeRefusesBadSecrets(t *testing.T) {
	alpha, beta := testRoot(t, "alpha.mesh"), testRoot(t, "beta.mesh")
	alphaPEM := pemutil.EncodeCertificates(alpha)
	const (
		rootca    = `secret "ROOTCA": `
		validator = rootca + `validation_context.custom_validator_config.`
		entry0    = validator + `typed_config.trust_domains[0].`
	)
	good := func(t *testing.T) *tlsv3.Secret {
		return rootCA(t, map[string][]*x509.Certificate{"alpha.mesh": {alpha}, "beta.mesh": {beta}})
	}
	withEntries := func(t *testing.T, entries ...*tlsv3.SPIFFECertValidatorConfig_TrustDomain) *tlsv3.Secret {
		return spiffeSecret(t, entries...)
	}
	keyDER := func(t *testing.T) []byte {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		der, err := x509.MarshalECPrivateKey(key)
		require.NoError(t, err)
		return der
	}
	for _, tc := range []struct {
		name   string
		secret func(t *testing.T) *tlsv3.Secret
		want   string
	}{
		{"a workload certificate and key", func(t *testing.T) *tlsv3.Secret {
			return &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: alphaPEM}},
				PrivateKey: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{
					InlineBytes: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER(t)})}},
			}}}
		}, `secret "default": name: "default" is not served: the only Secret is ROOTCA (the trust bundles); tls_certificate: not supported: private keys never leave the pod`},
		{"a tls_certificate named ROOTCA", func(t *testing.T) *tlsv3.Secret {
			return &tlsv3.Secret{Name: RootCASecretName, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{}}}
		}, rootca + `tls_certificate: not supported: private keys never leave the pod`},
		{"a plain trusted_ca", func(t *testing.T) *tlsv3.Secret {
			return &tlsv3.Secret{Name: RootCASecretName, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: alphaPEM}},
			}}}
		}, rootca + `validation_context.trusted_ca: not supported: one CA list for every trust domain would merge their bundles; trust comes per trust domain in custom_validator_config (envoy.tls.cert_validator.spiffe); validation_context.custom_validator_config: is missing`},
		{"trusted_ca next to the SPIFFE validator", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			s.GetValidationContext().TrustedCa = &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: alphaPEM}}
			return s
		}, rootca + `validation_context.trusted_ca: not supported: one CA list for every trust domain would merge their bundles`},
		{"subject alt name matching", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			s.GetValidationContext().MatchTypedSubjectAltNames = []*tlsv3.SubjectAltNameMatcher{{
				SanType: tlsv3.SubjectAltNameMatcher_URI,
				Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "spiffe://alpha.mesh/ns/a/sa/b"}},
			}}
			return s
		}, rootca + `validation_context.match_typed_subject_alt_names: not supported`},
		{"an unknown validator", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			s.GetValidationContext().GetCustomValidatorConfig().Name = "envoy.tls.cert_validator.platform_provided"
			return s
		}, validator + `name: unsupported validator "envoy.tls.cert_validator.platform_provided" (only envoy.tls.cert_validator.spiffe)`},
		{"the validator with another type's config", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			s.GetValidationContext().GetCustomValidatorConfig().TypedConfig = mustAny(t, &tlsv3.CertificateValidationContext{})
			return s
		}, validator + `typed_config: unsupported type "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext"`},
		{"the validator without config", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			s.GetValidationContext().GetCustomValidatorConfig().TypedConfig = nil
			return s
		}, validator + `typed_config: is missing`},
		{"no trust domains", func(t *testing.T) *tlsv3.Secret { return withEntries(t) },
			validator + `typed_config.trust_domains: is empty`},
		{"a SPIFFE bundle map", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			cfg := validatorConfig(t, s)
			cfg.TrustBundles = &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/etc/bundles.json"}}
			setValidatorConfig(t, s, cfg)
			return s
		}, validator + `typed_config.trust_bundles: not supported`},
		{"garbage in place of PEM", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("alpha.mesh", []byte("not a certificate")))
		}, entry0 + `trust_bundle.inline_bytes: malformed PEM: byte 0: not a PEM block`},
		{"a truncated PEM", func(t *testing.T) *tlsv3.Secret {
			two := pemutil.EncodeCertificates(alpha, beta)
			return withEntries(t, trustDomainEntry("alpha.mesh", two[:len(two)-40]))
		}, entry0 + `trust_bundle.inline_bytes: malformed PEM: byte ` + itoa(len(alphaPEM)) + `: PEM block is not complete`},
		{"text after the roots", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("alpha.mesh", append(pemutil.EncodeCertificates(alpha), "# end\n"...)))
		}, entry0 + `trust_bundle.inline_bytes: malformed PEM: byte ` + itoa(len(alphaPEM)) + `: not a PEM block`},
		{"a private key among the roots", func(t *testing.T) *tlsv3.Secret {
			b := append(pemutil.EncodeCertificates(alpha), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER(t)})...)
			return withEntries(t, trustDomainEntry("alpha.mesh", b))
		}, entry0 + `trust_bundle.inline_bytes: malformed PEM: block 1 is a "EC PRIVATE KEY", want CERTIFICATE`},
		{"a CERTIFICATE block that is not one", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("alpha.mesh", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x03, 0x02, 0x01, 0x01}})))
		}, entry0 + `trust_bundle.inline_bytes: malformed PEM: certificate 0: x509: `},
		{"no roots", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("alpha.mesh", nil))
		}, entry0 + `trust_bundle.inline_bytes: is empty`},
		{"roots from a file", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{Name: "alpha.mesh",
				TrustBundle: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/etc/alpha.pem"}}})
		}, entry0 + `trust_bundle.filename: not supported`},
		{"no trust bundle", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{Name: "alpha.mesh"})
		}, entry0 + `trust_bundle: is missing`},
		{"not a trust domain", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("Alpha Mesh", alphaPEM))
		}, entry0 + `name: "Alpha Mesh" is not a valid SPIFFE trust domain: trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`},
		{"an empty trust domain", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("", alphaPEM))
		}, entry0 + `name: "" is not a valid SPIFFE trust domain`},
		{"a SPIFFE ID in place of a trust domain", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("spiffe://alpha.mesh", alphaPEM))
		}, entry0 + `name: "spiffe://alpha.mesh" is not a trust domain name (want "alpha.mesh", without the spiffe:// scheme)`},
		{"a workload trust domain condition", func(t *testing.T) *tlsv3.Secret {
			e := trustDomainEntry("alpha.mesh", alphaPEM)
			e.WorkloadTrustDomain = "beta.mesh"
			return withEntries(t, e)
		}, entry0 + `workload_trust_domain: not supported`},
		{"one trust domain twice", func(t *testing.T) *tlsv3.Secret {
			return withEntries(t, trustDomainEntry("alpha.mesh", alphaPEM), trustDomainEntry("beta.mesh", pemutil.EncodeCertificates(beta)),
				trustDomainEntry("alpha.mesh", pemutil.EncodeCertificates(testRoot(t, "alpha.mesh"))))
		}, validator + `typed_config.trust_domains[2].name: "alpha.mesh" is also trust_domains[0]: one trust domain, one bundle`},
		{"a secret of another name", func(t *testing.T) *tlsv3.Secret {
			s := good(t)
			s.Name = "file-root:/etc/certs/root-cert.pem"
			return s
		}, `secret "file-root:/etc/certs/root-cert.pem": name: "file-root:/etc/certs/root-cert.pem" is not served: the only Secret is ROOTCA`},
		{"a generic secret", func(t *testing.T) *tlsv3.Secret {
			return &tlsv3.Secret{Name: RootCASecretName, Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{}}}
		}, rootca + `generic_secret: not supported`},
		{"an empty secret", func(t *testing.T) *tlsv3.Secret { return &tlsv3.Secret{Name: RootCASecretName} },
			rootca + `validation_context: is missing`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Decode(mustAny(t, tc.secret(t)))
			require.Nil(t, cfg)
			require.ErrorContains(t, err, tc.want)
			require.NotErrorIs(t, err, ErrIncomplete)
		})
	}

	t.Run("two ROOTCAs in one response", func(t *testing.T) {
		_, err := Decode(mustAny(t, good(t)), mustAny(t, good(t)))
		require.ErrorContains(t, err, `secret "ROOTCA": name: duplicate secret name in the response`)
	})
	t.Run("garbage", func(t *testing.T) {
		_, err := Decode(&anypb.Any{TypeUrl: TypeSecret, Value: []byte{0xff}})
		require.ErrorContains(t, err, `secret #0: cannot decode: `)
	})
}

// The client's bundle source answers from the current config only.
func TestBundlesSourceNamesWhatIsMissing(t *testing.T) {
	c, err := New(plaintextConfig(t, "127.0.0.1:1"))
	require.NoError(t, err)
	alpha := spiffeid.RequireTrustDomainFromString("alpha.mesh")
	_, err = c.Bundles().GetX509BundleForTrustDomain(alpha)
	require.EqualError(t, err, `xdsclient: no trust bundle for trust domain "alpha.mesh": no ROOTCA Secret accepted yet`)

	root := testRoot(t, "alpha.mesh")
	cfg, err := Decode(mustAny(t, rootCA(t, map[string][]*x509.Certificate{"alpha.mesh": {root}, "beta.mesh": {testRoot(t, "beta.mesh")}})))
	require.NoError(t, err)
	c.publish(cfg)
	b, err := c.Bundles().GetX509BundleForTrustDomain(alpha)
	require.NoError(t, err)
	require.Equal(t, []*x509.Certificate{root}, b.X509Authorities())
	// A copy: changing it changes nothing for the next handshake.
	b.RemoveX509Authority(root)
	again, err := c.Bundles().GetX509BundleForTrustDomain(alpha)
	require.NoError(t, err)
	require.True(t, again.HasX509Authority(root))

	_, err = c.Bundles().GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("gamma.mesh"))
	require.EqualError(t, err, `xdsclient: no trust bundle for trust domain "gamma.mesh" (the federator's ROOTCA has alpha.mesh,beta.mesh)`)
}
