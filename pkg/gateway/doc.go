// Package gateway is Isthmus's east-west gateway: the cluster's door for
// other clusters, and the composition root of cmd/eastwest-gw.
//
// Data flow:
//
//	federator ──xDS──► pkg/xdsclient ──*Routes──► RouteSource ──► Gateway
//	peer's sidecar ──TLS──► :15443 ─ peek ClientHello ─ route by SNI ─► local pod
//
// The listener defers accept until a connection's first bytes arrive
// (relay.DeferAccept). A connection is read only as far as its TLS
// ClientHello (with a deadline); the server name selects a Route, the only
// routable names being the services this cluster exports plus the
// federation's reserved name; the bytes read are written to the chosen
// endpoint and then the two sockets are spliced together (splice(2)
// through a pooled pipe, called raw inside Go's poller: internal/relay)
// until both sides have closed, each FIN passed on with CloseWrite. TLS is
// never terminated: the gateway holds no keys, and the caller's identity
// reaches the workload intact.
//
// Refusals never reach a pod. Each is counted in
// isthmus_gateway_refusals_total{reason} and answered so:
//
//	reason          answer
//	unknown_sni     TLS alert unrecognized_name (112): not exported, or not to anyone
//	no_routes       TLS alert unrecognized_name: no routing table yet
//	no_sni          TLS alert unrecognized_name: nothing to route on
//	malformed       TLS alert decode_error (50)
//	too_large       TLS alert handshake_failure (40): ClientHello over 16 KiB, or over 64 records
//	not_tls         close: the client does not speak TLS, an alert means nothing to it
//	hello_timeout   close: no whole ClientHello within the deadline
//	closed_early    nothing to answer: the client left (TCP health checks do)
//	over_limit      reset, before reading a byte: MaxConnections reached
//	no_endpoint     close, as Envoy's tcp_proxy does: no healthy endpoint answered
//	upstream_error  close: the endpoint failed as the ClientHello was replayed
//
// A new routing table applies to new connections at once. A connection
// routed already keeps its endpoint while its route stays in the table,
// whatever happens to the route's endpoints (a pod replaced or not ready
// any more: EDS churn never cuts a connection). When its route leaves the
// table (the service's export was revoked), it goes on for
// Config.RouteDrainTimeout (--route-drain-timeout, 45 s as Istio's
// drainDuration), as Envoy drains the connections of a removed filter
// chain, and is then closed, unless the route came back meanwhile. Those
// closes are counted in isthmus_gateway_closed_connections_total with
// reason route_removed, and logged once per route with their number.
//
// Endpoints are picked round-robin among those EDS calls healthy; one that
// refuses a connection is skipped for Config.EjectionTime (passive health)
// and the next is tried, up to Config.MaxConnectAttempts; the turns go
// round the endpoints not skipped. A connection is closed after an idle
// timeout with no byte either way (counted with reason idle_timeout).
//
// On shutdown (SIGTERM) the gateway fails readiness at once but goes on
// accepting and routing for Config.DrainDelay (--drain-delay, 5 s as
// Istio's terminationDrainDuration), while peers' probes and load
// balancers notice the 503: what they still send meanwhile is served,
// not refused, nor reset in the accept queue. Then the listener closes
// and connections in flight have Config.DrainTimeout (--drain-timeout)
// to finish before the rest are closed (counted with reason
// drain_timeout).
package gateway
