// Package sidecar is Isthmus's proxy beside each workload: the data plane
// of docs/sidecar-xds.md, and the composition root of `sidecar run`. It
// implements exactly the subset of Envoy that the federator emits for
// sidecars, so a stock Envoy given the same resources behaves the same.
//
// Data flow:
//
//	federator ──ADS──► pkg/xdsclient ──*Config──► Proxy (atomic swap; Check refuses what it cannot serve)
//	CA ──CSR──► pkg/identity ──SVID (x509svid.Source, renewed)──► every handshake
//
//	app ──iptables──► :15001 outbound ─ original destination ─ filter chain
//	    ├─ http_connection_manager: HTTP/1.1 or h2c ─ RDS route by authority ─ cluster
//	    │     └─ endpoint (priority, locality, round robin, passive health)
//	    │        ─ mTLS (own SVID; SNI; ALPN istio-http/1.1 | istio-h2;
//	    │          peer verified against its own trust domain's bundle, ID one of the SANs)
//	    │        ─ keep-alive pool per endpoint and protocol ──► peer sidecar or east-west gateway
//	    ├─ tcp_proxy to a service: mTLS with ALPN istio, copy both ways with half-close
//	    └─ default chain: PassthroughCluster, the original destination as it is (splice)
//
//	peer ──iptables──► :15006 inbound ─ original destination port, then ClientHello ALPN, picks the chain ─ TLS:
//	    caller's SVID required, verified against its own trust domain's bundle
//	    ├─ a declared port's chain, whatever the ALPN: as its protocol says, HTTP or bytes (below)
//	    ├─ any other port, istio-http/1.1, istio-h2: HTTP (codec by the bytes), XFCC set ──► 127.0.0.1:<port> (HTTP/1.1 or h2c)
//	    └─ any other port, anything else: bytes ──► 127.0.0.1:<port>
//	    (PERMISSIVE ports: with a raw_buffer chain in the listener, the first byte, peeked, tells TLS (0x16)
//	     from plaintext, matched after the port: HTTP (h1 or h2c) or bytes, no caller identity, no XFCC)
//
// The inbound chain is chosen as Envoy chooses it: when a chain names the
// connection's original destination port (filter_chain_match
// .destination_port), only the chains of that port are considered, then
// the ALPN among them; there is no going back to the chains of any port
// if none of them matches (no_chain). So a caller cannot reach an HTTP
// port's app as TCP, with an X-Forwarded-Client-Cert of its own making,
// by offering ALPN istio or none. Between the port and the ALPN comes the
// transport (tls or raw_buffer), decided only when some chain is
// raw_buffer (a PeerAuthentication PERMISSIVE): a plaintext caller gets
// its port's raw_buffer chain, or nothing when the port has only TLS
// chains (STRICT), and is unauthenticated to RBAC.
//
// HTTP/1.1 is served on the connection's own goroutine by the sidecar's
// codec (h1.go, h1parse.go): the head parsed strictly where it was read
// (a malformed or smuggling head is answered 400, 431 or 501 and the
// connection closed), routed, written with its body to a pooled
// keep-alive upstream connection, the response streamed back; requests
// on a connection are answered in order, pipelined ones too, and a
// request body is sent before the response is read, as nginx does. A
// pooled connection is reused only if nothing was left after its last
// response and nothing came while it sat idle (a peek each time it is
// taken): bytes no request asked for close it, as in Envoy and nginx.
// HTTP/1.0, CONNECT, Upgrade and Expect go to the net/http server with
// the bytes already read, as does everything with Config.NetHTTP1.
//
// HTTP/2 (prior knowledge: h2c from the app, istio-h2 inside mTLS) is
// the sidecar's own too (h2conn.go, h2stream.go, h2serve.go): frames are
// read with x/net/http2's Framer, header blocks decoded with its HPACK
// by headerReader (h2headers.go: the Framer's checks and errors, without
// its per-block allocations), and acted on by the connection's reader, which then writes what it forwarded without
// blocking (a writer goroutine per connection sends what a socket did
// not take at once, in one system call); a proxied stream joins a
// downstream stream to one on a pooled upstream connection (many
// streams per connection, another connection when the peer's
// MAX_CONCURRENT_STREAMS is reached) and costs no goroutine; a stream
// to a cluster that speaks HTTP/1.1 upstream is an HTTP/1.1 request on
// the HTTP/1.1 path's pooled connections instead, with a goroutine while
// it lasts (h2h1.go). DATA moves
// when both windows allow and otherwise waits on the stream; a source
// gets its stream's window back only once its bytes reached the other
// socket (its connection's at once), so a slow reader holds back its own
// stream's sender (at most a window, 256 KiB) and nobody else. A
// downstream may open 256 streams at once; one whose streams mostly end
// in a reset soon after opening is closed (rapid reset), and one that
// does not read what it causes is not read from. The same resets passed
// upstream would get the pooled upstream connection closed by the same
// rule on the other side, with every other caller's stream on it, so an
// upstream connection takes no new stream that, reset young with every
// other stream open on it, could make its count reach that rule
// (resetsCouldTrip); it closes once its last stream ends. A stream the upstream
// refused (REFUSED_STREAM,
// or beyond a GOAWAY's last stream) with none of its body sent is opened
// again elsewhere, and a new connection to an endpoint assumes the
// stream limit of the newest one to it until its own SETTINGS come;
// connections are pinged after a silent minute.
// Header blocks over 64 KiB are refused (431 before routing). A
// message whose DATA do not add up to its content-length, or whose
// trailers hold a pseudo-header, is malformed and reset, never forwarded
// whole (RFC 9113 §8.1.1), either way. A downstream's frame on a stream
// it has not opened (but HEADERS and PRIORITY) ends its connection; on a
// closed stream it is ignored when the sidecar reset the stream (the
// last 128 resets are kept), else answered with a reset STREAM_CLOSED;
// a stream that depends on itself is reset. The server passes h2spec
// (TestH2Spec, strict mode) but for an invalid preface, which the
// listener reads as HTTP/1.1. With Config.NetHTTP2, HTTP/2 goes to
// net/http's server and Transport instead, for comparison.
//
// Both HTTP paths read and write their sockets through tryConn
// (tryconn*.go), which calls read(2) and write(2) with RawSyscall inside
// Go's poller: net.Conn's own Read and Write go through entersyscall,
// which wakes the runtime's sysmon thread after every idle spell, a
// futex wake and a run of 20 µs sleeps per request at a moderate rate.
//
// An HTTP request is routed by its authority (Host, :authority, or the
// host of an absolute-form target when the app uses the sidecar as its
// HTTP proxy) to the virtual host listing it, else "*", else 404 with a
// body naming the host (Envoy's NR). The request goes upstream in the
// cluster's HTTP version, which the federator picks by the port's
// declared protocol as Istio does (http: HTTP/1.1; http2, grpc: HTTP/2;
// the app's own to the app, use_downstream_protocol_config): an h2c
// stream to an HTTP/1.1 cluster becomes an HTTP/1.1 request (h2h1.go),
// an HTTP/1.1 request to an HTTP/2 cluster goes through net/http's
// Transport; streams, trailers and gRPC pass through; with timeout 0s (what the federator
// sends) only the stream idle timeout ends a request. A connection that
// iptables did not redirect (explicit mode) is matched as the outbound
// listener's own address, port 15001 in xDS, whatever port it is bound to;
// it must come from this network namespace (loopback or an address of
// its own interfaces), or anyone who reaches the port would send requests
// into the mesh with this workload's identity. The capture rules send a
// peer that dials port 15001 to the inbound listener instead, as Istio's.
//
// Errors answered to the app, as Envoy words them: 503 "no healthy
// upstream" (UH), 503 "upstream connect error or disconnect/reset before
// headers. reset reason: connection failure, ..." (UF, including a peer
// whose certificate or SPIFFE ID does not pass), 503 "... reset reason:
// connection termination" (the upstream closed before its response), 502
// "... reset reason: protocol error: <what broke>" (UPE: a response head
// the codec refuses, a 101 nobody asked for, an HTTP/2 frame out of
// place; net/http's HTTP/2 Transport is the exception, its errors naming
// no type to tell them by: 503 "remote reset"), 504 "upstream request
// timeout" (UT), 504 "stream timeout". A caller that leaves (its own
// timeout, a reset) ends the request upstream too: at once on the
// net/http path, within a second on the HTTP/1.1 path; a response that
// arrives after its request ended is never relayed, and a request nobody
// waits for any more is aborted, never answered 200.
//
// A connection the sidecar will not carry is closed and counted in
// isthmus_sidecar_refusals_total{listener, reason}: over_limit (reset
// before reading), no_config, handshake (the
// inbound caller is not TLS, or its certificate is missing or does not
// verify), no_chain, no_original_dst (an inbound connection that was not
// redirected: no app port to go to), loop (outbound passthrough to the
// sidecar itself), not_local (explicit mode from outside the pod),
// no_endpoint, no_cluster, rbac (an inbound chain's RBAC filters deny the
// connection: the caller's SPIFFE ID, its peer address (the inbound
// socket's remote address: direct_remote_ip and remote_ip; a caller from
// another cluster arrives through the east-west gateway, with its
// address) and the original destination address and port
// (destination_ip, destination_port); decided once, after the TLS
// handshake, before a byte reaches the app, and logged at Debug with the
// caller, peer address and port). rbac also counts the inbound HTTP
// requests an HTTP connection manager's RBAC filters deny (rbac.go):
// decided per request on every HTTP path once its head is read, against
// the caller, the addresses, the port and the request's method,
// authority, path and headers; answered 403 "RBAC:
// access denied" (text/plain, Envoy's) and never sent to the app, the
// connection kept for the next request (an HTTP/1.1 body not yet read
// closes it), and logged at Debug with the caller, method and path. Both
// follow the configuration current now, not the one a connection was
// accepted under (revoke.go): a request is decided by the filters of the
// chain the current inbound listener matches for its connection, and
// each adopted configuration re-decides the connections open, closing
// those its network RBAC now denies (rbac) and the TCP ones it has no
// TCP chain for (no_chain); an HTTP connection whose chain is gone
// closes after its request in flight, as a drain closes it.
//
// Endpoints: the lowest priority with a healthy endpoint; within it a
// locality with probability proportional to its weight; round robin
// inside. An endpoint that cannot be connected to (TCP or TLS) is ejected
// for Config.EjectionTime and another is tried, up to
// Config.MaxConnectAttempts, when nothing of the request was sent. HTTP
// picks per request, so HTTP/2 streams spread over endpoints.
//
// Bounds: MaxConnections per listener; a deadline on every TLS handshake
// and request head; idle timeouts on HTTP connections, streams, pooled
// upstream connections and TCP proxies (the chain's idle_timeout). On
// shutdown Run fails readiness, stops accepting, gives requests and
// connections in flight Config.DrainTimeout (HTTP/2 clients get a GOAWAY),
// closes the rest, and returns once every goroutine it started has ended.
// A configuration the proxy cannot serve is never adopted: the last good
// one stays.
//
// Ports (Istio's): 15000 admin (/config_dump with the versions, /ready,
// /stats), 15020 health (/healthz/ready: a configuration and an SVID, not
// draining; /stats/prometheus). Metrics are OpenTelemetry instruments
// exported in Prometheus format, merged with what other components record
// through Proxy.Meter (the DNS proxy); the data path's counts are atomic
// counters the instruments read at scrape time (metrics.go):
//
//	isthmus_sidecar_connections_total{listener}            accepted downstream connections
//	isthmus_sidecar_connections_active{listener}
//	isthmus_sidecar_refusals_total{listener,reason}
//	isthmus_sidecar_requests_total{listener,cluster,code}   HTTP; code 0: the downstream left
//	isthmus_sidecar_upstream_connect_failures_total{cluster}
//	isthmus_sidecar_received_bytes_total{listener,cluster}  from downstream (HTTP: request bodies)
//	isthmus_sidecar_sent_bytes_total{listener,cluster}      to downstream (HTTP: response bodies)
//	isthmus_sidecar_xds_connected, isthmus_sidecar_xds_responses_total{result}
//	isthmus_sidecar_svid_expiry_timestamp_seconds
//
// Where the Go sidecar differs from Envoy: inbound-passthrough dials
// 127.0.0.1:<original port> rather than the pod IP (docs/sidecar-xds.md);
// a locality without load_balancing_weight weighs its healthy endpoint
// count (the federator leaves the weight unset only when that count is
// zero); ejection is on the first connect failure, for a fixed time.
package sidecar
