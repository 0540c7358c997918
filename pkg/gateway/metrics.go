package gateway

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

// Refusal reasons, the values of the "reason" label of
// isthmus_gateway_refusals_total.
const (
	ReasonNotTLS        = "not_tls"        // first bytes are not a TLS handshake record
	ReasonNoSNI         = "no_sni"         // ClientHello without a server name
	ReasonTooLarge      = "too_large"      // ClientHello over MaxClientHelloSize or MaxClientHelloRecords
	ReasonMalformed     = "malformed"      // records that are not a valid ClientHello
	ReasonHelloTimeout  = "hello_timeout"  // ClientHello not whole within ClientHelloTimeout
	ReasonClosedEarly   = "closed_early"   // client closed before a whole ClientHello
	ReasonNoRoutes      = "no_routes"      // no routing table yet
	ReasonUnknownSNI    = "unknown_sni"    // server name of no exported service
	ReasonNoEndpoint    = "no_endpoint"    // no healthy endpoint, or none could be connected to
	ReasonUpstreamError = "upstream_error" // the endpoint failed while receiving the ClientHello
	ReasonOverLimit     = "over_limit"     // MaxConnections reached
)

// Close reasons, the values of the "reason" label of
// isthmus_gateway_closed_connections_total: routed connections the
// gateway closed itself.
const (
	ReasonRouteRemoved = "route_removed" // the route left the table, RouteDrainTimeout passed
	ReasonIdleTimeout  = "idle_timeout"  // no byte either way for the route's idle timeout
	ReasonDrainTimeout = "drain_timeout" // still open when the shutdown's DrainTimeout passed
)

// reasons are the values of both reason labels.
var reasons = []string{ReasonNotTLS, ReasonNoSNI, ReasonTooLarge, ReasonMalformed, ReasonHelloTimeout,
	ReasonClosedEarly, ReasonNoRoutes, ReasonUnknownSNI, ReasonNoEndpoint, ReasonUpstreamError, ReasonOverLimit,
	ReasonRouteRemoved, ReasonIdleTimeout, ReasonDrainTimeout}

// metrics are the gateway's OpenTelemetry instruments, exported in
// Prometheus format like the federator's.
type metrics struct {
	registry *prometheus.Registry
	provider *sdkmetric.MeterProvider

	active          metric.Int64UpDownCounter
	accepted        metric.Int64Counter
	routed          metric.Int64Counter // by cluster
	refusals        metric.Int64Counter // by reason
	connectFailures metric.Int64Counter // by cluster
	closes          metric.Int64Counter // by reason

	// received and sent are bytes by cluster, observed from bytes.
	received, sent metric.Int64ObservableCounter
	// bytes maps a cluster name to its *clusterBytes. Entries stay, as
	// the counters they feed do.
	bytes sync.Map

	// reasonAttrs holds one precomputed option per reason, so a refusal
	// does not build an attribute set.
	reasonAttrs map[string]metric.AddOption
}

// seriesLimit is the most series one instrument keeps. OpenTelemetry's
// default, 2,000, counted every cluster past the 1,999th under one
// otel_metric_overflow="true" series; the cluster labels come from
// the routing table, which holds tens of thousands of services at the
// scale Isthmus is built for. A limit still bounds memory when services
// churn, since a series, once made, is kept.
const seriesLimit = 100_000

func newMetrics(src RouteSource) (*metrics, error) {
	m := &metrics{registry: prometheus.NewRegistry(), reasonAttrs: make(map[string]metric.AddOption, len(reasons))}
	m.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exporter, err := otelprom.New(otelprom.WithRegisterer(m.registry), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	m.provider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter), sdkmetric.WithCardinalityLimit(seriesLimit))
	meter := m.provider.Meter("github.com/isthmus-mesh/isthmus/pkg/gateway")
	var errs [9]error
	m.active, errs[0] = meter.Int64UpDownCounter("isthmus_gateway_connections_active",
		metric.WithDescription("Downstream connections open now, routed or still sending their ClientHello."))
	m.accepted, errs[1] = meter.Int64Counter("isthmus_gateway_connections",
		metric.WithDescription("Downstream connections accepted (once their first bytes arrived, or after about a second of silence)."))
	m.routed, errs[2] = meter.Int64Counter("isthmus_gateway_routed_connections",
		metric.WithDescription("Connections routed to an upstream endpoint, by cluster."))
	m.refusals, errs[3] = meter.Int64Counter("isthmus_gateway_refusals",
		metric.WithDescription("Connections refused before reaching an upstream, by reason."))
	m.received, errs[4] = meter.Int64ObservableCounter("isthmus_gateway_received_bytes",
		metric.WithDescription("Bytes received from downstream and sent upstream, by cluster."), metric.WithUnit("By"))
	m.sent, errs[5] = meter.Int64ObservableCounter("isthmus_gateway_sent_bytes",
		metric.WithDescription("Bytes received from upstream and sent downstream, by cluster."), metric.WithUnit("By"))
	m.connectFailures, errs[6] = meter.Int64Counter("isthmus_gateway_upstream_connect_failures",
		metric.WithDescription("Failed attempts to connect to an endpoint, by cluster."))
	m.closes, errs[8] = meter.Int64Counter("isthmus_gateway_closed_connections",
		metric.WithDescription("Routed connections the gateway closed before either side did, by reason: route_removed, idle_timeout, drain_timeout."))
	routes, err := meter.Int64ObservableGauge("isthmus_gateway_routes",
		metric.WithDescription("Routable server names in the current routing table."))
	if err == nil && errs[4] == nil && errs[5] == nil {
		_, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
			o.ObserveInt64(routes, int64(src.Routes().Len()))
			m.bytes.Range(func(_, v any) bool {
				b := v.(*clusterBytes)
				o.ObserveInt64(m.received, b.received.Load(), b.attrs)
				o.ObserveInt64(m.sent, b.sent.Load(), b.attrs)
				return true
			})
			return nil
		}, routes, m.received, m.sent)
	}
	errs[7] = err
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	for _, r := range reasons {
		m.reasonAttrs[r] = metric.WithAttributeSet(attribute.NewSet(attribute.String("reason", r)))
	}
	return m, nil
}

// clusterBytes are one cluster's byte counts. The relay reports bytes per
// splice(2): an atomic add there, read at each scrape, costs a fraction
// of an instrument's Add.
type clusterBytes struct {
	attrs          metric.ObserveOption // cluster
	received, sent atomic.Int64
}

// bytesOf returns c's cluster's byte counts.
func (m *metrics) bytesOf(c *cluster) *clusterBytes {
	if b, ok := m.bytes.Load(c.route.Cluster); ok {
		return b.(*clusterBytes)
	}
	b, _ := m.bytes.LoadOrStore(c.route.Cluster, &clusterBytes{attrs: c.attrs})
	return b.(*clusterBytes)
}

func (m *metrics) refuse(reason string) {
	m.refusals.Add(context.Background(), 1, m.reasonAttrs[reason])
}

func (m *metrics) closed(reason string, n int) {
	m.closes.Add(context.Background(), int64(n), m.reasonAttrs[reason])
}
