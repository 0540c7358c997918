package sidecar

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

func httpGet(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// Before its first configuration the sidecar is not ready and refuses
// connections; after it, /config_dump shows what it runs on, with the
// versions, and the metrics merge the xDS client's.
func TestAdminAndHealth(t *testing.T) {
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(echoSvc, dbSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	admin := "http://" + m.a.proxy.AdminAddr().String()
	health := "http://" + m.a.proxy.HealthAddr().String()

	code, body := httpGet(t, health+"/healthz/ready")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "no xDS configuration yet")
	code, body = httpGet(t, admin+"/ready")
	require.Equal(t, http.StatusServiceUnavailable, code)
	require.Contains(t, body, "PRE_INITIALIZING")
	c, err := m.a.nat.dial(t.Context(), "echo.demo.svc.clusterset.local:80")
	require.NoError(t, err)
	_ = c.SetDeadline(time.Now().Add(waitFor))
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err, "no configuration: the connection is closed")
	c.Close()

	m.set(t, "v1", m.onB(echoSvc, ipHTTP), m.onB(dbSvc, ipTCP))
	code, _ = httpGet(t, health+"/healthz/ready")
	require.Equal(t, http.StatusOK, code)
	code, body = httpGet(t, admin+"/ready")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "LIVE\n", body)

	code, body = httpGet(t, admin+"/config_dump")
	require.Equal(t, http.StatusOK, code)
	var dump configDump
	require.NoError(t, json.Unmarshal([]byte(body), &dump), body)
	require.Equal(t, "v1", dump.Versions[resource.ListenerType])
	require.Equal(t, "v1", dump.Versions[resource.SecretType])
	require.NotNil(t, dump.XDS)
	require.True(t, dump.XDS.Connected)
	require.Equal(t, m.a.id.String(), dump.SVID.ID)
	require.Len(t, dump.Listeners, 2)
	var names []string
	for _, c := range dump.Clusters {
		names = append(names, c.Name)
		if c.Name == echoSvc.cluster(80) {
			require.Equal(t, []string{m.b.id.String()}, c.TLS.SANs)
			require.Equal(t, "outbound_.80_._.echo.demo.svc.cluster.local", c.TLS.SNI)
			require.Equal(t, m.b.endpoint(ipHTTP).String(), c.Priorities[0][0].Endpoints[0].Address)
		}
	}
	require.Equal(t, []string{xdsclient.PassthroughCluster, xdsclient.InboundPassthroughCluster, dbSvc.cluster(5432), echoSvc.cluster(80)}, names)
	require.Len(t, dump.TrustDomains, 2)
	require.Equal(t, "alpha.mesh", dump.TrustDomains[0].Name)
	require.Equal(t, "240.240.0.10", dump.Names["echo.demo.svc.clusterset.local"])

	code, stats := httpGet(t, admin+"/stats")
	require.Equal(t, http.StatusOK, code)
	require.EqualValues(t, 1, metricValue(t, stats, "isthmus_sidecar_xds_connected"))
	require.Positive(t, metricValue(t, stats, "isthmus_sidecar_xds_responses_total", "result=accepted"))
	require.Positive(t, metricValue(t, stats, "isthmus_sidecar_svid_expiry_timestamp_seconds"))
	require.EqualValues(t, 1, metricValue(t, stats, "isthmus_sidecar_refusals_total", "listener=outbound", "reason=no_config"))
}

// A configuration the sidecar cannot use (here, a gateway's) is refused
// and the last good one keeps serving; a bad xDS response is NACKed by
// the client and traffic goes on as before.
func TestBadConfigKeepsTheLastOne(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	code, reply, body := m.a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "b", reply.Pod)

	// A response the client refuses: a partial wildcard domain.
	bad := snapshot(t, "v2", []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP))
	rc := bad.GetResources(resource.RouteType)["80"]
	require.NotNil(t, rc)
	badRoutes := rc.(*routev3.RouteConfiguration)
	badRoutes.VirtualHosts[0].Domains = append(badRoutes.VirtualHosts[0].Domains, "*.demo.svc.clusterset.local")
	m.xds.set(t, bad)
	client := m.a.proxy.src.(*xdsclient.Client)
	require.Eventually(t, func() bool { return client.Stats().Rejected > 0 }, waitFor, 10*time.Millisecond)
	require.Contains(t, client.Stats().LastNACK, "*.demo.svc.clusterset.local")
	code, reply, body = m.a.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "b", reply.Pod)

	// A configuration without the sidecar's part, handed straight to
	// the proxy: refused by Check, the last one stays.
	src := newStaticSource(decoded(t, snapshot(t, "v1", []*testCA{m.alpha, m.beta}, m.onB(echoSvc, ipHTTP))))
	c := startPod(t, "c", m.alpha, m.hosts, podOptions{source: src})
	c.waitReady(t, "")
	first := c.proxy.state.Load()
	src.set(&xdsclient.Config{Clusters: map[string]xdsclient.Cluster{}})
	src.set(&xdsclient.Config{Clusters: map[string]xdsclient.Cluster{}, Sidecar: &xdsclient.Sidecar{}})
	time.Sleep(50 * time.Millisecond)
	require.Same(t, first, c.proxy.state.Load())
	code, reply, body = c.get(t, false, "http://echo.demo.svc.clusterset.local/", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "b", reply.Pod)
}

func TestCheck(t *testing.T) {
	ca := newTestCA(t, "alpha.mesh")
	good := decoded(t, snapshot(t, "v1", []*testCA{ca}, echoSvc))
	require.NoError(t, Check(good))
	require.ErrorContains(t, Check(nil), "no sidecar listeners")
	require.ErrorContains(t, Check(&xdsclient.Config{}), "no sidecar listeners")

	plain := *good
	plain.Clusters = map[string]xdsclient.Cluster{}
	for k, v := range good.Clusters {
		if v.Type == xdsclient.EDS {
			v.TLS = nil
		}
		plain.Clusters[k] = v
	}
	require.ErrorContains(t, Check(&plain), "only mTLS")
}

func TestConfigValidate(t *testing.T) {
	require.NoError(t, DefaultConfig().Validate())
	var c Config
	err := c.Validate()
	require.Error(t, err)
	for _, want := range []string{"outbound address", "inbound address", "app address", "handshake timeout", "read header timeout",
		"HTTP idle timeout", "stream idle timeout", "upstream idle timeout", "ejection time", "drain timeout", "max connections",
		"max idle per endpoint", "max connect attempts"} {
		require.ErrorContains(t, err, want)
	}
	c = DefaultConfig()
	c.AdminAddr = "nonsense"
	require.ErrorContains(t, c.Validate(), "admin address")
}

// After Run returns, nothing the sidecar started is still running: no
// listener, connection, relay, pool or watch goroutine.
func TestRunLeavesNoGoroutine(t *testing.T) {
	m := startMesh(t)
	m.standard(t)
	for _, h2 := range []bool{false, true} {
		code, _, body := m.a.get(t, h2, "http://echo.demo.svc.clusterset.local/", nil)
		require.Equal(t, http.StatusOK, code, body)
	}
	c, err := m.a.nat.dial(t.Context(), "db.demo.svc.clusterset.local:5432")
	require.NoError(t, err)
	_, err = c.Write([]byte("x"))
	require.NoError(t, err)
	_ = c.SetDeadline(time.Now().Add(waitFor))
	_, err = c.Read(make([]byte, 1))
	require.NoError(t, err)
	c.Close()
	m.a.stop(t)
	m.b.stop(t)

	product := []string{"sidecar.(*Proxy)", "sidecar.(*pool)", "sidecar.(*connQueue)", "internal/relay.", "sidecar.newIdleWatch",
		"net/http.(*persistConn)", "net/http.(*http2ClientConn)", "net/http.(*http2serverConn)"}
	require.Eventually(t, func() bool {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		for _, g := range strings.Split(stacks, "\n\n") {
			for _, p := range product {
				if strings.Contains(g, p) {
					t.Logf("still running:\n%s", g)
					return false
				}
			}
		}
		return true
	}, 5*time.Second, 100*time.Millisecond)
}

// Connections beyond MaxConnections are reset before a byte is read.
func TestConnectionLimit(t *testing.T) {
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(dbSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: func(c *Config) { c.MaxConnections = 1 }})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	m.set(t, "v1", m.onB(dbSvc, ipTCP))
	first, err := m.a.nat.dial(t.Context(), "db.demo.svc.clusterset.local:5432")
	require.NoError(t, err)
	defer first.Close()
	_ = first.SetDeadline(time.Now().Add(waitFor))
	_, err = first.Write([]byte("1"))
	require.NoError(t, err)
	_, err = first.Read(make([]byte, 1))
	require.NoError(t, err)

	// The reset may reach the caller while its dial completes (the test's
	// dialer then fails) or at its first read.
	second, err := m.a.nat.dial(t.Context(), "db.demo.svc.clusterset.local:5432")
	if err == nil {
		defer second.Close()
		_ = second.SetDeadline(time.Now().Add(waitFor))
		_, err = second.Read(make([]byte, 1))
	}
	require.ErrorContains(t, err, "reset", "reset, not read")
	require.EqualValues(t, 1, metricValue(t, m.a.scrape(t), "isthmus_sidecar_refusals_total", "listener=outbound", "reason=over_limit"))
}

// The health server holds at most opsMaxConns connections: a flood of
// idle ones waits in the backlog instead of taking the sidecar's file
// descriptors, and a probe behind them is answered once one ends.
func TestHealthConnectionsAreCapped(t *testing.T) {
	const maxConns = 3
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), xds: startXDSServer(t), hosts: hostsOf(echoSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, prep: func(p *Proxy) { p.opsMaxConns = maxConns }})
	addr := m.a.proxy.HealthAddr().String()
	var idle []net.Conn
	for range maxConns {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		defer c.Close()
		idle = append(idle, c)
	}
	probe, err := net.Dial("tcp", addr)
	require.NoError(t, err, "the kernel still accepts into the backlog")
	defer probe.Close()
	_, err = io.WriteString(probe, "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	require.NoError(t, err)
	// Not served while the others hold every place (a broken cap would
	// answer within this wait; a working one never does).
	_ = probe.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = probe.Read(make([]byte, 1))
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "the probe was served beyond the cap: %v", err)

	require.NoError(t, idle[0].Close())
	_ = probe.SetReadDeadline(time.Now().Add(waitFor))
	resp, err := http.ReadResponse(bufio.NewReader(probe), nil)
	require.NoError(t, err, "served once a place was free")
	_ = resp.Body.Close()
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "no xDS configuration yet")
}
