package caserver

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
)

// MaxCSRBytes bounds the PEM CSR a caller may send. A P-384 or RSA 4096
// CSR is well under 4 KiB.
const MaxCSRBytes = 64 << 10

// maxRequestBytes bounds a whole request message: the CSR plus the small
// metadata Struct istio-agent may attach.
const maxRequestBytes = MaxCSRBytes + 16<<10

// MaxTokenBytes bounds the bearer token a caller may send; a projected
// ServiceAccount token is one to two KiB. A longer one is refused without
// a review.
const MaxTokenBytes = 16 << 10

// parseCSR decodes one PEM "CERTIFICATE REQUEST". It checks only the
// encoding; ca.CheckCSRForm checks the key and the signature,
// ca.CheckCSRIdentity the identity.
// Its errors describe the problem for the caller and never include the
// input.
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
	return csr, nil
}
