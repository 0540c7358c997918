package sidecar

import (
	"bufio"
	"io"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var ipUpgrade = netip.MustParseAddr("127.0.0.14")

// An upgraded connection (a WebSocket, say) lives as long as bytes move
// on it: the route timeout stops at the 101, as Envoy's never runs on an
// upgraded stream, and the stream idle timeout counts the bytes either
// way. Once nothing moves for the idle timeout, it is closed. Before,
// both timeouts cut a busy connection one timeout in.
func TestUpgradedConnectionLivesWhileBytesMove(t *testing.T) {
	// Long enough that a stalled test machine does not make a gap of it.
	const timeout = time.Second
	s := svc{name: "upgrade", ns: "demo", vip: "240.240.0.38", ports: []svcPort{{80, true}}, timeout: timeout}
	edit := func(c *Config) { c.StreamIdleTimeout = timeout }
	m := startServiceMesh(t, s, ipUpgrade, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		_, _ = io.Copy(c, brw) // echo until the peer ends
	}), edit, edit)

	rc := dialRaw(t, m, s.host())
	rc.send(t, "GET /ws HTTP/1.1\r\nHost: "+s.host()+"\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: http.MethodGet})
	require.NoError(t, err)
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	br := bufio.NewReader(rc.br)
	start := time.Now()
	for i := 0; time.Since(start) < 3*timeout; i++ {
		_, err := io.WriteString(rc.c, "ping\n")
		require.NoError(t, err)
		require.NoError(t, rc.c.SetReadDeadline(time.Now().Add(waitFor)))
		line, err := br.ReadString('\n')
		require.NoError(t, err, "echo %d cut after %v of steady traffic", i, time.Since(start))
		require.Equal(t, "ping\n", line)
		time.Sleep(timeout / 5)
	}

	// Silent for the idle timeout: closed.
	require.NoError(t, rc.c.SetReadDeadline(time.Now().Add(waitFor)))
	silent := time.Now()
	_, err = br.ReadString('\n')
	require.ErrorIs(t, err, io.EOF, "closed by the sidecar, not the read deadline")
	require.GreaterOrEqual(t, time.Since(silent), timeout/2)
}
