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
// before reusing a connection that sat idle.
func closedWhileIdle(c net.Conn) bool {
	if u, ok := c.(*upConn); ok {
		c = u.Conn
	}
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
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
		n, _, err := unix.Recvfrom(int(fd), buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		// n > 0: unasked bytes; n == 0 without error: end of stream;
		// EAGAIN: nothing, the connection is fine.
		dead = n > 0 || (n == 0 && err == nil) || (err != nil && err != unix.EAGAIN && err != unix.EINTR)
		return true
	})
	return dead || err != nil
}
