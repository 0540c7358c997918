package caserver

import (
	"github.com/isthmus-mesh/isthmus/pkg/ca"

	"bytes"
	"crypto"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// FuzzCreateCertificate sends arbitrary bytes as the CSR of an
// authenticated caller. The handler never panics, answers a bad CSR with
// InvalidArgument or PermissionDenied, and issues a certificate only for a
// well-formed, correctly signed CSR, with the CSR's key and the caller's ID.
func FuzzCreateCertificate(f *testing.F) {
	signer := newTestSigner(f, testTD)
	srv := New(signer, fakeAuth{}, Options{})

	good := makeCSR(f, ecKey(f, elliptic.P256()), webID.String())
	f.Add([]byte(good), int64(0))
	f.Add([]byte(makeCSR(f, ecKey(f, elliptic.P384()))), int64(60))
	f.Add([]byte(makeCSR(f, ecKey(f, elliptic.P256()), "spiffe://cluster-a.mesh/ns/demo/sa/db")), int64(0))
	f.Add([]byte(makeCSR(f, ecKey(f, elliptic.P256()), webID.String(), webID.String())), int64(0))
	f.Add([]byte(strings.Replace(good, "CERTIFICATE REQUEST", "CERTIFICATE", 2)), int64(0))
	f.Add([]byte(good[:len(good)/2]), int64(0))
	f.Add([]byte(encodePEM(signer.rootCert)), int64(0))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMA==\n-----END CERTIFICATE REQUEST-----\n"), int64(0))
	f.Add([]byte{}, int64(-1))
	f.Add([]byte("\x00\xff"), int64(1<<62))

	ctx := metadata.NewIncomingContext(f.Context(), metadata.Pairs("authorization", "Bearer tok:demo:web"))
	f.Fuzz(func(t *testing.T, csr []byte, validity int64) {
		resp, err := srv.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: validity})
		if err != nil {
			if resp != nil {
				t.Fatalf("response with an error: %v", err)
			}
			switch code := status.Code(err); code {
			case codes.InvalidArgument, codes.PermissionDenied:
			default:
				t.Fatalf("code %v for a bad CSR: %v", code, err)
			}
			return
		}

		// Issued: the input must have been a valid CSR for the caller.
		if validity < 0 {
			t.Fatalf("issued with validity %d", validity)
		}
		block, rest := pem.Decode(csr)
		if block == nil || len(bytes.TrimSpace(rest)) != 0 {
			t.Fatalf("issued for input that is not one PEM block")
		}
		req, perr := x509.ParseCertificateRequest(block.Bytes)
		if perr != nil || req.CheckSignature() != nil {
			t.Fatalf("issued for a CSR that does not parse or verify: %v", perr)
		}
		if len(req.URIs) > 1 || (len(req.URIs) == 1 && req.URIs[0].String() != webID.String()) {
			t.Fatalf("issued for a CSR asking for %v", req.URIs)
		}
		chain := resp.GetCertChain()
		if len(chain) < 2 {
			t.Fatalf("chain of %d elements", len(chain))
		}
		lb, _ := pem.Decode([]byte(chain[0]))
		leaf, lerr := x509.ParseCertificate(lb.Bytes)
		if lerr != nil {
			t.Fatal(lerr)
		}
		if id, _ := x509svid.IDFromCert(leaf); id != webID {
			t.Fatalf("issued for %v", id)
		}
		if !leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(req.PublicKey) {
			t.Fatal("issued for another key")
		}
	})
}

// The CSR decoder alone, with the same guarantees, cheaper per input.
func FuzzParseCSR(f *testing.F) {
	f.Add([]byte(makeCSR(f, ecKey(f, elliptic.P256()), webID.String())))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n\n-----END CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		csr, err := parseCSR(in)
		if err != nil {
			if csr != nil {
				t.Fatal("CSR with an error")
			}
			return
		}
		// Whatever parses, the CA's checks must judge without panicking,
		// and anything they accept has a good key and signature.
		if ca.CheckCSR(csr, webID) == nil && csr.CheckSignature() != nil {
			t.Fatal("accepted a CSR with a bad signature")
		}
	})
}
