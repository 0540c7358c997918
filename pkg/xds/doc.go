// Package xds is the federator's xDS control plane: a pure translation
// from the catalog (and later policy and trust) to Envoy resources, and the
// ADS server that hands them to Isthmus's proxies.
//
//	catalog.Store (local source) ─────────────Subscribe, coalesced──► GatewayTranslator ─► Resources (validated, version = content hash)
//	catalog.Store (local + every peer's imports) ─────────────────────► TranslateSidecar ─┘ │ Snapshot(): consistent()
//	                                                                                         ▼
//	                      go-control-plane snapshot cache, one snapshot per role (node ID "eastwest-gw~…", "sidecar~…")
//	                                                                                         │ ADS, state of the world and delta
//	                                                                                         ▼
//	                      east-west gateways and sidecars: :15012 over TLS with their SVID; :15010 plaintext (tests only)
//
// docs/gateway-xds.md is the contract for what TranslateGateway emits:
// one listener "eastwest-gw" with one SNI filter chain per TCP port of
// every exported service (Istio's outbound_.<port>_._.<svc>.<ns>.svc.cluster.local)
// plus the federation chain, an EDS cluster per chain with its
// ClusterLoadAssignment, and the isthmus-federation cluster.
//
// docs/sidecar-xds.md is the contract for what TranslateSidecar emits: a
// clusterset service (<name>.<ns>.svc.clusterset.local, with a virtual
// IP) per namespace/name exported locally or imported from a peer, an
// mTLS EDS cluster per TCP port whose endpoints are the local pods, then
// the same-region peers' gateways, then the others'; the "outbound"
// (15001) and "inbound" (15006) listeners, and the RDS route
// configurations of the HTTP ports and of explicit mode.
//
// Every resource passes go-control-plane's own Validate() before it can be
// served, and a snapshot is set only when it is consistent and its version
// differs from the one being served, so unchanged configuration is never
// pushed again. Nodes of other roles get no configuration.
//
// The Server translates the gateway with a GatewayTranslator, which keeps
// what the last translation made of each service (chains, clusters,
// ClusterLoadAssignments, and their encodings) while the catalog's entry
// for the service stays the same: a change of one service costs that
// service, a sorted merge, and a hash over kept encodings (resumed where
// only endpoints changed). Its results, version included, are
// TranslateGateway's.
//
// On the TLS port the xDS server shares a gRPC server with the
// certificate service (pkg/caserver), whose clients have no certificate
// yet: TLS requests a client certificate without requiring it, and a stream
// interceptor refuses every xDS stream that did not present a valid X.509
// SVID of the local trust domain (SecureServerOptions).
package xds
