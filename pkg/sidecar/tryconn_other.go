//go:build !unix

package sidecar

import "net"

// tryWrite writes nothing: without non-blocking writes, the writer
// goroutine sends everything.
func tryWrite(*net.TCPConn, []byte) (int, error) { return 0, nil }
