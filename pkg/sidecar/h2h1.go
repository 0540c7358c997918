package sidecar

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// An HTTP/2 stream whose cluster speaks HTTP/1.1 upstream: a port
// declared `http`, which Istio's sidecars reach over HTTP/1.1 whatever
// the app spoke (xdsclient.UpstreamHTTP1). The stream's downstream half
// is the HTTP/2 path's as ever; its upstream half is an HTTP/1.1
// exchange on a pooled keep-alive connection of the HTTP/1.1 path (h1Up),
// run by one goroutine per stream (a pooled worker, startBridge) with
// that path's blocking reads and writes and its deadlines:
//
//   - the request head is built from the header block when the stream
//     opens (a request HTTP/1.1 cannot carry is answered there: 501 for
//     CONNECT and other pseudo-header fields, 400 for a target or
//     authority HTTP/1.1 cannot carry); cookies are joined into one
//     field, :authority becomes Host, X-Forwarded-Client-Cert is replaced
//     as on the other paths; "Expect: 100-continue" is answered 100 by
//     the sidecar and not passed on, as Envoy does by default;
//   - the body goes with its Content-Length, or chunked when the client
//     gave none, request trailers in the last chunk; the client's DATA
//     waits in the stream's queue until the goroutine writes it, and the
//     stream's window comes back only then, so a slow upstream holds back
//     this stream's sender and nobody else. A body that does not match its
//     Content-Length resets the stream (PROTOCOL_ERROR, RFC 9113 §8.1.1);
//   - as on the HTTP/1.1 path, the whole body is sent before the response
//     is read, endpoints are tried again after a connect failure, and a
//     pooled connection the upstream had closed is replaced once for an
//     idempotent request without a body;
//   - the response head becomes HEADERS (field names lowercased,
//     connection-specific fields dropped), the body DATA, chunked trailers
//     a trailing HEADERS; the goroutine reads no more of the response while
//     what it passed down waits for the client's window.
//
// A reset, a timeout or the end of either connection aborts the exchange:
// the upstream connection is closed under the goroutine, which then ends.

// h1Bridge is the upstream half of an HTTP/2 stream to an HTTP/1.1
// cluster.
type h1Bridge struct {
	s *h2Stream
	// req is the request head to send; framing how the body goes.
	req     []byte
	framing bodyFraming
	// replayable: an idempotent request without a body, which may be sent
	// again on a new connection when a pooled one turns out closed.
	replayable bool
	// expect100: the client asked for 100 Continue before its body.
	expect100 bool
	tm        timing
	// kick wakes the goroutine: request body queued, the response's
	// queue drained, or the exchange aborted.
	kick    chan struct{}
	up      atomic.Pointer[h1Up]
	aborted atomic.Bool
	// resp is the response head, from h1HeadPool while the goroutine
	// runs.
	resp *h1Head
}

// h1HeadPool holds the response heads of bridged exchanges: an h1Head
// is 3.5 KB (its array of fields), which allocated and cleared for every
// request was a third of the bytes the HTTP/2 → HTTP/1.1 path allocated.
var h1HeadPool = sync.Pool{New: func() any { return new(h1Head) }}

// bodyFraming is how a bridged request's body is delimited upstream.
type bodyFraming struct {
	// none: no body (the header block ended the stream).
	none bool
	// length is the client's Content-Length; -1 for none, and then the
	// body is chunked.
	length int64
}

// Errors of a bridged exchange.
var (
	// errBridgeAborted: the stream no longer wants the upstream side.
	errBridgeAborted = errors.New("sidecar: the stream ended")
	// errBodyLength: the client's DATA did not match its Content-Length.
	errBodyLength = errors.New("request body does not match its content-length")
)

// bridgeH1 starts the HTTP/1.1 exchange of a routed stream whose
// cluster speaks HTTP/1.1 (s.fields is the request's header block, the
// route's timeout timeout). It runs on the downstream's reader. mu held.
func (s *h2Stream) bridgeH1(timeout time.Duration) {
	b := &h1Bridge{s: s, kick: make(chan struct{}, 1), tm: timing{idle: s.p.cfg.StreamIdleTimeout}}
	if timeout > 0 {
		b.tm.route = time.Now().Add(timeout)
	}
	if code, msg := b.buildRequest(s.fields, s.down.xfcc, s.toUp.srcEnded); code != 0 {
		s.answer(code, "isthmus sidecar: "+msg+"\n")
		return
	}
	if !s.p.upstreams.enter() {
		s.answer(http.StatusServiceUnavailable, "isthmus sidecar: shutting down")
		return
	}
	if b.expect100 {
		// Answered here, as Envoy does by default: the body goes upstream
		// right behind the head, so an upstream's 100 would come too late
		// for a client that waits for one.
		s.down.mu.Lock()
		s.down.writeHeaders(s.toDown.dstID, []hpack.HeaderField{{Name: ":status", Value: "100"}}, nil, nil, false)
		s.down.mu.Unlock()
		s.wake(s.down)
	}
	s.bridge = b
	s.p.startBridge(b)
}

// bridgeWorkerIdle is how long a bridge worker waits for the next
// exchange before it ends.
const bridgeWorkerIdle = 10 * time.Second

// startBridge runs b's exchange on an idle bridge worker, or on a new
// one. An exchange runs deep (TLS, the HTTP/1.1 codec): a goroutine per
// stream grew and copied its stack every time (runtime.newstack, 2.2% of
// the bridging sidecar's samples under bench-sidecar's maximum rate); a
// worker grows it once, and again only after a garbage collection shrank
// it while it waited. The gateway serves connections the same way.
func (p *Proxy) startBridge(b *h1Bridge) {
	select {
	case p.bridgeWork <- b:
	default:
		p.bridgeWorkers.Add(1)
		go p.bridgeWorker(b)
	}
}

// bridgeWorker runs b, then the exchanges handed to it while it waits.
func (p *Proxy) bridgeWorker(b *h1Bridge) {
	defer p.bridgeWorkers.Done()
	idle := time.NewTimer(bridgeWorkerIdle)
	defer idle.Stop()
	for {
		b.run()
		idle.Reset(bridgeWorkerIdle)
		select {
		case b = <-p.bridgeWork:
		case <-idle.C:
			return
		case <-p.bridgeStop:
			return
		}
	}
}

// buildRequest writes the HTTP/1.1 request head for the header block
// fields, adding extra (X-Forwarded-Client-Cert); ended: the block ended
// the stream. A request HTTP/1.1 cannot carry gets the code and message
// to answer it with.
func (b *h1Bridge) buildRequest(fields, extra []hpack.HeaderField, ended bool) (int, string) {
	var method, path, authority, host, cookie string
	length, lengths := int64(-1), 0
	for i := range fields {
		f := &fields[i]
		switch f.Name {
		case ":method":
			method = f.Value
		case ":path":
			path = f.Value
		case ":authority":
			authority = f.Value
		case ":scheme":
		case "host":
			host = f.Value
		case "content-length":
			n, ok := parseContentLength([]byte(f.Value))
			if !ok || (lengths > 0 && n != length) {
				return http.StatusBadRequest, "malformed content-length"
			}
			length, lengths = n, lengths+1
		case "cookie":
			// Split into fields for HPACK; one field in HTTP/1.1 (RFC 9113
			// §8.2.3).
			if cookie != "" {
				cookie += "; "
			}
			cookie += f.Value
		case "x-forwarded-client-cert":
		case "expect":
			b.expect100 = strings.EqualFold(f.Value, "100-continue") && !ended
		default:
			if strings.HasPrefix(f.Name, ":") {
				return http.StatusNotImplemented, "the " + f.Name + " pseudo-header field cannot go to an HTTP/1.1 upstream"
			}
		}
	}
	if method == http.MethodConnect {
		return http.StatusNotImplemented, "CONNECT cannot go to an HTTP/1.1 upstream"
	}
	if !validMethod(method) || !validTarget(method, path) {
		return http.StatusBadRequest, "the request's method or path cannot go to an HTTP/1.1 upstream"
	}
	if authority == "" {
		authority = host
	}
	if authority != "" && !validHost([]byte(authority)) {
		return http.StatusBadRequest, "malformed authority"
	}
	b.framing = bodyFraming{none: ended, length: length}
	if ended && length > 0 {
		return http.StatusBadRequest, "content-length announces a body the stream does not have"
	}
	b.replayable = ended && (method == http.MethodGet || method == http.MethodHead || method == http.MethodOptions || method == http.MethodTrace)

	w := make([]byte, 0, 256)
	w = append(w, method...)
	w = append(w, ' ')
	w = append(w, path...)
	w = append(w, " HTTP/1.1\r\nHost: "...)
	w = append(w, authority...)
	w = append(w, "\r\n"...)
	for i := range fields {
		f := &fields[i]
		switch f.Name {
		case "host", "content-length", "cookie", "x-forwarded-client-cert":
			continue
		case "expect":
			if strings.EqualFold(f.Value, "100-continue") {
				continue // answered by the sidecar (bridgeH1)
			}
		}
		if strings.HasPrefix(f.Name, ":") {
			continue
		}
		w = appendField(w, f.Name, f.Value)
	}
	if cookie != "" {
		w = appendField(w, "cookie", cookie)
	}
	for _, f := range extra {
		w = appendField(w, f.Name, f.Value)
	}
	switch {
	case length >= 0:
		w = append(w, "Content-Length: "...)
		w = strconv.AppendInt(w, length, 10)
		w = append(w, "\r\n"...)
	case !ended:
		w = append(w, "Transfer-Encoding: chunked\r\n"...)
	case method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch:
		// What net/http's Transport sends for these methods without a
		// body: some servers refuse them without a length (411).
		w = append(w, "Content-Length: 0\r\n"...)
	}
	b.req = append(w, "\r\n"...)
	return 0, ""
}

func appendField(w []byte, name, value string) []byte {
	w = append(w, name...)
	w = append(w, ": "...)
	w = append(w, value...)
	return append(w, "\r\n"...)
}

// validMethod reports an HTTP token.
func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for i := 0; i < len(m); i++ {
		if !tokenChars[m[i]] {
			return false
		}
	}
	return true
}

// validTarget reports a :path that makes a request target the
// sidecar's own HTTP/1.1 codec takes at the other end: origin-form, or
// "*" for OPTIONS (RFC 9113 §8.3.1), without white space, control
// characters or what targetChars refuses.
func validTarget(method, t string) bool {
	if t == "*" {
		return method == http.MethodOptions
	}
	if t == "" || t[0] != '/' {
		return false
	}
	for i := 0; i < len(t); i++ {
		if c := t[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return targetChars(t)
}

// signal wakes the goroutine if it waits.
func (b *h1Bridge) signal() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// abort ends the exchange: the connection in use is closed under the
// goroutine, which then ends. s.mu held.
func (b *h1Bridge) abort() {
	if b.aborted.Swap(true) {
		return
	}
	if u := b.up.Load(); u != nil {
		_ = u.c.Close() // the goroutine closes it again, and frees its buffers
	}
	b.signal()
}

// use makes u the connection in use; false when the exchange was
// aborted meanwhile (u is then closed).
func (b *h1Bridge) use(u *h1Up) bool {
	b.up.Store(u)
	if b.aborted.Load() {
		b.up.Store(nil)
		u.close()
		return false
	}
	return true
}

// run is the exchange's goroutine.
func (b *h1Bridge) run() {
	s := b.s
	defer s.p.upstreams.leave()
	b.resp = h1HeadPool.Get().(*h1Head)
	err := b.exchange()
	h1HeadPool.Put(b.resp)
	b.resp = nil
	s.lock(nil)
	defer s.unlock()
	b.end(err)
	s.maybeDone()
}

// end ends the stream's upstream side after the exchange, answering a
// request that got no response. mu held.
func (b *h1Bridge) end(err error) {
	s := b.s
	aborted := b.aborted.Load()
	s.toUp.dstEnded, s.toDown.srcEnded = true, true
	s.drop(&s.toUp)
	if err == nil || aborted {
		return
	}
	switch {
	case errors.Is(err, errBodyLength):
		s.clientFault(http2.ErrCodeProtocol)
	case s.answered:
		if s.p.log.Enabled(context.Background(), slog.LevelDebug) {
			s.p.log.Debug("response cut", "listener", s.down.info.listener, "cluster", s.cluster(), "error", err)
		}
		s.resetDown(http2.ErrCodeInternal)
	default:
		code, msg := h1Failure(err, &b.tm)
		s.failWith(code, msg, err)
	}
}

// exchange sends the request to an endpoint of the cluster and relays
// the response, trying endpoints as the HTTP/1.1 path does.
func (b *h1Bridge) exchange() error {
	s, p := b.s, b.s.p
	u := s.upstream
	fresh := false
	attempts := p.cfg.MaxConnectAttempts
	for {
		if b.aborted.Load() {
			return errBridgeAborted
		}
		ep, up, err := u.h1Connect(s.target, fresh, &b.tm, &attempts)
		if err != nil {
			return err
		}
		if !b.use(up) {
			return errBridgeAborted
		}
		sent, err := b.sendRequest(up)
		gotByte := false
		var headLen int
		if err == nil {
			headLen, gotByte, err = b.readResponseHead(up)
		}
		if err == nil {
			if u.picker != nil {
				p.health.Restore(ep)
			}
			return b.relayResponse(up, headLen)
		}
		b.up.Store(nil)
		reused := up.reused
		up.close()
		if b.aborted.Load() {
			return errBridgeAborted
		}
		if reused && !gotByte && !sent && !fresh && b.replayable && !b.tm.routePassed() {
			fresh = true // a pooled connection the upstream had closed
			continue
		}
		return err
	}
}

// sendRequest writes the request head and its body, as the client sends
// it, to up. sent reports whether any of the body went.
func (b *h1Bridge) sendRequest(up *h1Up) (sent bool, err error) {
	s := b.s
	w := &up.out
	w.tm, up.in.tm, up.in.down = &b.tm, &b.tm, nil
	w.b = w.b[:0]
	if err := w.write(b.req); err != nil {
		return false, err
	}
	if b.framing.none {
		if err := w.flush(); err != nil {
			return false, err
		}
		s.lock(nil)
		s.toUp.dstEnded = true
		s.unlock()
		return false, nil
	}
	var written int64
	chunked := b.framing.length < 0
	for {
		s.lock(nil)
		if b.aborted.Load() {
			s.unlock()
			return sent, errBridgeAborted
		}
		fl := &s.toUp
		queue, end, trailers := fl.queue, fl.endQueued, fl.trailers
		fl.queue, fl.trailers = nil, nil
		s.unlock()
		if len(queue) == 0 && !end {
			if err := w.flush(); err != nil {
				return sent, err
			}
			<-b.kick
			continue
		}
		var werr error
		for i := range queue {
			data := queue[i].b
			n := int64(len(data))
			if werr == nil && written+n > b.framing.length && !chunked {
				werr = errBodyLength
			}
			if werr == nil && n > 0 {
				if chunked {
					_ = w.int(n, 16)
					_ = w.str("\r\n")
				}
				werr = w.write(data)
				if werr == nil && chunked {
					werr = w.str("\r\n")
				}
				written += n
				sent = true
			}
			queue[i].free()
			if werr == nil && n > 0 {
				s.touch()
				s.credit(fl, s.down, n)
			}
		}
		if werr != nil {
			return sent, werr
		}
		if !end {
			continue
		}
		if !chunked && written != b.framing.length {
			return sent, errBodyLength
		}
		if chunked {
			_ = w.str("0\r\n")
			for _, f := range trailers {
				if keepTrailerField(&f) && f.Name != "content-length" && f.Name != "host" {
					_ = w.str(f.Name)
					_ = w.str(": ")
					_ = w.str(f.Value)
					_ = w.str("\r\n")
				}
			}
			_ = w.str("\r\n")
		}
		if err := w.flush(); err != nil {
			return sent, err
		}
		s.lock(nil)
		s.toUp.dstEnded = true
		s.unlock()
		return sent, nil
	}
}

// readResponseHead reads up's response head, passing 1xx interim
// responses down as HEADERS, and returns the final head's length.
// gotByte reports whether the upstream sent anything.
func (b *h1Bridge) readResponseHead(up *h1Up) (int, bool, error) {
	return readResponseHead(&up.in, b.resp, func(head []byte) error {
		fields := b.responseFields(head)
		s := b.s
		s.lock(nil)
		defer s.unlock()
		if b.aborted.Load() {
			return errBridgeAborted
		}
		s.down.mu.Lock()
		s.down.writeHeaders(s.toDown.dstID, fields, nil, nil, false)
		s.down.mu.Unlock()
		s.wake(s.down)
		return nil
	})
}

// responseFields is the HTTP/2 header block of the response head b.resp
// was parsed from: :status, then the fields HTTP/2 carries, names
// lowercased.
func (b *h1Bridge) responseFields(head []byte) []hpack.HeaderField {
	rh := b.resp
	fields := make([]hpack.HeaderField, 0, len(rh.fields)+1)
	fields = append(fields, hpack.HeaderField{Name: ":status", Value: statusValue(rh.status)})
	for i := range rh.fields {
		f := &rh.fields[i]
		if f.kind == fieldContentLength {
			if rh.chunked {
				continue
			}
		} else if !rh.endToEnd(head, f) {
			continue
		}
		fields = append(fields, hpack.HeaderField{Name: lowerName(f.name.of(head)), Value: string(f.value.of(head))})
	}
	return fields
}

// statusValues are the :status values of the codes 100 to 599, made
// once.
var statusValues = func() (v [500]string) {
	for i := range v {
		v[i] = strconv.Itoa(100 + i)
	}
	return v
}()

// statusValue is code's :status value.
func statusValue(code int) string {
	if code >= 100 && code < 600 {
		return statusValues[code-100]
	}
	return strconv.Itoa(code)
}

// lowerName is an HTTP/1.1 field name as HTTP/2 writes it; the names
// most responses carry come from commonNames, without a new string.
func lowerName(name []byte) string {
	var buf [32]byte
	if len(name) > len(buf) {
		return string(bytes.ToLower(name))
	}
	lower := buf[:len(name)]
	for i, c := range name {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		lower[i] = c
	}
	if s, ok := commonNames[string(lower)]; ok {
		return s
	}
	return string(lower)
}

// commonNames are response field names relayed often enough to keep
// their HTTP/2 spelling at hand.
var commonNames = func() map[string]string {
	names := []string{"accept-ranges", "access-control-allow-origin", "age", "alt-svc", "cache-control",
		"content-disposition", "content-encoding", "content-language", "content-length", "content-location",
		"content-range", "content-security-policy", "content-type", "date", "etag", "expires", "grpc-message",
		"grpc-status", "last-modified", "link", "location", "referrer-policy", "retry-after", "server",
		"set-cookie", "strict-transport-security", "vary", "via", "www-authenticate", "x-content-type-options",
		"x-envoy-upstream-service-time", "x-frame-options", "x-request-id"}
	m := make(map[string]string, len(names))
	for _, n := range names {
		m[n] = n
	}
	return m
}()

// relayResponse sends the response whose head up's buffer holds
// (headLen bytes) down the stream, then pools up when it can carry
// another request.
func (b *h1Bridge) relayResponse(up *h1Up, headLen int) error {
	s, rh, in := b.s, b.resp, &up.in
	head := in.buf[in.r : in.r+headLen]
	fields := b.responseFields(head)
	in.r += headLen
	noBody, toClose, upKeep := rh.responseBody(s.head)
	empty := noBody || (!rh.chunked && rh.contentLength == 0)
	// A body that came whole with the head goes down with it: one write
	// to the client, one wake of its connection's writer.
	var whole []byte
	if !empty && !rh.chunked && !toClose && int64(in.w-in.r) >= rh.contentLength {
		whole = in.buf[in.r : in.r+int(rh.contentLength)]
	}

	s.lock(nil)
	if b.aborted.Load() || s.toDown.dstEnded {
		s.unlock()
		return b.drop(up, errBridgeAborted)
	}
	s.answered = true
	s.fields = nil
	s.count(s.cluster(), rh.status)
	s.touch()
	s.down.mu.Lock()
	s.down.writeHeaders(s.toDown.dstID, fields, nil, nil, empty)
	s.down.mu.Unlock()
	s.wake(s.down)
	if empty {
		s.toDown.srcEnded, s.toDown.dstEnded = true, true
	}
	if whole != nil {
		s.sent += int64(len(whole))
		s.toDown.srcEnded = true
		s.send(&s.toDown, whole, true, true) // what the window holds back is copied
		in.r += len(whole)
	}
	s.unlock()

	var err error
	switch {
	case empty, whole != nil:
	case rh.chunked:
		err = b.relayChunked(in)
	case toClose:
		err = b.relayToClose(in)
	default:
		err = b.relayN(in, rh.contentLength, true)
	}
	if err != nil {
		return b.drop(up, err)
	}
	b.up.Store(nil)
	if upKeep && in.r == in.w && !b.aborted.Load() {
		up.pool.h1Put(up)
	} else {
		up.close() // closing, or it sent more than its response
	}
	return nil
}

// drop closes up after a failed exchange.
func (b *h1Bridge) drop(up *h1Up, err error) error {
	b.up.Store(nil)
	up.close()
	return err
}

// relayN passes n bytes of body down, the last with the end of the
// stream when last.
func (b *h1Bridge) relayN(in *bufReader, n int64, last bool) error {
	for n > 0 {
		if in.r == in.w {
			if err := in.fill(); err != nil {
				return err
			}
		}
		data := in.buffered()
		if int64(len(data)) > n {
			data = data[:n]
		}
		n -= int64(len(data))
		in.r += len(data)
		if err := b.deliver(data, last && n == 0, nil); err != nil {
			return err
		}
	}
	return nil
}

// relayToClose passes down a body delimited by the connection's end.
// An Isthmus peer never sends one (its inbound side re-frames such a
// body as chunked). Over TLS, the end is crypto/tls's io.EOF, which it
// returns for a close_notify and also for a TCP end at a record
// boundary without one ("popular web sites seem to do this"), so a body
// cut there reads as whole, as it does for net/http's Transport.
func (b *h1Bridge) relayToClose(in *bufReader) error {
	for {
		if in.r == in.w {
			if err := in.fill(); err != nil {
				if errors.Is(err, io.EOF) {
					return b.deliver(nil, true, nil)
				}
				return err
			}
		}
		data := in.buffered()
		in.r += len(data)
		if err := b.deliver(data, false, nil); err != nil {
			return err
		}
	}
}

// relayChunked passes down a chunked body, its trailer fields as the
// stream's trailers.
func (b *h1Bridge) relayChunked(in *bufReader) error {
	noFlush := func() error { return nil }
	for {
		line, err := in.line(noFlush)
		if err != nil {
			return err
		}
		size, err := parseChunkSize(line)
		if err != nil {
			return err
		}
		if size == 0 {
			var trailers []hpack.HeaderField
			for {
				line, err := in.line(noFlush)
				if err != nil {
					return err
				}
				if len(line) == 0 {
					return b.deliver(nil, true, trailers)
				}
				// The line's CRLF is still in the buffer after it.
				f, err := parseField(line[:len(line)+2], 0, len(line))
				if err != nil {
					return err
				}
				hf := hpack.HeaderField{Name: lowerName(f.name.of(line)), Value: string(f.value.of(line))}
				if keepTrailerField(&hf) && f.kind == fieldOther {
					trailers = append(trailers, hf)
				}
			}
		}
		if err := b.relayN(in, size, false); err != nil {
			return err
		}
		crlf, err := in.line(noFlush)
		if err != nil {
			return err
		}
		if len(crlf) != 0 {
			return errChunkEnd
		}
	}
}

// deliver passes data (and the end of the response, with trailers) down
// the stream, then waits while the client's window holds it back. data
// is the connection's buffer: what must wait is copied.
func (b *h1Bridge) deliver(data []byte, end bool, trailers []hpack.HeaderField) error {
	s := b.s
	s.lock(nil)
	fl := &s.toDown
	if b.aborted.Load() || fl.dstEnded {
		s.unlock()
		return errBridgeAborted
	}
	if len(data) > 0 {
		s.sent += int64(len(data))
		s.touch()
	}
	if end {
		fl.trailers = trailers
		fl.srcEnded = true
	}
	s.send(fl, data, end, true)
	for len(fl.queue) > 0 && !fl.dstEnded && !b.aborted.Load() {
		s.unlock()
		<-b.kick
		s.lock(nil)
	}
	aborted := b.aborted.Load()
	s.unlock()
	if aborted {
		return errBridgeAborted
	}
	return nil
}
