package sidecar

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// scrapeMetrics is m's Prometheus exposition, as /stats/prometheus
// serves it.
func scrapeMetrics(t *testing.T, m *metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	require.Equal(t, 200, rec.Code)
	return rec.Body.String()
}

// TestMetricsCounters: the atomic counters come out of a scrape as the
// instruments they stand for, with their labels, counted from many
// goroutines at once.
func TestMetricsCounters(t *testing.T) {
	m, err := newMetrics()
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.provider.Shutdown(context.Background()) })

	const workers, each = 8, 1000
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				m.request(listenerOutbound, "outbound|80||echo", 200)
				bc := m.bytes(listenerOutbound, "outbound|80||echo")
				bc.received.add(3)
				bc.sent.add(5)
			}
		})
	}
	wg.Wait()
	m.request(listenerInbound, "inbound-passthrough", 503)
	m.refuse(listenerInbound, ReasonHandshake)
	m.connectFailure("outbound|80||echo")
	m.accepted[listenerIndex(listenerInbound)].add(2)
	m.active[listenerIndex(listenerInbound)].add(2)
	m.active[listenerIndex(listenerInbound)].add(-1)

	text := scrapeMetrics(t, m)
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"isthmus_sidecar_requests_total", []string{"listener=outbound", "cluster=outbound|80||echo", "code=200"}, workers * each},
		{"isthmus_sidecar_requests_total", []string{"listener=inbound", "cluster=inbound-passthrough", "code=503"}, 1},
		{"isthmus_sidecar_received_bytes_total", []string{"listener=outbound", "cluster=outbound|80||echo"}, 3 * workers * each},
		{"isthmus_sidecar_sent_bytes_total", []string{"listener=outbound", "cluster=outbound|80||echo"}, 5 * workers * each},
		{"isthmus_sidecar_refusals_total", []string{"listener=inbound", "reason=handshake"}, 1},
		{"isthmus_sidecar_upstream_connect_failures_total", []string{"cluster=outbound|80||echo"}, 1},
		{"isthmus_sidecar_connections_total", []string{"listener=inbound"}, 2},
		{"isthmus_sidecar_connections_total", []string{"listener=outbound"}, 0},
		{"isthmus_sidecar_connections_active", []string{"listener=inbound"}, 1},
	} {
		require.Equal(t, want.value, metricValue(t, text, want.name, want.labels...), "%s %v", want.name, want.labels)
	}
	// Counters are counters, and the open connections a gauge, as the
	// synchronous instruments were.
	require.Contains(t, text, "# TYPE isthmus_sidecar_requests_total counter")
	require.Contains(t, text, "# TYPE isthmus_sidecar_received_bytes_total counter")
	require.Contains(t, text, "# TYPE isthmus_sidecar_connections_active gauge")
	// No label of another instrument leaks into a series.
	for line := range strings.SplitSeq(text, "\n") {
		if strings.HasPrefix(line, "isthmus_sidecar_connections_total{") {
			require.NotContains(t, line, "cluster=", line)
		}
	}
}

// BenchmarkCounterAdd is one count on the data path, the sidecar's
// atomic counter against the OpenTelemetry synchronous counter it
// replaced (both from every P at once).
func BenchmarkCounterAdd(b *testing.B) {
	m, err := newMetrics()
	require.NoError(b, err)
	b.Run("counter", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				m.request(listenerOutbound, "outbound|80||echo.demo.svc.cluster.local", 200)
			}
		})
	})
	b.Run("otel-peer", func(b *testing.B) {
		c, err := m.meter.Int64Counter("isthmus_sidecar_bench_requests")
		require.NoError(b, err)
		opt := metric.WithAttributeSet(attribute.NewSet(attribute.String("listener", listenerOutbound),
			attribute.String("cluster", "outbound|80||echo.demo.svc.cluster.local"), attribute.String("code", "200")))
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c.Add(context.Background(), 1, opt)
			}
		})
	})
}

// Every upstream cluster keeps a series of its own well past
// OpenTelemetry's default limit of 2,000 per instrument, past which they
// were all counted as one otel_metric_overflow series.
func TestMetricsKeepASeriesPerCluster(t *testing.T) {
	m, err := newMetrics()
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.provider.Shutdown(context.Background()) })
	const clusters = 2500
	for i := range clusters {
		m.request(listenerOutbound, fmt.Sprintf("outbound|80||svc%d.demo.svc.cluster.local", i), 200)
	}
	body := scrapeMetrics(t, m)
	require.False(t, strings.Contains(body, "otel_metric_overflow"), "clusters counted as one overflow series")
	require.Equal(t, clusters, strings.Count(body, "\nisthmus_sidecar_requests_total{"))
}
