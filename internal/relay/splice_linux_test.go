package relay

import (
	"testing"

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

	relaySlowReader(t, 2<<20)
}
