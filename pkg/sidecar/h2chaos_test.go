package sidecar

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// A randomized stress of the sidecar's own HTTP/2 path (h2conn.go,
// h2stream.go, h2serve.go) looking for streams and connections it
// leaks. Raw clients on a's outbound open streams that read, stall,
// reset, upload, send trailers and close their connections; b's raw
// app answers, dawdles, resets, goes away, dies and sends trailers,
// each as the request's path tells it. Once the clients are gone,
// nothing may be left: no downstream connection, no request in flight,
// no stream in any upstream connection's table, and after the pods
// stop, no goroutine of the sidecar. H2CHAOS_SEED replays a run's
// choices (the interleaving is the scheduler's); H2CHAOS_SEED=random
// draws a new seed.

const (
	chaosStreams = 2000
	chaosClients = 4
	chaosWorkers = 6 // streams in flight per client
	// chaosHang is how long a stream the client waits for may go
	// without an end before it counts as hung.
	chaosHang = 8 * time.Second
)

// chaosApp answers /c/<kind>/<n>/<x> frame by frame; n is a body size,
// x the kind's parameter.
func chaosApp(sc *rawAppConn, id uint32, path string) {
	if ga := sc.state["goaway"]; ga != 0 && id > ga-1 {
		return // above the GOAWAY's last stream: not processed
	}
	parts := strings.Split(strings.TrimPrefix(path, "/c/"), "/")
	if len(parts) != 3 {
		sc.respond(id, "ok")
		return
	}
	kind := parts[0]
	n, _ := strconv.Atoi(parts[1])
	x, _ := strconv.Atoi(parts[2])
	body := make([]byte, n)
	for i := range body {
		body[i] = byte('a' + i%26)
	}
	data := func(b []byte, end bool) {
		for len(b) > 16384 {
			_ = sc.fr.WriteData(id, false, b[:16384])
			b = b[16384:]
		}
		_ = sc.fr.WriteData(id, end, b)
	}
	switch kind {
	case "ok":
		sc.head(id, http.StatusOK, n == 0)
		if n > 0 {
			data(body, true)
		}
	case "slow": // x pieces, a few milliseconds apart
		sc.head(id, http.StatusOK, false)
		pieces := max(x, 1)
		for i := range pieces {
			time.Sleep(time.Duration(x%3) * time.Millisecond)
			lo, hi := i*n/pieces, (i+1)*n/pieces
			data(body[lo:hi], i == pieces-1)
		}
	case "trailers":
		sc.head(id, http.StatusOK, false)
		data(body, false)
		sc.encBuf.Reset()
		_ = sc.enc.WriteField(hpack.HeaderField{Name: "grpc-status", Value: strconv.Itoa(x)})
		_ = sc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: sc.encBuf.Bytes(), EndHeaders: true, EndStream: true})
	case "rst": // before the head
		_ = sc.fr.WriteRSTStream(id, chaosCodes[x%len(chaosCodes)])
	case "rstmid": // after the head and part of the body
		sc.head(id, http.StatusOK, false)
		data(body[:n/2], false)
		_ = sc.fr.WriteRSTStream(id, chaosCodes[x%len(chaosCodes)])
	case "rstdone": // a whole response, then NO_ERROR (RFC 9113 §8.1)
		sc.head(id, http.StatusOK, false)
		data(body, true)
		_ = sc.fr.WriteRSTStream(id, http2.ErrCodeNo)
	case "goaway": // this stream is the last one processed
		_ = sc.fr.WriteGoAway(id, http2.ErrCodeNo, nil)
		sc.state["goaway"] = id + 1
		sc.respond(id, "last")
	case "goawayrefuse": // this stream is above the last one
		last := id - 2
		if id < 2 {
			last = 0
		}
		_ = sc.fr.WriteGoAway(last, http2.ErrCode(x%2), nil)
		sc.state["goaway"] = last + 1
	case "close":
		_ = sc.c.Close()
	case "closemid":
		sc.head(id, http.StatusOK, false)
		data(body[:n/2], false)
		_ = sc.c.Close()
	default:
		sc.respond(id, "ok")
	}
}

var chaosCodes = []http2.ErrCode{http2.ErrCodeRefusedStream, http2.ErrCodeNo, http2.ErrCodeCancel,
	http2.ErrCodeInternal, http2.ErrCodeEnhanceYourCalm, http2.ErrCodeProtocol, http2.ErrCodeStreamClosed}

// chaosKinds are the app's behaviours, each with a weight.
var chaosKinds = []struct {
	kind   string
	weight int
}{{"ok", 40}, {"slow", 10}, {"trailers", 8}, {"rst", 8}, {"rstmid", 6}, {"rstdone", 8},
	{"goaway", 1}, {"goawayrefuse", 1}, {"close", 1}, {"closemid", 1}}

func chaosKind(rng *rand.Rand) string {
	total := 0
	for _, k := range chaosKinds {
		total += k.weight
	}
	n := rng.IntN(total)
	for _, k := range chaosKinds {
		if n < k.weight {
			return k.kind
		}
		n -= k.weight
	}
	return "ok"
}

// --- a's app: raw clients whose streams run at once ---

// chaosConn is one raw h2c connection from a's app whose streams run
// concurrently: one reader, writes under wmu, send windows kept.
type chaosConn struct {
	r    *rawH2
	wmu  sync.Mutex // the framer's writes and the HPACK encoder
	done chan struct{}

	// mu guards the rest; changed is closed (and replaced) on every
	// change a waiting writer may care about.
	mu         sync.Mutex
	changed    chan struct{}
	connWin    int64
	peerInit   int64
	streamWin  map[uint32]int64
	streams    map[uint32]*chaosStream
	nextID     uint32
	goAway     bool
	goAwayLast uint32
	dead       bool
}

type chaosStream struct {
	id uint32
	// read: the reader gives the stream's window back.
	read atomic.Bool
	done chan struct{}
	// Set by the reader before done closes.
	status         string
	body           int
	head           string // the body's first bytes
	ended, rst     bool
	code           http2.ErrCode
	refused, lost  bool
	trailers, data bool
}

// chaosDial is dialRawH2 off the test's goroutine: errors are returned.
func chaosDial(p *pod, host string, initWin uint32) (*chaosConn, error) {
	c, err := p.nat.dial(context.Background(), net.JoinHostPort(host, "80"))
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(2 * waitFor))
	r := &rawH2{c: c, fr: http2.NewFramer(c, c), peer: map[http2.SettingID]uint32{}}
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.enc = hpack.NewEncoder(&r.encBuf)
	fail := func(err error) (*chaosConn, error) { _ = c.Close(); return nil, err }
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		return fail(err)
	}
	if err := r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: initWin}); err != nil {
		return fail(err)
	}
	f, err := r.fr.ReadFrame()
	if err != nil {
		return fail(err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return fail(fmt.Errorf("the sidecar's preface is %v", f))
	}
	_ = sf.ForeachSetting(func(s http2.Setting) error { r.peer[s.ID] = s.Val; return nil })
	if err := r.fr.WriteSettingsAck(); err != nil {
		return fail(err)
	}
	cc := &chaosConn{r: r, done: make(chan struct{}), changed: make(chan struct{}), connWin: 65535, peerInit: 65535,
		streamWin: map[uint32]int64{}, streams: map[uint32]*chaosStream{}, nextID: 1}
	if v, ok := r.peer[http2.SettingInitialWindowSize]; ok {
		cc.peerInit = int64(v)
	}
	go cc.readLoop()
	return cc, nil
}

// notify wakes the writers waiting for a change. mu held.
func (cc *chaosConn) notify() {
	close(cc.changed)
	cc.changed = make(chan struct{})
}

// end finishes stream s. mu held.
func (cc *chaosConn) end(s *chaosStream) {
	delete(cc.streams, s.id)
	delete(cc.streamWin, s.id)
	close(s.done)
	cc.notify()
}

func (cc *chaosConn) write(f func(fr *http2.Framer) error) {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	_ = f(cc.r.fr)
}

func (cc *chaosConn) readLoop() {
	defer close(cc.done)
	for {
		f, err := cc.r.fr.ReadFrame()
		if err != nil {
			cc.mu.Lock()
			cc.dead = true
			for _, s := range cc.streams {
				s.lost = true
				cc.end(s)
			}
			cc.notify()
			cc.mu.Unlock()
			_ = cc.r.c.Close()
			return
		}
		id := f.Header().StreamID
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				continue
			}
			cc.mu.Lock()
			if v, ok := f.Value(http2.SettingInitialWindowSize); ok {
				for sid := range cc.streamWin {
					cc.streamWin[sid] += int64(v) - cc.peerInit
				}
				cc.peerInit = int64(v)
				cc.notify()
			}
			cc.mu.Unlock()
			cc.write(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
		case *http2.PingFrame:
			if !f.IsAck() {
				cc.write(func(fr *http2.Framer) error { return fr.WritePing(true, f.Data) })
			}
		case *http2.WindowUpdateFrame:
			cc.mu.Lock()
			if id == 0 {
				cc.connWin += int64(f.Increment)
			} else if _, ok := cc.streamWin[id]; ok {
				cc.streamWin[id] += int64(f.Increment)
			}
			cc.notify()
			cc.mu.Unlock()
		case *http2.GoAwayFrame:
			cc.mu.Lock()
			cc.goAway, cc.goAwayLast = true, f.LastStreamID
			for sid, s := range cc.streams {
				if sid > f.LastStreamID {
					s.refused = true
					cc.end(s)
				}
			}
			cc.notify()
			cc.mu.Unlock()
		case *http2.RSTStreamFrame:
			cc.mu.Lock()
			if s := cc.streams[id]; s != nil {
				s.rst, s.code = true, f.ErrCode
				cc.end(s)
			}
			cc.mu.Unlock()
		case *http2.MetaHeadersFrame:
			cc.mu.Lock()
			if s := cc.streams[id]; s != nil {
				if st := f.PseudoValue("status"); st != "" && s.status == "" {
					s.status = st
				} else if s.status != "" {
					s.trailers = true
				}
				if f.StreamEnded() {
					s.ended = true
					cc.end(s)
				}
			}
			cc.mu.Unlock()
		case *http2.DataFrame:
			n := f.Length
			cc.mu.Lock()
			s := cc.streams[id]
			read := false
			if s != nil {
				s.body += len(f.Data())
				if len(s.head) < 80 {
					s.head += string(f.Data()[:min(len(f.Data()), 80-len(s.head))])
				}
				s.data = true
				read = s.read.Load() && !f.StreamEnded()
				if f.StreamEnded() {
					s.ended = true
					cc.end(s)
				}
			}
			cc.mu.Unlock()
			if n > 0 {
				cc.write(func(fr *http2.Framer) error {
					if err := fr.WriteWindowUpdate(0, n); err != nil || !read {
						return err
					}
					return fr.WriteWindowUpdate(id, n)
				})
			}
		}
	}
}

// open starts a stream; nil when the connection takes no more.
func (cc *chaosConn) open(fields []hpack.HeaderField, end, read bool) *chaosStream {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	cc.mu.Lock()
	if cc.dead || cc.goAway || cc.nextID > 1<<20 {
		cc.mu.Unlock()
		return nil
	}
	s := &chaosStream{id: cc.nextID, done: make(chan struct{})}
	s.read.Store(read)
	cc.nextID += 2
	cc.streams[s.id] = s
	cc.streamWin[s.id] = cc.peerInit
	cc.mu.Unlock()
	_ = cc.r.writeHeaders(s.id, end, fields)
	return s
}

// send writes data on s as the windows allow, with END_STREAM when end
// (and no trailers); it reports false when the stream or connection
// ended first, or the windows stayed shut for chaosHang (stalled).
func (cc *chaosConn) send(s *chaosStream, data []byte, end bool) (ok, stalled bool) {
	for {
		cc.mu.Lock()
		if _, open := cc.streams[s.id]; !open || cc.dead {
			cc.mu.Unlock()
			return false, false
		}
		n := min(int64(len(data)), cc.connWin, cc.streamWin[s.id], 16384)
		if n <= 0 && len(data) > 0 {
			changed := cc.changed
			cc.mu.Unlock()
			select {
			case <-changed:
				continue
			case <-time.After(chaosHang):
				return false, true
			}
		}
		cc.connWin -= n
		cc.streamWin[s.id] -= n
		cc.mu.Unlock()
		chunk := data[:n]
		data = data[n:]
		last := end && len(data) == 0
		cc.write(func(fr *http2.Framer) error { return fr.WriteData(s.id, last, chunk) })
		if len(data) == 0 {
			return true, false
		}
	}
}

func (cc *chaosConn) reset(s *chaosStream, code http2.ErrCode) {
	cc.mu.Lock()
	_, open := cc.streams[s.id]
	if open {
		s.rst, s.code = true, code // ours
		cc.end(s)
	}
	cc.mu.Unlock()
	if open {
		cc.write(func(fr *http2.Framer) error { return fr.WriteRSTStream(s.id, code) })
	}
}

func (cc *chaosConn) usable() bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return !cc.dead && !cc.goAway && cc.nextID < 1<<20
}

// chaosClient is one of a's app's clients: a connection, dialled again
// when it died or went away.
type chaosClient struct {
	p       *pod
	host    string
	initWin uint32
	mu      sync.Mutex
	cur     *chaosConn
	all     []*chaosConn
}

func (c *chaosClient) conn() (*chaosConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil || !c.cur.usable() {
		cc, err := chaosDial(c.p, c.host, c.initWin)
		if err != nil {
			return nil, err
		}
		c.cur = cc
		c.all = append(c.all, cc)
	}
	return c.cur, nil
}

// chaosTally counts outcomes by name, and keeps the hung streams.
type chaosTally struct {
	mu   sync.Mutex
	n    map[string]int
	hung []string
}

func (ct *chaosTally) add(what string) {
	ct.mu.Lock()
	ct.n[what]++
	ct.mu.Unlock()
}

func (ct *chaosTally) hang(what string) {
	ct.mu.Lock()
	ct.hung = append(ct.hung, what)
	ct.mu.Unlock()
}

// chaosOp runs one stream on c with choices from rng.
func chaosOp(c *chaosClient, host string, rng *rand.Rand, op int, tally *chaosTally) {
	kind := chaosKind(rng)
	n := rng.IntN(32 << 10)
	if rng.IntN(4) == 0 {
		n = rng.IntN(64)
	}
	path := fmt.Sprintf("/c/%s/%d/%d", kind, n, rng.IntN(7))
	post := rng.IntN(2) == 0
	var body []byte
	if post {
		body = make([]byte, rng.IntN(60000))
	}
	trailers := post && rng.IntN(6) == 0
	read := rng.IntN(5) != 0
	bigWin := rng.IntN(5) == 0
	// What the client does: wait for the end, reset at some point,
	// or close the whole connection at some point.
	action, at := "wait", time.Duration(rng.IntN(20))*time.Millisecond
	switch r := rng.IntN(100); {
	case r < 8:
		action = "rstearly"
	case r < 20:
		action = "rstlater"
	case r < 21:
		action = "close"
	}
	resetCode := []http2.ErrCode{http2.ErrCodeCancel, http2.ErrCodeNo, http2.ErrCodeInternal}[rng.IntN(3)]
	cc, err := c.conn()
	if err != nil {
		tally.add("dial error")
		return
	}
	method := http.MethodGet
	if post {
		method = http.MethodPost
	}
	s := cc.open(requestFields(method, host, path), !post, read)
	if s == nil {
		tally.add("conn unusable")
		return
	}
	if bigWin {
		cc.write(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(s.id, 1<<20) })
	}
	desc := fmt.Sprintf("op %d conn %p stream %d %s %s body %d trailers %v read %v action %s", op, cc, s.id, method, path, len(body), trailers, read, action)
	if action == "rstearly" {
		cc.reset(s, resetCode)
		tally.add("client reset early")
		return
	}
	start := time.Now()
	if post {
		half := len(body) / 2
		if action == "close" && rng.IntN(2) == 0 {
			body = body[:half]
		}
		ok, stalled := cc.send(s, body, !trailers)
		if stalled {
			tally.hang(desc + ": the send windows stayed shut")
			cc.reset(s, http2.ErrCodeCancel)
			return
		}
		if ok && trailers {
			cc.wmu.Lock()
			_ = cc.r.writeHeaders(s.id, true, []hpack.HeaderField{{Name: "x-chaos-trailer", Value: strconv.Itoa(op)}})
			cc.wmu.Unlock()
		}
	}
	switch action {
	case "close":
		time.Sleep(at)
		_ = cc.r.c.Close()
		tally.add("client closed conn")
		return
	case "rstlater":
		select {
		case <-s.done:
		case <-time.After(at):
			cc.reset(s, resetCode)
			tally.add("client reset later")
			return
		}
	}
	if !read {
		// The stream's window is not given back: a response longer than
		// it stalls, and the client gives up after a while.
		select {
		case <-s.done:
		case <-time.After(at + 30*time.Millisecond):
			cc.reset(s, http2.ErrCodeCancel)
			tally.add("client gave up on unread stream")
			return
		}
	}
	select {
	case <-s.done:
	case <-time.After(chaosHang - time.Since(start)):
		tally.hang(desc + ": no end")
		cc.reset(s, http2.ErrCodeCancel)
		return
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	switch {
	case s.ended && s.status != "200":
		why, _, _ := strings.Cut(s.head, ". reset reason")
		tally.add("ended " + s.status + " (" + kind + "): " + why)
	case s.ended:
		tally.add("ended " + s.status)
	case s.rst:
		tally.add("reset " + s.code.String())
	case s.refused:
		tally.add("goaway refused")
	case s.lost:
		tally.add("conn lost")
	}
}

// --- what the sidecar holds ---

// chaosHeld is what a proxy still holds of the HTTP/2 path.
type chaosHeld struct {
	down, requests int
	// busyDown and busyUp count the connections (downstream, upstream)
	// with streams in their table, reservations or waiters; upConns
	// every upstream connection of every pool.
	busyDown, busyUp, upConns int
	desc                      string
}

// requireLetGo waits up to 5 s for every pod's sidecar to hold no
// request in flight and no HTTP/2 stream, reservation or waiter on any
// connection, downstream or upstream (chaosState); what names what they
// should have let go of.
func requireLetGo(t testing.TB, what string, pods ...*pod) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		for _, p := range pods {
			h := chaosState(p.proxy)
			assert.Zero(c, h.requests, "%s's requests in flight\n%s", p.name, h.desc)
			assert.Zero(c, h.busyDown, "%s's downstream connections with streams\n%s", p.name, h.desc)
			assert.Zero(c, h.busyUp, "%s's upstream connections with streams\n%s", p.name, h.desc)
		}
	}, 5*time.Second, time.Millisecond, "the sidecars still hold %s", what)
}

// chaosState describes what p still holds of the HTTP/2 path: its
// downstream connections, the requests in flight, and every connection
// with streams, reservations or waiters (each stream's state too).
func chaosState(p *Proxy) chaosHeld {
	var h chaosHeld
	var b strings.Builder
	p.h2Mu.Lock()
	down := make([]*h2Conn, 0, len(p.h2Conns))
	for hc := range p.h2Conns {
		down = append(down, hc)
	}
	p.h2Mu.Unlock()
	h.down, h.requests = len(down), p.requests.value()
	fmt.Fprintf(&b, "downstream connections %d, requests %d\n", h.down, h.requests)
	p.poolsMu.Lock()
	pools := append([]*pool(nil), p.retired...)
	for _, pl := range p.pools {
		pools = append(pools, pl)
	}
	p.poolsMu.Unlock()
	describe := func(where string, c *h2Conn) bool {
		c.mu.Lock()
		ids := make([]uint32, 0, len(c.streams))
		ss := make([]*h2Stream, 0, len(c.streams))
		for id, s := range c.streams {
			ids = append(ids, id)
			ss = append(ss, s)
		}
		st := fmt.Sprintf("%s conn %p: streams %v reserved %d waiting %d blocked %d out %d closed %v goAway %v ready %v",
			where, c, ids, c.reserved, len(c.waiting), len(c.blocked), len(c.out), c.closed, c.goAway, c.ready)
		leak := len(c.streams) > 0 || c.reserved > 0 || len(c.waiting) > 0
		c.mu.Unlock()
		if leak || len(ss) > 0 {
			fmt.Fprintln(&b, st)
		}
		for _, s := range ss {
			if !s.mu.TryLock() {
				fmt.Fprintf(&b, "  stream %p: its lock is held\n", s)
				continue
			}
			fmt.Fprintf(&b, "  stream %p: down %p up %p waitingOn %p answered %v finished %v downGone %v upGone %v attempts %d toUp{src %d dst %d srcEnded %v dstEnded %v queue %d blocked %v} toDown{src %d dst %d srcEnded %v dstEnded %v queue %d blocked %v sendWin %d}\n",
				s, s.down, s.up, s.waitingOn, s.answered, s.finished, s.downGone, s.upGone, s.attempts,
				s.toUp.srcID, s.toUp.dstID, s.toUp.srcEnded, s.toUp.dstEnded, len(s.toUp.queue), s.toUp.blocked,
				s.toDown.srcID, s.toDown.dstID, s.toDown.srcEnded, s.toDown.dstEnded, len(s.toDown.queue), s.toDown.blocked, s.toDown.sendWin)
			s.mu.Unlock()
		}
		return leak
	}
	for _, hc := range down {
		if describe("downstream", hc) {
			h.busyDown++
		}
	}
	for _, pl := range pools {
		pl.h2mu.Lock()
		var ups []*h2Conn
		for _, cs := range pl.h2conns {
			ups = append(ups, cs...)
		}
		pl.h2mu.Unlock()
		h.upConns += len(ups)
		for _, c := range ups {
			if describe("upstream "+c.ep.String(), c) {
				h.busyUp++
			}
		}
	}
	h.desc = b.String()
	return h
}

func chaosCloseIdle(p *Proxy) {
	p.poolsMu.Lock()
	pools := append([]*pool(nil), p.retired...)
	for _, pl := range p.pools {
		pools = append(pools, pl)
	}
	p.poolsMu.Unlock()
	for _, pl := range pools {
		pl.h2CloseIdle()
	}
}

// --- the test ---

func TestH2Chaos(t *testing.T) {
	// A seed replays a run's choices (H2CHAOS_SEED=<n>); without one each
	// run draws its own. The first run of this test found a refused
	// upstream stream opened again after the client had reset it
	// (H2CHAOS_SEED=1796547105776273406, about one run in three).
	s := os.Getenv("H2CHAOS_SEED")
	seed := uint64(time.Now().UnixNano())
	if s != "" && s != "random" {
		var err error
		seed, err = strconv.ParseUint(s, 10, 64)
		require.NoError(t, err)
	}
	t.Logf("seed %d (H2CHAOS_SEED=%d replays its choices)", seed, seed)
	raw := startRawApp(t, chaosApp)
	m, _, _ := startLifeMesh(t, nil, raw.addr)
	host := lifeRawSvc.host()

	wins := []uint32{65535, 65535, 16384, 1024}
	tally := &chaosTally{n: map[string]int{}}
	clients := make([]*chaosClient, chaosClients)
	for i := range clients {
		clients[i] = &chaosClient{p: m.a, host: host, initWin: wins[(int(seed)+i)%len(wins)]}
	}
	var ops atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range clients {
		for w := range chaosWorkers {
			rng := rand.New(rand.NewPCG(seed, uint64(i*chaosWorkers+w)))
			wg.Go(func() {
				for {
					op := int(ops.Add(1))
					if op > chaosStreams {
						return
					}
					chaosOp(c, host, rng, op, tally)
				}
			})
		}
	}
	wg.Wait()
	var names []string
	for k := range tally.n {
		names = append(names, k)
	}
	slices.Sort(names)
	var sum strings.Builder
	for _, k := range names {
		fmt.Fprintf(&sum, "%s: %d; ", k, tally.n[k])
	}
	dials := 0
	for _, c := range clients {
		dials += len(c.all)
	}
	t.Logf("%d streams in %v over %d connections, %d to the app: %s", chaosStreams, time.Since(start).Round(time.Millisecond),
		dials, raw.conns.Load(), sum.String())
	for _, h := range tally.hung {
		t.Errorf("hung: %s", h)
	}

	// The clients leave.
	for _, c := range clients {
		for _, cc := range c.all {
			_ = cc.r.c.Close()
			<-cc.done
		}
	}
	// Every stream ends: a has no downstream connection, no request in
	// flight and no upstream stream; b (whose downstream connections
	// are a's pooled, now idle, upstream ones) has no stream anywhere.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		a, b := chaosState(m.a.proxy), chaosState(m.b.proxy)
		assert.Zero(c, a.down, "a's downstream HTTP/2 connections\n%s", a.desc)
		assert.Zero(c, a.requests, "a's requests in flight\n%s", a.desc)
		assert.Zero(c, a.busyUp, "a's upstream connections with streams\n%s", a.desc)
		assert.Zero(c, b.requests, "b's requests in flight\n%s", b.desc)
		assert.Zero(c, b.busyDown, "b's downstream connections with streams\n%s", b.desc)
		assert.Zero(c, b.busyUp, "b's upstream connections with streams\n%s", b.desc)
	}, waitFor, 20*time.Millisecond, "the sidecars still hold streams after every client left")
	// Every upstream connection is idle: once the idle ones are closed
	// nothing is left, on a nor on b.
	chaosCloseIdle(m.a.proxy)
	chaosCloseIdle(m.b.proxy)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		for _, p := range []*pod{m.a, m.b} {
			h := chaosState(p.proxy)
			assert.Zero(c, h.down, "%s's downstream HTTP/2 connections\n%s", p.name, h.desc)
			assert.Zero(c, h.requests, "%s's requests in flight\n%s", p.name, h.desc)
			assert.Zero(c, h.upConns, "%s's upstream HTTP/2 connections\n%s", p.name, h.desc)
		}
	}, waitFor, 20*time.Millisecond, "connections left once the idle ones were closed")
	m.a.stop(t)
	m.b.stop(t)
	requireNoProductGoroutine(t)
}
