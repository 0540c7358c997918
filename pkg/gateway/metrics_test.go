package gateway

import (
	"context"
	"fmt"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/stretchr/testify/require"
)

// Every cluster keeps a series of its own well past OpenTelemetry's
// default limit of 2,000 per instrument, past which they were all
// counted as one otel_metric_overflow series.
func TestMetricsKeepASeriesPerCluster(t *testing.T) {
	const clusters = 2500
	var routes []Route
	for i := range clusters {
		routes = append(routes, route(fmt.Sprintf("outbound_.80_._.svc%d.demo.svc.cluster.local", i),
			fmt.Sprintf("outbound|80||svc%d.demo.svc.cluster.local", i), netip.MustParseAddrPort("127.0.0.1:1")))
	}
	table := NewRouteTable(mustRoutes(t, routes...))
	m, err := newMetrics(table)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.provider.Shutdown(context.Background()) })
	for _, r := range routes {
		c := table.Routes().lookup(r.SNI)
		m.routed.Add(context.Background(), 1, c.attrs)
		m.bytesOf(c).received.Add(10)
	}

	rec := httptest.NewRecorder()
	promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	body := rec.Body.String()
	require.False(t, strings.Contains(body, "otel_metric_overflow"), "clusters counted as one overflow series")
	for _, name := range []string{"isthmus_gateway_routed_connections_total{", "isthmus_gateway_received_bytes_total{"} {
		require.Equal(t, clusters, strings.Count(body, "\n"+name), name)
	}
}
