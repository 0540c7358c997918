// Package pemutil reads PEM certificate lists strictly: every block must be
// a certificate, and every block must decode, so a truncated or mixed-up
// file is noticed rather than half read. (go-spiffe's x509bundle.Parse
// skips other blocks, and encoding/pem skips a block it cannot decode.)
package pemutil

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

var beginMarker = []byte("-----BEGIN ")

// ParseCertificates reads every CERTIFICATE block of data, in order. Text
// before a block is allowed (RFC 7468's explanatory text); anything else is
// an error: a block of another type, a block that begins but does not
// decode (a truncated file: one certificate and half of the next), data
// after the last block other than white space, or no block at all.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		start := bytes.Index(data, beginMarker)
		if start < 0 {
			if len(out) > 0 && len(bytes.TrimSpace(data)) > 0 {
				return nil, fmt.Errorf("%d bytes after the last PEM block (certificate %d) are not a PEM block: truncated or corrupt input", len(data), len(out))
			}
			break
		}
		data = data[start:]
		b, rest := pem.Decode(data)
		// pem.Decode skips a block it cannot decode and returns the next
		// one: a block holds a single BEGIN line, its own.
		if b == nil || bytes.Contains(data[len(beginMarker):len(data)-len(rest)], beginMarker) {
			return nil, fmt.Errorf("PEM block %d is truncated or corrupt: it begins but does not decode", len(out)+1)
		}
		data = rest
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q, want CERTIFICATE", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return out, nil
}

// EncodeCertificates writes certs as PEM CERTIFICATE blocks.
func EncodeCertificates(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
