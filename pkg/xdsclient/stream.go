package xdsclient

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	"k8s.io/utils/clock"
)

// session is one ADS stream. A reader goroutine only receives; everything
// else happens in the session's select loop on Run's goroutine, which owns
// the client's state and serializes every send: it decides on a response,
// then sends the ACK or NACK and any subscription change. Every blocking
// call is bound to the stream's context, a child of Run's.
type session struct {
	c        *Client
	stream   grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	nodeSent bool
	// nonce is the last response nonce per type on this stream; a request
	// must carry it or the server takes it for a stale one.
	nonce map[string]string
	// names is the subscription sent per type on this stream (nil for a
	// wildcard); a type is absent until its first request.
	names map[string][]string
	// rejected counts, per type, how many times in a row the same version
	// was NACKed. A server that answers a NACK by sending the same
	// version again (go-control-plane's snapshot cache does) would
	// otherwise loop with the client as fast as the network allows: the
	// repeated NACKs are sent after a growing delay instead.
	rejected map[string]rejection
	// deferred holds those delayed NACKs, by type; timer fires for the
	// earliest.
	deferred map[string]deferredNACK
	timer    clock.Timer
}

type rejection struct {
	version string
	repeats int
}

type deferredNACK struct {
	req *discoveryv3.DiscoveryRequest
	due time.Time
}

// session dials, opens the ADS stream, subscribes, and handles responses
// until the stream fails or ctx ends. received reports whether any
// response arrived.
func (c *Client) session(ctx context.Context) (received bool, err error) {
	conn, err := grpc.NewClient(c.cfg.Server, c.dialOpts...)
	if err != nil {
		return false, fmt.Errorf("dial %s: %w", c.cfg.Server, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return false, fmt.Errorf("open ADS stream to %s: %w", c.cfg.Server, err)
	}
	c.stats.streams.Add(1)
	c.stats.connected.Store(true)
	c.log.Info("xDS stream open", "versions", c.versions)

	s := &session{
		c: c, stream: stream,
		nonce: map[string]string{}, names: map[string][]string{},
		rejected: map[string]rejection{}, deferred: map[string]deferredNACK{},
	}
	defer s.stopTimer()
	resps := make(chan *discoveryv3.DiscoveryResponse)
	recvErr := make(chan error, 1)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		s.receive(ctx, resps, recvErr)
	}()
	// The reader ends once the stream's context is cancelled.
	defer func() {
		cancel()
		<-readerDone
	}()

	if err := s.subscribe(); err != nil {
		return false, err
	}
	for {
		var due <-chan time.Time
		if s.timer != nil {
			due = s.timer.C()
		}
		select {
		case resp := <-resps:
			received = true
			if err := s.handle(resp); err != nil {
				return received, err
			}
		case <-due:
			s.timer = nil
			if err := s.sendDeferred(); err != nil {
				return received, err
			}
		case err := <-recvErr:
			return received, fmt.Errorf("receive: %w", err)
		case <-ctx.Done():
			return received, context.Cause(ctx)
		}
	}
}

// receive is the session's reader goroutine.
func (s *session) receive(ctx context.Context, out chan<- *discoveryv3.DiscoveryResponse, errc chan<- error) {
	for {
		resp, err := s.stream.Recv()
		if err != nil {
			errc <- err
			return
		}
		select {
		case out <- resp:
		case <-ctx.Done():
			return
		}
	}
}

// subscribe sends the stream's first requests: LDS and CDS as wildcards,
// then EDS for the clusters accepted so far and SDS for ROOTCA, each with
// the version
// accepted last so a server whose configuration did not change sends the
// same version again and nothing is republished.
func (s *session) subscribe() error {
	for _, t := range s.c.cfg.Types {
		names, wildcard := s.c.subscription(t)
		if !wildcard && len(names) == 0 {
			// An empty list in a first request would be a wildcard.
			continue
		}
		if err := s.send(&discoveryv3.DiscoveryRequest{
			TypeUrl: t, VersionInfo: s.c.versions[t], ResourceNames: names,
		}); err != nil {
			return err
		}
		s.names[t] = names
	}
	return nil
}

// subscription is what to ask for of type t given the accepted state:
// everything (wildcard), or the names other resources refer to.
func (c *Client) subscription(t string) (names []string, wildcard bool) {
	switch t {
	case TypeClusterLoadAssignment:
		return c.acc.edsNames(), false
	case TypeRouteConfiguration:
		return c.acc.rdsNames(), false
	case TypeSecret:
		return []string{RootCASecretName}, false
	default:
		return nil, true
	}
}

func (s *session) send(req *discoveryv3.DiscoveryRequest) error {
	if !s.nodeSent {
		req.Node = s.c.node
	}
	if err := s.stream.Send(req); err != nil {
		return fmt.Errorf("send %s request: %w", req.GetTypeUrl(), err)
	}
	s.nodeSent = true
	return nil
}

// handle decides on one response: NACK it and keep everything as it was,
// or accept it, publish the config if it is now consistent and new, ACK
// it, and update the subscriptions that depend on it.
func (s *session) handle(resp *discoveryv3.DiscoveryResponse) error {
	c := s.c
	t := resp.GetTypeUrl()
	log := c.log.With("type", t, "version", resp.GetVersionInfo(), "nonce", resp.GetNonce())
	if _, ok := s.names[t]; !ok {
		log.Debug("ignoring a response for a type not subscribed")
		return nil
	}
	s.nonce[t] = resp.GetNonce()

	// A newer response supersedes a NACK still waiting to be sent.
	if _, ok := s.deferred[t]; ok {
		delete(s.deferred, t)
		s.armTimer()
	}
	cfg, out, err := c.accept(t, resp.GetResources(), resp.GetVersionInfo(), s.names[t])
	if err != nil {
		return s.nack(resp, err, log)
	}
	delete(s.rejected, t)
	switch out {
	case incomplete:
		log.Debug("accepted; config not consistent yet")
	case unchanged:
		// A resend after a reconnect, or a version of one type whose
		// content did not change: nothing for the proxy to do.
		log.Debug("accepted; config unchanged")
	case published:
		log.Info("config updated", "listeners", len(cfg.Listeners), "clusters", len(cfg.Clusters),
			"trust_domains", trustDomainNames(cfg.Bundles))
	}
	// Published before the ACK: a server that has seen the ACK may rely on
	// the proxy using the config.
	if err := s.send(&discoveryv3.DiscoveryRequest{
		TypeUrl: t, VersionInfo: resp.GetVersionInfo(), ResourceNames: s.names[t], ResponseNonce: resp.GetNonce(),
	}); err != nil {
		return err
	}
	return s.resubscribeDependents(t)
}

// nack rejects resp. The first NACK of a version goes at once; when the
// server sends the same version again, each further NACK waits longer
// (the reconnect backoff's schedule) so the two never spin.
func (s *session) nack(resp *discoveryv3.DiscoveryResponse, err error, log *slog.Logger) error {
	c, t := s.c, resp.GetTypeUrl()
	msg := nackMessage(err)
	c.stats.rejected.Add(1)
	c.stats.setLastNACK(msg)
	req := &discoveryv3.DiscoveryRequest{
		TypeUrl: t, VersionInfo: c.versions[t], ResourceNames: s.names[t], ResponseNonce: resp.GetNonce(),
		ErrorDetail: &statuspb.Status{Code: int32(codes.InvalidArgument), Message: msg},
	}
	r, again := s.rejected[t]
	if again && r.version == resp.GetVersionInfo() {
		r.repeats++
	} else {
		r = rejection{version: resp.GetVersionInfo()}
	}
	s.rejected[t] = r
	if r.repeats == 0 {
		log.Warn("NACK: keeping the previous config", "reason", msg)
		return s.send(req)
	}
	delay := backoffDelay(c.cfg.BackoffMin, c.cfg.BackoffMax, r.repeats-1, rand.Int64N)
	log.Debug("the same version again: NACK deferred", "repeats", r.repeats, "delay", delay)
	s.deferred[t] = deferredNACK{req: req, due: c.cfg.Clock.Now().Add(delay)}
	s.armTimer()
	return nil
}

// sendDeferred sends the deferred NACKs that are due and rearms the timer.
func (s *session) sendDeferred() error {
	now := s.c.cfg.Clock.Now()
	for _, t := range slices.Sorted(maps.Keys(s.deferred)) {
		if d := s.deferred[t]; !d.due.After(now) {
			delete(s.deferred, t)
			if err := s.send(d.req); err != nil {
				return err
			}
		}
	}
	s.armTimer()
	return nil
}

// armTimer sets the timer for the earliest deferred NACK.
func (s *session) armTimer() {
	s.stopTimer()
	var first time.Time
	for _, d := range s.deferred {
		if first.IsZero() || d.due.Before(first) {
			first = d.due
		}
	}
	if !first.IsZero() {
		s.timer = s.c.cfg.Clock.NewTimer(first.Sub(s.c.cfg.Clock.Now()))
	}
}

func (s *session) stopTimer() {
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
}

// dependents maps a type to the type whose names it decides: EDS names
// come from the accepted clusters, RDS names from the accepted listeners.
var dependents = map[string]string{
	TypeCluster:  TypeClusterLoadAssignment,
	TypeListener: TypeRouteConfiguration,
}

// resubscribeDependents follows a CDS change with the EDS subscription for
// the clusters now known, and an LDS change with the RDS subscription for
// the route configurations the listeners name.
func (s *session) resubscribeDependents(t string) error {
	dep, ok := dependents[t]
	if !ok || !slices.Contains(s.c.cfg.Types, dep) {
		return nil
	}
	names, _ := s.c.subscription(dep)
	old, sent := s.names[dep]
	if slices.Equal(names, old) || (!sent && len(names) == 0) {
		return nil
	}
	if names == nil {
		names = []string{} // unsubscribe from all, not a wildcard: the stream already named resources
	}
	req := &discoveryv3.DiscoveryRequest{
		TypeUrl: dep, VersionInfo: s.c.versions[dep], ResourceNames: names, ResponseNonce: s.nonce[dep],
	}
	// A deferred NACK answers the same nonce: it goes now, with the new
	// names, rather than after them as a stale request.
	if d, ok := s.deferred[dep]; ok {
		req.ErrorDetail = d.req.GetErrorDetail()
		delete(s.deferred, dep)
		s.armTimer()
	}
	if err := s.send(req); err != nil {
		return err
	}
	s.names[dep] = names
	return nil
}

// outcome is what accepting a response led to.
type outcome int

const (
	// incomplete: accepted, and the config is not consistent yet.
	incomplete outcome = iota
	// unchanged: accepted, and the consistent config routes and trusts as
	// the one published.
	unchanged
	// published: accepted, and the config it completes is now Current.
	published
)

// accept is the part of handling a response of type t that does not
// touch the stream: NACK it (the error) and keep everything as it was, or
// make the state it leads to the accepted one and publish the config it
// completes if that is new. subscribed is this stream's subscription for
// t.
func (c *Client) accept(t string, resources []*anypb.Any, version string, subscribed []string) (*Config, outcome, error) {
	next, cfg, changed, err := c.evaluate(t, resources, version, subscribed)
	if err != nil {
		return nil, 0, err
	}
	c.versions[t] = version
	c.stats.accept(c.versions)
	switch {
	case cfg == nil:
		c.acc = next
		return nil, incomplete, nil
	case !changed:
		c.acc = next.clean()
		return c.Current(), unchanged, nil
	}
	c.acc = next.clean()
	c.publish(cfg)
	return cfg, published, nil
}

// evaluate is the pure part of handling a response of type t: the state
// it leads to and the Config to publish (nil while inconsistent), with
// whether that routes or trusts differently from the one published
// (Check runs only then: the published one passed it), or the reason to
// NACK. subscribed is this stream's subscription for t.
func (c *Client) evaluate(t string, resources []*anypb.Any, version string, subscribed []string) (next *state, cfg *Config, changed bool, err error) {
	next, err = c.acc.apply(t, resources)
	if err != nil {
		return nil, nil, false, err
	}
	switch t {
	case TypeClusterLoadAssignment:
		next = next.keepAssignments(subscribed)
	case TypeCluster:
		next = next.keepAssignments(next.edsNames())
	case TypeRouteConfiguration:
		next = next.keepRoutes(subscribed)
	case TypeListener:
		next = next.keepRoutes(next.rdsNames())
	}
	if !next.complete() {
		return next, nil, false, nil
	}
	versions := maps.Clone(c.versions)
	versions[t] = version
	cfg = next.config(versions)
	if cur := c.Current(); cur != nil && next.sameContent(cur, cfg) {
		return next, cfg, false, nil
	}
	if c.cfg.Check != nil {
		if err := c.cfg.Check(cfg); err != nil {
			return nil, nil, false, fmt.Errorf("the config this response completes is refused: %w", err)
		}
	}
	return next, cfg, true, nil
}
