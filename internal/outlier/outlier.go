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
// passes. Reads take no lock (ejections are rare, lookups are per pick):
// the set is an immutable map replaced on every change. The zero value
// ejects for no time; set EjectFor before use. Safe for concurrent use.
type Ejections struct {
	// EjectFor is how long Eject skips an endpoint.
	EjectFor time.Duration

	// until maps endpoint → Unix nanoseconds it is skipped until; nil or
	// empty when nothing is ejected. The map is never modified once
	// stored.
	until atomic.Pointer[map[netip.AddrPort]int64]
	// mu serializes writers (copy, change, store).
	mu sync.Mutex
}

// Any reports whether some endpoint may be ejected: false is certain,
// true may count ejections whose time has passed (a cheap check before
// asking about each endpoint).
func (e *Ejections) Any() bool {
	m := e.until.Load()
	return m != nil && len(*m) > 0
}

// Ejected reports whether ep is skipped at now (Unix nanoseconds); an
// ejection whose time has passed is forgotten.
func (e *Ejections) Ejected(ep netip.AddrPort, now int64) bool {
	m := e.until.Load()
	if m == nil || len(*m) == 0 {
		return false
	}
	t, ok := (*m)[ep]
	if !ok {
		return false
	}
	if now >= t {
		e.update(now, func(m map[netip.AddrPort]int64) {
			if m[ep] == t { // not ejected again meanwhile
				delete(m, ep)
			}
		})
		return false
	}
	return true
}

// Eject skips ep for EjectFor from now.
func (e *Ejections) Eject(ep netip.AddrPort) {
	now := time.Now()
	until := now.Add(e.EjectFor).UnixNano()
	e.update(now.UnixNano(), func(m map[netip.AddrPort]int64) { m[ep] = until })
}

// Restore forgets ep's ejection: it answered.
func (e *Ejections) Restore(ep netip.AddrPort) {
	if m := e.until.Load(); m == nil || (*m)[ep] == 0 {
		return
	}
	e.update(time.Now().UnixNano(), func(m map[netip.AddrPort]int64) { delete(m, ep) })
}

// Len is the number of endpoints ejected now, or whose ejection has
// passed unnoticed.
func (e *Ejections) Len() int {
	if m := e.until.Load(); m != nil {
		return len(*m)
	}
	return 0
}

// update replaces the set with a changed copy, leaving out the
// ejections that have passed at now: endpoints that failed and then left
// the routes (pods that churned) are never asked about again, and would
// stay for ever otherwise. The copy visits every entry anyway, so the
// sweep costs nothing more, and the set stays as large as the endpoints
// ejected within EjectFor.
func (e *Ejections) update(now int64, change func(map[netip.AddrPort]int64)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var next map[netip.AddrPort]int64
	if m := e.until.Load(); m != nil {
		next = make(map[netip.AddrPort]int64, len(*m)+1)
		for ep, t := range *m {
			if now < t {
				next[ep] = t
			}
		}
	} else {
		next = map[netip.AddrPort]int64{}
	}
	change(next)
	e.until.Store(&next)
}
