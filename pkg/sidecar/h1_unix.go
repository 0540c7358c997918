//go:build unix

package sidecar

import (
	"crypto/tls"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// closedWhileIdle reports whether an idle pooled connection was closed
// by its peer, or has bytes waiting that no request asked for (a TLS
// close_notify): one non-blocking peek at the socket. net/http's
// Transport learns this from the read loop it keeps on every idle
// connection; the HTTP/1.1 path has no goroutine there, so it looks
// before reusing a connection. Over TLS it sees the socket only, not
// what crypto/tls read ahead of the last response (nothing, from a peer
// that frames its responses right).
func closedWhileIdle(c net.Conn) bool {
	if u, ok := c.(*upConn); ok {
		c = u.Conn
	}
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if tc, ok := c.(*tryConn); ok {
		if closed, ok := tc.closedWhileIdle(); ok {
			return closed
		}
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	var buf [1]byte
	dead := false
	err = rc.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		errno, _ := err.(syscall.Errno) // 0 for nil, and for an error of another kind: closed either way
		dead = peekSaysClosed(errno)
		return true
	})
	return dead || err != nil
}

// peekSaysClosed reads the outcome of a one-byte MSG_PEEK|MSG_DONTWAIT
// recv of an idle connection: success is bytes no request asked for or
// the end of stream, EAGAIN (or EINTR) nothing, the connection is fine;
// any other error is a dead connection.
func peekSaysClosed(errno syscall.Errno) bool {
	switch errno {
	case 0:
		return true // bytes or the end: either way not reusable
	case syscall.EAGAIN, syscall.EINTR:
		return false
	}
	return true
}
