//go:build !linux

package sidecar

import "net"

// rawIO is Linux's raw-syscall I/O (OpenBSD, for one, refuses system
// calls that do not come from libc); elsewhere net.Conn's Read and Write
// do it all.
type rawIO struct{}

func newRawIO(*net.TCPConn) *rawIO { return nil }

// write writes b whole (try false); in try mode it writes nothing: the
// writer goroutine sends everything.
func (c *tryConn) write(b []byte, try bool) (int, error) {
	if try {
		return 0, nil
	}
	return c.TCPConn.Write(b)
}

// closedWhileIdle has no raw I/O to peek with here (h1_unix.go peeks
// through the net package).
func (c *tryConn) closedWhileIdle() (closed, ok bool) { return false, false }

// peekByte waits for the peer's first byte and returns it unread
// (sniff_unix.go).
func (c *tryConn) peekByte() (byte, error) { return peekByte(c.TCPConn) }
