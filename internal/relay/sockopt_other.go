//go:build !linux

package relay

import (
	"net"
	"time"
)

// KeepAliveIdle is Go's default keep-alive idle time.
const KeepAliveIdle = 15 * time.Second

// ListenConfig leaves keep-alive to Go's per-connection default where
// accepted sockets may not inherit the listener's options.
func ListenConfig() net.ListenConfig { return net.ListenConfig{} }
