package sidecar

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Route timeouts (route.timeout: the whole request and response within
// it) on both HTTP paths. The routes a's app calls carry the timeout;
// b's inbound route has none, so b's app learns of a's timeout only from
// b's sidecar passing on a's cut.

// routeTimeout is long enough that a fast request, on a new mTLS
// connection under -race on a shared machine, ends well within it.
const routeTimeout = 500 * time.Millisecond

var (
	// hurriedSvc's route times out after routeTimeout; patientSvc's never
	// (timeout 0s, what the federator sends). Both are b's holdApp.
	hurriedSvc = svc{name: "hurried", ns: "demo", vip: "240.240.0.15", ports: []svcPort{{80, true}}, timeout: routeTimeout}
	patientSvc = svc{name: "patient", ns: "demo", vip: "240.240.0.16", ports: []svcPort{{80, true}}}
	ipHold     = netip.MustParseAddr("127.0.0.6")
)

// The paths a request takes through both sidecars: the app's protocol,
// and Config.NetHTTP1 at both.
var timeoutPaths = []struct {
	name     string
	h2       bool
	netHTTP1 bool
}{
	{"HTTP/1.1 path", false, false},
	{"net/http, h2c", true, false},
	{"net/http, HTTP/1.1", false, true},
}

// holdApp is an HTTP app (HTTP/1.1 and h2c) that answers when it is
// told: /fast at once, /after?d= after d; /hold never sends a response
// head and /partial sends its head and one line. Those two report their
// path on started, wait for their request to end, then report it on
// ended.
type holdApp struct {
	addr           netip.AddrPort
	started, ended chan string
}

func startHoldApp(t testing.TB) *holdApp {
	t.Helper()
	a := &holdApp{started: make(chan string, 16), ended: make(chan string, 16)}
	held := func(w http.ResponseWriter, r *http.Request) {
		select {
		case a.started <- r.URL.Path:
		default:
		}
		<-r.Context().Done()
		select {
		case a.ended <- r.URL.Path:
		default:
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/fast", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "fast") })
	mux.HandleFunc("/after", func(w http.ResponseWriter, r *http.Request) {
		d, _ := time.ParseDuration(r.URL.Query().Get("d"))
		select {
		case <-time.After(d):
			_, _ = io.WriteString(w, "after "+d.String())
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("/hold", held)
	mux.HandleFunc("/partial", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "part 1\n")
		_ = http.NewResponseController(w).Flush()
		held(w, r)
	})
	a.addr = serveApp(t, mux)
	return a
}

// requireEnded waits for b's app to see the request for path end.
func (a *holdApp) requireEnded(t testing.TB, path string) {
	t.Helper()
	select {
	case got := <-a.ended:
		require.Equal(t, path, got)
	case <-time.After(waitFor):
		t.Fatalf("the app's request for %s never ended", path)
	}
}

// startTimeoutMesh runs a and b, with Config.NetHTTP1 as given, and b's
// holdApp behind hurriedSvc and patientSvc.
func startTimeoutMesh(t testing.TB, netHTTP1 bool) (*mesh, *holdApp) {
	t.Helper()
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(hurriedSvc, patientSvc)}
	edit := func(c *Config) { c.NetHTTP1 = netHTTP1 }
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: edit})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds, edit: edit})
	app := startHoldApp(t)
	m.b.apps[ipHold] = app.addr // before any connection reads it
	m.set(t, "v1", m.onB(hurriedSvc, ipHold), m.onB(patientSvc, ipHold))
	return m, app
}

// timeoutClient is a's app's client, keeping its connections between
// requests.
func timeoutClient(t testing.TB, m *mesh, h2 bool) *http.Client {
	c := m.a.nat.httpClient(h2)
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// result is what a's app got: the status and body, the error that ended
// the body (nil: a clean end), and whether the request went on a
// connection that had carried one before.
type result struct {
	code   int
	body   string
	err    error
	reused bool
}

// fetchFast asks b's app for /fast and requires its answer.
func fetchFast(t testing.TB, c *http.Client, url string) result {
	t.Helper()
	r := fetch(t, c, url+"/fast")
	require.NoError(t, r.err)
	require.Equal(t, http.StatusOK, r.code, r.body)
	require.Equal(t, "fast", r.body)
	return r
}

func fetch(t testing.TB, c *http.Client, url string) result {
	t.Helper()
	var r result
	ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) { r.reused = i.Reused }})
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	r.code = resp.StatusCode
	b, err := io.ReadAll(resp.Body)
	r.body, r.err = string(b), err
	return r
}

// requirePath checks which path a's and b's sidecars served the request
// on: the HTTP/1.1 path keeps its connections listed while they are open.
func requirePath(t testing.TB, m *mesh, h1 bool) {
	t.Helper()
	for _, p := range []*Proxy{m.a.proxy, m.b.proxy} {
		p.h1Mu.Lock()
		n := len(p.h1Conns)
		p.h1Mu.Unlock()
		if h1 {
			require.Positive(t, n, "a connection on the HTTP/1.1 path")
		} else {
			require.Zero(t, n, "no connection on the HTTP/1.1 path")
		}
	}
}

// A response head that does not come within the route's timeout: a's
// app gets Envoy's 504 "upstream request timeout" (UT) on the connection
// it sent the request on, which goes on serving; the request is cut all
// the way to b's app, and b counts it as left by its caller (code 0);
// the next request succeeds.
func TestRouteTimeoutBeforeTheResponseHead(t *testing.T) {
	for _, tc := range timeoutPaths {
		t.Run(tc.name, func(t *testing.T) {
			m, app := startTimeoutMesh(t, tc.netHTTP1)
			c := timeoutClient(t, m, tc.h2)
			url := "http://" + hurriedSvc.host()

			r := fetchFast(t, c, url)
			requirePath(t, m, !tc.h2 && !tc.netHTTP1)

			r = fetch(t, c, url+"/hold")
			require.NoError(t, r.err)
			require.Equal(t, http.StatusGatewayTimeout, r.code, r.body)
			require.Equal(t, "upstream request timeout", r.body)
			require.True(t, r.reused, "the 504 came on the app's connection")
			app.requireEnded(t, "/hold")

			r = fetchFast(t, c, url)
			require.True(t, r.reused, "the app's connection survived the 504")

			mt := m.a.scrape(t)
			cluster := "cluster=" + hurriedSvc.cluster(80)
			require.EqualValues(t, 1, metricValue(t, mt, "isthmus_sidecar_requests_total", "listener=outbound", cluster, "code=504"))
			require.EqualValues(t, 2, metricValue(t, mt, "isthmus_sidecar_requests_total", "listener=outbound", cluster, "code=200"))
			require.Eventually(t, func() bool {
				return metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total", "listener=inbound",
					"cluster=inbound-passthrough", "code=0") == 1
			}, waitFor, 20*time.Millisecond, "b counts the request a cut")
		})
	}
}

// A route timeout that passes while the response body streams cuts the
// stream: a's app reads what came, then an error, never a clean end
// (HTTP/1.1: no last chunk; HTTP/2: RST_STREAM). b's app sees its
// request end, and the next request succeeds.
func TestRouteTimeoutCutsAStreamingResponse(t *testing.T) {
	for _, tc := range timeoutPaths {
		t.Run(tc.name, func(t *testing.T) {
			m, app := startTimeoutMesh(t, tc.netHTTP1)
			c := timeoutClient(t, m, tc.h2)
			url := "http://" + hurriedSvc.host()

			r := fetch(t, c, url+"/partial")
			require.Equal(t, http.StatusOK, r.code, "the head came before the timeout")
			require.Equal(t, "part 1\n", r.body, "what the app wrote before the timeout came")
			require.Error(t, r.err, "the body ended in an error, not cleanly")
			if !tc.h2 {
				require.ErrorIs(t, r.err, io.ErrUnexpectedEOF, "the connection closed before the last chunk")
			}
			app.requireEnded(t, "/partial")

			fetchFast(t, c, url)
		})
	}
}

// timeout 0s is no timeout: a response slower than any route timeout of
// these tests comes whole.
func TestRouteTimeoutZeroIsNone(t *testing.T) {
	for _, tc := range timeoutPaths {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := startTimeoutMesh(t, tc.netHTTP1)
			c := timeoutClient(t, m, tc.h2)
			d := 2 * routeTimeout
			r := fetch(t, c, "http://"+patientSvc.host()+"/after?d="+d.String())
			require.NoError(t, r.err)
			require.Equal(t, http.StatusOK, r.code, r.body)
			require.Equal(t, "after "+d.String(), r.body)
			requirePath(t, m, !tc.h2 && !tc.netHTTP1)
		})
	}
}

// Not a route timeout, but the same cut from further up: a's app gives
// up on a request still waiting for its head. The request ends at b's
// app too (on the HTTP/1.1 path, found by its look at the downstream),
// a counts it with code 0 (the downstream left), and the next request
// succeeds.
func TestCallerGivingUpEndsTheAppsRequest(t *testing.T) {
	for _, tc := range timeoutPaths {
		t.Run(tc.name, func(t *testing.T) {
			m, app := startTimeoutMesh(t, tc.netHTTP1)
			c := timeoutClient(t, m, tc.h2)
			url := "http://" + patientSvc.host()
			ctx, cancel := context.WithCancel(t.Context())
			go func() {
				select {
				case <-app.started:
				case <-time.After(waitFor):
				}
				cancel()
			}()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/hold", nil)
			require.NoError(t, err)
			resp, err := c.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			require.ErrorIs(t, err, context.Canceled)
			app.requireEnded(t, "/hold")
			require.Eventually(t, func() bool {
				return metricValue(t, m.a.scrape(t), "isthmus_sidecar_requests_total", "listener=outbound",
					"cluster="+patientSvc.cluster(80), "code=0") == 1
			}, waitFor, 20*time.Millisecond, "a counts the request its app left")

			fetchFast(t, c, url)
		})
	}
}

// An HTTP/1.1 caller that closes its sending side while its request
// waits for the head is taken as gone on both paths, as net/http's
// server takes it: b's app sees its request end, and the caller gets no
// answer at all, never one made up (net/http would complete a handler
// that wrote nothing with a 200 and an empty body).
func TestCallerHalfCloseGetsNoMadeUpAnswer(t *testing.T) {
	for _, tc := range timeoutPaths {
		if tc.h2 {
			continue // an HTTP/2 request's end of stream is no half-close
		}
		t.Run(tc.name, func(t *testing.T) {
			m, app := startTimeoutMesh(t, tc.netHTTP1)
			c, err := m.a.nat.dial(t.Context(), patientSvc.host()+":80")
			require.NoError(t, err)
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(waitFor))
			_, err = io.WriteString(c, "GET /hold HTTP/1.1\r\nHost: "+patientSvc.host()+"\r\n\r\n")
			require.NoError(t, err)
			select {
			case <-app.started:
			case <-time.After(waitFor):
				t.Fatal("the request never reached b's app")
			}
			require.NoError(t, c.(*net.TCPConn).CloseWrite())
			app.requireEnded(t, "/hold")
			got, err := io.ReadAll(c)
			require.NoError(t, err, "the sidecar closed the connection")
			require.Empty(t, string(got), "no answer")
		})
	}
}
