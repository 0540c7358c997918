//go:build linux

package sidecar

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// rawIO reads and writes a socket with raw system calls from inside
// Go's poller (syscall.RawConn), instead of net.Conn's Read and Write.
//
// Why: the socket is non-blocking, so read(2) and write(2) never block,
// yet the net package enters them through entersyscall, which wakes the
// runtime's sysmon thread whenever it had gone to sleep because every P
// was idle. A proxy at a moderate rate is idle between requests, so each
// request paid a futex wake of sysmon, then sysmon's 20 µs sleeps while
// the request ran, then its futex sleep again (perf stat at 1000 req/s:
// 2.5 futex and 1.5 nanosleep calls per request per sidecar). RawSyscall
// skips entersyscall; waiting for readiness stays with the poller, so
// deadlines and Close work as with net.Conn.
//
// Each direction keeps its closure and arguments in the struct, made
// once per connection: a closure per call would allocate. Reads are
// serialized by readMu; writes by the caller (tryConn.mu).
type rawIO struct {
	rc      syscall.RawConn
	readMu  sync.Mutex
	rb      []byte
	rn      int
	rerr    error
	readFn  func(fd uintptr) bool
	wb      []byte
	wn      int
	werr    error
	wtry    bool
	writeFn func(fd uintptr) bool
	// peekFn looks at the socket without reading (closedWhileIdle).
	pb     [1]byte
	perr   syscall.Errno
	peekFn func(fd uintptr) bool
}

// newRawIO returns c's raw I/O, or nil when c has no file descriptor
// (net.Conn's Read and Write are used then).
func newRawIO(c *net.TCPConn) *rawIO {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil
	}
	r := &rawIO{rc: rc}
	r.readFn = func(fd uintptr) bool {
		for {
			n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.rb[0])), uintptr(len(r.rb)))
			switch e {
			case 0:
				r.rn = int(n)
				return true
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false
			}
			r.rerr = os.NewSyscallError("read", e)
			return true
		}
	}
	r.writeFn = func(fd uintptr) bool {
		for r.wn < len(r.wb) {
			n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&r.wb[r.wn])), uintptr(len(r.wb)-r.wn))
			switch e {
			case 0:
				r.wn += int(n)
				if n == 0 {
					r.werr = io.ErrShortWrite
					return true
				}
			case syscall.EINTR:
			case syscall.EAGAIN:
				return r.wtry // try mode: keep the rest; else wait to write
			default:
				r.werr = os.NewSyscallError("write", e)
				return true
			}
		}
		return true
	}
	r.peekFn = func(fd uintptr) bool {
		_, _, r.perr = syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&r.pb[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		return true
	}
	return r
}

// closedWhileIdle is the peek of closedWhileIdle (h1_unix.go) without
// an allocation; ok is false when c has no raw I/O.
func (c *tryConn) closedWhileIdle() (closed, ok bool) {
	r := c.raw
	if r == nil {
		return false, false
	}
	r.readMu.Lock()
	defer r.readMu.Unlock()
	if err := r.rc.Read(r.peekFn); err != nil {
		return true, true
	}
	return peekSaysClosed(r.perr), true
}

// peekByte waits, under the read deadline, for the first byte the peer
// sends, and returns it without reading it (MSG_PEEK): the next Read, or
// a splice of the socket, still gets it. io.EOF if the peer closed
// first.
func (c *tryConn) peekByte() (byte, error) {
	r := c.raw
	if r == nil {
		return peekByte(c.TCPConn)
	}
	r.readMu.Lock()
	defer r.readMu.Unlock()
	var n uintptr
	// Once per connection, and only on a listener with plaintext chains:
	// the closure is made here, not in newRawIO, so that the listeners
	// without pay nothing.
	err := r.rc.Read(func(fd uintptr) bool {
		for {
			n, _, r.perr = syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&r.pb[0])), 1,
				syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
			if r.perr != syscall.EINTR {
				return r.perr != syscall.EAGAIN
			}
		}
	})
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case r.perr != 0:
		return 0, c.opError("read", os.NewSyscallError("recvfrom", r.perr))
	case n == 0:
		return 0, io.EOF
	}
	return r.pb[0], nil
}

// Read reads like net.TCPConn's Read, with errors in the same shape.
func (c *tryConn) Read(b []byte) (int, error) {
	r := c.raw
	if r == nil {
		return c.TCPConn.Read(b)
	}
	if len(b) == 0 {
		return 0, nil
	}
	r.readMu.Lock()
	defer r.readMu.Unlock()
	r.rb, r.rn, r.rerr = b, 0, nil
	err := r.rc.Read(r.readFn)
	n := r.rn
	r.rb = nil
	if err == nil {
		err = r.rerr
	}
	switch {
	case err != nil:
		return n, c.opError("read", err)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// write writes b whole (try false) or what the socket takes now (try
// true, when n may be short without an error).
func (c *tryConn) write(b []byte, try bool) (int, error) {
	r := c.raw
	if r == nil {
		if try {
			return 0, nil
		}
		return c.TCPConn.Write(b)
	}
	if len(b) == 0 {
		return 0, nil
	}
	r.wb, r.wn, r.werr, r.wtry = b, 0, nil, try
	err := r.rc.Write(r.writeFn)
	n := r.wn
	r.wb = nil
	if try || err == nil {
		// In try mode an error of the poller's own (a deadline that
		// passed) means nothing was written, and the writer goroutine's
		// blocking write, with a new deadline, sends it all.
		err = r.werr
	}
	if err != nil {
		return n, c.opError("write", err)
	}
	return n, nil
}

// opError gives err net.TCPConn's shape: an *net.OpError naming op. The
// poller's own errors (deadline, closed) come as "raw-read" or
// "raw-write" OpErrors, whose cause it takes.
func (c *tryConn) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
