package sidecar

import (
	"crypto/tls"
	"io"
	"net"
	"sync/atomic"
)

// tryConn is a TCP socket whose writes can be made non-blocking for a
// while: the HTTP/2 path's reader writes what it forwarded itself, at
// the end of a batch of frames, instead of waking the connection's
// writer goroutine (a hand-off per hop that cost latency). In try mode
// a Write takes every byte and never blocks: what the socket does not
// take at once is kept, and the writer goroutine's next (blocking) write
// sends it first. Under TLS the kept bytes are records already sealed,
// so the TLS state stays whole. Only one goroutine writes at a time
// (h2Conn.writing), so rest needs no lock.
type tryConn struct {
	*net.TCPConn
	try  atomic.Bool
	rest []byte
}

func (c *tryConn) tryConnOf() *tryConn { return c }

func (c *tryConn) Write(b []byte) (int, error) {
	if c.try.Load() {
		if len(c.rest) > 0 {
			c.rest = append(c.rest, b...)
			return len(b), nil
		}
		n, err := tryWrite(c.TCPConn, b)
		if err != nil {
			return n, err
		}
		if n < len(b) {
			c.rest = append(c.rest, b[n:]...)
		}
		return len(b), nil
	}
	if err := c.drain(); err != nil {
		return 0, err
	}
	return c.TCPConn.Write(b)
}

// pending reports bytes kept from a try-mode write.
func (c *tryConn) pending() bool { return len(c.rest) > 0 }

// drain writes the bytes kept from try-mode writes, blocking.
func (c *tryConn) drain() error {
	for len(c.rest) > 0 {
		n, err := c.TCPConn.Write(c.rest)
		c.rest = c.rest[n:]
		if err != nil {
			return err
		}
	}
	c.rest = nil
	return nil
}

// h2Writer is what an HTTP/2 connection over c writes to, and the socket
// under it that can be written without blocking (nil when there is
// none: the writer goroutine then does every write).
func h2Writer(c net.Conn) (io.Writer, *tryConn) {
	switch x := c.(type) {
	case *prefixConn:
		return h2Writer(x.Conn)
	case *tls.Conn:
		if t, ok := x.NetConn().(interface{ tryConnOf() *tryConn }); ok {
			return x, t.tryConnOf()
		}
		return x, nil
	case *net.TCPConn:
		t := &tryConn{TCPConn: x}
		return t, t
	case *tryConn:
		return x, x
	}
	return c, nil
}
