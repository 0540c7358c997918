package sidecar

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// The sidecar's own HTTP/1.1 forwarding path. net/http costs a request
// three goroutine hand-offs in the client transport, about seven read
// and write system calls per proxy and a hundred allocations; this path
// serves a downstream connection on its own goroutine: it reads a request
// head into the connection's buffer, routes it, writes head and body to
// a pooled keep-alive upstream connection with one write when they fit,
// reads the response head and streams the response back, then waits for
// the next request. Requests are served in order, so pipelined ones are
// answered in order too. The request body is sent whole before the
// response is read, as nginx does: an upstream that answers early and
// closes without reading the body (a 413, say) is answered 503 "remote
// reset", where net/http's full-duplex transport would relay its answer;
// one that streams its response while still reading a large body waits
// on the stream idle timeout. Nothing reads the downstream while its
// request waits on the upstream, so a peek every h1WatchEvery finds a
// downstream that left (a caller's route timeout, say): the upstream's
// request then ends within a second, where net/http's background read
// ends it at once.
//
// What it does not handle goes to the net/http path with the bytes
// already read (errH1Fallback): HTTP/2 prior knowledge, HTTP/1.0,
// CONNECT, Upgrade, Expect, and a request for a cluster that speaks
// HTTP/2 upstream (a port declared http2 or grpc: net/http's Transport
// upgrades it, as Envoy does). Config.NetHTTP1 sends all HTTP/1.1 there,
// for comparison.

// Buffer sizes: a connection's read buffer, grown to h1MaxHead for a
// head that does not fit, and its write buffer.
const (
	h1ReadBuf  = 8 << 10
	h1WriteBuf = 8 << 10
)

var (
	h1SmallBufs = sync.Pool{New: func() any { b := make([]byte, h1ReadBuf); return &b }}
	h1LargeBufs = sync.Pool{New: func() any { b := make([]byte, h1MaxHead); return &b }}
)

// timing is a request's deadlines: every read and write ends by the
// route's deadline (zero: none) and within the stream idle timeout of
// its start, so a peer that stops moving bytes ends the request.
type timing struct {
	route time.Time
	idle  time.Duration
}

func (t *timing) next() time.Time {
	d := time.Now().Add(t.idle)
	if !t.route.IsZero() && t.route.Before(d) {
		return t.route
	}
	return d
}

// routePassed reports whether the route's deadline has passed.
func (t *timing) routePassed() bool {
	return !t.route.IsZero() && !time.Now().Before(t.route)
}

// deadline is the deadline a read or write should have now, and whether
// it must be set, given set, the one the socket has (zero: unknown). A
// deadline is a timer update in the runtime, once per read and write
// otherwise: one that would only move later by less than a sixteenth of
// the idle timeout is left, so the idle timeout may end a stream that
// was silent for 15/16 of it; the route's deadline is always exact.
func (t *timing) deadline(set *time.Time) (time.Time, bool) {
	end := t.next()
	switch {
	case end.Equal(*set):
		return end, false
	case !set.IsZero() && !end.Equal(t.route) && end.After(*set) && end.Sub(*set) < t.idle/16:
		return end, false
	}
	*set = end
	return end, true
}

// bufReader reads a connection through a buffer it owns, lent by
// h1SmallBufs or, for a large head, h1LargeBufs (bp is what goes back).
type bufReader struct {
	c    net.Conn
	bp   *[]byte
	buf  []byte
	r, w int
	big  bool
	tm   *timing
	// dl is the read deadline this reader last set on c (timing.deadline);
	// zero after anyone else set one.
	dl time.Time
	// down is the downstream connection whose request an upstream
	// connection's reader serves; nil for a downstream's own reader.
	down *h1Conn
}

func (b *bufReader) init(c net.Conn, tm *timing) {
	b.c, b.tm, b.down, b.dl = c, tm, nil, time.Time{}
	b.bp = h1SmallBufs.Get().(*[]byte)
	b.buf = *b.bp
	b.r, b.w, b.big = 0, 0, false
}

func (b *bufReader) free() {
	if b.bp == nil {
		return
	}
	if b.big {
		h1LargeBufs.Put(b.bp)
	} else {
		h1SmallBufs.Put(b.bp)
	}
	b.bp, b.buf = nil, nil
}

func (b *bufReader) buffered() []byte { return b.buf[b.r:b.w] }

// room makes space at the end of the buffer: it moves what is unread to
// the front; false when the buffer is full of unread bytes.
func (b *bufReader) room() bool {
	if b.r == b.w {
		b.r, b.w = 0, 0
	}
	if b.w < len(b.buf) {
		return true
	}
	if b.r == 0 {
		return false
	}
	b.w = copy(b.buf, b.buf[b.r:b.w])
	b.r = 0
	return true
}

// grow moves the unread bytes to a large buffer, for a head that does
// not fit the small one.
func (b *bufReader) grow() bool {
	if b.big {
		return false
	}
	nbp := h1LargeBufs.Get().(*[]byte)
	n := copy(*nbp, b.buf[b.r:b.w])
	h1SmallBufs.Put(b.bp)
	b.bp, b.buf, b.r, b.w, b.big = nbp, *nbp, 0, n, true
	return true
}

// shrink goes back to a small buffer once what is unread fits it.
func (b *bufReader) shrink() {
	if !b.big || b.w-b.r > h1ReadBuf {
		return
	}
	nbp := h1SmallBufs.Get().(*[]byte)
	n := copy(*nbp, b.buf[b.r:b.w])
	h1LargeBufs.Put(b.bp)
	b.bp, b.buf, b.r, b.w, b.big = nbp, *nbp, 0, n, false
}

// fill reads once more into the buffer, by the request's deadline. An
// upstream's reader looks at its downstream every h1WatchEvery while it
// waits, and gives up when the downstream has gone.
func (b *bufReader) fill() error {
	if b.down == nil {
		if end, set := b.tm.deadline(&b.dl); set {
			_ = b.c.SetReadDeadline(end)
		}
		return b.readMore()
	}
	end := b.tm.next()
	b.dl = time.Time{}
	for {
		deadline, watch := end, false
		if t := time.Now().Add(h1WatchEvery); t.Before(end) {
			deadline, watch = t, true
		}
		_ = b.c.SetReadDeadline(deadline)
		err := b.readMore()
		if !watch || !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		// A read timeout leaves a TLS connection usable.
		if err := b.down.downstreamGone(); err != nil {
			return err
		}
	}
}

// How often an upstream's reader looks at its downstream while it waits,
// and how long it waits for the downstream's bytes it saw coming.
const (
	h1WatchEvery = time.Second
	h1WatchRead  = 10 * time.Millisecond
)

// readMore reads once into the buffer, by the deadline already set.
func (b *bufReader) readMore() error {
	if !b.room() {
		return errHeadTooLarge
	}
	n, err := b.c.Read(b.buf[b.w:])
	b.w += n
	if n > 0 {
		return nil // an error comes again with the next read
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// line returns the next CRLF-ended line without its CRLF and consumes
// it; flush runs before a read would block. The line is valid until the
// next read.
func (b *bufReader) line(flush func() error) ([]byte, error) {
	from := 0
	for {
		buf := b.buffered()
		for i := from; i < len(buf); i++ {
			if buf[i] == '\n' {
				if i == 0 || buf[i-1] != '\r' {
					return nil, errBareLF
				}
				b.r += i + 1
				return buf[:i-1], nil
			}
		}
		if len(buf) > h1MaxChunkLine {
			return nil, errChunkLineLength
		}
		from = len(buf)
		if err := flush(); err != nil {
			return nil, writeErr{err}
		}
		if err := b.fill(); err != nil {
			return nil, err
		}
	}
}

// writeErr marks an error of the copy's destination, to tell it from
// its source's.
type writeErr struct{ err error }

func (e writeErr) Error() string { return e.err.Error() }
func (e writeErr) Unwrap() error { return e.err }

// wbuf buffers writes to a connection until flush, in a buffer lent by
// h1SmallBufs (bp).
type wbuf struct {
	c  net.Conn
	bp *[]byte
	b  []byte
	tm *timing
	// dl is the write deadline last set on c (timing.deadline).
	dl time.Time
}

func (w *wbuf) init(c net.Conn, tm *timing) {
	w.c, w.tm, w.dl = c, tm, time.Time{}
	w.bp = h1SmallBufs.Get().(*[]byte)
	w.b = (*w.bp)[:0]
}

func (w *wbuf) free() {
	if w.bp == nil {
		return
	}
	h1SmallBufs.Put(w.bp)
	w.bp, w.b = nil, nil
}

func (w *wbuf) flush() error {
	if len(w.b) == 0 {
		return nil
	}
	w.setDeadline()
	_, err := w.c.Write(w.b)
	w.b = w.b[:0]
	return err
}

func (w *wbuf) setDeadline() {
	if end, set := w.tm.deadline(&w.dl); set {
		_ = w.c.SetWriteDeadline(end)
	}
}

func (w *wbuf) write(p []byte) error {
	if len(w.b)+len(p) <= cap(w.b) {
		w.b = append(w.b, p...)
		return nil
	}
	if err := w.flush(); err != nil {
		return err
	}
	if len(p) >= cap(w.b)/2 {
		w.setDeadline()
		_, err := w.c.Write(p)
		return err
	}
	w.b = append(w.b, p...)
	return nil
}

// int writes v in base (10, or 16 for chunk sizes), formatted in place:
// a stack buffer would escape through the connection's Write.
func (w *wbuf) int(v int64, base int) error {
	if cap(w.b)-len(w.b) < 20 {
		if err := w.flush(); err != nil {
			return err
		}
	}
	w.b = strconv.AppendInt(w.b, v, base)
	return nil
}

func (w *wbuf) str(s string) error {
	return w.write(unsafe.Slice(unsafe.StringData(s), len(s)))
}

// copyN copies n bytes of body from src to dst.
func copyN(dst *wbuf, src *bufReader, n int64) (int64, error) {
	var done int64
	for done < n {
		if src.r == src.w {
			if err := dst.flush(); err != nil {
				return done, writeErr{err}
			}
			if err := src.fill(); err != nil {
				return done, err
			}
		}
		b := src.buffered()
		if int64(len(b)) > n-done {
			b = b[:n-done]
		}
		if err := dst.write(b); err != nil {
			return done, writeErr{err}
		}
		src.r += len(b)
		done += int64(len(b))
	}
	return done, nil
}

// copyChunked copies a chunked body from src to dst, chunk by chunk, the
// chunk sizes checked and written anew (extensions dropped), trailer
// fields checked and passed on but for X-Forwarded-Client-Cert, which
// only the sidecar sets (in the header section). It returns the data
// bytes copied.
func copyChunked(dst *wbuf, src *bufReader) (int64, error) {
	var total int64
	for {
		line, err := src.line(dst.flush)
		if err != nil {
			return total, err
		}
		size, err := parseChunkSize(line)
		if err != nil {
			return total, err
		}
		if size == 0 {
			if err := dst.str("0\r\n"); err != nil {
				return total, writeErr{err}
			}
			for {
				line, err := src.line(dst.flush)
				if err != nil {
					return total, err
				}
				if len(line) > 0 {
					// The line's CRLF is still in the buffer after it.
					f, err := parseField(line[:len(line)+2], 0, len(line))
					if err != nil {
						return total, err
					}
					if f.kind == fieldXFCC {
						continue
					}
				}
				if err := dst.write(line[:len(line)+2]); err != nil { // the line and its CRLF, still in src's buffer
					return total, writeErr{err}
				}
				if len(line) == 0 {
					return total, nil
				}
			}
		}
		if err := dst.int(size, 16); err != nil {
			return total, writeErr{err}
		}
		if err := dst.str("\r\n"); err != nil {
			return total, writeErr{err}
		}
		n, err := copyN(dst, src, size)
		total += n
		if err != nil {
			return total, err
		}
		crlf, err := src.line(dst.flush)
		if err != nil {
			return total, err
		}
		if len(crlf) != 0 {
			return total, errChunkEnd
		}
		if err := dst.str("\r\n"); err != nil {
			return total, writeErr{err}
		}
	}
}

// copyToClose copies a body delimited by the connection's end, chunked
// for the downstream.
func copyToClose(dst *wbuf, src *bufReader) (int64, error) {
	var total int64
	for {
		if src.r == src.w {
			if err := dst.flush(); err != nil {
				return total, writeErr{err}
			}
			if err := src.fill(); err != nil {
				if errors.Is(err, io.EOF) {
					if err := dst.str("0\r\n\r\n"); err != nil {
						return total, writeErr{err}
					}
					return total, nil
				}
				return total, err
			}
		}
		b := src.buffered()
		if err := dst.int(int64(len(b)), 16); err != nil {
			return total, writeErr{err}
		}
		if err := dst.str("\r\n"); err != nil {
			return total, writeErr{err}
		}
		if err := dst.write(b); err != nil {
			return total, writeErr{err}
		}
		if err := dst.str("\r\n"); err != nil {
			return total, writeErr{err}
		}
		src.r += len(b)
		total += int64(len(b))
	}
}

// States of a downstream connection, for the drain.
const (
	h1Busy int32 = iota
	h1Idle
	h1Closed
)

// h1Conn is one downstream connection on the HTTP/1.1 path; pooled.
type h1Conn struct {
	p    *Proxy
	c    net.Conn
	info *connInfo
	in   bufReader
	out  wbuf
	tm   timing
	req  h1Head
	resp h1Head
	// state is h1Idle while waiting for a request head; the drain moves
	// it to h1Closed and ends the wait.
	state atomic.Int32
	// up is the upstream connection in use, closed by the drain timeout.
	up atomic.Pointer[h1Up]

	// The last metric labels used, so a connection's requests to one
	// cluster look none up.
	reqCluster string
	reqCode    int
	reqCounter *counter
	bytesOf    string
	bytes      byteCounters
	// reqIsHead: the request in flight is a HEAD, whose response has no
	// body whatever its framing says.
	reqIsHead bool
	// readAhead: downstreamGone read bytes after the request in flight,
	// which may have overwritten its head: it cannot be sent again.
	readAhead bool
	// rbacFields is the request head as the HTTP RBAC filters read it.
	rbacFields h1Fields
	// normPath is the request in flight's path and query as normalize_path
	// made them, when that changed them (normalized); then they, not the
	// head's, are what RBAC, routing and the upstream see. Reused.
	normPath   []byte
	normalized bool
}

var h1Conns = sync.Pool{New: func() any { return new(h1Conn) }}

// serveH1 serves c's HTTP/1.1 requests until it closes, or hands it to
// the net/http server of q with the bytes read when a request needs it.
// It runs on the connection's goroutine.
func (p *Proxy) serveH1(q *connQueue, c net.Conn, info *connInfo) {
	hc := h1Conns.Get().(*h1Conn)
	hc.p, hc.c, hc.info = p, c, info
	hc.tm = timing{idle: p.cfg.StreamIdleTimeout}
	hc.in.init(c, &hc.tm)
	hc.out.init(c, &hc.tm)
	hc.state.Store(h1Busy)
	p.h1Mu.Lock()
	p.h1Conns[hc] = struct{}{}
	p.h1Mu.Unlock()

	fallback := hc.serve()

	p.h1Mu.Lock()
	delete(p.h1Conns, hc)
	p.h1Mu.Unlock()
	if fallback {
		rest := slices.Clone(hc.in.buffered())
		_ = c.SetDeadline(time.Time{})
		var nc net.Conn = c
		if len(rest) > 0 {
			nc = &prefixConn{Conn: c, rest: rest}
		}
		if isH2Preface(rest) && !p.cfg.NetHTTP2 {
			hc.in.free()
			hc.out.free()
			*hc = h1Conn{}
			h1Conns.Put(hc)
			p.serveH2(nc, info)
			return
		}
		p.pushHTTPConn(q, nc, info)
	} else {
		_ = c.Close()
		p.releaseHTTP(info)
	}
	hc.in.free()
	hc.out.free()
	*hc = h1Conn{}
	h1Conns.Put(hc)
}

// prefixConn replays the bytes the HTTP/1.1 path read before handing the
// connection to net/http.
type prefixConn struct {
	net.Conn
	rest []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.rest) > 0 {
		n := copy(b, c.rest)
		c.rest = c.rest[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// serve is the connection's request loop; true hands the connection to
// net/http.
func (hc *h1Conn) serve() (fallback bool) {
	for first := true; ; first = false {
		n, err := hc.readHead(first)
		if !hc.state.CompareAndSwap(h1Idle, h1Busy) {
			return false // the drain or retireIdle closed it while idle
		}
		switch {
		case errors.Is(err, errH1Fallback):
			return true
		case err != nil:
			var he *h1Error
			if errors.As(err, &he) {
				hc.refuse(he)
			}
			return false
		}
		head := hc.in.buf[hc.in.r : hc.in.r+n]
		if err := parseRequestHead(head, &hc.req); err != nil {
			var he *h1Error
			if errors.As(err, &he) {
				hc.refuse(he)
				return false
			}
			return true
		}
		hc.in.r += n
		keep, upgrade := hc.serveRequest(head)
		if upgrade {
			hc.in.r -= n // the head, still in the buffer, goes to net/http
			return true
		}
		if !keep || hc.closing() {
			return false
		}
		hc.in.shrink()
	}
}

// closing reports whether the connection closes after the request in
// flight: the sidecar drains, or its chain is gone from the current
// configuration (revoke.go). readHead reads it after marking the
// connection idle, and the drain and retireIdle set theirs before they
// look for idle connections: one of the two sees the other.
func (hc *h1Conn) closing() bool {
	return hc.p.draining.Load() || hc.info.retiring()
}

// refuse answers a request the codec cannot read, and the connection
// closes.
func (hc *h1Conn) refuse(e *h1Error) {
	hc.tm.route = time.Time{}
	hc.writeError(e.code, e.msg+"\n", true)
	hc.linger()
}

// normalizePath is path (the request target's path and query)
// normalized, as the inbound connection manager's normalize_path asks;
// path itself when that changes nothing. An absolute-form target without
// a path has "/". ok is false for a path that cannot be (answered 400).
func (hc *h1Conn) normalizePath(head, path []byte) ([]byte, bool) {
	target := str(path)
	if hc.req.absolute && (len(path) == 0 || path[0] == '?') {
		target = "/" + target // rare: a copy
	}
	out, changed, ok := normalizePath(hc.normPath, str(hc.req.method.of(head)), target)
	switch {
	case !ok:
		return path, false
	case changed:
		hc.normPath = out
	case len(target) != len(path):
		hc.normPath = append(out[:0], target...)
	default:
		return path, true
	}
	hc.normalized = true
	return hc.normPath, true
}

// rbacAllows decides the request whose head is head by the connection
// manager's HTTP RBAC filters, authority and path (the request target's
// path and query) read from it.
func (hc *h1Conn) rbacAllows(rb *xdsclient.HTTPRBAC, head []byte, authority, path string) bool {
	hc.rbacFields.head, hc.rbacFields.h = head, &hc.req
	req := hc.info.rbacConn()
	req.Method, req.Authority, req.Path, req.Headers = str(hc.req.method.of(head)), authority, path, &hc.rbacFields
	ok := rb.Allows(&req)
	hc.rbacFields.head, hc.rbacFields.h = nil, nil
	return ok
}

// denyRBAC answers a request the HTTP RBAC filters denied, 403 as Envoy
// does, nothing of it sent upstream, and reports whether the connection
// can serve another. A body already wholly in the buffer (the
// Content-Length the head announced) is skipped; any other closes the
// connection once the answer is out, as Envoy closes an HTTP/1.1
// connection whose request it answered before reading it all, and
// lingers so that the close does not reset the answer away.
func (hc *h1Conn) denyRBAC(method, target string, hasBody bool) bool {
	h := &hc.req
	hc.p.rbacRefused(hc.info, method, target)
	hc.count("", http.StatusForbidden)
	skip := !hasBody || !h.chunked && h.contentLength <= int64(hc.in.w-hc.in.r)
	keep := skip && !h.connClose
	hc.writeReply(http.StatusForbidden, "Content-Type: text/plain", rbacDenied, !keep, hc.reqIsHead)
	if !skip {
		hc.linger()
		return false
	}
	if hasBody {
		hc.in.r += int(h.contentLength)
	}
	return keep
}

// linger closes the connection's write side, then reads what the
// downstream still sends for a while, as net/http does: closing with
// unread bytes would reset the connection, and the reset can destroy the
// answer before the downstream reads it. The caller closes.
func (hc *h1Conn) linger() {
	if cw, ok := hc.c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_ = hc.c.SetReadDeadline(time.Now().Add(refuseLinger))
	_, _ = io.CopyN(io.Discard, hc.c, 256<<10)
}

// refuseLinger is how long a refused downstream may still send
// (net/http's rstAvoidanceDelay).
const refuseLinger = 500 * time.Millisecond

// readHead reads until the buffer holds a whole request head and returns
// its length. Waiting for the first byte of a request other than the
// first is the connection's idle time (HTTPIdleTimeout); the rest of the
// head has ReadHeaderTimeout.
func (hc *h1Conn) readHead(first bool) (int, error) {
	p, in := hc.p, &hc.in
	hc.tm.route = time.Time{}
	var deadline time.Time
	idle := !first && in.r == in.w
	if idle {
		deadline = time.Now().Add(p.cfg.HTTPIdleTimeout)
	} else {
		deadline = time.Now().Add(p.cfg.ReadHeaderTimeout)
	}
	hc.state.Store(h1Idle)
	if hc.closing() {
		return 0, net.ErrClosed
	}
	scanned := 0
	for {
		// Empty lines before a request line are ignored (RFC 9112 §2.2).
		for in.w-in.r >= 2 && in.buf[in.r] == '\r' && in.buf[in.r+1] == '\n' && scanned == 0 {
			in.r += 2
		}
		end, next, err := scanHead(in.buffered(), scanned)
		if err != nil || end > 0 {
			return end, err
		}
		scanned = next
		if in.w == len(in.buf) && in.r == 0 && !in.grow() {
			return 0, errHeadTooLarge
		}
		_ = in.c.SetReadDeadline(deadline)
		in.dl = time.Time{}
		// After the deadline is set and before the read: the drain sets
		// its own deadline once it sees h1Idle, and must not be undone.
		if hc.state.Load() == h1Closed {
			return 0, net.ErrClosed
		}
		if err := in.readMore(); err != nil {
			return 0, err
		}
		if idle {
			idle, deadline = false, time.Now().Add(p.cfg.ReadHeaderTimeout)
		}
	}
}

// str is b as a string, without a copy: valid while b is.
func str(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

// serveRequest routes and forwards the request whose head is head (the
// request body follows in hc.in); it reports whether the connection
// can serve another, or upgrade: the request is for a cluster that
// speaks HTTP/2 upstream (a port declared http2 or grpc), which the
// codec leaves to net/http's Transport, with the connection.
func (hc *h1Conn) serveRequest(head []byte) (keep, upgrade bool) {
	p, ci, h := hc.p, hc.info, &hc.req
	hasBody := h.chunked || h.contentLength > 0
	hc.reqIsHead = string(h.method.of(head)) == http.MethodHead
	hc.readAhead = false
	if !p.requests.enter() {
		hc.writeError(http.StatusServiceUnavailable, "isthmus sidecar: shutting down", true)
		return false, false
	}
	defer p.requests.leave()
	st := p.state.Load()
	if st == nil {
		hc.writeError(http.StatusServiceUnavailable, "isthmus sidecar: no configuration\n", hasBody)
		return !hasBody, false
	}
	authority := h.host
	if h.absolute {
		authority = h.authority
	}
	path := h.path.of(head)
	nw, hcm := p.rbacNow(ci)
	hc.normalized = false
	if hcm.NormalizePath {
		var ok bool
		if path, ok = hc.normalizePath(head, path); !ok {
			hc.count("", http.StatusBadRequest)
			hc.writeError(http.StatusBadRequest, "isthmus sidecar: path cannot be normalized\n", hasBody)
			return !hasBody, false
		}
	}
	if rb := hcm.RBAC; !ci.allowedBy(nw) || rb != nil && !hc.rbacAllows(rb, head, str(authority.of(head)), str(path)) {
		return hc.denyRBAC(str(h.method.of(head)), str(path), hasBody), false
	}
	if i := bytes.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	d := routeTo(st, ci, str(h.method.of(head)), str(authority.of(head)), str(path))
	if d.err != "" {
		hc.count(d.cluster, d.code)
		hc.writeError(d.code, "isthmus sidecar: "+d.err+"\n", hasBody)
		return !hasBody, false
	}
	if d.up.c.UpstreamHTTP == xdsclient.UpstreamHTTP2 {
		return false, true
	}
	target, ok := p.target(ci, d.up)
	if !ok {
		hc.count(d.up.name, http.StatusBadGateway)
		hc.writeError(http.StatusBadGateway, notRedirected(d.up.name)+"\n", hasBody)
		return !hasBody, false
	}
	hc.tm.route = time.Time{}
	if d.timeout > 0 {
		hc.tm.route = time.Now().Add(d.timeout)
	}
	return hc.forward(d, target, head, hasBody), false
}

// forward sends the request to the route's upstream and its response
// back. Endpoints are tried as the net/http path's roundTripper does: a
// connect failure tries another (the dialer ejects the endpoint), up to
// MaxConnectAttempts; a pooled connection the upstream closed while idle
// is retried once on a new one when the request was idempotent and had
// no body, as net/http's Transport does.
func (hc *h1Conn) forward(d decision, target netip.AddrPort, head []byte, hasBody bool) bool {
	p, h, u := hc.p, &hc.req, d.up
	method := h.method.of(head)
	replayable := !hasBody && (string(method) == "GET" || string(method) == "HEAD" || string(method) == "OPTIONS" || string(method) == "TRACE")
	attempts := p.cfg.MaxConnectAttempts
	var (
		ep       netip.AddrPort
		up       *h1Up
		err      error
		respLen  int
		fresh    bool
		received int64
	)
	for {
		if ep, up, err = u.h1Connect(target, fresh, &hc.tm, &attempts); err != nil {
			break
		}
		hc.up.Store(up)
		var gotByte bool
		received, err = hc.sendRequest(up, head)
		if err == nil {
			respLen, gotByte, err = hc.readResponseHead(up)
		}
		if err == nil {
			if u.picker != nil {
				p.health.Restore(ep)
			}
			break
		}
		hc.up.Store(nil)
		reused := up.reused
		up.close()
		up = nil
		if errors.Is(err, errDownstream) {
			hc.countBytes(d.up.name, received, 0)
			var he *h1Error
			if errors.As(err, &he) {
				// A request body the codec refuses (a bad chunk): the
				// upstream's copy of the request was cut with its
				// connection.
				hc.count(d.up.name, he.code)
				hc.refuse(he)
				return false
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// The downstream stopped sending its body: answered, as
				// Envoy answers an incomplete request, 408 (504 once
				// the route's deadline passed), and the connection
				// closed, its request unfinished.
				code, msg := http.StatusRequestTimeout, "stream timeout"
				if hc.tm.routePassed() {
					code, msg = http.StatusGatewayTimeout, "upstream request timeout"
				}
				hc.count(d.up.name, code)
				hc.tm.route = time.Time{}
				hc.writeError(code, msg, true)
				return false
			}
			// The downstream went away, or stopped reading.
			hc.count(d.up.name, 0)
			return false
		}
		if reused && !gotByte && !fresh && replayable && !hc.readAhead && !hc.tm.routePassed() {
			fresh = true // a pooled connection the upstream had closed
			continue
		}
		break
	}
	if err != nil {
		hc.countBytes(d.up.name, received, 0)
		hc.answerError(d.up.name, err)
		// A body not wholly read leaves the connection unusable.
		return !hasBody || (received == h.contentLength && !h.chunked)
	}
	keep := hc.writeResponse(up, d.up.name, respLen, received)
	return keep
}

// h1Connect returns a connection to an endpoint of u for an HTTP/1.1
// exchange, and the endpoint: target when u has no picker; a new
// connection when fresh. After a connect failure it tries another
// endpoint (the dialer ejected the one that failed) while *attempts
// last and the route's deadline has not passed. Both HTTP/1.1
// forwarders (h1Conn.forward and the HTTP/2 bridge) connect through it.
func (u *upstream) h1Connect(target netip.AddrPort, fresh bool, tm *timing, attempts *int) (netip.AddrPort, *h1Up, error) {
	for {
		ep := target
		if u.picker != nil {
			var ok bool
			if ep, ok = u.picker.Pick(); !ok {
				return ep, nil, errNoHealthyUpstream
			}
		}
		up, err := u.pool.h1Get(ep, fresh, tm)
		if err == nil {
			return ep, up, nil
		}
		*attempts--
		var ce *connectError
		if *attempts <= 0 || !errors.As(err, &ce) || u.picker == nil || tm.routePassed() {
			return ep, nil, err
		}
	}
}

// errDownstream marks a failure to read the request body from the
// downstream.
var errDownstream = errors.New("downstream read failed")

type downErr struct{ err error }

func (e downErr) Error() string   { return "downstream: " + e.err.Error() }
func (e downErr) Is(t error) bool { return t == errDownstream }
func (e downErr) Unwrap() error   { return e.err }

// downstreamGone reports, as a downErr, that the downstream closed its
// connection (or its sending side, which net/http's server takes as gone
// too) while its request waits on the upstream: the upstream's request
// then ends with it, as on the net/http path, rather than on the stream
// idle timeout. closedWhileIdle's peek is true when the socket has bytes
// or its end; the bytes, a TLS close_notify or the next pipelined
// request, are read into the buffer the next head is read from.
func (hc *h1Conn) downstreamGone() error {
	if !closedWhileIdle(hc.c) {
		return nil
	}
	_ = hc.c.SetReadDeadline(time.Now().Add(h1WatchRead))
	hc.in.dl = time.Time{}
	err := hc.in.readMore()
	switch {
	case err == nil:
		hc.readAhead = true
		return nil
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, errHeadTooLarge):
		return nil // a TLS record not whole yet; a buffer full of requests
	}
	return downErr{err}
}

// sendRequest writes the request head, edited, and its body to up: one
// write when they fit the buffer. The edits are those of the net/http
// path (Proxy.rewrite and ReverseProxy): origin-form with the authority
// in Host, hop-by-hop fields and those Connection names removed, "TE:
// trailers" kept, X-Forwarded-Client-Cert removed or set, and the framing
// written anew.
func (hc *h1Conn) sendRequest(up *h1Up, head []byte) (int64, error) {
	h, ci, w := &hc.req, hc.info, &up.out
	w.tm = &hc.tm
	up.in.tm, up.in.down = &hc.tm, hc
	w.b = w.b[:0]
	if h.absolute || hc.normalized {
		path := h.path.of(head)
		if hc.normalized {
			path = hc.normPath
		}
		_ = w.write(h.method.of(head))
		_ = w.str(" ")
		if len(path) == 0 {
			_ = w.str("/")
		} else {
			_ = w.write(path)
		}
		_ = w.str(" HTTP/1.1\r\n")
		if h.absolute {
			_ = w.str("Host: ")
			_ = w.write(h.authority.of(head))
			_ = w.str("\r\n")
		}
	} else {
		_ = w.write(head[:h.target.e])
		_ = w.str(" HTTP/1.1\r\n")
	}
	for i := range h.fields {
		f := &h.fields[i]
		switch f.kind {
		case fieldHost:
			if h.absolute {
				continue
			}
		case fieldOther:
			if h.nConnTokens > 0 && h.connNamed(head, f) {
				continue
			}
		default:
			continue
		}
		if err := w.write(f.line.of(head)); err != nil {
			return 0, err
		}
	}
	if h.teTrailers {
		_ = w.str("Te: trailers\r\n")
	}
	if v := ci.setXFCC(); v != "" {
		_ = w.str(xfccHeader + ": ")
		_ = w.str(v)
		_ = w.str("\r\n")
	}
	var err error
	switch {
	case h.chunked:
		_ = w.str("Transfer-Encoding: chunked\r\n\r\n")
	case h.contentLength >= 0:
		_ = w.str("Content-Length: ")
		_ = w.int(h.contentLength, 10)
		err = w.str("\r\n\r\n")
	default:
		err = w.str("\r\n")
	}
	if err != nil {
		return 0, err
	}
	var sent int64
	switch {
	case h.chunked:
		sent, err = copyChunked(w, &hc.in)
	case h.contentLength > 0:
		sent, err = copyN(w, &hc.in, h.contentLength)
	}
	if err != nil {
		var we writeErr
		if errors.As(err, &we) {
			return sent, we.err // the upstream's
		}
		return sent, downErr{err}
	}
	return sent, w.flush()
}

// readResponseHead reads up's response head, passing 1xx interim
// responses on to the downstream as they are, and returns the final
// head's length. gotByte reports whether the upstream sent anything.
func (hc *h1Conn) readResponseHead(up *h1Up) (int, bool, error) {
	return readResponseHead(&up.in, &hc.resp, func(head []byte) error {
		// Interim (103 Early Hints): on to the downstream as it is.
		if err := hc.out.write(head); err != nil {
			return downErr{err}
		}
		if err := hc.out.flush(); err != nil {
			return downErr{err}
		}
		return nil
	})
}

// readResponseHead reads the next final response head from in into h,
// handing each 1xx interim head to interim, and returns its length (the
// head stays in in's buffer). gotByte reports whether the upstream sent
// anything.
func readResponseHead(in *bufReader, h *h1Head, interim func(head []byte) error) (int, bool, error) {
	gotByte := in.r < in.w
	scanned, interims := 0, 0
	for {
		end, next, err := scanHead(in.buffered(), scanned)
		if err != nil {
			return 0, gotByte, upstreamProtocolError(err)
		}
		if end == 0 {
			scanned = next
			if in.w == len(in.buf) && in.r == 0 && !in.grow() {
				return 0, gotByte, upstreamProtocolError(errHeadTooLarge)
			}
			if err := in.fill(); err != nil {
				return 0, gotByte, err
			}
			gotByte = true
			continue
		}
		head := in.buf[in.r : in.r+end]
		if err := parseResponseHead(head, h); err != nil {
			return 0, true, upstreamProtocolError(err)
		}
		switch s := h.status; {
		case s == http.StatusSwitchingProtocols:
			return 0, true, upstreamProtocolError(errors.New("101 Switching Protocols to a request without Upgrade"))
		case s < 200:
			// Not flow-controlled on the bridge to HTTP/2: a few, as
			// Go's Transport takes, then the upstream is in breach.
			if interims++; interims > h2MaxInterim {
				return 0, true, upstreamProtocolError(errors.New("more than " + strconv.Itoa(h2MaxInterim) + " interim (1xx) responses"))
			}
			if err := interim(head); err != nil {
				return 0, true, err
			}
			in.r += end
			scanned = 0
			continue
		}
		return end, true, nil
	}
}

// writeResponse streams the response whose head up's buffer holds
// (headLen bytes) to the downstream, then pools up when it can carry
// another request. It reports whether the downstream connection can.
func (hc *h1Conn) writeResponse(up *h1Up, cluster string, headLen int, received int64) bool {
	p, rh, w, in := hc.p, &hc.resp, &hc.out, &up.in
	head := in.buf[in.r : in.r+headLen]
	in.r += headLen
	noBody, toClose, upKeep := rh.responseBody(hc.reqIsHead)
	downKeep := !hc.req.connClose && !hc.closing()

	_ = w.str("HTTP/1.1 ")
	_ = w.write(rh.reason.of(head))
	_ = w.str("\r\n")
	for i := range rh.fields {
		f := &rh.fields[i]
		if f.kind == fieldContentLength {
			if !noBody || rh.chunked {
				continue // written below
			}
		} else if !rh.endToEnd(head, f) {
			continue
		}
		_ = w.write(f.line.of(head))
	}
	switch {
	case noBody:
	case rh.chunked, toClose:
		_ = w.str("Transfer-Encoding: chunked\r\n")
	default:
		_ = w.str("Content-Length: ")
		_ = w.int(rh.contentLength, 10)
		_ = w.str("\r\n")
	}
	if !downKeep {
		_ = w.str("Connection: close\r\n")
	}
	err := w.str("\r\n")
	hc.count(cluster, rh.status)
	var sent int64
	if err == nil {
		switch {
		case noBody:
		case rh.chunked:
			sent, err = copyChunked(w, in)
		case toClose:
			sent, err = copyToClose(w, in)
		default:
			sent, err = copyN(w, in, rh.contentLength)
		}
	}
	if err == nil {
		err = w.flush()
	}
	hc.countBytes(cluster, received, sent)
	hc.up.Store(nil)
	if err != nil {
		if p.log.Enabled(context.Background(), slog.LevelDebug) {
			p.log.Debug("response cut", "listener", hc.info.listener, "cluster", cluster, "error", err)
		}
		up.close()
		return false
	}
	if upKeep && in.r == in.w {
		up.pool.h1Put(up)
	} else {
		up.close() // closing, or it sent more than its response
	}
	return downKeep
}

// h1Failure is the answer to an HTTP/1.1 exchange that failed before a
// response, as the net/http path's proxyError words it: 504 when a
// deadline passed (the route's: "upstream request timeout", also for a
// connect cut short by it; else "stream timeout"), else failureCode's
// 502 or 503.
func h1Failure(err error, tm *timing) (int, string) {
	var ce *connectError
	switch {
	case (errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ce)) && tm.routePassed():
		return http.StatusGatewayTimeout, "upstream request timeout"
	case errors.Is(err, os.ErrDeadlineExceeded):
		return http.StatusGatewayTimeout, "stream timeout"
	}
	return failureCode(err), failureMessage(err)
}

// answerError answers a request that got no response, as the net/http
// path's proxyError does.
func (hc *h1Conn) answerError(cluster string, err error) {
	p := hc.p
	if errors.Is(err, errDownstream) {
		hc.count(cluster, 0)
		return
	}
	code, msg := h1Failure(err, &hc.tm)
	hc.count(cluster, code)
	if p.log.Enabled(context.Background(), slog.LevelDebug) {
		p.log.Debug("request failed", "listener", hc.info.listener, "cluster", cluster, "code", code, "error", err)
	}
	hc.tm.route = time.Time{}
	hc.writeError(code, msg, false)
}

// writeError writes a plain-text response; close adds Connection: close.
func (hc *h1Conn) writeError(code int, body string, close bool) {
	hc.writeReply(code, "Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff", body, close, false)
}

// writeReply writes a response of the sidecar's own: code, fields (lines
// without their last CRLF), the framing, body; only the framing of the
// body when it answers a HEAD request (head).
func (hc *h1Conn) writeReply(code int, fields, body string, close, head bool) {
	w := &hc.out
	_ = w.str("HTTP/1.1 ")
	_ = w.int(int64(code), 10)
	_ = w.str(" ")
	_ = w.str(http.StatusText(code))
	_ = w.str("\r\n")
	_ = w.str(fields)
	_ = w.str("\r\nContent-Length: ")
	_ = w.int(int64(len(body)), 10)
	if close || hc.closing() {
		_ = w.str("\r\nConnection: close")
	}
	_ = w.str("\r\n\r\n")
	if !head {
		_ = w.str(body)
	}
	_ = w.flush()
}

// count records a request's code, its labels looked up only when they
// change.
func (hc *h1Conn) count(cluster string, code int) {
	if hc.reqCounter == nil || hc.reqCluster != cluster || hc.reqCode != code {
		hc.reqCluster, hc.reqCode = cluster, code
		hc.reqCounter = hc.p.metrics.requestCounter(hc.info.listener, cluster, code)
	}
	hc.reqCounter.add(1)
}

// countBytes records a request's body bytes each way.
func (hc *h1Conn) countBytes(cluster string, received, sent int64) {
	if received == 0 && sent == 0 {
		return
	}
	m := hc.p.metrics
	if hc.bytes.received == nil || hc.bytesOf != cluster {
		hc.bytesOf = cluster
		hc.bytes = m.bytes(hc.info.listener, cluster)
	}
	hc.bytes.received.add(received)
	hc.bytes.sent.add(sent)
}

// h1KickIdle ends the wait of every HTTP/1.1 connection idle between
// requests: the drain's first step, as http.Server.Shutdown closes idle
// connections.
func (p *Proxy) h1KickIdle() {
	p.h1Mu.Lock()
	defer p.h1Mu.Unlock()
	for hc := range p.h1Conns {
		if hc.state.CompareAndSwap(h1Idle, h1Closed) {
			_ = hc.c.SetReadDeadline(time.Now())
		}
	}
}

// h1CutAll closes every HTTP/1.1 connection and the upstream connection
// it uses: the drain timeout passed.
func (p *Proxy) h1CutAll() int {
	p.h1Mu.Lock()
	defer p.h1Mu.Unlock()
	for hc := range p.h1Conns {
		hc.state.Store(h1Closed)
		_ = hc.c.Close()
		if up := hc.up.Load(); up != nil {
			_ = up.c.Close()
		}
	}
	return len(p.h1Conns)
}

// h1Up is a pooled upstream HTTP/1.1 connection with its buffers.
type h1Up struct {
	pool *pool
	ep   netip.AddrPort
	c    net.Conn // an *upConn
	in   bufReader
	out  wbuf
	// reused is set once the connection served a request.
	reused bool
	// idle, idleAt and timer are guarded by pool.h1mu: whether it sits
	// in the pool, since when, and the timer closing it after
	// UpstreamIdleTimeout there.
	idle   bool
	idleAt time.Time
	timer  *time.Timer
	closed atomic.Bool
}

func (u *h1Up) close() {
	if !u.closed.CompareAndSwap(false, true) {
		return
	}
	_ = u.c.Close()
	u.pool.h1mu.Lock()
	if u.timer != nil {
		u.timer.Stop()
	}
	u.pool.h1mu.Unlock()
	u.in.free()
	u.out.free()
}

// h1Get returns an idle connection to ep, or a new one (fresh: always
// new), dialed within the cluster's connect timeout and the route's
// deadline.
func (pl *pool) h1Get(ep netip.AddrPort, fresh bool, tm *timing) (*h1Up, error) {
	for !fresh {
		pl.h1mu.Lock()
		idle := pl.h1idle[ep]
		if len(idle) == 0 {
			pl.h1mu.Unlock()
			break
		}
		u := idle[len(idle)-1]
		idle[len(idle)-1] = nil
		pl.h1idle[ep] = idle[:len(idle)-1]
		u.idle = false
		pl.h1mu.Unlock()
		// Every time, though it costs a system call per request: bytes
		// that came while the connection sat idle were asked for by no
		// request, and read after the next one they would be taken for
		// its response (an app whose Content-Length fell short of what
		// it wrote, a moment later). Envoy and nginx close an idle
		// upstream connection as soon as it turns readable.
		if closedWhileIdle(u.c) {
			u.close()
			continue
		}
		u.reused = true
		return u, nil
	}
	ctx := context.Background()
	if !tm.route.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, tm.route)
		defer cancel()
	}
	c, err := pl.dialPooled(ctx, ep, pl.tlsH1)
	if err != nil {
		return nil, err
	}
	u := &h1Up{pool: pl, ep: ep, c: c}
	u.in.init(c, tm)
	u.out.init(c, tm)
	return u, nil
}

// h1Put pools u for ep's next request, unless the pool keeps enough
// idle connections to it or was closed.
func (pl *pool) h1Put(u *h1Up) {
	u.in.shrink()
	pl.h1mu.Lock()
	idle := pl.h1idle[u.ep]
	if pl.h1closed || len(idle) >= pl.p.cfg.MaxIdlePerEndpoint || u.closed.Load() {
		pl.h1mu.Unlock()
		u.close()
		return
	}
	if pl.h1idle == nil {
		pl.h1idle = map[netip.AddrPort][]*h1Up{}
	}
	pl.h1idle[u.ep] = append(idle, u)
	u.idle, u.idleAt = true, time.Now()
	if u.timer == nil {
		u.timer = time.AfterFunc(pl.p.cfg.UpstreamIdleTimeout, u.idleExpired)
	} else {
		u.timer.Reset(pl.p.cfg.UpstreamIdleTimeout)
	}
	pl.h1mu.Unlock()
}

// idleExpired closes u if it has sat in the pool for UpstreamIdleTimeout.
func (u *h1Up) idleExpired() {
	pl := u.pool
	pl.h1mu.Lock()
	if !u.idle || time.Since(u.idleAt) < pl.p.cfg.UpstreamIdleTimeout {
		pl.h1mu.Unlock()
		return
	}
	pl.h1removeLocked(u)
	pl.h1mu.Unlock()
	u.close()
}

// h1removeLocked takes idle u out of the pool; pl.h1mu is held.
func (pl *pool) h1removeLocked(u *h1Up) {
	idle := pl.h1idle[u.ep]
	if i := slices.Index(idle, u); i >= 0 {
		pl.h1idle[u.ep] = slices.Delete(idle, i, i+1)
	}
	u.idle = false
}

// h1CloseIdle closes the idle connections and makes the pool close the
// ones put back from now on.
func (pl *pool) h1CloseIdle() {
	pl.h1mu.Lock()
	pl.h1closed = true
	var all []*h1Up
	for ep, idle := range pl.h1idle {
		for _, u := range idle {
			u.idle = false
			all = append(all, u)
		}
		delete(pl.h1idle, ep)
	}
	pl.h1mu.Unlock()
	for _, u := range all {
		u.close()
	}
}
