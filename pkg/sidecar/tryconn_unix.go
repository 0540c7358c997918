//go:build unix

package sidecar

import (
	"net"

	"golang.org/x/sys/unix"
)

// tryWrite writes what the socket takes now, without waiting: n may be
// short, with no error.
func tryWrite(c *net.TCPConn, b []byte) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var werr error
	// A deadline that passed makes Write return before f runs: nothing
	// was written, and the writer goroutine's blocking write (with a new
	// deadline) sends it all.
	_ = rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			m, err := unix.Write(int(fd), b[n:])
			if m > 0 {
				n += m
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil && err != unix.EAGAIN {
				werr = err
			}
			if err != nil || m == 0 {
				break
			}
		}
		return true
	})
	return n, werr
}
