package gateway

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/testlog"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
)

// testLogger writes to t.Logf.
func testLogger(t testing.TB) *slog.Logger { return testlog.New(t) }

// testCA is one trust domain's root, issuing X.509 SVIDs.
type testCA struct {
	td     spiffeid.TrustDomain
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	bundle *x509bundle.Bundle
}

func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	trustDomain := spiffeid.RequireTrustDomainFromString(td)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{td}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trustDomain.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{td: trustDomain, cert: cert, key: key, bundle: x509bundle.FromX509Authorities(trustDomain, []*x509.Certificate{cert})}
}

func (ca *testCA) id(path string) spiffeid.ID {
	return spiffeid.RequireFromPath(ca.td, path)
}

func (ca *testCA) svid(t testing.TB, path string) *x509svid.SVID {
	t.Helper()
	id := ca.id(path)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

// harness runs one Gateway on loopback.
type harness struct {
	t     testing.TB
	gw    *Gateway
	table *RouteTable

	cancel   context.CancelFunc
	done     chan error
	stopOnce sync.Once
	stopErr  error
	stopped  atomic.Bool // Run returned
}

func startGateway(t testing.TB, routes *Routes, mod func(*Config)) *harness {
	t.Helper()
	table := NewRouteTable(routes)
	return startGatewayOn(t, table, table, mod, nil)
}

// startGatewayOn runs a Gateway fed by src, whose table is table; prep,
// if not nil, may change the Gateway before Run.
func startGatewayOn(t testing.TB, src RouteSource, table *RouteTable, mod func(*Config), prep func(*Gateway)) *harness {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.HealthAddr = "127.0.0.1:0"
	cfg.MetricsAddr = "127.0.0.1:0"
	cfg.ClientHelloTimeout = 5 * time.Second
	cfg.DrainDelay = 0 // tests of the delay set it
	cfg.DrainTimeout = 10 * time.Second
	cfg.EjectionTime = time.Minute
	if mod != nil {
		mod(&cfg)
	}
	gw, err := New(cfg, src, testLogger(t))
	require.NoError(t, err)
	if prep != nil {
		prep(gw)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, gw: gw, table: table, cancel: cancel, done: make(chan error, 1)}
	go func() { h.done <- gw.Run(ctx) }()
	t.Cleanup(func() { require.NoError(t, h.stop()) })
	return h
}

// stop cancels Run and waits for it (bounded).
func (h *harness) stop() error {
	h.stopOnce.Do(func() {
		h.cancel()
		select {
		case h.stopErr = <-h.done:
			h.stopped.Store(true)
		case <-time.After(30 * time.Second):
			h.stopErr = errors.New("Run did not return within 30s of its context ending")
		}
	})
	return h.stopErr
}

func (h *harness) addr() string { return h.gw.Addr().String() }

// dialTLS connects through the gateway and completes a TLS handshake.
func (h *harness) dialTLS(cfg *tls.Config, sni string) (*tls.Conn, error) {
	raw, err := net.DialTimeout("tcp", h.addr(), 5*time.Second)
	if err != nil {
		return nil, err
	}
	cfg = cfg.Clone()
	cfg.ServerName = sni
	c := tls.Client(raw, cfg)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		_ = raw.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

// connect dials through the gateway to sni and requires the greeting of
// the namedEcho backend reached to be want. The connection is closed when
// the test ends.
func (h *harness) connect(t testing.TB, cfg *tls.Config, sni, want string) *tls.Conn {
	t.Helper()
	c, err := h.dialTLS(cfg, sni)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	require.Equal(t, want, readLine(t, c))
	return c
}

// scrape returns the gateway's metrics, one sample per line.
func (h *harness) scrape() string {
	h.t.Helper()
	if h.stopped.Load() { // the metrics server is closed: the registry is not
		rec := httptest.NewRecorder()
		promhttp.HandlerFor(h.gw.metrics.registry, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		require.Equal(h.t, http.StatusOK, rec.Code)
		return rec.Body.String()
	}
	resp, err := http.Get("http://" + h.gw.MetricsAddr().String() + "/metrics")
	require.NoError(h.t, err)
	defer resp.Body.Close()
	require.Equal(h.t, http.StatusOK, resp.StatusCode)
	b, err := io.ReadAll(resp.Body)
	require.NoError(h.t, err)
	return string(b)
}

// metric is the value of the sample `name{labels}` (labels as Prometheus
// prints them, e.g. `reason="unknown_sni"`, or "" for none); 0 if absent.
func (h *harness) metric(name, labels string) float64 {
	h.t.Helper()
	want := name
	if labels != "" {
		want += "{" + labels + "}"
	}
	for _, line := range strings.Split(h.scrape(), "\n") {
		if v, ok := strings.CutPrefix(line, want+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(h.t, err)
			return f
		}
	}
	return 0
}

func (h *harness) ready() int {
	h.t.Helper()
	resp, err := http.Get("http://" + h.gw.HealthAddr().String() + "/healthz/ready")
	require.NoError(h.t, err)
	_ = resp.Body.Close()
	return resp.StatusCode
}

// backend is a TLS server on loopback that counts TCP accepts.
type backend struct {
	ln      net.Listener
	accepts atomic.Int64
}

func startBackend(t testing.TB, cfg *tls.Config, handle func(raw net.Conn, c *tls.Conn)) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	b := &backend{ln: ln}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			b.accepts.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer raw.Close()
				c := tls.Server(raw, cfg)
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				if err := c.Handshake(); err != nil {
					t.Logf("backend handshake: %v", err)
					return
				}
				handle(raw, c)
			}()
		}
	}()
	return b
}

func (b *backend) addr() netip.AddrPort { return netip.MustParseAddrPort(b.ln.Addr().String()) }

// namedEcho writes its name and a newline after the handshake, then echoes
// lines.
func namedEcho(name string) func(net.Conn, *tls.Conn) {
	return func(_ net.Conn, c *tls.Conn) {
		if _, err := fmt.Fprintf(c, "%s\n", name); err != nil {
			return
		}
		_, _ = io.Copy(c, c)
	}
}

func readLine(t testing.TB, c net.Conn) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(io.LimitReader(c, 1<<10)).ReadString('\n')
	require.NoError(t, err)
	return strings.TrimSuffix(line, "\n")
}

// route is one healthy route to the given endpoints.
func route(sni, cluster string, eps ...netip.AddrPort) Route {
	r := Route{SNI: sni, Cluster: cluster}
	for _, ep := range eps {
		r.Endpoints = append(r.Endpoints, Endpoint{Addr: ep, Healthy: true})
	}
	return r
}

func mustRoutes(t testing.TB, rs ...Route) *Routes {
	t.Helper()
	r, err := NewRoutes(rs)
	require.NoError(t, err)
	return r
}

// unusedAddr is a loopback address where nothing listens.
func unusedAddr(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := netip.MustParseAddrPort(ln.Addr().String())
	require.NoError(t, ln.Close())
	return addr
}

// eventually polls cond every 20ms for up to 10s.
func eventually(t testing.TB, cond func() bool, msg string) {
	t.Helper()
	require.Eventually(t, cond, 10*time.Second, 20*time.Millisecond, msg)
}
