package federation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

// pipe is one end of an in-memory exchange stream.
type pipe struct {
	in  chan *fedv1.ExchangeMessage
	out chan *fedv1.ExchangeMessage
	ctx context.Context
}

func (p pipe) Send(m *fedv1.ExchangeMessage) error {
	select {
	case p.out <- m:
		return nil
	case <-p.ctx.Done():
		return p.ctx.Err()
	}
}

func (p pipe) Recv() (*fedv1.ExchangeMessage, error) {
	select {
	case m, ok := <-p.in:
		if !ok {
			return nil, io.EOF
		}
		return m, nil
	case <-p.ctx.Done():
		return nil, p.ctx.Err()
	}
}

// rogue drives a peer's session by hand, as a misbehaving peer would.
type rogue struct {
	t      *testing.T
	p      *peer
	store  *catalog.Store
	remote pipe
	ended  chan error
	clock  *clocktesting.FakeClock
	// base and cfg make each session: connect runs a new one.
	base context.Context
	cfg  sessionConfig
}

// startRogue runs a session of this cluster ("local") with a peer named
// "evil" in trust domain evil.mesh, and returns the peer's end after the
// Open exchange.
func startRogue(t *testing.T, lim Limits) *rogue {
	t.Helper()
	return startRogueLog(t, lim, testLogger(t))
}

// startRogueHolding is startRogue over a stream that holds n messages
// from this side that the peer has not read.
func startRogueHolding(t *testing.T, n int) *rogue {
	t.Helper()
	r := newRogue(t, Limits{}, testLogger(t))
	r.connectHolding(n)
	return r
}

// startRogueLog is startRogue with this side logging to log.
func startRogueLog(t *testing.T, lim Limits, log *slog.Logger) *rogue {
	t.Helper()
	r := newRogue(t, lim, log)
	r.connect()
	return r
}

// newRogue makes this side's peer "evil" and its catalog, not connected.
func newRogue(t *testing.T, lim Limits, log *slog.Logger) *rogue {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	store := catalog.NewStore()
	other, err := catalog.NewSnapshot("other", []catalog.Service{echoService(1)})
	require.NoError(t, err)
	store.Set(other)
	mine := echoService(2)
	mine.Cluster = "here"
	localSnap, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{mine})
	require.NoError(t, err)
	store.Set(localSnap)
	local := trust.NewStore(spiffeid.RequireTrustDomainFromString("here.mesh"))
	c, err := ca.New(ctx, fake.NewClientset(), ca.Options{TrustDomain: local.LocalTrustDomain(), Namespace: testNS})
	require.NoError(t, err)
	local.SetLocal(c.Bundle().X509Authorities(), 1, 0)
	clk := clocktesting.NewFakeClock(time.Now())
	td := spiffeid.RequireTrustDomainFromString("evil.mesh")
	p := newPeer("evil", td, spiffeid.RequireFromPath(td, "/fed"), clk, newExports(store, local, []string{"gw.here:15443"}))
	r := &rogue{t: t, p: p, store: store, clock: clk, base: ctx,
		cfg: sessionConfig{clusterName: "here", heartbeat: time.Second, heartbeatTimeout: 3 * time.Second,
			limits: lim.withDefaults(), log: log}}
	return r
}

// connect runs a new session with the same peer, and returns after this
// side's Open.
func (r *rogue) connect() {
	r.t.Helper()
	r.connectHolding(16)
}

// connectHolding is connect with a stream that holds n messages from this
// side that the peer has not read; this side's Send blocks beyond.
func (r *rogue) connectHolding(n int) {
	r.t.Helper()
	ctx, cancel := context.WithCancel(r.base)
	r.t.Cleanup(cancel)
	a2b := make(chan *fedv1.ExchangeMessage, n)
	b2a := make(chan *fedv1.ExchangeMessage, 16)
	r.remote = pipe{in: a2b, out: b2a, ctx: ctx}
	ended := make(chan error, 1)
	r.ended = ended
	go func() { ended <- r.p.runSession(ctx, r.cfg, pipe{in: b2a, out: a2b, ctx: ctx}, cancel) }()
	require.NotNil(r.t, r.recv().GetOpen())
}

// hangUp ends the peer's side of the stream and waits for this side's
// session to end.
func (r *rogue) hangUp() error {
	close(r.remote.out)
	return <-r.ended
}

func (r *rogue) send(m *fedv1.ExchangeMessage) { require.NoError(r.t, r.remote.Send(m)) }

func (r *rogue) recv() *fedv1.ExchangeMessage {
	r.t.Helper()
	m, err := r.remote.Recv()
	require.NoError(r.t, err)
	return m
}

// open completes the handshake and acknowledges this side's first
// updates: its bundle and its one exported service.
func (r *rogue) open() {
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Open{Open: &fedv1.Open{ClusterName: "evil"}}})
	for range resourceTypes {
		u := r.recv().GetUpdate()
		require.NotNil(r.t, u)
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: u.Version}}})
	}
}

// update sends services as an update and returns the answer.
func (r *rogue) update(u *fedv1.Update) *fedv1.Ack {
	r.t.Helper()
	if u.TypeUrl == "" {
		u.TypeUrl = TypeService
	}
	if u.Nonce == "" {
		u.Nonce = "n1"
	}
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: u}})
	for {
		m := r.recv()
		if a := m.GetAck(); a != nil {
			return a
		}
	}
}

func evilService(ns, name string) *fedv1.Resource {
	return &fedv1.Resource{Name: ns + "/" + name, Body: &fedv1.Resource_Service{Service: &fedv1.ExportedService{
		Namespace: ns, Name: name, GatewayAddresses: []string{"gw.evil:15443"},
		Ports:     []*fedv1.ServicePort{{Name: "http", Port: 80, Protocol: "TCP"}},
		Endpoints: []*fedv1.LocalityEndpoints{{Region: "r", Ready: 1}},
	}}}
}

// versioned fills in the version the receiver will compute.
func versioned(u *fedv1.Update) *fedv1.Update {
	set := map[string]digest{}
	for _, r := range u.Resources {
		d, _, _ := digestOf(r)
		set[r.Name] = d
	}
	u.Version = setVersion(set)
	u.FullSet = true
	return u
}

func TestSessionRefusesBadUpdates(t *testing.T) {
	tooMany := &fedv1.Update{}
	for i := range 30 {
		tooMany.Resources = append(tooMany.Resources, evilService("demo", "svc-"+strings.Repeat("x", i%5)+string(rune('a'+i%26))))
	}
	huge := evilService("demo", "huge")
	huge.GetService().SpiffeIds = []string{"spiffe://evil.mesh/" + strings.Repeat("a", 20000)}
	otherTD := evilService("demo", "impostor")
	otherTD.GetService().SpiffeIds = []string{"spiffe://here.mesh/ns/demo/sa/admin"}
	misnamed := evilService("demo", "x")
	misnamed.Name = "demo/y"
	hereGW := evilService("demo", "loop")
	hereGW.GetService().GatewayAddresses = []string{"0.0.0.0:15443"}
	tests := []struct {
		name             string
		update           *fedv1.Update
		resource, reason string
	}{
		{"a service in kube-system", versioned(&fedv1.Update{Resources: []*fedv1.Resource{evilService("demo", "ok"), evilService("kube-system", "kube-dns")}}),
			"kube-system/kube-dns", "reserved"},
		{"more services than the limit", versioned(tooMany), "", "exceed this cluster's limit of 10"},
		{"an oversized resource", versioned(&fedv1.Update{Resources: []*fedv1.Resource{huge}}), "demo/huge", "more than the limit"},
		{"an identity in another trust domain", versioned(&fedv1.Update{Resources: []*fedv1.Resource{otherTD}}), "demo/impostor", "not in the peer's trust domain evil.mesh"},
		{"a gateway at the receiver's own host", versioned(&fedv1.Update{Resources: []*fedv1.Resource{hereGW}}), "demo/loop", "0.0.0.0 is not a unicast address"},
		{"a resource named for another service", versioned(&fedv1.Update{Resources: []*fedv1.Resource{misnamed}}), "demo/y", `is not "demo/x"`},
		{"a wrong version", &fedv1.Update{FullSet: true, Version: "feedface", Resources: []*fedv1.Resource{evilService("demo", "ok")}}, "", "version mismatch"},
		{"a removal of something never sent", &fedv1.Update{Removed: []string{"demo/ghost"}}, "demo/ghost", "never received"},
		{"a bundle for another trust domain", &fedv1.Update{TypeUrl: TypeBundle, FullSet: true,
			Resources: []*fedv1.Resource{{Name: "here.mesh", Body: &fedv1.Resource_TrustBundle{TrustBundle: &fedv1.TrustBundle{TrustDomain: "here.mesh"}}}}},
			"here.mesh", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := startRogue(t, Limits{MaxServices: 10})
			r.open()
			before := r.store.Get("other").Version()
			a := r.update(tc.update)
			require.NotNil(t, a.Error, "accepted")
			require.Equal(t, tc.resource, a.Error.Resource)
			require.Contains(t, a.Error.Reason, tc.reason)
			require.Equal(t, "", a.Version, "the refused update was applied")
			require.Zero(t, r.store.Get("evil").Len(), "something was imported")
			require.Equal(t, before, r.store.Get("other").Version(), "another peer's imports changed")
			require.Contains(t, r.p.tracker.Snapshot().LastNACKSent, tc.reason)

			// The peer can still send good data afterwards.
			good := r.update(versioned(&fedv1.Update{Nonce: "n2", Resources: []*fedv1.Resource{evilService("demo", "ok")}}))
			require.Nil(t, good.Error)
			require.Equal(t, 1, r.store.Get("evil").Len())
		})
	}
}

// syncBuffer is a bytes.Buffer a logger and a test can share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// A type URL this side does not know is refused, and leaves nothing
// behind: status was kept by the peer's type URL, so a peer sending
// updates of made-up types (each type URL as long as its message allowed,
// 32 MiB) grew this side's memory without bound, and each was logged
// twice and echoed whole in the refusal's reason.
func TestSessionRefusesUnknownTypesWithoutKeepingThem(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r := startRogueLog(t, Limits{UpdatesPerSecond: 1e6, UpdateBurst: 1e6}, log)
	r.open()
	for i := range 50 {
		typ := fmt.Sprintf("evil.Type%03d/%s", i, strings.Repeat("x", maxIdentifierBytes-14))
		a := r.update(&fedv1.Update{TypeUrl: typ, Nonce: fmt.Sprint(i), Version: "x"})
		require.NotNil(t, a.Error, "accepted")
		require.Equal(t, fmt.Sprint(i), a.Nonce)
		require.Contains(t, a.Error.Reason, "unknown resource type")
		require.Contains(t, a.Error.Reason, "more bytes)", "the cut is not marked")
		require.Less(t, len(a.Error.Reason), 150, "the reason echoes the type URL")
	}
	r.p.tracker.mu.Lock()
	kept := len(r.p.tracker.nacksSent)
	r.p.tracker.mu.Unlock()
	require.LessOrEqual(t, kept, len(resourceTypes), "refusals kept for made-up types")
	require.Empty(t, r.p.tracker.Snapshot().LastNACKSent)
	for line := range strings.Lines(logs.String()) {
		require.NotContains(t, line, strings.Repeat("x", maxTypeURLShown), "a log line echoes the type URL")
	}

	// The peer can still send good data afterwards.
	good := r.update(versioned(&fedv1.Update{Nonce: "good", Resources: []*fedv1.Resource{evilService("demo", "ok")}}))
	require.Nil(t, good.Error)
	require.Equal(t, 1, r.store.Get("evil").Len())
}

// What an answer echoes of an update is bounded: up to maxQueued answers
// wait for a peer that does not read, and each echoed its update's nonce
// and a removed name whole, up to the message size (32 MiB) each.
func TestSessionAnswersAreBounded(t *testing.T) {
	big := strings.Repeat("n", 1<<20)
	t.Run("a removed name", func(t *testing.T) {
		r := startRogue(t, Limits{})
		r.open()
		a := r.update(&fedv1.Update{Removed: []string{"demo/" + big}})
		require.NotNil(t, a.Error, "accepted")
		require.LessOrEqual(t, len(a.Error.Resource), maxReasonBytes)
		require.LessOrEqual(t, len(a.Error.Reason), maxReasonBytes)
	})
	for _, tc := range []struct {
		name   string
		update *fedv1.Update
	}{
		{"a nonce", &fedv1.Update{TypeUrl: TypeService, Nonce: big}},
		{"a type URL", &fedv1.Update{TypeUrl: big, Nonce: "1"}},
		{"a version", &fedv1.Update{TypeUrl: TypeService, Nonce: "1", Version: big}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startRogueLog(t, Limits{}, slog.New(slog.DiscardHandler))
			r.open()
			r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: tc.update}})
			var err error
			select {
			case err = <-r.ended:
			case m := <-r.remote.in:
				t.Fatalf("answered, echoing %d bytes, and went on", proto.Size(m))
			case <-time.After(10 * time.Second):
				t.Fatal("neither answered nor ended")
			}
			require.ErrorIs(t, err, ErrProtocol)
			require.Less(t, len(err.Error()), 512, "the error quotes the peer whole")
		})
	}
}

// A refusal is logged at Warn once while it stands, not once per update:
// a peer sending the same bad update again and again filled the log.
func TestSessionLogsARepeatedRefusalOnce(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r := startRogueLog(t, Limits{UpdatesPerSecond: 1e6, UpdateBurst: 1e6}, log)
	r.open()
	bad := func(nonce string) *fedv1.Update {
		return versioned(&fedv1.Update{Nonce: nonce, Resources: []*fedv1.Resource{evilService("kube-system", "kube-dns")}})
	}
	for i := range 20 {
		require.NotNil(t, r.update(bad(fmt.Sprint(i))).Error)
	}
	require.Equal(t, 1, strings.Count(logs.String(), "refused an update from the peer"))
	require.Nil(t, r.update(versioned(&fedv1.Update{Nonce: "ok", Resources: []*fedv1.Resource{evilService("demo", "ok")}})).Error)
	require.NotNil(t, r.update(bad("again")).Error)
	require.Equal(t, 2, strings.Count(logs.String(), "refused an update from the peer"), "said again once it no longer stood")
}

// Updates beyond the rate limit wait: the session stops reading until the
// limit lets the next one through, and applies it then. A refusal for the
// rate named no resource, so the sender held the change back until its
// set changed again, and it could be lost for good.
func TestSessionThrottlesAFloodOfUpdates(t *testing.T) {
	r := startRogue(t, Limits{UpdatesPerSecond: 1, UpdateBurst: 2})
	r.open()
	var set []*fedv1.Resource
	next := func(i int) *fedv1.Update {
		set = append(set, evilService("demo", fmt.Sprintf("svc-%d", i)))
		return versioned(&fedv1.Update{TypeUrl: TypeService, Nonce: fmt.Sprint(i), Resources: slices.Clone(set)})
	}
	for i := range 2 {
		require.Nil(t, r.update(next(i)).Error, "within the burst")
	}
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: next(2)}})
	select {
	case m := <-r.remote.in:
		t.Fatalf("answered beyond the rate while the clock stood still: %v", m)
	case <-time.After(200 * time.Millisecond):
	}
	var a *fedv1.Ack
	require.Eventually(t, func() bool {
		r.clock.Step(100 * time.Millisecond)
		for {
			select {
			case m := <-r.remote.in:
				if a = m.GetAck(); a != nil {
					return true
				}
			default:
				return false
			}
		}
	}, 10*time.Second, 10*time.Millisecond)
	require.Nil(t, a.Error, "an update beyond the rate is applied late, not refused")
	require.Equal(t, "2", a.Nonce)
	require.Equal(t, 3, r.store.Get("evil").Len())
}

// The update rate limit is the peer's, not a stream's: with a new
// limiter per stream, a peer refilled its burst by reconnecting, and had
// its updates applied as fast as it could reconnect.
func TestSessionRateLimitSurvivesReconnects(t *testing.T) {
	r := startRogue(t, Limits{UpdatesPerSecond: 1, UpdateBurst: 2})
	r.open()
	var set []*fedv1.Resource
	next := func(i int) *fedv1.Update {
		set = append(set, evilService("demo", fmt.Sprintf("svc-%d", i)))
		return versioned(&fedv1.Update{TypeUrl: TypeService, Nonce: fmt.Sprint(i), Resources: slices.Clone(set)})
	}
	for i := range 2 {
		require.Nil(t, r.update(next(i)).Error, "within the burst")
	}
	require.ErrorIs(t, r.hangUp(), io.EOF)

	r.connect()
	r.open()
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Update{Update: next(2)}})
	select {
	case m := <-r.remote.in:
		t.Fatalf("a new stream refilled the burst: answered beyond the rate while the clock stood still: %v", m)
	case <-time.After(200 * time.Millisecond):
	}
	r.clock.Step(time.Second)
	a := r.recv().GetAck()
	require.NotNil(t, a)
	require.Nil(t, a.Error, "an update beyond the rate is applied late, not refused")
	require.Equal(t, 3, r.store.Get("evil").Len())
}

// exportLocal makes this side export n services.
func (r *rogue) exportLocal(n int) {
	r.t.Helper()
	var svcs []catalog.Service
	for i := range n {
		s := echoService(1)
		s.Name, s.Cluster = fmt.Sprintf("svc-%d", i), "here"
		svcs = append(svcs, s)
	}
	snap, err := catalog.NewSnapshot(catalog.LocalSource, svcs)
	require.NoError(r.t, err)
	r.store.Set(snap)
}

// answerUpdates answers every update this side sends with answer, until
// none comes (or rounds messages were read), and counts the full sets of
// services.
func (r *rogue) answerUpdates(rounds int, answer func(u *fedv1.Update) *fedv1.Ack) (fullSets int) {
	r.t.Helper()
	r.sync()
	for range rounds {
		var u *fedv1.Update
		select {
		case m := <-r.remote.in:
			if u = m.GetUpdate(); u == nil {
				continue
			}
		case <-time.After(time.Second):
			// None came. (sync only saw the reply queued; the session's
			// writer goroutine sends it: a stalled machine can hold it a
			// few hundred milliseconds.)
			return fullSets
		}
		if u.TypeUrl == TypeService && u.FullSet {
			fullSets++
		}
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: answer(u)}})
		r.sync()
	}
	return fullSets
}

// sync returns once this side has handled every message the peer sent
// before, so that what it sends in return is queued: the peer sends a
// heartbeat at a new instant and waits until this side heard it.
func (r *rogue) sync() {
	r.t.Helper()
	r.clock.Step(time.Millisecond)
	now := r.clock.Now()
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}})
	eventually(r.t, "this side handled the peer's messages", func() bool { return !r.p.tracker.Snapshot().LastHeartbeat.Before(now) })
}

// advance moves the clock on by d, with heartbeats from the peer, so
// that the session does not time out.
func (r *rogue) advance(d time.Duration) {
	const step = 500 * time.Millisecond
	for ; d > 0; d -= step {
		// Once the session ended, Send fails; the caller sees it ended.
		_ = r.remote.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}})
		time.Sleep(5 * time.Millisecond)
		r.clock.Step(min(d, step))
	}
}

// advanceDraining is advance, reading (and dropping) what this side
// sends meanwhile.
func (r *rogue) advanceDraining(d time.Duration) {
	const step = 500 * time.Millisecond
	for ; d > 0; d -= step {
		_ = r.remote.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}})
		time.Sleep(5 * time.Millisecond)
		r.clock.Step(min(d, step))
		time.Sleep(5 * time.Millisecond)
		for drained := false; !drained; {
			select {
			case <-r.remote.in:
			default:
				drained = true
			}
		}
	}
}

func (r *rogue) sendOpen() {
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Open{Open: &fedv1.Open{ClusterName: "evil"}}})
}

// A refusal costs the peer a few bytes and could cost this side its whole
// set: a NACK naming no resource, with a version other than the one this
// side believed the peer held, had it send a full set, at once, every
// time (about 3,700 times the NACK's size with a few thousand services).
func TestSessionFullSetsAskedForByRefusalsAreBounded(t *testing.T) {
	t.Run("refusals naming no resource", func(t *testing.T) {
		r := startRogue(t, Limits{})
		r.exportLocal(100)
		r.sendOpen()
		full := r.answerUpdates(50, func(u *fedv1.Update) *fedv1.Ack {
			return &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: "bogus",
				Error: &fedv1.Error{Reason: "version mismatch: send a full set"}}
		})
		require.Equal(t, 1, full, "full sets sent for refusals of full sets")
	})
	t.Run("refusals naming a resource", func(t *testing.T) {
		// Each names another of the set: it is left out, and the rest
		// sent again as a full set, within the peer's share of them.
		r := startRogue(t, Limits{})
		r.exportLocal(100)
		r.sendOpen()
		refuse := func(u *fedv1.Update) *fedv1.Ack {
			a := &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce}
			if len(u.Resources) > 0 {
				a.Error = &fedv1.Error{Resource: u.Resources[0].Name, Reason: "no"}
			}
			return a
		}
		require.Equal(t, fullSetBurst, r.answerUpdates(50, refuse), "full sets while the clock stood still")
		r.advance(fullSetEvery)
		require.Equal(t, 1, r.answerUpdates(50, refuse), "full sets one interval later")
	})
	t.Run("new streams claiming to hold nothing", func(t *testing.T) {
		r := startRogue(t, Limits{})
		r.exportLocal(100)
		full := 0
		for i := range 3 * fullSetBurst {
			if i > 0 {
				require.ErrorIs(t, r.hangUp(), io.EOF)
				r.connect()
			}
			r.sendOpen()
			full += r.answerUpdates(10, func(u *fedv1.Update) *fedv1.Ack {
				return &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: u.Version}
			})
		}
		require.Equal(t, fullSetBurst, full, "full sets while the clock stood still")
		r.advance(fullSetEvery)
		require.Equal(t, 1, r.answerUpdates(50, func(u *fedv1.Update) *fedv1.Ack {
			return &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: u.Version}
		}), "the full set held back goes once the limit lets it")
	})
}

// A peer that sends heartbeats but never answers an update stalled this
// side's updates for ever (one per type is in flight), while its status
// said it was connected. An update unanswered for the heartbeat timeout
// now ends the session, and the Connected condition says why.
func TestSessionEndsWhenAnUpdateIsNotAcknowledged(t *testing.T) {
	r := startRogue(t, Limits{})
	r.sendOpen()
	for range resourceTypes {
		require.NotNil(t, r.recv().GetUpdate())
	}
	r.advance(2 * r.cfg.heartbeatTimeout)
	var err error
	select {
	case err = <-r.ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the session goes on with its updates unanswered")
	}
	require.ErrorIs(t, err, ErrAckTimeout)
	st := r.p.tracker.Snapshot()
	require.Equal(t, v1alpha1.StateDisconnected, st.State)
	connected := r.condition(v1alpha1.ConditionConnected)
	require.Equal(t, metav1.ConditionFalse, connected.Status)
	require.Contains(t, connected.Message, "did not acknowledge an update")
	require.Contains(t, connected.Message, TypeBundle)
}

// condition is the status condition typ as this side would write it now.
func (r *rogue) condition(typ string) *metav1.Condition {
	m := &Manager{}
	return meta.FindStatusCondition(m.peerStatus(&peerEntry{p: r.p}, r.clock.Now()).Conditions, typ)
}

// Before the peer answers, its status does not say it accepted: a peer
// that sent heartbeats and nothing else showed ExportsAccepted True, "the
// peer accepted the last update", and ImportsAccepted True, though it
// had acknowledged nothing and sent nothing.
func TestAcceptedConditionsAwaitTheFirstAnswer(t *testing.T) {
	r := startRogue(t, Limits{})
	r.sendOpen()
	var sent []*fedv1.Update
	for range resourceTypes {
		u := r.recv().GetUpdate()
		require.NotNil(t, u)
		sent = append(sent, u)
	}
	eventually(t, "connected", func() bool { return r.p.tracker.Snapshot().State == v1alpha1.StateConnected })
	require.Equal(t, metav1.ConditionTrue, r.condition(v1alpha1.ConditionConnected).Status)
	exports := r.condition(v1alpha1.ConditionExportsAccepted)
	require.Equal(t, metav1.ConditionUnknown, exports.Status, exports.Message)
	require.Equal(t, "AwaitingAcknowledgement", exports.Reason)
	imports := r.condition(v1alpha1.ConditionImportsAccepted)
	require.Equal(t, metav1.ConditionUnknown, imports.Status, imports.Message)
	require.Equal(t, "AwaitingUpdate", imports.Reason)

	// One type answered is not enough.
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: &fedv1.Ack{TypeUrl: sent[0].TypeUrl, Nonce: sent[0].Nonce, Version: sent[0].Version}}})
	require.Nil(t, r.update(versioned(&fedv1.Update{Resources: []*fedv1.Resource{evilService("demo", "ok")}})).Error)
	require.Equal(t, metav1.ConditionTrue, r.condition(v1alpha1.ConditionImportsAccepted).Status)
	require.Equal(t, metav1.ConditionUnknown, r.condition(v1alpha1.ConditionExportsAccepted).Status)

	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: &fedv1.Ack{TypeUrl: sent[1].TypeUrl, Nonce: sent[1].Nonce, Version: sent[1].Version}}})
	eventually(t, "ExportsAccepted True once every type is answered", func() bool {
		return r.condition(v1alpha1.ConditionExportsAccepted).Status == metav1.ConditionTrue
	})
}

// A peer that already holds what this side wants is sent nothing on a
// new stream; that counts as its acknowledgement, so that a restarted
// federator does not show its exports awaiting one until they change.
func TestAcceptedConditionsAfterAResumeWithoutResend(t *testing.T) {
	r := startRogue(t, Limits{})
	r.sendOpen()
	held := map[string]string{}
	for range resourceTypes {
		u := r.recv().GetUpdate()
		require.NotNil(t, u)
		held[u.TypeUrl] = u.Version
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: u.Version}}})
	}
	eventually(t, "exports accepted", func() bool {
		return r.condition(v1alpha1.ConditionExportsAccepted).Status == metav1.ConditionTrue
	})
	require.ErrorIs(t, r.hangUp(), io.EOF)

	// This side restarts: it knows nothing of what the peer holds.
	for _, typ := range resourceTypes {
		r.p.out[typ] = newOutbound(typ)
	}
	r.p.tracker = newTracker()
	r.connect()
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Open{Open: &fedv1.Open{ClusterName: "evil", AcknowledgedVersions: held}}})
	require.Zero(t, r.answerUpdates(10, func(u *fedv1.Update) *fedv1.Ack {
		return &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: u.Version}
	}), "resent what the peer holds")
	exports := r.condition(v1alpha1.ConditionExportsAccepted)
	require.Equal(t, metav1.ConditionTrue, exports.Status, exports.Message)
	require.Equal(t, 1, r.p.tracker.Snapshot().Exported)
}

// The acknowledgement deadline runs from when the update was sent, not
// queued: a large update that takes a while to reach a slow peer is not
// held against it (a Send that does not complete has its own deadline).
func TestAckDeadlineCountsFromTheSend(t *testing.T) {
	r := startRogueHolding(t, 0)
	r.sendOpen()
	for range resourceTypes {
		u := r.recv().GetUpdate()
		require.NotNil(t, u)
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Ack{Ack: &fedv1.Ack{TypeUrl: u.TypeUrl, Nonce: u.Nonce, Version: u.Version}}})
	}
	r.sync()
	timeout := r.cfg.heartbeatTimeout
	// A change: its update waits in Send while the peer does not read.
	r.exportLocal(3)
	r.advance(timeout - time.Second)
	u := r.recv().GetUpdate()
	require.NotNil(t, u)
	// Unanswered for less than the timeout since it was sent, longer
	// since it was queued.
	r.advanceDraining(timeout - time.Second)
	select {
	case err := <-r.ended:
		t.Fatalf("ended %s after the update was sent: %v", timeout-time.Second, err)
	default:
	}
	r.advanceDraining(2 * time.Second)
	select {
	case err := <-r.ended:
		require.ErrorIs(t, err, ErrAckTimeout)
	case <-time.After(10 * time.Second):
		t.Fatal("the session goes on with its update unanswered")
	}
}

func TestSessionEnds(t *testing.T) {
	t.Run("no Open first", func(t *testing.T) {
		r := startRogue(t, Limits{})
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}})
		require.ErrorIs(t, <-r.ended, ErrProtocol)
	})
	t.Run("Open for another cluster", func(t *testing.T) {
		r := startRogue(t, Limits{})
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Open{Open: &fedv1.Open{ClusterName: "someone-else"}}})
		err := <-r.ended
		require.ErrorIs(t, err, ErrProtocol)
		require.ErrorContains(t, err, `says it is cluster "someone-else"`)
	})
	t.Run("Terminate", func(t *testing.T) {
		// The link is over and the manager drops the peer's bundle:
		// status said Established, "both bundles are held", and showed
		// the bundle dropped.
		r := startRogue(t, Limits{})
		c, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: r.p.td, Namespace: testNS})
		require.NoError(t, err)
		r.p.tracker.bundle(spiffebundle.FromX509Authorities(r.p.td, c.Bundle().X509Authorities()))
		r.open()
		eventually(t, "connected", func() bool { return r.p.tracker.Snapshot().State == v1alpha1.StateConnected })
		m := &Manager{}
		require.NotNil(t, m.peerStatus(&peerEntry{p: r.p}, r.clock.Now()).Bundle)
		r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Terminate{Terminate: &fedv1.Terminate{Reason: "unlinked"}}})
		require.ErrorIs(t, <-r.ended, ErrTerminated)
		require.Equal(t, v1alpha1.StateFailed, r.p.tracker.Snapshot().State)
		st := m.peerStatus(&peerEntry{p: r.p}, r.clock.Now())
		require.Nil(t, st.Bundle, "status shows the bundle dropped")
		established := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionEstablished)
		require.Equal(t, metav1.ConditionFalse, established.Status, established.Message)
		require.Equal(t, "Terminated", established.Reason)
		require.Contains(t, established.Message, "unlinked")
	})
	t.Run("silence beyond the heartbeat timeout", func(t *testing.T) {
		r := startRogue(t, Limits{})
		r.open()
		require.Eventually(t, func() bool {
			r.clock.Step(time.Second)
			select {
			case err := <-r.ended:
				require.ErrorIs(t, err, ErrHeartbeatTimeout)
				return true
			default:
				// drain heartbeats so the session never blocks sending
				for {
					select {
					case <-r.remote.in:
						continue
					default:
					}
					break
				}
				return false
			}
		}, 10*time.Second, 10*time.Millisecond)
		st := r.p.tracker.Snapshot()
		require.Equal(t, v1alpha1.StateDisconnected, st.State)
		require.Contains(t, st.Reason, "heartbeat timeout")
	})
	t.Run("a peer that does not read", func(t *testing.T) {
		// It keeps sending heartbeats, so it is not silent; what this
		// side sends piles up until a Send has waited longer than the
		// heartbeat timeout.
		r := startRogue(t, Limits{})
		r.open()
		var err error
		for deadline := time.Now().Add(20 * time.Second); err == nil && time.Now().Before(deadline); {
			select {
			case err = <-r.ended:
			case <-time.After(5 * time.Millisecond):
				// Once the session ended, Send fails: the next turn
				// sees it ended.
				_ = r.remote.Send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Heartbeat{Heartbeat: &fedv1.Heartbeat{}}})
				r.clock.Step(500 * time.Millisecond)
			}
		}
		require.ErrorContains(t, err, "the peer does not read")
		require.Contains(t, r.p.tracker.Snapshot().Reason, "the peer does not read")
	})
}

func TestStalenessKeepsDrainsThenRemoves(t *testing.T) {
	r := startRogue(t, Limits{})
	r.open()
	require.Nil(t, r.update(versioned(&fedv1.Update{Resources: []*fedv1.Resource{evilService("demo", "ok")}})).Error)
	r.send(&fedv1.ExchangeMessage{Kind: &fedv1.ExchangeMessage_Terminate{Terminate: &fedv1.Terminate{}}})
	<-r.ended
	// A session that merely drops (not terminates) leaves the peer
	// Disconnected; emulate it.
	lost := r.clock.Now()
	r.p.tracker.disconnected(lost, errors.New("connection reset"))
	keep, drain := 5*time.Minute, time.Minute

	r.p.age(lost.Add(keep-time.Second), keep, drain)
	svc, _ := r.store.Get("evil").Get(catalog.ServiceKey{Namespace: "demo", Name: "ok"})
	require.Equal(t, 1, svc.ReadyEndpoints(), "drained before keepFor")

	r.p.age(lost.Add(keep), keep, drain)
	svc, _ = r.store.Get("evil").Get(catalog.ServiceKey{Namespace: "demo", Name: "ok"})
	require.Equal(t, 0, svc.ReadyEndpoints(), "not drained after keepFor")
	require.Equal(t, 1, svc.Endpoints[0].NotReady)

	r.p.age(lost.Add(keep+drain), keep, drain)
	require.NotContains(t, r.store.Sources(), "evil", "not removed after keepFor + drainFor")
	require.Equal(t, "", r.p.heldVersion(TypeService), "a removed import still claims a version")
}

// dialAs opens a federation connection to c presenting svid.
func dialAs(t *testing.T, c *cluster, svid x509svid.Source) fedv1.FederationServiceClient {
	t.Helper()
	cfg := tlsconfig.MTLSClientConfig(svid, x509bundle.FromX509Authorities(c.trust.LocalTrustDomain(), c.ca.Bundle().X509Authorities()), tlsconfig.AuthorizeAny())
	conn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return fedv1.NewFederationServiceClient(conn)
}

func exchangeError(t *testing.T, client fedv1.FederationServiceClient) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	st, err := client.Exchange(ctx)
	if err != nil {
		return err
	}
	_, err = st.Recv()
	return err
}

func TestExchangeAuthorizesThePeer(t *testing.T) {
	a := newCluster(t, "a", nil)
	b := newCluster(t, "b", nil)
	link(t, a, b)
	eventually(t, "linked", func() bool { return a.status("b").State == v1alpha1.StateConnected })
	stranger := newCluster(t, "stranger", nil)

	t.Run("a federator of an unlinked trust domain", func(t *testing.T) {
		err := exchangeError(t, dialAs(t, a, stranger.self))
		require.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
		require.Contains(t, status.Convert(err).Message(), "does not verify against any linked peer's bundle")
	})
	t.Run("a workload of the peer's trust domain that is not its federator", func(t *testing.T) {
		workload, err := ca.NewSelfSource(b.ca.Authority, spiffeid.RequireFromString("spiffe://b.mesh/ns/demo/sa/client"), nil)
		require.NoError(t, err)
		err = exchangeError(t, dialAs(t, a, workload))
		require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
		require.Contains(t, status.Convert(err).Message(), "no FederationPeer expects federator spiffe://b.mesh/ns/demo/sa/client")
	})
	t.Run("an oversized message", func(t *testing.T) {
		big := newCluster(t, "big", func(c *Config) { c.Limits.MaxMessageBytes = 1 << 10 })
		link(t, big, b)
		eventually(t, "linked", func() bool { return big.status("b").State == v1alpha1.StateConnected })
		var many []catalog.Service
		for i := range 50 {
			s := echoService(1)
			s.Name = "svc-" + strings.Repeat("z", i)
			many = append(many, s)
		}
		b.export(t, many...)
		eventually(t, "big drops the stream and says why", func() bool {
			return strings.Contains(big.status("b").Reason, "larger than max") || strings.Contains(b.status("big").Reason, "larger than max")
		})
		require.Zero(t, len(big.imported("b")))
	})
}

func TestEstablishRefuses(t *testing.T) {
	a := newCluster(t, "a", nil)
	j := newCluster(t, "j", nil)
	newToken := func(opts TokenOptions) Token {
		opts.Namespace, opts.Addresses = testNS, []string{a.addr}
		if opts.Peer == "" {
			opts.Peer = "j"
		}
		tok, err := CreateToken(t.Context(), a.kube, opts)
		require.NoError(t, err)
		return tok
	}
	tests := []struct {
		name   string
		token  func() Token
		svid   func() x509svid.Source
		reason string
	}{
		{"an unknown token", func() Token { tok := newToken(TokenOptions{}); tok.ID = "0123456789abcdef"; return tok }, nil, "unknown or already used"},
		{"a tampered secret", func() Token {
			tok := newToken(TokenOptions{})
			tok.Secret = strings.Repeat("A", len(tok.Secret))
			return tok
		}, nil, "secret does not match"},
		{"a token for another cluster", func() Token { return newToken(TokenOptions{Peer: "k"}) }, nil, `created for cluster "k", not "j"`},
		{"a bundle for a trust domain the token did not name", func() Token { return newToken(TokenOptions{PeerTrustDomain: "other.mesh"}) }, nil,
			`bundle for trust domain "j.mesh"; the token was created for "other.mesh"`},
		{"a client certificate that is not the claimed federator", func() Token { return newToken(TokenOptions{}) }, func() x509svid.Source {
			s, err := ca.NewSelfSource(j.ca.Authority, spiffeid.RequireFromString("spiffe://j.mesh/ns/demo/sa/app"), nil)
			require.NoError(t, err)
			return s
		}, "the client certificate is spiffe://j.mesh/ns/demo/sa/app"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok := tc.token()
			svid := x509svid.Source(j.self)
			if tc.svid != nil {
				svid = tc.svid()
			}
			conn, err := grpc.NewClient(a.addr, grpc.WithTransportCredentials(credentials.NewTLS(
				tlsconfig.MTLSClientConfig(svid, x509bundle.FromX509Authorities(a.trust.LocalTrustDomain(), tok.RootCertificates()),
					tlsconfig.AuthorizeID(spiffeid.RequireFromString(tok.FederatorID))))))
			require.NoError(t, err)
			defer conn.Close()
			local, err := j.trust.GetBundleForTrustDomain(j.trust.LocalTrustDomain())
			require.NoError(t, err)
			_, err = fedv1.NewFederationServiceClient(conn).Establish(t.Context(), &fedv1.EstablishRequest{
				Secret: tok.Secret, TokenId: tok.ID, ClusterName: "j", TrustBundle: bundleResource(local).GetTrustBundle(),
				FederatorId: j.cfg.FederatorID.String(),
			})
			require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
			require.Contains(t, status.Convert(err).Message(), tc.reason)
			_, err = a.dyn.Resource(v1alpha1.Resource).Get(t.Context(), "j", metav1.GetOptions{})
			require.Error(t, err, "a refused join created a FederationPeer")
		})
	}
	t.Run("an expired token", func(t *testing.T) {
		tok := newToken(TokenOptions{TTL: time.Hour, Now: time.Now().Add(-2 * time.Hour)})
		_, err := j.manager.establish(t.Context(), tok)
		require.ErrorContains(t, err, "the peering token expired at")
		require.True(t, isPermanent(err))
	})
}

// sessionSide is one federator's side of a link, without gRPC: its
// catalog exports services to the peer, and p is its peer object.
type sessionSide struct {
	store *catalog.Store
	p     *peer
}

func newSessionSide(t *testing.T, name, peerName string, services int) *sessionSide {
	t.Helper()
	store := catalog.NewStore()
	var svcs []catalog.Service
	for i := range services {
		s := echoService(1)
		s.Name, s.Cluster = fmt.Sprintf("svc-%d", i), name
		svcs = append(svcs, s)
	}
	snap, err := catalog.NewSnapshot(catalog.LocalSource, svcs)
	require.NoError(t, err)
	store.Set(snap)
	local := trust.NewStore(spiffeid.RequireTrustDomainFromString(name + ".mesh"))
	c, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: local.LocalTrustDomain(), Namespace: testNS})
	require.NoError(t, err)
	local.SetLocal(c.Bundle().X509Authorities(), 1, 0)
	td := spiffeid.RequireTrustDomainFromString(peerName + ".mesh")
	p := newPeer(peerName, td, spiffeid.RequireFromPath(td, "/fed"), clock.RealClock{}, newExports(store, local, []string{"gw." + name + ":15443"}))
	return &sessionSide{store: store, p: p}
}

// Both sides send their sets at once over a stream that holds nothing
// (an unbuffered pipe: a flow-control window that is always full). Each
// side's reader must keep taking the other's messages while its own
// sends wait. When the session loop sent itself, each blocked in Send
// while its reader waited to hand over the other's update: the link hung
// with both sides connected (found with 20,000 services a side over
// gRPC, where the window is 16 MiB).
func TestSessionsSendingAtOnce(t *testing.T) {
	a, b := newSessionSide(t, "a", "b", 50), newSessionSide(t, "b", "a", 50)
	cancel, endedA, endedB := connectSides(t, a, b)
	eventually(t, "each side imports the other's 50 services", func() bool {
		return a.store.Get("b").Len() == 50 && b.store.Get("a").Len() == 50
	})
	// The last acknowledgements may still be on their way.
	eventually(t, "every update sent was acknowledged, both sides connected", func() bool {
		for _, s := range []*sessionSide{a, b} {
			st := s.p.tracker.Snapshot()
			if st.State != v1alpha1.StateConnected || !maps.Equal(st.Sent, st.Acknowledged) {
				return false
			}
		}
		return true
	})
	cancel()
	require.ErrorIs(t, <-endedA, context.Canceled)
	require.ErrorIs(t, <-endedB, context.Canceled)
}

// connectSides runs a session between a and b over unbuffered pipes; the
// first to end ends the other. Each side's end comes on its channel.
func connectSides(t *testing.T, a, b *sessionSide) (cancel context.CancelFunc, endedA, endedB <-chan error) {
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	a2b, b2a := make(chan *fedv1.ExchangeMessage), make(chan *fedv1.ExchangeMessage)
	cfg := func(name string) sessionConfig {
		return sessionConfig{clusterName: name, heartbeat: 50 * time.Millisecond, heartbeatTimeout: 10 * time.Second,
			limits: Limits{}.withDefaults(), log: testLogger(t).With("cluster", name)}
	}
	ea, eb := make(chan error, 1), make(chan error, 1)
	go func() { ea <- a.p.runSession(ctx, cfg(b.p.name), pipe{in: b2a, out: a2b, ctx: ctx}, cancel) }()
	go func() { eb <- b.p.runSession(ctx, cfg(a.p.name), pipe{in: a2b, out: b2a, ctx: ctx}, cancel) }()
	return cancel, ea, eb
}

// A bundle this side cannot store is not acknowledged: the session ends,
// and the next stream brings it again. When the failure was answered
// with a NACK naming the bundle, the sender set the bundle aside until
// its content changed, and a rotated root never reached the peer's
// stored copy (nor, after a restart, its trust).
func TestPeerBundleStoredAfterAFailedWrite(t *testing.T) {
	a, b := newSessionSide(t, "a", "b", 1), newSessionSide(t, "b", "a", 1)
	var stored atomic.Int32
	var failed atomic.Bool
	b.p.persistBundle = func(context.Context, *spiffebundle.Bundle) error {
		if failed.CompareAndSwap(false, true) {
			return errors.New(`configmaps "isthmus-peer-a" is forbidden: injected`)
		}
		stored.Add(1)
		return nil
	}
	_, endedA, endedB := connectSides(t, a, b)
	err := <-endedB
	require.ErrorContains(t, err, "store the peer's trust bundle")
	require.ErrorContains(t, err, "injected")
	<-endedA
	require.Empty(t, b.p.heldVersion(TypeBundle), "a bundle not stored was acknowledged")
	require.Contains(t, b.p.tracker.Snapshot().Reason, "store the peer's trust bundle")

	cancel, endedA, endedB := connectSides(t, a, b)
	eventually(t, "the next stream stores the bundle", func() bool {
		return stored.Load() == 1 && b.p.heldVersion(TypeBundle) != "" && b.store.Get("a").Len() == 1
	})
	eventually(t, "a's updates acknowledged", func() bool {
		st := a.p.tracker.Snapshot()
		return maps.Equal(st.Sent, st.Acknowledged)
	})
	cancel()
	<-endedA
	<-endedB
}
