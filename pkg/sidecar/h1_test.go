package sidecar

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// rawSvc is served by b's rawBackend, which answers with hand-written
// responses the standard library's server would not send.
var (
	rawSvc = svc{name: "raw", ns: "demo", vip: "240.240.0.14", ports: []svcPort{{80, true}}}
	ipRaw  = netip.MustParseAddr("127.0.0.5")
)

const rawHost = "raw.demo.svc.clusterset.local"

// rawBackend is an HTTP/1.1 app answering by path: /conn the number of
// the connection it arrived on, /echo what it received, and responses
// that test the framing (/204, /304, /trailer, /to-close, /cut).
type rawBackend struct {
	addr     netip.AddrPort
	conns    atomic.Int64
	requests atomic.Int64
	unasked  chan struct{} // /extra wrote its unasked response
	closed   chan struct{} // /idle-close closed its connection
}

func startRawBackend(t testing.TB) *rawBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	b := &rawBackend{addr: ln.Addr().(*net.TCPAddr).AddrPort(), unasked: make(chan struct{}, 1), closed: make(chan struct{}, 1)}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex // guards open
		open = map[net.Conn]struct{}{}
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			id := b.conns.Add(1)
			mu.Lock()
			open[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(open, c)
					mu.Unlock()
					c.Close()
				}()
				b.serve(c, id)
			})
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for c := range open { // the sidecar's pooled connections
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return b
}

func (b *rawBackend) serve(c net.Conn, id int64) {
	br := bufio.NewReader(c)
	for {
		_ = c.SetDeadline(time.Now().Add(waitFor))
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return
		}
		b.requests.Add(1)
		var resp string
		switch {
		case req.Method == http.MethodHead:
			resp = "HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"
		case req.URL.Path == "/conn":
			resp = fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d", len(fmt.Sprint(id)), id)
		case req.URL.Path == "/echo":
			e := fmt.Sprintf("%s %s body=%q te=%v cl=%d hop=%q keep=%q xfcc=%q", req.Method, req.RequestURI, body, req.TransferEncoding,
				req.ContentLength, req.Header.Get("X-Hop"), req.Header.Get("X-Keep"), req.Header.Values(xfccHeader))
			resp = fmt.Sprintf("HTTP/1.1 200 OK\r\nX-Hop: response\r\nConnection: X-Hop\r\nContent-Length: %d\r\n\r\n%s", len(e), e)
		case req.URL.Path == "/many-conn":
			// More Connection options than the parser keeps at hand,
			// the field they name last among them.
			resp = "HTTP/1.1 200 OK\r\nConnection: o1, o2, o3, o4, o5, o6, o7, o8\r\nConnection: X-Hop\r\n" +
				"X-Hop: response\r\nX-End: kept\r\nContent-Length: 2\r\n\r\nok"
		case req.URL.Path == "/204":
			resp = "HTTP/1.1 204 No Content\r\nX-Seen: 1\r\n\r\n"
		case req.URL.Path == "/304":
			resp = "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 42\r\n\r\n"
		case req.URL.Path == "/trailer":
			resp = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;ext\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n"
		case req.URL.Path == "/many-hints":
			resp = strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", 10) + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		case req.URL.Path == "/early-hints":
			resp = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		case req.URL.Path == "/idle-close":
			// As an app with a short keep-alive timeout: answered with
			// keep-alive, then closed while idle.
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			time.Sleep(50 * time.Millisecond)
			_ = c.Close()
			b.closed <- struct{}{}
			return
		case req.URL.Path == "/extra":
			// A response, then, a moment later and unasked, another
			// (as an app whose Content-Length falls short of what it
			// writes): the connection then carries on.
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			time.Sleep(20 * time.Millisecond)
			if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"); err != nil {
				return
			}
			select {
			case b.unasked <- struct{}{}:
			default:
			}
			continue
		case req.URL.Path == "/to-close":
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\n\r\nuntil the end")
			return
		case req.URL.Path == "/cut":
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
			return
		default:
			resp = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
		}
		if _, err := io.WriteString(c, resp); err != nil {
			return
		}
	}
}

// startRawMesh is the standard mesh plus raw, served by b's rawBackend.
func startRawMesh(t testing.TB) (*mesh, *rawBackend) {
	t.Helper()
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(echoSvc, rawSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	raw := startRawBackend(t)
	m.b.apps[ipRaw] = raw.addr // before any connection reads it
	m.set(t, "v1", m.onB(echoSvc, ipHTTP), m.onB(rawSvc, ipRaw))
	return m, raw
}

// rawConn is an app's connection to its sidecar, captured as if it went
// to host:80, speaking HTTP/1.1 by hand.
type rawConn struct {
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t testing.TB, m *mesh, host string) *rawConn {
	t.Helper()
	c, err := m.a.nat.dial(t.Context(), host+":80")
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitFor))
	return &rawConn{c: c, br: bufio.NewReader(c)}
}

func (rc *rawConn) send(t testing.TB, raw string) {
	t.Helper()
	_, err := io.WriteString(rc.c, raw)
	require.NoError(t, err)
}

// read reads a response to method and its whole body.
func (rc *rawConn) read(t testing.TB, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: method})
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(body)
}

func (rc *rawConn) do(t testing.TB, method, path, extra string) (*http.Response, string) {
	t.Helper()
	rc.send(t, method+" "+path+" HTTP/1.1\r\nHost: "+rawHost+"\r\n"+extra+"\r\n")
	return rc.read(t, method)
}

// requireClosed checks the sidecar closed the connection.
func (rc *rawConn) requireClosed(t testing.TB) {
	t.Helper()
	n, err := rc.br.Read(make([]byte, 1))
	require.Zero(t, n)
	require.ErrorIs(t, err, io.EOF)
}

// requireH1 checks that p's HTTP/1.1 path, not net/http, serves a
// connection: the tests of this file would pass through net/http too.
func requireH1(t testing.TB, p *Proxy) {
	t.Helper()
	p.h1Mu.Lock()
	n := len(p.h1Conns)
	p.h1Mu.Unlock()
	require.Positive(t, n, "a connection on the HTTP/1.1 path")
}

// poolConns is the number of upstream connections a's pool for cluster
// holds open.
func poolConns(p *Proxy, cluster string) int64 {
	p.poolsMu.Lock()
	defer p.poolsMu.Unlock()
	return p.pools[cluster].conns.Load()
}

// One app connection carries many requests over one connection between
// the sidecars and one to the app; bodiless responses (HEAD, 204, 304)
// end where they should, so the next request on the connection works.
func TestH1KeepAliveAndFraming(t *testing.T) {
	m, raw := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	for range 3 {
		resp, body := rc.do(t, "GET", "/conn", "")
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "1", body, "the app sees one connection")
	}
	requireH1(t, m.a.proxy)
	requireH1(t, m.b.proxy)
	resp, body := rc.do(t, "HEAD", "/anything", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.EqualValues(t, 42, resp.ContentLength, "HEAD keeps the length of the body it does not send")
	require.Empty(t, body)

	resp, body = rc.do(t, "GET", "/204", "")
	require.Equal(t, http.StatusNoContent, resp.StatusCode)
	require.Equal(t, "1", resp.Header.Get("X-Seen"))
	require.Empty(t, body)

	resp, body = rc.do(t, "GET", "/304", "If-None-Match: \"x\"\r\n")
	require.Equal(t, http.StatusNotModified, resp.StatusCode)
	require.Equal(t, `"x"`, resp.Header.Get("ETag"))
	require.Empty(t, body)

	resp, _ = rc.do(t, "GET", "/early-hints", "")
	require.Equal(t, http.StatusEarlyHints, resp.StatusCode, "the 103 passed on first")
	require.Equal(t, "</a>", resp.Header.Get("Link"))
	resp, body = rc.read(t, "GET")
	require.Equal(t, http.StatusOK, resp.StatusCode, "then the answer")
	require.Equal(t, "ok", body)

	resp, body = rc.do(t, "GET", "/conn", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "1", body, "still the first connection to the app")
	require.EqualValues(t, 1, raw.conns.Load())
	require.EqualValues(t, 1, poolConns(m.a.proxy, rawSvc.cluster(80)), "one connection between the sidecars")

	// Pipelined: three requests in one write, answered in order.
	rc.send(t, "GET /conn HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\nHEAD /x HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\n"+
		"GET /echo?p=3 HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\n")
	_, body = rc.read(t, "GET")
	require.Equal(t, "1", body)
	resp, _ = rc.read(t, "HEAD")
	require.EqualValues(t, 42, resp.ContentLength)
	_, body = rc.read(t, "GET")
	require.Contains(t, body, "GET /echo?p=3 ")
	require.Equal(t, 1, strings.Count(body, "GET"))

	require.Eventually(t, func() bool {
		return metricValue(t, m.a.scrape(t), "isthmus_sidecar_requests_total", "listener=outbound", "cluster="+rawSvc.cluster(80), "code=200") == 9 &&
			metricValue(t, m.b.scrape(t), "isthmus_sidecar_requests_total", "listener=inbound", "cluster=inbound-passthrough", "code=204") == 1
	}, waitFor, 20*time.Millisecond)
}

// Chunked bodies both ways: a chunked request reaches the app as the
// same bytes (extensions dropped, sizes written anew), a chunked response
// with trailers comes back with them, and a response delimited by the
// app closing its connection reaches the app's caller chunked, on a
// connection that stays open.
func TestH1Chunked(t *testing.T) {
	m, raw := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	rc.send(t, "POST /echo HTTP/1.1\r\nHost: "+rawHost+"\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
	resp, body := rc.read(t, "POST")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, `body="hello world" te=[chunked] cl=-1`)
	requireH1(t, m.a.proxy)
	requireH1(t, m.b.proxy)

	resp, body = rc.do(t, "GET", "/trailer", "TE: trailers\r\n")
	require.Equal(t, []string{"chunked"}, resp.TransferEncoding)
	require.Equal(t, "hello", body)
	require.Equal(t, "5", resp.Trailer.Get("X-Sum"))

	resp, body = rc.do(t, "GET", "/to-close", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, []string{"chunked"}, resp.TransferEncoding)
	require.Equal(t, "until the end", body)
	resp, body = rc.do(t, "GET", "/conn", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.NotEqual(t, "1", body, "the app closed the first connection")
	require.EqualValues(t, 2, raw.conns.Load())

	// Through net/http's client and server at both ends: a body of
	// unknown length goes chunked, and a streamed response comes back
	// chunked.
	client := m.a.nat.httpClient(false)
	pr, pw := io.Pipe()
	go func() {
		for range 10 {
			_, _ = io.WriteString(pw, strings.Repeat("x", 1000))
		}
		_ = pw.Close()
	}()
	r, err := client.Post("http://echo.demo.svc.clusterset.local/upload", "text/plain", pr)
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	require.Contains(t, string(b), `"body":10000`)
	r, err = client.Get("http://echo.demo.svc.clusterset.local/stream?n=3")
	require.NoError(t, err)
	b, _ = io.ReadAll(r.Body)
	r.Body.Close()
	require.Equal(t, []string{"chunked"}, r.TransferEncoding)
	require.Equal(t, "line 0\nline 1\nline 2\n", string(b))
}

// The request the app gets: origin-form, hop-by-hop fields and those
// Connection names gone, X-Forwarded-Client-Cert the inbound sidecar's
// own, and no hop-by-hop field of the app's response reaches the caller.
func TestH1HeaderEdits(t *testing.T) {
	m, _ := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	rc.send(t, "PUT http://"+rawHost+"/echo?q=1 HTTP/1.1\r\nHost: ignored\r\nConnection: keep-alive, X-Hop\r\nX-Hop: a\r\n"+
		"X-Keep: b\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: secret\r\nX-Forwarded-Client-Cert: By=spiffe://evil/\r\nContent-Length: 3\r\n\r\nabc")
	resp, body := rc.read(t, "PUT")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, `PUT /echo?q=1 body="abc" te=[] cl=3 hop="" keep="b" xfcc=["By=`+m.b.id.String()+";Hash=")
	require.Contains(t, body, ";URI="+m.a.id.String()+`"]`)
	require.Empty(t, resp.Header.Get("X-Hop"), "named by the app's Connection")
	require.Empty(t, resp.Header.Values("Connection"))
	requireH1(t, m.a.proxy)
	requireH1(t, m.b.proxy)
}

// An app that closes its connection in the middle of a response: the
// caller's connection is closed too (the body cannot end well), and the
// next connection works.
func TestH1UpstreamClosesMidResponse(t *testing.T) {
	m, _ := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	rc.send(t, "GET /cut HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\n")
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: "GET"})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body, err := io.ReadAll(resp.Body)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.Equal(t, "0123456789", string(body))

	rc = dialRaw(t, m, rawHost)
	resp, got := rc.do(t, "GET", "/conn", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.NotEmpty(t, got)
}

// Heads the codec refuses, smuggling attempts among them, are answered
// with their status and the connection closed; none reaches the app.
func TestH1RefusesMalformedRequests(t *testing.T) {
	m, raw := startRawMesh(t)
	host := "Host: " + rawHost + "\r\n"
	for _, tc := range []struct {
		name string
		raw  string
		code int
	}{
		{"CL.TE", "POST /echo HTTP/1.1\r\n" + host + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", 400},
		{"TE.CL", "POST /echo HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", 400},
		{"differing lengths", "POST /echo HTTP/1.1\r\n" + host + "Content-Length: 3\r\nContent-Length: 10\r\n\r\nabc", 400},
		{"TE folded", "POST /echo HTTP/1.1\r\n" + host + "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400},
		{"TE with space before colon", "POST /echo HTTP/1.1\r\n" + host + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400},
		{"TE not chunked", "POST /echo HTTP/1.1\r\n" + host + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501},
		{"bare LF", "GET /echo HTTP/1.1\n" + host + "\n", 400},
		{"bad chunk size", "POST /echo HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", 400},
		{"chunk longer than its size", "POST /echo HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", 400},
		{"no Host", "GET /echo HTTP/1.1\r\n\r\n", 400},
		{"head too large", "GET /echo HTTP/1.1\r\n" + host + strings.Repeat("X-Big: "+strings.Repeat("y", 1000)+"\r\n", 70) + "\r\n", 431},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, m, rawHost)
			rc.send(t, tc.raw)
			resp, _ := rc.read(t, "POST")
			require.Equal(t, tc.code, resp.StatusCode)
			require.True(t, resp.Close, "Connection: close")
			rc.requireClosed(t)
		})
	}
	require.Zero(t, raw.requests.Load(), "nothing reached the app")
}

// What the codec leaves to net/http is served there, with the bytes the
// codec read first: HTTP/1.0 after an HTTP/1.1 request on the same
// connection.
func TestH1FallsBackToNetHTTP(t *testing.T) {
	m, _ := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	resp, body := rc.do(t, "GET", "/conn", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "1", body)
	requireH1(t, m.a.proxy)
	rc.send(t, "GET /echo HTTP/1.0\r\nHost: "+rawHost+"\r\n\r\n")
	resp, body = rc.read(t, "GET")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "GET /echo ")
	rc.requireClosed(t)
}

// A Connection header may name any number of fields: past the eight
// the parser keeps at hand, it reads them again, so a response naming
// nine is passed on (it was answered 502) and a request naming nine
// stays on the HTTP/1.1 path (it went to net/http), each with every
// named field removed.
func TestH1ManyConnectionOptions(t *testing.T) {
	m, _ := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	resp, body := rc.do(t, "GET", "/many-conn", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Equal(t, "ok", body)
	require.Empty(t, resp.Header.Get("X-Hop"), "a field the Connection header named went on")
	require.Equal(t, "kept", resp.Header.Get("X-End"))

	resp, body = rc.do(t, "GET", "/echo", "Connection: q1, q2, q3, q4, q5, q6, q7, q8, X-Hop\r\nX-Hop: request\r\nX-Keep: yes\r\n")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Contains(t, body, `hop="" keep="yes"`)
	requireH1(t, m.a.proxy)
}

// Config.NetHTTP1 sends HTTP/1.1 through net/http instead: the request
// is answered and no connection is on the HTTP/1.1 path. (The stream
// idle timeout's 504 is TestStreamIdleTimeout's; route timeouts, on every
// path, are timeout_test.go's.)
func TestH1NetHTTPSwitch(t *testing.T) {
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t), hosts: hostsOf(echoSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: func(c *Config) { c.NetHTTP1 = true }})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds, edit: func(c *Config) { c.NetHTTP1 = true }})
	m.set(t, "v1", m.onB(echoSvc, ipHTTP))
	code, reply, body := m.a.get(t, false, "http://echo.demo.svc.clusterset.local/x", nil)
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "HTTP/1.1", reply.Proto)
	m.a.proxy.h1Mu.Lock()
	require.Empty(t, m.a.proxy.h1Conns)
	m.a.proxy.h1Mu.Unlock()
}

// An app that closes a keep-alive connection while it sits in the
// inbound sidecar's pool: the next request, a POST that could not be
// retried, goes on a new connection instead of failing.
func TestH1PooledConnectionClosedByTheApp(t *testing.T) {
	m, raw := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	resp, body := rc.do(t, "GET", "/idle-close", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "ok", body)
	requireH1(t, m.a.proxy)
	requireH1(t, m.b.proxy)
	select { // the app closes meanwhile
	case <-raw.closed:
	case <-time.After(waitFor):
		t.Fatal("the app did not close its connection")
	}
	rc.send(t, "POST /echo HTTP/1.1\r\nHost: "+rawHost+"\r\nContent-Length: 3\r\n\r\nabc")
	resp, body = rc.read(t, "POST")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Contains(t, body, `body="abc"`)
	require.EqualValues(t, 2, raw.conns.Load())
}

// Bytes an app sends on a keep-alive connection while it sits in the
// inbound sidecar's pool were asked for by no request: the connection is
// closed, never read as the next request's response (as Envoy and nginx
// close an idle upstream connection that becomes readable).
func TestH1PooledConnectionUnaskedBytes(t *testing.T) {
	m, raw := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	resp, body := rc.do(t, "GET", "/extra", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "ok", body)
	requireH1(t, m.b.proxy)
	select {
	case <-raw.unasked:
	case <-time.After(waitFor):
		t.Fatal("the app wrote no unasked response")
	}
	time.Sleep(10 * time.Millisecond) // on loopback it is there already; a moment more for a loaded machine
	resp, body = rc.do(t, "GET", "/conn", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	require.Equal(t, "2", body, "answered on a new connection, not with the bytes nobody asked for")
	require.EqualValues(t, 2, raw.conns.Load())
}

// h1DownSvc is b's recording app of FuzzH1Downstream.
var (
	h1DownSvc = svc{name: "h1-down", ns: "demo", vip: "240.240.0.36", ports: []svcPort{{80, true}}}
	ipH1Down  = netip.MustParseAddr("127.0.0.11")
)

// seenRequest is a request as an app reads it.
type seenRequest struct{ method, uri, body string }

// FuzzH1Downstream: an app writes arbitrary bytes to a's outbound as
// HTTP/1.1, then ends its side. Every request that reaches b's app,
// through a's HTTP/1.1 path and b's, is one net/http reads from the same
// bytes (addressed to the service, its body whole), in the same order,
// with the same method, target and body: what a sidecar forwards is what
// it was sent, never a request smuggled in a body or cut from a head
// (it may refuse or drop more than net/http, so the app's requests are
// an ordered subsequence of net/http's reading). a's sidecar ends the
// connection once its side ended, lets go of everything, and still
// proxies.
func FuzzH1Downstream(f *testing.F) {
	host := h1DownSvc.host()
	for _, seed := range []string{
		"GET /a HTTP/1.1\r\nHost: " + host + "\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"POST /c HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 5\r\n\r\nhelloGET /d HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"POST /e HTTP/1.1\r\nHost: " + host + "\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nT: v\r\n\r\nGET /f HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"POST /g HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"POST /h HTTP/1.1\r\nHost: " + host + "\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n1\r\nZ\r\n0\r\n\r\n",
		"POST /i HTTP/1.0\r\nHost: " + host + "\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhiGET /j HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"POST /k HTTP/1.1\r\nHost: " + host + "\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabcGET /l HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"GET http://" + host + "/m HTTP/1.1\r\nHost: other\r\n\r\nGET /n HTTP/1.1\r\nHost: other.example\r\n\r\nGET /o HTTP/1.1\r\nHost: " + host + ":80\r\n\r\n",
		"GET /p HTTP/1.1\r\nHost: " + host + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
		"GET /q HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\nGET /r HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
		"POST /s HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 10\r\n\r\nshort",
		"GET /t HTTP/1.1\r\nHost: " + host + "\r\nX: a\r\n b\r\n\r\n",
		"\r\nGET /u HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	var (
		mu   sync.Mutex
		seen []seenRequest
		late []seenRequest // earlier inputs', not seen by the app (yet)
	)
	app := serveApp(f, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return // cut short: not a request the app got whole
		}
		mu.Lock()
		seen = append(seen, seenRequest{r.Method, r.URL.RequestURI(), string(body)})
		mu.Unlock()
		_, _ = io.WriteString(w, "ok")
	}))
	f.Cleanup(func() { requireNoProductGoroutine(f) }) // after the pods stopped: cleanups run last first
	m := &mesh{alpha: newTestCA(f, "alpha.mesh"), beta: newTestCA(f, "beta.mesh"), xds: startXDSServer(f), hosts: hostsOf(h1DownSvc)}
	m.a = startPod(f, "a", m.alpha, m.hosts, podOptions{xds: m.xds})
	m.b = startPod(f, "b", m.beta, m.hosts, podOptions{xds: m.xds})
	m.b.apps[ipH1Down] = app
	m.set(f, "v1", m.onB(h1DownSvc, ipH1Down))

	f.Fuzz(func(t *testing.T, data []byte) {
		// What net/http reads: requests to the service with whole bodies.
		var want []seenRequest
		br := bufio.NewReader(bytes.NewReader(data))
		for {
			// Empty lines before a request line are ignored (RFC 9112
			// §2.2), by the sidecar though not by net/http.
			for b, _ := br.Peek(2); string(b) == "\r\n"; b, _ = br.Peek(2) {
				_, _ = br.Discard(2)
			}
			req, err := http.ReadRequest(br)
			if err != nil {
				break
			}
			if req.Method == http.MethodConnect || req.Method == "PRI" {
				return // a tunnel, or HTTP/2: the bytes after it are not requests
			}
			body, err := io.ReadAll(req.Body)
			if err != nil {
				break
			}
			if h := strings.ToLower(req.Host); h == host || h == host+":80" {
				want = append(want, seenRequest{req.Method, req.URL.RequestURI(), string(body)})
			}
		}
		mu.Lock()
		seen = nil
		mu.Unlock()

		c, err := m.a.nat.dial(t.Context(), host+":80")
		require.NoError(t, err)
		defer c.Close()
		require.NoError(t, c.SetDeadline(time.Now().Add(waitFor)))
		_, err = c.Write(data)
		require.NoError(t, err)
		require.NoError(t, c.(interface{ CloseWrite() error }).CloseWrite())
		_, err = io.Copy(io.Discard, c)
		require.NotErrorIs(t, err, os.ErrDeadlineExceeded, "a's sidecar kept the connection after the app's side ended")

		deadline := time.Now().Add(5 * time.Second)
		for {
			m.a.proxy.h1Mu.Lock()
			open := len(m.a.proxy.h1Conns)
			m.a.proxy.h1Mu.Unlock()
			conns := m.a.proxy.active[0].Load() // the outbound's, net/http's included
			requests := m.a.proxy.requests.value()
			if requests == 0 && open == 0 && conns == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a's sidecar still holds %d connections (%d on its HTTP/1.1 path) and %d requests", conns, open, requests)
			}
			time.Sleep(time.Millisecond)
		}
		mu.Lock()
		got := slices.Clone(seen)
		mu.Unlock()
		// A request cut off by the app's end (a half-close aborts the
		// requests in flight on the net/http path, as nginx and Envoy
		// do) may already be on its way to b and reach the app after
		// the checks, on a loaded machine inputs later: the requests of
		// earlier inputs that had not arrived (the last 64) may come
		// during this one's.
		matched := make([]bool, len(want))
		i := 0
		for _, g := range got {
			if k := slices.Index(want[i:], g); k >= 0 {
				i += k
				matched[i] = true
				i++
				continue
			}
			if k := slices.Index(late, g); k >= 0 {
				late = slices.Delete(late, k, k+1)
				continue
			}
			t.Fatalf("b's app got %+v, which net/http does not read from the input, or not in this order:\ngot  %+v\nwant %+v", g, got, want)
		}
		for k, w := range want {
			if !matched[k] {
				late = append(late, w)
			}
		}
		late = late[max(len(late)-64, 0):]

		client := m.a.nat.httpClient(false)
		defer client.CloseIdleConnections()
		code, body, err := getNoHang(t, client.Do, "http://"+host+"/health")
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, code, body)
		require.Equal(t, "ok", body)
	})
}
