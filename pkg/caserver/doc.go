// Package caserver is the federator's certificate service: it turns a
// workload's CSR plus its Kubernetes ServiceAccount token into an X.509 SVID
// signed by the cluster CA.
//
// It sits between the workload side and the CA:
//
//	sidecar / gateway (pkg/identity)
//	   │  gRPC over TLS to the federator on :15012,
//	   │  IstioCertificateService.CreateCertificate(CSR),
//	   │  "authorization: Bearer <projected SA token>"
//	   ▼
//	caserver ──TokenReview──► kube-apiserver   (who is calling?)
//	   │
//	   └──ca.Signer.Sign(csr, spiffe://<td>/ns/<ns>/sa/<sa>)──► pkg/ca
//
// The identity in the certificate always comes from the token, never from
// the CSR: a CSR that asks for any other SPIFFE ID is refused. The response
// follows Istio's convention (one certificate per element, leaf first, root
// last), so an istio-agent can use this service as its CA.
//
// Anyone who reaches the port can make the service review a token, and a
// TokenReview is a request to the API server. So everything that needs
// only the request (its size, the token's presence and length, the CSR's
// encoding, key and signature) is checked first, and the federator wraps
// the TokenReviewAuthenticator in a CachingAuthenticator: answers are
// remembered by the SHA-256 of the token (acceptances for a minute or
// until the token expires, refusals for five seconds), and callers with
// the same token share one review. The federator also gives the reviews a
// client-side rate limit of their own (--token-review-qps).
//
// The request size bound (MaxCSRBytes plus a little metadata) is applied
// by the transport only on a gRPC server of the service's own
// (ServerOptions). The federator shares its server with xDS, which allows
// larger messages; there CreateCertificate refuses an oversized request
// after decoding it, before anything else.
//
// The service speaks server-only TLS (ServerOptions): a workload calling for
// its first certificate has none to present yet. Its own serving
// certificate is the federator's SVID, which clients check with
// tlsconfig.AuthorizeID.
package caserver
