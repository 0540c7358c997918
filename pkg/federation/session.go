package federation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"
	"k8s.io/utils/clock"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// Errors that end a session.
var (
	// ErrHeartbeatTimeout: nothing arrived from the peer for longer than
	// the heartbeat timeout.
	ErrHeartbeatTimeout = errors.New("no message from the peer within the heartbeat timeout")
	// ErrTerminated: the peer ended the link with Terminate. Not retried.
	ErrTerminated = errors.New("the peer terminated the link")
	// ErrProtocol: the peer broke the protocol (no Open first, a wrong
	// cluster name). The stream is closed; the peer may reconnect.
	ErrProtocol = errors.New("federation protocol violation")
)

// stream is the part of a gRPC Exchange stream (client or server side) a
// session uses.
type stream interface {
	Send(*fedv1.ExchangeMessage) error
	Recv() (*fedv1.ExchangeMessage, error)
}

// sessionConfig is what a session needs from the federator.
type sessionConfig struct {
	clusterName      string
	heartbeat        time.Duration
	heartbeatTimeout time.Duration
	limits           Limits
	log              *slog.Logger
}

// session runs one exchange stream with a peer: a reader goroutine, a
// heartbeat ticker, and this select loop, which owns the peer's
// outbound/inbound state and is the only sender.
//
// abort ends the stream from this side, so that the reader's Recv
// returns; session then waits for the reader. On the server side abort is
// nil: gRPC ends the stream when the handler returns, and the reader,
// which never blocks on anything else once ctx is done, exits with it.
func (p *peer) session(ctx context.Context, cfg sessionConfig, st stream, abort func()) error {
	log := cfg.log.With("peer", p.name)
	clk := p.clock
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The reader hands messages over one at a time; it stops when the
	// stream fails or ctx ends (the caller then ends the stream, so Recv
	// returns).
	msgs := make(chan *fedv1.ExchangeMessage)
	readErr := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		readErr <- readLoop(ctx, st, msgs)
	}()
	defer func() {
		cancel()
		if abort != nil {
			abort()
			wg.Wait()
		}
	}()

	open := &fedv1.Open{ClusterName: cfg.clusterName, AcknowledgedVersions: p.heldVersions()}
	if err := st.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Open{Open: open}}); err != nil {
		return fmt.Errorf("send open: %w", err)
	}

	timeout := clk.NewTimer(cfg.heartbeatTimeout)
	defer timeout.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-readErr:
		return err
	case <-timeout.C():
		return fmt.Errorf("%w: no Open within %s", ErrHeartbeatTimeout, cfg.heartbeatTimeout)
	case m := <-msgs:
		o := m.GetOpen()
		if o == nil {
			return fmt.Errorf("%w: the first message is not Open", ErrProtocol)
		}
		if o.GetClusterName() != p.name {
			return fmt.Errorf("%w: the peer says it is cluster %q, it was linked as %q", ErrProtocol, o.GetClusterName(), p.name)
		}
		p.resume(o.GetAcknowledgedVersions())
	}
	p.tracker.connected(clk.Now())
	log.Info("federation stream up")

	heartbeat := clk.NewTicker(cfg.heartbeat)
	defer heartbeat.Stop()
	localChanged, unsubCatalog := p.exports.catalog.Subscribe()
	defer unsubCatalog()
	bundleChanged, unsubTrust := p.exports.trust.Subscribe()
	defer unsubTrust()
	limiter := rate.NewLimiter(rate.Limit(cfg.limits.UpdatesPerSecond), cfg.limits.UpdateBurst)

	if err := p.sendUpdates(st); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case reason := <-p.terminate:
			_ = st.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Terminate{Terminate: &fedv1.Terminate{Reason: reason}}})
			awaitClose(st, msgs, readErr, timeout)
			return fmt.Errorf("link terminated here: %s", reason)
		case err := <-readErr:
			return err
		case <-timeout.C():
			return ErrHeartbeatTimeout
		case <-heartbeat.C():
			if err := st.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}}); err != nil {
				return fmt.Errorf("send heartbeat: %w", err)
			}
		case <-localChanged:
			if err := p.sendUpdates(st); err != nil {
				return err
			}
		case <-bundleChanged:
			if err := p.sendUpdates(st); err != nil {
				return err
			}
		case m := <-msgs:
			timeout.Reset(cfg.heartbeatTimeout)
			p.tracker.heard(clk.Now())
			reply, err := p.handle(ctx, m, limiter, cfg.limits, log)
			if err != nil {
				return err
			}
			if reply != nil {
				if err := st.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: reply}}); err != nil {
					return fmt.Errorf("send ack: %w", err)
				}
			}
			if m.GetAck() != nil {
				if err := p.sendUpdates(st); err != nil {
					return err
				}
			}
		}
	}
}

// awaitClose gives a Terminate the time to arrive: on the client side,
// cancelling the stream at once could discard it, so the client half-closes
// and waits, bounded by the heartbeat timeout, for the peer to end the
// stream. A server returning from its handler flushes what it sent.
func awaitClose(st stream, msgs <-chan *fedv1.ExchangeMessage, readErr <-chan error, timeout clock.Timer) {
	cs, ok := st.(interface{ CloseSend() error })
	if !ok {
		return
	}
	_ = cs.CloseSend()
	for {
		select {
		case <-msgs:
			// The peer's last words no longer matter.
		case <-readErr:
			return
		case <-timeout.C():
			return
		}
	}
}

// readLoop receives until the stream fails or ctx ends.
func readLoop(ctx context.Context, st stream, out chan<- *fedv1.ExchangeMessage) error {
	for {
		m, err := st.Recv()
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		select {
		case out <- m:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// handle processes one message from the peer and returns the Ack to send,
// if any.
func (p *peer) handle(ctx context.Context, m *fedv1.ExchangeMessage, limiter *rate.Limiter, lim Limits, log *slog.Logger) (*fedv1.Ack, error) {
	switch k := m.GetKind().(type) {
	case *fedv1.ExchangeMessage_Heartbeat:
		return nil, nil
	case *fedv1.ExchangeMessage_Terminate:
		return nil, fmt.Errorf("%w: %s", ErrTerminated, k.Terminate.GetReason())
	case *fedv1.ExchangeMessage_Open:
		return nil, fmt.Errorf("%w: a second Open", ErrProtocol)
	case *fedv1.ExchangeMessage_Ack:
		p.handleAck(k.Ack, log)
		return nil, nil
	case *fedv1.ExchangeMessage_Update:
		u := k.Update
		if !limiter.AllowN(p.clock.Now(), 1) {
			a := nack(u, p.heldVersion(u.GetTypeUrl()), "", "more than %g updates per second; send the change again later", lim.UpdatesPerSecond)
			p.tracker.nackSent(a.GetError())
			return a, nil
		}
		a := p.receive(ctx, u, lim)
		if a.GetError() != nil {
			log.Warn("refused an update from the peer", "type", u.GetTypeUrl(), "resource", a.GetError().GetResource(), "reason", a.GetError().GetReason())
			p.tracker.nackSent(a.GetError())
		} else {
			p.tracker.received(u.GetTypeUrl(), a.GetVersion())
		}
		return a, nil
	default:
		return nil, fmt.Errorf("%w: an empty or unknown message", ErrProtocol)
	}
}

func (p *peer) handleAck(a *fedv1.Ack, log *slog.Logger) {
	o, ok := p.out[a.GetTypeUrl()]
	if !ok || !o.ack(a) {
		log.Debug("ignoring an answer to no update in flight", "type", a.GetTypeUrl(), "nonce", a.GetNonce())
		return
	}
	if a.GetError() != nil {
		log.Warn("the peer refused an update", "type", a.GetTypeUrl(), "resource", a.GetError().GetResource(), "reason", a.GetError().GetReason())
	}
	p.tracker.acked(a.GetTypeUrl(), o.ackedVersion, o.lastNACK, len(o.acked))
}

// sendUpdates sends, per type, what brings the peer to this side's
// current exports, unless an update of that type is already in flight.
func (p *peer) sendUpdates(st stream) error {
	for _, t := range resourceTypes {
		want, err := p.exports.desired(t, p.name)
		if err != nil {
			return err
		}
		u := p.out[t].next(want)
		if u == nil {
			continue
		}
		if err := st.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: u}}); err != nil {
			return fmt.Errorf("send %s update: %w", t, err)
		}
		p.tracker.sent(t, u.GetVersion())
	}
	return nil
}

// receive validates an update as a whole and applies it, or applies
// nothing and names the first refused resource.
func (p *peer) receive(ctx context.Context, u *fedv1.Update, lim Limits) *fedv1.Ack {
	held := p.heldVersion(u.GetTypeUrl())
	for _, r := range u.GetResources() {
		if n := proto.Size(r); n > lim.MaxResourceBytes {
			return nack(u, held, r.GetName(), "%d bytes, more than the limit of %d", n, lim.MaxResourceBytes)
		}
	}
	switch u.GetTypeUrl() {
	case TypeService:
		return p.receiveServices(u, lim)
	case TypeBundle:
		return p.receiveBundle(ctx, u)
	default:
		return nack(u, held, "", "unknown resource type %q", u.GetTypeUrl())
	}
}

func (p *peer) receiveServices(u *fedv1.Update, lim Limits) *fedv1.Ack {
	p.importMu.Lock()
	defer p.importMu.Unlock()
	in := p.in[TypeService]
	services := make([]catalog.Service, 0, len(u.GetResources()))
	for _, r := range u.GetResources() {
		svc, err := importService(p.name, p.td, r)
		if err != nil {
			return nack(u, in.version, r.GetName(), "%v", err)
		}
		services = append(services, svc)
	}
	for _, name := range u.GetRemoved() {
		if _, ok := in.digests[name]; !ok && !u.GetFullSet() {
			return nack(u, in.version, name, "removed, but never received")
		}
	}
	commit, refusal := in.apply(u, lim.MaxServices)
	if refusal != nil {
		return refusal
	}
	var b *catalog.Builder
	if u.GetFullSet() {
		b = catalog.NewBuilder(p.source())
	} else {
		b = p.received.Builder()
	}
	for _, name := range u.GetRemoved() {
		ns, n, _ := strings.Cut(name, "/")
		b.Delete(catalog.ServiceKey{Namespace: ns, Name: n})
	}
	for _, svc := range services {
		if err := b.Put(svc); err != nil {
			return nack(u, in.version, svc.Key().String(), "%v", err)
		}
	}
	commit()
	p.received = b.Build()
	p.publishLocked()
	return &fedv1.Ack{TypeUrl: u.GetTypeUrl(), Nonce: u.GetNonce(), Version: in.version}
}

func (p *peer) receiveBundle(ctx context.Context, u *fedv1.Update) *fedv1.Ack {
	held := p.heldVersion(TypeBundle)
	if len(u.GetRemoved()) > 0 {
		return nack(u, held, u.GetRemoved()[0], "a peer's trust bundle cannot be removed, only replaced")
	}
	if u.GetFullSet() && len(u.GetResources()) == 0 {
		return nack(u, held, p.td.Name(), "a full set without the peer's bundle")
	}
	var bundles []*spiffebundle.Bundle
	for _, r := range u.GetResources() {
		if r.GetName() != p.td.Name() {
			return nack(u, held, r.GetName(), "only the bundle of the peer's trust domain %s is accepted", p.td.Name())
		}
		b, err := parseBundle(r.GetTrustBundle(), p.td)
		if err != nil {
			return nack(u, held, r.GetName(), "%v", err)
		}
		bundles = append(bundles, b)
	}
	p.importMu.Lock()
	commit, refusal := p.in[TypeBundle].apply(u, 1)
	p.importMu.Unlock()
	if refusal != nil {
		return refusal
	}
	for _, b := range bundles {
		if err := p.exports.trust.SetPeer(b); err != nil {
			return nack(u, held, p.td.Name(), "%v", err)
		}
		if p.persistBundle != nil {
			if err := p.persistBundle(ctx, b); err != nil {
				return nack(u, held, p.td.Name(), "this side could not store it: %v", err)
			}
		}
		p.tracker.bundle(b)
	}
	p.importMu.Lock()
	defer p.importMu.Unlock()
	commit()
	return &fedv1.Ack{TypeUrl: u.GetTypeUrl(), Nonce: u.GetNonce(), Version: p.in[TypeBundle].version}
}

// sortUpdate puts an update's lists in name order, so equal updates
// encode alike.
func sortUpdate(u *fedv1.Update) {
	slices.SortFunc(u.Resources, func(a, b *fedv1.Resource) int { return strings.Compare(a.GetName(), b.GetName()) })
	slices.Sort(u.Removed)
}
