package sidecar

import (
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var ipStall = netip.MustParseAddr("127.0.0.15")

// readAllOK reads the whole request body, then answers "ok".
var readAllOK = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	_, _ = io.ReadAll(r.Body)
	_, _ = io.WriteString(w, "ok")
})

// A caller that stops sending its request body half way gets an answer
// once the stream idle timeout passes: 408 "stream timeout", as Envoy
// answers an incomplete request, and its connection closed (the rest of
// the body will not come). Before, the HTTP/1.1 path closed without a
// word, and the net/http path (which takes Expect: 100-continue) held the
// connection until the caller gave up, its 504 never written.
func TestStalledRequestBodyAnswered408(t *testing.T) {
	const idle = 300 * time.Millisecond
	s := svc{name: "stall", ns: "demo", vip: "240.240.0.39", ports: []svcPort{{80, true}}}
	for _, tc := range []struct {
		name     string
		netHTTP1 bool
		head     string
	}{
		{"HTTP/1.1", false, "Content-Length: 10\r\n\r\nabcde"},
		{"HTTP/1.1 chunked", false, "Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n"},
		{"Expect: 100-continue", false, "Expect: 100-continue\r\nContent-Length: 10\r\n\r\n"},
		{"net/http", true, "Content-Length: 10\r\n\r\nabcde"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := startServiceMesh(t, s, ipStall, readAllOK, func(c *Config) { c.StreamIdleTimeout = idle; c.NetHTTP1 = tc.netHTTP1 }, nil)

			rc := dialRaw(t, m, s.host())
			rc.send(t, "POST /x HTTP/1.1\r\nHost: "+s.host()+"\r\n"+tc.head)
			resp, err := http.ReadResponse(rc.br, &http.Request{Method: http.MethodPost})
			require.NoError(t, err, "no answer")
			if resp.StatusCode == http.StatusContinue {
				rc.send(t, "abcde") // half the body, then nothing
				resp, err = http.ReadResponse(rc.br, &http.Request{Method: http.MethodPost})
				require.NoError(t, err, "no answer after the 100")
			}
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, http.StatusRequestTimeout, resp.StatusCode, "%s", body)
			require.Equal(t, "stream timeout", strings.TrimSpace(string(body)))
			require.True(t, resp.Close, "Connection: close")
			_, err = rc.br.ReadByte()
			require.ErrorIs(t, err, io.EOF, "closed after the answer")
			require.EqualValues(t, 1, metricValue(t, m.a.scrape(t), "isthmus_sidecar_requests_total", "listener=outbound", "code=408"))
		})
	}

	// HTTP/2: the stream is answered 408 and the connection lives on.
	t.Run("HTTP/2", func(t *testing.T) {
		m := startServiceMesh(t, s, ipStall, readAllOK, func(c *Config) { c.StreamIdleTimeout = idle }, nil)
		pr, pw := io.Pipe()
		t.Cleanup(func() { _ = pw.Close() })
		req, err := http.NewRequest(http.MethodPost, "http://"+s.host()+"/x", pr)
		require.NoError(t, err)
		go func() { _, _ = io.WriteString(pw, "abcde") }() // then nothing
		resp, err := m.a.nat.httpClient(true).Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		require.Equal(t, http.StatusRequestTimeout, resp.StatusCode, "%s", body)
		require.Equal(t, "stream timeout", strings.TrimSpace(string(body)))
	})
}

// "Expect: 100-continue" gets one 100, the sidecar's own, as Envoy
// answers it (proxy_100_continue: false): passed on, each sidecar on the
// way and the app sent one more, three in all.
func TestExpectContinueAnsweredOnce(t *testing.T) {
	s := svc{name: "expect", ns: "demo", vip: "240.240.0.40", ports: []svcPort{{80, true}}}
	m := startServiceMesh(t, s, ipStall, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = io.WriteString(w, "expect="+r.Header.Get("Expect")+" body="+string(b))
	}), nil, nil)

	rc := dialRaw(t, m, s.host())
	rc.send(t, "POST /x HTTP/1.1\r\nHost: "+s.host()+"\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: http.MethodPost})
	require.NoError(t, err)
	require.Equal(t, http.StatusContinue, resp.StatusCode)
	rc.send(t, "abcdefghij")
	resp, body := rc.read(t, http.MethodPost)
	require.Equal(t, http.StatusOK, resp.StatusCode, "a second interim response")
	require.Equal(t, "expect= body=abcdefghij", body)
}
