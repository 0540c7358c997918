package relay

import (
	"errors"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Downstream keep-alive, Go's defaults: probe after 15 s idle, every 15 s,
// give up after 9.
const (
	KeepAliveIdle     = 15 * time.Second
	keepAliveInterval = 15 * time.Second
	keepAliveCount    = 9
)

// ListenConfig sets TCP keep-alive on the listening socket, which Linux
// copies to every accepted socket, instead of Go's four setsockopt calls
// per accepted connection: a tenth of the gateway's system calls per
// connection were those.
func ListenConfig() net.ListenConfig {
	return net.ListenConfig{
		KeepAlive: -1, // inherited from the listener, see Control
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				s := int(fd)
				serr = errors.Join(
					unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1),
					unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(KeepAliveIdle/time.Second)),
					unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(keepAliveInterval/time.Second)),
					unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount),
				)
			})
			return errors.Join(err, serr)
		},
	}
}
