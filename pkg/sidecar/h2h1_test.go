package sidecar

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Clusters that speak one HTTP version upstream whatever the app spoke,
// as the federator makes them for ports declared http (HTTP/1.1) and
// http2 or grpc (HTTP/2): a's app speaks h2c to h1Svc's cluster, which
// carries each stream to b as an HTTP/1.1 request (h2h1.go), and
// HTTP/1.1 to h2UpSvc's, which carries it as HTTP/2. b's h2App says
// which version reached it.
var (
	h1Svc        = svc{name: "h1", ns: "demo", vip: "240.240.0.30", ports: []svcPort{{80, true}}, upstream: xdsclient.UpstreamHTTP1}
	h1HurriedSvc = svc{name: "h1-hurried", ns: "demo", vip: "240.240.0.31", ports: []svcPort{{80, true}}, upstream: xdsclient.UpstreamHTTP1, timeout: routeTimeout}
	h1RefusedSvc = svc{name: "h1-refused", ns: "demo", vip: "240.240.0.32", ports: []svcPort{{80, true}}, upstream: xdsclient.UpstreamHTTP1}
	h2UpSvc      = svc{name: "h2-up", ns: "demo", vip: "240.240.0.33", ports: []svcPort{{80, true}}, upstream: xdsclient.UpstreamHTTP2}
)

// startVersionMesh runs a and b on the HTTP/2 path netHTTP2 picks, with
// b's h2App behind the services above.
func startVersionMesh(t testing.TB, netHTTP2 bool) (*mesh, *h2App) {
	t.Helper()
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t),
		hosts: hostsOf(h1Svc, h1HurriedSvc, h1RefusedSvc, h2UpSvc)}
	edit := func(c *Config) { c.NetHTTP2 = netHTTP2 }
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: edit})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds, edit: edit})
	app := startH2App(t)
	m.b.apps[ipH2] = app.addr
	refused := m.onB(h1RefusedSvc, ipH2)
	refused.locs[0].eps[0].addr = closedAddr(t)
	m.set(t, "v1", m.onB(h1Svc, ipH2), m.onB(h1HurriedSvc, ipH2), refused, m.onB(h2UpSvc, ipH2))
	return m, app
}

func TestUpstreamHTTPVersion(t *testing.T) {
	m, app := startVersionMesh(t, false)
	host := h1Svc.host()
	inboundConns := func() float64 {
		return metricValue(t, m.b.scrape(t), "isthmus_sidecar_connections_total", "listener=inbound")
	}

	t.Run("the config dump names each cluster's version", func(t *testing.T) {
		code, body := httpGet(t, "http://"+m.a.proxy.AdminAddr().String()+"/config_dump")
		require.Equal(t, http.StatusOK, code)
		var dump configDump
		require.NoError(t, json.Unmarshal([]byte(body), &dump), body)
		got := map[string]string{}
		for _, c := range dump.Clusters {
			got[c.Name] = c.UpstreamHTTP
		}
		require.Equal(t, map[string]string{
			h1Svc.cluster(80): "HTTP/1.1", h1HurriedSvc.cluster(80): "HTTP/1.1", h1RefusedSvc.cluster(80): "HTTP/1.1",
			h2UpSvc.cluster(80): "HTTP/2", xdsclient.InboundPassthroughCluster: "downstream",
			xdsclient.PassthroughCluster: "",
		}, got)
	})

	t.Run("HTTP/2 streams reach the app as HTTP/1.1 requests, many at once", func(t *testing.T) {
		c := dialH2(t, m.a, host)
		const streams, together = 100, 20
		reqs := make([]*http.Request, streams)
		for i := range reqs {
			reqs[i] = c.request(t, http.MethodGet, fmt.Sprintf("/id?n=%d&tag=h1-many&together=%d", i, together), nil)
		}
		for i, r := range concurrently([]*h2Client{c}, reqs) {
			require.NoError(t, r.err, "stream %d", i)
			require.Equal(t, http.StatusOK, r.code, "stream %d: %s", i, r.body)
			require.Equal(t, fmt.Sprintf("id=%d proto=HTTP/1.1", i), r.body)
		}
		require.EqualValues(t, 1, c.dials.Load(), "one connection from a's app carried every stream")
		require.EqualValues(t, streams, app.req("h1-many").arrived.Load(), "each stream reached b's app once")
	})

	t.Run("one request after another reuses the upstream connection", func(t *testing.T) {
		c := dialH2(t, m.a, host)
		require.Equal(t, http.StatusOK, c.get(t, "/id?n=warm").code)
		before := inboundConns()
		for i := range 20 {
			r := c.get(t, fmt.Sprintf("/id?n=%d", i))
			require.Equal(t, fmt.Sprintf("id=%d proto=HTTP/1.1", i), r.body)
		}
		require.Equal(t, before, inboundConns(), "b's inbound listener accepted no connection for 20 requests in a row")
	})

	t.Run("uploads, with a length and chunked", func(t *testing.T) {
		c := dialH2(t, m.a, host)
		c.requireUpload(t, "h1-upload", 11, h2Transfer, true)
		c.requireUpload(t, "h1-unsized", 12, h2Transfer/4, false)

		req := c.request(t, http.MethodPost, "/upload?tag=h1-empty", nil)
		r := c.do(t, req)
		require.Equal(t, fmt.Sprintf("0 %s", h2Sum(0, 0)), r.body, "a POST without a body")
	})

	t.Run("large download", func(t *testing.T) {
		dialH2(t, m.a, host).requireDownload(t, "h1-download", 13, h2Transfer)
	})

	t.Run("a download nobody reads holds back only itself", func(t *testing.T) {
		c := dialH2(t, m.a, host)
		req := c.request(t, http.MethodGet, fmt.Sprintf("/download?tag=h1-unread&seed=14&n=%d", h2Endless), nil)
		ctx, cancel := context.WithCancel(req.Context())
		defer cancel()
		resp, err := c.cc.RoundTrip(req.WithContext(ctx))
		require.NoError(t, err)
		defer resp.Body.Close()
		st := app.req("h1-unread")
		st.requireStarted(t)
		// The app gets as far as the windows and buffers on the way let
		// it, then stops.
		var last int64
		require.Eventually(t, func() bool {
			w := st.written.Load()
			settled := w == last
			last = w
			return settled
		}, waitFor, 200*time.Millisecond)
		require.Less(t, last, int64(h2Endless/4), "the app was not held back")
		r := c.get(t, "/id?n=beside")
		require.Equal(t, "id=beside proto=HTTP/1.1", r.body, "another stream of the connection is answered")
		cancel()
		st.requireCancelled(t)
	})

	t.Run("trailers both ways", func(t *testing.T) {
		c := dialH2(t, m.a, host)
		req := c.request(t, http.MethodPost, "/trailers?tag=h1-trailers", strings.NewReader("ping"))
		req.ContentLength = -1
		req.Trailer = http.Header{"X-Client-Trailer": {"from a"}}
		r := c.do(t, req)
		require.NoError(t, r.err)
		require.Equal(t, http.StatusOK, r.code)
		require.Equal(t, `got "ping"`, r.body)
		require.Equal(t, "0", r.trailer.Get("Grpc-Status"))
		require.Equal(t, "all good", r.trailer.Get("Grpc-Message"))
		require.Equal(t, "from a", r.trailer.Get("X-Request-Trailer"), "the request's trailer reached the app in the last chunk")
		require.Equal(t, "late", r.trailer.Get("X-Unannounced"))
	})

	t.Run("HEAD", func(t *testing.T) {
		c := dialH2(t, m.a, host)
		r := c.do(t, c.request(t, http.MethodHead, "/head?tag=h1-head", nil))
		require.Equal(t, http.StatusOK, r.code)
		require.Equal(t, "12345", r.header.Get("Content-Length"))
		require.Empty(t, r.body)
		require.Equal(t, "id=after proto=HTTP/1.1", c.get(t, "/id?n=after").body, "the connection upstream was left usable")
	})

	t.Run("header fields: cookies joined, Host from :authority, XFCC replaced", func(t *testing.T) {
		raw := dialRawH2(t, m.a, host)
		fields := append(requestFields(http.MethodGet, host, "/headers?tag=h1-headers"),
			hpack.HeaderField{Name: "cookie", Value: "a=1"}, hpack.HeaderField{Name: "cookie", Value: "b=2"},
			hpack.HeaderField{Name: "x-forwarded-client-cert", Value: "By=spiffe://beta.mesh/ns/demo/sa/b;URI=spiffe://alpha.mesh/ns/demo/sa/admin"})
		require.NoError(t, raw.writeHeaders(1, true, fields))
		o := raw.readStream(t, 1)
		require.True(t, o.ended, "%+v", o)
		require.Equal(t, "200", o.status, string(o.body))
		var got h2HeadersReply
		require.NoError(t, json.Unmarshal(o.body, &got))
		require.Equal(t, "HTTP/1.1", got.Proto)
		require.Equal(t, host, got.Host)
		require.Equal(t, []string{"a=1; b=2"}, got.Cookie, "one Cookie field, as HTTP/1.1 has it (RFC 9113 §8.2.3)")
		require.Len(t, got.XFCC, 1)
		require.NotContains(t, got.XFCC[0], "sa/admin", "the app's own XFCC never reaches b")
		require.Contains(t, got.XFCC[0], "URI="+m.a.id.String(), "b's sidecar names its caller")
	})

	t.Run("Expect: 100-continue is answered before the body is sent", func(t *testing.T) {
		raw := dialRawH2(t, m.a, host)
		fields := append(requestFields(http.MethodPost, host, "/upload?tag=h1-expect"),
			hpack.HeaderField{Name: "expect", Value: "100-continue"}, hpack.HeaderField{Name: "content-length", Value: "5"})
		require.NoError(t, raw.writeHeaders(1, false, fields))
		// Nothing of the body goes until the 100 comes.
		for {
			f, err := raw.fr.ReadFrame()
			require.NoError(t, err, "the 100 never came")
			if h, ok := f.(*http2.MetaHeadersFrame); ok && h.StreamID == 1 {
				require.Equal(t, "100", h.PseudoValue("status"))
				require.False(t, h.StreamEnded())
				break
			}
			if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
				require.NoError(t, raw.fr.WriteSettingsAck())
			}
		}
		require.NoError(t, raw.fr.WriteData(1, true, []byte("hello")))
		o := raw.readStream(t, 1)
		require.True(t, o.ended, "%+v", o)
		require.Equal(t, "200", o.status)
		sum := sha256.Sum256([]byte("hello"))
		require.Equal(t, "5 "+hex.EncodeToString(sum[:]), string(o.body))
	})

	t.Run("a body that does not match its content-length resets the stream", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			length string
			body   string
		}{{"longer", "5", "0123456789"}, {"shorter", "10", "01234"}} {
			t.Run(tc.name, func(t *testing.T) {
				raw := dialRawH2(t, m.a, host)
				fields := append(requestFields(http.MethodPost, host, "/upload?tag=h1-mismatch"),
					hpack.HeaderField{Name: "content-length", Value: tc.length})
				require.NoError(t, raw.writeHeaders(1, false, fields))
				require.NoError(t, raw.fr.WriteData(1, true, []byte(tc.body)))
				o := raw.readStream(t, 1)
				require.True(t, o.rst, "%+v", o)
				require.Equal(t, http2.ErrCodeProtocol, o.rstCode)
				require.Empty(t, o.status, "no response began")
			})
		}
	})

	t.Run("what HTTP/1.1 cannot carry is answered", func(t *testing.T) {
		// (CONNECT never gets this far: the route refuses it, 405.)
		raw := dialRawH2(t, m.a, host)
		require.NoError(t, raw.writeHeaders(3, true, requestFields(http.MethodGet, host, "/id?tag=h1-space&n=a b")))
		o := raw.readStream(t, 3)
		require.Equal(t, "400", o.status, string(o.body))
		require.Contains(t, string(o.body), "cannot go to an HTTP/1.1 upstream")
		require.Zero(t, app.req("h1-space").arrived.Load(), "it never reached b's app")
	})

	t.Run("the route timeout, and a client that leaves", func(t *testing.T) {
		c := dialH2(t, m.a, h1HurriedSvc.host())
		start := time.Now()
		r := c.get(t, "/hold?tag=h1-hurried")
		require.Equal(t, http.StatusGatewayTimeout, r.code)
		require.Equal(t, "upstream request timeout", r.body)
		require.Less(t, time.Since(start), waitFor)
		app.req("h1-hurried").requireCancelled(t)

		c = dialH2(t, m.a, host)
		req := c.request(t, http.MethodGet, "/hold?tag=h1-leaves", nil)
		ctx, cancel := context.WithCancel(req.Context())
		done := make(chan error, 1)
		go func() {
			resp, err := c.cc.RoundTrip(req.WithContext(ctx))
			if err == nil {
				resp.Body.Close()
			}
			done <- err
		}()
		st := app.req("h1-leaves")
		st.requireStarted(t)
		cancel()
		require.Error(t, <-done)
		st.requireCancelled(t) // the reset closed the upstream request
	})

	t.Run("an endpoint that refuses connections", func(t *testing.T) {
		c := dialH2(t, m.a, h1RefusedSvc.host())
		r := c.get(t, "/id?n=refused")
		require.Equal(t, http.StatusServiceUnavailable, r.code)
		require.Contains(t, r.body, "upstream connect error or disconnect/reset before headers. reset reason: connection failure")
	})

	t.Run("HTTP/1.1 from the app reaches an HTTP/2 cluster as HTTP/2", func(t *testing.T) {
		client := m.a.nat.httpClient(false)
		for i := range 3 {
			resp, err := client.Get(fmt.Sprintf("http://%s/id?n=%d", h2UpSvc.host(), i))
			require.NoError(t, err)
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			require.Equal(t, "HTTP/1.1", resp.Proto, "a's app spoke HTTP/1.1 to its sidecar")
			require.Equal(t, fmt.Sprintf("id=%d proto=HTTP/2.0", i), string(body))
		}
		c := dialH2(t, m.a, h2UpSvc.host())
		require.Equal(t, "id=h2 proto=HTTP/2.0", c.get(t, "/id?n=h2").body, "and h2c stays HTTP/2")
	})

	t.Run("Run ends the bridge workers", func(t *testing.T) {
		// Workers that served the streams above wait for the next for
		// 10 s: stopping the sidecar ends them at once.
		m.a.stop(t)
		m.b.stop(t)
		requireNoProductGoroutine(t)
	})
}

// With Config.NetHTTP2, net/http's server takes the app's h2c and its
// Transport speaks the cluster's version. One difference from the
// sidecar's own path: the request's trailers do not reach an HTTP/1.1
// upstream (the Transport sends none), so only the response's are
// checked.
func TestUpstreamHTTPVersionNetHTTP2(t *testing.T) {
	m, _ := startVersionMesh(t, true)
	c := dialH2(t, m.a, h1Svc.host())
	require.Equal(t, "id=1 proto=HTTP/1.1", c.get(t, "/id?n=1").body)

	c.requireUpload(t, "net-unsized", 21, 1<<20, false)

	req := c.request(t, http.MethodPost, "/trailers?tag=net-trailers", strings.NewReader("ping"))
	req.ContentLength = -1
	req.Trailer = http.Header{"X-Client-Trailer": {"from a"}}
	r := c.do(t, req)
	require.NoError(t, r.err)
	require.Equal(t, `got "ping"`, r.body)
	require.Equal(t, "0", r.trailer.Get("Grpc-Status"))
	require.Equal(t, "late", r.trailer.Get("X-Unannounced"))

	h2 := dialH2(t, m.a, h2UpSvc.host())
	require.Equal(t, "id=2 proto=HTTP/2.0", h2.get(t, "/id?n=2").body)
}

// TestH1BridgeRequestHead is the HTTP/1.1 head a header block becomes.
func TestH1BridgeRequestHead(t *testing.T) {
	f := func(kv ...string) []hpack.HeaderField {
		var fs []hpack.HeaderField
		for i := 0; i < len(kv); i += 2 {
			fs = append(fs, hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return fs
	}
	xfcc := f("x-forwarded-client-cert", "By=b;URI=a")
	for _, tc := range []struct {
		name   string
		fields []hpack.HeaderField
		ended  bool
		code   int
		head   string
	}{
		{"GET", f(":method", "GET", ":scheme", "http", ":authority", "echo:80", ":path", "/x?y", "accept", "*/*", "te", "trailers"), true, 0,
			"GET /x?y HTTP/1.1\r\nHost: echo:80\r\naccept: */*\r\nte: trailers\r\nx-forwarded-client-cert: By=b;URI=a\r\n\r\n"},
		{"POST without a body", f(":method", "POST", ":scheme", "http", ":authority", "echo", ":path", "/"), true, 0,
			"POST / HTTP/1.1\r\nHost: echo\r\nx-forwarded-client-cert: By=b;URI=a\r\n" + "Content-Length: 0\r\n\r\n"},
		{"Expect: 100-continue", f(":method", "PUT", ":scheme", "http", ":path", "/", ":authority", "echo", "expect", "100-continue", "content-length", "1"), false, 0,
			"PUT / HTTP/1.1\r\nHost: echo\r\nx-forwarded-client-cert: By=b;URI=a\r\nContent-Length: 1\r\n\r\n"},
		{"a body of known length", f(":method", "PUT", ":scheme", "http", ":path", "/", "host", "echo", "content-length", "12", "x-forwarded-client-cert", "forged"), false, 0,
			"PUT / HTTP/1.1\r\nHost: echo\r\nx-forwarded-client-cert: By=b;URI=a\r\nContent-Length: 12\r\n\r\n"},
		{"a body of unknown length", f(":method", "POST", ":scheme", "http", ":authority", "echo", ":path", "/", "cookie", "a=1", "cookie", "b=2"), false, 0,
			"POST / HTTP/1.1\r\nHost: echo\r\ncookie: a=1; b=2\r\nx-forwarded-client-cert: By=b;URI=a\r\nTransfer-Encoding: chunked\r\n\r\n"},
		{"two lengths", f(":method", "POST", ":scheme", "http", ":path", "/", "content-length", "1", "content-length", "2"), false, http.StatusBadRequest, ""},
		{"a length without a body", f(":method", "POST", ":scheme", "http", ":path", "/", "content-length", "3"), true, http.StatusBadRequest, ""},
		{"a bad length", f(":method", "POST", ":scheme", "http", ":path", "/", "content-length", "-1"), false, http.StatusBadRequest, ""},
		{"CONNECT", f(":method", "CONNECT", ":authority", "echo:443"), true, http.StatusNotImplemented, ""},
		{"extended CONNECT", f(":method", "CONNECT", ":protocol", "websocket", ":scheme", "http", ":path", "/chat", ":authority", "echo"), true, http.StatusNotImplemented, ""},
		{"OPTIONS *", f(":method", "OPTIONS", ":scheme", "http", ":authority", "echo", ":path", "*"), true, 0,
			"OPTIONS * HTTP/1.1\r\nHost: echo\r\nx-forwarded-client-cert: By=b;URI=a\r\n\r\n"},
		{"* for GET", f(":method", "GET", ":scheme", "http", ":path", "*"), true, http.StatusBadRequest, ""},
		{"a path not in origin-form", f(":method", "GET", ":scheme", "http", ":path", "0"), true, http.StatusBadRequest, ""},
		{"a fragment", f(":method", "GET", ":scheme", "http", ":path", "/a#b"), true, http.StatusBadRequest, ""},
		{"a space in the path", f(":method", "GET", ":scheme", "http", ":path", "/a b"), true, http.StatusBadRequest, ""},
		{"a method that is no token", f(":method", "G(T", ":scheme", "http", ":path", "/"), true, http.StatusBadRequest, ""},
		{"a bad authority", f(":method", "GET", ":scheme", "http", ":path", "/", ":authority", "a/b"), true, http.StatusBadRequest, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b h1Bridge
			code, msg := b.buildRequest(tc.fields, xfcc, tc.ended)
			require.Equal(t, tc.code, code, msg)
			if tc.code == 0 {
				require.Equal(t, tc.head, string(b.req))
			} else {
				require.NotEmpty(t, msg)
			}
		})
	}
}

// TestH1BridgeResponseFields is the HTTP/2 header block an HTTP/1.1
// response head becomes.
func TestH1BridgeResponseFields(t *testing.T) {
	head := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n" +
		"Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n")
	b := h1Bridge{resp: new(h1Head)}
	require.NoError(t, parseResponseHead(head, b.resp))
	require.Equal(t, []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "text/plain"},
		{Name: "set-cookie", Value: "a=1"}, {Name: "set-cookie", Value: "b=2"}}, b.responseFields(head))

	head = []byte("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
	require.NoError(t, parseResponseHead(head, b.resp))
	require.Equal(t, []hpack.HeaderField{{Name: ":status", Value: "204"}, {Name: "content-length", Value: "0"}}, b.responseFields(head))

	// Names off the common list and past the stack buffer, a code past
	// the table.
	head = []byte("HTTP/1.1 799 Odd\r\nX-Custom: 1\r\nX-A-Field-Name-Longer-Than-32-Bytes: 2\r\nDATE: d\r\nContent-Length: 0\r\n\r\n")
	require.NoError(t, parseResponseHead(head, b.resp))
	require.Equal(t, []hpack.HeaderField{{Name: ":status", Value: "799"}, {Name: "x-custom", Value: "1"},
		{Name: "x-a-field-name-longer-than-32-bytes", Value: "2"}, {Name: "date", Value: "d"},
		{Name: "content-length", Value: "0"}}, b.responseFields(head))
}

// FuzzH1BridgeRequestHead: whatever header block reaches the bridge (the
// HTTP/2 reader has checked names and values as RFC 9113 requires), the
// head it writes is one HTTP/1.1 request that the sidecar's own strict
// parser reads back with the same method, target and authority, or the
// block is refused with a code and a message.
func FuzzH1BridgeRequestHead(f *testing.F) {
	f.Add("GET", "/x?y", "echo:80", "accept", "*/*", "cookie", "a=1", true)
	f.Add("POST", "/", "", "content-length", "3", "host", "echo", false)
	f.Add("CONNECT", "", "echo:443", "", "", "", "", true)
	f.Add("GET", "/a\r\nX: y", "echo", "x", "1", "x", "2", true)
	f.Fuzz(func(t *testing.T, method, path, authority, n1, v1, n2, v2 string, ended bool) {
		fields := []hpack.HeaderField{{Name: ":method", Value: method}, {Name: ":scheme", Value: "http"}, {Name: ":path", Value: path}}
		if authority != "" {
			fields = append(fields, hpack.HeaderField{Name: ":authority", Value: authority})
		}
		for _, kv := range [][2]string{{n1, v1}, {n2, v2}} {
			// What headerReader lets through: lower-case tokens, valid values.
			if !validFieldName(kv[0]) || !httpguts.ValidHeaderFieldValue(kv[1]) {
				continue
			}
			fields = append(fields, hpack.HeaderField{Name: kv[0], Value: kv[1]})
		}
		if !httpguts.ValidHeaderFieldValue(method) || !httpguts.ValidHeaderFieldValue(path) || !httpguts.ValidHeaderFieldValue(authority) {
			return
		}
		var b h1Bridge
		code, msg := b.buildRequest(fields, nil, ended)
		if code != 0 {
			if msg == "" || code < 400 {
				t.Fatalf("refused with %d %q", code, msg)
			}
			return
		}
		end, _, err := scanHead(b.req, 0)
		if err != nil || end != len(b.req) {
			t.Fatalf("the head %q is not one whole head (end %d of %d, %v)", b.req, end, len(b.req), err)
		}
		var h h1Head
		if err := parseRequestHead(b.req, &h); err != nil && !errors.Is(err, errH1Fallback) {
			t.Fatalf("the sidecar refuses the head it wrote, %q: %v", b.req, err)
		}
		if got := string(h.method.of(b.req)); got != method {
			t.Fatalf("method %q became %q", method, got)
		}
		if got := string(h.target.of(b.req)); got != path {
			t.Fatalf("path %q became %q", path, got)
		}
	})
}

// A response whose body ends with its connection (no Content-Length,
// not chunked) is relayed whole and ends the stream cleanly; the next
// request gets a connection of its own (the peer reads one request per
// connection). Another Isthmus sidecar always re-frames
// such a body as chunked, so the peer here is a TLS server of its own
// (a peer that is not an Isthmus sidecar), presenting an SVID the
// cluster expects.
func TestH1BridgeResponseToClose(t *testing.T) {
	closeSvc := svc{name: "h1-close", ns: "demo", vip: "240.240.0.34", ports: []svcPort{{80, true}}, upstream: xdsclient.UpstreamHTTP1}
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(closeSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds})

	peerID := m.beta.id("demo", "raw-peer")
	sv := m.beta.svid(t, peerID)
	tlsConf := &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{sv.Certificates[0].Raw}, PrivateKey: sv.PrivateKey}},
		NextProtos:   []string{"istio-http/1.1"},
	}
	body := strings.Repeat("to the end of the connection\n", 8000) // 232 KB: many reads
	heads := make(chan string, 4)
	peer := serveTCP(t, func(raw net.Conn) {
		c := tls.Server(raw, tlsConf)
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(waitFor))
		br := bufio.NewReader(c)
		var head strings.Builder
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			head.WriteString(line)
			if line == "\r\n" {
				break
			}
		}
		heads <- head.String()
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"+body)
	})

	s := closeSvc
	s.ids = []spiffeid.ID{peerID}
	s.locs = []locSpec{{zone: "z1", weight: 1, eps: []ep{{peer, true}}}}
	m.xds.set(t, snapshot(t, "v1", []*testCA{m.alpha, m.beta}, s))
	m.a.waitReady(t, "v1")

	c := dialH2(t, m.a, closeSvc.host())
	for i := range 2 {
		r := c.get(t, fmt.Sprintf("/to-close?n=%d", i))
		require.NoError(t, r.err, "the stream ends cleanly with the connection's end")
		require.Equal(t, http.StatusOK, r.code)
		require.Equal(t, "text/plain", r.header.Get("Content-Type"))
		require.Empty(t, r.header.Get("Connection"))
		require.Equal(t, len(body), len(r.body))
		require.Equal(t, body, r.body)
		select {
		case head := <-heads:
			require.True(t, strings.HasPrefix(head, fmt.Sprintf("GET /to-close?n=%d HTTP/1.1\r\n", i)), head)
			require.Contains(t, head, "\r\nHost: "+closeSvc.host()+"\r\n")
		case <-time.After(waitFor):
			t.Fatal("the peer got no request")
		}
	}
	require.Empty(t, heads, "each request came on its own connection, read once")
}

// An upstream whose answer is no HTTP/1.1 response head, or one whose
// framing cannot be trusted, broke the protocol: a's app gets Envoy's
// 502 "protocol error" (UPE), naming what broke, never the 503 of a
// reset; through a's HTTP/1.1 path, its HTTP/2 → HTTP/1.1 bridge and the
// net/http path (an HTTP/1.0 request). The next request is answered on
// a new connection.
func TestH1UpstreamProtocolError(t *testing.T) {
	m, peer := startRawTLSPeer(t, nil)
	const upe = "upstream connect error or disconnect/reset before headers. reset reason: protocol error: "
	for _, tc := range []struct {
		name, answer string
		// why is what the sidecar's paths name; netHTTP, the status the
		// net/http path answers: its Transport folds lines, and takes
		// heads up to 1 MB with any number of fields.
		why     string
		netHTTP int
	}{
		{"status line", "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "malformed status line", http.StatusBadGateway},
		{"not HTTP", "SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed status line", http.StatusBadGateway},
		{"differing lengths", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "differing Content-Length values", http.StatusBadGateway},
		{"transfer coding", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding (only chunked)", http.StatusBadGateway},
		{"obsolete folding", "HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n", "obsolete line folding", http.StatusOK},
		{"switching protocols", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", "101 Switching Protocols to a request without Upgrade", http.StatusBadGateway},
		{"too many fields", "HTTP/1.1 200 OK\r\n" + strings.Repeat("X: y\r\n", 101) + "Content-Length: 0\r\n\r\n", "more than 100 header fields", http.StatusOK},
		{"head too large", "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("b", 70000) + "\r\n\r\n", "message head larger than 64 KiB", http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peer.set([]byte(tc.answer))
			defer peer.closeConns()
			for _, path := range rawPeerPaths {
				code, body := path.ask(t, m)
				if path.name == "net/http" {
					require.Equal(t, tc.netHTTP, code, "%s: %s", path.name, body)
					if code == http.StatusBadGateway {
						require.True(t, strings.HasPrefix(body, upe), "%s: %q", path.name, body)
					}
					continue
				}
				require.Equal(t, http.StatusBadGateway, code, "%s: %s", path.name, body)
				require.Equal(t, upe+tc.why, body, path.name)
			}
			peer.set([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
			for _, path := range rawPeerPaths {
				code, body := path.ask(t, m)
				require.Equal(t, http.StatusOK, code, "%s: %s", path.name, body)
				require.Equal(t, "ok", body, path.name)
			}
		})
	}
}

// An upstream that dies in the middle of its response head did not
// break the protocol: its connection failed. a's app gets the 503 of a
// reset, never the 502 of TestH1UpstreamProtocolError, on every path;
// the net/http one tells the two apart by whether its connection's read
// failed, having read bytes either way.
func TestH1UpstreamCutInHeadIsNoProtocolError(t *testing.T) {
	m, peer := startRawTLSPeer(t, nil)
	const reset = "upstream connect error or disconnect/reset before headers. reset reason: "
	// Longer than rawPeerRecord: the peer closes its connection after it.
	peer.set([]byte("HTTP/1.1 200 OK\r\nX-Pad: " + strings.Repeat("a", 2*rawPeerRecord)))
	defer peer.closeConns()
	for _, path := range rawPeerPaths {
		code, body := path.ask(t, m)
		require.Equal(t, http.StatusServiceUnavailable, code, "%s: %s", path.name, body)
		require.True(t, strings.HasPrefix(body, reset), "%s: %q", path.name, body)
		require.NotContains(t, body, "protocol error", path.name)
	}
}

// rawPeerPaths are a's ways to a rawTLSPeer's /fuzz: Go's client through
// a's HTTP/1.1 path and through its HTTP/2 → HTTP/1.1 bridge, and an
// HTTP/1.0 request, which a's HTTP/1.1 path hands to the net/http path.
var rawPeerPaths = []struct {
	name string
	ask  func(*testing.T, *mesh) (int, string)
}{
	{"HTTP/1.1 path", func(t *testing.T, m *mesh) (int, string) { return askRawPeer(t, m, false) }},
	{"bridge", func(t *testing.T, m *mesh) (int, string) { return askRawPeer(t, m, true) }},
	{"net/http", func(t *testing.T, m *mesh) (int, string) {
		rc := dialRaw(t, m, rawPeerSvc.host())
		rc.send(t, "GET /fuzz HTTP/1.0\r\nHost: "+rawPeerSvc.host()+"\r\n\r\n")
		resp, body := rc.read(t, http.MethodGet)
		return resp.StatusCode, body
	}},
}

// askRawPeer asks for a rawTLSPeer's /fuzz with Go's client, as HTTP/2
// (to a's bridge) or HTTP/1.1 (a's HTTP/1.1 path).
func askRawPeer(t *testing.T, m *mesh, h2 bool) (int, string) {
	client := m.a.nat.httpClient(h2)
	defer client.CloseIdleConnections()
	code, body, err := getNoHang(t, client.Do, "http://"+rawPeerSvc.host()+"/fuzz")
	require.NoError(t, err)
	return code, body
}

// FuzzH1Upstream: a peer that is not a sidecar (a raw TLS server with a
// workload certificate, behind a cluster whose upstream speaks
// HTTP/1.1) answers a request with arbitrary bytes. Through a's
// HTTP/1.1 path and through its HTTP/2 → HTTP/1.1 bridge, a's app gets
// an answer or an error, never a hang; a's sidecar lets go of the
// request; and the next request to the peer is answered whole, so no
// connection the input left in any state is reused for it. Where
// FuzzParseResponseHead checks the parser alone, this checks what the
// two paths do with what it reads: framing, 1xx, bodies cut short or
// running over, the connection's reuse.
func FuzzH1Upstream(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswered",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n",
		"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
		"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nextra",
		"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nrunning over",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
		"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
		"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("b", 70000) + "\r\n\r\n",
		"SSH-2.0-OpenSSH_9.6\r\n",
		"",
	} {
		f.Add([]byte(seed))
	}
	// Most inputs leave the response waiting for more: the stream idle
	// timeout ends it, kept short so that fuzzing moves.
	f.Cleanup(func() { requireNoProductGoroutine(f) }) // after the pod stopped: cleanups run last first
	m, peer := startRawTLSPeer(f, func(c *Config) { c.StreamIdleTimeout = 300 * time.Millisecond })
	// ask sends path through a's HTTP/1.1 path or its bridge (h2), each
	// time on a new connection from a's app.
	ask := func(t testing.TB, h2 bool, path string) (code int, body string, err error) {
		client := m.a.nat.httpClient(h2)
		defer client.CloseIdleConnections()
		return getNoHang(t, client.Do, "http://"+rawPeerSvc.host()+path)
	}
	// The plumbing: a whole response comes so, both ways.
	peer.set([]byte("HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswered"))
	for _, h2 := range []bool{false, true} {
		code, body, err := ask(f, h2, "/fuzz")
		require.NoError(f, err)
		require.Equal(f, http.StatusOK, code)
		require.Equal(f, "answered", body)
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		peer.set(data)
		defer peer.closeConns()
		for _, h2 := range []bool{false, true} {
			_, _, _ = ask(t, h2, "/fuzz") // any answer or error will do, but not a hang
			requireLetGo(t, fmt.Sprintf("the request (h2 %v)", h2), m.a)
			code, body, err := ask(t, h2, "/ok")
			require.NoError(t, err, "h2 %v", h2)
			require.Equal(t, http.StatusOK, code, "h2 %v: %s", h2, body)
			require.Equal(t, "ok", body, "h2 %v: the next request is answered whole", h2)
		}
	})
}

// rawPeerSvc is served by a rawTLSPeer.
var rawPeerSvc = svc{name: "h1-fuzz", ns: "demo", vip: "240.240.0.35", ports: []svcPort{{80, true}}, upstream: xdsclient.UpstreamHTTP1}

// rawTLSPeer is a peer that is not a sidecar: a raw TLS server with a
// workload certificate of beta's, rawPeerSvc's one endpoint, speaking
// istio-http/1.1. It answers /fuzz with what set gave it, as it is, and
// any other path with a 200 "ok".
type rawTLSPeer struct {
	answer atomic.Pointer[[]byte]
	mu     sync.Mutex
	conns  map[net.Conn]struct{} // open, for closeConns
}

// An answer up to rawPeerRecord bytes goes in one TLS record, and a
// longer one ends its connection: what crypto/tls reads ahead of a
// response is out of the sidecar's sight (closedWhileIdle), so bytes
// after a response in a later record could be read as the next one's.
const rawPeerRecord = 16000 // plaintext bytes, under a record's 16 KiB

// startRawTLSPeer starts a's pod (its config edited by edit) and a
// rawTLSPeer as rawPeerSvc, a's only service.
func startRawTLSPeer(tb testing.TB, edit func(*Config)) (*mesh, *rawTLSPeer) {
	tb.Helper()
	m := &mesh{alpha: newTestCA(tb, "alpha.mesh"), beta: newTestCA(tb, "beta.mesh"), xds: startXDSServer(tb), hosts: hostsOf(rawPeerSvc)}
	m.a = startPod(tb, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: edit})

	peerID := m.beta.id("demo", "raw-peer")
	sv := m.beta.svid(tb, peerID)
	tlsConf := &tls.Config{
		Certificates:                []tls.Certificate{{Certificate: [][]byte{sv.Certificates[0].Raw}, PrivateKey: sv.PrivateKey}},
		NextProtos:                  []string{"istio-http/1.1"},
		DynamicRecordSizingDisabled: true, // see rawPeerRecord
	}
	p := &rawTLSPeer{conns: map[net.Conn]struct{}{}}
	addr := serveTCP(tb, func(raw net.Conn) {
		c := tls.Server(raw, tlsConf)
		p.mu.Lock()
		p.conns[c] = struct{}{}
		p.mu.Unlock()
		defer func() {
			p.mu.Lock()
			delete(p.conns, c)
			p.mu.Unlock()
		}()
		_ = c.SetDeadline(time.Now().Add(waitFor))
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			if _, err := io.Copy(io.Discard, req.Body); err != nil {
				return
			}
			resp := []byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			if a := p.answer.Load(); req.URL.Path == "/fuzz" && a != nil {
				resp = *a
			}
			if _, err := c.Write(resp); err != nil || len(resp) > rawPeerRecord {
				return
			}
		}
	})
	tb.Cleanup(p.closeConns) // before serveTCP's, which waits for them
	s := rawPeerSvc
	s.ids = []spiffeid.ID{peerID}
	s.locs = []locSpec{{zone: "z1", weight: 1, eps: []ep{{addr, true}}}}
	m.xds.set(tb, snapshot(tb, "v1", []*testCA{m.alpha, m.beta}, s))
	m.a.waitReady(tb, "v1")
	return m, p
}

// set makes b the answer to /fuzz.
func (p *rawTLSPeer) set(b []byte) { p.answer.Store(&b) }

// closeConns closes the peer's connections.
func (p *rawTLSPeer) closeConns() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		_ = c.Close()
	}
}
