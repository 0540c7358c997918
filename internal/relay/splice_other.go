//go:build !linux

package relay

import "net"

// spliceTCP is a copy through a buffer where there is no splice(2).
func spliceTCP(dst, src *net.TCPConn, p progress) error {
	return copyBuffered(dst, src, p)
}
