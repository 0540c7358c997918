package identity

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	cryptorand "crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/metadata"
)

// maxTokenBytes bounds what is read from the token file; a projected
// ServiceAccount token is about 1 KiB.
const maxTokenBytes = 64 << 10

func makeCSR(key *ecdsa.PrivateKey, id spiffeid.ID) (string, error) {
	der, err := x509.CreateCertificateRequest(cryptorand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return "", fmt.Errorf("create CSR: %w", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), nil
}

// token returns the current bearer token. Errors never contain it.
func (s *Source) token(ctx context.Context) (string, error) {
	var tok string
	if s.cfg.TokenSource != nil {
		t, err := s.cfg.TokenSource(ctx)
		if err != nil {
			return "", fmt.Errorf("token source: %w", err)
		}
		tok = t
	} else {
		f, err := os.Open(s.cfg.TokenFile)
		if err != nil {
			return "", fmt.Errorf("token: %w", err)
		}
		b, err := io.ReadAll(io.LimitReader(f, maxTokenBytes+1))
		_ = f.Close()
		if err != nil {
			return "", fmt.Errorf("token: read %s: %w", s.cfg.TokenFile, err)
		}
		if len(b) > maxTokenBytes {
			return "", fmt.Errorf("token: %s is larger than %d bytes", s.cfg.TokenFile, maxTokenBytes)
		}
		tok = string(b)
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", errors.New("token: empty")
	}
	return tok, nil
}

// withBearer attaches the token the way istio-agent does.
func withBearer(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// splitChain reads Istio's cert_chain (PEM certificates, leaf first; one
// per element, though older CAs concatenate several in one element) and
// splits it into the leaf with its intermediates and the roots, which are
// the self-signed CA certificates.
func splitChain(elems []string) (chain, roots []*x509.Certificate, err error) {
	var all []*x509.Certificate
	for i, e := range elems {
		rest := []byte(e)
		n := 0
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				return nil, nil, fmt.Errorf("cert_chain[%d]: PEM block %q, want CERTIFICATE", i, block.Type)
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, nil, fmt.Errorf("cert_chain[%d]: %w", i, err)
			}
			all = append(all, c)
			n++
		}
		if n == 0 || len(bytes.TrimSpace(rest)) != 0 {
			return nil, nil, fmt.Errorf("cert_chain[%d] is not PEM certificates", i)
		}
	}
	if len(all) == 0 {
		return nil, nil, errors.New("empty cert_chain")
	}
	chain = all[:1]
	for _, c := range all[1:] {
		if isRoot(c) {
			roots = append(roots, c)
		} else {
			chain = append(chain, c)
		}
	}
	if len(roots) == 0 {
		return nil, nil, errors.New("cert_chain carries no root certificate")
	}
	return chain, roots, nil
}

func isRoot(c *x509.Certificate) bool {
	return c.IsCA && bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

// newSVID lets go-spiffe check the chain is an SVID (one SPIFFE ID URI SAN,
// leaf key usage, CA intermediates) and that key is the leaf's. The key is
// only re-encoded in memory for that.
func newSVID(chain []*x509.Certificate, key *ecdsa.PrivateKey) (*x509svid.SVID, error) {
	var der []byte
	for _, c := range chain {
		der = append(der, c.Raw...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	svid, err := x509svid.ParseRaw(der, keyDER)
	if err != nil {
		return nil, err
	}
	return svid, nil
}
