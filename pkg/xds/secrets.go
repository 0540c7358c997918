package xds

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
)

// Names of the SDS contract (docs/gateway-xds.md, "Secrets (SDS)").
const (
	// RootCASecretName is the only Secret the federator serves: the
	// validation context, under Istio's name for it. There is never a
	// tls_certificate Secret: a proxy makes its own key and gets its SVID
	// from the CA, so private keys never leave the pod.
	RootCASecretName = "ROOTCA"
	// SPIFFEValidatorName is Envoy's SPIFFE certificate validator: one
	// bundle per trust domain, a peer validated against the bundle of the
	// trust domain in its SPIFFE ID.
	SPIFFEValidatorName = "envoy.tls.cert_validator.spiffe"
)

// TrustBundles is what the Server needs of the trust store: the bundle
// that verifies the proxies' own SVIDs, every trust domain to publish
// over SDS, and a signal when any of them changes. *trust.Store is one.
type TrustBundles interface {
	x509bundle.Source
	// TrustDomains lists the trust domains that have a bundle: the local
	// one and every federated peer's.
	TrustDomains() []spiffeid.TrustDomain
	// Subscribe returns a channel signalled (coalesced) after every
	// change, and the function that ends the subscription.
	Subscribe() (<-chan struct{}, func())
}

// TranslateSecrets computes the Secrets every proxy is served from the
// trust bundles: exactly one, ROOTCA, a validation context holding only
// Envoy's SPIFFE certificate validator with one trust domain per bundle,
// each carrying that domain's own X.509 roots as inline PEM, sorted by
// name. Bundles of different trust domains are never merged. A bundle
// without X.509 roots is left out, since it would trust nothing; with no
// roots at all there is no Secret, and the version is empty.
//
// It is a pure function: the same bundles, in any order, give the same
// Secret and version (a hash of the Secret's deterministic encoding). Two
// bundles of one trust domain, or a Secret that fails go-control-plane's
// Validate(), are an error naming it.
func TranslateSecrets(bundles []*x509bundle.Bundle) ([]*tlsv3.Secret, string, error) {
	sorted := slices.Clone(bundles)
	slices.SortFunc(sorted, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	for i, b := range sorted {
		td := b.TrustDomain()
		if td.IsZero() {
			return nil, "", fmt.Errorf("secret %q: a bundle has no trust domain", RootCASecretName)
		}
		if i > 0 && sorted[i-1].TrustDomain() == td {
			return nil, "", fmt.Errorf("secret %q: two bundles for trust domain %q", RootCASecretName, td.Name())
		}
		roots := b.X509Authorities()
		if len(roots) == 0 {
			continue
		}
		cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
			Name: td.Name(),
			TrustBundle: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{
				InlineBytes: pemutil.EncodeCertificates(roots...),
			}},
		})
	}
	if len(cfg.TrustDomains) == 0 {
		return nil, "", nil
	}
	validator, err := typedConfig(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("secret %q: %w", RootCASecretName, err)
	}
	secret := &tlsv3.Secret{
		Name: RootCASecretName,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: SPIFFEValidatorName, TypedConfig: validator},
		}},
	}
	if err := secret.Validate(); err != nil {
		return nil, "", fmt.Errorf("secret %q is invalid: %w", RootCASecretName, err)
	}
	msg, err := proto.MarshalOptions{Deterministic: true}.Marshal(secret)
	if err != nil {
		return nil, "", fmt.Errorf("secret %q: encode: %w", RootCASecretName, err)
	}
	sum := sha256.Sum256(msg)
	return []*tlsv3.Secret{secret}, hex.EncodeToString(sum[:12]), nil
}

// currentBundles reads every trust domain's X.509 bundle from the trust
// store. A trust domain forgotten between the listing and the read is
// left out: its removal has signalled a change, which translates again.
func currentBundles(trust TrustBundles) []*x509bundle.Bundle {
	tds := trust.TrustDomains()
	out := make([]*x509bundle.Bundle, 0, len(tds))
	for _, td := range tds {
		if b, err := trust.GetX509BundleForTrustDomain(td); err == nil {
			out = append(out, b)
		}
	}
	return out
}
