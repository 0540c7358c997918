package sidecar

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkHTTP is one GET with keep-alive: straight to the app, and
// through two sidecars (a's outbound, mTLS, b's inbound) in HTTP/1.1 and
// h2c. The ratio between them is what counts (docs/benchmarks.md); run
// with -cpu 1,2 to see the parallel case. sidecars-http1 is the
// sidecar's own HTTP/1.1 path, sidecars-http1-nethttp the same hops
// through net/http (Config.NetHTTP1), in the same run. allocs/op counts
// the whole process: client, both sidecars and the app.
func BenchmarkHTTP(b *testing.B) {
	m := startMesh(b)
	m.standard(b)
	nm := startMeshWith(b, func(c *Config) { c.NetHTTP1 = true })
	nm.standard(b)
	direct := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	directURL := "http://" + m.b.http.addr.String() + "/"
	run := func(b *testing.B, client *http.Client, url string) {
		b.ReportAllocs()
		before, ok := ioSyscalls()
		defer func() {
			if after, ok2 := ioSyscalls(); ok && ok2 && b.N > 0 {
				b.ReportMetric(float64(after-before)/float64(b.N), "syscalls/op")
			}
		}()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				resp, err := client.Get(url)
				if err != nil {
					b.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Errorf("status %d", resp.StatusCode)
					return
				}
			}
		})
	}
	b.Run("direct", func(b *testing.B) { run(b, direct, directURL) })
	// The peer docs/benchmarks.md names: two hops of the standard library's
	// reverse proxy, without TLS.
	hop2 := reverseProxy(b, directURL)
	hop1 := reverseProxy(b, hop2)
	b.Run("stdlib-2-hops", func(b *testing.B) { run(b, direct, hop1) })
	for _, h2 := range []bool{false, true} {
		name := "sidecars-http1"
		if h2 {
			name = "sidecars-h2c"
		}
		client := m.a.nat.httpClient(h2)
		client.Transport.(*http.Transport).MaxIdleConnsPerHost = 64
		b.Run(name, func(b *testing.B) { run(b, client, "http://echo.demo.svc.clusterset.local/") })
	}
	client := nm.a.nat.httpClient(false)
	client.Transport.(*http.Transport).MaxIdleConnsPerHost = 64
	b.Run("sidecars-http1-nethttp", func(b *testing.B) { run(b, client, "http://echo.demo.svc.clusterset.local/") })
}

// startMeshWith is startMesh with both sidecars' Config edited.
func startMeshWith(tb testing.TB, edit func(*Config)) *mesh {
	tb.Helper()
	m := &mesh{alpha: newTestCA(tb, "alpha.mesh"), beta: newTestCA(tb, "beta.mesh"), xds: startXDSServer(tb),
		hosts: hostsOf(echoSvc, greeterSvc, dbSvc, impostorSvc)}
	m.a = startPod(tb, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: edit})
	m.b = startPod(tb, "b", m.beta, m.hosts, podOptions{xds: m.xds, edit: edit})
	return m
}

// reverseProxy serves httputil.ReverseProxy to target on loopback and
// returns its URL.
func reverseProxy(tb testing.TB, target string) string {
	tb.Helper()
	u, err := url.Parse(target)
	require.NoError(tb, err)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.Transport = &http.Transport{MaxIdleConnsPerHost: 64}
	srv := httptest.NewServer(rp)
	tb.Cleanup(srv.Close)
	return srv.URL + "/"
}

// BenchmarkTCP is a 64 KiB echo round trip over one connection through
// both sidecars (mTLS between them).
func BenchmarkTCP(b *testing.B) {
	m := startMesh(b)
	m.standard(b)
	c, err := m.a.nat.dial(context.Background(), "db.demo.svc.clusterset.local:5432")
	require.NoError(b, err)
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.(*net.TCPConn).CloseWrite()
}

// ioSyscalls is the process's read and write system calls so far
// (syscr + syscw of /proc/self/io, Linux): per request, client, app and
// both sidecars together, the figure bench-sidecar reads per proxy.
func ioSyscalls() (int64, bool) {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, false
	}
	var n int64
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		if k == "syscr" || k == "syscw" {
			x, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return 0, false
			}
			n += x
		}
	}
	return n, true
}

// BenchmarkH2 is HTTP/2 from a's app (h2c, one connection) through both
// sidecars (mTLS, ALPN istio-h2, between them) to b's app in h2c: the
// sidecar's own path (sidecars-h2), net/http's server and Transport
// (sidecars-h2-nethttp, Config.NetHTTP2), the own path to a cluster that
// speaks HTTP/1.1 upstream (sidecars-h2-to-http1: HTTP/1.1 between the
// sidecars and to the app) and straight to the app (direct-h2c),
// measured in the same run. serial is one stream at a
// time (latency); parallel is 16 goroutines per CPU sharing the one
// connection, so streams are multiplexed on every hop; download-1MiB is
// a 1 MiB response at a time (DATA frames and flow control). allocs/op
// and syscalls/op count the whole process: client, both sidecars and
// the app.
func BenchmarkH2(b *testing.B) {
	own, app := startH2Mesh(b, false, nil)
	nethttp, _ := startH2Mesh(b, true, nil)
	// A cluster that speaks HTTP/1.1 upstream: each stream becomes an
	// HTTP/1.1 request between the sidecars (h2h1.go).
	versions, _ := startVersionMesh(b, false)
	host := h2Svc.host()
	targets := []struct {
		name string
		host string
		cc   func() *http.ClientConn
	}{
		{"direct-h2c", app.addr.String(), func() *http.ClientConn { return dialDirectH2(b, app.addr.String()) }},
		{"sidecars-h2", host, func() *http.ClientConn { return dialH2(b, own.a, host).cc }},
		{"sidecars-h2-nethttp", host, func() *http.ClientConn { return dialH2(b, nethttp.a, host).cc }},
		{"sidecars-h2-to-http1", h1Svc.host(), func() *http.ClientConn { return dialH2(b, versions.a, h1Svc.host()).cc }},
	}
	get := func(b *testing.B, cc *http.ClientConn, url string) bool {
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			b.Error(err)
			return false
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			b.Error(err)
			return false
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Errorf("status %d, body error %v", resp.StatusCode, err)
			return false
		}
		return true
	}
	measure := func(b *testing.B) func() {
		b.ReportAllocs()
		before, ok := ioSyscalls()
		return func() {
			if after, ok2 := ioSyscalls(); ok && ok2 && b.N > 0 {
				b.ReportMetric(float64(after-before)/float64(b.N), "syscalls/op")
			}
		}
	}
	for _, tg := range targets {
		cc := tg.cc()
		small := "http://" + tg.host + "/id?n=1"
		large := "http://" + tg.host + "/download?seed=1&n=" + strconv.Itoa(1<<20)
		b.Run(tg.name+"/serial", func(b *testing.B) {
			defer measure(b)()
			for b.Loop() {
				if !get(b, cc, small) {
					return
				}
			}
		})
		b.Run(tg.name+"/parallel", func(b *testing.B) {
			defer measure(b)()
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if !get(b, cc, small) {
						return
					}
				}
			})
		})
		b.Run(tg.name+"/download-1MiB", func(b *testing.B) {
			defer measure(b)()
			b.SetBytes(1 << 20)
			for b.Loop() {
				if !get(b, cc, large) {
					return
				}
			}
		})
	}
}

// dialDirectH2 is one h2c connection (prior knowledge) to addr.
func dialDirectH2(tb testing.TB, addr string) *http.ClientConn {
	tb.Helper()
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protos}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	cc, err := tr.NewClientConn(ctx, "http", addr)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = cc.Close() })
	return cc
}
