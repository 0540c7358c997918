package xds

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"google.golang.org/grpc"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// Node groups of the snapshot cache: every node of a role shares one
// snapshot.
const (
	gatewayGroup = "eastwest-gw"
	// unservedGroup holds every node of a role not served (neither a
	// gateway nor a sidecar); it never gets a snapshot, so their watches
	// stay open and unanswered.
	unservedGroup = "unserved"
)

// DefaultCoalesce is how long Run waits after a catalog or trust bundle
// change before it translates, so a burst of changes becomes one push.
const DefaultCoalesce = 5 * time.Millisecond

// DefaultPeersSyncTimeout is how long, at most, a starting Server keeps
// the sidecars' configuration back until every peer's imports are known
// (Options.PeersSynced).
const DefaultPeersSyncTimeout = 30 * time.Second

// peersSyncPoll is how often Run asks Options.PeersSynced while the
// sidecars wait: a peer that exports nothing here, or one the federation
// gave up waiting for, changes nothing in the catalog that would signal.
const peersSyncPoll = 100 * time.Millisecond

// Options are a Server's inputs besides the catalog and the trust bundle.
type Options struct {
	// Gateway configures the gateway's translation;
	// Gateway.FederationUpstream is required.
	Gateway GatewayOptions
	// Sidecar configures the sidecars' translation; its zero value means
	// a cluster without a region.
	Sidecar SidecarOptions
	// InCluster, when set, holds catalog.InClusterSource, the cluster's
	// in-cluster services (pkg/kube), which the sidecars are given too.
	InCluster *catalog.Store
	// Policies, when set, holds the cluster's AuthorizationPolicies and
	// which pods they select (pkg/kube keeps it): each pod's sidecar
	// enforces its own. The sidecars are served nothing until it has
	// synced, so that none runs without a policy that exists.
	Policies *authz.Store
	// Coalesce is how long a catalog or trust bundle change waits for more
	// before the translation runs; zero means DefaultCoalesce.
	Coalesce time.Duration
	// PeersSynced, when set, reports whether every linked peer's imports
	// are known since this process started (federation.Manager.Synced).
	// Until it does, or PeersSyncTimeout has passed since Run started,
	// the sidecars are served nothing: a restarted federator's catalog
	// lacks the peers' imports until they resync, and sidecars served
	// that would drop every clusterset name and remote endpoint they had,
	// while sidecars served nothing keep their last configuration. The
	// gateway never waits: it serves local exports only. Nil serves the
	// sidecars from the first translation.
	PeersSynced func() bool
	// PeersSyncTimeout bounds that wait (a peer that is down keeps
	// PeersSynced false for its keepFor); after it the sidecars are
	// served what is known, and a warning and
	// isthmus_xds_peer_sync_timeouts_total say so. Zero means
	// DefaultPeersSyncTimeout.
	PeersSyncTimeout time.Duration
	// Logger receives lifecycle lines at Info, refused streams and NACKs
	// at Warn, and per-push lines (go-control-plane's too) at Debug. Nil
	// discards.
	Logger *slog.Logger
	// Meter records the isthmus_xds_* metrics. Nil records nothing.
	Meter metric.Meter
}

// Server serves the proxies' configuration over ADS (state of the world
// and delta, go-control-plane's server and snapshot cache) and keeps it in
// step with the catalog and the trust bundles. Build it with NewServer,
// register it on gRPC servers (Register), and Run it.
type Server struct {
	store    *catalog.Store
	td       spiffeid.TrustDomain
	bundles  TrustBundles
	opts     Options
	log      *slog.Logger
	cache    cache.SnapshotCache
	xds      serverv3.Server
	stopXDS  context.CancelFunc
	metrics  metrics
	coalesce time.Duration
	// gatewayTranslator keeps what the last translation made of each
	// service; only Run's goroutine uses it.
	gatewayTranslator *GatewayTranslator

	// mu guards gateway, gatewaySetAt, catalogVersion, lastError,
	// streams, waitSince and waitUntil.
	mu             sync.Mutex
	gateway        Resources
	gatewaySetAt   time.Time
	catalogVersion string
	lastError      string
	streams        map[int64]*streamState
	// waitSince and waitUntil bound the sidecars' wait for the peers'
	// imports (Options.PeersSynced); waitUntil is zero when they do not
	// wait (any more).
	waitSince, waitUntil time.Time

	// sidecar is what the sidecars are served; it has a lock of its own.
	sidecar sidecarState
}

type metrics struct {
	updates   metric.Int64Counter
	connected metric.Int64UpDownCounter
	nacks     metric.Int64Counter
	refused   metric.Int64Counter
	failures  metric.Int64Counter
	// waiting is 1 while the sidecars wait for the peers' imports, and
	// syncTimeouts counts the waits that ended on the bound.
	waiting      metric.Int64Gauge
	syncTimeouts metric.Int64Counter
}

// NewServer returns a Server for the catalog in store and the trust
// bundles in bundles (the federator's trust store). Proxies on the TLS
// port must present an X.509 SVID of trust domain td that verifies
// against bundles; every bundle bundles holds, local and federated, is
// served to them as the ROOTCA Secret (TranslateSecrets).
func NewServer(store *catalog.Store, td spiffeid.TrustDomain, bundles TrustBundles, opts Options) (*Server, error) {
	translator, err := NewGatewayTranslator(opts.Gateway)
	if err != nil {
		return nil, fmt.Errorf("xds: %w", err)
	}
	if td.IsZero() || bundles == nil {
		return nil, fmt.Errorf("xds: a trust domain and its bundle source are required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "xds")
	if opts.Sidecar.TrustDomain == "" {
		opts.Sidecar.TrustDomain = td.Name()
	}
	s := &Server{
		store: store, td: td, bundles: bundles, opts: opts, log: log, gatewayTranslator: translator,
		coalesce: opts.Coalesce,
		streams:  map[int64]*streamState{},
	}
	if s.coalesce <= 0 {
		s.coalesce = DefaultCoalesce
	}
	meter := opts.Meter
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	// Instrument creation fails only for invalid names, which these are
	// not; the SDK then hands back a working no-op instrument anyway.
	s.metrics.updates, _ = meter.Int64Counter("isthmus_xds_snapshot_updates",
		metric.WithDescription("New configuration versions set for proxies, by role."))
	s.metrics.connected, _ = meter.Int64UpDownCounter("isthmus_xds_connected_proxies",
		metric.WithDescription("Open xDS streams from proxies, by transport (tls or plaintext)."))
	s.metrics.nacks, _ = meter.Int64Counter("isthmus_xds_nacks",
		metric.WithDescription("Configurations proxies rejected (NACKs), by type URL."))
	s.metrics.refused, _ = meter.Int64Counter("isthmus_xds_streams_refused",
		metric.WithDescription("xDS streams refused for want of a valid SVID of the local trust domain, or for a node ID the SVID does not allow."))
	s.metrics.failures, _ = meter.Int64Counter("isthmus_xds_translation_errors",
		metric.WithDescription("Translations that failed; proxies keep the last good configuration."))
	s.metrics.waiting, _ = meter.Int64Gauge("isthmus_xds_sidecars_waiting_for_peers",
		metric.WithDescription("1 while a starting federator serves the sidecars nothing until every peer's imports are known, else 0."))
	s.metrics.syncTimeouts, _ = meter.Int64Counter("isthmus_xds_peer_sync_timeouts",
		metric.WithDescription("Starts after which the sidecars were served before every peer's imports were known, the wait having reached its bound."))

	glog := goControlPlaneLogger{log}
	// The snapshot cache's ADS behaviour, each resource encoded once for
	// every stream (cache.go).
	s.cache = newEncodedCache(nodeGroups{}, glog)
	// The go-control-plane server's context ends every open stream when
	// Run returns, so a graceful gRPC stop does not wait for proxies
	// that never hang up.
	ctx, cancel := context.WithCancel(context.Background())
	s.stopXDS = cancel
	s.xds = serverv3.NewServer(ctx, s.cache, &hooks{s: s}, sotw.WithOrderedADS(), sotw.WithLogger(glog))
	return s, nil
}

// Register adds the aggregated discovery service (ADS, state of the world
// and delta) to g.
func (s *Server) Register(g *grpc.Server) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
}

// nodeGroups maps every gateway to one snapshot and every other node to a
// group that has none.
type nodeGroups struct{}

func (nodeGroups) ID(node *corev3.Node) string {
	if !strings.Contains(node.GetId(), "~") {
		return unservedGroup
	}
	switch nodeid.Role(node.GetId()) {
	case nodeid.RoleGateway:
		return gatewayGroup
	case nodeid.RoleSidecar:
		return sidecarGroup
	}
	return unservedGroup
}

// Run keeps the gateway's snapshot in step with the local catalog and the
// trust bundles, and the sidecars' with the local catalog, every peer's
// imports (any change of the store signals) and the trust bundles, until
// ctx ends, then ends every open xDS stream. A change
// is translated after a short quiet time (Options.Coalesce); a snapshot is
// set only when a version differs from the current one, and the first one
// only once the local catalog has been published (pkg/kube publishes it
// once its informers synced), so a restarted federator never serves an
// empty listener in place of the gateway's last configuration. For the
// same reason the sidecars' first one also waits for every peer's imports
// (Options.PeersSynced), at most Options.PeersSyncTimeout.
func (s *Server) Run(ctx context.Context) error {
	defer s.stopXDS()
	changed, cancel := s.store.Subscribe()
	defer cancel()
	// Without an in-cluster store, a channel that never signals.
	var inClusterChanged <-chan struct{}
	if s.opts.InCluster != nil {
		var cancelInCluster func()
		inClusterChanged, cancelInCluster = s.opts.InCluster.Subscribe()
		defer cancelInCluster()
	}
	// Without policies, a channel that never signals.
	var policiesChanged <-chan struct{}
	if s.opts.Policies != nil {
		var cancelPolicies func()
		policiesChanged, cancelPolicies = s.opts.Policies.Subscribe()
		defer cancelPolicies()
	}
	trustChanged, cancelTrust := s.bundles.Subscribe()
	defer cancelTrust()
	s.log.Info("xDS translation running", "federationUpstream", s.opts.Gateway.FederationUpstream, "region", s.opts.Sidecar.Region)
	// poll asks PeersSynced again while the sidecars wait; nil after.
	var poll <-chan time.Time
	stopPoll := func() {}
	if s.opts.PeersSynced != nil {
		timeout := cmp.Or(s.opts.PeersSyncTimeout, DefaultPeersSyncTimeout)
		now := time.Now()
		s.mu.Lock()
		s.waitSince, s.waitUntil = now, now.Add(timeout)
		s.mu.Unlock()
		s.metrics.waiting.Record(ctx, 1)
		s.log.Info("sidecars are served nothing until every peer's imports are known, so they keep their last configuration", "atMost", timeout)
		ticker := time.NewTicker(min(peersSyncPoll, timeout))
		defer ticker.Stop()
		poll, stopPoll = ticker.C, ticker.Stop
	}
	timer := time.NewTimer(0)
	<-timer.C
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-inClusterChanged:
		case <-policiesChanged:
		case <-trustChanged:
		case <-poll:
			if s.sidecarsWait(ctx) {
				continue
			}
			// The wait is over: translate for the sidecars what the
			// catalog holds, even if nothing changed since.
			poll = nil
			stopPoll()
		}
		timer.Reset(s.coalesce)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-timer.C:
		}
		// What changed meanwhile is read below; its signals are spent.
		select {
		case <-changed:
		default:
		}
		select {
		case <-inClusterChanged:
		default:
		}
		select {
		case <-policiesChanged:
		default:
		}
		select {
		case <-trustChanged:
		default:
		}
		s.update(ctx)
	}
}

// update translates the current local catalog and trust bundles and sets
// the snapshot if either part is new. When one part fails to translate,
// the other is still updated and the failed one keeps its last good
// value. The sidecars' configuration follows (updateSidecar).
func (s *Server) update(ctx context.Context) {
	if !slices.Contains(s.store.Sources(), catalog.LocalSource) {
		return
	}
	local := s.store.Get(catalog.LocalSource)
	s.mu.Lock()
	prev := s.gateway
	s.mu.Unlock()
	next := prev
	res, gwErr := s.gatewayTranslator.Translate(local)
	if gwErr == nil {
		res.Secrets, res.SecretsVersion = prev.Secrets, prev.SecretsVersion
		next = res
	}
	secrets, secretsVersion, secErr := TranslateSecrets(currentBundles(s.bundles))
	if secErr == nil {
		next.Secrets, next.SecretsVersion = secrets, secretsVersion
	}
	var setErr error
	// An empty Version: the routing part never translated, and a
	// snapshot without a listener must not replace a gateway's routes.
	changed := next.Version != "" && (next.Version != prev.Version || next.SecretsVersion != prev.SecretsVersion)
	if changed {
		setErr = s.setGateway(ctx, next)
	}
	// The gateway goes first: it is one translation of the local catalog,
	// cheap and incremental, and a new export must not wait for the
	// sidecars' translation of every clusterset service. Nor for the
	// peers' imports, which the sidecars may wait for.
	switch {
	case s.sidecarsWait(ctx):
		s.log.Debug("sidecar configuration waits for every peer's imports", "catalog", local.Version())
	case s.opts.Policies != nil && !s.opts.Policies.Snapshot().Synced:
		// A sidecar served before every policy is known would let
		// through what a policy not read yet refuses.
		s.log.Debug("sidecar configuration waits for the AuthorizationPolicies to sync", "catalog", local.Version())
	default:
		s.updateSidecar(ctx, local, secrets, secretsVersion, secErr == nil)
	}
	err := errors.Join(gwErr, secErr, setErr)
	s.mu.Lock()
	s.catalogVersion = local.Version()
	s.lastError = ""
	if err != nil {
		s.lastError = err.Error()
	}
	s.mu.Unlock()
	switch {
	case err != nil:
		s.metrics.failures.Add(ctx, 1)
		s.log.Error("gateway configuration not (fully) updated; proxies keep the last good part", "catalog", local.Version(), "error", err)
	case !changed:
		s.log.Debug("catalog or trust changed, gateway configuration did not", "catalog", local.Version(),
			"version", next.Version, "secretsVersion", next.SecretsVersion)
	}
}

// sidecarsWait reports whether the sidecars must still be served nothing
// for want of the peers' imports, and ends the wait once every peer's are
// known (Options.PeersSynced) or its bound has passed.
func (s *Server) sidecarsWait(ctx context.Context) bool {
	s.mu.Lock()
	since, until := s.waitSince, s.waitUntil
	s.mu.Unlock()
	if until.IsZero() {
		return false
	}
	// Asked without s.mu: it takes the federation's own locks.
	synced := s.opts.PeersSynced()
	now := time.Now()
	if !synced && now.Before(until) {
		return true
	}
	s.mu.Lock()
	s.waitUntil = time.Time{}
	s.mu.Unlock()
	s.metrics.waiting.Record(ctx, 0)
	waited := now.Sub(since).Round(time.Millisecond)
	if synced {
		s.log.Info("every peer's imports are known: serving the sidecars", "waited", waited)
		return false
	}
	s.metrics.syncTimeouts.Add(ctx, 1)
	s.log.Warn("not every peer's imports are known: serving the sidecars what is known; services of a peer not yet back are missing until it is (see federator status)",
		"waited", waited)
	return false
}

// setGateway checks res's snapshot for consistency and serves it to every
// gateway.
func (s *Server) setGateway(ctx context.Context, res Resources) error {
	snap, err := res.Snapshot()
	if err != nil {
		return err
	}
	if err := s.cache.SetSnapshot(ctx, gatewayGroup, snap); err != nil {
		return fmt.Errorf("set snapshot %s: %w", res.Version, err)
	}
	// Counted before Status shows it: who sees the version there sees
	// it counted.
	s.metrics.updates.Add(ctx, 1, metric.WithAttributes(attribute.String("role", gatewayGroup)))
	s.mu.Lock()
	s.gateway = res
	s.gatewaySetAt = time.Now()
	s.mu.Unlock()
	s.log.Info("gateway configuration updated", "version", res.Version, "secretsVersion", res.SecretsVersion,
		"filterChains", len(res.Listeners[0].GetFilterChains()), "clusters", len(res.Clusters))
	return nil
}

// Status is the JSON shape of the federator's /debug/xds.
type Status struct {
	Gateway SnapshotStatus `json:"gateway"`
	Sidecar SnapshotStatus `json:"sidecar"`
	// Proxies are the open xDS streams, oldest first.
	Proxies []ProxyStatus `json:"proxies"`
}

// SnapshotStatus describes the configuration served to one role.
type SnapshotStatus struct {
	// Version is a hash of the versions of the listeners, clusters,
	// endpoints and (sidecars) route configurations being served
	// (Resources.Version); empty until the first one is set.
	Version string `json:"version"`
	// Versions are the version each type is served at, by type URL
	// (Resources.TypeVersions): what a proxy's ACK of that type carries
	// (ProxyStatus.Acked) once it holds this configuration. A type
	// whose resources did not change keeps its version.
	Versions map[string]string `json:"versions,omitempty"`
	// SecretsVersion is the content hash of the Secrets (SDS) being
	// served; empty while there are none.
	SecretsVersion string    `json:"secretsVersion,omitempty"`
	SetAt          time.Time `json:"setAt,omitzero"`
	// CatalogVersion is the version of the local catalog last
	// translated; several catalog versions may give one configuration.
	CatalogVersion string `json:"catalogVersion,omitempty"`
	// Imports are, for the sidecars, the version of each peer's imports
	// last translated.
	Imports map[string]string `json:"imports,omitempty"`
	// Resources are the resources' names by type URL.
	Resources map[string][]string `json:"resources,omitempty"`
	// Profiles are, for the sidecars, the inbound profiles by key (the
	// ports the pods' Services declare, "8080/HTTP,9000/TCP"): a pod
	// with one is served its listeners, at its ListenersVersion, in
	// place of Versions' (pkg/xds sidecar_inbound.go).
	Profiles map[string]ProfileStatus `json:"profiles,omitempty"`
	// Skipped is, for the sidecars, what the last translation left out
	// and why (a gateway that is not an IP, a port two exporters define
	// differently, an exporter without a SPIFFE identity).
	Skipped []Skipped `json:"skipped,omitempty"`
	// Error is why the last translation failed, if it did.
	Error string `json:"error,omitempty"`
	// WaitingForPeersUntil is, for the sidecars of a starting federator,
	// the latest time they are served nothing until every peer's imports
	// are known (Options.PeersSynced); zero once they no longer wait.
	WaitingForPeersUntil time.Time `json:"waitingForPeersUntil,omitzero"`
}

// ProxyStatus describes one open xDS stream.
type ProxyStatus struct {
	StreamID int64 `json:"streamID"`
	// Node is the node ID of the stream's first request; empty before it.
	Node string `json:"node,omitempty"`
	// Identity is the SPIFFE ID the proxy authenticated with; empty on
	// the plaintext port.
	Identity  string    `json:"identity,omitempty"`
	Peer      string    `json:"peer"`
	Transport string    `json:"transport"` // "sotw" or "delta"
	Since     time.Time `json:"since"`
	// Acked is the last version the proxy accepted, by type URL.
	Acked map[string]string `json:"acked,omitempty"`
	// NACKs counts the responses the proxy rejected; LastNACK says why
	// the last one was.
	NACKs    int    `json:"nacks,omitempty"`
	LastNACK string `json:"lastNack,omitempty"`
}

// Status reports what is served and to whom.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Gateway: SnapshotStatus{
		Version: s.gateway.Version, SecretsVersion: s.gateway.SecretsVersion, SetAt: s.gatewaySetAt,
		CatalogVersion: s.catalogVersion, Error: s.lastError,
	}}
	if s.gateway.Version != "" {
		st.Gateway.Versions = s.gateway.TypeVersions()
		st.Gateway.Resources = s.gateway.Names()
	}
	st.Sidecar = s.sidecarStatus()
	st.Sidecar.WaitingForPeersUntil = s.waitUntil
	for _, id := range slices.Sorted(maps.Keys(s.streams)) {
		ss := s.streams[id]
		st.Proxies = append(st.Proxies, ProxyStatus{
			StreamID: id, Node: ss.node, Identity: ss.identity, Peer: ss.peer, Transport: ss.transport,
			Since: ss.since, Acked: maps.Clone(ss.acked), NACKs: ss.nacks, LastNACK: ss.lastNACK,
		})
	}
	return st
}

// Resources returns the gateway configuration being served (zero before
// the first).
func (s *Server) Resources() Resources {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gateway
}
