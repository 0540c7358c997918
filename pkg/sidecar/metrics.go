package sidecar

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// The listener label's values.
const (
	listenerOutbound = "outbound"
	listenerInbound  = "inbound"
)

// Refusal reasons, the values of the "reason" label of
// isthmus_sidecar_refusals_total.
const (
	// ReasonOverLimit: MaxConnections reached; reset before reading.
	ReasonOverLimit = "over_limit"
	// ReasonNoConfig: no xDS configuration yet; closed.
	ReasonNoConfig = "no_config"
	// ReasonHandshake: an inbound caller that does not speak TLS, sent
	// no client certificate, or one that does not verify against the
	// bundle of its trust domain; or an upstream's TLS failed.
	ReasonHandshake = "handshake"
	// ReasonNoChain: an inbound ClientHello no filter chain matches.
	ReasonNoChain = "no_chain"
	// ReasonNoOriginalDst: an inbound connection that was not redirected
	// (its destination is the inbound listener itself), or whose original
	// destination could not be read.
	ReasonNoOriginalDst = "no_original_dst"
	// ReasonLoop: outbound passthrough to the sidecar's own outbound
	// listener.
	ReasonLoop = "loop"
	// ReasonNoEndpoint: a tcp_proxy found no healthy endpoint, or none
	// could be connected to.
	ReasonNoEndpoint = "no_endpoint"
	// ReasonNoCluster: a chain names a cluster the configuration lacks.
	ReasonNoCluster = "no_cluster"
)

// metrics are the sidecar's OpenTelemetry instruments, exported in
// Prometheus format like the gateway's; other components of the pod's
// proxy (the DNS proxy) record into the same provider, so /stats and
// /stats/prometheus merge them.
type metrics struct {
	registry *prometheus.Registry
	provider *sdkmetric.MeterProvider
	meter    metric.Meter

	accepted        metric.Int64Counter         // by listener
	active          metric.Int64UpDownCounter   // by listener
	refusals        metric.Int64Counter         // by listener, reason
	requests        metric.Int64Counter         // by listener, cluster, code
	connectFailures metric.Int64Counter         // by cluster
	received, sent  metric.Int64Counter         // bytes, by listener, cluster
	listenerAttrs   map[string]metric.AddOption // by listener

	// attrs caches one option per label combination, so the hot path
	// builds no attribute set.
	attrs sync.Map // attrKey → metric.MeasurementOption
}

type attrKey struct {
	kind                      attrKind
	listener, cluster, reason string
	code                      int
}

// attrKind says which labels an attrKey carries.
type attrKind uint8

const (
	kindRefusal attrKind = iota // listener, reason
	kindRequest                 // listener, cluster, code
	kindBytes                   // listener, cluster
	kindCluster                 // cluster
)

func newMetrics() (*metrics, error) {
	m := &metrics{registry: prometheus.NewRegistry()}
	m.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exporter, err := otelprom.New(otelprom.WithRegisterer(m.registry), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	m.provider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	m.meter = m.provider.Meter("github.com/isthmus-mesh/isthmus/pkg/sidecar")
	var errs [8]error
	m.accepted, errs[0] = m.meter.Int64Counter("isthmus_sidecar_connections",
		metric.WithDescription("Downstream connections accepted, by listener (outbound, inbound)."))
	m.active, errs[1] = m.meter.Int64UpDownCounter("isthmus_sidecar_connections_active",
		metric.WithDescription("Downstream connections open now, by listener."))
	m.refusals, errs[2] = m.meter.Int64Counter("isthmus_sidecar_refusals",
		metric.WithDescription("Downstream connections refused before reaching an upstream, by listener and reason."))
	m.requests, errs[3] = m.meter.Int64Counter("isthmus_sidecar_requests",
		metric.WithDescription("HTTP requests answered, by listener, upstream cluster (empty: no route) and response code."))
	m.connectFailures, errs[4] = m.meter.Int64Counter("isthmus_sidecar_upstream_connect_failures",
		metric.WithDescription("Failed attempts to connect to an upstream endpoint (TCP or TLS), by cluster."))
	m.received, errs[5] = m.meter.Int64Counter("isthmus_sidecar_received_bytes",
		metric.WithDescription("Bytes received from downstream and sent upstream (HTTP: request bodies), by listener and cluster."), metric.WithUnit("By"))
	m.sent, errs[6] = m.meter.Int64Counter("isthmus_sidecar_sent_bytes",
		metric.WithDescription("Bytes received from upstream and sent downstream (HTTP: response bodies), by listener and cluster."), metric.WithUnit("By"))
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	m.listenerAttrs = map[string]metric.AddOption{}
	for _, l := range []string{listenerOutbound, listenerInbound} {
		m.listenerAttrs[l] = metric.WithAttributeSet(attribute.NewSet(attribute.String("listener", l)))
	}
	return m, nil
}

// observe registers the gauges read at scrape time: the xDS client's
// counters when the source has them, and the SVID's expiry.
func (m *metrics) observe(src ConfigSource, svid x509svid.Source) error {
	expiry, err := m.meter.Float64ObservableGauge("isthmus_sidecar_svid_expiry_timestamp_seconds",
		metric.WithDescription("When the sidecar's current X.509 SVID expires (Unix seconds)."), metric.WithUnit("s"))
	if err != nil {
		return err
	}
	insts := []metric.Observable{expiry}
	type statser interface{ Stats() xdsclient.Stats }
	var connected, responses metric.Int64Observable
	stats, hasStats := src.(statser)
	if hasStats {
		if connected, err = m.meter.Int64ObservableGauge("isthmus_sidecar_xds_connected",
			metric.WithDescription("1 while the ADS stream to the federator is open.")); err != nil {
			return err
		}
		if responses, err = m.meter.Int64ObservableCounter("isthmus_sidecar_xds_responses",
			metric.WithDescription("xDS responses ACKed (accepted) and NACKed (rejected).")); err != nil {
			return err
		}
		insts = append(insts, connected, responses)
	}
	accepted := metric.WithAttributeSet(attribute.NewSet(attribute.String("result", "accepted")))
	rejected := metric.WithAttributeSet(attribute.NewSet(attribute.String("result", "rejected")))
	_, err = m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		if s, err := svid.GetX509SVID(); err == nil && len(s.Certificates) > 0 {
			o.ObserveFloat64(expiry, float64(s.Certificates[0].NotAfter.UnixNano())/float64(time.Second))
		}
		if hasStats {
			st := stats.Stats()
			c := int64(0)
			if st.Connected {
				c = 1
			}
			o.ObserveInt64(connected, c)
			o.ObserveInt64(responses, int64(st.Accepted), accepted)
			o.ObserveInt64(responses, int64(st.Rejected), rejected)
		}
		return nil
	}, insts...)
	return err
}

// attr is the cached option for one label combination.
func (m *metrics) attr(k attrKey) metric.MeasurementOption {
	if v, ok := m.attrs.Load(k); ok {
		return v.(metric.MeasurementOption)
	}
	var kvs []attribute.KeyValue
	switch k.kind {
	case kindRefusal:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener), attribute.String("reason", k.reason)}
	case kindRequest:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener), attribute.String("cluster", k.cluster),
			attribute.String("code", strconv.Itoa(k.code))}
	case kindBytes:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener), attribute.String("cluster", k.cluster)}
	case kindCluster:
		kvs = []attribute.KeyValue{attribute.String("cluster", k.cluster)}
	}
	opt := metric.WithAttributeSet(attribute.NewSet(kvs...))
	v, _ := m.attrs.LoadOrStore(k, opt)
	return v.(metric.MeasurementOption)
}

func (m *metrics) refuse(listener, reason string) {
	m.refusals.Add(context.Background(), 1, m.attr(attrKey{kind: kindRefusal, listener: listener, reason: reason}))
}

func (m *metrics) request(listener, cluster string, code int) {
	m.requests.Add(context.Background(), 1, m.attr(attrKey{kind: kindRequest, listener: listener, cluster: cluster, code: code}))
}

func (m *metrics) connectFailure(cluster string) {
	m.connectFailures.Add(context.Background(), 1, m.attr(attrKey{kind: kindCluster, cluster: cluster}))
}

// byteCounters are the received and sent counters of one listener and
// cluster, bound once.
type byteCounters struct {
	received, sent func(int64)
}

func (m *metrics) bytes(listener, cluster string) byteCounters {
	opt := m.attr(attrKey{kind: kindBytes, listener: listener, cluster: cluster})
	return byteCounters{
		received: func(n int64) { m.received.Add(context.Background(), n, opt) },
		sent:     func(n int64) { m.sent.Add(context.Background(), n, opt) },
	}
}
