package sidecar

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The sidecar's own HTTP/2 forwarding path, for both sides of a proxied
// stream: the downstream connection (the app's h2c outbound, a peer's
// istio-h2 inbound) and the multiplexed upstream connections of a pool.
// net/http's server and Transport cost a stream two goroutines, a
// channel hand-off per frame and a write system call per frame; here
// each connection has two goroutines whatever its streams: a reader that
// decodes frames (golang.org/x/net/http2's Framer and HPACK) and acts on
// them at once, and a writer that sends everything queued since its last
// write in one system call. A reader that queued frames on other
// connections writes them itself before it waits for more, without
// blocking (tryConn); the writer takes over what a socket did not take
// at once, and everything queued from elsewhere (timers, credits). A
// stream costs no goroutine.
//
// A proxied stream (h2Stream) joins a downstream stream and an upstream
// one. DATA is copied from the reader's buffer straight into the other
// connection's write queue when both flow-control windows allow, and
// kept on the stream otherwise. The source gets its stream's window
// back (WINDOW_UPDATE) only once the bytes were written to the other
// side's socket, and its connection's window at once: a slow reader
// holds back its own stream's sender, at most one stream window
// (256 KiB) held here, and never the connection's other streams.
// Frames a downstream's reader causes on its own connection (PING and
// SETTINGS acknowledgements, resets, answers) stop it reading past
// h2MaxQueued unwritten bytes; an upstream's reader never stops (the
// sidecar at the other end may be waiting for it to read), and an
// upstream that floods acknowledgements is cut off instead. Streams that end in a reset soon after they open,
// by the client or by the sidecar for the client's error, close the
// connection once they are most of 500 (rapid reset, MadeYouReset).
//
// Locks: a stream's mu is taken before a connection's mu, never the
// other way; a pool's h2mu before a connection's mu. A connection's mu
// guards its write queue, HPACK encoder, stream table and send window,
// and is never held across a system call.

// Flow-control windows the sidecar advertises: per stream, and per
// connection, so a connection holds at most h2ConnWindow of a peer's
// bytes the other side has not taken yet.
const (
	h2StreamWindow = 256 << 10
	h2ConnWindow   = 4 << 20
	// h2MaxStreams is the SETTINGS_MAX_CONCURRENT_STREAMS offered to
	// downstreams.
	h2MaxStreams = 256
	// h2MaxHeaderList bounds a header block, as the HTTP/1.1 path bounds
	// a head.
	h2MaxHeaderList = h1MaxHead
	// h2ReadHeaderList is how much of a header block the Framer decodes
	// (net/http's server default): a block between the two is answered
	// 431 on its stream; past this one x/net's Framer ends the
	// connection, as net/http's server does.
	h2ReadHeaderList = 1 << 20
	// h2MaxInterim bounds the 1xx heads passed on per response, on the
	// HTTP/2 path and the bridge to HTTP/1.1 alike; Go's Transport takes
	// five.
	h2MaxInterim = 5
	h2ReadBuf    = 32 << 10
	// h2MaxFrame is the largest frame the sidecar reads: the protocol's
	// initial SETTINGS_MAX_FRAME_SIZE, which it never raises.
	h2MaxFrame = 16384
	// h2DefaultPeerStreams is the concurrency assumed of an upstream
	// before its SETTINGS arrive (RFC 9113 recommends at least 100).
	h2DefaultPeerStreams = 100
	// A downstream that opened at least h2PrematureResets streams and
	// reset more than half of them within h2PrematureReset of opening is
	// closed (ENHANCE_YOUR_CALM): the "rapid reset" attack
	// (CVE-2023-44487) makes the sidecar open and cancel upstream
	// streams as fast as it can send frames. Envoy's defaults.
	h2PrematureResets = 500
	h2PrematureReset  = time.Second
	// h2CloseFlush bounds the last write of a closing connection (a
	// GOAWAY after an error).
	h2CloseFlush = time.Second
	// h2MaxQueued bounds a connection's write queue as its own reader
	// fills it: past it a downstream's reader reads nothing more until
	// the writer has written, so a client that sends PINGs, SETTINGS or
	// requests and never reads what they cause holds the sidecar's
	// memory to this; an upstream that floods acknowledgements is cut off.
	h2MaxQueued = 1 << 20
)

var errH2Closed = errors.New("http2: connection closed")

// h2Conn is one HTTP/2 connection, either side.
type h2Conn struct {
	p *Proxy
	c net.Conn
	// w is what frames are written to (c, or the TLS over it), and tc
	// the socket below it that takes non-blocking writes, if any.
	w  io.Writer
	tc *tryConn
	// dirty lists the connections this one's reader queued frames on
	// during its current batch: it writes them itself before it waits
	// for more (flushDirty). The reader's own.
	dirty []*h2Conn
	// client: an upstream connection (the sidecar opens the streams).
	client bool
	// info is a downstream connection's listener and destination.
	info *connInfo
	// xfcc is what a downstream connection's requests get added.
	xfcc []hpack.HeaderField
	// rbacFields is a downstream request's header block as the HTTP RBAC
	// filters read it (the reader's own).
	rbacFields h2Fields
	// pool and ep are an upstream connection's pool and endpoint.
	pool *pool
	ep   netip.AddrPort

	fr *http2.Framer // the reader's
	hr *headerReader // over fr: header blocks decoded
	br *bufio.Reader
	// recvWin is what the peer may still send on the connection.
	recvWin atomic.Int64
	// The reader's own: lastDeadline is when it last moved its read
	// deadline, lastFrame when it last read a frame, pingOut whether its
	// liveness PING is unanswered.
	lastDeadline, lastFrame time.Time
	pingOut                 bool
	// opened counts the streams a downstream opened (the reader's), and
	// premature those reset within h2PrematureReset of their opening, by
	// the client or by the sidecar for the client's error. On an
	// upstream connection they count the streams the sidecar opened and
	// reset young (mu); see resetsCouldTrip.
	opened    int64
	premature atomic.Int64
	// lastStreamEnd is when the stream table last became empty (Unix ns).
	lastStreamEnd atomic.Int64

	wake       chan struct{}
	room       chan struct{} // the writer wrote: the reader may queue more
	done       chan struct{} // closed when the connection ends
	closeOnce  sync.Once
	writerDone chan struct{}

	mu sync.Mutex
	// out is the frames the writer sends next, and credits the windows
	// to give back once they are written.
	out, spare            []byte
	credits, spareCredits []h2Credit
	// writing: a goroutine is writing (the writer, or a reader's
	// flushInline); any other leaves the queue to it.
	writing        bool
	enc            *hpack.Encoder
	encBuf         bytes.Buffer
	streams        map[uint32]*h2Stream
	sendWin        int64
	peerInitWin    int64
	peerMaxFrame   int
	peerMaxStreams int
	recvOwed       int64
	nextID         uint32 // client: the next stream's ID
	lastPeerID     uint32 // server: the highest stream the peer opened
	goAway         bool   // no new streams
	// goAwayLast is the last stream ID of the first GOAWAY this side
	// sent, once sentGoAway: a later one never names a higher ID
	// (RFC 9113 §6.8), though streams refused since raised lastPeerID.
	goAwayLast uint32
	sentGoAway bool
	closed     bool
	// brokeWith is the code of the GOAWAY this side sent for the peer's
	// breach of the protocol (connError), if it sent one.
	brokeWith http2.ErrCode
	// resets are the streams this side reset last (a ring, next the
	// slot to write): frames the peer sent before it saw the reset are
	// ignored (RFC 9113 §5.1), where a frame on another closed stream is
	// an error.
	resets    [h2ResetMemory]uint32
	resetNext int
	blocked   map[*h2Stream]struct{}
	ready     bool        // client: connected
	waiting   []*h2Stream // client: streams waiting for the connection
	reserved  int         // client: streams open or waiting
	// closeIdle: the pool closed its idle connections while this one was
	// dialling; it closes once its streams are done.
	closeIdle bool
	idle      *time.Timer // client: closes it unused
	// idleSweep times out a downstream's streams that moved no byte for
	// StreamIdleTimeout (sweepIdle); idleArmed: it is pending.
	idleSweep *time.Timer
	idleArmed bool
}

func newH2Conn(p *Proxy, c net.Conn, client bool) *h2Conn {
	hc := &h2Conn{
		p: p, c: c, client: client,
		wake:           make(chan struct{}, 1),
		room:           make(chan struct{}, 1),
		done:           make(chan struct{}),
		writerDone:     make(chan struct{}),
		streams:        map[uint32]*h2Stream{},
		blocked:        map[*h2Stream]struct{}{},
		sendWin:        65535,
		peerInitWin:    65535,
		peerMaxFrame:   16384,
		peerMaxStreams: h2DefaultPeerStreams,
		nextID:         1,
	}
	hc.recvWin.Store(65535)
	hc.enc = hpack.NewEncoder(&hc.encBuf)
	return hc
}

// startReader makes the reading Framer over r (c, or what replays bytes
// already read before it).
func (hc *h2Conn) startReader(r io.Reader) {
	hc.br = bufio.NewReaderSize(r, h2ReadBuf)
	hc.fr = http2.NewFramer(nil, hc.br)
	hc.fr.SetReuseFrames()
	hc.fr.SetMaxReadFrameSize(h2MaxFrame)
	hc.hr = newHeaderReader(hc.fr, h2ReadHeaderList)
}

// greet queues the connection's opening: the client preface, then
// SETTINGS, then the connection window's increase.
func (hc *h2Conn) greet() {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.client {
		hc.out = append(hc.out, http2.ClientPreface...)
	}
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
		{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
	}
	if hc.client {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams})
	}
	hc.out = appendFrameHeader(hc.out, 6*len(settings), http2.FrameSettings, 0, 0)
	for _, s := range settings {
		hc.out = append(hc.out, byte(s.ID>>8), byte(s.ID), byte(s.Val>>24), byte(s.Val>>16), byte(s.Val>>8), byte(s.Val))
	}
	hc.out = appendWindowUpdate(hc.out, 0, h2ConnWindow-65535)
	hc.recvWin.Add(h2ConnWindow - 65535)
}

func appendFrameHeader(b []byte, length int, t http2.FrameType, flags http2.Flags, id uint32) []byte {
	return append(b, byte(length>>16), byte(length>>8), byte(length), byte(t), byte(flags),
		byte(id>>24)&0x7f, byte(id>>16), byte(id>>8), byte(id))
}

func appendWindowUpdate(b []byte, id uint32, inc uint32) []byte {
	b = appendFrameHeader(b, 4, http2.FrameWindowUpdate, 0, id)
	return append(b, byte(inc>>24)&0x7f, byte(inc>>16), byte(inc>>8), byte(inc))
}

func appendRSTStream(b []byte, id uint32, code http2.ErrCode) []byte {
	b = appendFrameHeader(b, 4, http2.FrameRSTStream, 0, id)
	return append(b, byte(code>>24), byte(code>>16), byte(code>>8), byte(code))
}

func appendGoAway(b []byte, last uint32, code http2.ErrCode) []byte {
	b = appendFrameHeader(b, 8, http2.FrameGoAway, 0, 0)
	return append(b, byte(last>>24)&0x7f, byte(last>>16), byte(last>>8), byte(last),
		byte(code>>24), byte(code>>16), byte(code>>8), byte(code))
}

// kick wakes the writer if it is idle: output was queued.
func (hc *h2Conn) kick() {
	select {
	case hc.wake <- struct{}{}:
	default:
	}
}

// writeLoop sends what is queued, one write per wake, until the
// connection ends; then what is left, within h2CloseFlush.
func (hc *h2Conn) writeLoop() {
	defer close(hc.writerDone)
	for {
		select {
		case <-hc.wake:
			if !hc.flush() {
				return
			}
		case <-hc.done:
			end := time.Now().Add(h2CloseFlush)
			_ = hc.c.SetWriteDeadline(end)
			// A reader may be writing inline; its frames go first.
			for hc.busy() && time.Now().Before(end) {
				time.Sleep(time.Millisecond)
			}
			hc.flush()
			return
		}
	}
}

// flush writes the queued frames, blocking, then gives back the windows
// of the bytes they carried; false when the write failed.
func (hc *h2Conn) flush() bool {
	hc.mu.Lock()
	if hc.writing {
		hc.mu.Unlock()
		return true // a reader is writing; it wakes the writer if more is left
	}
	buf, cr := hc.take()
	hc.mu.Unlock()
	var err error
	if len(buf) > 0 || (hc.tc != nil && hc.tc.pending()) {
		select {
		case <-hc.done:
		default:
			_ = hc.c.SetWriteDeadline(time.Now().Add(hc.p.cfg.StreamIdleTimeout))
		}
		if hc.tc != nil {
			err = hc.tc.drain()
		}
		if err == nil && len(buf) > 0 {
			_, err = hc.w.Write(buf)
		}
	}
	return hc.wrote(buf, cr, err)
}

func (hc *h2Conn) busy() bool {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return hc.writing
}

// flushInline writes the queued frames on the calling reader without
// blocking: what the socket does not take now waits in hc.tc for the
// writer goroutine.
func (hc *h2Conn) flushInline() {
	hc.mu.Lock()
	if hc.writing || hc.closed || len(hc.out) == 0 || hc.tc == nil || hc.tc.pending() {
		hc.mu.Unlock()
		hc.kick()
		return
	}
	buf, cr := hc.take()
	hc.mu.Unlock()
	hc.tc.setTry(true)
	_, err := hc.w.Write(buf)
	hc.tc.setTry(false)
	left := hc.tc.pending() // read while this goroutine still writes
	if hc.wrote(buf, cr, err) && left {
		hc.kick()
	}
}

// take hands the queued frames to the goroutine that writes them (mu
// held).
func (hc *h2Conn) take() ([]byte, []h2Credit) {
	buf, cr := hc.out, hc.credits
	hc.out, hc.credits = hc.spare[:0], hc.spareCredits[:0]
	if hc.spare == nil {
		if b, ok := h2Bufs.Get().(*[]byte); ok {
			hc.out = (*b)[:0]
		}
	}
	hc.spare, hc.spareCredits = nil, nil
	hc.writing = true
	return buf, cr
}

// h2Bufs holds the large write buffers of connections that went idle,
// for the next burst anywhere (a 1 MiB response grows one to 2 MiB);
// the garbage collector empties it when nobody takes them.
var h2Bufs sync.Pool

// wrote ends a write: the sources get their window back (even when the
// write failed: they must not lose window to a connection that died),
// the buffers are kept for the next, and a failed write ends the
// connection. False when it failed.
func (hc *h2Conn) wrote(buf []byte, cr []h2Credit, err error) bool {
	for i := range cr {
		cr[i].apply()
		cr[i] = h2Credit{}
	}
	hc.mu.Lock()
	hc.writing = false
	if cap(buf) <= 2*h2ConnWindow && hc.spare == nil {
		hc.spare = buf[:0]
	}
	if hc.spareCredits == nil {
		hc.spareCredits = cr[:0]
	}
	more := len(hc.out) > 0
	hc.mu.Unlock()
	select {
	case hc.room <- struct{}{}:
	default:
	}
	if err != nil {
		hc.shut()
		return false
	}
	if more {
		hc.kick()
	}
	return true
}

// deferFlush has the reader write c at the end of its batch.
func (hc *h2Conn) deferFlush(c *h2Conn) {
	for _, d := range hc.dirty {
		if d == c {
			return
		}
	}
	hc.dirty = append(hc.dirty, c)
}

// flushDirty writes, on the reader, the connections its batch queued
// frames on: when the next frame is not already buffered, before the
// read that would wait for it.
func (hc *h2Conn) flushDirty() {
	if len(hc.dirty) == 0 {
		return
	}
	if b, err := hc.br.Peek(min(hc.br.Buffered(), 9)); err == nil && len(b) == 9 {
		if n := int(b[0])<<16 | int(b[1])<<8 | int(b[2]); hc.br.Buffered() >= 9+n {
			return // the next frame is here already
		}
	}
	for i, c := range hc.dirty {
		c.flushInline()
		hc.dirty[i] = nil
	}
	hc.dirty = hc.dirty[:0]
}

// armIdleSweep arms the stream idle sweep unless it is pending. A
// stream that just opened has the latest deadline of all, so a pending
// sweep is never late for it. mu held.
func (hc *h2Conn) armIdleSweep() {
	if hc.idleArmed || hc.closed {
		return
	}
	hc.idleArmed = true
	if hc.idleSweep == nil {
		hc.idleSweep = time.AfterFunc(hc.p.cfg.StreamIdleTimeout, hc.sweepIdle)
	} else {
		hc.idleSweep.Reset(hc.p.cfg.StreamIdleTimeout)
	}
}

// sweepIdle ends the streams that moved no byte for StreamIdleTimeout
// (504 before the response, a reset after it), and arms itself again
// for the earliest deadline of the others. One timer per connection,
// where a timer per stream was armed and stopped for every request
// (2% of a sidecar's samples under bench-sidecar's maximum rate).
func (hc *h2Conn) sweepIdle() {
	idle := int64(hc.p.cfg.StreamIdleTimeout)
	now := time.Now().UnixNano()
	next := int64(math.MaxInt64)
	var expired []*h2Stream
	hc.mu.Lock()
	hc.idleArmed = false
	for _, s := range hc.streams {
		if s.idleFired {
			continue
		}
		if d := s.last.Load() + idle; d <= now {
			s.idleFired = true
			expired = append(expired, s)
		} else {
			next = min(next, d)
		}
	}
	if next != math.MaxInt64 && !hc.closed {
		hc.idleArmed = true
		hc.idleSweep.Reset(time.Duration(next - now))
	}
	hc.mu.Unlock()
	for _, s := range expired {
		s.timeout(errStreamIdle)
	}
}

// shut ends the connection: the reader's read fails and it cleans up.
func (hc *h2Conn) shut() {
	hc.closeOnce.Do(func() {
		hc.mu.Lock()
		hc.closed = true
		if hc.idleSweep != nil {
			hc.idleSweep.Stop()
		}
		hc.mu.Unlock()
		close(hc.done)
		_ = hc.c.SetReadDeadline(time.Now())
	})
}

// goAwayID is the last stream ID a GOAWAY of this side names now, and
// from now on. mu held.
func (hc *h2Conn) goAwayID() uint32 {
	if !hc.sentGoAway {
		hc.sentGoAway, hc.goAwayLast = true, hc.lastPeerID
	}
	return hc.goAwayLast
}

// connError ends the connection with a GOAWAY naming the error.
func (hc *h2Conn) connError(code http2.ErrCode) {
	hc.mu.Lock()
	if !hc.closed {
		hc.out = appendGoAway(hc.out, hc.goAwayID(), code)
		hc.kick()
		if hc.brokeWith == http2.ErrCodeNo {
			hc.brokeWith = code
		}
	}
	hc.mu.Unlock()
	hc.shut()
}

// h2Credit is window owed to a stream's source once bytes were written:
// n bytes of flow fl of stream s, which src sent.
type h2Credit struct {
	s   *h2Stream
	fl  *h2Flow
	src *h2Conn
	n   int64
}

func (c *h2Credit) apply() {
	if c.s != nil {
		c.s.credit(c.fl, c.src, c.n)
	}
}

// creditConn gives back n bytes of connection window (and inc of stream
// id's, when not zero): the announcement waits until a quarter of the
// window is owed, so a WINDOW_UPDATE frame carries many DATA frames.
func (hc *h2Conn) creditConn(id uint32, inc, n int64) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.closed {
		return
	}
	hc.recvOwed += n
	if inc > 0 {
		hc.out = appendWindowUpdate(hc.out, id, uint32(inc))
	}
	if hc.recvOwed >= h2ConnWindow/4 {
		hc.out = appendWindowUpdate(hc.out, 0, uint32(hc.recvOwed))
		hc.recvWin.Add(hc.recvOwed)
		hc.recvOwed = 0
	}
	if inc > 0 || hc.recvOwed == 0 {
		hc.kick()
	}
}

// writeHeaders queues a header block for stream id (mu held): the
// fields keep is true for, then extra, split into HEADERS and
// CONTINUATION frames the peer accepts.
func (hc *h2Conn) writeHeaders(id uint32, fields []hpack.HeaderField, keep func(*hpack.HeaderField) bool, extra []hpack.HeaderField, end bool) {
	hc.encBuf.Reset()
	for i := range fields {
		if keep == nil || keep(&fields[i]) {
			_ = hc.enc.WriteField(fields[i])
		}
	}
	for _, f := range extra {
		_ = hc.enc.WriteField(f)
	}
	block := hc.encBuf.Bytes()
	t := http2.FrameHeaders
	for first := true; first || len(block) > 0; first = false {
		n := min(len(block), hc.peerMaxFrame)
		var flags http2.Flags
		if first && end {
			flags |= http2.FlagHeadersEndStream
		}
		if n == len(block) {
			flags |= http2.FlagHeadersEndHeaders
		}
		hc.out = appendFrameHeader(hc.out, n, t, flags, id)
		hc.out = append(hc.out, block[:n]...)
		block = block[n:]
		t = http2.FrameContinuation
	}
}

// writeData queues one DATA frame (mu held).
func (hc *h2Conn) writeData(id uint32, data []byte, end bool) {
	var flags http2.Flags
	if end {
		flags = http2.FlagDataEndStream
	}
	hc.out = appendFrameHeader(hc.out, len(data), http2.FrameData, flags, id)
	hc.out = append(hc.out, data...)
}

// writeRST queues a RST_STREAM (mu held).
func (hc *h2Conn) writeRST(id uint32, code http2.ErrCode) {
	if hc.closed {
		return
	}
	hc.out = appendRSTStream(hc.out, id, code)
	hc.resets[hc.resetNext] = id
	hc.resetNext = (hc.resetNext + 1) % h2ResetMemory
}

// h2ResetMemory is how many of the streams it reset last a connection
// remembers (resets). Trailers the client sent before it saw a reset
// that has since left this memory end the connection (HEADERS on a
// closed stream), as in Go's server, which forgets a stream once its
// reset is written: it takes this many other streams reset in between.
const h2ResetMemory = 128

// peerStream is what a frame for a stream the connection does not have
// open finds: a stream not opened yet (idle: any frame but HEADERS and
// PRIORITY from a client, any frame at all from a server that may push
// nothing, is a connection error, RFC 9113 §5.1), one the sidecar reset
// (frames the peer sent before it saw the reset are ignored), or another
// closed one. On an upstream connection every closed stream counts as
// reset: a server's late frames are dropped.
func (hc *h2Conn) peerStream(id uint32) (idle, wasReset bool) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.client {
		return id%2 == 0 || id >= hc.nextID, true
	}
	if id%2 == 0 || id > hc.lastPeerID {
		return true, false
	}
	return false, slices.Contains(hc.resets[:], id)
}

// closedStreamFrame is a DATA or HEADERS frame on a closed stream of a
// downstream connection: ignored when the sidecar reset the stream, else
// a stream error STREAM_CLOSED (RFC 9113 §5.1, §6.1), after which the
// stream's further frames are ignored.
func (hc *h2Conn) closedStreamFrame(id uint32) {
	if _, wasReset := hc.peerStream(id); wasReset {
		return
	}
	hc.resetClosed(id, http2.ErrCodeStreamClosed)
}

// resetClosed resets stream id, which is not open, with code.
func (hc *h2Conn) resetClosed(id uint32, code http2.ErrCode) {
	hc.mu.Lock()
	hc.writeRST(id, code)
	hc.mu.Unlock()
	hc.kick()
}

// idleStreamFrame ends a connection whose peer sent f on a stream not
// opened yet.
func (hc *h2Conn) idleStreamFrame(f http2.Frame) error {
	hc.connError(http2.ErrCodeProtocol)
	return fmt.Errorf("http2: %v on idle stream %d", f.Header().Type, f.Header().StreamID)
}

// stream is the stream id, nil when it is not open.
func (hc *h2Conn) stream(id uint32) *h2Stream {
	hc.mu.Lock()
	s := hc.streams[id]
	hc.mu.Unlock()
	return s
}

// readLoop reads and acts on frames until the connection ends.
func (hc *h2Conn) readLoop() error {
	for {
		hc.flushDirty()
		// Only a downstream's reader waits: an upstream connection's
		// reader must always take what its peer (often another sidecar,
		// whose own reader may be waiting for its writes to drain) sends.
		if !hc.client && !hc.waitRoom() {
			return errH2Closed
		}
		hc.refreshDeadline()
		f, err := hc.hr.ReadFrame()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && hc.silent() {
				continue
			}
			var se http2.StreamError
			if errors.As(err, &se) {
				// The Framer's stream errors are of HEADERS blocks
				// (and of a zero WINDOW_UPDATE: on a stream not open, one
				// the client broke the protocol on, closed all the same).
				if hc.stream(se.StreamID) == nil {
					hc.refusedHeaders(se.StreamID)
				}
				hc.streamError(se)
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				hc.connError(http2.ErrCode(ce))
			}
			return err
		}
		hc.pingOut = false
		if err := hc.frame(f); err != nil {
			return err
		}
	}
}

// controlFlood ends an upstream connection whose peer makes it queue
// acknowledgements (PING, SETTINGS) past h2MaxQueued unwritten bytes
// (net/http's maxQueuedControlFrames); a downstream's reader waits
// instead (waitRoom).
func (hc *h2Conn) controlFlood() error {
	if !hc.client {
		return nil
	}
	hc.mu.Lock()
	n := len(hc.out)
	hc.mu.Unlock()
	if n <= h2MaxQueued {
		return nil
	}
	hc.connError(http2.ErrCodeEnhanceYourCalm)
	return errors.New("http2: the peer does not read the acknowledgements of its PINGs and SETTINGS")
}

// waitRoom holds the reader while its connection's write queue is over
// h2MaxQueued; false when the connection ended meanwhile.
func (hc *h2Conn) waitRoom() bool {
	for {
		hc.mu.Lock()
		n := len(hc.out)
		hc.mu.Unlock()
		if n <= h2MaxQueued {
			return true
		}
		hc.kick()
		select {
		case <-hc.room:
		case <-hc.done:
			return false
		}
	}
}

// refreshDeadline keeps a read deadline on the connection, moved at most
// once a second: the idle timeout when no stream is open, else the
// liveness ping's interval.
func (hc *h2Conn) refreshDeadline() {
	now := time.Now()
	hc.lastFrame = now
	if now.Sub(hc.lastDeadline) < time.Second {
		return
	}
	hc.lastDeadline = now
	_ = hc.c.SetReadDeadline(now.Add(hc.readTimeout(hc.openStreams())))
}

func (hc *h2Conn) openStreams() int {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return len(hc.streams)
}

// readTimeout is how long the reader waits for a frame with n streams
// open: a downstream without any, the idle timeout; else until the
// liveness ping.
func (hc *h2Conn) readTimeout(n int) time.Duration {
	if n == 0 && !hc.client {
		return hc.p.cfg.HTTPIdleTimeout
	}
	return h2SendPingTimeout
}

// silent handles a read deadline that passed: a downstream without
// streams has been idle too long and is closed; otherwise a PING asks
// the peer whether it is there, and a second silence closes it. True
// when the connection lives on.
func (hc *h2Conn) silent() bool {
	select {
	case <-hc.done:
		return false
	default:
	}
	n := hc.openStreams()
	// The deadline moves at most once a second, so it may pass early:
	// the connection's real idle time decides.
	now := time.Now()
	last := hc.lastFrame
	if ended := time.Unix(0, hc.lastStreamEnd.Load()); ended.After(last) {
		last = ended
	}
	if timeout := hc.readTimeout(n); !hc.pingOut && now.Sub(last) < timeout {
		hc.lastDeadline = now
		_ = hc.c.SetReadDeadline(last.Add(timeout))
		return true
	}
	if (n == 0 && !hc.client) || hc.pingOut {
		hc.connError(http2.ErrCodeNo)
		return false
	}
	hc.pingOut = true
	hc.mu.Lock()
	hc.out = appendFrameHeader(hc.out, 8, http2.FramePing, 0, 0)
	hc.out = append(hc.out, "isthmus!"...)
	hc.kick()
	hc.mu.Unlock()
	hc.lastDeadline = time.Now()
	_ = hc.c.SetReadDeadline(hc.lastDeadline.Add(h2PingTimeout))
	return true
}

// streamError resets one stream the Framer found malformed.
func (hc *h2Conn) streamError(se http2.StreamError) {
	if s := hc.stream(se.StreamID); s != nil {
		why := se.Cause
		if why == nil {
			why = fmt.Errorf("stream error %v", se.Code)
		}
		s.mu.Lock()
		s.reset(hc, se.Code, why)
		s.mu.Unlock()
		return
	}
	hc.resetClosed(se.StreamID, se.Code)
}

// refusedHeaders records a stream the client opened with a HEADERS block
// the Framer refused: the stream opened and closed (RFC 9113 §5.1), so
// DATA the client sent before it saw the reset is ignored rather than
// taken for DATA on an idle stream, and its ID is not opened again.
func (hc *h2Conn) refusedHeaders(id uint32) {
	if hc.client || id%2 == 0 {
		return
	}
	hc.mu.Lock()
	if id > hc.lastPeerID {
		hc.lastPeerID = id
		hc.opened++
	}
	hc.mu.Unlock()
}

// frame acts on one frame; an error ends the connection.
func (hc *h2Conn) frame(f http2.Frame) error {
	if err := hc.handle(f); err != nil {
		return err
	}
	if !hc.client && hc.opened >= h2PrematureResets && hc.premature.Load()*2 > hc.opened {
		hc.p.log.Warn("closing an HTTP/2 connection whose streams mostly end in a reset soon after they open",
			"listener", hc.info.listener, "remote", hc.c.RemoteAddr().String(), "streams", hc.opened, "premature_resets", hc.premature.Load())
		hc.connError(http2.ErrCodeEnhanceYourCalm)
		return errors.New("http2: too many premature stream resets")
	}
	return nil
}

func (hc *h2Conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return hc.onData(f)
	case *http2.MetaHeadersFrame:
		return hc.onHeaders(f)
	case *http2.WindowUpdateFrame:
		return hc.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		if s := hc.stream(f.StreamID); s != nil {
			if !hc.client && time.Since(s.born) < h2PrematureReset {
				hc.premature.Add(1)
			}
			s.peerReset(hc, f.ErrCode)
		} else if idle, _ := hc.peerStream(f.StreamID); idle {
			return hc.idleStreamFrame(f)
		}
	case *http2.PriorityFrame:
		return hc.onPriority(f.StreamID, f.PriorityParam)
	case *http2.SettingsFrame:
		return hc.onSettings(f)
	case *http2.PingFrame:
		if !f.IsAck() {
			if err := hc.controlFlood(); err != nil {
				return err
			}
			hc.mu.Lock()
			hc.out = appendFrameHeader(hc.out, 8, http2.FramePing, http2.FlagPingAck, 0)
			hc.out = append(hc.out, f.Data[:]...)
			hc.kick()
			hc.mu.Unlock()
		}
	case *http2.GoAwayFrame:
		hc.onGoAway(f)
	case *http2.PushPromiseFrame:
		// Never asked for (SETTINGS_ENABLE_PUSH 0), and never from a
		// client.
		hc.connError(http2.ErrCodeProtocol)
		return errors.New("http2: PUSH_PROMISE received")
	}
	return nil
}

func (hc *h2Conn) onData(f *http2.DataFrame) error {
	n := int64(f.Length)
	if hc.recvWin.Add(-n) < 0 {
		hc.connError(http2.ErrCodeFlowControl)
		return errors.New("http2: peer sent beyond the connection window")
	}
	// The connection's window comes back at once: what a stream holds is
	// bounded by its own window, so one stream that cannot move never
	// holds back the connection's others.
	hc.creditConn(0, 0, n)
	s := hc.stream(f.StreamID)
	if s == nil {
		if idle, _ := hc.peerStream(f.StreamID); idle {
			return hc.idleStreamFrame(f)
		}
		hc.closedStreamFrame(f.StreamID)
		return nil
	}
	s.onData(hc, f.Data(), n, f.StreamEnded())
	return nil
}

// onPriority checks a priority signal, which the sidecar otherwise
// ignores (RFC 9113 §5.3.2): a stream that depends on itself is a stream
// error PROTOCOL_ERROR (§5.3.1).
func (hc *h2Conn) onPriority(id uint32, pp http2.PriorityParam) error {
	if pp.StreamDep == id && !hc.client {
		hc.streamError(http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol})
	}
	return nil
}

func (hc *h2Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if s := hc.stream(id); s != nil {
		s.onHeaders(hc, f)
		return nil
	}
	if hc.client {
		if idle, _ := hc.peerStream(id); idle {
			return hc.idleStreamFrame(f)
		}
		return nil // a stream that ended: its HPACK state is kept, the rest dropped
	}
	hc.mu.Lock()
	if id%2 == 1 && id <= hc.lastPeerID {
		hc.mu.Unlock()
		if _, wasReset := hc.peerStream(id); wasReset {
			// The sidecar answered or reset the stream while the client
			// was still sending: its trailers are ignored (RFC 9113
			// §5.1); HPACK already took their fields.
			return nil
		}
		// A stream that closed, or one below the last opened: the
		// client cannot open it (§5.1.1).
		hc.connError(http2.ErrCodeProtocol)
		return fmt.Errorf("http2: HEADERS on closed stream %d", id)
	}
	if id%2 == 0 {
		hc.mu.Unlock()
		hc.connError(http2.ErrCodeProtocol)
		return fmt.Errorf("http2: HEADERS on stream %d, which the client may not open", id)
	}
	hc.lastPeerID = id
	hc.opened++
	selfDep := f.HasPriority() && f.Priority.StreamDep == id
	refuse := hc.goAway || len(hc.streams) >= h2MaxStreams || selfDep
	if refuse {
		code := http2.ErrCodeRefusedStream
		if selfDep {
			code = http2.ErrCodeProtocol // §5.3.1
		}
		hc.writeRST(id, code)
		hc.kick()
	}
	hc.mu.Unlock()
	if !refuse {
		hc.p.h2Open(hc, f)
	}
	return nil
}

func (hc *h2Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	if f.StreamID != 0 {
		if s := hc.stream(f.StreamID); s != nil {
			s.onWindowUpdate(hc, int64(f.Increment))
		} else if idle, _ := hc.peerStream(f.StreamID); idle {
			return hc.idleStreamFrame(f)
		}
		return nil
	}
	hc.mu.Lock()
	hc.sendWin += int64(f.Increment)
	if hc.sendWin > 1<<31-1 {
		hc.mu.Unlock()
		hc.connError(http2.ErrCodeFlowControl)
		return errors.New("http2: connection window above 2^31-1")
	}
	blocked := make([]*h2Stream, 0, len(hc.blocked))
	for s := range hc.blocked {
		blocked = append(blocked, s)
	}
	clear(hc.blocked)
	hc.mu.Unlock()
	for _, s := range blocked {
		s.mu.Lock()
		if fl := s.flowTo(hc); fl != nil {
			fl.blocked = false
			s.flush(fl)
		}
		s.maybeDone()
		s.mu.Unlock()
	}
	return nil
}

func (hc *h2Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if err := hc.controlFlood(); err != nil {
		return err
	}
	var delta int64
	var bad error
	hc.mu.Lock()
	_ = f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			bad = err
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta += int64(s.Val) - hc.peerInitWin
			hc.peerInitWin = int64(s.Val)
		case http2.SettingMaxFrameSize:
			hc.peerMaxFrame = int(s.Val)
		case http2.SettingMaxConcurrentStreams:
			hc.peerMaxStreams = int(min(s.Val, 1<<20))
		case http2.SettingHeaderTableSize:
			hc.enc.SetMaxDynamicTableSizeLimit(s.Val)
		}
		return nil
	})
	if bad == nil {
		hc.out = appendFrameHeader(hc.out, 0, http2.FrameSettings, http2.FlagSettingsAck, 0)
		hc.kick()
	}
	var streams []*h2Stream
	if delta != 0 {
		for _, s := range hc.streams {
			streams = append(streams, s)
		}
	}
	hc.mu.Unlock()
	if bad != nil {
		var ce http2.ConnectionError
		if errors.As(bad, &ce) {
			hc.connError(http2.ErrCode(ce))
		} else {
			hc.connError(http2.ErrCodeProtocol)
		}
		return bad
	}
	overflow := false
	for _, s := range streams {
		s.mu.Lock()
		if fl := s.flowTo(hc); fl != nil {
			fl.sendWin += delta
			overflow = overflow || fl.sendWin > 1<<31-1
			s.flush(fl)
		}
		s.maybeDone()
		s.mu.Unlock()
	}
	if overflow {
		hc.connError(http2.ErrCodeFlowControl)
		return errors.New("http2: SETTINGS_INITIAL_WINDOW_SIZE took a stream's window above 2^31-1")
	}
	return nil
}

func (hc *h2Conn) onGoAway(f *http2.GoAwayFrame) {
	hc.mu.Lock()
	hc.goAway = true
	var refused []*h2Stream
	if hc.client {
		for id, s := range hc.streams {
			if id > f.LastStreamID {
				refused = append(refused, s)
			}
		}
	}
	hc.mu.Unlock()
	for _, s := range refused {
		s.peerReset(hc, http2.ErrCodeRefusedStream)
	}
	hc.closeIfDone()
}

// closeIfDone closes a connection that takes no new stream once its last
// one ended.
func (hc *h2Conn) closeIfDone() {
	hc.mu.Lock()
	done := hc.goAway && len(hc.streams) == 0 && len(hc.waiting) == 0
	hc.mu.Unlock()
	if done {
		hc.shut()
	}
}

// failStreams ends every stream of a connection that ended.
func (hc *h2Conn) failStreams(err error) {
	hc.mu.Lock()
	hc.closed = true
	streams := make([]*h2Stream, 0, len(hc.streams)+len(hc.waiting))
	for _, s := range hc.streams {
		streams = append(streams, s)
	}
	streams = append(streams, hc.waiting...)
	hc.waiting = nil
	hc.mu.Unlock()
	for _, s := range streams {
		s.connLost(hc, err)
	}
}
