package gateway

import (
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/relay"
)

// sockoptInts reads SO_KEEPALIVE and TCP_KEEPIDLE (seconds) of a socket.
func sockoptInts(t testing.TB, c *net.TCPConn) (keepAlive, idle int) {
	raw, err := c.SyscallConn()
	require.NoError(t, err)
	var err1, err2 error
	require.NoError(t, raw.Control(func(fd uintptr) {
		keepAlive, err1 = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		idle, err2 = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
	}))
	require.NoError(t, err1)
	require.NoError(t, err2)
	return keepAlive, idle
}

// Downstream sockets have keep-alive (inherited from the listener, not set
// per connection); upstream ones have none.
func TestKeepAlive(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), nil)
	c, err := h.dialTLS(p.client, echoSNI)
	require.NoError(t, err)
	defer c.Close()
	require.Equal(t, "echo", readLine(t, c))

	h.gw.connsMu.Lock()
	defer h.gw.connsMu.Unlock()
	require.Len(t, h.gw.conns, 2)
	for conn := range h.gw.conns {
		downstream := conn.LocalAddr().String() == h.addr()
		keepAlive, idle := sockoptInts(t, conn)
		if downstream {
			require.Equal(t, 1, keepAlive, "downstream keep-alive")
			require.Equal(t, int(relay.KeepAliveIdle/time.Second), idle)
		} else {
			require.Equal(t, 0, keepAlive, "upstream keep-alive")
		}
	}
}
