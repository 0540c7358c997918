//go:build !linux

package relay

import (
	"net"
	"sync/atomic"
)

// spliceTCP is a copy through a buffer where there is no splice(2).
func spliceTCP(dst, src *net.TCPConn, last *atomic.Int64) (int64, error) {
	return copyBuffered(dst, src, last)
}
