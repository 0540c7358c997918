package gateway

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// deferAcceptSeconds is TCP_DEFER_ACCEPT on the gateway's listener: the
// kernel hands a connection to accept only once its first bytes have
// arrived, so accepting it and reading its ClientHello take one wake-up
// of the gateway, not two. A client that sends nothing is handed over
// anyway after the first retransmission of the SYN-ACK (about a
// second), and the ClientHello deadline runs from there. Only a listener
// whose clients speak first may defer: TLS clients do, while the
// sidecar's ports also carry protocols where the server speaks first.
// nginx's stream module has no such option; HAProxy's defer-accept is
// the same socket option.
const deferAcceptSeconds = 1

// deferAccept sets TCP_DEFER_ACCEPT on a listening socket.
func deferAccept(c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, deferAcceptSeconds)
	})
	if serr != nil {
		serr = os.NewSyscallError("setsockopt TCP_DEFER_ACCEPT", serr)
	}
	return errors.Join(err, serr)
}
