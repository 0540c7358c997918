package sidecar

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// tryConn is a TCP socket whose writes can be made non-blocking for a
// while: the HTTP/2 path's reader writes what it forwarded itself, at
// the end of a batch of frames, instead of waking the connection's
// writer goroutine. In try mode a Write takes every byte and never
// blocks: what the socket does not take at once is kept, and the next
// blocking write (the writer goroutine's) sends it first. Under TLS the
// kept bytes are records already sealed, so the TLS state stays whole.
// mu orders every write to the socket: the HTTP/2 connection has one
// writer at a time, but crypto/tls may write from its reader too (a
// KeyUpdate's answer, an alert).
//
// On Linux it reads and writes with raw system calls (rawIO), which keep
// the runtime's sysmon asleep between requests.
type tryConn struct {
	*net.TCPConn
	raw  *rawIO
	mu   sync.Mutex
	try  bool
	rest []byte
	// kept is len(rest), read without mu.
	kept atomic.Int64
}

// newTryConn wraps tcp.
func newTryConn(tcp *net.TCPConn) *tryConn {
	c := &tryConn{}
	c.init(tcp)
	return c
}

func (c *tryConn) init(tcp *net.TCPConn) {
	c.TCPConn = tcp
	c.raw = newRawIO(tcp)
}

func (c *tryConn) tryConnOf() *tryConn { return c }

// withRawIO wraps a plain TCP connection of the HTTP paths in a tryConn,
// for its raw I/O; a TLS one already has a tryConn under it (pool.dial).
// A tcp_proxy's plain connections stay *net.TCPConn, for splice.
func withRawIO(c net.Conn) net.Conn {
	if tcp, ok := c.(*net.TCPConn); ok {
		return newTryConn(tcp)
	}
	return c
}

// setTry switches try mode.
func (c *tryConn) setTry(on bool) {
	c.mu.Lock()
	c.try = on
	c.mu.Unlock()
}

func (c *tryConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.try {
		if len(c.rest) > 0 {
			c.keep(b)
			return len(b), nil
		}
		n, err := c.write(b, true)
		if err != nil {
			return n, err
		}
		c.keep(b[n:])
		return len(b), nil
	}
	if err := c.drainLocked(); err != nil {
		return 0, err
	}
	return c.write(b, false)
}

func (c *tryConn) keep(b []byte) {
	if len(b) > 0 {
		c.rest = append(c.rest, b...)
		c.kept.Store(int64(len(c.rest)))
	}
}

// pending reports bytes kept from a try-mode write.
func (c *tryConn) pending() bool { return c.kept.Load() > 0 }

// drain writes the bytes kept from try-mode writes, blocking.
func (c *tryConn) drain() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.drainLocked()
}

func (c *tryConn) drainLocked() error {
	for len(c.rest) > 0 {
		n, err := c.write(c.rest, false)
		c.rest = c.rest[n:]
		c.kept.Store(int64(len(c.rest)))
		if err != nil {
			return err
		}
	}
	c.rest = nil
	return nil
}

// tryConnUnder is the tryConn whose socket c reads and writes, under
// TLS, a replayed prefix or a pool's bookkeeping; nil when there is none.
func tryConnUnder(c net.Conn) *tryConn {
	for {
		switch x := c.(type) {
		case *prefixConn:
			c = x.Conn
		case *upConn:
			c = x.Conn
		case *tls.Conn:
			c = x.NetConn()
		case interface{ tryConnOf() *tryConn }: // *tryConn, *inConn
			return x.tryConnOf()
		default:
			return nil
		}
	}
}

// h2Writer is what an HTTP/2 connection over c writes to (a replayed
// prefix concerns only reads), and the tryConn under it, which can be
// written without blocking (nil when there is none: the writer goroutine
// then does every write).
func h2Writer(c net.Conn) (io.Writer, *tryConn) {
	if pc, ok := c.(*prefixConn); ok {
		c = pc.Conn
	}
	return c, tryConnUnder(c)
}
