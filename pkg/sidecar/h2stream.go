package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// h2Flow is one direction of a proxied stream: the request's DATA from
// the downstream to the upstream (toUp), or the response's back
// (toDown).
type h2Flow struct {
	// src sent the bytes (nil for a response the sidecar makes itself),
	// on its stream srcID; dst takes them, on dstID (nil until the
	// upstream stream opens).
	src, dst     *h2Conn
	srcID, dstID uint32
	// sendWin is dst's window for the stream; recvWin what src may still
	// send, and owed what it was given back but not told yet.
	sendWin, recvWin, owed int64
	// queue is DATA waiting for a window or for the stream to open; the
	// end of the stream (endQueued, with trailers when they came) goes
	// after it.
	queue     []h2Chunk
	endQueued bool
	trailers  []hpack.HeaderField
	// srcEnded: nothing more comes from src (END_STREAM, or a reset);
	// dstEnded: nothing more goes to dst.
	srcEnded, dstEnded bool
	// blocked: listed in dst.blocked, waiting for the connection window.
	blocked bool
	// sent: some DATA went to dst.
	sent bool
	// length is the content-length src announced (-1: none, or none
	// that binds, as a HEAD response's), got the DATA bytes that came: a
	// message whose DATA do not add up to its length is malformed (RFC
	// 9113 §8.1.1) and never forwarded whole.
	length, got int64
}

// h2Chunk is DATA waiting on a stream: b, which is held in buf (a
// frame-sized buffer of h2Chunks, given back once b is sent) when the
// bytes were copied from a reader's buffer.
type h2Chunk struct {
	b   []byte
	buf *[]byte
}

// h2ChunkBufs lends the copies of DATA that must wait, one frame each.
var h2ChunkBufs = sync.Pool{New: func() any { b := make([]byte, h2MaxFrame); return &b }}

func (c *h2Chunk) free() {
	if c.buf != nil {
		h2ChunkBufs.Put(c.buf)
	}
	*c = h2Chunk{}
}

// h2Stream is one proxied HTTP/2 request: a downstream stream and, once
// a connection to an endpoint has room, an upstream one.
type h2Stream struct {
	p  *Proxy
	mu sync.Mutex
	// rd is the connection whose reader holds mu, handling a frame: the
	// frames it queues elsewhere are written by that reader at the end
	// of its batch (wake).
	rd   *h2Conn
	down *h2Conn
	// up is the upstream connection once the stream is open there;
	// waitingOn the one being dialled that will carry it.
	up, waitingOn *h2Conn
	toUp, toDown  h2Flow

	upstream *upstream
	target   netip.AddrPort
	// bridge is the upstream half of a stream to an HTTP/1.1 cluster,
	// which then has no up (h2h1.go).
	bridge *h1Bridge
	// fields is the request's header block, kept to open the stream
	// again on another connection until its response starts.
	fields   []hpack.HeaderField
	head     bool
	attempts int
	lastErr  error
	// answered: a response began downstream (the upstream's, or the
	// sidecar's own); counted: its status was counted.
	answered bool
	// interim counts the upstream's 1xx heads passed on.
	interim int
	counted bool
	entered bool
	// downGone and upGone: the stream left its connection's table.
	downGone, upGone, finished bool
	born                       time.Time
	// upBorn is when the stream opened on its upstream connection.
	upBorn time.Time
	route  *time.Timer
	// last is when a byte of the stream last moved (Unix ns), for the
	// stream idle timeout (h2Conn.sweepIdle); idleFired: the sweep timed
	// the stream out (down.mu).
	last           atomic.Int64
	idleFired      bool
	received, sent int64
}

func (s *h2Stream) lock(rd *h2Conn) {
	s.mu.Lock()
	s.rd = rd
}

func (s *h2Stream) unlock() {
	s.rd = nil
	s.mu.Unlock()
}

// wake has c's queued frames written: by the reader handling the stream
// at the end of its batch, else by c's writer. mu held.
func (s *h2Stream) wake(c *h2Conn) {
	if s.rd != nil {
		s.rd.deferFlush(c)
	} else {
		c.kick()
	}
}

func (s *h2Stream) touch() { s.last.Store(time.Now().UnixNano()) }

func (s *h2Stream) cluster() string {
	if s.upstream == nil {
		return ""
	}
	return s.upstream.name
}

// flowFrom is the direction whose bytes hc brings; flowTo the one hc
// takes; nil for a connection the stream no longer uses.
func (s *h2Stream) flowFrom(hc *h2Conn) *h2Flow {
	switch hc {
	case s.down:
		return &s.toUp
	case s.up:
		return &s.toDown
	}
	return nil
}

func (s *h2Stream) flowTo(hc *h2Conn) *h2Flow {
	switch hc {
	case s.up:
		return &s.toUp
	case s.down:
		return &s.toDown
	}
	return nil
}

// h2Open serves a new downstream stream: route it, then open it
// upstream. It runs on the downstream's reader.
func (p *Proxy) h2Open(down *h2Conn, f *http2.MetaHeadersFrame) {
	s := &h2Stream{p: p, down: down, born: time.Now()}
	s.toUp.src, s.toUp.srcID, s.toUp.recvWin = down, f.StreamID, h2StreamWindow
	s.toUp.srcEnded = f.StreamEnded()
	s.toUp.length, s.toDown.length = -1, -1
	s.lock(down)
	defer s.unlock()
	defer s.maybeDone()
	s.touch() // before the idle sweep can see the stream
	down.mu.Lock()
	s.toDown.dst, s.toDown.dstID, s.toDown.sendWin = down, f.StreamID, down.peerInitWin
	down.streams[f.StreamID] = s
	down.armIdleSweep()
	down.mu.Unlock()

	var method, scheme, authority, path, host string
	for _, hf := range f.Fields {
		switch hf.Name {
		case ":method":
			method = hf.Value
		case ":authority":
			authority = hf.Value
		case ":path":
			path = hf.Value
		case ":scheme":
			scheme = hf.Value
		case "host":
			host = hf.Value
		case "te":
			if hf.Value != "trailers" {
				s.clientFault(http2.ErrCodeProtocol)
				return
			}
		default:
			if connectionSpecific(hf.Name) {
				s.clientFault(http2.ErrCodeProtocol)
				return
			}
		}
	}
	if method == "" || (method != http.MethodConnect && (path == "" || scheme == "")) {
		s.clientFault(http2.ErrCodeProtocol)
		return
	}
	s.head = method == http.MethodHead
	var ok bool
	if s.toUp.length, ok = h2ContentLength(f.Fields); !ok {
		s.answer(http.StatusBadRequest, "isthmus sidecar: malformed content-length\n")
		return
	}
	if s.toUp.srcEnded && s.toUp.length > 0 {
		s.answer(http.StatusBadRequest, "isthmus sidecar: content-length announces a body the stream does not have\n")
		return
	}
	if tooLarge(f) {
		s.answer(http.StatusRequestHeaderFieldsTooLarge, "isthmus sidecar: request headers exceed "+strconv.Itoa(h2MaxHeaderList)+" bytes\n")
		return
	}
	if !p.requests.enter() {
		s.answer(http.StatusServiceUnavailable, "isthmus sidecar: shutting down")
		return
	}
	s.entered = true
	st := p.state.Load()
	if st == nil {
		s.answer(http.StatusServiceUnavailable, "isthmus sidecar: no configuration\n")
		return
	}
	if authority == "" {
		authority = host
	}
	ci := down.info
	nw, hcm := p.rbacNow(ci)
	if ci.retiring() {
		// Its chain is gone from the configuration: no stream after
		// this one.
		down.goAwayNow()
	}
	if hcm.NormalizePath {
		if path, ok = normalizeH2Path(f.Fields, method, path); !ok {
			s.answer(http.StatusBadRequest, "isthmus sidecar: path cannot be normalized\n")
			return
		}
	}
	ok = ci.allowedBy(nw)
	if rb := hcm.RBAC; ok && rb != nil {
		v := &down.rbacFields
		v.fields = f.Fields
		req := ci.rbacConn()
		req.Method, req.Authority, req.Path, req.Headers = method, authority, path, v
		ok = rb.Allows(&req)
		v.fields = nil
	}
	if !ok {
		p.rbacRefused(ci, method, path)
		s.answerWith("", http.StatusForbidden, h2RBACType, rbacDenied)
		return
	}
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	d := routeTo(st, ci, method, authority, path)
	s.upstream = d.up
	if d.err != "" {
		s.answerCluster(d.cluster, d.code, "isthmus sidecar: "+d.err+"\n")
		return
	}
	target, ok := p.target(ci, d.up)
	if !ok {
		s.answer(http.StatusBadGateway, notRedirected(d.up.name)+"\n")
		return
	}
	s.target = target
	s.fields = f.Fields
	if d.timeout > 0 {
		s.route = time.AfterFunc(d.timeout, func() { s.timeout(errRouteTimeout) })
	}
	if d.up.c.UpstreamHTTP == xdsclient.UpstreamHTTP1 {
		s.bridgeH1(d.timeout)
		return
	}
	s.connect()
}

// normalizeH2Path normalizes path, the :path of the method request whose header
// block is fields, and when that changes it, writes the result over the
// block's :path: RBAC, routing and the upstream all see it.
func normalizeH2Path(fields []hpack.HeaderField, method, path string) (string, bool) {
	out, changed, ok := normalizePath(nil, method, path)
	if !ok || !changed {
		return path, ok
	}
	path = str(out) // out is the path's own
	for i := range fields {
		if fields[i].Name == ":path" {
			fields[i].Value = path
		}
	}
	return path, true
}

// connect opens the stream on a connection to an endpoint of its
// cluster, as the other paths pick: another endpoint after a connect
// failure, up to MaxConnectAttempts. mu held.
func (s *h2Stream) connect() {
	p, u := s.p, s.upstream
	for {
		if s.attempts >= p.cfg.MaxConnectAttempts {
			s.fail(fmt.Errorf("%d connect attempts failed, the last: %w", s.attempts, s.lastErr))
			return
		}
		ep := s.target
		if u.picker != nil {
			var ok bool
			if ep, ok = u.picker.Pick(); !ok {
				s.fail(errNoHealthyUpstream)
				return
			}
		}
		s.attempts++
		err := u.pool.h2Attach(s, ep)
		if err == nil {
			return
		}
		s.lastErr = err
	}
}

// connectFailed is the end of a dial the stream waited for. mu held.
func (s *h2Stream) connectFailed(err error) {
	s.lastErr = err
	if s.toUp.dstEnded {
		return // the downstream left meanwhile
	}
	s.connect()
}

// fail answers a request that got no response, as proxyError does. mu
// held.
func (s *h2Stream) fail(err error) {
	s.failWith(failureCode(err), failureMessage(err), err)
}

// failWith answers code and msg for err, which it logs. mu held.
func (s *h2Stream) failWith(code int, msg string, err error) {
	p := s.p
	if p.log.Enabled(context.Background(), slog.LevelDebug) {
		p.log.Debug("request failed", "listener", s.down.info.listener, "cluster", s.cluster(), "code", code, "error", err)
	}
	s.answer(code, msg)
}

// timeout ends the stream when its route timeout or stream idle timeout
// passed: 504 before the response (408 for the idle timeout while the
// request was still coming, as Envoy answers), a reset after it started.
func (s *h2Stream) timeout(cause error) {
	s.lock(nil)
	defer s.unlock()
	if s.finished {
		return
	}
	if !s.answered {
		code, msg := http.StatusGatewayTimeout, "stream timeout"
		switch {
		case errors.Is(cause, errRouteTimeout):
			msg = "upstream request timeout"
		case !s.toUp.srcEnded:
			code = http.StatusRequestTimeout
		}
		s.answer(code, msg)
	} else {
		s.resetBoth(http2.ErrCodeCancel)
	}
	s.maybeDone()
}

// answer sends the sidecar's own plain-text response downstream,
// resetting the upstream stream if one is open. mu held.
func (s *h2Stream) answer(code int, body string) {
	s.answerCluster(s.cluster(), code, body)
}

func (s *h2Stream) answerCluster(cluster string, code int, body string) {
	s.answerWith(cluster, code, h2ErrorType, body)
}

// The content type fields of the sidecar's own answers: its errors', and
// Envoy's to a request HTTP RBAC denies (text/plain alone, as Envoy's).
var (
	h2ErrorType = []hpack.HeaderField{{Name: "content-type", Value: "text/plain; charset=utf-8"}, {Name: "x-content-type-options", Value: "nosniff"}}
	h2RBACType  = []hpack.HeaderField{{Name: "content-type", Value: "text/plain"}}
)

// answerWith is answerCluster with the content type fields typ. A request
// still sending its body is then stopped (maybeDone): RST_STREAM
// NO_ERROR once the answer ended.
func (s *h2Stream) answerWith(cluster string, code int, typ []hpack.HeaderField, body string) {
	if s.answered || s.toDown.dstEnded {
		return
	}
	s.answered = true
	s.count(cluster, code)
	s.resetUp(http2.ErrCodeCancel)
	fl := &s.toDown
	fl.src = nil
	fl.srcEnded = true
	fields := make([]hpack.HeaderField, 0, 2+len(typ))
	fields = append(fields, hpack.HeaderField{Name: ":status", Value: statusValue(code)})
	fields = append(fields, typ...)
	fields = append(fields, hpack.HeaderField{Name: "content-length", Value: strconv.Itoa(len(body))})
	down := s.down
	down.mu.Lock()
	down.writeHeaders(s.toDown.dstID, fields, nil, nil, s.head)
	down.mu.Unlock()
	s.wake(down)
	if s.head {
		fl.dstEnded = true
	} else {
		s.send(fl, []byte(body), true, false)
	}
	s.maybeDone()
}

func (s *h2Stream) count(cluster string, code int) {
	if s.counted {
		return
	}
	s.counted = true
	s.p.metrics.request(s.down.info.listener, cluster, code)
}

// send forwards data (and the end of the stream) along fl: written to
// the destination as far as the windows allow, the rest queued. borrowed
// data belongs to the reader and is copied if it must wait. mu held.
func (s *h2Stream) send(fl *h2Flow, data []byte, end, borrowed bool) {
	if fl.dstEnded {
		return
	}
	if len(data) > 0 {
		fl.queue = append(fl.queue, h2Chunk{b: data})
	}
	if end {
		fl.endQueued = true
	}
	s.flush(fl)
	if s.bridge != nil && fl == &s.toUp {
		s.bridge.signal()
	}
	if borrowed && len(data) > 0 && len(fl.queue) > 0 {
		// What is left of data waits: copy it out of the reader's buffer.
		last := &fl.queue[len(fl.queue)-1]
		if len(last.b) <= h2MaxFrame {
			last.buf = h2ChunkBufs.Get().(*[]byte)
			last.b = append((*last.buf)[:0], last.b...)
		} else {
			last.b = append([]byte(nil), last.b...)
		}
	}
}

// flush writes what fl's windows allow. mu held.
func (s *h2Stream) flush(fl *h2Flow) {
	dst := fl.dst
	if dst == nil || fl.dstEnded {
		return
	}
	dst.mu.Lock()
	wrote := false
	defer func() {
		dst.mu.Unlock()
		if wrote {
			s.wake(dst)
		}
		if s.bridge != nil && fl == &s.toDown && len(fl.queue) == 0 {
			s.bridge.signal() // it waits for room to pass more of the response
		}
	}()
	if dst.closed {
		return
	}
	for len(fl.queue) > 0 {
		chunk := fl.queue[0].b
		n := min(int64(len(chunk)), fl.sendWin, dst.sendWin, int64(dst.peerMaxFrame))
		if n <= 0 {
			if dst.sendWin <= 0 && !fl.blocked {
				fl.blocked = true
				dst.blocked[s] = struct{}{}
			}
			return
		}
		last := n == int64(len(chunk)) && len(fl.queue) == 1 && fl.endQueued && fl.trailers == nil
		dst.writeData(fl.dstID, chunk[:n], last)
		wrote = true
		fl.sendWin -= n
		dst.sendWin -= n
		fl.sent = true
		if fl.src != nil {
			dst.credits = append(dst.credits, h2Credit{s: s, fl: fl, src: fl.src, n: n})
		}
		if n == int64(len(chunk)) {
			fl.queue[0].free()
			fl.queue = fl.queue[1:]
			if len(fl.queue) == 0 {
				fl.queue = nil
			}
		} else {
			fl.queue[0].b = chunk[n:]
		}
		if last {
			fl.dstEnded = true
			return
		}
	}
	if !fl.endQueued {
		return
	}
	wrote = true
	if fl.trailers != nil {
		dst.writeHeaders(fl.dstID, fl.trailers, keepTrailerField, nil, true)
		fl.trailers = nil
		fl.sent = true // gone with them: no retry elsewhere
	} else {
		dst.writeData(fl.dstID, nil, true)
	}
	fl.dstEnded = true
}

// drop discards what fl holds (the connection's window came back when
// it arrived) and takes the stream off its destination's blocked set.
// mu held.
func (s *h2Stream) drop(fl *h2Flow) {
	for i := range fl.queue {
		fl.queue[i].free()
	}
	fl.queue, fl.trailers = nil, nil
	s.unblock(fl)
}

// unblock takes fl off its destination's set of streams waiting for the
// connection window. mu held.
func (s *h2Stream) unblock(fl *h2Flow) {
	if fl.blocked && fl.dst != nil {
		fl.dst.mu.Lock()
		delete(fl.dst.blocked, s)
		fl.dst.mu.Unlock()
	}
	fl.blocked = false
}

// credit gives the stream back the window of n bytes of fl written to
// its destination, once a quarter of the window is owed.
func (s *h2Stream) credit(fl *h2Flow, src *h2Conn, n int64) {
	s.mu.Lock()
	var inc int64
	id := fl.srcID
	if fl.src == src && !fl.srcEnded {
		fl.owed += n
		if fl.owed >= h2StreamWindow/4 {
			inc, fl.recvWin, fl.owed = fl.owed, fl.recvWin+fl.owed, 0
		}
	}
	s.mu.Unlock()
	if inc > 0 {
		src.creditConn(id, inc, 0)
	}
}

// onData is DATA from hc (n bytes of flow control, data without the
// padding).
func (s *h2Stream) onData(hc *h2Conn, data []byte, n int64, end bool) {
	s.lock(hc)
	defer s.unlock()
	fl := s.flowFrom(hc)
	if fl == nil || fl.srcEnded {
		if fl != nil && hc == s.down && !s.toDown.dstEnded {
			s.clientFault(http2.ErrCodeStreamClosed)
			s.maybeDone()
		}
		return
	}
	if hc == s.up && !s.answered {
		s.upFailed(http2.ErrCodeProtocol, errors.New("DATA before the response's head"))
		s.maybeDone()
		return
	}
	fl.recvWin -= n
	if fl.recvWin < 0 {
		s.reset(hc, http2.ErrCodeFlowControl, errors.New("DATA beyond the stream's window"))
		return
	}
	fl.got += int64(len(data))
	if fl.length >= 0 && (fl.got > fl.length || end && fl.got != fl.length) {
		s.malformed(hc, errLengthMismatch)
		return
	}
	if pad := n - int64(len(data)); pad > 0 {
		fl.recvWin += pad
		hc.creditConn(fl.srcID, pad, 0)
	}
	if len(data) > 0 {
		s.touch()
		if fl == &s.toUp {
			s.received += int64(len(data))
		} else {
			s.sent += int64(len(data))
		}
	}
	if end {
		fl.srcEnded = true
	}
	s.send(fl, data, end, true)
	s.maybeDone()
}

// onHeaders is a header block from hc on an open stream: trailers from
// the downstream; the response's head, 1xx, or trailers from the
// upstream.
func (s *h2Stream) onHeaders(hc *h2Conn, f *http2.MetaHeadersFrame) {
	s.lock(hc)
	defer s.unlock()
	defer s.maybeDone()
	fl := s.flowFrom(hc)
	if fl == nil || fl.srcEnded {
		if fl != nil && hc == s.down {
			s.clientFault(http2.ErrCodeStreamClosed)
		}
		return
	}
	if (hc == s.down || s.answered) && f.StreamEnded() {
		// Trailers: no pseudo-header, within the header list limit
		// (HPACK lets a small block decode to many times the limit),
		// and the DATA came whole.
		if tooLarge(f) {
			s.malformed(hc, errors.New("trailers exceed "+strconv.Itoa(h2MaxHeaderList)+" bytes"))
			return
		}
		if len(f.PseudoFields()) > 0 {
			s.malformed(hc, errors.New("pseudo-header field in trailers"))
			return
		}
		if fl.length >= 0 && fl.got != fl.length {
			s.malformed(hc, errLengthMismatch)
			return
		}
	}
	if hc == s.down {
		if !f.StreamEnded() {
			s.clientFault(http2.ErrCodeProtocol)
			return
		}
		fl.srcEnded, fl.trailers = true, f.Fields
		s.send(fl, nil, true, false)
		return
	}
	if s.answered {
		if !f.StreamEnded() {
			s.upFailed(http2.ErrCodeProtocol, errors.New("headers after the response's head without END_STREAM"))
			return
		}
		fl.srcEnded, fl.trailers = true, f.Fields
		s.send(fl, nil, true, false)
		return
	}
	v := f.PseudoValue("status")
	status, err := strconv.Atoi(v)
	switch {
	case tooLarge(f):
		s.upFailed(http2.ErrCodeProtocol, errors.New("response headers exceed "+strconv.Itoa(h2MaxHeaderList)+" bytes"))
	case v == "":
		s.upFailed(http2.ErrCodeProtocol, errors.New("response headers without :status"))
	case status == http.StatusSwitchingProtocols:
		s.upFailed(http2.ErrCodeProtocol, errors.New("101 Switching Protocols in HTTP/2")) // RFC 9113 §8.6
	case err != nil || status < 100 || status > 999 || len(v) != 3:
		s.upFailed(http2.ErrCodeProtocol, fmt.Errorf("malformed :status %q", v))
	case status < 200 && f.StreamEnded():
		s.upFailed(http2.ErrCodeProtocol, fmt.Errorf("%d response with END_STREAM: no final response", status)) // RFC 9113 §8.1
	case status < 200:
		// Interim heads are not flow-controlled: a few, as Go's
		// Transport takes, then the upstream is in breach.
		if s.interim++; s.interim > h2MaxInterim {
			s.upFailed(http2.ErrCodeProtocol, fmt.Errorf("more than %d interim (1xx) responses", h2MaxInterim))
			return
		}
		s.down.mu.Lock()
		s.down.writeHeaders(s.toDown.dstID, f.Fields, keepResponseField, nil, false)
		s.down.mu.Unlock()
		s.wake(s.down)
	default:
		if !s.head && status != http.StatusNoContent && status != http.StatusNotModified {
			var ok bool
			if fl.length, ok = h2ContentLength(f.Fields); !ok {
				s.upFailed(http2.ErrCodeProtocol, errors.New("malformed content-length"))
				return
			}
			if f.StreamEnded() && fl.length > 0 {
				s.upFailed(http2.ErrCodeProtocol, errLengthMismatch)
				return
			}
		}
		s.answered = true
		s.fields = nil
		s.count(s.cluster(), status)
		s.touch()
		end := f.StreamEnded()
		s.down.mu.Lock()
		s.down.writeHeaders(s.toDown.dstID, f.Fields, keepResponseField, nil, end)
		s.down.mu.Unlock()
		s.wake(s.down)
		if end {
			fl.srcEnded, fl.dstEnded = true, true
		}
	}
}

// tooLarge reports a header block over h2MaxHeaderList, as
// SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2); the Framer
// reads up to h2ReadHeaderList.
func tooLarge(f *http2.MetaHeadersFrame) bool {
	if f.Truncated {
		return true
	}
	n := 0
	for _, hf := range f.Fields {
		n += int(hf.Size())
	}
	return n > h2MaxHeaderList
}

// connectionSpecific names the fields HTTP/2 forbids (RFC 9113 §8.2.2):
// a request with one is malformed; a response's are dropped.
func connectionSpecific(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

func keepResponseField(f *hpack.HeaderField) bool { return !connectionSpecific(f.Name) }

// keepTrailerField drops, beside what HTTP/2 forbids, a trailer named
// x-forwarded-client-cert: only the sidecar sets that, in the header
// section, and an app that merges trailers into the headers would
// otherwise take a caller's for the sidecar's.
func keepTrailerField(f *hpack.HeaderField) bool {
	return keepRequestField(f) && keepResponseField(f) && !strings.HasPrefix(f.Name, ":")
}

func keepRequestField(f *hpack.HeaderField) bool {
	return f.Name != "x-forwarded-client-cert"
}

func (s *h2Stream) onWindowUpdate(hc *h2Conn, inc int64) {
	s.lock(hc)
	defer s.unlock()
	fl := s.flowTo(hc)
	if fl == nil {
		return
	}
	fl.sendWin += inc
	if fl.sendWin > 1<<31-1 {
		s.reset(hc, http2.ErrCodeFlowControl, errors.New("WINDOW_UPDATE took the stream's window above 2^31-1"))
		return
	}
	s.flush(fl)
	s.maybeDone()
}

// errLengthMismatch: a message's DATA did not add up to its
// content-length.
var errLengthMismatch = errors.New("DATA do not add up to the content-length")

// malformed ends the stream for a malformed message from hc (RFC 9113
// §8.1.1): a stream error PROTOCOL_ERROR to the downstream, or, from the
// upstream, a 502 or a reset downstream. mu held.
func (s *h2Stream) malformed(hc *h2Conn, why error) {
	s.reset(hc, http2.ErrCodeProtocol, why)
}

// h2ContentLength is the content-length of a header block (-1 when it
// has none); ok is false for a malformed value or differing values.
func h2ContentLength(fields []hpack.HeaderField) (length int64, ok bool) {
	length = -1
	for i := range fields {
		if fields[i].Name != "content-length" {
			continue
		}
		n, valid := parseContentLength([]byte(fields[i].Value))
		if !valid || (length >= 0 && n != length) {
			return -1, false
		}
		length = n
	}
	return length, true
}

// reset ends the stream for an error of hc's side of it (a frame that
// breaks the protocol, why), resetting that side with code.
func (s *h2Stream) reset(hc *h2Conn, code http2.ErrCode, why error) {
	if hc == s.down {
		s.clientFault(code)
	} else if hc == s.up {
		s.upFailed(code, why)
	}
	s.maybeDone()
}

// clientFault resets the stream for an error of the downstream's. One
// within h2PrematureReset of its opening counts as a premature reset,
// as the client's own do: a client could otherwise have the sidecar
// reset its streams for it ("MadeYouReset", CVE-2025-8671). mu held.
func (s *h2Stream) clientFault(code http2.ErrCode) {
	if !s.toDown.dstEnded && time.Since(s.born) < h2PrematureReset {
		s.down.premature.Add(1)
	}
	s.resetBoth(code)
}

// resetBoth resets the downstream stream with code and the upstream one
// with CANCEL. mu held.
func (s *h2Stream) resetBoth(code http2.ErrCode) {
	s.resetDown(code)
	s.resetUp(http2.ErrCodeCancel)
}

// resetDown ends the downstream stream with RST_STREAM. mu held.
func (s *h2Stream) resetDown(code http2.ErrCode) {
	if !s.toDown.dstEnded || !s.toUp.srcEnded {
		s.down.mu.Lock()
		s.down.writeRST(s.toDown.dstID, code)
		s.down.mu.Unlock()
		s.wake(s.down)
	}
	s.toDown.dstEnded, s.toUp.srcEnded = true, true
	s.drop(&s.toDown)
}

// resetUp ends the upstream stream (or its wait for a connection) with
// RST_STREAM. mu held.
func (s *h2Stream) resetUp(code http2.ErrCode) {
	if s.up != nil && (!s.toUp.dstEnded || !s.toDown.srcEnded) {
		s.up.mu.Lock()
		s.up.writeRST(s.toUp.dstID, code)
		s.up.countReset(s.upBorn)
		s.up.mu.Unlock()
		s.wake(s.up)
	}
	if s.bridge != nil {
		s.bridge.abort()
	}
	s.toUp.dstEnded, s.toDown.srcEnded = true, true
	s.drop(&s.toUp)
}

// upFailed ends the upstream stream for a breach of the protocol by the
// upstream: the downstream gets a 502 if no response started, else a
// reset. mu held.
func (s *h2Stream) upFailed(code http2.ErrCode, err error) {
	s.resetUp(code)
	if !s.answered {
		s.fail(upstreamProtocolError(err))
		return
	}
	s.resetDown(http2.ErrCodeInternal)
}

// peerReset is a RST_STREAM from hc's peer.
func (s *h2Stream) peerReset(hc *h2Conn, code http2.ErrCode) {
	s.lock(hc)
	defer s.unlock()
	if s.finished || (hc == s.up && s.upGone) {
		// A reset that raced with the stream's end (a GOAWAY's refusals
		// are listed before they are acted on).
		return
	}
	defer s.maybeDone()
	switch hc {
	case s.down:
		s.toUp.srcEnded, s.toDown.dstEnded = true, true
		s.drop(&s.toDown)
		s.resetUp(http2.ErrCodeCancel)
	case s.up:
		if code == http2.ErrCodeNo && s.toDown.srcEnded {
			// The response is whole: the upstream wants no more of the
			// request (RFC 9113 §8.1). What is queued still goes down.
			s.toUp.dstEnded = true
			s.drop(&s.toUp)
			return
		}
		// Refused (by RST_STREAM or a GOAWAY that did not take it): the
		// upstream did nothing with it, so it may go elsewhere while
		// its body is all still here.
		if code == http2.ErrCodeRefusedStream && !s.answered && !s.toUp.sent && !s.toDown.dstEnded &&
			s.attempts < s.p.cfg.MaxConnectAttempts {
			s.detachUp()
			s.connect()
			return
		}
		s.toUp.dstEnded, s.toDown.srcEnded = true, true
		s.drop(&s.toUp)
		if !s.answered {
			s.fail(fmt.Errorf("%v", code))
			return
		}
		// Mid-response. Only a cancel passes as it is: REFUSED_STREAM would
		// tell the client the request was not processed (it was), and a
		// reset with NO_ERROR before END_STREAM truncates the response.
		if code != http2.ErrCodeCancel {
			code = http2.ErrCodeInternal
		}
		s.resetDown(code)
	}
}

// detachUp takes the stream off its upstream connection to open it
// again elsewhere. mu held.
func (s *h2Stream) detachUp() {
	up := s.up
	up.release(s.toUp.dstID)
	s.up = nil
	s.unblock(&s.toUp)
	s.toUp.dst, s.toUp.dstID, s.toUp.dstEnded = nil, 0, false
	s.toDown.src, s.toDown.srcID, s.toDown.srcEnded = nil, 0, false
}

// connLost ends the stream's use of hc, a connection that ended.
func (s *h2Stream) connLost(hc *h2Conn, err error) {
	s.lock(nil)
	defer s.unlock()
	if s.finished {
		return
	}
	defer s.maybeDone()
	switch {
	case hc == s.down:
		s.toUp.srcEnded, s.toDown.dstEnded = true, true
		s.drop(&s.toDown)
		s.resetUp(http2.ErrCodeCancel)
	case hc == s.up:
		complete := s.toDown.srcEnded
		s.toUp.dstEnded, s.toDown.srcEnded = true, true
		s.drop(&s.toUp)
		if complete {
			return // the whole response is here; what is queued still goes down
		}
		if !s.answered {
			if s.p.log.Enabled(context.Background(), slog.LevelDebug) {
				s.p.log.Debug("upstream connection ended", "cluster", s.cluster(), "error", err)
			}
			hc.mu.Lock()
			broke := hc.brokeWith
			hc.mu.Unlock()
			if broke != http2.ErrCodeNo {
				s.fail(upstreamProtocolError(fmt.Errorf("connection error %v", broke)))
				return
			}
			s.fail(errConnTermination)
			return
		}
		s.resetDown(http2.ErrCodeInternal)
	case hc == s.waitingOn:
		s.waitingOn = nil
		s.connectFailed(err)
	}
}

// maybeDone takes the stream off the connections it is over with, and
// ends it once both are. A response that ended before its request did
// stops the request (RST_STREAM NO_ERROR, RFC 9113 §8.1). mu held.
func (s *h2Stream) maybeDone() {
	if s.finished {
		return
	}
	if s.toDown.dstEnded && !s.toUp.srcEnded {
		s.down.mu.Lock()
		s.down.writeRST(s.toDown.dstID, http2.ErrCodeNo)
		s.down.mu.Unlock()
		s.wake(s.down)
		s.toUp.srcEnded = true
		if !s.toUp.dstEnded {
			s.resetUp(http2.ErrCodeCancel)
		}
	}
	if !s.downGone && s.toUp.srcEnded && s.toDown.dstEnded {
		s.downGone = true
		s.down.release(s.toDown.dstID)
	}
	upDone := s.toUp.dstEnded && s.toDown.srcEnded
	if upDone && s.up != nil && !s.upGone {
		s.upGone = true
		s.up.release(s.toUp.dstID)
	}
	if s.downGone && upDone {
		s.finish()
	}
}

// finish counts the stream and stops its timers. mu held.
func (s *h2Stream) finish() {
	s.finished = true
	s.unblock(&s.toUp)
	s.unblock(&s.toDown)
	if s.route != nil {
		s.route.Stop()
	}
	p := s.p
	if !s.counted && s.upstream != nil {
		s.count(s.cluster(), 0) // the downstream left before an answer
	}
	if s.received > 0 || s.sent > 0 {
		bc := p.metrics.bytes(s.down.info.listener, s.cluster())
		bc.received.add(s.received)
		bc.sent.add(s.sent)
	}
	s.fields = nil
	if s.entered {
		p.requests.leave()
	}
}

// release takes stream id off hc's table: a downstream that is going
// away closes after its last stream; an upstream connection's
// reservation ends, and it closes once unused for UpstreamIdleTimeout.
func (hc *h2Conn) release(id uint32) {
	hc.mu.Lock()
	if _, ok := hc.streams[id]; !ok {
		hc.mu.Unlock()
		return
	}
	delete(hc.streams, id)
	n := len(hc.streams)
	if n == 0 {
		hc.lastStreamEnd.Store(time.Now().UnixNano())
		if cap(hc.spare) > 64<<10 {
			// A burst's buffer: kept by the connection only while streams
			// are open, then lent to any.
			b := hc.spare[:0]
			h2Bufs.Put(&b)
			hc.spare = nil
		}
	}
	var closeNow bool
	if hc.client {
		hc.reserved--
		n = hc.reserved
		if n == 0 && hc.closeIdle {
			hc.goAway = true
		}
		if n == 0 && !hc.goAway {
			if hc.idle == nil {
				hc.idle = time.AfterFunc(hc.p.cfg.UpstreamIdleTimeout, hc.idleExpired)
			} else {
				hc.idle.Reset(hc.p.cfg.UpstreamIdleTimeout)
			}
		}
	}
	closeNow = n == 0 && hc.goAway
	hc.mu.Unlock()
	if closeNow {
		hc.connError(http2.ErrCodeNo)
	} else if n == 0 && !hc.client && hc.p.cfg.HTTPIdleTimeout < h2SendPingTimeout {
		_ = hc.c.SetReadDeadline(time.Now().Add(hc.p.cfg.HTTPIdleTimeout))
	}
}

// xfccFields is what a downstream connection's requests get added: the
// caller's X-Forwarded-Client-Cert under SANITIZE_SET.
func xfccFields(ci *connInfo) []hpack.HeaderField {
	if v := ci.setXFCC(); v != "" {
		return []hpack.HeaderField{{Name: "x-forwarded-client-cert", Value: v}}
	}
	return nil
}
