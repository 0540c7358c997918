package relay

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// The listener carries keep-alive for its accepted sockets, and defers
// accept only when asked to: a server that speaks first must not wait.
func TestListenConfig(t *testing.T) {
	for _, tc := range []struct {
		opts     []ListenOption
		deferred bool
	}{{nil, false}, {[]ListenOption{DeferAccept}, true}} {
		lc := ListenConfig(tc.opts...)
		ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
		require.NoError(t, err)
		raw, err := ln.(*net.TCPListener).SyscallConn()
		require.NoError(t, err)
		var keepAlive, idle, deferSecs int
		var err1, err2, err3 error
		require.NoError(t, raw.Control(func(fd uintptr) {
			keepAlive, err1 = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
			idle, err2 = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
			deferSecs, err3 = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT)
		}))
		require.NoError(t, ln.Close())
		require.NoError(t, err1)
		require.NoError(t, err2)
		require.NoError(t, err3)
		require.Equal(t, 1, keepAlive)
		require.Equal(t, int(KeepAliveIdle/time.Second), idle)
		require.Equal(t, tc.deferred, deferSecs != 0, "TCP_DEFER_ACCEPT with %v", tc.opts)
	}
}
