package xds

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// gauge is the last value of an integer gauge; ok is false while it has
// none.
func (f *fixture) gauge(name string) (v int64, ok bool) {
	f.t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(f.t, f.metrics.Collect(context.Background(), &rm))
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			g, isGauge := m.Data.(metricdata.Gauge[int64])
			require.True(f.t, isGauge, "%s is not an int64 gauge", name)
			for _, dp := range g.DataPoints {
				v, ok = dp.Value, true
			}
		}
	}
	return v, ok
}

// A restarted federator holds only its local exports until the peers
// resync. Its sidecars are served nothing until every peer's imports are
// known (they keep the configuration they had, clusterset names and
// remote endpoints included), then the whole of it; the gateway, which
// serves local exports only, never waits.
func TestSidecarsWaitForEveryPeersImports(t *testing.T) {
	var synced atomic.Bool
	f := newFixture(t, Options{
		Sidecar:     SidecarOptions{Region: "r1"},
		PeersSynced: synced.Load,
		// Far beyond the test: only PeersSynced ends this wait.
		PeersSyncTimeout: time.Hour,
	})
	local := f.setCatalog(localEcho())
	f.waitTranslated(local.Version())

	// The gateway is served its exports at once.
	gw := openADS(t, f.dialPlain(), gatewayNode)
	gw.subscribe()
	gw.syncTo(translated(t, localEcho()))
	require.Contains(t, gw.snis(), echo80)

	// A sidecar connecting now is served nothing, not even the local
	// services, and no ROOTCA: anything would replace what it holds.
	sc := openSidecarADS(t, f.dialTLS(svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))))
	sc.nothing("local exports only, no peer synced")
	st := f.srv.Status()
	require.Empty(t, st.Sidecar.Version)
	require.Empty(t, st.Sidecar.SecretsVersion)
	require.False(t, st.Sidecar.WaitingForPeersUntil.IsZero(), "the status says the sidecars wait")
	require.NotEmpty(t, st.Gateway.Version)
	waiting, ok := f.gauge("isthmus_xds_sidecars_waiting_for_peers")
	require.True(t, ok)
	require.Equal(t, int64(1), waiting)

	// One peer's imports arrive, another's not yet: still nothing.
	peerB := map[string][]catalog.Service{"b": {peerEcho("b", catalog.Locality{Region: "r1", Zone: "z2"}, 2, 0, gwB)}}
	f.store.Set(peerSnapshot(t, "b", peerB["b"]...))
	sc.nothing("b synced, not every peer")
	gw.nothing("an import does not concern the gateway")

	// Every peer has spoken (c exports nothing here, which changes no
	// catalog: the server notices by asking): served whole at once.
	synced.Store(true)
	want := sidecarTranslated(t, []catalog.Service{localEcho()}, peerB)
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == want.Version }, wait, 5*time.Millisecond)
	secrets := f.srv.Status().Sidecar.SecretsVersion
	require.NotEmpty(t, secrets)
	sc.syncTo(want, secrets)
	require.Equal(t, []string{
		"p0 r1/z1 w1: 10.0.1.2:8080 HEALTHY 10.0.1.3:8080 UNHEALTHY",
		"p1 r1/z2 w2: 192.0.2.10:15443 HEALTHY",
	}, sc.describe("outbound|80||"+echoHost), "the first configuration holds b's gateway")
	require.Contains(t, sc.secrets, RootCASecretName)

	st = f.srv.Status()
	require.True(t, st.Sidecar.WaitingForPeersUntil.IsZero())
	waiting, ok = f.gauge("isthmus_xds_sidecars_waiting_for_peers")
	require.True(t, ok)
	require.Equal(t, int64(0), waiting)
	require.Zero(t, f.metric("isthmus_xds_peer_sync_timeouts"))
	require.Contains(t, f.logs.String(), "every peer's imports are known: serving the sidecars")

	// The wait is over for good: a peer lost now is the federation's
	// business (keepFor), and changes flow to the sidecars as before.
	synced.Store(false)
	f.store.Delete("b")
	alone := sidecarTranslated(t, []catalog.Service{localEcho()}, nil)
	sc.syncTo(alone, secrets)
}

// A peer that never comes back holds the sidecars back only until the
// bound: then they are served what is known, and the log and
// isthmus_xds_peer_sync_timeouts say so.
func TestSidecarsWaitForPeersAtMostTheBound(t *testing.T) {
	const bound = 2 * time.Second
	start := time.Now()
	f := newFixture(t, Options{
		Sidecar:          SidecarOptions{Region: "r1"},
		PeersSynced:      func() bool { return false },
		PeersSyncTimeout: bound,
	})
	f.setCatalog(localEcho())
	gw := openADS(t, f.dialPlain(), gatewayNode)
	gw.subscribe()
	gw.syncTo(translated(t, localEcho()))
	sc := openSidecarADS(t, f.dialTLS(svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))))
	// The catalog does not change again: the bound alone ends the wait.
	want := sidecarTranslated(t, []catalog.Service{localEcho()}, nil)
	require.Eventually(t, func() bool { return f.srv.Status().Sidecar.Version == want.Version }, bound+wait, 5*time.Millisecond)
	require.GreaterOrEqual(t, time.Since(start), bound, "served before the bound")
	sc.syncTo(want, f.srv.Status().Sidecar.SecretsVersion)
	require.Contains(t, sc.listeners, "outbound")

	require.Equal(t, int64(1), f.metric("isthmus_xds_peer_sync_timeouts"))
	waiting, ok := f.gauge("isthmus_xds_sidecars_waiting_for_peers")
	require.True(t, ok, "the gauge reports the wait's end")
	require.Equal(t, int64(0), waiting)
	logs := f.logs.String()
	require.Contains(t, logs, "level=WARN")
	require.True(t, strings.Contains(logs, "not every peer's imports are known: serving the sidecars what is known"), "no warning in:\n%s", logs)
	require.True(t, f.srv.Status().Sidecar.WaitingForPeersUntil.IsZero())
	// The gateway was never held back.
	require.Equal(t, translated(t, localEcho()).ListenersVersion, gw.versions[resource.ListenerType])
}
