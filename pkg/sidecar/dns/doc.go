// Package dns is the sidecar's DNS proxy: it answers the workload's
// queries for clusterset services with their virtual IPs, and forwards
// everything else to the cluster DNS.
//
// Data flow:
//
//	federator ──xDS──► pkg/xdsclient ── clusters' filter_metadata["isthmus"] {host, vip}
//	    └─► sidecar composition root ──SetTable(host → VIP)──► Proxy (atomic swap)
//	app ──DNS──► iptables REDIRECT ──► 127.0.0.1:15053 (UDP and TCP) ──► Proxy
//	    ├─► answered from the table (never forwarded)
//	    └─► forwarded to resolv.conf's nameservers (the cluster DNS)
//
// What each query gets, in the order the proxy decides (names compared
// case-insensitively, fully qualified):
//
//	query                                    answer                                  result label
//	fewer than 12 bytes, or QR set            dropped                                 malformed
//	unparseable, two OPT records, two         FORMERR, header only                    malformed
//	  questions
//	opcode other than QUERY                   NOTIMP                                  answered
//	no question, class not IN or ANY          forwarded                               forwarded
//	EDNS version above 0                      BADVERS                                 answered
//	a table name                              A (AAAA for an IPv6 VIP), TTL            answered
//	                                            Config.TTL, AA; any other type:
//	                                            NOERROR with no answer (NODATA)
//	under clusterset.local, no table yet      SERVFAIL, EDE 14 "Not Ready"            servfail
//	clusterset.local, or above a table name   NODATA with the zone's SOA              answered
//	other names under clusterset.local        NXDOMAIN with the zone's SOA            nxdomain
//	<table name or clusterset.local name>.    NXDOMAIN                                nxdomain
//	  <a search domain>
//	anything else                             forwarded: the upstream's answer        forwarded
//	                                            byte for byte, or SERVFAIL (EDE 22)   servfail
//
// The search-domain rule is Istio's: a pod's resolv.conf says ndots:5 and
// `search <ns>.svc.cluster.local svc.cluster.local cluster.local`, so the
// app's resolver tries foo.bar.svc.clusterset.local.<ns>.svc.cluster.local
// and the other expansions before the name itself; each of them would
// otherwise be a round trip to the cluster DNS for a certain NXDOMAIN.
// The search list is the one in the resolv.conf the proxy reads, which is
// the pod's own.
//
// Names above a table name under clusterset.local (svc.clusterset.local,
// bar.svc.clusterset.local) are empty non-terminals and get NODATA, not
// NXDOMAIN: a caching resolver in the app that follows RFC 8020 would
// otherwise take NXDOMAIN for "nothing below exists". Negative answers in
// the zone carry an SOA whose minimum is Config.NegativeTTL, so they are
// cached only briefly; search-expansion NXDOMAINs carry none (that zone
// is the cluster DNS's), and are not cached at all.
//
// Forwarding. The client's bytes go upstream unchanged — ID, flags, EDNS0
// options and all — over the transport the client used, to each
// nameserver in order, each attempt bounded by Config.UpstreamTimeout. An
// answer must match the query (ID, opcode, question) or it is ignored, and
// the UDP socket is fresh per attempt (a new source port). A truncated
// UDP answer is passed back as it is, so the client retries over TCP and
// the proxy forwards that over TCP too. An upstream's SERVFAIL or REFUSED
// moves on to the next nameserver, as glibc does; when every attempt
// failed, the client gets SERVFAIL with an extended error saying why —
// never silence, which would cost it its own multi-second timeout.
//
// Bounds. Config.MaxForwards queries upstream at once (beyond: SERVFAIL
// at once, counted as overload); Config.MaxTCPConnections client
// connections (beyond: closed at once); maxPipelined forwards per TCP
// connection (beyond: the proxy stops reading it for a while); a TCP
// connection closes after Config.TCPIdleTimeout without a new query, and
// each query and answer on it must move within Config.IOTimeout. Reads
// from clients and upstreams all have deadlines; the listening sockets'
// reads end when Run closes them. Run returns after every goroutine it
// started, forwards included, has ended: ending its context moves every
// upstream deadline to now.
//
// Metrics (OpenTelemetry, through Options.Meter; Prometheus adds _total
// to counters):
//
//	isthmus_dns_queries{result,protocol}       result: answered, nxdomain, forwarded, servfail, malformed
//	isthmus_dns_forward_failures{reason}       timeout, network, bad_response, rcode, overload
//	isthmus_dns_forwards_active
//	isthmus_dns_tcp_connections_active
//	isthmus_dns_tcp_connections_refused
//	isthmus_dns_table_names
//
// BenchmarkAnswered and BenchmarkForwarded (bench_test.go) measure
// queries per second through the proxy beside a peer run with the same
// clients: a plain miekg/dns server answering from memory, and the test
// upstream queried directly. Forwarding opens a fresh UDP socket per
// attempt (a random source port, as miekg/dns's client and Istio's proxy
// do); that socket is most of a forward's own cost.
//
// The proxy's own upstream traffic must not be captured back to itself:
// the iptables rules exclude the sidecar's user, as Istio's do, and New
// refuses an upstream that is the proxy's own address.
package dns
