package federation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"golang.org/x/time/rate"
	"google.golang.org/protobuf/proto"
	"k8s.io/utils/clock"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/internal/clip"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// Errors that end a session.
var (
	// ErrHeartbeatTimeout: nothing arrived from the peer for longer than
	// the heartbeat timeout.
	ErrHeartbeatTimeout = errors.New("no message from the peer within the heartbeat timeout")
	// ErrTerminated: the peer ended the link with Terminate. Not retried.
	ErrTerminated = errors.New("the peer terminated the link")
	// ErrAckTimeout: the peer did not answer an update within the
	// heartbeat timeout. It may send heartbeats still, but this side's
	// updates stall behind the one in flight.
	ErrAckTimeout = errors.New("the peer did not acknowledge an update within the heartbeat timeout")
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

// maxQueued bounds the messages waiting for the writer; more means the
// peer does not read what it is sent, and the session ends.
const maxQueued = 64

// errSendClosed ends the writer once it half-closed the stream after a
// Terminate.
var errSendClosed = errors.New("send side closed")

// session runs one exchange stream with a peer: a reader and a writer
// goroutine, a heartbeat ticker, and this select loop, which owns the
// peer's outbound/inbound state.
//
// The loop never blocks on the stream. It queues what it sends for the
// writer (at most maxQueued messages), and the reader hands it what
// arrives. Were the loop to send itself, two sides sending large sets at
// once could each block in Send, flow control full, while neither reads
// what the other sends: the link would hang while both showed it
// connected. A Send that does not complete within the heartbeat timeout
// (the peer does not read) ends the session too.
//
// abort ends the stream from this side, so that the reader's Recv and the
// writer's Send return; session then waits for both. On the server side
// abort is nil: gRPC ends the stream when the handler returns, and the
// reader and the writer, which never block on anything else once ctx is
// done, exit with it.
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
	w := &writer{queue: make(chan queued, maxQueued), err: make(chan error, 1), clock: clk}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		readErr <- readLoop(ctx, st, msgs)
	}()
	go func() {
		defer wg.Done()
		w.err <- w.run(ctx, st)
	}()
	defer func() {
		cancel()
		if abort != nil {
			abort()
			wg.Wait()
		}
	}()

	open := &fedv1.Open{ClusterName: cfg.clusterName, AcknowledgedVersions: p.heldVersions()}
	if err := w.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Open{Open: open}}); err != nil {
		return err
	}

	timeout := clk.NewTimer(cfg.heartbeatTimeout)
	defer timeout.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-readErr:
		return err
	case err := <-w.err:
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
	for _, t := range resourceTypes {
		if o := p.out[t]; o.acked != nil {
			// The peer holds what it acknowledged before, or exactly
			// what this side wants it to: nothing is sent, and that is
			// as good as an acknowledgement.
			p.tracker.acked(t, o.ackedVersion, o.lastNACK, len(o.acked))
		}
	}
	log.Info("federation stream up")

	heartbeat := clk.NewTicker(cfg.heartbeat)
	defer heartbeat.Stop()
	localChanged, unsubCatalog := p.exports.catalog.Subscribe()
	defer unsubCatalog()
	bundleChanged, unsubTrust := p.exports.trust.Subscribe()
	defer unsubTrust()
	if p.updates == nil {
		p.updates = rate.NewLimiter(rate.Limit(cfg.limits.UpdatesPerSecond), cfg.limits.UpdateBurst)
	}
	limiter := p.updates

	// resend fires when a full set held back by its limit may go; nil
	// while none waits.
	var resend clock.Timer
	var resendC <-chan time.Time
	defer func() {
		if resend != nil {
			resend.Stop()
		}
	}()
	send := func() error {
		retry, err := p.sendUpdates(w)
		if err != nil || retry == 0 || resendC != nil {
			return err
		}
		resend = clk.NewTimer(retry)
		resendC = resend.C()
		return nil
	}
	if err := send(); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case reason := <-p.terminate:
			_ = w.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Terminate{Terminate: &fedv1.Terminate{Reason: reason}}})
			awaitClose(w, abort != nil, msgs, readErr, timeout)
			return fmt.Errorf("link terminated here: %s", reason)
		case err := <-readErr:
			return err
		case err := <-w.err:
			return err
		case <-timeout.C():
			return ErrHeartbeatTimeout
		case <-heartbeat.C():
			if since, stuck := w.stuck(); stuck && clk.Since(since) > cfg.heartbeatTimeout {
				return fmt.Errorf("a message to the peer has waited since %s to be sent: the peer does not read", since.Format(time.RFC3339))
			}
			if err := p.checkAcked(clk.Now(), cfg.heartbeatTimeout); err != nil {
				return err
			}
			if w.idle() {
				if err := w.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}}); err != nil {
					return err
				}
			}
		case <-localChanged:
			if err := send(); err != nil {
				return err
			}
		case <-bundleChanged:
			if err := send(); err != nil {
				return err
			}
		case <-resendC:
			resend, resendC = nil, nil
			if err := send(); err != nil {
				return err
			}
		case m := <-msgs:
			timeout.Reset(cfg.heartbeatTimeout)
			p.tracker.heard(clk.Now())
			if m.GetUpdate() != nil {
				if err := p.throttle(ctx, limiter); err != nil {
					return err
				}
			}
			reply, err := p.handle(ctx, m, cfg.limits, log)
			if err != nil {
				return err
			}
			if reply != nil {
				if err := w.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: reply}}); err != nil {
					return err
				}
			}
			if m.GetAck() != nil {
				if err := send(); err != nil {
					return err
				}
			}
		}
	}
}

// checkAcked ends the session when an update has waited for its answer
// longer than timeout since it was sent: until then nothing more of its
// type reaches the peer, while its status shows it connected. The time a
// large update takes to be sent does not count; a Send that does not
// complete has its own deadline. The next stream starts over from what
// the peer says it holds, after the dialling side's backoff.
func (p *peer) checkAcked(now time.Time, timeout time.Duration) error {
	for _, t := range resourceTypes {
		u := p.out[t].pending
		if u == nil {
			continue
		}
		if at := u.written.Load(); at != 0 && now.Sub(time.Unix(0, at)) > timeout {
			return fmt.Errorf("%w: the %s update of version %q (nonce %s) was sent at %s", ErrAckTimeout, t, u.version, u.nonce, time.Unix(0, at).UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// throttle holds the peer's next update back until the rate limit lets
// it through. The loop does not read meanwhile, so a peer that sends
// faster is slowed by flow control; its updates are applied, late, and
// never refused for their rate.
func (p *peer) throttle(ctx context.Context, limiter *rate.Limiter) error {
	now := p.clock.Now()
	d := limiter.ReserveN(now, 1).DelayFrom(now)
	if d <= 0 {
		return nil
	}
	t := p.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C():
		return nil
	}
}

// writer sends what the session loop queues, in order.
type writer struct {
	queue chan queued
	err   chan error
	clock clock.PassiveClock
	// sending is when the Send in progress began (UnixNano), 0 when the
	// writer waits for the queue.
	sending atomic.Int64
}

// queued is a message waiting for the writer.
type queued struct {
	m *fedv1.ExchangeMessage
	// written, if set, gets the time (UnixNano) m's Send returned.
	written *atomic.Int64
}

// send queues m; it never blocks.
func (w *writer) send(m *fedv1.ExchangeMessage) error { return w.sendTracked(m, nil) }

// sendTracked queues m, and has the writer store in written when it was
// sent.
func (w *writer) sendTracked(m *fedv1.ExchangeMessage, written *atomic.Int64) error {
	select {
	case w.queue <- queued{m: m, written: written}:
		return nil
	default:
		return fmt.Errorf("%d messages wait to be sent: the peer does not read", maxQueued)
	}
}

// idle reports whether nothing waits to be sent.
func (w *writer) idle() bool { return len(w.queue) == 0 && w.sending.Load() == 0 }

// stuck reports when the Send in progress began, if one is.
func (w *writer) stuck() (time.Time, bool) {
	n := w.sending.Load()
	return time.Unix(0, n), n != 0
}

// closeSend asks the writer to half-close the stream once everything
// queued before is sent, and to stop.
func (w *writer) closeSend() error { return w.send(nil) }

func (w *writer) run(ctx context.Context, st stream) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case q := <-w.queue:
			m := q.m
			if m == nil {
				if cs, ok := st.(interface{ CloseSend() error }); ok {
					_ = cs.CloseSend()
				}
				return errSendClosed
			}
			w.sending.Store(w.clock.Now().UnixNano())
			err := st.Send(m)
			w.sending.Store(0)
			if err != nil {
				return fmt.Errorf("send %s: %w", kindOf(m), err)
			}
			if q.written != nil {
				q.written.Store(w.clock.Now().UnixNano())
			}
		}
	}
}

// kindOf names a message's kind for errors.
func kindOf(m *fedv1.ExchangeMessage) string {
	switch k := m.GetKind().(type) {
	case *fedv1.ExchangeMessage_Open:
		return "open"
	case *fedv1.ExchangeMessage_Heartbeat:
		return "heartbeat"
	case *fedv1.ExchangeMessage_Ack:
		return "ack"
	case *fedv1.ExchangeMessage_Terminate:
		return "terminate"
	case *fedv1.ExchangeMessage_Update:
		return k.Update.GetTypeUrl() + " update"
	}
	return "message"
}

// awaitClose gives a Terminate the time to arrive, bounded by the
// heartbeat timeout: the writer sends it, and on the client side, where
// cancelling the stream at once could discard it, half-closes and waits
// for the peer to end the stream. A server returning from its handler
// flushes what it sent.
func awaitClose(w *writer, client bool, msgs <-chan *fedv1.ExchangeMessage, readErr <-chan error, timeout clock.Timer) {
	if w.closeSend() != nil {
		return
	}
	for {
		select {
		case <-msgs:
			// The peer's last words no longer matter.
		case <-w.err:
			if !client {
				return
			}
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
func (p *peer) handle(ctx context.Context, m *fedv1.ExchangeMessage, lim Limits, log *slog.Logger) (*fedv1.Ack, error) {
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
		if err := checkIdentifiers(u); err != nil {
			return nil, err
		}
		if !slices.Contains(resourceTypes, u.GetTypeUrl()) {
			// Refused without a trace in status: status is kept by type,
			// and a type the peer makes up must not grow it. The type
			// URL is the peer's, as long as its message allows; the
			// reason and the log show its start.
			a := nack(u, "", "", "unknown resource type %q", clip.String(u.GetTypeUrl(), maxTypeURLShown))
			log.Debug("refused an update of an unknown type from the peer", "reason", a.GetError().GetReason())
			return a, nil
		}
		a, err := p.receive(ctx, u, lim)
		if err != nil {
			return nil, err
		}
		if a.GetError() != nil {
			// Said once while it stands: a peer sending the same bad
			// update again and again does not fill the log.
			level := slog.LevelDebug
			if p.tracker.nackSent(u.GetTypeUrl(), a.GetError()) {
				level = slog.LevelWarn
			}
			log.Log(ctx, level, "refused an update from the peer", "type", u.GetTypeUrl(), "refusal", describeNACK(a.GetError()))
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
		log.Debug("ignoring an answer to no update in flight", "type", clip.String(a.GetTypeUrl(), maxTypeURLShown), "nonce", clip.String(a.GetNonce(), maxTypeURLShown))
		return
	}
	if a.GetError() != nil {
		log.Warn("the peer refused an update", "type", a.GetTypeUrl(), "refusal", describeNACK(a.GetError()))
	}
	p.tracker.acked(a.GetTypeUrl(), o.ackedVersion, o.lastNACK, len(o.acked))
}

// sendUpdates sends, per type, what brings the peer to this side's
// current exports, unless an update of that type is already in flight.
// A full set the peer has to wait for is left out; retry says when to
// call again, 0 when nothing waits.
func (p *peer) sendUpdates(w *writer) (retry time.Duration, err error) {
	now := p.clock.Now()
	for _, t := range resourceTypes {
		want, err := p.exports.desired(t, p.name)
		if err != nil {
			return 0, err
		}
		u, wait := p.out[t].next(want, now)
		if wait > 0 && (retry == 0 || wait < retry) {
			retry = wait
		}
		if u == nil {
			continue
		}
		if err := w.sendTracked(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: u}}, &p.out[t].pending.written); err != nil {
			return 0, err
		}
		p.tracker.sent(t, u.GetVersion())
	}
	return retry, nil
}

// maxIdentifierBytes bounds an update's type URL, nonce and version.
// This side's are at most a few dozen bytes.
const maxIdentifierBytes = 256

// checkIdentifiers ends the session on an update whose type URL, nonce
// or version is longer than any a federator makes. The answer echoes the
// type URL and the nonce, and up to maxQueued answers wait for a peer
// that does not read: echoed whole, they would hold maxQueued times the
// peer's message size.
func checkIdentifiers(u *fedv1.Update) error {
	for _, f := range []struct{ name, value string }{{"type URL", u.GetTypeUrl()}, {"nonce", u.GetNonce()}, {"version", u.GetVersion()}} {
		if len(f.value) > maxIdentifierBytes {
			return fmt.Errorf("%w: an update's %s is %d bytes, more than %d: %q", ErrProtocol, f.name, len(f.value), maxIdentifierBytes, clip.String(f.value, maxTypeURLShown))
		}
	}
	return nil
}

// maxTypeURLShown bounds how much of a type URL this side did not
// expect is shown in a refusal and in logs.
const maxTypeURLShown = 100

// receive validates an update of a known type as a whole and applies
// it, or applies nothing and names the first refused resource. An error
// is this side's own failure, not the update's: the session ends, and
// the next stream starts from the version this side still holds, so the
// update comes again.
func (p *peer) receive(ctx context.Context, u *fedv1.Update, lim Limits) (*fedv1.Ack, error) {
	held := p.heldVersion(u.GetTypeUrl())
	for _, r := range u.GetResources() {
		if n := proto.Size(r); n > lim.MaxResourceBytes {
			return nack(u, held, r.GetName(), "%d bytes, more than the limit of %d", n, lim.MaxResourceBytes), nil
		}
	}
	if u.GetTypeUrl() == TypeBundle {
		return p.receiveBundle(ctx, u)
	}
	return p.receiveServices(u, lim), nil
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

func (p *peer) receiveBundle(ctx context.Context, u *fedv1.Update) (*fedv1.Ack, error) {
	held := p.heldVersion(TypeBundle)
	if len(u.GetRemoved()) > 0 {
		return nack(u, held, u.GetRemoved()[0], "a peer's trust bundle cannot be removed, only replaced"), nil
	}
	if u.GetFullSet() && len(u.GetResources()) == 0 {
		return nack(u, held, p.td.Name(), "a full set without the peer's bundle"), nil
	}
	var bundles []*spiffebundle.Bundle
	for _, r := range u.GetResources() {
		if r.GetName() != p.td.Name() {
			return nack(u, held, r.GetName(), "only the bundle of the peer's trust domain %s is accepted", p.td.Name()), nil
		}
		b, err := parseBundle(r.GetTrustBundle(), p.td)
		if err != nil {
			return nack(u, held, r.GetName(), "%v", err), nil
		}
		bundles = append(bundles, b)
	}
	p.importMu.Lock()
	commit, refusal := p.in[TypeBundle].apply(u, 1)
	p.importMu.Unlock()
	if refusal != nil {
		return refusal, nil
	}
	for _, b := range bundles {
		// The trust store refuses what it would not hold (an older
		// sequence, no roots) before anything is stored.
		if err := p.exports.trust.SetPeer(b); err != nil {
			return nack(u, held, p.td.Name(), "%v", err), nil
		}
		if p.persistBundle != nil {
			// Held in memory but not stored: the version is not
			// committed, so the peer sends the bundle again on the next
			// stream, and storing it is tried again.
			if err := p.persistBundle(ctx, b); err != nil {
				return nil, fmt.Errorf("store the peer's trust bundle (sequence %d): %w", sequenceOf(b), err)
			}
		}
		p.tracker.bundle(b)
	}
	p.importMu.Lock()
	defer p.importMu.Unlock()
	commit()
	return &fedv1.Ack{TypeUrl: u.GetTypeUrl(), Nonce: u.GetNonce(), Version: p.in[TypeBundle].version}, nil
}

func sequenceOf(b *spiffebundle.Bundle) uint64 {
	seq, _ := b.SequenceNumber()
	return seq
}

// sortUpdate puts an update's lists in name order, so equal updates
// encode alike.
func sortUpdate(u *fedv1.Update) {
	slices.SortFunc(u.Resources, func(a, b *fedv1.Resource) int { return strings.Compare(a.GetName(), b.GetName()) })
	slices.Sort(u.Removed)
}
