package sidecar

import (
	"context"
	"crypto/x509"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/isthmus-mesh/isthmus/internal/fedtest"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// federatorSnapshot is what the federator serves for these catalogs: its
// own translation (pkg/xds), trusting cas.
func federatorSnapshot(tb testing.TB, local *catalog.Snapshot, peers []*catalog.Snapshot, cas ...*testCA) *cache.Snapshot {
	tb.Helper()
	var bundles []*x509bundle.Bundle
	for _, ca := range cas {
		bundles = append(bundles, x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert}))
	}
	snap, err := fedtest.SidecarSnapshot(local, peers, xds.SidecarOptions{Region: "r1"}, bundles...)
	require.NoError(tb, err)
	return snap
}

// The federator's own translation, through the real xDS client, drives
// the proxy as the contract says: a local export reached by its VIP and
// by name in explicit mode, HTTP, gRPC and TCP ports told apart by the
// translation's port protocols (HTTP/1.1 upstream on a port declared
// http, whatever the app spoke), and a peer's export behind the local
// pods (priority 1) taking over when they are not ready.
func TestWithTheFederatorsTranslation(t *testing.T) {
	alpha, beta := newTestCA(t, "alpha.mesh"), newTestCA(t, "beta.mesh")
	srv := startXDSServer(t)
	hosts := map[string]netip.Addr{}
	a := startPod(t, "a", alpha, hosts, podOptions{xds: srv})
	b := startPod(t, "b", alpha, hosts, podOptions{xds: srv})
	c := startPod(t, "c", beta, hosts, podOptions{xds: srv})
	bPort := int32(b.endpoint(ipHTTP).Port())

	localSvc := func(name string, ip netip.Addr, port catalog.Port, ready bool) catalog.Service {
		port.TargetPort = bPort
		le := catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Addresses: []catalog.Address{{IP: ip.String(), Ready: ready}}}
		if ready {
			le.Ready = 1
		} else {
			le.NotReady = 1
		}
		return catalog.Service{Namespace: "demo", Name: name, Cluster: "alpha", Ports: []catalog.Port{port},
			Endpoints: []catalog.LocalityEndpoints{le}, Identities: []string{b.id.String()}}
	}
	peer := func() *catalog.Snapshot {
		s, err := catalog.NewSnapshot("beta", []catalog.Service{{Namespace: "demo", Name: "echo", Cluster: "beta",
			Ports:      []catalog.Port{{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP}},
			Endpoints:  []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z9"}, Ready: 1}},
			Identities: []string{c.id.String()},
			// The peer's gateway passes TLS through by SNI to the pod's
			// sidecar: here, straight to c's.
			Gateways: []string{c.endpoint(ipHTTP).String()},
		}})
		require.NoError(t, err)
		return s
	}()
	publish := func(echoReady bool) string {
		local, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{
			localSvc("echo", ipHTTP, catalog.Port{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP}, echoReady),
			localSvc("greeter", ipGRPC, catalog.Port{Name: "rpc", Port: 9090, Protocol: catalog.ProtocolTCP, AppProtocol: "grpc"}, true),
			localSvc("db", ipTCP, catalog.Port{Name: "tcp-postgres", Port: 5432, Protocol: catalog.ProtocolTCP}, true),
		})
		require.NoError(t, err)
		snap := federatorSnapshot(t, local, []*catalog.Snapshot{peer}, alpha, beta)
		srv.set(t, snap)
		v := snap.GetVersion(resource.EndpointType)
		for _, p := range []*pod{a, b, c} {
			p.waitReady(t, v)
		}
		return v
	}
	publish(true)
	// The DNS proxy's table, as the app would resolve the names.
	for _, name := range []string{"echo", "greeter", "db"} {
		host := name + ".demo.svc.clusterset.local"
		vip, ok := a.proxy.state.Load().cfg.Sidecar.LookupHost(host)
		require.True(t, ok, host)
		a.nat.hosts[host] = vip
	}

	code, reply, body := a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "b", reply.Pod, "the local pod, priority 0")
	// echo's port is declared http: the app's h2c reaches b as HTTP/1.1,
	// as with Istio.
	code, reply, body = a.get(t, true, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "HTTP/1.1", reply.Proto)

	req, err := http.NewRequest(http.MethodGet, "http://"+a.proxy.OutboundAddr().String()+"/explicit", nil)
	require.NoError(t, err)
	req.Host = "echo.demo.svc.clusterset.local"
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, "explicit mode by name")

	conn, err := grpc.NewClient("passthrough:///greeter.demo.svc.clusterset.local:9090",
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(a.nat.dial))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	hc, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, hc.GetStatus())

	tcp, err := a.nat.dial(ctx, "db.demo.svc.clusterset.local:5432")
	require.NoError(t, err)
	defer tcp.Close()
	_ = tcp.SetDeadline(time.Now().Add(waitFor))
	_, err = tcp.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = tcp.Read(buf)
	require.NoError(t, err)
	require.Equal(t, "ping", string(buf))

	// The local pod is not ready: the peer's export (through its
	// gateway, verified as beta's identity) takes the traffic.
	publish(false)
	code, reply, body = a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "c", reply.Pod, "priority 1, the peer")
}
