package relay

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// pair is a connected pair of TCP sockets on loopback.
func pair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer ln.Close()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	require.NoError(t, err)
	server, err = ln.AcceptTCP()
	require.NoError(t, err)
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return client, server
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "relay"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"relay"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// tlsPair is a TLS connection over a loopback pair, handshake done.
func tlsPair(t *testing.T) (client, server *tls.Conn) {
	t.Helper()
	c, s := pair(t)
	client = tls.Client(c, &tls.Config{InsecureSkipVerify: true})
	server = tls.Server(s, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
	errc := make(chan error, 1)
	go func() { errc <- server.Handshake() }()
	require.NoError(t, client.Handshake())
	require.NoError(t, <-errc)
	return client, server
}

// relayEnds are the pairs the relay is tested between: ends returns the
// relay's two sides (a, b) and the peers that talk to them (app on a's
// far side, peer on b's). TCP to TCP is spliced; TCP to TLS copies.
var relayEnds = []struct {
	name string
	ends func(t *testing.T) (app, a, b, peer Conn)
}{
	{"tcp to tcp", func(t *testing.T) (app, a, b, peer Conn) {
		app, a = pair(t)
		b, peer = pair(t)
		return
	}},
	{"tcp to tls", func(t *testing.T) (app, a, b, peer Conn) {
		app, a = pair(t)
		b, peer = tlsPair(t)
		return
	}},
}

// countedPipe runs Pipe(a, b, idle) and counts the bytes each way; done
// gets what Pipe returned (whether the idle timeout ended it) when it
// returns.
func countedPipe(a, b Conn, idle time.Duration) (ab, ba *atomic.Int64, done <-chan bool) {
	ab, ba = new(atomic.Int64), new(atomic.Int64)
	d := make(chan bool, 1)
	go func() {
		d <- Pipe(a, b, idle, func(n int64) { ab.Add(n) }, func(n int64) { ba.Add(n) })
	}()
	return ab, ba, d
}

// Through the relay, each side's end of stream reaches the other while
// the opposite direction keeps flowing, and bytes are counted per
// direction: plain TCP (spliced) and TCP on one side, TLS on the other.
func TestPipeHalfClose(t *testing.T) {
	for _, tc := range relayEnds {
		t.Run(tc.name, func(t *testing.T) {
			app, a, b, peer := tc.ends(t)
			ab, ba, done := countedPipe(a, b, time.Minute)

			_, err := app.Write([]byte("request"))
			require.NoError(t, err)
			require.NoError(t, app.CloseWrite())
			got, err := io.ReadAll(peer) // until the relayed end of stream
			require.NoError(t, err)
			require.Equal(t, "request", string(got))

			// The other direction still flows after the half-close.
			_, err = peer.Write([]byte("response"))
			require.NoError(t, err)
			require.NoError(t, peer.CloseWrite())
			got, err = io.ReadAll(app)
			require.NoError(t, err)
			require.Equal(t, "response", string(got))

			select {
			case idled := <-done:
				require.False(t, idled, "ended by the two ends, not the idle timeout")
			case <-time.After(10 * time.Second):
				t.Fatal("Pipe did not return after both directions ended")
			}
			require.EqualValues(t, len("request"), ab.Load())
			require.EqualValues(t, len("response"), ba.Load())
		})
	}
}

// Bytes are counted as they move, not when a direction ends: with an
// idle timeout of an hour, a stream still open has its bytes counted.
func TestPipeCountsWhileOpen(t *testing.T) {
	for _, tc := range relayEnds {
		t.Run(tc.name, func(t *testing.T) {
			app, a, b, peer := tc.ends(t)
			ab, ba, done := countedPipe(a, b, time.Hour)
			buf := make([]byte, 8)
			_, err := app.Write([]byte("request"))
			require.NoError(t, err)
			_, err = io.ReadFull(peer, buf[:len("request")])
			require.NoError(t, err)
			_, err = peer.Write([]byte("response"))
			require.NoError(t, err)
			_, err = io.ReadFull(app, buf[:len("response")])
			require.NoError(t, err)
			require.Eventually(t, func() bool {
				return ab.Load() == int64(len("request")) && ba.Load() == int64(len("response"))
			}, 10*time.Second, 10*time.Millisecond, "bytes counted while the stream is open")

			_ = app.Close()
			_ = peer.Close()
			<-done
		})
	}
}

// A relay idle both ways is closed after its idle time; one that moves
// bytes is not.
func TestPipeIdle(t *testing.T) {
	app, a := pair(t)
	b, peer := tlsPair(t)
	// Long enough that a stalled test machine does not make a gap of it.
	const idle = time.Second
	done := make(chan struct{})
	var idled bool
	go func() {
		defer close(done)
		idled = Pipe(a, b, idle, nil, nil)
	}()
	// Busy for two idle periods: every write resets the clock.
	buf := make([]byte, 4)
	for range 8 {
		_, err := app.Write([]byte("ping"))
		require.NoError(t, err)
		_, err = io.ReadFull(peer, buf)
		require.NoError(t, err)
		time.Sleep(idle / 4)
	}
	select {
	case <-done:
		t.Fatal("the relay was closed while bytes flowed")
	default:
	}
	// Then silent: the relay closes both sides.
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("an idle relay was not closed")
	}
	_ = app.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := app.Read(buf)
	require.Error(t, err, "the app's side is closed")
	require.True(t, idled, "Pipe says the idle timeout ended it")
}

// After one direction has ended, a peer that stops reading cannot hold
// the relay open: the other direction blocks in a write to it, which no
// read deadline interrupts, and the idle timeout must still close both
// sides (and so free the sockets, the goroutine and the gateway's
// connection slot).
func TestPipeIdleWhileWriteBlocked(t *testing.T) {
	for _, tc := range relayEnds {
		t.Run(tc.name, func(t *testing.T) {
			app, a, b, peer := tc.ends(t)
			done := make(chan struct{})
			go func() {
				defer close(done)
				Pipe(a, b, 200*time.Millisecond, nil, nil)
			}()
			_, err := app.Write([]byte("request"))
			require.NoError(t, err)
			require.NoError(t, app.CloseWrite())
			got, err := io.ReadAll(peer)
			require.NoError(t, err)
			require.Equal(t, "request", string(got))

			// The response is far more than the socket buffers hold, and
			// the app never reads it.
			wrote := make(chan error, 1)
			go func() {
				_, err := peer.Write(make([]byte, 64<<20))
				wrote <- err
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("Pipe did not return: a write to a peer that stopped reading outlived the idle timeout")
			}
			select {
			case err := <-wrote:
				require.Error(t, err, "the relay closed its side")
			case <-time.After(10 * time.Second):
				t.Fatal("the writer was not unblocked by the relay's close")
			}
		})
	}
}

// Between two TCP sockets the bytes go through a kernel pipe. A reader
// slower than the pipe (1 MiB takes it 320 ms, longer than the idle
// time) keeps the relay alive as long as it keeps taking bytes, and
// nothing is lost, reordered or duplicated.
func TestSpliceSlowReader(t *testing.T) {
	relaySlowReader(t, 4<<20)
}

// relaySlowReader sends size random bytes through Pipe between two TCP
// pairs, with an idle time of 300 ms, to a peer that takes 64 KiB every
// 20 ms through small socket buffers (so its pace is the relay's), and
// requires every byte delivered in order, and counted as it moved, not
// only when the stream ended.
func relaySlowReader(t *testing.T, size int) {
	t.Helper()
	app, a := pair(t)
	b, peer := pair(t)
	require.NoError(t, b.SetWriteBuffer(64<<10))
	require.NoError(t, peer.SetReadBuffer(64<<10))
	data := make([]byte, size)
	_, _ = rand.Read(data)
	moved, _, done := countedPipe(a, b, 300*time.Millisecond)
	go func() {
		_, _ = app.Write(data)
		_ = app.CloseWrite()
	}()
	got := make([]byte, 0, len(data))
	buf := make([]byte, 64<<10)
	countedEarly := false
	for {
		n, err := peer.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		require.NoError(t, err, "after %d bytes", len(got))
		countedEarly = countedEarly || moved.Load() > 0
		time.Sleep(20 * time.Millisecond)
	}
	require.Equal(t, len(data), len(got))
	require.True(t, bytes.Equal(data, got), "bytes lost, reordered or duplicated")
	require.True(t, countedEarly, "bytes counted before the end of the stream")
	require.EqualValues(t, len(data), moved.Load())
	_ = peer.Close()
	_ = app.Close()
	<-done
}
