// Package outlier is passive health checking for the Go proxies: an
// endpoint a connection attempt failed to reach is skipped for a while,
// like Envoy's outlier detection on local-origin connect failures. It
// lives beside a proxy's routing state, not in it, so a config update
// does not forget which endpoints just failed.
package outlier

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Ejections are endpoints a dial failed to, each skipped until its time
// passes. The zero value ejects for no time; set EjectFor before use.
// Safe for concurrent use.
type Ejections struct {
	// EjectFor is how long Eject skips an endpoint.
	EjectFor time.Duration

	// n is len(until), read without the lock: the common case, nothing
	// ejected, costs one atomic load per candidate.
	n atomic.Int32
	// mu guards until: endpoint → Unix nanoseconds it is skipped until.
	mu    sync.Mutex
	until map[netip.AddrPort]int64
}

// Any reports whether some endpoint may be ejected (a cheap check before
// asking about each).
func (e *Ejections) Any() bool { return e.n.Load() != 0 }

// Ejected reports whether ep is skipped at now (Unix nanoseconds); an
// ejection whose time has passed is forgotten.
func (e *Ejections) Ejected(ep netip.AddrPort, now int64) bool {
	if e.n.Load() == 0 {
		return false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	t, ok := e.until[ep]
	if ok && now >= t {
		delete(e.until, ep)
		e.n.Store(int32(len(e.until)))
		return false
	}
	return ok
}

// Eject skips ep for EjectFor from now.
func (e *Ejections) Eject(ep netip.AddrPort) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.until == nil {
		e.until = make(map[netip.AddrPort]int64)
	}
	e.until[ep] = time.Now().Add(e.EjectFor).UnixNano()
	e.n.Store(int32(len(e.until)))
}

// Restore forgets ep's ejection: it answered.
func (e *Ejections) Restore(ep netip.AddrPort) {
	if e.n.Load() == 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.until, ep)
	e.n.Store(int32(len(e.until)))
}

// Len is the number of endpoints ejected now or whose ejection has passed
// but was not yet noticed.
func (e *Ejections) Len() int { return int(e.n.Load()) }
