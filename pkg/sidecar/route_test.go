package sidecar

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// routeState is a state for route alone: the clusters without pools.
func routeState(tb testing.TB) *state {
	tb.Helper()
	ca := newTestCA(tb, "alpha.mesh")
	cfg := decoded(tb, snapshot(tb, "v1", []*testCA{ca}, echoSvc, greeterSvc, dbSvc))
	st := &state{cfg: cfg, clusters: map[string]*upstream{}}
	for name := range cfg.Clusters {
		c := cfg.Clusters[name]
		st.clusters[name] = &upstream{name: name, c: &c}
	}
	return st
}

// connInfoFor is the outbound HTTP connection manager of the chain for
// port's destination, or the explicit one.
func connInfoFor(st *state, chain int) *connInfo {
	ch := &st.cfg.Sidecar.Outbound.Chains[chain]
	return &connInfo{listener: listenerOutbound, hcm: ch.HTTP}
}

func TestRoute(t *testing.T) {
	st := routeState(t)
	// Chains: 80, 9090 (HTTP), 5432 (TCP), explicit.
	port80, explicit := connInfoFor(st, 0), connInfoFor(st, 3)
	require.Equal(t, "80", port80.hcm.RouteConfigName)
	require.Equal(t, "explicit", explicit.hcm.RouteConfigName)
	for _, tc := range []struct {
		name    string
		ci      *connInfo
		raw     string
		cluster string
		code    int
	}{
		{"by host", port80, "GET /x HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\n\r\n", echoSvc.cluster(80), 0},
		{"host case-insensitive, with port", port80, "GET / HTTP/1.1\r\nHost: ECHO.demo.svc.clusterset.local:80\r\n\r\n", echoSvc.cluster(80), 0},
		{"by VIP", port80, "GET / HTTP/1.1\r\nHost: 240.240.0.10\r\n\r\n", echoSvc.cluster(80), 0},
		{"another port's host", port80, "GET / HTTP/1.1\r\nHost: greeter.demo.svc.clusterset.local:9090\r\n\r\n", "", 404},
		{"unknown host", port80, "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "", 404},
		{"explicit by host", explicit, "GET / HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\n\r\n", echoSvc.cluster(80), 0},
		{"explicit needs the port off 80", explicit, "GET / HTTP/1.1\r\nHost: greeter.demo.svc.clusterset.local\r\n\r\n", "", 404},
		{"explicit with the port", explicit, "GET / HTTP/1.1\r\nHost: greeter.demo.svc.clusterset.local:9090\r\n\r\n", greeterSvc.cluster(9090), 0},
		{"absolute-form", explicit, "GET http://greeter.demo.svc.clusterset.local:9090/a?b=c HTTP/1.1\r\nHost: ignored\r\n\r\n", greeterSvc.cluster(9090), 0},
		{"CONNECT", explicit, "CONNECT echo.demo.svc.clusterset.local:443 HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local:443\r\n\r\n", "", 405},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(tc.raw)))
			require.NoError(t, err)
			d := route(st, tc.ci, r)
			require.Equal(t, tc.code, d.code, d.err)
			if tc.code == 0 {
				require.Equal(t, tc.cluster, d.up.name)
			} else {
				require.Nil(t, d.up)
			}
		})
	}
}

// FuzzRoute feeds raw request heads, as a connection to the outbound
// listener delivers them, through Go's parser and the sidecar's routing:
// no input panics, a routed request names a cluster the configuration
// has, and a refusal names the host it could not route.
func FuzzRoute(f *testing.F) {
	for _, seed := range []string{
		"GET / HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\n\r\n",
		"GET http://echo.demo.svc.clusterset.local:80/p HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /upload HTTP/1.1\r\nHost: 240.240.0.10:80\r\nContent-Length: 3\r\n\r\nabc",
		"CONNECT echo.demo.svc.clusterset.local:443 HTTP/1.1\r\n\r\n",
		"GET /%2e%2e/ HTTP/1.0\r\n\r\n",
		"OPTIONS * HTTP/1.1\r\nHost: Echo.Demo.Svc.Clusterset.Local\r\n\r\n",
		"GET https://echo.demo.svc.clusterset.local/ HTTP/1.1\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
	} {
		f.Add([]byte(seed), uint8(0))
		f.Add([]byte(seed), uint8(3))
	}
	st := routeState(f)
	f.Fuzz(func(t *testing.T, raw []byte, chain uint8) {
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(string(raw))))
		if err != nil {
			return
		}
		ci := connInfoFor(st, []int{0, 1, 3}[int(chain)%3])
		d := route(st, ci, r)
		switch {
		case d.up != nil:
			if _, ok := st.cfg.Clusters[d.up.name]; !ok || d.code != 0 || d.up.name != d.cluster {
				t.Fatalf("routed to %q (code %d), not a configured cluster", d.up.name, d.code)
			}
			if vh := st.cfg.Sidecar.Route(ci.hcm.RouteConfigName).VirtualHost(r.Host); vh == nil {
				t.Fatalf("routed host %q has no virtual host", r.Host)
			}
		case d.code == http.StatusNotFound:
			if !strings.Contains(d.err, fmt.Sprintf("%q", r.Host)) || !strings.HasSuffix(d.err, "(NR)") {
				t.Fatalf("404 %q does not name host %q", d.err, r.Host)
			}
		case d.code == http.StatusMethodNotAllowed && r.Method == http.MethodConnect:
		default:
			t.Fatalf("unexpected decision %+v for %q", d, raw)
		}
		_, _ = io.Copy(io.Discard, r.Body)
	})
}

func BenchmarkRoute(b *testing.B) {
	st := routeState(b)
	ci := connInfoFor(st, 0)
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET /x HTTP/1.1\r\nHost: Echo.demo.svc.clusterset.local\r\n\r\n")))
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if d := route(st, ci, r); d.up == nil {
			b.Fatal(d.err)
		}
	}
}
