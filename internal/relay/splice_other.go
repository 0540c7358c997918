//go:build !linux

package relay

import (
	"io"
	"net"
	"sync/atomic"
)

// spliceTCP is a copy through a buffer where there is no splice(2).
func spliceTCP(dst, src *net.TCPConn, last *atomic.Int64) (int64, error) {
	buf := buffers.Get().(*[]byte)
	defer buffers.Put(buf)
	return io.CopyBuffer(progressWriter{dst, last}, readerOnly{src}, *buf)
}
