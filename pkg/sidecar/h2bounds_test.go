package sidecar

import (
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Trailers are a header block like any other (RFC 9113 §8.1): over the
// header list limit the sidecar advertises they reset the stream, as an
// oversized head is answered 431. They were taken up to the Framer's
// 1 MiB, HPACK making a 4 KB block decode to 800 KB, and passed on.
func TestH2OversizedTrailersRefused(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	r := dialRawH2(t, m.a, host)
	require.EqualValues(t, h2MaxHeaderList, r.peer[http2.SettingMaxHeaderListSize])
	require.NoError(t, r.writeHeaders(1, false, requestFields(http.MethodPost, host, "/upload?tag=t")))
	require.NoError(t, r.fr.WriteData(1, false, []byte("abc")))
	var trailers []hpack.HeaderField
	for i := range 15 {
		trailers = append(trailers, hpack.HeaderField{Name: "x-big-" + string(rune('a'+i)), Value: strings.Repeat("z", 40<<10)})
	}
	require.NoError(t, r.writeHeaders(1, true, trailers))
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway || ev.done(1) })
	require.Equal(t, http2.ErrCodeProtocol, ev.rst[1], "status %q body %q", ev.status[1], ev.body[1])
	require.False(t, ev.goAway, "only the stream")
}

// An upstream's interim (1xx) heads are not flow-controlled: past five
// (what Go's Transport takes) the upstream is in breach and the caller
// is answered 502, rather than each head queued for a caller that may
// not read (40,000 of them grew the queue to 26 MB). A 1xx that ends the
// stream is no response at all: 502 at once, not a wait for the stream
// idle timeout.
func TestH2InterimResponsesBounded(t *testing.T) {
	raw := startRawApp(t, func(sc *rawAppConn, id uint32, path string) {
		switch path {
		case "/flood":
			for range 40 {
				sc.head(id, http.StatusEarlyHints, false)
			}
			sc.respond(id, "late")
		case "/ended":
			sc.head(id, http.StatusEarlyHints, true)
		case "/few":
			for range h2MaxInterim {
				sc.head(id, http.StatusEarlyHints, false)
			}
			sc.respond(id, "ok")
		}
	})
	m, _, _ := startLifeMesh(t, nil, raw.addr)
	host := lifeRawSvc.host()
	r := dialRawH2(t, m.a, host)
	require.NoError(t, r.c.SetReadDeadline(time.Now().Add(waitFor)))
	for i, tc := range []struct{ path, status, body string }{
		{"/few", "200", "ok"},
		{"/flood", "502", "more than 5 interim (1xx) responses"},
		{"/ended", "502", "103 response with END_STREAM"},
	} {
		id := uint32(2*i + 1)
		require.NoError(t, r.writeHeaders(id, true, requestFields(http.MethodGet, host, tc.path)))
		ev := newRawEvents(65535)
		r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway || ev.done(id) })
		require.Equal(t, tc.status, ev.status[id], "%s: %s", tc.path, ev.body[id])
		require.Contains(t, string(ev.body[id]), tc.body, tc.path)
		require.LessOrEqual(t, ev.interim[id], h2MaxInterim, tc.path)
	}
}

// A drain's GOAWAY names the last stream taken; a HEADERS that crossed it
// is refused, and the GOAWAY that closes the connection never names a
// higher stream than the first (RFC 9113 §6.8: nghttp2 takes an increase
// for a connection error). It named the refused one.
func TestH2DrainGoAwayNeverRaisesTheLastStream(t *testing.T) {
	m, _, counting := startLifeMesh(t, func(c *Config) { c.DrainTimeout = 10 * time.Second }, netip.AddrPort{})
	host := lifeCountSvc.host()
	r := dialRawH2(t, m.a, host)
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/gate")))
	counting.waitArrived(t, "/gate")
	stopped := make(chan struct{})
	go func() { m.a.stop(t); close(stopped) }()
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway })
	require.Equal(t, uint32(1), ev.goAwayLast)
	lasts := []uint32{ev.goAwayLast}
	require.NoError(t, r.writeHeaders(3, true, requestFields(http.MethodGet, host, "/id?after=goaway")))
	ev.goAway = false
	// Every GOAWAY until the connection ends; stream 1 is let go once
	// stream 3 was refused, so that its end closes the connection.
	opened := false
	for ev.err == nil {
		r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway || !opened && ev.done(3) })
		if ev.goAway {
			lasts = append(lasts, ev.goAwayLast)
			ev.goAway = false
		}
		if ev.done(3) && !opened {
			counting.openGate()
			opened = true
		}
	}
	require.Equal(t, http2.ErrCodeRefusedStream, ev.rst[3])
	require.Equal(t, "gate open", string(ev.body[1]))
	require.GreaterOrEqual(t, len(lasts), 2, "the drain's GOAWAY, then the one closing the connection")
	for i := 1; i < len(lasts); i++ {
		require.LessOrEqual(t, lasts[i], lasts[i-1], "a later GOAWAY raised the last stream ID: %v", lasts)
	}
	select {
	case <-stopped:
	case <-time.After(waitFor):
		t.Fatal("Run did not return after the drain")
	}
}

// The bridge to an HTTP/1.1 upstream bounds interim heads as the HTTP/2
// path does; the HTTP/1.1 path shares the reader.
func TestH1InterimResponsesBounded(t *testing.T) {
	m, _ := startRawMesh(t)
	rc := dialRaw(t, m, rawHost)
	rc.send(t, "GET /many-hints HTTP/1.1\r\nHost: "+rawHost+"\r\n\r\n")
	interims := 0
	for {
		resp, err := http.ReadResponse(rc.br, &http.Request{Method: http.MethodGet})
		require.NoError(t, err)
		if resp.StatusCode >= 200 {
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, http.StatusBadGateway, resp.StatusCode, "%s", body)
			require.Contains(t, string(body), "more than 5 interim (1xx) responses")
			break
		}
		interims++
	}
	require.LessOrEqual(t, interims, h2MaxInterim)
}

// A HEADERS block the sidecar finds malformed opens its stream and the
// reset closes it (RFC 9113 §5.1): DATA the client sent before it saw the
// reset is ignored, other streams go on, and a new HEADERS on that ID is
// not a new request (frames on a stream this side reset are ignored).
// The stream stayed "idle": its DATA ended the whole connection, and its
// ID could be used again.
func TestH2MalformedHeadersCloseTheirStream(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	r := dialRawH2(t, m.a, host)
	bad := append(requestFields(http.MethodPost, host, "/upload?tag=x"), hpack.HeaderField{Name: "bad name", Value: "v"})
	require.NoError(t, r.writeHeaders(1, false, bad))
	require.NoError(t, r.fr.WriteData(1, true, []byte("body in flight")))
	require.NoError(t, r.writeHeaders(3, true, requestFields(http.MethodGet, host, "/id?n=after")))
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway || (ev.done(1) && ev.done(3)) })
	require.Equal(t, http2.ErrCodeProtocol, ev.rst[1])
	require.False(t, ev.goAway, "the connection stays: GOAWAY %v", ev.goAwayCode)
	require.Equal(t, "200", ev.status[3])

	delete(ev.rst, 1)
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/id?n=again")))
	require.NoError(t, r.writeHeaders(5, true, requestFields(http.MethodGet, host, "/id?n=last")))
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway || ev.done(5) })
	require.Equal(t, "200", ev.status[5])
	require.Empty(t, ev.status[1], "stream 1 was served again: %s", ev.body[1])
}
