package xdsclient

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The SDS subset (docs/gateway-xds.md, "Secrets (SDS)").
const (
	// RootCASecretName is the only Secret the client asks for and
	// accepts: the trust bundles, as a validation context (Istio's name
	// for it).
	RootCASecretName = "ROOTCA"
	// spiffeValidatorName is Envoy's SPIFFE certificate validator, whose
	// typed_config lists one bundle per trust domain.
	spiffeValidatorName = "envoy.tls.cert_validator.spiffe"
	spiffeValidatorType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)

// decodeSecret accepts exactly the ROOTCA Secret: a validation context
// holding only the SPIFFE validator, one entry per trust domain with its
// own inline PEM roots. The result is never modified once returned.
func decodeSecret(m *tlsv3.Secret) (*x509bundle.Set, error) {
	errs := []error{secretFields.check(m)}
	if name := m.GetName(); name != RootCASecretName {
		errs = append(errs, fieldErr("name", fmt.Sprintf("%q is not served: the only Secret is %s (the trust bundles)", name, RootCASecretName)))
	}
	var set *x509bundle.Set
	switch {
	case m.GetTlsCertificate() != nil:
		errs = append(errs, fieldErr("tls_certificate",
			"not supported: private keys never leave the pod (the proxy makes its own key and gets its SVID from the CA)"))
	case m.GetValidationContext() == nil:
		if m.GetType() == nil {
			errs = append(errs, fieldErr("validation_context", "is missing"))
		}
	default:
		var err error
		set, err = decodeValidationContext(m.GetValidationContext())
		errs = append(errs, within("validation_context", err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return set, pgv(m)
}

func decodeValidationContext(vc *tlsv3.CertificateValidationContext) (*x509bundle.Set, error) {
	errs := []error{validationContextFields.check(vc)}
	if vc.GetTrustedCa() != nil {
		errs = append(errs, fieldErr("trusted_ca",
			"not supported: one CA list for every trust domain would merge their bundles; trust comes per trust domain in custom_validator_config ("+spiffeValidatorName+")"))
	}
	var set *x509bundle.Set
	if cv := vc.GetCustomValidatorConfig(); cv == nil {
		errs = append(errs, fieldErr("custom_validator_config", "is missing (want "+spiffeValidatorName+")"))
	} else {
		var err error
		set, err = decodeSPIFFEValidator(cv)
		errs = append(errs, within("custom_validator_config", err))
	}
	return set, errors.Join(errs...)
}

func decodeSPIFFEValidator(cv *corev3.TypedExtensionConfig) (*x509bundle.Set, error) {
	if err := extensionFields.check(cv); err != nil {
		return nil, err
	}
	if cv.GetName() != spiffeValidatorName {
		return nil, fieldErr("name", fmt.Sprintf("unsupported validator %q (only %s)", cv.GetName(), spiffeValidatorName))
	}
	if cv.GetTypedConfig() == nil {
		return nil, fieldErr("typed_config", "is missing")
	}
	cfg := new(tlsv3.SPIFFECertValidatorConfig)
	if err := unpackTyped(cv.GetTypedConfig(), spiffeValidatorType, cfg); err != nil {
		return nil, err
	}
	errs := []error{within("typed_config", spiffeValidatorFields.check(cfg))}
	if len(cfg.GetTrustDomains()) == 0 {
		errs = append(errs, fieldErr("typed_config.trust_domains", "is empty"))
	}
	set := x509bundle.NewSet()
	seen := make(map[spiffeid.TrustDomain]int, len(cfg.GetTrustDomains()))
	for i, d := range cfg.GetTrustDomains() {
		b, err := decodeTrustDomain(d)
		if err != nil {
			errs = append(errs, withinIndex("typed_config.trust_domains", i, err))
			continue
		}
		if j, dup := seen[b.TrustDomain()]; dup {
			errs = append(errs, fieldErr("typed_config.trust_domains["+itoa(i)+"].name",
				fmt.Sprintf("%q is also trust_domains[%d]: one trust domain, one bundle", d.GetName(), j)))
			continue
		}
		seen[b.TrustDomain()] = i
		set.Add(b)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return set, nil
}

func decodeTrustDomain(d *tlsv3.SPIFFECertValidatorConfig_TrustDomain) (*x509bundle.Bundle, error) {
	errs := []error{trustDomainFields.check(d)}
	name := d.GetName()
	td, err := spiffeid.TrustDomainFromString(name)
	switch {
	case err != nil:
		errs = append(errs, fieldErr("name", fmt.Sprintf("%q is not a valid SPIFFE trust domain: %v", name, err)))
	case td.Name() != name:
		errs = append(errs, fieldErr("name", fmt.Sprintf("%q is not a trust domain name (want %q, without the spiffe:// scheme)", name, td.Name())))
	}
	var roots []*x509.Certificate
	ds := d.GetTrustBundle()
	var dsErr error
	if ds != nil {
		dsErr = dataSourceFields.check(ds)
	}
	switch {
	case ds == nil:
		errs = append(errs, fieldErr("trust_bundle", "is missing"))
	case dsErr != nil:
		errs = append(errs, within("trust_bundle", dsErr))
	case len(ds.GetInlineBytes()) == 0:
		errs = append(errs, fieldErr("trust_bundle.inline_bytes", "is empty"))
	default:
		roots, err = parseRoots(ds.GetInlineBytes())
		if err != nil {
			errs = append(errs, fieldErr("trust_bundle.inline_bytes", "malformed PEM: "+err.Error()))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return x509bundle.FromX509Authorities(td, roots), nil
}

// parseRoots reads PEM CERTIFICATE blocks and nothing else: text before,
// between or after the blocks, another block type, or a block that is not
// a certificate is an error, so a truncated or mangled bundle is refused
// rather than half read.
func parseRoots(data []byte) ([]*x509.Certificate, error) {
	var roots []*x509.Certificate
	rest := data
	for {
		trimmed := bytes.TrimLeft(rest, " \t\r\n")
		if len(trimmed) == 0 {
			break
		}
		at := len(data) - len(trimmed)
		if !bytes.HasPrefix(trimmed, []byte("-----BEGIN ")) {
			return nil, fmt.Errorf("byte %d: not a PEM block", at)
		}
		var b *pem.Block
		b, rest = pem.Decode(trimmed)
		if b == nil {
			return nil, fmt.Errorf("byte %d: PEM block is not complete", at)
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("block %d is a %q, want CERTIFICATE", len(roots), b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(roots), err)
		}
		roots = append(roots, c)
	}
	if len(roots) == 0 {
		return nil, errors.New("no certificate")
	}
	return roots, nil
}

// sameBundles reports whether two bundle sets hold the same roots for the
// same trust domains.
func sameBundles(a, b *x509bundle.Set) bool {
	if a == nil || b == nil {
		return a == b
	}
	if a.Len() != b.Len() {
		return false
	}
	for _, ba := range a.Bundles() {
		bb, ok := b.Get(ba.TrustDomain())
		if !ok || !ba.Equal(bb) {
			return false
		}
	}
	return true
}

// trustDomainNames lists the set's trust domains, sorted (for logs).
func trustDomainNames(s *x509bundle.Set) string {
	if s == nil {
		return ""
	}
	names := make([]string, 0, s.Len())
	for _, b := range s.Bundles() {
		names = append(names, b.TrustDomain().Name())
	}
	return strings.Join(names, ",")
}

// bundleSource is Client.Bundles.
type bundleSource struct{ c *Client }

var _ x509bundle.Source = bundleSource{}

// GetX509BundleForTrustDomain returns a copy of td's bundle in the
// current config, read at every call.
func (s bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	cfg := s.c.Current()
	if cfg == nil || cfg.Bundles == nil {
		return nil, fmt.Errorf("xdsclient: no trust bundle for trust domain %q: no %s Secret accepted yet", td.Name(), RootCASecretName)
	}
	b, ok := cfg.Bundles.Get(td)
	if !ok {
		return nil, fmt.Errorf("xdsclient: no trust bundle for trust domain %q (the federator's %s has %s)",
			td.Name(), RootCASecretName, trustDomainNames(cfg.Bundles))
	}
	return b.Clone(), nil
}

// followSDS validates the federator with the bundle it published for its
// trust domain, and with the configured bundle for a trust domain the
// accepted ROOTCA does not name (before the first one arrives).
type followSDS struct{ sds, fallback x509bundle.Source }

func (f followSDS) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if b, err := f.sds.GetX509BundleForTrustDomain(td); err == nil {
		return b, nil
	}
	return f.fallback.GetX509BundleForTrustDomain(td)
}
