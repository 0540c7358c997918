// Package xdsclient is the xDS client of Isthmus's Go proxies: one ADS
// stream (state of the world) to the federator, every response validated
// against the subset of Envoy's API the proxies implement, ACKed or NACKed
// with a reason naming the resource and the field, and every consistent
// result published as an immutable *Config.
//
// Data flow:
//
//	federator (pkg/xds) ──ADS──► Client.session ─ decode + validate (Decode's rules) ─► state
//	                                  ▲   │                                              │
//	                         ACK / NACK   ├── EDS names from accepted clusters           │ consistent?
//	                                      ├── RDS names from accepted listeners (sidecar)│
//	                                      └── SDS: ROOTCA by name                        ▼
//	               proxy ◄── Updated() ── Current() *Config (atomic pointer) ◄── publish
//	                 ▲                          │ Config.Bundles (one per trust domain)
//	  go-spiffe tlsconfig ◄── Client.Bundles() ─┘ (x509bundle.Source, read at every handshake)
//
// The subset is docs/gateway-xds.md: a listener whose filter chains match
// server names and end in one tcp_proxy, EDS/STATIC/STRICT_DNS clusters,
// endpoints that are socket addresses, and one Secret, ROOTCA: a
// validation context holding only Envoy's SPIFFE certificate validator,
// one PEM bundle per trust domain. It is an allow-list: a field the
// contract does not name is refused, never silently ignored, so a stock
// Envoy given the same resources behaves the same way. A tls_certificate
// Secret is refused outright: private keys never leave the pod (the proxy
// gets its SVID from pkg/identity).
//
// The sidecar's subset is docs/sidecar-xds.md (DecodeRole, RoleSidecar;
// the client follows the role of its Node): the outbound listener's
// chains by destination port and VIP, the inbound listener's mTLS chains
// (and plaintext raw_buffer ones, for PERMISSIVE ports) by destination
// port, transport and ALPN, route configurations over RDS, EDS and ORIGINAL_DST clusters
// with upstream mTLS and the service metadata, and assignments with
// priorities and locality weights. Config.Sidecar carries it, with the
// lookups a proxy makes per connection or request (Match, VirtualHost,
// LookupHost) precomputed into maps when a response is decoded.
//
// The trust bundles are decoded into an immutable *x509bundle.Set per
// Config, never merged across trust domains, and Client.Bundles serves the
// current one to go-spiffe's tlsconfig, so a root rotation the federator
// publishes reaches the next handshake without a restart. With
// TLSConfig.FollowSDS the client validates the federator itself that way,
// falling back to its configured bundle until the first ROOTCA arrives.
//
// A response costs what it changes. State of the world resends every
// resource of a type; the client keeps each resource it accepted with
// the SHA-256 of the bytes it was decoded from, reuses the decoded,
// validated value of every resource sent again unchanged, decodes the
// others, and updates the indexes a Config is assembled from (clusters
// with their endpoints, the references still missing, the DNS name
// table, the EDS and RDS subscriptions) by the changes alone (state.go).
// Checks that span resources still cover them all, and a NACK leaves
// the accepted state exactly as it was.
//
// A Config is published only when it is consistent: every filter chain's
// cluster is present and every EDS cluster has its ClusterLoadAssignment;
// for a sidecar also every route configuration the listeners name, every
// cluster a route names, and the ROOTCA Secret its TLS contexts name.
// Until then, and through NACKs, disconnects and federator restarts, the
// previous Config stays (its trust bundles too): a proxy never drops
// traffic because the control plane went away. A new stream resubscribes
// with the versions accepted last. A gateway's Config is consistent
// without a Secret: Config.Bundles stays nil until the first ROOTCA is
// accepted.
package xdsclient
