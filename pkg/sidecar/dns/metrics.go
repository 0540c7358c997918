package dns

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// result is what became of one query: the "result" label of
// isthmus_dns_queries.
type result uint8

const (
	resultNone      result = iota // nothing to count yet (a forward in flight)
	resultAnswered                // answered from the table: an address, or NODATA
	resultNXDomain                // NXDOMAIN from the proxy: clusterset.local, or a search expansion of a known name
	resultForwarded               // an upstream's answer passed back, whatever its rcode
	resultServFail                // SERVFAIL from the proxy: upstreams failed, too many forwards, or no table yet
	resultMalformed               // dropped, or answered FORMERR
	numResults
)

var resultNames = [numResults]string{"", "answered", "nxdomain", "forwarded", "servfail", "malformed"}

// protocol is the transport a query came over.
type protocol uint8

const (
	udp protocol = iota
	tcp
	numProtocols
)

var protocolNames = [numProtocols]string{"udp", "tcp"}

func (p protocol) String() string { return protocolNames[p] }

// failure is why one forward attempt, or a whole forward, failed: the
// "reason" label of isthmus_dns_forward_failures.
type failure uint8

const (
	failTimeout     failure = iota // no answer from the upstream within UpstreamTimeout
	failNetwork                    // could not send, connect or read (refused, unreachable, reset)
	failBadResponse                // an answer that does not parse or does not match the query
	failRcode                      // SERVFAIL or REFUSED from an upstream while others were left to try
	failOverload                   // MaxForwards already in flight
	numFailures
)

var failureNames = [numFailures]string{"timeout", "network", "bad_response", "rcode", "overload"}

// metrics are the proxy's OpenTelemetry instruments. Each label set is
// built once, so counting allocates nothing.
type metrics struct {
	queries     metric.Int64Counter
	failures    metric.Int64Counter
	forwards    metric.Int64UpDownCounter
	tcpConns    metric.Int64UpDownCounter
	tcpRefused  metric.Int64Counter
	tableNames  metric.Int64Gauge
	queryAttrs  [numResults][numProtocols]metric.AddOption
	failureAttr [numFailures]metric.AddOption
}

func newMetrics(meter metric.Meter) *metrics {
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	m := &metrics{}
	// Instrument creation fails only for invalid names, which these are
	// not; the SDK then hands back a working no-op instrument anyway.
	m.queries, _ = meter.Int64Counter("isthmus_dns_queries",
		metric.WithDescription("DNS queries from the workload, by result (answered, nxdomain, forwarded, servfail, malformed) and protocol."))
	m.failures, _ = meter.Int64Counter("isthmus_dns_forward_failures",
		metric.WithDescription("Failed upstream attempts and refused forwards, by reason (timeout, network, bad_response, rcode, overload)."))
	m.forwards, _ = meter.Int64UpDownCounter("isthmus_dns_forwards_active",
		metric.WithDescription("Queries being forwarded upstream now."))
	m.tcpConns, _ = meter.Int64UpDownCounter("isthmus_dns_tcp_connections_active",
		metric.WithDescription("Client TCP connections open now."))
	m.tcpRefused, _ = meter.Int64Counter("isthmus_dns_tcp_connections_refused",
		metric.WithDescription("Client TCP connections closed at once because MaxTCPConnections were open."))
	m.tableNames, _ = meter.Int64Gauge("isthmus_dns_table_names",
		metric.WithDescription("Names in the proxy's current table."))
	for r := range numResults {
		for p := range numProtocols {
			m.queryAttrs[r][p] = metric.WithAttributeSet(attribute.NewSet(
				attribute.String("result", resultNames[r]), attribute.String("protocol", protocolNames[p])))
		}
	}
	for f := range numFailures {
		m.failureAttr[f] = metric.WithAttributeSet(attribute.NewSet(attribute.String("reason", failureNames[f])))
	}
	return m
}

func (m *metrics) query(r result, p protocol) {
	if r != resultNone {
		m.queries.Add(context.Background(), 1, m.queryAttrs[r][p])
	}
}

func (m *metrics) fail(f failure) {
	m.failures.Add(context.Background(), 1, m.failureAttr[f])
}
