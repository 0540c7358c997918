// Package gateway is Isthmus's east-west gateway: the cluster's door for
// other clusters, and the composition root of cmd/eastwest-gw.
//
// Data flow:
//
//	federator ──xDS──► pkg/xdsclient ──*Routes──► RouteSource ──► Gateway
//	peer's sidecar ──TLS──► :15443 ─ peek ClientHello ─ route by SNI ─► local pod
//
// A connection is read only as far as its TLS ClientHello (with a
// deadline); the server name selects a Route, the only routable names
// being the services this cluster exports plus the federation's reserved
// name; the bytes read are replayed to the chosen endpoint and then the two
// sockets are spliced together until both sides have closed. TLS is never
// terminated: the gateway holds no keys, and the caller's identity reaches
// the workload intact. Every refusal is counted by reason and never
// reaches a pod.
package gateway
