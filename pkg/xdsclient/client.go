package xdsclient

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"k8s.io/utils/clock"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
)

// Defaults for the zero values of ClientConfig.
const (
	DefaultBackoffMin       = 500 * time.Millisecond
	DefaultBackoffMax       = 30 * time.Second
	DefaultDialTimeout      = 10 * time.Second
	DefaultKeepaliveTime    = 5 * time.Minute
	DefaultKeepaliveTimeout = 20 * time.Second
	DefaultMaxRecvMsgSize   = 16 << 20
)

// GatewayTypes are the resource types the east-west gateway subscribes
// to, in the order the client subscribes: LDS, CDS, then EDS for the
// clusters CDS names, and SDS for the ROOTCA Secret (the trust bundles).
func GatewayTypes() []string {
	return []string{TypeListener, TypeCluster, TypeClusterLoadAssignment, TypeSecret}
}

// routingTypes are the types every Config is assembled from; a client
// must subscribe to all of them.
var routingTypes = []string{TypeListener, TypeCluster, TypeClusterLoadAssignment}

// ClientConfig configures a Client.
type ClientConfig struct {
	// Server is the federator's xDS address, "host:port": 15012 with TLS,
	// 15010 plaintext (tests only). Required.
	Server string
	// TLS is mutual TLS with SPIFFE identities. Exactly one of TLS and
	// Plaintext must be set.
	TLS *TLSConfig
	// Plaintext dials without TLS: tests only.
	Plaintext bool
	// Node identifies the proxy (GatewayNode for the gateway, SidecarNode
	// for a sidecar). Node.ID is required. Its Role decides the subset of
	// xDS the client accepts: RoleGateway or RoleSidecar.
	Node Node
	// Types are the resource types to subscribe to, in order; nil means
	// TypesFor(Node.Role()). For the gateway, Listener, Cluster and
	// ClusterLoadAssignment are required and Secret (the ROOTCA trust
	// bundles) is optional; a sidecar needs all of SidecarTypes(), RDS
	// (RouteConfiguration, names from the accepted listeners, the way EDS
	// names come from CDS) and Secret included. No other type is
	// supported.
	Types []string
	// BackoffMin and BackoffMax bound the delay before reopening a failed
	// stream: it doubles from BackoffMin to BackoffMax, each delay drawn
	// between half and all of it, and starts over after a stream that
	// received a response and stayed open for BackoffMax. Defaults 500ms
	// and 30s.
	BackoffMin, BackoffMax time.Duration
	// DialTimeout bounds connecting, including the TLS handshake; default
	// 10s.
	DialTimeout time.Duration
	// KeepaliveTime is how long the stream may be silent before the client
	// pings the server, and KeepaliveTimeout how long it waits for the
	// answer before it drops the connection and reconnects: a server that
	// vanished without closing the connection is found this way. Defaults
	// 5m (gRPC servers' default enforcement policy refuses pings more
	// often) and 20s.
	KeepaliveTime, KeepaliveTimeout time.Duration
	// MaxRecvMsgSize bounds one response, in bytes; default 16 MiB. A
	// bigger response ends the stream (the last config stays).
	MaxRecvMsgSize int
	// Check, if set, is the proxy's own judgement of a consistent config
	// before it is published: an error NACKs the response that completed
	// it, with the error as the reason, and the previous config stays.
	// It must be a pure function; it runs on the client's goroutine, and
	// not again for a config that routes and trusts as the published
	// one, which it accepted.
	Check func(*Config) error
	// Clock times the backoff; default the real clock.
	Clock clock.Clock
	// Logger; nil discards.
	Logger *slog.Logger
}

// TLSConfig is the client's mutual TLS: its own SVID, the bundles it
// validates the server with, and who the server must be.
type TLSConfig struct {
	// SVID is presented to the server, read at every handshake so
	// rotation needs no reconnect. Required.
	SVID x509svid.Source
	// Bundle validates the server's certificate. Required.
	Bundle x509bundle.Source
	// Authorizer accepts the server's SPIFFE ID, e.g.
	// tlsconfig.AuthorizeID(federatorID). Required.
	Authorizer tlsconfig.Authorizer
	// FollowSDS validates the server with the trust bundle it published
	// over SDS (Client.Bundles) for its own trust domain, falling back to
	// Bundle while no accepted ROOTCA names that trust domain (before
	// the first one arrives). A root rotation the federator publishes
	// then reaches the client's next handshake with it, so reconnecting
	// after a rotation does not depend on Bundle having been updated.
	// Needs TypeSecret among the Types.
	FollowSDS bool
}

func (c ClientConfig) withDefaults() ClientConfig {
	if c.Types == nil {
		c.Types = TypesFor(c.Node.Role())
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = DefaultBackoffMin
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = max(DefaultBackoffMax, c.BackoffMin)
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.KeepaliveTime == 0 {
		c.KeepaliveTime = DefaultKeepaliveTime
	}
	if c.KeepaliveTimeout == 0 {
		c.KeepaliveTimeout = DefaultKeepaliveTimeout
	}
	if c.MaxRecvMsgSize == 0 {
		c.MaxRecvMsgSize = DefaultMaxRecvMsgSize
	}
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports every problem with the configuration at once. Zero
// durations and sizes mean their defaults.
func (c ClientConfig) Validate() error {
	var errs []error
	if _, port, err := net.SplitHostPort(c.Server); err != nil || port == "" {
		errs = append(errs, fmt.Errorf("server %q is not host:port", c.Server))
	}
	switch {
	case c.TLS == nil && !c.Plaintext:
		errs = append(errs, errors.New("neither TLS nor Plaintext is set"))
	case c.TLS != nil && c.Plaintext:
		errs = append(errs, errors.New("both TLS and Plaintext are set"))
	case c.TLS != nil:
		if c.TLS.SVID == nil {
			errs = append(errs, errors.New("TLS.SVID is nil"))
		}
		if c.TLS.Bundle == nil {
			errs = append(errs, errors.New("TLS.Bundle is nil"))
		}
		if c.TLS.Authorizer == nil {
			errs = append(errs, errors.New("TLS.Authorizer is nil"))
		}
	}
	if c.Node.ID == "" {
		errs = append(errs, errors.New("Node.ID is empty"))
	}
	role := c.Node.Role()
	if TypesFor(role) == nil {
		errs = append(errs, fmt.Errorf("node role %q is not supported (%s or %s)", role, RoleGateway, RoleSidecar))
	} else if idRole := nodeid.Role(c.Node.ID); c.Node.ID != "" && idRole != role {
		errs = append(errs, fmt.Errorf("node id %q does not start with %q, the role in its metadata", c.Node.ID, role+"~"))
	}
	if c.Types != nil {
		errs = append(errs, checkTypes(c.Types, role)...)
	}
	if c.TLS != nil && c.TLS.FollowSDS && c.Types != nil && !slices.Contains(c.Types, TypeSecret) {
		errs = append(errs, fmt.Errorf("TLS.FollowSDS needs the type %s among the Types", TypeSecret))
	}
	for name, d := range map[string]time.Duration{
		"BackoffMin": c.BackoffMin, "BackoffMax": c.BackoffMax, "DialTimeout": c.DialTimeout,
		"KeepaliveTime": c.KeepaliveTime, "KeepaliveTimeout": c.KeepaliveTimeout,
	} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s %v is negative", name, d))
		}
	}
	if c.BackoffMin > 0 && c.BackoffMax > 0 && c.BackoffMax < c.BackoffMin {
		errs = append(errs, fmt.Errorf("BackoffMax %v is below BackoffMin %v", c.BackoffMax, c.BackoffMin))
	}
	if c.MaxRecvMsgSize < 0 {
		errs = append(errs, fmt.Errorf("MaxRecvMsgSize %d is negative", c.MaxRecvMsgSize))
	}
	return errors.Join(errs...)
}

// checkTypes reports what is wrong with a list of types for a proxy of
// role to subscribe to.
func checkTypes(types []string, role string) []error {
	supported := TypesFor(role)
	if supported == nil {
		supported = GatewayTypes()
	}
	var errs []error
	seen := make(map[string]bool, len(types))
	for _, t := range types {
		switch {
		case seen[t]:
			errs = append(errs, fmt.Errorf("type %q is listed twice", t))
		case !slices.Contains(supported, t):
			errs = append(errs, fmt.Errorf("type %q is not supported (supported: %q)", t, supported))
		}
		seen[t] = true
	}
	for _, t := range requiredTypes(role) {
		if !seen[t] {
			errs = append(errs, fmt.Errorf("type %q is required", t))
		}
	}
	return errs
}

// Client is the proxies' xDS client: one ADS stream to the federator,
// each response validated, ACKed or NACKed with the reason, and every
// consistent configuration published as an immutable *Config. The last
// good Config stays through NACKs, disconnects and federator restarts:
// a proxy never drops traffic because its control plane went away.
type Client struct {
	cfg      ClientConfig
	log      *slog.Logger
	node     *corev3.Node
	dialOpts []grpc.DialOption
	running  atomic.Bool

	cur       atomic.Pointer[Config]
	updated   chan struct{}
	ready     chan struct{}
	readyOnce sync.Once

	// acc and versions are what was accepted last, kept across streams so
	// a new stream resubscribes with them. Only Run's goroutine uses them.
	acc      *state
	versions map[string]string

	stats stats
}

// New checks cfg and prepares a client; Run connects.
func New(cfg ClientConfig) (*Client, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("xdsclient: %w", err)
	}
	acc, err := newState(cfg.Node.Role())
	if err != nil {
		return nil, err
	}
	c := &Client{
		cfg:      cfg,
		log:      cfg.Logger.With("component", "xdsclient", "server", cfg.Server),
		node:     cfg.Node.proto(),
		updated:  make(chan struct{}, 1),
		ready:    make(chan struct{}),
		acc:      acc,
		versions: map[string]string{},
	}
	creds := insecure.NewCredentials()
	if cfg.TLS != nil {
		bundle := cfg.TLS.Bundle
		if cfg.TLS.FollowSDS {
			bundle = followSDS{sds: c.Bundles(), fallback: bundle}
		}
		creds = credentials.NewTLS(tlsconfig.MTLSClientConfig(cfg.TLS.SVID, bundle, cfg.TLS.Authorizer))
	}
	bo := backoff.DefaultConfig
	bo.MaxDelay = cfg.BackoffMax
	c.dialOpts = []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.MaxRecvMsgSize), grpc.ForceCodecV2(newResponseCodec())),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: cfg.DialTimeout}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: cfg.KeepaliveTime, Timeout: cfg.KeepaliveTimeout}),
	}
	return c, nil
}

// Current is the last consistent configuration accepted, nil until the
// first. It is never modified; a new one replaces it.
func (c *Client) Current() *Config { return c.cur.Load() }

// Bundles is a live x509bundle.Source of the trust bundles the federator
// publishes (Config.Bundles): every call reads the current config, so
// go-spiffe's tlsconfig, given it, validates each new handshake against
// the bundles accepted last, and a rotation needs no restart. A trust
// domain the current config has no bundle for (or no config, or no
// ROOTCA yet) is an error naming it. It returns copies: callers may
// modify them.
func (c *Client) Bundles() x509bundle.Source { return bundleSource{c: c} }

// Updated receives (capacity one, sends never block) after Current
// changes. It has one consumer: the proxy's loop that then reads Current.
func (c *Client) Updated() <-chan struct{} { return c.updated }

// WaitReady blocks until the first configuration is published or ctx ends.
func (c *Client) WaitReady(ctx context.Context) error {
	select {
	case <-c.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("xdsclient: waiting for the first config: %w", context.Cause(ctx))
	}
}

// Run keeps an ADS stream open until ctx ends, reopening it with backoff
// whenever it fails. It returns nil once ctx ends, and leaves no goroutine
// behind. It may be called once.
func (c *Client) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return errRunTwice
	}
	c.log.Info("xDS client starting", "node", c.cfg.Node.ID, "cluster", c.cfg.Node.Cluster,
		"types", c.cfg.Types, "tls", c.cfg.TLS != nil, "backoff_min", c.cfg.BackoffMin, "backoff_max", c.cfg.BackoffMax)
	attempt := 0
	for {
		start := c.cfg.Clock.Now()
		received, err := c.session(ctx)
		c.stats.connected.Store(false)
		if ctx.Err() != nil {
			c.log.Info("xDS client stopped")
			return nil
		}
		// A stream that worked for a while starts the backoff over; one
		// that keeps failing soon after it opened (a response too big, a
		// server crashing on us) backs off like one that never opened.
		if received && c.cfg.Clock.Since(start) >= c.cfg.BackoffMax {
			attempt = 0
		}
		c.stats.setLastError(err)
		delay := backoffDelay(c.cfg.BackoffMin, c.cfg.BackoffMax, attempt, rand.Int64N)
		attempt++
		c.log.Warn("xDS stream ended, keeping the last config", "error", err, "retry_in", delay,
			"have_config", c.Current() != nil)
		t := c.cfg.Clock.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			c.log.Info("xDS client stopped")
			return nil
		case <-t.C():
		}
		c.stats.reconnects.Add(1)
	}
}

// backoffDelay is the wait before attempt n+1 (n counts from 0): min
// doubled n times, capped at max, then drawn from its upper half ("equal
// jitter") so clients restarted together spread out. randN returns a
// value in [0, n).
func backoffDelay(minD, maxD time.Duration, n int, randN func(int64) int64) time.Duration {
	d := minD
	for i := 0; i < n && d < maxD; i++ {
		d *= 2
	}
	d = min(d, maxD)
	half := d / 2
	if half <= 0 {
		return d
	}
	return half + time.Duration(randN(int64(d-half)+1))
}

// publish makes cfg Current and signals Updated.
func (c *Client) publish(cfg *Config) {
	c.cur.Store(cfg)
	c.stats.published.Add(1)
	select {
	case c.updated <- struct{}{}:
	default:
	}
	c.readyOnce.Do(func() { close(c.ready) })
}

// Stats are the client's counters, for the proxy to export as metrics.
type Stats struct {
	// Accepted and Rejected count responses ACKed and NACKed.
	Accepted, Rejected uint64
	// Published counts configurations made Current.
	Published uint64
	// Streams counts ADS streams opened; Reconnects counts attempts to open
	// one after the previous ended or failed.
	Streams, Reconnects uint64
	// Connected is whether a stream is open now.
	Connected bool
	// LastNACK is the error_detail message of the last NACK; LastError why
	// the last stream ended or failed to open. Empty when none.
	LastNACK, LastError string
	// Versions are the versions accepted last, by type URL. They can be
	// ahead of Current().Versions when a response changed nothing.
	Versions map[string]string
}

// Stats returns a snapshot of the counters.
func (c *Client) Stats() Stats {
	c.stats.mu.Lock()
	lastNACK, lastErr, versions := c.stats.lastNACK, c.stats.lastError, maps.Clone(c.stats.versions)
	c.stats.mu.Unlock()
	return Stats{
		Accepted:   c.stats.accepted.Load(),
		Rejected:   c.stats.rejected.Load(),
		Published:  c.stats.published.Load(),
		Streams:    c.stats.streams.Load(),
		Reconnects: c.stats.reconnects.Load(),
		Connected:  c.stats.connected.Load(),
		LastNACK:   lastNACK,
		LastError:  lastErr,
		Versions:   versions,
	}
}

type stats struct {
	accepted, rejected, published, streams, reconnects atomic.Uint64
	connected                                          atomic.Bool

	// mu guards lastNACK, lastError and versions.
	mu                  sync.Mutex
	lastNACK, lastError string
	versions            map[string]string
}

// accept counts an ACKed response and records the versions accepted.
func (s *stats) accept(versions map[string]string) {
	s.accepted.Add(1)
	s.mu.Lock()
	s.versions = maps.Clone(versions)
	s.mu.Unlock()
}

func (s *stats) setLastError(err error) {
	if err == nil {
		return
	}
	s.mu.Lock()
	s.lastError = err.Error()
	s.mu.Unlock()
}

func (s *stats) setLastNACK(msg string) {
	s.mu.Lock()
	s.lastNACK = msg
	s.mu.Unlock()
}
