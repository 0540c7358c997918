package sidecar

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// In try mode a write never blocks: what a full socket does not take is
// kept, written first by the next blocking write, and the peer reads
// every byte in order.
func TestTryConnKeepsWhatTheSocketDoesNotTake(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer raw.Close()
	peer := <-accepted
	require.NotNil(t, peer)
	defer peer.Close()
	require.NoError(t, raw.(*net.TCPConn).SetWriteBuffer(16<<10))
	c := &tryConn{TCPConn: raw.(*net.TCPConn)}

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
	require.NoError(t, raw.(*net.TCPConn).SetWriteBuffer(4<<20)) // the drain need not crawl

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
