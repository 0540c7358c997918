// Package identity gives a workload (the sidecar, the east-west gateway)
// its X.509 SVID and the trust bundle of its own trust domain, and keeps
// the SVID fresh.
//
// It sits at the start of every mTLS connection a proxy makes or accepts:
//
//	projected SA token ─┐
//	key made in process ┼─► CSR ──gRPC/TLS──► federator CA (pkg/caserver)
//	                    │                          │
//	Source ◄── SVID + roots (verified) ◄───────────┘
//	   │
//	   ├─► tlsconfig.MTLSServerConfig / MTLSClientConfig (x509svid.Source)
//	   └─► peer verification for the local trust domain (x509bundle.Source)
//
// The private key never leaves the process: only its CSR does. The CA is
// reached over TLS and must present the configured SPIFFE ID, verified
// against the configured roots. A Source renews at half of the SVID's
// lifetime (with jitter) and keeps serving the current SVID while renewal
// fails. go-spiffe's tlsconfig reads the Source at every handshake, so new
// connections get the new certificate and established ones are untouched.
//
// Bundles of other trust domains (federation peers) are not this package's:
// they come from pkg/trust.
package identity
