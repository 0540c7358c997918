package caserver

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

const (
	// MaxCSRBytes bounds the PEM CSR a caller may send. A P-384 or RSA
	// 4096 CSR is well under 4 KiB.
	MaxCSRBytes = 64 << 10
	// maxRequestBytes bounds a whole request message: the CSR plus the
	// small metadata Struct istio-agent may attach.
	maxRequestBytes = MaxCSRBytes + 16<<10

	minRSABits = 2048
	// maxRSABits keeps signature checks cheap: a huge RSA key costs the
	// server, not the caller.
	maxRSABits = 8192
)

// parseCSR decodes one PEM "CERTIFICATE REQUEST" and checks its key type and
// signature. Its errors describe the problem for the caller and never
// include the input.
func parseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	if len(csrPEM) == 0 {
		return nil, fmt.Errorf("CSR is empty")
	}
	if len(csrPEM) > MaxCSRBytes {
		return nil, fmt.Errorf("CSR is %d bytes, the limit is %d", len(csrPEM), MaxCSRBytes)
	}
	block, rest := pem.Decode(csrPEM)
	if block == nil {
		return nil, fmt.Errorf("CSR is not PEM")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("CSR PEM block is %q, want \"CERTIFICATE REQUEST\"", block.Type)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("CSR has data after its PEM block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CSR does not parse: %w", err)
	}
	// Key before signature: a clear "unsupported key" beats an obscure
	// signature error, and refuses huge RSA keys before doing math with them.
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("CSR signature is invalid: %w", err)
	}
	return csr, nil
}

func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return fmt.Errorf("unsupported key: ECDSA %s, want P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		switch bits := k.N.BitLen(); {
		case bits < minRSABits:
			return fmt.Errorf("unsupported key: RSA %d bits, want at least %d", bits, minRSABits)
		case bits > maxRSABits:
			return fmt.Errorf("unsupported key: RSA %d bits, want at most %d", bits, maxRSABits)
		}
		return nil
	case ed25519.PublicKey:
		return fmt.Errorf("unsupported key: Ed25519, want ECDSA P-256/P-384 or RSA")
	case nil:
		return fmt.Errorf("unsupported key: unknown algorithm, want ECDSA P-256/P-384 or RSA")
	default:
		return fmt.Errorf("unsupported key: %T, want ECDSA P-256/P-384 or RSA", pub)
	}
}

// errIdentity is a CSR asking for an identity the caller does not have.
type errIdentity struct{ msg string }

func (e errIdentity) Error() string { return e.msg }

// checkCSRIdentity allows a CSR without URI SAN (the identity comes from
// the token anyway) or with exactly the caller's SPIFFE ID. Other SANs
// (DNS, IP, e-mail) are not the CA's to honour: the signer only takes the
// public key from a CSR.
func checkCSRIdentity(csr *x509.CertificateRequest, id spiffeid.ID) error {
	switch len(csr.URIs) {
	case 0:
		return nil
	case 1:
	default:
		return fmt.Errorf("CSR has %d URI SANs, an SVID has exactly one", len(csr.URIs))
	}
	asked := csr.URIs[0].String()
	if asked != id.String() {
		if len(asked) > 256 {
			asked = asked[:256] + "..."
		}
		return errIdentity{fmt.Sprintf("CSR asks for %q but the caller is %q", asked, id.String())}
	}
	return nil
}
