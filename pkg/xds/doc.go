// Package xds is the federator's xDS control plane: a pure translation
// from the catalog (and later policy and trust) to Envoy resources, and the
// ADS server that hands them to Isthmus's proxies.
//
//	catalog.Store (local source) ─────────────Subscribe, coalesced──► GatewayTranslator ─► Resources (validated, a content hash per type)
//	catalog.Store (local + every peer's imports) ────────────────────► SidecarTranslator ─┘ │ Snapshot(): consistent()
//	                                                                                         ▼
//	                      encodedCache (go-control-plane's snapshot cache, encoding once), one snapshot per role (node ID "eastwest-gw~…", "sidecar~…")
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
// The inbound listener alone depends on the pod (sidecar_inbound.go): a
// pod whose Services declare ports gets a chain per declared target
// port, HTTP or TCP as declared, before the ALPN chains, so that a
// caller cannot choose the TCP chain on an HTTP port. Pods that declare
// the same ports share a profile. The ports come from the exporter's
// declared ports (every Service with endpoints, headless and unmeshed
// ones too, each address with its pod). The sidecars' snapshot is one
// (profiledSnapshot); the encodedCache asks it which listeners a node
// gets, by the pod (then the IP) of its node ID, and encodes each
// profile's once.
// The translator keeps which pod declares what service by service
// (declIndex), so an endpoint turning ready costs nothing there.
//
// Every resource passes go-control-plane's own Validate() before it can be
// served, and a snapshot is set only when it is consistent and its version
// differs from the one being served. Each type is served at its own
// version, a content hash of that type's resources alone, so unchanged
// configuration is never pushed again, not even beside a change of
// another type: a pod turning unready pushes one ClusterLoadAssignment's
// type, not every listener, cluster and route configuration. Nodes of
// other roles get no configuration.
//
// The Server translates the gateway with a GatewayTranslator, which keeps
// what the last translation made of each service (chains, clusters,
// ClusterLoadAssignments, and their encodings) while the catalog's entry
// for the service stays the same: a change of one service costs that
// service, a sorted merge, and hashes over kept encodings of the types
// that changed (the endpoints' resumed at the first changed assignment).
// Its results, versions included, are TranslateGateway's.
//
// The snapshots are served by go-control-plane's ADS server (state of the
// world and delta) from encodedCache (cache.go), which answers as
// go-control-plane's snapshot cache does but encodes each resource once
// for every stream, and not again while the next snapshot keeps the
// message: a push costs an encoding per changed resource, not one per
// stream and resource. A type the next snapshot keeps whole (its version
// and messages) keeps its encodings whole too.
//
// The sidecars are translated likewise, by a SidecarTranslator, whose
// results, versions and skipped list included, are TranslateSidecar's.
// It keeps per namespace/name what the translation made of it: the
// clusterset service merged from its exporters, its VIP, and per port the
// cluster, the ClusterLoadAssignment, the outbound TCP chain or the two
// virtual hosts (port route, explicit route), each with its encoding,
// and what was skipped. A translation
//
//   - finds what changed by walking only the catalogs that are new
//     snapshots, against the services it last saw of each: the catalog's
//     Builder keeps the entry of an unchanged service, so most compare by
//     address, and a full resend compares by content (the peers a local
//     export is narrowed to do not count: the sidecars do not see them);
//   - merges each changed namespace/name's exporters again and makes its
//     ClusterLoadAssignments;
//   - when a clusterset service came or went, assigns the VIPs again over
//     the hosts in order (a probe start kept per host, so an O(n) walk of
//     a 64 KiB table), and treats a service whose VIP moved as changed;
//   - makes the VIP-dependent parts (clusters, chains, virtual hosts) of
//     the changed services, taking them from the last state when the
//     ports, identities and VIP are the same (an endpoint change);
//   - updates the sorted lists the shared resources are made of (clusters
//     by name, TCP chains by VIP and port, each HTTP port's VIPs and
//     virtual hosts, the explicit route's) by binary search when few
//     parts changed, by a merge otherwise, and makes an HTTP port's chain
//     or route configuration, the explicit route, or the outbound
//     listener again only when a part of it changed;
//   - hashes each type's version over the kept encodings, only for a
//     type whose resources changed (the others keep their versions): the
//     outbound listener and the route configurations spliced from their
//     parts' fields, the endpoints' hash resumed at the block of the
//     first changed ClusterLoadAssignment.
//
// At 10,000 clusterset services a one-service endpoint change costs
// about 60 times less CPU and 180 times less memory than TranslateSidecar
// (BenchmarkTranslateSidecar); what remains is mostly the hash. A failed
// translation changes nothing the translator keeps.
//
// On the TLS port the xDS server shares a gRPC server with the
// certificate service (pkg/caserver), whose clients have no certificate
// yet: TLS requests a client certificate without requiring it, and a stream
// interceptor refuses every xDS stream that did not present a valid X.509
// SVID of the local trust domain (SecureServerOptions).
package xds
