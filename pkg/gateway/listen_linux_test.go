package gateway

import (
	"crypto/tls"
	"io"
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
	h.connect(t, p.client, echoSNI, "echo")

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

// The listener defers accepting a connection until its first bytes
// arrive. A client that waits before its ClientHello is still served,
// and one that never sends is still handed over and refused at the
// ClientHello deadline, not held by the kernel for good.
func TestDeferredAccept(t *testing.T) {
	p := newPKI(t)
	be := startBackend(t, p.server, namedEcho("echo"))
	h := startGateway(t, mustRoutes(t, route(echoSNI, echoCluster, be.addr())), func(c *Config) {
		c.ClientHelloTimeout = 300 * time.Millisecond
	})

	raw, err := h.gw.ln.SyscallConn()
	require.NoError(t, err)
	var secs int
	var serr error
	require.NoError(t, raw.Control(func(fd uintptr) {
		secs, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT)
	}))
	require.NoError(t, serr)
	require.NotZero(t, secs, "TCP_DEFER_ACCEPT on the listener")

	// Connected, then silent for longer than the ClientHello deadline:
	// the deadline runs from accept, which waits for the bytes.
	tcp, err := net.DialTimeout("tcp", h.addr(), 5*time.Second)
	require.NoError(t, err)
	defer tcp.Close()
	time.Sleep(500 * time.Millisecond)
	cfg := p.client.Clone()
	cfg.ServerName = echoSNI
	c := tls.Client(tcp, cfg)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	require.Equal(t, "echo", readLine(t, c))

	// Never a byte: refused once the kernel hands it over.
	before := h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonHelloTimeout+`"`)
	silent, err := net.DialTimeout("tcp", h.addr(), 5*time.Second)
	require.NoError(t, err)
	defer silent.Close()
	_ = silent.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := silent.Read(make([]byte, 1))
	require.Zero(t, n)
	require.ErrorIs(t, err, io.EOF, "the gateway closed the silent connection")
	eventually(t, func() bool {
		return h.metric("isthmus_gateway_refusals_total", `reason="`+ReasonHelloTimeout+`"`) == before+1
	}, "the silent connection counted under "+ReasonHelloTimeout)
	require.Equal(t, int64(1), be.accepts.Load(), "only the served connection reached the backend")
}
