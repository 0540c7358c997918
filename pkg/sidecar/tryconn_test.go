package sidecar

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// In try mode a write never blocks: what a full socket does not take is
// kept, written first by the next blocking write, and the peer reads
// every byte in order.
func TestTryConnKeepsWhatTheSocketDoesNotTake(t *testing.T) {
	raw, peer := tcpPair(t)
	require.NoError(t, raw.SetWriteBuffer(16<<10))
	c := newTryConn(raw)

	first := make([]byte, 4<<20) // far more than the socket buffers hold
	_, _ = rand.Read(first)
	c.setTry(true)
	type wrote struct {
		n   int
		err error
	}
	done := make(chan wrote, 1)
	go func() {
		n, err := c.Write(first)
		done <- wrote{n, err}
	}()
	select {
	case w := <-done:
		require.NoError(t, w.err)
		require.Equal(t, len(first), w.n, "a try-mode write takes every byte")
	case <-time.After(10 * time.Second):
		t.Fatal("a try-mode write blocked on a peer that does not read")
	}
	c.setTry(false)
	require.True(t, c.pending(), "the socket could not take 4 MiB: the rest is kept")
	require.NoError(t, raw.SetWriteBuffer(4<<20)) // the drain need not crawl

	// The peer reads everything while the next blocking write sends what
	// was kept, then its own bytes.
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	second := []byte("and then this")
	n, err := c.Write(second)
	require.NoError(t, err)
	require.Equal(t, len(second), n)
	require.False(t, c.pending())
	require.NoError(t, c.CloseWrite())
	b := <-got
	require.Equal(t, len(first)+len(second), len(b))
	require.True(t, bytes.Equal(first, b[:len(first)]), "the kept bytes went first, in order")
	require.Equal(t, second, b[len(first):])
}

// tcpPair is a loopback TCP connection's two ends, closed at the end of
// the test.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	peer := <-accepted
	require.NotNil(t, peer)
	t.Cleanup(func() { peer.Close() })
	return c.(*net.TCPConn), peer.(*net.TCPConn)
}

// tryConn's raw reads and writes keep net.TCPConn's contract: bytes in
// order across full and empty sockets, errors of the same shape
// (*net.OpError; a deadline's is a timeout, and crypto/tls over it stays
// usable), io.EOF at the peer's end, net.ErrClosed after Close.
func TestTryConnReadsAndWritesLikeTCPConn(t *testing.T) {
	raw, peer := tcpPair(t)
	require.NoError(t, raw.SetWriteBuffer(16<<10))
	require.NoError(t, peer.SetReadBuffer(16<<10))
	c := newTryConn(raw)
	if runtime.GOOS == "linux" {
		require.NotNil(t, c.raw, "this tests the raw system calls, not net.Conn's")
	}

	// 8 MiB each way through small socket buffers: both directions wait
	// for the poller many times.
	data := make([]byte, 8<<20)
	_, _ = rand.Read(data)
	got := make(chan []byte, 1)
	readErr := make(chan error, 1)
	go func() {
		b := make([]byte, len(data))
		_, err := io.ReadFull(peer, b)
		readErr <- err
		got <- b
	}()
	n, err := c.Write(data)
	require.NoError(t, err)
	require.Equal(t, len(data), n)
	require.NoError(t, <-readErr)
	require.True(t, bytes.Equal(data, <-got))
	go func() { _, _ = peer.Write(data) }()
	b := make([]byte, len(data))
	_, err = io.ReadFull(c, b)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, b))
	n, err = c.Read(nil)
	require.Zero(t, n)
	require.NoError(t, err, "an empty read returns at once")

	// A read deadline: a timeout of net.TCPConn's shape, then reads work.
	require.NoError(t, c.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	_, err = c.Read(b)
	var oe *net.OpError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, "read", oe.Op)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.True(t, oe.Timeout())
	require.NoError(t, c.SetReadDeadline(time.Time{}))
	_, _ = peer.Write([]byte("later"))
	n, err = c.Read(b)
	require.NoError(t, err)
	require.Equal(t, "later", string(b[:n]))

	// A write deadline on a peer that does not read: a timeout, with
	// what was written counted.
	// (A stall past the deadline before Write would write nothing: the
	// deadline grows until something was written.)
	for d := 50 * time.Millisecond; ; d *= 2 {
		require.NoError(t, c.SetWriteDeadline(time.Now().Add(d)))
		if n, err = c.Write(data); n > 0 || d > 5*time.Second {
			break
		}
	}
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.Less(t, n, len(data))
	require.Positive(t, n)
	// In try mode a passed deadline writes nothing now and keeps it all.
	c.setTry(true)
	n, err = c.Write([]byte("kept"))
	require.NoError(t, err)
	require.Equal(t, 4, n)
	require.True(t, c.pending())
	c.setTry(false)

	// The peer's end of stream is io.EOF; Close makes a blocked read
	// return net.ErrClosed.
	require.NoError(t, peer.CloseWrite())
	_, err = io.ReadAll(c)
	require.NoError(t, err)
	_, err = c.Read(b)
	require.Equal(t, io.EOF, err)
	raw2, _ := tcpPair(t)
	c2 := newTryConn(raw2)
	go func() {
		_, err := c2.Read(make([]byte, 16))
		readErr <- err
	}()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, c2.Close())
	require.ErrorIs(t, <-readErr, net.ErrClosed)
}

// crypto/tls keeps a connection usable after a read timeout only when
// the error says it is temporary: the HTTP/1.1 path's deadline cache
// relies on that.
func TestTryConnUnderTLSSurvivesATimeout(t *testing.T) {
	raw, peer := tcpPair(t)
	ca := newTestCA(t, "alpha.mesh")
	cert := tlsCert(ca.svid(t, ca.id("ns", "sa")))
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	server := tls.Server(peer, &tls.Config{Certificates: []tls.Certificate{cert}})
	client := tls.Client(newTryConn(raw), &tls.Config{RootCAs: pool, InsecureSkipVerify: true})
	go func() { _ = server.Handshake() }()
	require.NoError(t, client.Handshake())

	require.NoError(t, client.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	b := make([]byte, 64)
	_, err := client.Read(b)
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, client.SetReadDeadline(time.Time{}))
	go func() { _, _ = server.Write([]byte("still here")) }()
	n, err := client.Read(b)
	require.NoError(t, err)
	require.Equal(t, "still here", string(b[:n]))
}

// Every HTTP socket of the sidecar reads and writes through a tryConn
// with raw I/O: downstream and upstream, inbound and outbound, on both
// HTTP paths. A socket that slipped past still works, only slower (an
// HTTP/2 upstream to the app once did, and only perf found it), so this
// looks at the sockets themselves.
func TestHTTPConnectionsUseRawIO(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("raw socket I/O is Linux's")
	}
	m := startMesh(t)
	m.standard(t)
	for _, h2 := range []bool{false, true} {
		resp, err := m.a.nat.httpClient(h2).Get("http://echo.demo.svc.clusterset.local/")
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	// Both requests' connections are still open: the client's and the
	// pools' keep-alive. An upstream HTTP/1.1 connection is back in its
	// pool's idle list only once the sidecar has relayed the whole
	// response, which can be just after the client has read it.
	for _, pd := range []*pod{m.a, m.b} {
		var byKind map[string][]net.Conn
		require.Eventually(t, func() bool {
			byKind = pd.proxy.socketsByKind()
			for _, conns := range byKind {
				if len(conns) == 0 {
					return false
				}
			}
			return true
		}, 5*time.Second, 10*time.Millisecond, "pod %s: a kind of connection is missing", pd.name)
		for kind, conns := range byKind {
			for _, c := range conns {
				tc := tryConnUnder(c)
				require.True(t, tc != nil && tc.raw != nil, "pod %s: a %s connection (%T) reads and writes through net.Conn", pd.name, kind, c)
			}
		}
	}
}

// socketsByKind is p's HTTP connections by kind: downstream and upstream, on
// the HTTP/1.1 and HTTP/2 paths.
func (p *Proxy) socketsByKind() map[string][]net.Conn {
	all := map[string][]net.Conn{"downstream h1": nil, "downstream h2": nil, "upstream h1": nil, "upstream h2": nil}
	p.h1Mu.Lock()
	for hc := range p.h1Conns {
		all["downstream h1"] = append(all["downstream h1"], hc.c)
	}
	p.h1Mu.Unlock()
	p.h2Mu.Lock()
	for hc := range p.h2Conns {
		all["downstream h2"] = append(all["downstream h2"], hc.c)
	}
	p.h2Mu.Unlock()
	p.poolsMu.Lock()
	defer p.poolsMu.Unlock()
	for _, pl := range p.pools {
		pl.h1mu.Lock()
		for _, ups := range pl.h1idle {
			for _, up := range ups {
				all["upstream h1"] = append(all["upstream h1"], up.c)
			}
		}
		pl.h1mu.Unlock()
		pl.h2mu.Lock()
		for _, cs := range pl.h2conns {
			for _, c := range cs {
				c.mu.Lock() // dialAndServe sets c.c, then ready under mu
				if c.ready {
					all["upstream h2"] = append(all["upstream h2"], c.c)
				}
				c.mu.Unlock()
			}
		}
		pl.h2mu.Unlock()
	}
	return all
}
