package sidecar

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The lifecycle of the sidecar's own HTTP/2 path (h2conn.go, h2serve.go,
// h2stream.go): connections that idle, drain, multiplex, and upstreams
// that refuse, go away or die. Everything is observed on the sockets of
// a's app and of b's app, as in h2_test.go; where the app must misbehave
// on purpose it speaks HTTP/2 frame by frame (rawApp).

var (
	// lifeCountSvc is b's countingApp, which counts the connections it
	// accepts; lifeRawSvc is b's rawApp of the test at hand.
	lifeCountSvc = svc{name: "h2-count", ns: "demo", vip: "240.240.0.30", ports: []svcPort{{80, true}}}
	lifeRawSvc   = svc{name: "h2-raw", ns: "demo", vip: "240.240.0.31", ports: []svcPort{{80, true}}}
	ipLifeCount  = netip.MustParseAddr("127.0.0.9")
	ipLifeRaw    = netip.MustParseAddr("127.0.0.10")
)

// startLifeMesh runs a and b (both edited by edit, when not nil) with
// b's h2App behind h2Svc, a countingApp behind lifeCountSvc and raw (a
// closed port when invalid) behind lifeRawSvc.
func startLifeMesh(t testing.TB, edit func(*Config), raw netip.AddrPort) (*mesh, *h2App, *countingApp) {
	t.Helper()
	m := &mesh{alpha: newTestCA(t, "alpha.mesh"), beta: newTestCA(t, "beta.mesh"), xds: startXDSServer(t),
		hosts: hostsOf(h2Svc, lifeCountSvc, lifeRawSvc)}
	m.a = startPod(t, "a", m.alpha, m.hosts, podOptions{xds: m.xds, edit: edit})
	m.b = startPod(t, "b", m.beta, m.hosts, podOptions{xds: m.xds, edit: edit})
	app, counting := startH2App(t), startCountingApp(t)
	if !raw.IsValid() {
		raw = closedAddr(t)
	}
	m.b.apps[ipH2], m.b.apps[ipLifeCount], m.b.apps[ipLifeRaw] = app.addr, counting.addr, raw // before any connection reads them
	m.set(t, "v1", m.onB(h2Svc, ipH2), m.onB(lifeCountSvc, ipLifeCount), m.onB(lifeRawSvc, ipLifeRaw))
	return m, app, counting
}

// countingApp is b's h2c (and HTTP/1.1) app that counts the connections
// it accepts. /slow?d= answers "slow done" after d; /gate answers "gate
// open" once the test calls openGate; /together?k= waits until k
// requests are in the app at once; everything else answers "ok".
type countingApp struct {
	addr     netip.AddrPort
	accepted atomic.Int64
	inside   atomic.Int64
	arrived  chan string // the path of every request, when someone listens
	gate     chan struct{}
	openOnce sync.Once
	// mu guards open.
	mu   sync.Mutex
	open chan struct{}
}

func startCountingApp(t testing.TB) *countingApp {
	t.Helper()
	a := &countingApp{arrived: make(chan string, 1024), open: make(chan struct{}), gate: make(chan struct{})}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case a.arrived <- r.URL.Path:
		default:
		}
		switch r.URL.Path {
		case "/slow":
			d, _ := time.ParseDuration(r.URL.Query().Get("d"))
			select {
			case <-time.After(d):
				_, _ = io.WriteString(w, "slow done")
			case <-r.Context().Done():
			}
		case "/gate":
			select {
			case <-a.gate:
				_, _ = io.WriteString(w, "gate open")
			case <-r.Context().Done():
			}
		case "/together":
			k, _ := strconv.ParseInt(r.URL.Query().Get("k"), 10, 64)
			a.mu.Lock()
			open := a.open
			if a.inside.Add(1) >= k {
				close(a.open)
				a.open = make(chan struct{})
			}
			a.mu.Unlock()
			defer a.inside.Add(-1)
			select {
			case <-open:
				_, _ = io.WriteString(w, "together")
			case <-r.Context().Done():
			case <-time.After(waitFor):
				http.Error(w, fmt.Sprintf("only %d of %d requests were in the app at once", a.inside.Load(), k), http.StatusInternalServerError)
			}
		default:
			_, _ = io.WriteString(w, "ok")
		}
	})
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &protos, ReadHeaderTimeout: waitFor,
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				a.accepted.Add(1)
			}
		}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	a.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	return a
}

// openGate lets every /gate request, held or to come, be answered.
func (a *countingApp) openGate() { a.openOnce.Do(func() { close(a.gate) }) }

// waitArrived waits for a request for path to reach the app.
func (a *countingApp) waitArrived(t testing.TB, path string) {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		select {
		case p := <-a.arrived:
			if p == path {
				return
			}
		case <-deadline:
			t.Fatalf("no request for %s reached b's app", path)
		}
	}
}

// --- b's app frame by frame ---

// rawApp is an h2c server written frame by frame, so it can refuse,
// reset, go away and die where net/http's would not. handle acts on
// each request's header block, on the connection's goroutine.
type rawApp struct {
	addr  netip.AddrPort
	conns atomic.Int64
	// mu guards seen.
	mu   sync.Mutex
	seen []string // "conn/stream path" of every request
}

type rawAppConn struct {
	n      int64 // the connection's number, from 1
	c      net.Conn
	fr     *http2.Framer
	enc    *hpack.Encoder
	encBuf bytes.Buffer
	// state is the handler's, per connection.
	state map[string]uint32
}

func startRawApp(t testing.TB, handle func(sc *rawAppConn, id uint32, path string)) *rawApp {
	t.Helper()
	a := &rawApp{}
	a.addr = serveTCP(t, func(c net.Conn) {
		sc := &rawAppConn{n: a.conns.Add(1), c: c, fr: http2.NewFramer(c, c), state: map[string]uint32{}}
		sc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		sc.enc = hpack.NewEncoder(&sc.encBuf)
		a.serve(sc, handle)
	})
	return a
}

func (a *rawApp) serve(sc *rawAppConn, handle func(sc *rawAppConn, id uint32, path string)) {
	_ = sc.c.SetDeadline(time.Now().Add(2 * waitFor))
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(sc.c, preface); err != nil || string(preface) != http2.ClientPreface {
		return
	}
	if sc.fr.WriteSettings() != nil {
		return
	}
	for {
		f, err := sc.fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = sc.fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				_ = sc.fr.WritePing(true, f.Data)
			}
		case *http2.DataFrame:
			if n := len(f.Data()); n > 0 {
				_ = sc.fr.WriteWindowUpdate(0, uint32(n))
			}
		case *http2.MetaHeadersFrame:
			path := f.PseudoValue("path")
			a.mu.Lock()
			a.seen = append(a.seen, fmt.Sprintf("%d/%d %s", sc.n, f.StreamID, path))
			a.mu.Unlock()
			handle(sc, f.StreamID, path)
		}
	}
}

func (a *rawApp) requests() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.seen...)
}

// head sends a response head.
func (sc *rawAppConn) head(id uint32, status int, end bool) {
	sc.encBuf.Reset()
	_ = sc.enc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	_ = sc.enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "text/plain"})
	_ = sc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: sc.encBuf.Bytes(), EndHeaders: true, EndStream: end})
}

// respond sends a whole 200 response.
func (sc *rawAppConn) respond(id uint32, body string) {
	sc.head(id, http.StatusOK, false)
	_ = sc.fr.WriteData(id, true, []byte(body))
}

// --- a's app frame by frame: what came on each stream ---

// rawEvents is what a raw client saw on its connection.
type rawEvents struct {
	status map[uint32]string
	body   map[uint32][]byte
	ended  map[uint32]bool
	rst    map[uint32]http2.ErrCode
	// interim counts the 1xx heads of each stream.
	interim map[uint32]int
	// goAway: a GOAWAY came, with lastID and code.
	goAway     bool
	goAwayLast uint32
	goAwayCode http2.ErrCode
	// pingAcks are the data of the PING acknowledgements.
	pingAcks [][8]byte
	// err ended the reading: the connection closed (or the deadline).
	err error
	// sendWin is the client's window per stream as the sidecar may use
	// it, initWin its start; overrun names a DATA frame beyond it.
	sendWin map[uint32]int64
	initWin int64
	overrun string
}

func newRawEvents(initWin int64) *rawEvents {
	return &rawEvents{status: map[uint32]string{}, body: map[uint32][]byte{}, ended: map[uint32]bool{},
		rst: map[uint32]http2.ErrCode{}, sendWin: map[uint32]int64{}, initWin: initWin, interim: map[uint32]int{}}
}

// done reports whether stream id ended, cleanly or by a reset.
func (ev *rawEvents) done(id uint32) bool {
	_, reset := ev.rst[id]
	return ev.ended[id] || reset
}

// pump reads frames into ev until until(ev) holds or the connection
// ends; it answers PING and SETTINGS, and gives every DATA frame's
// window back (stream and connection) once it was read.
func (r *rawH2) pump(t testing.TB, ev *rawEvents, until func(*rawEvents) bool) {
	t.Helper()
	for !until(ev) {
		f, err := r.fr.ReadFrame()
		if err != nil {
			ev.err = err
			return
		}
		id := f.Header().StreamID
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				require.NoError(t, r.fr.WriteSettingsAck())
			}
		case *http2.PingFrame:
			if f.IsAck() {
				ev.pingAcks = append(ev.pingAcks, f.Data)
			} else {
				require.NoError(t, r.fr.WritePing(true, f.Data))
			}
		case *http2.GoAwayFrame:
			ev.goAway, ev.goAwayLast, ev.goAwayCode = true, f.LastStreamID, f.ErrCode
		case *http2.RSTStreamFrame:
			ev.rst[id] = f.ErrCode
		case *http2.MetaHeadersFrame:
			// The final status: interim (1xx) heads are counted.
			if s := f.PseudoValue("status"); s != "" && (ev.status[id] == "" || strings.HasPrefix(ev.status[id], "1")) {
				if strings.HasPrefix(s, "1") {
					ev.interim[id]++
				}
				ev.status[id] = s
			}
			if f.StreamEnded() {
				ev.ended[id] = true
			}
		case *http2.DataFrame:
			if _, ok := ev.sendWin[id]; !ok {
				ev.sendWin[id] = ev.initWin
			}
			ev.sendWin[id] -= int64(f.Length)
			if ev.sendWin[id] < 0 && ev.overrun == "" {
				ev.overrun = fmt.Sprintf("stream %d: a DATA frame of %d bytes went %d bytes past the window", id, f.Length, -ev.sendWin[id])
			}
			ev.body[id] = append(ev.body[id], f.Data()...)
			if f.Length > 0 {
				require.NoError(t, r.fr.WriteWindowUpdate(0, f.Length))
				if !f.StreamEnded() {
					require.NoError(t, r.fr.WriteWindowUpdate(id, f.Length))
					ev.sendWin[id] += int64(f.Length)
				}
			}
			if f.StreamEnded() {
				ev.ended[id] = true
			}
		}
	}
}

func closed(ev *rawEvents) bool { return false } // pump until the connection ends

// --- goroutines ---

// requireNoProductGoroutine waits until no goroutine of the sidecar is
// left: every one Run started has ended.
func requireNoProductGoroutine(t testing.TB) {
	t.Helper()
	product := []string{"sidecar.(*Proxy)", "sidecar.(*pool)", "sidecar.(*connQueue)", "internal/relay.", "sidecar.newIdleWatch",
		"sidecar.(*h2Conn)", "sidecar.(*h2Stream)",
		"net/http.(*persistConn)", "net/http.(*http2ClientConn)", "net/http.(*http2serverConn)"}
	var last string
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		buf := make([]byte, 4<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		last = ""
		for g := range strings.SplitSeq(stacks, "\n\n") {
			for _, p := range product {
				if strings.Contains(g, p) {
					last += g + "\n\n"
					break
				}
			}
		}
		if last == "" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("sidecar goroutines still running after Run returned:\n%s", last)
}

// --- the tests ---

// An idle downstream HTTP/2 connection is closed after HTTPIdleTimeout
// with a GOAWAY; one whose stream outlasts that timeout is not closed
// while the stream is open (the sidecar PINGs it instead), and closes
// once idle for the timeout after it. Both paths, the net/http one as
// the reference.
func TestH2LifeIdleTimeout(t *testing.T) {
	for _, path := range h2Paths {
		t.Run(path.name, func(t *testing.T) {
			m, _, _ := startLifeMesh(t, func(c *Config) {
				c.NetHTTP2 = path.netHTTP2
				c.HTTPIdleTimeout = 300 * time.Millisecond
			}, netip.AddrPort{})
			host := lifeCountSvc.host()

			t.Run("idle connection closed", func(t *testing.T) {
				r := dialRawH2(t, m.a, host)
				ev := newRawEvents(65535)
				r.pump(t, ev, closed)
				require.True(t, ev.goAway, "a GOAWAY before the close; read error %v", ev.err)
				require.Equal(t, http2.ErrCodeNo, ev.goAwayCode)
				require.Zero(t, ev.goAwayLast, "no stream was opened")
				require.False(t, errors.Is(ev.err, os.ErrDeadlineExceeded), "the sidecar closed the connection: %v", ev.err)
			})

			t.Run("a stream longer than the idle timeout keeps the connection", func(t *testing.T) {
				r := dialRawH2(t, m.a, host)
				require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/slow?d=1500ms")))
				ev := newRawEvents(65535)
				r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) })
				require.NoError(t, ev.err, "the connection lived while its stream was open")
				require.False(t, ev.goAway, "no GOAWAY while a stream is open")
				require.True(t, ev.ended[1], "the stream ended cleanly: rst %v", ev.rst)
				require.Equal(t, "200", ev.status[1])
				require.Equal(t, "slow done", string(ev.body[1]))

				// Then idle: closed as any idle connection.
				r.pump(t, ev, closed)
				require.True(t, ev.goAway, "a GOAWAY before the close; read error %v", ev.err)
				require.Equal(t, uint32(1), ev.goAwayLast)
				require.False(t, errors.Is(ev.err, os.ErrDeadlineExceeded), "the sidecar closed the connection once idle: %v", ev.err)
			})

			t.Run("a net/http client's streams outlive the idle timeout", func(t *testing.T) {
				client := m.a.nat.httpClient(true)
				for i := range 2 {
					resp, err := client.Get("http://" + host + "/slow?d=500ms")
					require.NoError(t, err)
					b, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					require.NoError(t, err)
					require.Equal(t, "slow done", string(b), "request %d", i)
				}
			})
		})
	}
}

// With the default HTTPIdleTimeout (1h), an idle HTTP/2 connection lives
// on, before and after a stream.
func TestH2LifeDefaultIdleTimeoutKeepsConnection(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := lifeCountSvc.host()
	r := dialRawH2(t, m.a, host)
	r.ping(t, [8]byte{'b', 'e', 'f', 'o', 'r', 'e'})
	time.Sleep(2 * time.Second) // idle, well past the 1 s the reader moves its deadline by
	r.ping(t, [8]byte{'i', 'd', 'l', 'e', 'd'})
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/slow?d=1200ms")))
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) })
	require.NoError(t, ev.err)
	require.Equal(t, "slow done", string(ev.body[1]))
	time.Sleep(2 * time.Second)
	r.ping(t, [8]byte{'a', 'f', 't', 'e', 'r'})
}

// After a stream during which the reader moved its read deadline (by
// h2SendPingTimeout, 1 min, since a stream was open), a connection left
// idle still lives past that minute with the default HTTPIdleTimeout
// (1h): the deadline goes back to the idle timeout once the last stream
// ends. It takes 65 s: run with ISTHMUS_SLOW_TESTS=1.
func TestH2LifeIdleAfterStreamKeepsHTTPIdleTimeout(t *testing.T) {
	if os.Getenv("ISTHMUS_SLOW_TESTS") == "" {
		t.Skip("takes 65 s (h2SendPingTimeout is a constant): set ISTHMUS_SLOW_TESTS=1")
	}
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := lifeCountSvc.host()
	r := dialRawH2(t, m.a, host)
	require.NoError(t, r.c.SetDeadline(time.Now().Add(h2SendPingTimeout+2*waitFor)))
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/slow?d=2s")))
	// A frame more than a second into the stream: the reader moves its
	// deadline, by h2SendPingTimeout since a stream is open.
	time.Sleep(1200 * time.Millisecond)
	require.NoError(t, r.fr.WritePing(false, [8]byte{'m', 'i', 'd'}))
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) })
	require.NoError(t, ev.err)
	require.Equal(t, "slow done", string(ev.body[1]))
	time.Sleep(h2SendPingTimeout + 5*time.Second)
	r.ping(t, [8]byte{'a', 'f', 't', 'e', 'r'}) // fails: GOAWAY, then closed
}

// Streams from several downstream connections share the upstream
// connections to b, and so do sequential requests.
func TestH2LifeMultiplexing(t *testing.T) {
	m, _, counting := startLifeMesh(t, nil, netip.AddrPort{})
	host := lifeCountSvc.host()
	const conns, perConn = 4, 50
	clients := make([]*h2Client, conns)
	for i := range clients {
		clients[i] = dialH2(t, m.a, host)
	}
	inboundBefore := metricValue(t, m.b.scrape(t), "isthmus_sidecar_connections_total", "listener=inbound")
	require.Less(t, inboundBefore, 1.0, "no connection to b yet")

	reqs := make([]*http.Request, conns*perConn)
	for i := range reqs {
		reqs[i] = clients[i%conns].request(t, http.MethodGet, fmt.Sprintf("/together?k=%d&n=%d", conns*perConn, i), nil)
	}
	for i, r := range concurrently(clients[:], reqs) {
		require.NoError(t, r.err, "stream %d", i)
		require.Equal(t, http.StatusOK, r.code, "stream %d: %s", i, r.body)
		require.Equal(t, "together", r.body, "stream %d", i)
	}
	for i, c := range clients {
		require.EqualValues(t, 1, c.dials.Load(), "client %d used one connection", i)
	}
	outbound := metricValue(t, m.a.scrape(t), "isthmus_sidecar_connections_total", "listener=outbound")
	inbound := metricValue(t, m.b.scrape(t), "isthmus_sidecar_connections_total", "listener=inbound")
	appConns := counting.accepted.Load()
	t.Logf("%d streams together over %d downstream connections: a accepted %v, b's inbound %v, b's app %d",
		conns*perConn, conns, outbound, inbound, appConns)
	require.EqualValues(t, conns, outbound)
	// One connection takes 1024 streams once its SETTINGS came; before,
	// the sidecar assumes 100 (h2DefaultPeerStreams): at most two.
	require.LessOrEqual(t, inbound, 2.0, "a's streams share its connections to b")
	require.GreaterOrEqual(t, inbound, 1.0)
	require.LessOrEqual(t, appConns, int64(3), "b's streams share its connections to the app")

	for round := range 5 {
		for i, c := range clients {
			r := c.get(t, fmt.Sprintf("/id?round=%d&client=%d", round, i))
			require.NoError(t, r.err)
			require.Equal(t, "ok", r.body)
		}
	}
	require.Equal(t, inbound, metricValue(t, m.b.scrape(t), "isthmus_sidecar_connections_total", "listener=inbound"),
		"sequential requests reuse a's connections to b")
	require.Equal(t, appConns, counting.accepted.Load(), "and b's connections to the app")
}

// Run's context ends while an HTTP/2 response is in flight: the client
// gets a GOAWAY, its stream in flight completes, a new stream is
// refused, the connection closes after the last stream, and Run returns
// with none of its goroutines left.
func TestH2LifeDrain(t *testing.T) {
	m, _, counting := startLifeMesh(t, func(c *Config) { c.DrainTimeout = 10 * time.Second }, netip.AddrPort{})
	host := lifeCountSvc.host()
	r := dialRawH2(t, m.a, host)
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/gate")))
	counting.waitArrived(t, "/gate")

	stopped := make(chan struct{})
	go func() { m.a.stop(t); close(stopped) }()
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.goAway || ev.done(1) })
	require.NoError(t, ev.err)
	require.True(t, ev.goAway, "the drain sends a GOAWAY before the stream in flight ends")
	require.False(t, ev.done(1), "the stream in flight is still open")
	require.Equal(t, http2.ErrCodeNo, ev.goAwayCode)
	require.Equal(t, uint32(1), ev.goAwayLast, "the GOAWAY names the stream in flight as the last one processed")

	require.NoError(t, r.writeHeaders(3, true, requestFields(http.MethodGet, host, "/id?after=goaway")))
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(3) })
	require.NoError(t, ev.err)
	require.Equal(t, http2.ErrCodeRefusedStream, ev.rst[3], "a stream after the GOAWAY is refused (safe to retry elsewhere)")
	require.Empty(t, ev.status[3], "and never answered")
	require.False(t, ev.done(1), "while the stream in flight is still open")

	counting.openGate()
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) })
	require.NoError(t, ev.err)
	require.True(t, ev.ended[1], "the stream in flight ends cleanly: rst %v", ev.rst)
	require.Equal(t, "200", ev.status[1])
	require.Equal(t, "gate open", string(ev.body[1]))

	r.pump(t, ev, closed)
	require.False(t, errors.Is(ev.err, os.ErrDeadlineExceeded), "the sidecar closed the connection after its last stream: %v", ev.err)
	select {
	case <-stopped:
	case <-time.After(waitFor):
		t.Fatal("Run did not return after the drain")
	}
	_, err := net.DialTimeout("tcp", m.a.proxy.OutboundAddr().String(), time.Second)
	require.Error(t, err, "the outbound listener is closed")
	m.b.stop(t)
	requireNoProductGoroutine(t)
}

// b's app refuses a stream once (RST_STREAM REFUSED_STREAM, which says
// it did nothing with it): b's sidecar opens it again and a's app gets
// the answer.
func TestH2LifeUpstreamRefusedStream(t *testing.T) {
	var refused atomic.Int64
	raw := startRawApp(t, func(sc *rawAppConn, id uint32, path string) {
		if path == "/refuse-once" && refused.Add(1) == 1 {
			_ = sc.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
			return
		}
		sc.respond(id, "answered "+path)
	})
	m, _, _ := startLifeMesh(t, nil, raw.addr)
	c := dialH2(t, m.a, lifeRawSvc.host())
	r := c.get(t, "/refuse-once")
	require.NoError(t, r.err)
	require.Equal(t, http.StatusOK, r.code, r.body)
	require.Equal(t, "answered /refuse-once", r.body)
	require.Equal(t, []string{"1/1 /refuse-once", "1/3 /refuse-once"}, raw.requests(),
		"the refused stream was opened again, on the same connection")
	r = c.get(t, "/after")
	require.NoError(t, r.err)
	require.Equal(t, "answered /after", r.body)
}

// b's app sends a GOAWAY whose last stream is below a stream in flight:
// the stream it processed is answered on the old connection, the other
// goes to a new one, and both reach a's app as 200.
func TestH2LifeUpstreamGoAway(t *testing.T) {
	raw := startRawApp(t, func(sc *rawAppConn, id uint32, path string) {
		switch {
		case path == "/first":
			sc.state["first"] = id // answered once the second came
		case path == "/second" && sc.state["first"] != 0:
			first := sc.state["first"]
			_ = sc.fr.WriteGoAway(first, http2.ErrCodeNo, nil)
			sc.respond(first, fmt.Sprintf("first on connection %d", sc.n))
		default:
			sc.respond(id, fmt.Sprintf("%s on connection %d", strings.TrimPrefix(path, "/"), sc.n))
		}
	})
	m, _, _ := startLifeMesh(t, nil, raw.addr)
	c := dialH2(t, m.a, lifeRawSvc.host())
	first := make(chan h2Result, 1)
	req := c.request(t, http.MethodGet, "/first", nil)
	go func() {
		resp, err := c.cc.RoundTrip(req)
		if err != nil {
			first <- h2Result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		first <- h2Result{code: resp.StatusCode, body: string(b), err: err}
	}()
	require.Eventually(t, func() bool { return len(raw.requests()) == 1 }, waitFor, 5*time.Millisecond)
	r := c.get(t, "/second")
	require.NoError(t, r.err)
	require.Equal(t, http.StatusOK, r.code, r.body)
	require.Equal(t, "second on connection 2", r.body, "the stream the GOAWAY did not take went to a new connection")
	r1 := <-first
	require.NoError(t, r1.err)
	require.Equal(t, http.StatusOK, r1.code, r1.body)
	require.Equal(t, "first on connection 1", r1.body, "the stream the GOAWAY took was answered")
	require.EqualValues(t, 2, raw.conns.Load())
	require.Equal(t, []string{"1/1 /first", "1/3 /second", "2/1 /second"}, raw.requests())
	r = c.get(t, "/again")
	require.NoError(t, r.err)
	require.Equal(t, "again on connection 2", r.body, "the new connection carries on")
}

// b's app's connection dies: before the response head a's app gets 503
// with Envoy's words; after it, a stream error, never a clean end. Both
// paths, the net/http one as the reference.
func TestH2LifeUpstreamDies(t *testing.T) {
	for _, path := range h2Paths {
		t.Run(path.name, func(t *testing.T) { testH2LifeUpstreamDies(t, path.netHTTP2) })
	}
}

func testH2LifeUpstreamDies(t *testing.T, netHTTP2 bool) {
	raw := startRawApp(t, func(sc *rawAppConn, id uint32, path string) {
		switch path {
		case "/die-before-head":
			_ = sc.c.Close()
		case "/die-mid-response":
			sc.head(id, http.StatusOK, false)
			_ = sc.fr.WriteData(id, false, []byte("partial\n"))
			_ = sc.c.Close()
		default:
			sc.respond(id, "answered "+path)
		}
	})
	m, _, _ := startLifeMesh(t, func(c *Config) { c.NetHTTP2 = netHTTP2 }, raw.addr)
	c := dialH2(t, m.a, lifeRawSvc.host())

	r := c.get(t, "/die-before-head")
	require.NoError(t, r.err, "the sidecar's answer ends cleanly")
	require.Equal(t, http.StatusServiceUnavailable, r.code, r.body)
	require.True(t, strings.HasPrefix(r.body, "upstream connect error or disconnect/reset before headers. reset reason: "), "body %q", r.body)
	if !netHTTP2 {
		// The net/http path words it after its Transport's error
		// ("remote reset: ..."); the own path as Envoy does.
		require.Equal(t, "upstream connect error or disconnect/reset before headers. reset reason: connection termination", r.body,
			"Envoy's words for an upstream connection that closed")
	}

	r = c.get(t, "/die-mid-response")
	require.Equal(t, http.StatusOK, r.code)
	require.Equal(t, "partial\n", r.body, "what the app sent before it died came")
	require.Error(t, r.err, "then a stream error, never a clean end of stream")
	t.Logf("a's app saw: %v", r.err)

	r = c.get(t, "/after")
	require.NoError(t, r.err, "the downstream connection carries on")
	require.Equal(t, "answered /after", r.body, "on a new connection to the app")
	if netHTTP2 {
		// net/http's Transport may retry the GET whose connection died
		// before any response on a connection of its own (seen once in
		// CI): one more.
		require.Contains(t, []int64{3, 4}, raw.conns.Load())
	} else {
		require.EqualValues(t, 3, raw.conns.Load())
	}
}

// b's app breaks HTTP/2 before a response head: a malformed head, DATA
// first, a frame that is a connection error (a zero window increment,
// DATA on a stream never opened), a content-length with no body. On the own path a's app gets Envoy's 502 "protocol error" naming
// the breach, never a 503; the next request is answered. The net/http
// path, the reference, answers 503 (its Transport's errors carry no type
// that tells them apart).
func TestH2LifeUpstreamProtocolError(t *testing.T) {
	for _, path := range h2Paths {
		t.Run(path.name, func(t *testing.T) { testH2LifeUpstreamProtocolError(t, path.netHTTP2) })
	}
}

func testH2LifeUpstreamProtocolError(t *testing.T, netHTTP2 bool) {
	raw := startRawApp(t, func(sc *rawAppConn, id uint32, path string) {
		sc.encBuf.Reset()
		switch path {
		case "/uppercase":
			_ = sc.enc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
			_ = sc.enc.WriteField(hpack.HeaderField{Name: "Content-Type", Value: "text/plain"})
			_ = sc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: sc.encBuf.Bytes(), EndHeaders: true, EndStream: true})
		case "/no-status":
			_ = sc.enc.WriteField(hpack.HeaderField{Name: "content-type", Value: "text/plain"})
			_ = sc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: sc.encBuf.Bytes(), EndHeaders: true, EndStream: true})
		case "/data-first":
			_ = sc.fr.WriteData(id, true, []byte("no head"))
		case "/idle-stream":
			_ = sc.fr.WriteData(id+200, true, []byte("x")) // a stream the sidecar never opened (§5.1)
		case "/zero-window-update":
			sc.fr.AllowIllegalWrites = true
			_ = sc.fr.WriteWindowUpdate(0, 0) // a connection error (RFC 9113 §6.9)
		case "/length-no-body", "/length-over", "/not-modified":
			status := "200"
			if path == "/not-modified" {
				status = "304" // its content-length is the representation's: no body
			}
			_ = sc.enc.WriteField(hpack.HeaderField{Name: ":status", Value: status})
			_ = sc.enc.WriteField(hpack.HeaderField{Name: "content-length", Value: "5"})
			bodyless := path != "/length-over"
			_ = sc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: sc.encBuf.Bytes(), EndHeaders: true, EndStream: bodyless})
			if !bodyless {
				_ = sc.fr.WriteData(id, false, []byte("12345"))
				_ = sc.fr.WriteData(id, true, []byte("6"))
			}
		default:
			sc.respond(id, "answered "+path)
		}
	})
	m, _, _ := startLifeMesh(t, func(c *Config) { c.NetHTTP2 = netHTTP2 }, raw.addr)
	const upe = "upstream connect error or disconnect/reset before headers. reset reason: protocol error: "
	for _, tc := range []struct{ path, why string }{
		{"/uppercase", "invalid header field name \"Content-Type\""},
		{"/no-status", "response headers without :status"},
		{"/data-first", "DATA before the response's head"},
		{"/zero-window-update", "connection error PROTOCOL_ERROR"},
		{"/idle-stream", "connection error PROTOCOL_ERROR"},
		{"/length-no-body", "DATA do not add up to the content-length"},
	} {
		c := dialH2(t, m.a, lifeRawSvc.host())
		r := c.get(t, tc.path)
		require.NoError(t, r.err, "%s: the sidecar's answer ends cleanly", tc.path)
		if netHTTP2 {
			require.Equal(t, http.StatusServiceUnavailable, r.code, "%s: %s", tc.path, r.body)
			t.Logf("%s: %s", tc.path, r.body)
		} else {
			require.Equal(t, http.StatusBadGateway, r.code, "%s: %s", tc.path, r.body)
			require.Equal(t, upe+tc.why, r.body, tc.path)
		}
		r = c.get(t, "/after")
		require.NoError(t, r.err, tc.path)
		require.Equal(t, "answered /after", r.body, "%s: the next request is answered", tc.path)
	}

	// More DATA than the content-length, after the head went down: the
	// excess never goes down, and the stream ends in a reset, never
	// cleanly (RFC 9113 §8.1.1). A 304's content-length binds no body.
	host := lifeRawSvc.host()
	r := dialRawH2(t, m.a, host)
	require.NoError(t, r.writeHeaders(1, true, requestFields(http.MethodGet, host, "/length-over")))
	require.NoError(t, r.writeHeaders(3, true, requestFields(http.MethodGet, host, "/not-modified")))
	ev := newRawEvents(65535)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) && ev.done(3) })
	require.NoError(t, ev.err)
	require.NotContains(t, string(ev.body[1]), "6", "the excess never came")
	_, reset := ev.rst[1]
	if netHTTP2 {
		// net/http reads the excess before the head goes down: a 503.
		// Its Transport takes the 304's content-length for a body that
		// is missing: a 503 too.
		require.True(t, ev.status[1] != "200" || reset, "status %s, never a clean 200", ev.status[1])
		return
	}
	require.Equal(t, "200", ev.status[1])
	require.False(t, ev.ended[1], "no END_STREAM")
	require.True(t, reset, "a reset")
	require.Equal(t, "304", ev.status[3])
	require.True(t, ev.ended[3])
	require.NotContains(t, ev.rst, uint32(3))
}

// A client that advertises a 1 KiB stream window still gets a 1 MiB
// response whole, and never a DATA byte beyond its window.
func TestH2LifeTinyClientWindow(t *testing.T) {
	m, _, _ := startLifeMesh(t, nil, netip.AddrPort{})
	host := h2Svc.host()
	const window, size = 1024, 1 << 20
	r := dialRawH2(t, m.a, host, http2.Setting{ID: http2.SettingInitialWindowSize, Val: window})
	for id := uint32(1); id <= 3; id += 2 {
		seed := uint64(20 + id)
		require.NoError(t, r.writeHeaders(id, true, requestFields(http.MethodGet, host, fmt.Sprintf("/download?seed=%d&n=%d", seed, size))))
	}
	ev := newRawEvents(window)
	r.pump(t, ev, func(ev *rawEvents) bool { return ev.done(1) && ev.done(3) })
	require.NoError(t, ev.err)
	require.Empty(t, ev.overrun, "the sidecar kept to the client's window")
	for id := uint32(1); id <= 3; id += 2 {
		require.True(t, ev.ended[id], "stream %d ended cleanly: rst %v", id, ev.rst)
		require.Equal(t, "200", ev.status[id])
		require.Len(t, ev.body[id], size)
		sum := sha256.Sum256(ev.body[id])
		require.Equal(t, h2Sum(uint64(20+id), size), hex.EncodeToString(sum[:]), "stream %d came whole, in order", id)
	}
}

// A frame larger than the SETTINGS_MAX_FRAME_SIZE the sidecar
// announced (16384 when it announces none) is a connection error
// (FRAME_SIZE_ERROR, RFC 9113 §4.2): the connection ends, and nothing
// after the frame is acted on.
func TestH2LifeOversizedFrame(t *testing.T) {
	for _, path := range h2Paths {
		t.Run(path.name, func(t *testing.T) {
			m, _, _ := startLifeMesh(t, func(c *Config) { c.NetHTTP2 = path.netHTTP2 }, netip.AddrPort{})
			r := dialRawH2(t, m.a, h2Svc.host())
			limit := r.peer[http2.SettingMaxFrameSize]
			if limit == 0 {
				limit = 16384 // RFC 9113's initial value
			}
			// An extension frame (which a peer ignores when it is within
			// the size) one byte too large, then a PING.
			require.NoError(t, r.fr.WriteRawFrame(0xfa, 0, 0, make([]byte, limit+1)))
			require.NoError(t, r.fr.WritePing(false, [8]byte{'a', 'f', 't', 'e', 'r'}))
			ev := newRawEvents(65535)
			r.pump(t, ev, func(ev *rawEvents) bool { return len(ev.pingAcks) > 0 })
			t.Logf("the sidecar announced SETTINGS_MAX_FRAME_SIZE %d; after a frame of %d bytes: goaway %v (%v), ping acks %d, read error %v",
				r.peer[http2.SettingMaxFrameSize], limit+1, ev.goAway, ev.goAwayCode, len(ev.pingAcks), ev.err)
			require.Empty(t, ev.pingAcks, "the PING after an oversized frame is never answered: the connection ended")
			require.False(t, errors.Is(ev.err, os.ErrDeadlineExceeded), "the sidecar closed the connection: %v", ev.err)
			if ev.goAway {
				require.Equal(t, http2.ErrCodeFrameSize, ev.goAwayCode)
			}
		})
	}
}

// --- fuzzing ---

// fuzzFrames builds a seed: frames written with http2.Framer.
func fuzzFrames(write func(fr *http2.Framer, enc func(fields ...hpack.HeaderField) []byte)) []byte {
	var buf, hbuf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	fr.AllowIllegalWrites = true
	e := hpack.NewEncoder(&hbuf)
	write(fr, func(fields ...hpack.HeaderField) []byte {
		hbuf.Reset()
		for _, f := range fields {
			_ = e.WriteField(f)
		}
		return append([]byte(nil), hbuf.Bytes()...)
	})
	return buf.Bytes()
}

func fuzzSeeds() [][]byte {
	host := h2Svc.host()
	get := func(path string) []hpack.HeaderField { return requestFields(http.MethodGet, host, path) }
	post := func(path string) []hpack.HeaderField { return requestFields(http.MethodPost, host, path) }
	type enc = func(...hpack.HeaderField) []byte
	return [][]byte{
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteSettings(); _ = fr.WriteSettingsAck() }),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1024}, http2.Setting{ID: http2.SettingMaxFrameSize, Val: 16384})
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(get("/id?n=1")...), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteSettings()
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(post("/upload")...), EndHeaders: true})
			_ = fr.WriteData(1, false, []byte("hello "))
			_ = fr.WriteDataPadded(1, true, []byte("world"), make([]byte, 17))
			_ = fr.WriteWindowUpdate(0, 1<<20)
			_ = fr.WriteWindowUpdate(1, 1<<16)
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(get("/drip?n=5")...), EndStream: true, EndHeaders: true})
			_ = fr.WriteRSTStream(1, http2.ErrCodeCancel)
			_ = fr.WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8})
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: e(get("/id?n=3")...), EndStream: true, EndHeaders: true})
			_ = fr.WriteGoAway(3, http2.ErrCodeNo, []byte("bye"))
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			block := e(append(get("/headers"), hpack.HeaderField{Name: "x-big", Value: strings.Repeat("b", 300)})...)
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:10], EndStream: true,
				Priority: http2.PriorityParam{StreamDep: 0, Weight: 200, Exclusive: true}})
			_ = fr.WriteContinuation(1, false, block[10:100])
			_ = fr.WriteContinuation(1, true, block[100:])
			_ = fr.WritePriority(3, http2.PriorityParam{StreamDep: 1, Weight: 10})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(post("/trailers")...), EndHeaders: true})
			_ = fr.WriteData(1, false, []byte("body"))
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(hpack.HeaderField{Name: "x-trailer", Value: "t"}), EndStream: true, EndHeaders: true})
		}),
		// Malformed: what a peer may not send.
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteData(0, true, []byte("on stream 0")) }),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: e(get("/even")...), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteWindowUpdate(1, 0); _ = fr.WriteWindowUpdate(0, 1<<31-1) }),
		fuzzFrames(func(fr *http2.Framer, _ enc) {
			_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteContinuation(1, true, []byte{0x82}) }),
		fuzzFrames(func(fr *http2.Framer, _ enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff}, EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(append(get("/id"),
				hpack.HeaderField{Name: "Upper", Value: "x"}, hpack.HeaderField{Name: "connection", Value: "close"})...), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: e(get("/push")...), EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(post("/upload")...), EndHeaders: true})
			_ = fr.WriteWindowUpdate(1, 1<<31-1)
			_ = fr.WriteWindowUpdate(1, 1<<31-1)
			_ = fr.WriteData(1, true, make([]byte, 70000)) // beyond every window and frame size
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteRawFrame(http2.FrameSettings, 0, 0, []byte{0, 4, 0}) }),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteRawFrame(0xfa, 0xff, 7, []byte("an unknown frame type")) }),
		{0, 0, 0},
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
	}
}

// FuzzH2Downstream writes arbitrary frames after the client preface to
// a's outbound listener (the own HTTP/2 path), then checks the sidecar
// let go of the connection and its streams and still proxies requests;
// at the end, that Run leaves no goroutine.
func FuzzH2Downstream(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Cleanup(func() { requireNoProductGoroutine(f) }) // after the pods stopped: cleanups run last first
	m, _, _ := startLifeMesh(f, func(c *Config) { c.StreamIdleTimeout = 2 * time.Second }, netip.AddrPort{})
	health := dialH2(f, m.a, h2Svc.host())
	host := net.JoinHostPort(h2Svc.host(), "80")
	marker := [8]byte{'f', 'u', 'z', 'z', 'd', 'o', 'n', 'e'}
	var ping bytes.Buffer
	_ = http2.NewFramer(&ping, nil).WritePing(false, marker)

	f.Fuzz(func(t *testing.T, data []byte) {
		// go test -fuzz has no per-input timeout: a stuck input ends the
		// worker with every goroutine's stack, which the crash report
		// shows.
		stuck := time.AfterFunc(20*time.Second, func() {
			buf := make([]byte, 16<<20)
			panic(fmt.Sprintf("input stuck for 20s: %x\n%s", data, buf[:runtime.Stack(buf, true)]))
		})
		defer stuck.Stop()
		c, err := m.a.nat.dial(t.Context(), host)
		require.NoError(t, err)
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		// Written from another goroutine: the sidecar may stop reading
		// (flow control, a closed connection) while frames are pending.
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			_, _ = c.Write(slices.Concat([]byte(http2.ClientPreface), fuzzAlign(data), ping.Bytes()))
		}()
		// Read until the PING's acknowledgement (every frame before it
		// was acted on) and a moment more for quick answers, or the
		// close, or the deadline.
		fr := http2.NewFramer(io.Discard, c)
		for {
			frame, err := fr.ReadFrame()
			if err != nil {
				var se http2.StreamError
				if errors.As(err, &se) {
					continue
				}
				break
			}
			if p, ok := frame.(*http2.PingFrame); ok && p.IsAck() && p.Data == marker {
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
			}
		}
		_ = c.Close()
		<-wrote

		// The connection and its streams are let go of (the health
		// client's connection stays).
		deadline := time.Now().Add(5 * time.Second)
		for {
			m.a.proxy.h2Mu.Lock()
			open := len(m.a.proxy.h2Conns)
			m.a.proxy.h2Mu.Unlock()
			inFlight := m.a.proxy.requests.value()
			if open <= 1 && inFlight == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a's sidecar still holds %d HTTP/2 connections and %d requests after the client closed", open, inFlight)
			}
			time.Sleep(time.Millisecond)
		}
		// And the sidecar still proxies.
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+h2Svc.host()+"/id?n=health", nil)
		require.NoError(t, err)
		r := health.do(t, req)
		require.NoError(t, r.err)
		require.Equal(t, http.StatusOK, r.code, r.body)
		require.Equal(t, "id=health proto=HTTP/2.0", r.body)
	})
}

// fuzzAlign completes data's last frame with zeros, so that a frame
// written after it is read as one. It drops a frame larger than
// SETTINGS_MAX_FRAME_SIZE's initial value, and what follows: the own
// path waits for such a frame's payload instead of ending the
// connection (TestH2LifeOversizedFrame), which would only make every
// such input wait for the read deadline.
func fuzzAlign(data []byte) []byte {
	data = slices.Clip(data) // appends copy: the input is not ours
	off := 0
	for off < len(data) {
		if off+9 > len(data) {
			data = append(data, make([]byte, off+9-len(data))...)
		}
		n := int(data[off])<<16 | int(data[off+1])<<8 | int(data[off+2])
		if n > 16384 {
			return data[:off]
		}
		off += 9 + n
	}
	return append(data, make([]byte, off-len(data))...)
}

// An app that takes one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS
// 1) gets one per connection: of a burst, the streams b's sidecar opened
// on its first connection before the app's SETTINGS came are refused and
// opened again, each on a new connection, which assumes the app's limit
// instead of 100. Before, each new connection took every refused stream
// again, and the burst ran out of attempts (503s).
func TestH2LifeUpstreamStreamLimit(t *testing.T) {
	var accepted atomic.Int64
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		time.Sleep(20 * time.Millisecond) // the burst overlaps
		_, _ = io.WriteString(w, "one at a time")
	})
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Handler: h, Protocols: &protos, ReadHeaderTimeout: waitFor,
		HTTP2: &http.HTTP2Config{MaxConcurrentStreams: 1},
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				accepted.Add(1)
			}
		}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })

	m, _, _ := startLifeMesh(t, nil, ln.Addr().(*net.TCPAddr).AddrPort())
	c := dialH2(t, m.a, lifeRawSvc.host())
	const burst = 8
	for round := range 2 { // the second finds the limit known
		reqs := make([]*http.Request, burst)
		for i := range reqs {
			reqs[i] = c.request(t, http.MethodGet, fmt.Sprintf("/?n=%d", i), nil)
		}
		for i, r := range concurrently([]*h2Client{c}, reqs) {
			require.NoError(t, r.err, "round %d, stream %d", round, i)
			require.Equal(t, http.StatusOK, r.code, "round %d, stream %d: %s", round, i, r.body)
			require.Equal(t, "one at a time", r.body)
		}
	}
	// One connection per stream in flight at most, reused by the second
	// burst: never a connection per refusal.
	t.Logf("b's sidecar opened %d connections to the app for 2 bursts of %d", accepted.Load(), burst)
	require.Greater(t, accepted.Load(), int64(1))
	require.LessOrEqual(t, accepted.Load(), int64(2*burst))
}

// fuzzUpstreamSeeds are b's app's answers to a request, written with
// stream 1 standing for the request's stream (fuzzOnStream).
func fuzzUpstreamSeeds() [][]byte {
	type enc = func(...hpack.HeaderField) []byte
	ok := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "text/plain"}}
	return [][]byte{
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(ok...), EndHeaders: true})
			_ = fr.WriteData(1, true, []byte("answered"))
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(hpack.HeaderField{Name: ":status", Value: "103"}, hpack.HeaderField{Name: "link", Value: "</a>"}), EndHeaders: true})
			block := e(append(ok, hpack.HeaderField{Name: "x-big", Value: strings.Repeat("b", 300)})...)
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:5]})
			_ = fr.WriteContinuation(1, true, block[5:])
			_ = fr.WriteDataPadded(1, false, []byte("padded"), make([]byte, 9))
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(hpack.HeaderField{Name: "grpc-status", Value: "0"}), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0}, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 0})
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(ok...), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(ok...), EndHeaders: true})
			_ = fr.WriteData(1, false, []byte("partial"))
			_ = fr.WriteRSTStream(1, http2.ErrCodeInternal)
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteGoAway(0, http2.ErrCodeEnhanceYourCalm, []byte("calm")) }),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WritePing(false, [8]byte{1}); _ = fr.WriteWindowUpdate(1, 1<<20) }),
		// Malformed: what an app may not send.
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteData(1, true, []byte("before the head")) }),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(hpack.HeaderField{Name: "Upper", Value: "x"}, hpack.HeaderField{Name: ":status", Value: "2x0"}), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(append(ok, hpack.HeaderField{Name: "connection", Value: "close"})...), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: e(append(ok, hpack.HeaderField{Name: "content-length", Value: "3"})...), EndHeaders: true})
			_ = fr.WriteData(1, true, []byte("more than three"))
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: e(requestFields(http.MethodGet, "x", "/push")...), EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, e enc) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: e(ok...), EndStream: true, EndHeaders: true})
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 2, BlockFragment: e(ok...), EndStream: true, EndHeaders: true})
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) {
			_ = fr.WriteWindowUpdate(0, 1<<31-1)
			_ = fr.WriteWindowUpdate(0, 1<<31-1)
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) {
			_ = fr.WriteRawFrame(http2.FrameSettings, 0, 0, []byte{0, 5, 0, 0, 0, 1})
		}),
		fuzzFrames(func(fr *http2.Framer, _ enc) { _ = fr.WriteRawFrame(0xfa, 0xff, 1, []byte("an unknown frame type")) }),
		[]byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
	}
}

// fuzzOnStream is data, whole frames, with stream 1 put on stream id. It
// copies: data is the fuzzer's.
func fuzzOnStream(data []byte, id uint32) []byte {
	out := bytes.Clone(fuzzAlign(data))
	for off := 0; off+9 <= len(out); {
		n := int(out[off])<<16 | int(out[off+1])<<8 | int(out[off+2])
		if sid := binary.BigEndian.Uint32(out[off+5:]); sid&(1<<31-1) == 1 {
			binary.BigEndian.PutUint32(out[off+5:], sid&(1<<31)|id) // the reserved bit kept
		}
		off += 9 + n
	}
	return out
}

// FuzzH2Upstream: b's app, behind a port declared http2, answers a's
// app's request with arbitrary frames. Whatever they are, a's app gets
// an answer or a stream error, both sidecars let go of the stream (no
// request in flight, no stream, reservation or waiter on any
// connection), and the sidecars still proxy; at the end, Run leaves no
// goroutine. The fuzzed side is the sidecar's HTTP/2 client (h2conn.go
// reading a response), where FuzzH2Downstream fuzzes its server.
func FuzzH2Upstream(f *testing.F) {
	for _, s := range fuzzUpstreamSeeds() {
		f.Add(s)
	}
	f.Cleanup(func() { requireNoProductGoroutine(f) })
	var (
		answer atomic.Pointer[[]byte]
		mu     sync.Mutex
		conns  []net.Conn // b's sidecar's connections to the app, closed after each input
	)
	raw := startRawApp(f, func(sc *rawAppConn, id uint32, path string) {
		mu.Lock()
		conns = append(conns, sc.c)
		mu.Unlock()
		if path != "/fuzz" {
			sc.respond(id, "answered "+path)
			return
		}
		if a := answer.Load(); a != nil {
			_, _ = sc.c.Write(fuzzOnStream(*a, id))
		}
	})
	// Most inputs leave the stream waiting for more: its idle timeout
	// ends it, kept short so that fuzzing moves.
	m, _, _ := startLifeMesh(f, func(c *Config) { c.StreamIdleTimeout = 300 * time.Millisecond }, raw.addr)
	health := dialH2(f, m.a, h2Svc.host())
	// ask is a's app's request, on a connection of its own; a round trip
	// or body that does not end is the failure.
	ask := func(t testing.TB) (code int, body string, err error) {
		return getNoHang(t, dialH2(t, m.a, lifeRawSvc.host()).cc.RoundTrip, "http://"+lifeRawSvc.host()+"/fuzz")
	}
	// The plumbing: the first seed is a whole response, and comes so.
	first := fuzzUpstreamSeeds()[0]
	answer.Store(&first)
	code, body, err := ask(f)
	require.NoError(f, err)
	require.Equal(f, http.StatusOK, code, body)
	require.Equal(f, "answered", body)

	f.Fuzz(func(t *testing.T, data []byte) {
		stuck := time.AfterFunc(30*time.Second, func() {
			buf := make([]byte, 16<<20)
			panic(fmt.Sprintf("input stuck for 30s: %x\n%s", data, buf[:runtime.Stack(buf, true)]))
		})
		defer stuck.Stop()
		answer.Store(&data)
		defer func() {
			mu.Lock()
			for _, c := range conns {
				_ = c.Close()
			}
			conns = nil
			mu.Unlock()
		}()

		// a's app asks; any answer or error will do, but not a hang.
		_, _, _ = ask(t)

		// Both sidecars let go of it, before the app's connections close
		// (which would end its streams anyway).
		requireLetGo(t, "the stream", m.a, m.b)

		// And they still proxy.
		r := health.get(t, "/id?n=health")
		require.NoError(t, r.err)
		require.Equal(t, http.StatusOK, r.code, r.body)
		require.Equal(t, "id=health proto=HTTP/2.0", r.body)
	})
}
