// Package federation links clusters: peering tokens, `federator token
// create` and `federator join`, and (to come) establishment and the
// per-peer exchange stream of api/federation/v1.
//
//	cluster A: token create ──► Secret (hash of the one-time secret, expiry)
//	           prints token: A's name, trust domain, federator ID, roots,
//	                         addresses, token ID and secret
//	cluster B: join ──► Secret (the token) + FederationPeer "a"
//	           B's federator dials A, verifies it with the token's roots,
//	           spends the secret (Establish), then mTLS both ways (Exchange)
//
// Everything the CLI does is an object in the cluster's own API server; no
// cluster ever holds credentials for another's.
package federation
