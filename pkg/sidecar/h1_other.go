//go:build !unix

package sidecar

import "net"

// closedWhileIdle cannot peek at a socket here: a connection the peer
// closed is found when a request fails, and retried if replayable.
func closedWhileIdle(net.Conn) bool { return false }
