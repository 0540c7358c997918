//go:build !linux

package gateway

import "syscall"

// deferAccept does nothing where TCP_DEFER_ACCEPT does not exist: the
// gateway then accepts a connection before its ClientHello arrives.
func deferAccept(syscall.RawConn) error { return nil }
