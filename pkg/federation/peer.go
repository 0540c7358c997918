package federation

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
	"k8s.io/utils/clock"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

// exports computes what this cluster sends to each peer: its exported
// services (with its gateways) and its trust bundle.
type exports struct {
	catalog  *catalog.Store
	trust    *trust.Store
	gateways []string

	// mu guards cache.
	mu    sync.Mutex
	cache map[string]cachedServices
}

// cachedServices is one peer's service set for one local catalog version,
// with each service's resource kept by the catalog entry it came from:
// snapshots share unchanged entries, so a change re-encodes only what
// changed.
type cachedServices struct {
	version string
	set     desired
	from    map[catalog.ServiceKey]*catalog.Service
}

func newExports(store *catalog.Store, ts *trust.Store, gateways []string) *exports {
	return &exports{catalog: store, trust: ts, gateways: slices.Clone(gateways), cache: map[string]cachedServices{}}
}

// desired returns what peer should hold of typeURL now.
func (e *exports) desired(typeURL, peer string) (desired, error) {
	switch typeURL {
	case TypeBundle:
		b, err := e.trust.GetBundleForTrustDomain(e.trust.LocalTrustDomain())
		if err != nil {
			return newDesired(nil)
		}
		return newDesired([]*fedv1.Resource{bundleResource(b)})
	case TypeService:
		snap := e.catalog.Get(catalog.LocalSource)
		e.mu.Lock()
		old, ok := e.cache[peer]
		e.mu.Unlock()
		if ok && old.version == snap.Version() {
			return old.set, nil
		}
		next := cachedServices{
			version: snap.Version(),
			set:     desired{resources: make(map[string]*fedv1.Resource, snap.Len()), digests: make(map[string]digest, snap.Len())},
			from:    make(map[catalog.ServiceKey]*catalog.Service, snap.Len()),
		}
		for svc := range snap.All() {
			if !svc.ExportedTo(peer) {
				continue
			}
			key := svc.Key()
			name := key.String()
			if old.from[key] == svc {
				next.set.resources[name], next.set.digests[name] = old.set.resources[name], old.set.digests[name]
			} else {
				r := serviceResource(svc, e.gateways)
				d, _, err := digestOf(r)
				if err != nil {
					return desired{}, fmt.Errorf("encode %s: %w", name, err)
				}
				next.set.resources[name], next.set.digests[name] = r, d
			}
			next.from[key] = svc
		}
		e.mu.Lock()
		e.cache[peer] = next
		e.mu.Unlock()
		return next.set, nil
	default:
		return desired{}, fmt.Errorf("unknown resource type %q", typeURL)
	}
}

func (e *exports) forget(peer string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.cache, peer)
}

// importPhase is where a peer's imports are in their life after the peer
// is lost.
type importPhase int

const (
	// phaseLive: imports as the peer sent them (connected, or lost for
	// less than keepFor).
	phaseLive importPhase = iota
	// phaseDrained: endpoints kept but not ready, so no new traffic goes
	// to them.
	phaseDrained
	// phaseRemoved: gone from the catalog.
	phaseRemoved
)

// peer is this federator's side of one link: what was sent to and
// received from the peer, and its status.
type peer struct {
	name  string
	td    spiffeid.TrustDomain
	id    spiffeid.ID
	clock clock.WithTicker

	exports       *exports
	persistBundle func(context.Context, *spiffebundle.Bundle) error
	tracker       *tracker
	// terminate asks the running session to send Terminate and end.
	terminate chan string

	// out is owned by the running session; sessions never overlap.
	out map[string]*outbound
	// updates bounds how often the peer's updates are applied, over all
	// its streams, so that reconnecting does not refill it. Owned by the
	// running session; the first makes it.
	updates *rate.Limiter

	// importMu guards in, received and phase.
	importMu sync.Mutex
	in       map[string]*inbound
	received *catalog.Snapshot
	phase    importPhase

	// sessMu guards sessCancel and sessDone: at most one session runs.
	sessMu     sync.Mutex
	sessCancel context.CancelFunc
	sessDone   chan struct{}
}

func newPeer(name string, td spiffeid.TrustDomain, id spiffeid.ID, clk clock.WithTicker, ex *exports) *peer {
	p := &peer{
		name: name, td: td, id: id, clock: clk, exports: ex,
		tracker:   newTracker(),
		terminate: make(chan string, 1),
		out:       map[string]*outbound{},
		in:        map[string]*inbound{},
		received:  catalog.NewBuilder(name).Build(),
	}
	for _, t := range resourceTypes {
		p.out[t] = newOutbound(t)
		p.in[t] = &inbound{}
	}
	return p
}

// source is the peer's name in the catalog store.
func (p *peer) source() string { return p.name }

// heldVersions is what this side tells the peer it holds, by type.
func (p *peer) heldVersions() map[string]string {
	p.importMu.Lock()
	defer p.importMu.Unlock()
	out := map[string]string{}
	for t, in := range p.in {
		if in.version != "" {
			out[t] = in.version
		}
	}
	return out
}

func (p *peer) heldVersion(typeURL string) string {
	p.importMu.Lock()
	defer p.importMu.Unlock()
	if in, ok := p.in[typeURL]; ok {
		return in.version
	}
	return ""
}

// servicesSynced reports whether the peer's services are known in this
// process.
func (p *peer) servicesSynced() bool {
	p.importMu.Lock()
	defer p.importMu.Unlock()
	return p.in[TypeService].synced
}

// resume prepares every outbound type for a new stream.
func (p *peer) resume(peerHolds map[string]string) {
	for _, t := range resourceTypes {
		want, err := p.exports.desired(t, p.name)
		if err != nil {
			want = desired{}
		}
		p.out[t].resume(peerHolds[t], want)
	}
}

// exclusive registers a new session and ends any running one first.
func (p *peer) exclusive(ctx context.Context) (context.Context, func()) {
	p.sessMu.Lock()
	if p.sessCancel != nil {
		p.sessCancel()
		<-p.sessDone
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	p.sessCancel, p.sessDone = cancel, done
	p.sessMu.Unlock()
	return sctx, func() {
		cancel()
		close(done)
		p.sessMu.Lock()
		if p.sessDone == done {
			p.sessCancel, p.sessDone = nil, nil
		}
		p.sessMu.Unlock()
	}
}

// runSession runs one stream exclusively and records how it ended.
func (p *peer) runSession(ctx context.Context, cfg sessionConfig, st stream, abort func()) error {
	sctx, release := p.exclusive(ctx)
	defer release()
	p.importMu.Lock()
	if p.phase != phaseLive {
		p.phase = phaseLive
		p.publishLocked()
	}
	p.importMu.Unlock()
	err := p.session(sctx, cfg, st, abort)
	p.tracker.disconnected(p.clock.Now(), err)
	return err
}

// publishLocked puts the peer's imports, as the phase shows them, into
// the catalog. importMu must be held.
func (p *peer) publishLocked() {
	store := p.exports.catalog
	switch p.phase {
	case phaseRemoved:
		store.Delete(p.source())
		p.tracker.imported(0)
		return
	case phaseDrained:
		b := catalog.NewBuilder(p.source())
		for svc := range p.received.All() {
			d := svc.Clone()
			for i := range d.Endpoints {
				d.Endpoints[i].NotReady += d.Endpoints[i].Ready
				d.Endpoints[i].Ready = 0
			}
			_ = b.Put(d)
		}
		store.Set(b.Build())
	default:
		store.Set(p.received)
	}
	p.tracker.imported(p.received.Len())
}

// age moves a lost peer's imports along: kept for keepFor, then drained
// for drainFor, then removed. A connected peer is left alone.
func (p *peer) age(now time.Time, keepFor, drainFor time.Duration) {
	since, lost := p.tracker.lostSince()
	if !lost {
		return
	}
	want := phaseLive
	switch elapsed := now.Sub(since); {
	case elapsed >= keepFor+drainFor:
		want = phaseRemoved
	case elapsed >= keepFor:
		want = phaseDrained
	}
	p.importMu.Lock()
	defer p.importMu.Unlock()
	if want <= p.phase {
		return
	}
	p.phase = want
	if want == phaseRemoved {
		p.forgetImportsLocked()
	}
	p.publishLocked()
}

// forgetImportsLocked drops everything received from the peer, so the
// next stream starts from a full set. importMu must be held.
func (p *peer) forgetImportsLocked() {
	p.in[TypeService] = &inbound{}
	p.received = catalog.NewBuilder(p.source()).Build()
}

// removeImports takes the peer's imports out of the catalog for good (the
// link was deleted or terminated).
func (p *peer) removeImports() {
	p.importMu.Lock()
	defer p.importMu.Unlock()
	p.forgetImportsLocked()
	p.phase = phaseRemoved
	p.publishLocked()
}

// endSessionWait ends the running session, if any, without a Terminate,
// and waits at most wait for it to record its end.
func (p *peer) endSessionWait(wait time.Duration) {
	p.sessMu.Lock()
	done := p.sessDone
	if p.sessCancel != nil {
		p.sessCancel()
	}
	p.sessMu.Unlock()
	if done == nil {
		return
	}
	t := p.clock.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C():
	}
}

// stopSession asks the running session, if any, to say Terminate and end,
// and waits a bounded time for it.
func (p *peer) stopSession(reason string, wait time.Duration) {
	p.sessMu.Lock()
	done := p.sessDone
	p.sessMu.Unlock()
	if done == nil {
		return
	}
	select {
	case p.terminate <- reason:
	default:
	}
	t := p.clock.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C():
		p.sessMu.Lock()
		if p.sessCancel != nil {
			p.sessCancel()
		}
		p.sessMu.Unlock()
	}
}
