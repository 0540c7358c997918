//go:build !linux

package relay

import (
	"net"
	"time"
)

// KeepAliveIdle is Go's default keep-alive idle time.
const KeepAliveIdle = 15 * time.Second

// ListenOption is a socket option ListenConfig adds to the listener.
type ListenOption int

// DeferAccept is TCP_DEFER_ACCEPT on Linux; elsewhere the server accepts
// a connection before its first bytes arrive.
const DeferAccept ListenOption = 1

// ListenConfig leaves keep-alive to Go's per-connection default where
// accepted sockets may not inherit the listener's options, and ignores
// opts.
func ListenConfig(...ListenOption) net.ListenConfig { return net.ListenConfig{} }
