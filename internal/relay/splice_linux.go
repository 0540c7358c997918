package relay

import (
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// spliceTCP moves src → dst through a pooled kernel pipe with splice(2)
// until src's end of stream (nil) or an error, as (*net.TCPConn).ReadFrom
// does on Linux, but calling splice with RawSyscall from inside Go's
// poller (syscall.RawConn). ReadFrom enters every splice through
// entersyscall, which wakes the runtime's sysmon thread whenever it slept
// with every P idle: a relay mostly waits for its peers, so nearly every
// burst of bytes paid a futex wake of sysmon and its 20 µs sleeps while
// the burst moved. Waiting for readiness stays with the poller, so src's
// read deadline works as with ReadFrom, and bytes in the pipe are never
// dropped by it: the pipe is emptied into dst before src is read again.
// Every splice into dst that moves bytes is told to p (see copyOnce).
func spliceTCP(dst, src *net.TCPConn, p progress) error {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	pp := getPipe()
	if pp == nil {
		// No pipe to be had (out of descriptors): through a buffer, which
		// reports its progress, where ReadFrom would not until it ended
		// and the watchdog would cut a live stream as idle.
		return copyBuffered(dst, src, p)
	}
	s := splicer{p: pp, progress: p}
	s.init()
	for {
		if err := srcRC.Read(s.drain); err != nil {
			return s.done(err)
		}
		if s.err != nil || s.eof {
			return s.done(s.err)
		}
		if err := dstRC.Write(s.pump); err != nil {
			return s.done(err)
		}
		if s.err != nil {
			return s.done(s.err)
		}
	}
}

// splicer is one spliceTCP's state, shared by the two functions the
// poller calls with the sockets' descriptors.
type splicer struct {
	p           *pipe
	progress    progress // told of every splice into dst that moved bytes
	inPipe      int      // bytes drained into the pipe and not yet pumped out
	eof         bool
	err         error
	drain, pump func(fd uintptr) bool
}

// maxSplice is the most one splice(2) asks for: the pipe's size.
const maxSplice = 1 << 20

func (s *splicer) init() {
	// drain moves what src has into the (empty) pipe; false means src
	// has nothing yet: wait until it is readable. With the pipe empty,
	// EAGAIN can only be the socket's.
	s.drain = func(fd uintptr) bool {
		for {
			n, _, e := unix.RawSyscall6(unix.SYS_SPLICE, fd, 0, uintptr(s.p.w), 0, maxSplice, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch e {
			case 0:
				s.inPipe = int(n)
				s.eof = n == 0
				return true
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			}
			s.err = os.NewSyscallError("splice", e)
			return true
		}
	}
	// pump moves the pipe's bytes into dst; false means dst's buffer is
	// full: wait until it is writable.
	s.pump = func(fd uintptr) bool {
		for s.inPipe > 0 {
			n, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(s.p.r), 0, fd, 0, uintptr(s.inPipe), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch e {
			case 0:
				if n == 0 { // cannot be, with bytes in the pipe; never spin
					s.err = os.NewSyscallError("splice", syscall.EIO)
					return true
				}
				s.inPipe -= int(n)
				s.progress.moved(int64(n))
			case unix.EINTR:
			case unix.EAGAIN:
				return false
			default:
				s.err = os.NewSyscallError("splice", e)
				return true
			}
		}
		return true
	}
}

// done returns the pipe to the pool when it is empty (a pipe with bytes
// left in it is closed instead) and returns err.
func (s *splicer) done(err error) error {
	if s.inPipe == 0 {
		pipes.Put(s.p)
	} else {
		s.p.close()
	}
	return err
}

// pipe is a kernel pipe of maxSplice bytes, both ends non-blocking. Its
// descriptors are closed when the pool drops it, or at once by close.
type pipe struct{ *pipeFDs }

// pipeFDs is what the cleanup closes: not the pipe itself, which must be
// unreachable for the cleanup to run.
type pipeFDs struct {
	r, w   int
	closed atomic.Bool
}

func (f *pipeFDs) close() {
	if f.closed.CompareAndSwap(false, true) {
		_ = unix.Close(f.r)
		_ = unix.Close(f.w)
	}
}

var pipes sync.Pool

// pipe2 is unix.Pipe2; tests make it fail, as it does out of descriptors.
var pipe2 = unix.Pipe2

func getPipe() *pipe {
	if p, ok := pipes.Get().(*pipe); ok {
		return p
	}
	var fds [2]int
	if err := pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil
	}
	// A smaller pipe (pipe-max-size lowered) only means more splices.
	_, _ = unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, maxSplice)
	p := &pipe{&pipeFDs{r: fds[0], w: fds[1]}}
	runtime.AddCleanup(p, (*pipeFDs).close, p.pipeFDs)
	return p
}
