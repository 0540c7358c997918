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
//	                         ACK / NACK   └── EDS names from accepted clusters           │ consistent?
//	                                                                                     ▼
//	               proxy ◄── Updated() ── Current() *Config (atomic pointer) ◄── publish
//
// The subset is docs/gateway-xds.md: a listener whose filter chains match
// server names and end in one tcp_proxy, EDS/STATIC/STRICT_DNS clusters,
// and endpoints that are socket addresses. It is an allow-list: a field the
// contract does not name is refused, never silently ignored, so a stock
// Envoy given the same resources behaves the same way.
//
// A Config is published only when it is consistent: every filter chain's
// cluster is present and every EDS cluster has its ClusterLoadAssignment.
// Until then, and through NACKs, disconnects and federator restarts, the
// previous Config stays: a proxy never drops traffic because the control
// plane went away. A new stream resubscribes with the versions accepted
// last.
package xdsclient
