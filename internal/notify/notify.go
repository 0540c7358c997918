// Package notify is the coalescing change signal shared by Isthmus's
// in-memory stores: each subscriber has a channel of capacity one, so a
// slow reader sees one pending signal however many changes happened, and
// then reads the current state itself.
package notify

import "sync"

// Hub fans a change signal out to subscribers. The zero value is ready to
// use; a Hub must not be copied.
type Hub struct {
	// mu guards subs.
	mu   sync.Mutex
	subs map[chan struct{}]struct{}
}

// Subscribe returns a channel signalled after every Notify (coalesced) and
// a function that ends the subscription. When primed, the channel starts
// with a pending signal, so the subscriber reads the current state once.
func (h *Hub) Subscribe(primed bool) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	if primed {
		ch <- struct{}{}
	}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = map[chan struct{}]struct{}{}
	}
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		delete(h.subs, ch)
		h.mu.Unlock()
	}
}

// Notify signals every subscriber without blocking.
func (h *Hub) Notify() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
