package relay

import (
	"bytes"
	"crypto/rand"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// Without a pipe to splice through (pipe2 fails when the process is out
// of descriptors) the copy goes through a buffer, and the bytes it moves
// still keep the relay from being idle and are counted as they move: a
// reader slower than the idle time is served to the end.
func TestSpliceWithoutPipe(t *testing.T) {
	// Hold every pooled pipe, and let no new one be made.
	var held []*pipe
	for {
		p, ok := pipes.Get().(*pipe)
		if !ok {
			break
		}
		held = append(held, p)
	}
	pipe2 = func([]int, int) error { return unix.EMFILE }
	t.Cleanup(func() {
		pipe2 = unix.Pipe2
		for _, p := range held {
			pipes.Put(p)
		}
	})
	require.Nil(t, getPipe())

	app, a := pair(t)
	b, peer := pair(t)
	require.NoError(t, b.SetWriteBuffer(64<<10))
	require.NoError(t, peer.SetReadBuffer(64<<10))
	data := make([]byte, 2<<20)
	_, _ = rand.Read(data)
	var moved atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		Pipe(a, b, 300*time.Millisecond, func(n int64) { moved.Add(n) }, nil)
	}()
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
