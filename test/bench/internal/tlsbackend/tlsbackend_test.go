package tlsbackend

import (
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func serveT(t *testing.T) (dir, addr string) {
	t.Helper()
	dir = t.TempDir()
	require.NoError(t, WritePKI(dir))
	cfg, err := ServerConfig(dir)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- Serve(ln, cfg) }()
	t.Cleanup(func() {
		_ = ln.Close()
		require.NoError(t, <-done)
	})
	return dir, ln.Addr().String()
}

func TestPingAndSink(t *testing.T) {
	dir, addr := serveT(t)
	cfg, err := ClientConfig(dir, "outbound_.8443_._.backend.bench.svc.cluster.local")
	require.NoError(t, err)

	c, err := Dial(t.Context(), addr, cfg)
	require.NoError(t, err)
	require.Equal(t, "outbound_.8443_._.backend.bench.svc.cluster.local", c.ConnectionState().ServerName)
	require.Equal(t, BackendID.String(), c.ConnectionState().PeerCertificates[0].URIs[0].String())
	require.NoError(t, Ping(c, 5*time.Second))
	require.NoError(t, c.Close())

	c, err = Dial(t.Context(), addr, cfg)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(5*time.Second)))
	_, err = c.Write(append([]byte{CmdSink}, make([]byte, 99_999)...))
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	count := make([]byte, 8)
	_, err = io.ReadFull(c, count)
	require.NoError(t, err)
	require.Equal(t, uint64(99_999), binary.BigEndian.Uint64(count), "the bytes after the command")
}

// A client that is not ClientID is refused by the backend: the
// handshake's client certificate fails its authorizer.
func TestBackendRefusesOtherClients(t *testing.T) {
	dir, addr := serveT(t)
	cfg, err := ClientConfig(dir, "backend")
	require.NoError(t, err)
	backend, err := tls.LoadX509KeyPair(dir+"/backend.crt", dir+"/backend.key")
	require.NoError(t, err)
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &backend, nil }

	c, err := Dial(t.Context(), addr, cfg)
	if err == nil {
		// TLS 1.3: the client's handshake ends before the server has
		// checked its certificate; the refusal arrives on the first read.
		err = Ping(c, 5*time.Second)
		_ = c.Close()
	}
	require.Error(t, err)
}
