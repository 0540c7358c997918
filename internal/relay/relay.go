// Package relay moves bytes both ways between two connections the way a
// TCP proxy must: each direction until its own end of stream, passing the
// half-close on (a FIN, or a TLS close_notify), with an idle timeout that
// never interrupts bytes in flight, and splice(2) when both sides are
// plain TCP sockets. The east-west gateway (pkg/gateway) and the sidecar
// (pkg/sidecar) share it.
package relay

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Conn is a connection whose write side can be closed alone:
// *net.TCPConn (a FIN) and *tls.Conn (a close_notify alert; the peer's
// tls.Conn then reads io.EOF) both are.
type Conn interface {
	net.Conn
	CloseWrite() error
}

var (
	_ Conn = (*net.TCPConn)(nil)
)

// bufferSize is the user-space copy buffer, for pairs that cannot splice.
const bufferSize = 32 << 10

var buffers = sync.Pool{New: func() any { b := make([]byte, bufferSize); return &b }}

// Pipe copies a → b and b → a until both directions have ended, passing
// each end of stream on with CloseWrite, and closes both connections
// after idle with no byte moved in either direction, whatever each
// direction is waiting for: a peer that stops reading is idle too. idle
// not positive means no idle timeout. aToB and bToA, when not nil, are
// told of the bytes each direction moved as they move: once per write or
// splice(2) that moved some, from the copying goroutine, so they must be
// cheap (an atomic add). One direction runs on the caller's goroutine;
// Pipe returns when both have ended, reporting whether the idle timeout
// ended them. It leaves a and b open when both directions ended cleanly:
// the caller closes them.
func Pipe(a, b Conn, idle time.Duration, aToB, bToA func(n int64)) (idled bool) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var w *watchdog
	if idle > 0 {
		w = startWatchdog(a, b, &last, idle)
	}
	done := make(chan struct{})
	go func() { // b → a
		defer close(done)
		copyDir(a, b, progress{&last, bToA})
	}()
	copyDir(b, a, progress{&last, aToB})
	<-done
	if w == nil {
		return false
	}
	return w.stop()
}

// copyDir moves src → dst until src's end of stream (then it half-closes
// dst) or an error (then it closes both, which ends the other direction
// too). Neither read nor write deadlines are set: the idle timeout is the
// watchdog's, which closes both sockets, and a deadline that passed
// mid-splice could drop the bytes in the pipe.
func copyDir(dst, src Conn, p progress) {
	if err := copyOnce(dst, src, p); err == nil {
		// End of stream from src: pass the half-close on.
		_ = dst.CloseWrite()
		return
	}
	// Reset, or the watchdog or the other direction closed the sockets.
	_ = src.Close()
	_ = dst.Close()
}

// watchdog closes a Pipe's two connections once no byte has moved for
// idle. It is a timer, not a deadline on reads: after one direction has
// ended, the other may sit in a write to a peer that stopped reading, and
// only closing the sockets ends that write. Bytes moving never touch the
// timer (they store the time in last); it fires about once per idle and
// re-arms itself for what is left.
type watchdog struct {
	a, b Conn
	last *atomic.Int64
	idle time.Duration

	// mu guards t, stopped and fired, so that a firing that races stop
	// never re-arms the timer.
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
	fired   bool // it closed the connections
}

func startWatchdog(a, b Conn, last *atomic.Int64, idle time.Duration) *watchdog {
	w := &watchdog{a: a, b: b, last: last, idle: idle}
	w.mu.Lock()
	w.t = time.AfterFunc(idle, w.fire)
	w.mu.Unlock()
	return w
}

func (w *watchdog) fire() {
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		return
	}
	if left := w.idle - time.Duration(time.Now().UnixNano()-w.last.Load()); left > 0 {
		w.t.Reset(left)
		w.mu.Unlock()
		return
	}
	w.stopped, w.fired = true, true
	w.mu.Unlock()
	// Not under mu: a tls.Conn's Close may write a close_notify.
	_ = w.a.Close()
	_ = w.b.Close()
}

// stop ends the watchdog and reports whether it had closed the
// connections.
func (w *watchdog) stop() (fired bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	w.t.Stop()
	return w.fired
}

// progress is what one direction reports each time a write moves bytes:
// the time, to the watchdog, so that a slow reader that keeps taking
// bytes is never idle however long the copy lasts; and the count, so that
// byte metrics follow a long stream instead of jumping at its end.
type progress struct {
	last  *atomic.Int64
	count func(n int64) // nil: not counted
}

func (p progress) moved(n int64) {
	p.last.Store(time.Now().UnixNano())
	if p.count != nil {
		p.count(n)
	}
}

// copyOnce copies until src's end of stream (nil) or an error: with
// splice(2) between two TCP sockets, through a pooled buffer otherwise,
// telling p of every write that moves bytes (p counts them: no byte
// count is returned).
func copyOnce(dst, src Conn, p progress) error {
	if d, ok := dst.(*net.TCPConn); ok {
		if s, ok := src.(*net.TCPConn); ok {
			return spliceTCP(d, s, p)
		}
	}
	return copyBuffered(dst, src, p)
}

// copyBuffered copies through a pooled buffer, telling p of every write
// that moved bytes.
func copyBuffered(dst io.Writer, src io.Reader, p progress) error {
	buf := buffers.Get().(*[]byte)
	defer buffers.Put(buf)
	// Hide ReaderFrom and WriterTo: *net.TCPConn's would fall back to
	// io.Copy with a fresh buffer for a non-TCP peer.
	_, err := io.CopyBuffer(progressWriter{dst, p}, readerOnly{src}, *buf)
	return err
}

// progressWriter is dst without ReaderFrom, telling p of every write that
// moved bytes.
type progressWriter struct {
	w io.Writer
	p progress
}

func (w progressWriter) Write(b []byte) (int, error) {
	n, err := w.w.Write(b)
	if n > 0 {
		w.p.moved(int64(n))
	}
	return n, err
}

type readerOnly struct{ io.Reader }
