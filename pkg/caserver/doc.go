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
// The service speaks server-only TLS (ServerOptions): a workload calling for
// its first certificate has none to present yet. Its own serving
// certificate is the federator's SVID, which clients check with
// tlsconfig.AuthorizeID.
package caserver
