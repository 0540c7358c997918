package sidecar

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
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
	// ReasonHandshake: an inbound caller that does not speak TLS (where
	// the listener has no plaintext chain), sent no client certificate,
	// or one that does not verify against the bundle of its trust
	// domain, or sent nothing before the handshake timeout (on a
	// listener with plaintext chains too: a server-first protocol); or
	// an upstream's TLS failed.
	ReasonHandshake = "handshake"
	// ReasonNoChain: an inbound ClientHello no filter chain matches, or
	// a plaintext inbound connection to a port without a raw_buffer
	// chain (STRICT); or an open inbound TCP connection a new
	// configuration has no TCP chain of its transport for, closed.
	ReasonNoChain = "no_chain"
	// ReasonNoOriginalDst: an inbound connection that was not redirected
	// (its destination is the inbound listener itself), or whose original
	// destination could not be read.
	ReasonNoOriginalDst = "no_original_dst"
	// ReasonLoop: outbound passthrough to the sidecar's own outbound
	// listener, or an inbound connection to the pod's outbound port.
	ReasonLoop = "loop"
	// ReasonNotLocal: a connection to the outbound listener that
	// iptables did not redirect, from outside the pod: explicit mode is
	// for the pod's own processes, and anyone else would be sending
	// requests into the mesh with this workload's identity.
	ReasonNotLocal = "not_local"
	// ReasonNoEndpoint: a tcp_proxy found no healthy endpoint, or none
	// could be connected to.
	ReasonNoEndpoint = "no_endpoint"
	// ReasonNoCluster: a chain names a cluster the configuration lacks.
	ReasonNoCluster = "no_cluster"
	// ReasonRBAC: an inbound connection its chain's RBAC filters deny
	// (envoy.filters.network.rbac), closed after the TLS handshake,
	// before a byte reaches the app, or, open, by the filters of a new
	// configuration's chain for it; or an inbound HTTP request its
	// connection manager's RBAC filters deny (envoy.filters.http.rbac),
	// answered 403 "RBAC: access denied" before anything of it reaches
	// the app, the connection kept. Counted once per connection or
	// request.
	ReasonRBAC = "rbac"
)

// metrics are the sidecar's OpenTelemetry instruments, exported in
// Prometheus format like the gateway's; other components of the pod's
// proxy (the DNS proxy) record into the same provider, so /stats and
// /stats/prometheus merge them.
//
// The counts the data path makes (connections, requests, bytes) are
// kept as Envoy keeps its stats: one atomic counter per label set
// (counter), added to in a few nanoseconds and read by the
// instruments' callback at scrape time. An OpenTelemetry Add costs
// 120–210 ns and an allocation (BenchmarkCounterAdd), several times a
// request on each sidecar.
type metrics struct {
	registry *prometheus.Registry
	provider *sdkmetric.MeterProvider
	meter    metric.Meter

	insts [numInstruments]metric.Int64Observable
	// counters holds every counter made, by instrument and labels.
	counters sync.Map // counterKey → *counter
	// accepted and active are the per-listener counters, by
	// listenerIndex.
	accepted, active [2]*counter
}

// instrument is one of the sidecar's counting instruments.
type instrument uint8

const (
	instAccepted        instrument = iota // connections, by listener
	instActive                            // connections open now, by listener (goes up and down)
	instRefusals                          // by listener, reason
	instRequests                          // by listener, cluster, code
	instConnectFailures                   // by cluster
	instReceived                          // bytes, by listener, cluster
	instSent                              // bytes, by listener, cluster
	numInstruments
)

// counter is the count of one instrument for one label set.
type counter struct {
	n    atomic.Int64
	inst metric.Int64Observable
	opt  metric.ObserveOption
}

func (c *counter) add(n int64) { c.n.Add(n) }

type counterKey struct {
	inst instrument
	attrKey
}

type attrKey struct {
	listener, cluster, reason string
	code                      int
}

// seriesLimit is the most series one instrument keeps. OpenTelemetry's
// default, 2,000, counted every cluster past the 1,999th under one
// otel_metric_overflow="true" series; the cluster labels come from
// the xDS configuration, which holds tens of thousands of services at the
// scale Isthmus is built for. A limit still bounds memory when services
// churn, since a series, once made, is kept.
const seriesLimit = 100_000

func newMetrics() (*metrics, error) {
	m := &metrics{registry: prometheus.NewRegistry()}
	m.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exporter, err := otelprom.New(otelprom.WithRegisterer(m.registry), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	m.provider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter), sdkmetric.WithCardinalityLimit(seriesLimit))
	m.meter = m.provider.Meter("github.com/isthmus-mesh/isthmus/pkg/sidecar")
	var errs [numInstruments]error
	m.insts[instAccepted], errs[0] = m.meter.Int64ObservableCounter("isthmus_sidecar_connections",
		metric.WithDescription("Downstream connections accepted, by listener (outbound, inbound)."))
	m.insts[instActive], errs[1] = m.meter.Int64ObservableUpDownCounter("isthmus_sidecar_connections_active",
		metric.WithDescription("Downstream connections open now, by listener."))
	m.insts[instRefusals], errs[2] = m.meter.Int64ObservableCounter("isthmus_sidecar_refusals",
		metric.WithDescription("Downstream connections (reason rbac: also HTTP requests) refused before reaching an upstream, by listener and reason."))
	m.insts[instRequests], errs[3] = m.meter.Int64ObservableCounter("isthmus_sidecar_requests",
		metric.WithDescription("HTTP requests answered, by listener, upstream cluster (empty: no route) and response code."))
	m.insts[instConnectFailures], errs[4] = m.meter.Int64ObservableCounter("isthmus_sidecar_upstream_connect_failures",
		metric.WithDescription("Failed attempts to connect to an upstream endpoint (TCP or TLS), by cluster."))
	m.insts[instReceived], errs[5] = m.meter.Int64ObservableCounter("isthmus_sidecar_received_bytes",
		metric.WithDescription("Bytes received from downstream and sent upstream (HTTP: request bodies), by listener and cluster."), metric.WithUnit("By"))
	m.insts[instSent], errs[6] = m.meter.Int64ObservableCounter("isthmus_sidecar_sent_bytes",
		metric.WithDescription("Bytes received from upstream and sent downstream (HTTP: response bodies), by listener and cluster."), metric.WithUnit("By"))
	if err := errors.Join(errs[:]...); err != nil {
		return nil, err
	}
	insts := make([]metric.Observable, len(m.insts))
	for i, inst := range m.insts {
		insts[i] = inst
	}
	if _, err := m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		m.counters.Range(func(_, v any) bool {
			c := v.(*counter)
			o.ObserveInt64(c.inst, c.n.Load(), c.opt)
			return true
		})
		return nil
	}, insts...); err != nil {
		return nil, err
	}
	for i, l := range []string{listenerOutbound, listenerInbound} {
		m.accepted[i] = m.counter(instAccepted, attrKey{listener: l})
		m.active[i] = m.counter(instActive, attrKey{listener: l})
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

// counter is inst's counter for the labels k, made on first use.
func (m *metrics) counter(inst instrument, k attrKey) *counter {
	key := counterKey{inst, k}
	if v, ok := m.counters.Load(key); ok {
		return v.(*counter)
	}
	var kvs []attribute.KeyValue
	switch inst {
	case instAccepted, instActive:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener)}
	case instRefusals:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener), attribute.String("reason", k.reason)}
	case instRequests:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener), attribute.String("cluster", k.cluster),
			attribute.String("code", strconv.Itoa(k.code))}
	case instReceived, instSent:
		kvs = []attribute.KeyValue{attribute.String("listener", k.listener), attribute.String("cluster", k.cluster)}
	case instConnectFailures:
		kvs = []attribute.KeyValue{attribute.String("cluster", k.cluster)}
	}
	c := &counter{inst: m.insts[inst], opt: metric.WithAttributeSet(attribute.NewSet(kvs...))}
	v, _ := m.counters.LoadOrStore(key, c)
	return v.(*counter)
}

func (m *metrics) refuse(listener, reason string) {
	m.counter(instRefusals, attrKey{listener: listener, reason: reason}).add(1)
}

// requestCounter counts a listener's requests to cluster answered code.
func (m *metrics) requestCounter(listener, cluster string, code int) *counter {
	return m.counter(instRequests, attrKey{listener: listener, cluster: cluster, code: code})
}

func (m *metrics) request(listener, cluster string, code int) {
	m.requestCounter(listener, cluster, code).add(1)
}

func (m *metrics) connectFailure(cluster string) {
	m.counter(instConnectFailures, attrKey{cluster: cluster}).add(1)
}

// byteCounters are the received and sent counters of one listener and
// cluster.
type byteCounters struct {
	received, sent *counter
}

func (m *metrics) bytes(listener, cluster string) byteCounters {
	k := attrKey{listener: listener, cluster: cluster}
	return byteCounters{received: m.counter(instReceived, k), sent: m.counter(instSent, k)}
}
