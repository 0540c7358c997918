//go:build unix

package sidecar

import (
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// peekByte waits, under c's read deadline, for the first byte its peer
// sends, and returns it without reading it (MSG_PEEK), through the net
// package's poller: for a socket without raw I/O (tryConn's, on Linux).
// io.EOF if the peer closed first.
func peekByte(c *net.TCPConn) (byte, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var b [1]byte
	var n int
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, _, perr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			if perr != unix.EINTR {
				return perr != unix.EAGAIN
			}
		}
	})
	switch {
	case err != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
	case perr != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: perr}
	case n == 0:
		return 0, io.EOF
	}
	return b[0], nil
}
