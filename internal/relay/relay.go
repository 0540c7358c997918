// Package relay moves bytes both ways between two connections the way a
// TCP proxy must: each direction until its own end of stream, passing the
// half-close on (a FIN, or a TLS close_notify), with an idle timeout that
// never interrupts bytes in flight, and splice(2) when both sides are
// plain TCP sockets. The east-west gateway (pkg/gateway) and the sidecar
// (pkg/sidecar) share it.
package relay

import (
	"errors"
	"io"
	"net"
	"os"
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
// after idle with no byte in either direction (checked every quarter of
// idle, so between idle and 1.25×idle after the last byte). aToB and bToA,
// when not nil, are told of the bytes each direction moved, as they move
// (in chunks, not per byte). One direction runs on the caller's
// goroutine; Pipe returns when both have ended. It leaves a and b open
// when both directions ended cleanly: the caller closes them.
func Pipe(a, b Conn, idle time.Duration, aToB, bToA func(n int64)) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	go func() { // b → a
		defer close(done)
		copyIdle(a, b, &last, idle, bToA)
	}()
	copyIdle(b, a, &last, idle, aToB)
	<-done
}

// copyIdle moves src → dst until src's end of stream (then it half-closes
// dst) or an error or idle (then it closes both, which ends the other
// direction too). The idle check rides on src's read deadline, renewed
// every quarter of idle: the copy loop is never interrupted while bytes
// flow, and a deadline that passes mid-splice loses nothing (the kernel
// pipe is drained before a read blocks; a tls.Conn keeps a partial record
// across a timeout). Write deadlines are never set, since a write that
// times out mid-splice would drop the bytes in the pipe: a connection
// whose two peers both stop reading while both have data to send is not
// seen as idle. Dead peers are found by TCP keep-alive, and a drain closes
// what is left.
func copyIdle(dst, src Conn, last *atomic.Int64, idle time.Duration, count func(int64)) {
	window := max(idle/4, time.Millisecond)
	for {
		_ = src.SetReadDeadline(time.Now().Add(window))
		n, err := copyOnce(dst, src, last) // stores last on every write
		if n > 0 && count != nil {
			count(n)
		}
		if err == nil { // end of stream from src: pass the half-close on
			_ = dst.CloseWrite()
			return
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && time.Now().UnixNano()-last.Load() < int64(idle) {
			continue
		}
		// Idle, reset, or the other direction closed the sockets.
		_ = src.Close()
		_ = dst.Close()
		return
	}
}

// copyOnce copies until src's end of stream (nil) or an error: with
// splice(2) between two TCP sockets, through a pooled buffer otherwise.
// Every write that moves bytes stores the time in last, so a slow reader
// that keeps taking bytes is never idle, however long one copy lasts.
func copyOnce(dst, src Conn, last *atomic.Int64) (int64, error) {
	if d, ok := dst.(*net.TCPConn); ok {
		if s, ok := src.(*net.TCPConn); ok {
			return spliceTCP(d, s, last)
		}
	}
	return copyBuffered(dst, src, last)
}

// copyBuffered copies through a pooled buffer, storing the time of every
// write that moved bytes in last.
func copyBuffered(dst io.Writer, src io.Reader, last *atomic.Int64) (int64, error) {
	buf := buffers.Get().(*[]byte)
	defer buffers.Put(buf)
	// Hide ReaderFrom and WriterTo: *net.TCPConn's would fall back to
	// io.Copy with a fresh buffer for a non-TCP peer.
	return io.CopyBuffer(progressWriter{dst, last}, readerOnly{src}, *buf)
}

// progressWriter is dst without ReaderFrom, storing the time of every
// write that moved bytes.
type progressWriter struct {
	w    io.Writer
	last *atomic.Int64
}

func (p progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	if n > 0 {
		p.last.Store(time.Now().UnixNano())
	}
	return n, err
}

type readerOnly struct{ io.Reader }
