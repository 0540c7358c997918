// Package federation links clusters: peering tokens, `federator token
// create` and `federator join`, establishment, and the per-peer exchange
// stream of api/federation/v1, which carries exported services and trust
// bundles both ways.
//
//	cluster A: token create ──► Secret isthmus-token-<id> (hash of the
//	           one-time secret, expiry, the joiner's trust domain)
//	           prints token: A's name, trust domain, federator ID, roots,
//	                         federation addresses, token ID and secret
//	cluster B: join ──► Secret isthmus-join-a (the token) + FederationPeer "a"
//	           B's Manager dials A (TLS verified with the token's roots and
//	           federator ID, B's SVID as client certificate) and calls
//	           Establish; A checks the record, spends it (a delete guarded
//	           by UID and resourceVersion), stores B's bundle in ConfigMap
//	           isthmus-peer-b, creates FederationPeer "b"; B stores A's
//	           bundle in isthmus-peer-a and deletes the spent token.
//	then:      B dials A's Exchange over mTLS, each side authorizing the
//	           other against its stored bundle and expected federator ID.
//
// On the stream (session.go) a reader goroutine hands messages to one
// select loop that owns the peer's state and is the only sender; a
// heartbeat ticker and a silence timeout bound it. Per resource type
// (state.go) at most one update is in flight, so the peer always holds
// exactly the last acknowledged set and the next update is a diff against
// it; versions are content hashes that both sides compute, so a resumed
// stream resends nothing the peer already holds. A receiver applies an
// update whole or not at all and NACKs naming the refused resource; the
// sender then sets that content aside, so one bad resource never stalls
// the rest. Limits (Limits) bound message and resource size, services per
// peer and update rate.
//
// What a peer exports enters the catalog at once under the peer's name
// (the propagation path); pkg/kube's ImportWriter turns it into
// ServiceEntries off that path. A lost peer's imports are kept for
// keepFor, drained (no ready endpoints) for drainFor, then removed
// (peer.age); a reconnect restores them. Deleting a FederationPeer sends
// Terminate and removes the imports on both sides. Each peer's status is
// kept in a tracker and written to its FederationPeer (peerstatus.go).
// A FederationPeer whose spec the federator cannot follow (peerspec.go: a
// value it cannot read, such as a duration stored before the CRD checked
// it, or fields that contradict each other) is Failed with a False
// Accepted condition naming each problem; its link is not run, on either
// side, and it is not retried until the object changes. Other peers are
// not affected.
//
// Everything the CLI does is an object in the cluster's own API server; no
// cluster ever holds credentials for another's.
package federation
