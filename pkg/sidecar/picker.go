package sidecar

import (
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/outlier"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Picker chooses a cluster's endpoint for each new upstream connection or
// request, as docs/sidecar-xds.md ("Endpoints") says the sidecar does:
//
//   - the lowest priority that has a healthy endpoint (EDS HEALTHY and
//     not ejected by passive health): the contract's overprovisioning
//     factor of 100000 makes Envoy fail over only then, too;
//   - within it, a locality with probability proportional to its
//     load_balancing_weight, or, where that is unset, to its number of
//     healthy endpoints; a locality whose healthy endpoints are all
//     ejected weighs nothing;
//   - within the locality, round robin over its healthy endpoints,
//     skipping ejected ones.
//
// An endpoint EDS calls unhealthy is never picked (the contract's panic
// threshold is 0). When every healthy endpoint is ejected, Pick ignores
// the ejections, as the east-west gateway does: a stale ejection must not
// black-hole a cluster that came back.
//
// A Picker is built once per cluster version and is then only read: Pick
// is safe for concurrent use and allocates nothing.
type Picker struct {
	levels []level
	health *outlier.Ejections
	// randN returns a value in [0, n); rand.Uint64N unless a test sets it.
	randN func(n uint64) uint64
}

// level is one priority.
type level struct {
	localities []locality
	// total is the sum of the localities' weights: zero when the level has
	// no healthy endpoint.
	total uint64
}

type locality struct {
	// weight is the locality's load_balancing_weight, or its healthy
	// endpoint count when unset; zero when it has no healthy endpoint.
	weight uint64
	// eps are its healthy endpoints, in the order EDS sent them.
	eps []netip.AddrPort
	// next is the round-robin position.
	next *atomic.Uint32
}

// NewPicker indexes c's healthy endpoints by priority and locality. A
// cluster without priorities (not EDS) is one priority of one locality
// holding its IP endpoints. health, when not nil, is the passive health
// the picks consult; the dialer ejects into it.
func NewPicker(c *xdsclient.Cluster, health *outlier.Ejections) *Picker {
	p := &Picker{health: health, randN: rand.Uint64N}
	if p.health == nil {
		p.health = &outlier.Ejections{}
	}
	add := func(lv *level, weight uint32, eps []xdsclient.Endpoint) {
		var healthy []netip.AddrPort
		for _, e := range eps {
			if e.Healthy && e.Addr.IsValid() {
				healthy = append(healthy, e.Addr)
			}
		}
		w := uint64(weight)
		if w == 0 {
			w = uint64(len(healthy))
		}
		if len(healthy) == 0 {
			w = 0
		}
		lv.localities = append(lv.localities, locality{weight: w, eps: healthy, next: new(atomic.Uint32)})
		lv.total += w
	}
	if len(c.Priorities) == 0 {
		var lv level
		add(&lv, 0, c.Endpoints)
		p.levels = []level{lv}
		return p
	}
	p.levels = make([]level, len(c.Priorities))
	for i, pr := range c.Priorities {
		for _, l := range pr.Localities {
			add(&p.levels[i], l.Weight, l.Endpoints)
		}
	}
	return p
}

// Pick returns the endpoint to connect to, or false when the cluster has
// no healthy endpoint at all.
func (p *Picker) Pick() (netip.AddrPort, bool) {
	if !p.health.Any() {
		return p.pickIgnoringHealth()
	}
	now := time.Now().UnixNano()
	var buf [8]bool
	for i := range p.levels {
		lv := &p.levels[i]
		if lv.total == 0 {
			continue
		}
		// The weight of the localities with an endpoint not ejected,
		// each asked once.
		avail := buf[:0]
		if len(lv.localities) > len(buf) {
			avail = make([]bool, 0, len(lv.localities))
		}
		var total uint64
		for j := range lv.localities {
			l := &lv.localities[j]
			ok := l.weight != 0 && p.available(l, now)
			avail = append(avail, ok)
			if ok {
				total += l.weight
			}
		}
		if total == 0 {
			continue // every healthy endpoint of this priority is ejected
		}
		r := p.randN(total)
		for j := range lv.localities {
			l := &lv.localities[j]
			if !avail[j] {
				continue
			}
			if r < l.weight {
				return p.roundRobin(l, now), true
			}
			r -= l.weight
		}
	}
	return p.pickIgnoringHealth()
}

// pickIgnoringHealth picks as if nothing were ejected.
func (p *Picker) pickIgnoringHealth() (netip.AddrPort, bool) {
	for i := range p.levels {
		lv := &p.levels[i]
		if lv.total == 0 {
			continue
		}
		l := &lv.localities[0]
		if len(lv.localities) > 1 {
			r := p.randN(lv.total)
			for j := range lv.localities {
				l = &lv.localities[j]
				if r < l.weight {
					break
				}
				r -= l.weight
			}
		}
		n := uint32(len(l.eps))
		return l.eps[(l.next.Add(1)-1)%n], true
	}
	return netip.AddrPort{}, false
}

// available reports whether l has an endpoint that is not ejected.
func (p *Picker) available(l *locality, now int64) bool {
	for _, ep := range l.eps {
		if !p.health.Ejected(ep, now) {
			return true
		}
	}
	return false
}

// roundRobin is l's next endpoint that is not ejected; l has one. The
// turns go round the endpoints not ejected only, as Envoy's round robin
// leaves ejected hosts out of its rotation: moving on to the next in the
// list instead would give that one the ejected ones' turns too.
func (p *Picker) roundRobin(l *locality, now int64) netip.AddrPort {
	n := uint32(len(l.eps))
	start := l.next.Add(1) - 1
	if !p.health.Any() {
		return l.eps[start%n]
	}
	var buf [32]netip.AddrPort
	live := buf[:0]
	for _, ep := range l.eps {
		if !p.health.Ejected(ep, now) {
			live = append(live, ep)
		}
	}
	if len(live) == 0 {
		return l.eps[start%n]
	}
	return live[start%uint32(len(live))]
}

// Healthy is the number of endpoints EDS calls healthy, over every
// priority.
func (p *Picker) Healthy() int {
	n := 0
	for _, lv := range p.levels {
		for _, l := range lv.localities {
			n += len(l.eps)
		}
	}
	return n
}
