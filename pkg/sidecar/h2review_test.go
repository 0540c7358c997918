package sidecar

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// A review of the sidecar's own HTTP/2 path (h2conn.go, h2stream.go,
// h2serve.go, tryconn.go). Each test asserts what a correct proxy does
// and describes the bug the review found there (fixed since).

// reviewDownConn is p's one downstream HTTP/2 connection on its own path.
func reviewDownConn(t testing.TB, p *Proxy) *h2Conn {
	t.Helper()
	var hc *h2Conn
	require.Eventually(t, func() bool {
		p.h2Mu.Lock()
		defer p.h2Mu.Unlock()
		for c := range p.h2Conns {
			hc = c
		}
		return len(p.h2Conns) == 1
	}, waitFor, 5*time.Millisecond, "one downstream HTTP/2 connection")
	return hc
}

// reviewConnState reads a connection's queue, blocked list, stream
// table and send window under its lock.
func reviewConnState(hc *h2Conn) (out, blocked, streams int, sendWin int64) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return len(hc.out), len(hc.blocked), len(hc.streams), hc.sendWin
}

// A client that opens a few large downloads and never reads them must
// not stall other clients on the upstream connection their streams
// share: each unread stream holds at most its own window there, and the
// connection's window comes back as bytes arrive (before the fix it came
// back only once they reached the slow client, so a handful of unread
// streams took all of it).
func TestH2ReviewSlowReadersStallOtherClients(t *testing.T) {
	m, app, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	slow := dialRawH2(t, m.a, host, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	const streams = 6
	for i := range streams {
		require.NoError(t, slow.writeHeaders(uint32(2*i+1), true,
			requestFields(http.MethodGet, host, fmt.Sprintf("/download?seed=%d&n=%d&tag=slow%d", i, 16<<20, i))))
	}
	written := func() int64 {
		var n int64
		for i := range streams {
			n += app.req(fmt.Sprintf("slow%d", i)).written.Load()
		}
		return n
	}
	// Each unread stream holds at most its window at each hop.
	require.Eventually(t, func() bool { return written() >= streams*h2StreamWindow }, waitFor, 10*time.Millisecond)
	time.Sleep(300 * time.Millisecond) // let the windows run dry
	t.Logf("b's app wrote %d bytes for the unread downloads", written())

	other := dialH2(t, m.a, host)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/id?n=other", nil)
	require.NoError(t, err)
	resp, err := other.cc.RoundTrip(req)
	require.NoError(t, err, "the other client's response head")
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err, "the other client's response body must not wait for the slow client")
	require.Equal(t, "id=other proto=HTTP/2.0", string(b))
}

// RFC 9113 §8.1: a server may send a complete response and then
// RST_STREAM(NO_ERROR) to stop the request body (net/http's server does
// when a handler returns without reading it). A proxy still owes its
// client the complete response (the sidecar used to reset the
// downstream stream and drop what it had not yet forwarded).
func TestH2ReviewNoErrorResetAfterCompleteResponse(t *testing.T) {
	const chunk, chunks = 16384, 8
	raw := startRawApp(t, func(sc *rawAppConn, id uint32, path string) {
		if path != "/early" {
			sc.respond(id, "ok")
			return
		}
		sc.head(id, http.StatusOK, false)
		for i := range chunks {
			_ = sc.fr.WriteData(id, i == chunks-1, bytes.Repeat([]byte{byte('a' + i)}, chunk))
		}
		_ = sc.fr.WriteRSTStream(id, http2.ErrCodeNo)
	})
	m, _, _ := startLifeMesh(t, nil, raw.addr)
	host := lifeRawSvc.host()
	r := dialRawH2(t, m.a, host, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1024})
	require.NoError(t, r.writeHeaders(1, false, requestFields(http.MethodPost, host, "/early")))
	require.NoError(t, r.fr.WriteData(1, false, []byte("the start of an upload the app never reads")))
	ev := newRawEvents(1024)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) })
	require.NoError(t, ev.err)
	require.Equal(t, "200", ev.status[1])
	require.True(t, ev.ended[1], "the response ends with END_STREAM, not a reset (rst %v) after %d of %d bytes",
		ev.rst, len(ev.body[1]), chunk*chunks)
	require.Len(t, ev.body[1], chunk*chunks)
}

// RFC 9113 §5.1: after sending RST_STREAM (or answering before the
// request ended and resetting it, §8.1), an endpoint must ignore frames
// the peer sent before it saw the reset. Trailers (HEADERS) that were
// already in flight used to make the sidecar end the whole connection
// with PROTOCOL_ERROR, killing every other stream on it.
func TestH2ReviewTrailersOnStreamTheSidecarReset(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	for _, tc := range []struct {
		name   string
		fields []hpack.HeaderField
	}{
		{"reset for a malformed request", append(requestFields(http.MethodPost, host, "/upload"), hpack.HeaderField{Name: "te", Value: "gzip"})},
		{"answered before the request ended", requestFields(http.MethodPost, "nowhere.invalid", "/upload")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRawH2(t, m.a, host)
			// The client writes its whole request before it reads a thing.
			require.NoError(t, r.writeHeaders(1, false, tc.fields))
			require.NoError(t, r.fr.WriteData(1, false, []byte("body")))
			require.NoError(t, r.writeHeaders(1, true, []hpack.HeaderField{{Name: "x-client-trailer", Value: "t"}}))
			require.NoError(t, r.writeHeaders(3, true, requestFields(http.MethodGet, host, "/id?n=after")))
			ev := newRawEvents(65535)
			r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(3) || ev.goAway })
			t.Logf("stream 1: status %q rst %v; goaway %v (%v)", ev.status[1], ev.rst, ev.goAway, ev.goAwayCode)
			require.False(t, ev.goAway, "the connection survives trailers in flight on a stream the sidecar ended (GOAWAY %v)", ev.goAwayCode)
			require.NoError(t, ev.err)
			require.Equal(t, "200", ev.status[3])
			require.Equal(t, "id=after proto=HTTP/2.0", string(ev.body[3]))
		})
	}
}

// "MadeYouReset" (CVE-2025-8671): the rapid-reset bound counts only the
// client's own RST_STREAM frames, but a client can make the sidecar do
// the resetting with a frame that breaks the stream's protocol: here
// DATA after END_STREAM (resetBoth STREAM_CLOSED). Each pair costs a
// routed request and an upstream stream opened and cancelled; such
// resets now count, and the connection is cut off.
func TestH2ReviewMadeYouReset(t *testing.T) {
	raw := startRawApp(t, func(*rawAppConn, uint32, string) {}) // never answers
	m, _, _ := startLifeMesh(t, nil, raw.addr)
	host := lifeRawSvc.host()
	r := dialRawH2(t, m.a, host)
	const n = 3000
	bw := bufio.NewWriterSize(r.c, 64<<10)
	fr := http2.NewFramer(bw, nil)
	fields := requestFields(http.MethodGet, host, "/reset")
	// The sidecar may cut the connection while the client still writes:
	// a write that fails then is the outcome under test, which the
	// GOAWAY read below confirms (it arrived before the reset).
	werr := func() error {
		for i := range n {
			id := uint32(2*i + 1)
			r.encBuf.Reset()
			for _, f := range fields {
				require.NoError(t, r.enc.WriteField(f))
			}
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.encBuf.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
				return err
			}
			if err := fr.WriteData(id, false, []byte{0}); err != nil { // after END_STREAM: the sidecar resets the stream
				return err
			}
		}
		if err := bw.Flush(); err != nil {
			return err
		}
		return r.fr.WritePing(false, [8]byte{'m', 'y', 'r'})
	}()
	if werr != nil {
		t.Logf("the client's writes ended early: %v", werr)
	}
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return len(ev.pingAcks) > 0 || ev.goAway })
	time.Sleep(500 * time.Millisecond)
	forwarded := len(raw.requests())
	t.Logf("%d HEADERS+DATA-after-END_STREAM pairs: %d streams reset by the sidecar, %d reached b's app; goaway %v (%v), read error %v",
		n, len(ev.rst), forwarded, ev.goAway, ev.goAwayCode, ev.err)
	require.True(t, ev.goAway, "the sidecar cuts off a client that makes it reset most streams, as it does one that resets them itself")
}

// A client that sends PINGs (or anything else the sidecar answers with a
// control frame) and never reads: the answers used to pile up
// in the connection's write queue without bound; now its reader stops
// reading past h2MaxQueued. net/http closes such a
// connection after 10000 queued control frames.
func TestH2ReviewControlFrameFlood(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	r := dialRawH2(t, m.a, h2Svc.host())
	if tcp, ok := r.c.(*net.TCPConn); ok {
		_ = tcp.SetReadBuffer(4096)
	}
	hc := reviewDownConn(t, m.a.proxy)
	const pings = 1 << 20 // 17 MiB of PING frames
	bw := bufio.NewWriterSize(r.c, 64<<10)
	fr := http2.NewFramer(bw, nil)
	var peak int
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			out, _, _, _ := reviewConnState(hc)
			mu.Lock()
			peak = max(peak, out)
			mu.Unlock()
		}
	})
	var err error
	for i := 0; i < pings && err == nil; i++ {
		err = fr.WritePing(false, [8]byte{byte(i), byte(i >> 8), byte(i >> 16)})
	}
	if err == nil {
		err = bw.Flush()
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("after %d PINGs never read (write error %v): the sidecar's queue for the client peaked at %d bytes", pings, err, peak)
	require.Less(t, peak, 4<<20, "the sidecar bounds what it queues for a client that does not read")
}

// RFC 9113 §6.5: the settings of one frame apply in order. A frame that
// sets INITIAL_WINDOW_SIZE twice (0, then back to 1024) changes no
// window; onSettings used to keep only the last difference (+1024), and
// the sidecar sent beyond the client's window.
func TestH2ReviewRepeatedInitialWindowSize(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	const window, size = 1024, 256 << 10
	r := dialRawH2(t, m.a, host, http2.Setting{ID: http2.SettingInitialWindowSize, Val: window})
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, fmt.Sprintf("/download?seed=5&n=%d", size))))
	require.NoError(t, r.fr.WriteSettings(
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: window}))
	ev := newRawEvents(window)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) || ev.overrun != "" })
	require.Empty(t, ev.overrun, "the sidecar keeps to the client's window")
	require.NoError(t, ev.err)
	require.Len(t, ev.body[1], size)
}

// A stream that waited for the downstream connection's window is listed
// in h2Conn.blocked until the client opens that window; a stream
// that ends leaves it (it used to stay there, with what it references,
// for the connection's life).
func TestH2ReviewBlockedListKeepsEndedStreams(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	r := dialRawH2(t, m.a, host)
	hc := reviewDownConn(t, m.a.proxy)
	// Stream 1 takes the client's whole connection window (65535).
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/download?seed=1&n=1048576")))
	require.Eventually(t, func() bool { _, _, _, w := reviewConnState(hc); return w <= 0 }, waitFor, 5*time.Millisecond)
	const n = 100
	for i := range n {
		id := uint32(2*i + 3)
		_, before, _, _ := reviewConnState(hc)
		require.NoError(t, r.writeHeaders(id, true, requestFields(http.MethodGet, host, fmt.Sprintf("/download?seed=%d&n=1000", i))))
		require.Eventually(t, func() bool { _, b, _, _ := reviewConnState(hc); return b > before }, waitFor, time.Millisecond)
		require.NoError(t, r.fr.WriteRSTStream(id, http2.ErrCodeCancel))
		require.Eventually(t, func() bool { _, _, s, _ := reviewConnState(hc); return s <= 1 }, waitFor, time.Millisecond)
	}
	require.Eventually(t, func() bool { _, _, s, _ := reviewConnState(hc); return s <= 1 }, waitFor, 5*time.Millisecond)
	_, blocked, streams, _ := reviewConnState(hc)
	t.Logf("%d streams reset: %d open, %d listed as blocked", n, streams, blocked)
	require.LessOrEqual(t, blocked, streams+1, "only open streams wait for the connection window")
}

// Run must return with no goroutine left, even when a request ended
// (the client reset it) while its upstream connection was still being
// dialled: that connection must close once its dial completes, not arm
// its 5-minute idle timer (fixed by eae19c9; before, Run waited 65 s and
// returned with the connection's goroutines still running).
func TestH2ReviewDrainWhileDialling(t *testing.T) {
	m, _, _ := startLifeMesh(t, func(c *Config) { c.DrainTimeout = 2 * time.Second }, netip.AddrPort{})
	// A slow way to b: the TCP connection to b's inbound is made 1 s
	// after a's sidecar connects.
	target := m.b.endpoint(ipLifeCount)
	slowAddr := serveTCP(t, func(c net.Conn) {
		time.Sleep(time.Second)
		up, err := net.Dial("tcp", target.String())
		if err != nil {
			return
		}
		defer up.Close()
		go func() { _, _ = io.Copy(up, c); _ = up.(*net.TCPConn).CloseWrite() }()
		_, _ = io.Copy(c, up)
	})
	slow := m.onB(lifeCountSvc, ipLifeCount)
	slow.locs[0].eps[0].addr = slowAddr
	m.set(t, "v2", m.onB(h2Svc, ipH2), slow, m.onB(lifeRawSvc, ipLifeRaw))

	host := lifeCountSvc.host()
	r := dialRawH2(t, m.a, host)
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/id")))
	require.NoError(t, r.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	time.Sleep(100 * time.Millisecond)

	start := time.Now()
	stopped := make(chan error, 1)
	go func() { m.a.cancel(); stopped <- <-m.a.done }()
	select {
	case err := <-stopped:
		close(m.a.done)
		require.NoError(t, err)
		t.Logf("Run returned after %v", time.Since(start))
	case <-time.After(waitFor):
		t.Fatal("Run did not return: an upstream connection dialled during the drain is left open")
	}
	m.b.stop(t)
	requireNoProductGoroutine(t)
}
