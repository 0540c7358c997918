//go:build !linux

package gateway

import "net"

// listenConfig leaves keep-alive to Go's per-connection default where
// accepted sockets may not inherit the listener's options.
func listenConfig() net.ListenConfig { return net.ListenConfig{} }
