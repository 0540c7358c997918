package relay

import (
	"errors"
	"net"
	"slices"
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

// ListenOption is a socket option ListenConfig adds to the listener.
type ListenOption int

// DeferAccept sets TCP_DEFER_ACCEPT (1 s): the kernel hands a connection
// to accept only once its first bytes have arrived, so accepting it and
// reading its first bytes take one wake-up of the server, not two. A
// client that sends nothing is handed over anyway after the first
// retransmission of the SYN-ACK (about a second); one that connects and
// closes, at once. Only for a listener whose clients speak first, as TLS
// clients do: a protocol whose server speaks first would wait a second.
// nginx's stream module has no such option; HAProxy's defer-accept is
// the same socket option.
const DeferAccept ListenOption = 1

// ListenConfig sets TCP keep-alive on the listening socket, which Linux
// copies to every accepted socket, instead of Go's four setsockopt calls
// per accepted connection: a tenth of the gateway's system calls per
// connection were those. opts add to it.
func ListenConfig(opts ...ListenOption) net.ListenConfig {
	deferAccept := slices.Contains(opts, DeferAccept)
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
				if deferAccept {
					serr = errors.Join(serr, unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 1))
				}
			})
			return errors.Join(err, serr)
		},
	}
}
