// Package testlog gives tests a slog.Logger that writes to t.Logf, and
// goes quiet once the test ends (goroutines still logging then would
// otherwise panic the test binary).
package testlog

import (
	"bytes"
	"log/slog"
	"sync"
	"testing"
)

// New returns a debug-level logger writing to tb.Logf until tb ends.
func New(tb testing.TB) *slog.Logger {
	w := &writer{tb: tb}
	tb.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type writer struct {
	tb testing.TB
	// mu guards done.
	mu   sync.Mutex
	done bool
}

func (w *writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.tb.Logf("%s", bytes.TrimRight(p, "\n"))
	}
	return len(p), nil
}
