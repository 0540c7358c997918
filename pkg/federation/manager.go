package federation

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/clock"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

// LabelPeer marks objects the federator keeps for one peer.
const LabelPeer = "federation.isthmus.dev/peer"

// Config configures a Manager. Zero durations mean their defaults.
type Config struct {
	// ClusterName is this cluster's name; peers know it by it.
	ClusterName string
	// Namespace is the federator's namespace (token records, peer
	// ConfigMaps, join Secrets).
	Namespace string
	// FederatorID is the SPIFFE ID this federator presents.
	FederatorID spiffeid.ID
	// Gateways are this cluster's east-west gateway addresses as peers
	// reach them (host:port), sent with every exported service.
	Gateways []string
	// AdvertiseAddresses are where peers reach this federator, sent to an
	// acceptor at establishment (informational there).
	AdvertiseAddresses []string
	// Heartbeat is how often a heartbeat is sent (default 10s);
	// HeartbeatTimeout how long a silent peer is tolerated (default 3x).
	Heartbeat        time.Duration
	HeartbeatTimeout time.Duration
	// DialTimeout bounds connecting to a peer and Establish (default 10s).
	DialTimeout time.Duration
	// KeepFor and DrainFor are the staleness defaults for peers whose
	// FederationPeer does not set them (5m and 1m).
	KeepFor, DrainFor time.Duration
	// BackoffMin and BackoffMax bound reconnect delays (1s, 30s).
	BackoffMin, BackoffMax time.Duration
	// StatusInterval is how often changed peer status is written to the
	// FederationPeer objects (default 2s).
	StatusInterval time.Duration
	Limits         Limits
	// EstablishRate is how many Establish calls a second this federator
	// answers, EstablishBurst how many at once (default 2 and 10).
	// Whoever reaches the federation port can call Establish, and a call
	// that passes the free checks costs requests on the API client the
	// whole federator shares; linking needs a handful.
	EstablishRate  float64
	EstablishBurst int
	// ImportProblems, when set, names what the import writer could not
	// write for a peer (shown in the ImportsWritten condition).
	ImportProblems func(peer string) []string
	// ImportsWriting, when set, says that the import writer is still
	// writing a peer's imports (ImportsWritten is then False, reason
	// Writing, until it is done).
	ImportsWriting func(peer string) bool
	// Clock is injectable for tests; nil means the real clock.
	Clock  clock.WithTicker
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.Heartbeat, 10*time.Second)
	def(&c.HeartbeatTimeout, 3*c.Heartbeat)
	def(&c.DialTimeout, 10*time.Second)
	def(&c.KeepFor, 5*time.Minute)
	def(&c.DrainFor, time.Minute)
	def(&c.BackoffMin, time.Second)
	def(&c.BackoffMax, 30*time.Second)
	def(&c.StatusInterval, 2*time.Second)
	if c.EstablishRate <= 0 {
		c.EstablishRate = 2
	}
	if c.EstablishBurst <= 0 {
		c.EstablishBurst = 10
	}
	c.Limits = c.Limits.withDefaults()
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Manager runs this cluster's side of every link: it serves the
// federation API (Establish and Exchange), dials the peers this cluster
// joined, imports what peers export into the catalog, and writes each
// peer's status to its FederationPeer.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	clock   clock.WithTicker
	kube    kubernetes.Interface
	dyn     dynamic.Interface
	trust   *trust.Store
	svid    x509svid.Source
	exports *exports

	informer cache.SharedIndexInformer
	queue    workqueue.TypedRateLimitingInterface[string]
	// started is when Run began; set before any goroutine reads it.
	started time.Time

	// mu guards peers and byTrustDomain.
	mu    sync.Mutex
	peers map[string]*peerEntry
	// byTrustDomain holds every entry of peers under its peer object's
	// trust domain (fixed for the entry's life), for the look-ups by
	// trust domain and federator ID that would otherwise walk every peer.
	byTrustDomain map[spiffeid.TrustDomain]map[string]*peerEntry

	// establishMu orders storing a joiner's bundle and recording its
	// FederationPeer (Establish) with the sweep of peer ConfigMaps no
	// FederationPeer owns (sweepPeerConfigMaps), so that the sweep never
	// takes a link being recorded for a leftover.
	establishMu sync.Mutex
	// recorded are the joiners Establish recorded lately, by name, with
	// their trust domain: the informer may not show their FederationPeer
	// yet. establishMu guards it.
	recorded map[string]recordedJoiner
	// establishLimit bounds the Establish calls answered (EstablishRate).
	establishLimit *rate.Limiter

	// bundleMu guards stored: each peer's ConfigMap as last written, so
	// that storing the bundle it holds costs no request, and a new one an
	// update without a read first.
	bundleMu sync.Mutex
	stored   map[string]*corev1.ConfigMap

	// life ends when Run returns, and with it every stream Exchange
	// serves; sessions counts them, so that Run waits for them.
	life     context.Context
	endLife  context.CancelFunc
	sessions sessionGroup
}

// sessionGroup counts running sessions; once closed it admits no more.
type sessionGroup struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func (g *sessionGroup) add() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *sessionGroup) done() { g.wg.Done() }

func (g *sessionGroup) closeAndWait() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.wg.Wait()
}

// peerEntry is a running peer: its state and the goroutine that serves it.
type peerEntry struct {
	p *peer
	// uid is the FederationPeer's; tokenID the token `federator join`
	// made it from (AnnotationTokenID), which names its join Secret.
	uid     types.UID
	tokenID string
	spec    v1alpha1.FederationPeerSpec
	// specErr names what of the spec the federator cannot follow; when
	// set, the link is not run (Accepted is False).
	specErr  error
	keepFor  time.Duration
	drainFor time.Duration
	cancel   context.CancelFunc
	done     chan struct{}
	// generation is the FederationPeer's metadata.generation the entry
	// answers for, the conditions' observedGeneration: a spec edited
	// back to what it was is not run again, but it is a new generation.
	generation atomic.Int64
	// conditions are the last written ones, so transition times hold;
	// written is the last status written.
	conditions []metav1.Condition
	written    *v1alpha1.FederationPeerStatus
	// writeErr is the last status write's failure, logged once.
	writeErr string
	// conflict: the spec is refused because an older FederationPeer
	// holds its trust domain; this entry holds nothing of that trust
	// domain, so forgetting it must not drop the other link's bundle.
	conflict bool
	// peerLife lasts as long as p serves this peer: entries that keep p
	// share it, and it ends when p is replaced or the link removed.
	// Every stream Exchange serves for p ends with it, so that one
	// opened just before the replacement does not outlive it.
	peerLife context.Context
	endPeer  context.CancelFunc
}

var _ fedv1.FederationServiceServer = (*Manager)(nil)

// NewManager wires a manager; nothing runs until Run.
func NewManager(kube kubernetes.Interface, dyn dynamic.Interface, store *catalog.Store, ts *trust.Store, svid x509svid.Source, cfg Config) (*Manager, error) {
	cfg = cfg.withDefaults()
	m := &Manager{
		cfg: cfg, log: cfg.Logger.With("component", "federation"), clock: cfg.Clock,
		kube: kube, dyn: dyn, trust: ts, svid: svid,
		exports:        newExports(store, ts, cfg.Gateways),
		peers:          map[string]*peerEntry{},
		byTrustDomain:  map[spiffeid.TrustDomain]map[string]*peerEntry{},
		recorded:       map[string]recordedJoiner{},
		stored:         map[string]*corev1.ConfigMap{},
		establishLimit: rate.NewLimiter(rate.Limit(cfg.EstablishRate), cfg.EstablishBurst),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "federationpeers"}),
	}
	m.life, m.endLife = context.WithCancel(context.Background())
	factory := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 10*time.Minute)
	m.informer = factory.ForResource(v1alpha1.Resource).Informer()
	// Which FederationPeers name a trust domain is asked on every
	// reconcile and every Establish: an index, not a walk of them all.
	if err := m.informer.AddIndexers(cache.Indexers{byTrustDomain: indexTrustDomain}); err != nil {
		return nil, fmt.Errorf("index FederationPeers by trust domain: %w", err)
	}
	_, _ = m.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    m.enqueue,
		UpdateFunc: func(_, obj any) { m.enqueue(obj) },
		DeleteFunc: m.enqueue,
	})
	return m, nil
}

// ServerOptions are the gRPC options of the federation listener.
func (m *Manager) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(credentials.NewTLS(serverTLS(m.svid))),
		grpc.MaxRecvMsgSize(m.cfg.Limits.MaxMessageBytes),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: m.cfg.Heartbeat, Timeout: m.cfg.HeartbeatTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: m.cfg.Heartbeat / 2, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(256),
	}
}

// Register adds the federation service to s.
func (m *Manager) Register(s *grpc.Server) { fedv1.RegisterFederationServiceServer(s, m) }

func tlsconfigServer(svid x509svid.Source) *tls.Config { return tlsconfig.TLSServerConfig(svid) }

func (m *Manager) enqueue(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	if u, ok := obj.(*unstructured.Unstructured); ok {
		m.queue.Add(u.GetName())
	}
}

// Run serves until ctx ends: the FederationPeer controller, one goroutine
// per peer, the staleness clock and the status writer.
func (m *Manager) Run(ctx context.Context) error {
	m.mu.Lock()
	m.started = m.clock.Now()
	m.mu.Unlock()
	defer func() {
		m.endLife()
		m.sessions.closeAndWait()
	}()
	defer m.queue.ShutDown()
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.informer.RunWithContext(ctx)
	}()
	if !cache.WaitForCacheSync(ctx.Done(), m.informer.HasSynced) {
		return nil
	}
	m.sweepPeerConfigMaps(ctx)
	wg.Add(2)
	go func() {
		defer wg.Done()
		m.worker(ctx)
	}()
	go func() {
		defer wg.Done()
		m.housekeeping(ctx)
	}()
	<-ctx.Done()
	m.queue.ShutDown()
	m.mu.Lock()
	entries := slices.Collect(maps.Values(m.peers))
	m.mu.Unlock()
	for _, e := range entries {
		e.cancel()
		<-e.done
	}
	return nil
}

func (m *Manager) worker(ctx context.Context) {
	for {
		name, shutdown := m.queue.Get()
		if shutdown {
			return
		}
		if err := m.reconcile(ctx, name); err != nil {
			m.log.Warn("reconcile FederationPeer", "peer", name, "err", err)
			m.queue.AddRateLimited(name)
		} else {
			m.queue.Forget(name)
		}
		m.queue.Done(name)
	}
}

// lookupPeerObject returns the FederationPeer from the informer cache.
// Anyone can make Establish look a name up, so the API server is asked
// only for a joiner Establish recorded lately, whose FederationPeer the
// cache may not show yet.
func (m *Manager) lookupPeerObject(ctx context.Context, name string) (*v1alpha1.FederationPeer, bool) {
	obj, exists, err := m.informer.GetStore().GetByKey(name)
	if err != nil || !exists {
		m.establishMu.Lock()
		_, recent := m.recorded[name]
		m.establishMu.Unlock()
		if !recent {
			return nil, false
		}
		u, err := m.dyn.Resource(v1alpha1.Resource).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, false
		}
		obj = u
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil, true
	}
	fp, err := decodePeer(u)
	if err != nil {
		return nil, true
	}
	return fp, true
}

// reconcile starts, restarts or stops the peer's goroutine to match its
// FederationPeer. A spec the federator cannot follow (a value it cannot
// read, a field that contradicts another, a trust domain an older
// FederationPeer holds) is not retried: the peer is Failed with a False
// Accepted condition naming each problem, the link is not run, and the
// next change of the object reconciles it again.
//
// The peer's identity is its trust domain and federator ID. A changed
// federator ID is a new peer object (the old identity's streams end); a
// changed trust domain is a new link: what the old one left (imports,
// trust, the stored bundle) is forgotten first.
func (m *Manager) reconcile(ctx context.Context, name string) error {
	obj, exists, err := m.informer.GetStore().GetByKey(name)
	if err != nil {
		return err
	}
	m.mu.Lock()
	e := m.peers[name]
	m.mu.Unlock()
	u, _ := obj.(*unstructured.Unstructured)
	if exists && u == nil {
		return fmt.Errorf("unexpected object %T in the FederationPeer cache", obj)
	}
	// A FederationPeer deleted and made again (a new uid) before this
	// saw the deletion is a new link, as if it had: the old one ends
	// first, whatever the new spec. On the accepting side, a new object
	// of the same trust domain was made by Establish just after it
	// stored the joiner's new bundle (or by hand, for the same peer,
	// which cannot link without joining again): that bundle stays.
	if e != nil && (!exists || u.GetUID() != e.uid) {
		keepBundle := false
		if exists {
			secret, _, _ := unstructured.NestedString(u.Object, "spec", "tokenSecretName")
			keepBundle = e.spec.TokenSecretName == "" && secret == "" && specTrustDomain(u) == e.p.td && !e.p.td.IsZero()
		}
		m.removePeer(ctx, name, e, "the FederationPeer was deleted on "+m.cfg.ClusterName, keepBundle)
		// A peer refused for the trust domain this one held may
		// now take it.
		m.enqueueSharing(name, e.spec.TrustDomain)
		e = nil
	}
	if !exists {
		return nil
	}
	fp, decodeErr := decodePeer(u)
	td, err := spiffeid.TrustDomainFromString(fp.Spec.TrustDomain)
	var id spiffeid.ID
	if err == nil {
		id, err = spiffeid.FromString(fp.Spec.FederatorID)
	}
	if err == nil && !id.MemberOf(td) {
		err = fmt.Errorf("spec.federatorID %s is not in spec.trustDomain %s", id, td)
	}
	identityOK := err == nil
	// A trust domain, and with it every federator ID in it, is one
	// link's: the older FederationPeer keeps it, whatever order the
	// federator sees them in.
	var conflictErr error
	if identityOK && td != m.trust.LocalTrustDomain() {
		if older := m.olderClaim(name, td, u.GetCreationTimestamp().Time); older != "" {
			conflictErr = fmt.Errorf("spec.trustDomain %s is the trust domain of FederationPeer %q, made before this one: a trust domain belongs to one link; delete one of them", td, older)
		}
	}
	if e != nil && e.specErr == nil && decodeErr == nil && conflictErr == nil && reflect.DeepEqual(e.spec, fp.Spec) {
		e.generation.Store(u.GetGeneration())
		return nil
	}
	if err == nil && td == m.trust.LocalTrustDomain() {
		err = fmt.Errorf("spec.trustDomain %s is this cluster's own", td)
	}
	if err == nil && (name == catalog.LocalSource || name == m.cfg.ClusterName) {
		err = fmt.Errorf("a peer cannot be named %q", name)
	}
	if err == nil && fp.Spec.TokenSecretName != "" {
		err = checkDialAddresses(fp.Spec.Addresses)
	}
	// A peer whose spec is refused keeps ageing what it imported by the
	// last staleness accepted for it.
	keepFor, drainFor := m.cfg.KeepFor, m.cfg.DrainFor
	if e != nil {
		keepFor, drainFor = e.keepFor, e.drainFor
	}
	k, d, staleErr := staleness(fp.Spec.Staleness, m.cfg.KeepFor, m.cfg.DrainFor)
	if staleErr == nil {
		keepFor, drainFor = k, d
	}
	specErr := joinProblems(decodeErr, err, conflictErr, staleErr)
	var lastErr error
	if e != nil {
		lastErr = e.specErr
		e.cancel()
		<-e.done
	}
	// Complete before it is installed: Run's shutdown cancels and waits
	// for every entry it finds.
	pctx, cancel := context.WithCancel(ctx)
	next := &peerEntry{uid: u.GetUID(), tokenID: u.GetAnnotations()[AnnotationTokenID], spec: fp.Spec, specErr: specErr, conflict: conflictErr != nil,
		keepFor: keepFor, drainFor: drainFor, cancel: cancel, done: make(chan struct{})}
	next.conditions = fp.Status.Conditions
	next.generation.Store(u.GetGeneration())
	old := m.replacePeer(name, e, next, td, id, identityOK)
	p := next.p
	if old != nil {
		// Another peer object: the old one's streams end, whichever side
		// opened them, and nothing it held lingers.
		old.endPeer()
		old.p.endSessionWait(m.cfg.DialTimeout)
		if old.p.td != p.td && !old.p.td.IsZero() {
			m.log.Info("spec.trustDomain changed: what the old trust domain's link held is dropped (its imports, its bundle and the stored copy); the new one links afresh",
				"peer", name, "old", old.p.td, "new", p.td)
			m.forgetPeer(ctx, name, old.p)
		}
	}
	if e == nil || e.spec.TrustDomain != fp.Spec.TrustDomain {
		m.enqueueSharing(name, fp.Spec.TrustDomain)
		if e != nil {
			m.enqueueSharing(name, e.spec.TrustDomain)
		}
	}
	if specErr != nil {
		// Not run as a spec it cannot follow says: once the entry
		// refuses new streams, one the peer opened before ends too,
		// before the refusal is recorded.
		next.endPeer()
		p.endSessionWait(m.cfg.DialTimeout)
		if lastErr == nil || lastErr.Error() != specErr.Error() {
			m.log.Warn("FederationPeer spec not accepted; the link is not run until the spec changes", "peer", name, "err", specErr)
		}
		p.tracker.failed(m.clock.Now(), specErr)
		close(next.done)
		return nil
	}
	go func() {
		defer close(next.done)
		m.runPeer(pctx, next)
	}()
	return nil
}

// replacePeer gives next its peer object and puts it in the place of e
// (nil for a new peer). It returns e when next has a new peer object, so
// that the caller ends what the old one serves; nil when next keeps e's.
//
// The peer object is kept while its trust domain and federator ID stay
// (what was received survives a spec change), and when the new spec does
// not name a readable identity (the link is not run; what it had ages as
// after any loss). A changed federator ID makes a new object that takes
// over what was imported, to age from now if the new identity does not
// come; a changed trust domain makes a new object from nothing.
func (m *Manager) replacePeer(name string, e, next *peerEntry, td spiffeid.TrustDomain, id spiffeid.ID, identityOK bool) (old *peerEntry) {
	switch {
	case e == nil:
		next.p = m.makePeer(name, td, id)
	case !identityOK || (e.p.td == td && e.p.id == id):
		next.p = e.p
	default:
		next.p = m.makePeer(name, td, id)
		old = e
		if e.p.td == td {
			e.p.importMu.Lock()
			received, phase := e.p.received, e.p.phase
			e.p.importMu.Unlock()
			next.p.importMu.Lock()
			next.p.received, next.p.phase = received, phase
			next.p.publishLocked()
			next.p.importMu.Unlock()
			// Imports already ageing go on from when the peer was lost.
			since, lost := e.p.tracker.lostSince()
			if !lost {
				since = m.clock.Now()
			}
			next.p.tracker.disconnected(since, fmt.Errorf("spec.federatorID changed from %s to %s: waiting for the peer's federator as %s", e.p.id, id, id))
			m.log.Info("spec.federatorID changed: the old identity's streams end and it is no longer authorized",
				"peer", name, "old", e.p.id, "new", id)
		}
	}
	if old == nil && e != nil && e.peerLife.Err() == nil {
		next.peerLife, next.endPeer = e.peerLife, e.endPeer
	} else {
		next.peerLife, next.endPeer = context.WithCancel(context.Background())
	}
	m.mu.Lock()
	m.setPeerLocked(name, next)
	m.mu.Unlock()
	return old
}

// setPeerLocked puts e in peers under name, in place of any entry there;
// e nil removes the entry. m.mu is held.
func (m *Manager) setPeerLocked(name string, e *peerEntry) {
	if prev := m.peers[name]; prev != nil {
		held := m.byTrustDomain[prev.p.td]
		delete(held, name)
		if len(held) == 0 {
			delete(m.byTrustDomain, prev.p.td)
		}
		delete(m.peers, name)
	}
	if e == nil {
		return
	}
	m.peers[name] = e
	held := m.byTrustDomain[e.p.td]
	if held == nil {
		held = map[string]*peerEntry{}
		m.byTrustDomain[e.p.td] = held
	}
	held[name] = e
}

// makePeer makes the peer object for a FederationPeer. Its bundle is
// stored under the FederationPeer's name, set once here: sessions read
// it while reconcile runs.
func (m *Manager) makePeer(name string, td spiffeid.TrustDomain, id spiffeid.ID) *peer {
	p := newPeer(name, td, id, m.clock, m.exports)
	p.persistBundle = func(ctx context.Context, b *spiffebundle.Bundle) error { return m.storePeerBundle(ctx, name, b) }
	return p
}

// olderClaim returns the name of a FederationPeer other than name, made
// before created (or at the same second, with a smaller name), whose
// spec.trustDomain is td; or of a peer that holds td and whose deleted
// FederationPeer is not removed yet (its bundle is still trusted); ""
// if there is none.
func (m *Manager) olderClaim(name string, td spiffeid.TrustDomain, created time.Time) string {
	store := m.informer.GetStore()
	for _, n := range m.runningHolders(name, td) {
		if _, exists, _ := store.GetByKey(n); !exists {
			return n
		}
	}
	older := ""
	for _, u := range m.specHolders(name, td) {
		c := u.GetCreationTimestamp().Time
		if c.Before(created) || (c.Equal(created) && u.GetName() < name) {
			if older == "" || u.GetName() < older {
				older = u.GetName()
			}
		}
	}
	return older
}

// trustDomainHolder returns the peer, other than name, whose link has td:
// a FederationPeer with that spec.trustDomain, or a running peer of it.
func (m *Manager) trustDomainHolder(name string, td spiffeid.TrustDomain) string {
	if holders := m.specHolders(name, td); len(holders) > 0 {
		return holders[0].GetName()
	}
	if running := m.runningHolders(name, td); len(running) > 0 {
		return running[0]
	}
	return ""
}

// runsTrustDomain reports whether a peer other than name holds td.
func (m *Manager) runsTrustDomain(name string, td spiffeid.TrustDomain) bool {
	return len(m.runningHolders(name, td)) > 0
}

// runningHolders are the peers other than name whose entry holds td: not
// refused for claiming a trust domain another holds.
func (m *Manager) runningHolders(name string, td spiffeid.TrustDomain) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for n, e := range m.byTrustDomain[td] {
		if n != name && !e.conflict {
			out = append(out, n)
		}
	}
	return out
}

// specTrustDomain is a FederationPeer's spec.trustDomain; zero when it
// does not read.
func specTrustDomain(u *unstructured.Unstructured) spiffeid.TrustDomain {
	s, _, _ := unstructured.NestedString(u.Object, "spec", "trustDomain")
	td, err := spiffeid.TrustDomainFromString(s)
	if err != nil {
		return spiffeid.TrustDomain{}
	}
	return td
}

// enqueueSharing reconciles again the FederationPeers other than name
// whose spec.trustDomain is td: which of them holds it may have changed.
func (m *Manager) enqueueSharing(name, td string) {
	want, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		return
	}
	for _, u := range m.specHolders(name, want) {
		m.queue.Add(u.GetName())
	}
}

// byTrustDomain indexes the FederationPeer cache by spec.trustDomain,
// as a trust domain's String (a FederationPeer whose trust domain does
// not read is not indexed).
const byTrustDomain = "spec.trustDomain"

func indexTrustDomain(obj any) ([]string, error) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil, nil
	}
	if td := specTrustDomain(u); !td.IsZero() {
		return []string{td.String()}, nil
	}
	return nil, nil
}

// specHolders are the cached FederationPeers other than name whose
// spec.trustDomain is td, by name.
func (m *Manager) specHolders(name string, td spiffeid.TrustDomain) []*unstructured.Unstructured {
	if td.IsZero() {
		return nil
	}
	objs, _ := m.informer.GetIndexer().ByIndex(byTrustDomain, td.String())
	var out []*unstructured.Unstructured
	for _, obj := range objs {
		if u, ok := obj.(*unstructured.Unstructured); ok && u.GetName() != name {
			out = append(out, u)
		}
	}
	slices.SortFunc(out, func(a, b *unstructured.Unstructured) int { return strings.Compare(a.GetName(), b.GetName()) })
	return out
}

// joinProblems joins the non-nil errors into one, "; " between them, so
// that a condition message reads on one line.
func joinProblems(errs ...error) error {
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}

// checkDialAddresses checks a joining side's spec.addresses: at least
// one, each host:port.
func checkDialAddresses(addrs []string) error {
	if len(addrs) == 0 {
		return errors.New("spec.addresses is empty: the joining side dials the peer's federator and needs at least one of its addresses (host:port)")
	}
	for _, a := range addrs {
		if err := CheckAddress(a); err != nil {
			return fmt.Errorf("spec.addresses: %w", err)
		}
	}
	return nil
}

// removePeer ends a link: the stream is told Terminate, the peer's
// imports leave the catalog, its bundle is forgotten, and a join token
// never spent is deleted, so that joining again starts clean.
//
// keepBundle keeps the peer's bundle, trusted and stored, and sends no
// Terminate: a new link of the same name and trust domain holds it now.
func (m *Manager) removePeer(ctx context.Context, name string, e *peerEntry, reason string, keepBundle bool) {
	if keepBundle {
		// The stream ends without Terminate: the peer's new link is
		// this one's successor, and its next stream finds it.
		e.p.endSessionWait(m.cfg.DialTimeout)
	} else {
		e.p.stopSession(reason, m.cfg.DialTimeout)
	}
	e.endPeer()
	e.cancel()
	<-e.done
	if keepBundle {
		e.p.removeImports()
	} else {
		m.forgetPeer(ctx, name, e.p)
	}
	m.exports.forget(name)
	if e.spec.TokenSecretName != "" {
		if err := m.deleteJoinSecret(ctx, name, e.spec.TokenSecretName, e.tokenID); err != nil {
			m.log.Warn("delete the join token's Secret", "peer", name, "err", err)
		}
	}
	m.mu.Lock()
	m.setPeerLocked(name, nil)
	m.mu.Unlock()
	m.log.Info("link removed", "peer", name)
}

// forgetPeer drops what this side holds from a peer whose link ended:
// its imports, its bundle (this cluster stops trusting its identities)
// and the stored copy of the bundle.
func (m *Manager) forgetPeer(ctx context.Context, name string, p *peer) {
	p.removeImports()
	// A peer refused for a trust domain another link holds never held
	// that trust domain's bundle: the other link keeps it.
	if !m.runsTrustDomain(name, p.td) {
		m.trust.DeletePeer(p.td)
	}
	if err := m.deletePeerBundle(ctx, name); err != nil {
		m.log.Warn("delete the peer's ConfigMap", "peer", name, "err", err)
	}
}

// sweepPeerConfigMaps deletes the peer ConfigMaps no FederationPeer
// owns: a FederationPeer deleted while the federator was down leaves its
// ConfigMap, and a later link of the same name must not find the old
// peer's roots there. A failure is logged; the next start tries again.
func (m *Manager) sweepPeerConfigMaps(ctx context.Context) {
	cms := m.kube.CoreV1().ConfigMaps(m.cfg.Namespace)
	list, err := cms.List(ctx, metav1.ListOptions{LabelSelector: LabelPeer})
	if err != nil {
		m.log.Warn("list peer ConfigMaps to delete those no FederationPeer owns", "err", err)
		return
	}
	// Establish stores a joiner's ConfigMap before it creates its
	// FederationPeer: none is between the two while this runs.
	m.establishMu.Lock()
	defer m.establishMu.Unlock()
	for _, cm := range list.Items {
		name := cm.Labels[LabelPeer]
		if _, exists, _ := m.informer.GetStore().GetByKey(name); exists || cm.Name != peerConfigMapName(name) {
			continue
		}
		// The informer can lag a create: ask the API server.
		if _, err := m.dyn.Resource(v1alpha1.Resource).Get(ctx, name, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			continue
		}
		uid := cm.UID
		// The copy kept to skip rewriting an unchanged bundle goes too,
		// or a later store of the same bundle would write nothing.
		m.forgetStoredBundle(name)
		err := cms.Delete(ctx, cm.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		switch {
		case err == nil:
			m.log.Info("deleted a peer ConfigMap no FederationPeer owns (its link was deleted while the federator was down)", "peer", name, "configMap", cm.Name)
		case apierrors.IsNotFound(err) || apierrors.IsConflict(err):
		default:
			m.log.Warn("delete a peer ConfigMap no FederationPeer owns", "peer", name, "configMap", cm.Name, "err", err)
		}
	}
}

// deleteJoinSecret deletes the Secret `federator join` stored the peer's
// token in, if it is one (labelled for this peer) and holds the token
// the ended link was made from: a join made again at once, before the
// federator saw the old FederationPeer go, stored its new token under the
// same name.
func (m *Manager) deleteJoinSecret(ctx context.Context, peer, name, tokenID string) error {
	secrets := m.kube.CoreV1().Secrets(m.cfg.Namespace)
	sec, err := secrets.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if sec.Labels[LabelJoinToken] != peer || sec.Annotations[AnnotationTokenID] != tokenID {
		return nil
	}
	uid := sec.UID
	err = secrets.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// runPeer serves one peer until ctx ends: it makes sure the link is
// established, then (on the side that joined) keeps a stream up.
func (m *Manager) runPeer(ctx context.Context, e *peerEntry) {
	p := e.p
	log := m.log.With("peer", p.name)
	backoff := m.cfg.BackoffMin
	wait := func() bool {
		t := m.clock.NewTimer(backoff)
		defer t.Stop()
		backoff = min(2*backoff, m.cfg.BackoffMax)
		select {
		case <-ctx.Done():
			return false
		case <-t.C():
			return true
		}
	}
	for {
		err := m.ensureEstablished(ctx, e)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		if isPermanent(err) {
			log.Warn("link refused; waiting for the FederationPeer to change", "err", err)
			p.tracker.failed(m.clock.Now(), err)
			<-ctx.Done()
			return
		}
		log.Info("cannot establish the link yet", "err", err)
		p.tracker.unreachable(m.clock.Now(), err)
		if !wait() {
			return
		}
	}
	p.tracker.established()
	if e.spec.TokenSecretName == "" {
		// The accepting side: the joiner dials in (Exchange).
		<-ctx.Done()
		return
	}
	for attempt := 0; ; attempt++ {
		addr := e.spec.Addresses[attempt%len(e.spec.Addresses)]
		start := m.clock.Now()
		err := m.dialSession(ctx, p, addr)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrTerminated) {
			log.Warn("the peer terminated the link; its imports and trust bundle are dropped", "err", err)
			m.forgetPeer(ctx, p.name, p)
			<-ctx.Done()
			return
		}
		log.Info("federation stream down", "address", addr, "err", err)
		if m.clock.Since(start) > m.cfg.BackoffMax {
			backoff = m.cfg.BackoffMin
		}
		if !wait() {
			return
		}
	}
}

// ensureEstablished loads the peer's bundle, or on the joining side runs
// Establish with the stored token first. A join token present means a
// link still to make: Establish runs even if a bundle is stored, since
// one left by an earlier link of the same name must not be trusted in
// place of the peer's roots. (A token whose link was made, but that could
// not be deleted, is answered again by the peer.)
func (m *Manager) ensureEstablished(ctx context.Context, e *peerEntry) error {
	p := e.p
	var b *spiffebundle.Bundle
	if e.spec.TokenSecretName != "" {
		sec, err := m.kube.CoreV1().Secrets(m.cfg.Namespace).Get(ctx, e.spec.TokenSecretName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return err
		case sec.Annotations[AnnotationTokenID] != e.tokenID:
			// A token joined since this FederationPeer was made (deleted
			// and joined again): it is the new link's to spend, not
			// this one's, which is about to end.
		default:
			if b, err = m.establishWith(ctx, p, sec); err != nil {
				return err
			}
		}
	}
	if b == nil {
		stored, found, err := m.loadPeerBundle(ctx, p.name, p.td)
		if err != nil {
			return err
		}
		if !found && e.spec.TokenSecretName == "" {
			return permanent(fmt.Errorf("no trust bundle is stored for this peer (ConfigMap %s/%s) and there is no token to link with: delete the FederationPeer and link again", m.cfg.Namespace, peerConfigMapName(p.name)))
		}
		if !found {
			return permanent(fmt.Errorf("no trust bundle is stored for this peer's trust domain %s (ConfigMap %s/%s) and the token Secret %s/%s is gone: delete the FederationPeer and join again with a new token", p.td, m.cfg.Namespace, peerConfigMapName(p.name), m.cfg.Namespace, e.spec.TokenSecretName))
		}
		b = stored
	}
	if err := m.trust.SetPeer(b); err != nil && !errors.Is(err, trust.ErrStaleBundle) {
		return permanent(err)
	}
	p.tracker.bundle(b)
	return nil
}

// establishWith links with the peer using the token in sec: it runs
// Establish, stores the peer's bundle and deletes the spent token.
func (m *Manager) establishWith(ctx context.Context, p *peer, sec *corev1.Secret) (*spiffebundle.Bundle, error) {
	tok, err := DecodeToken(string(sec.Data[keyToken]))
	if err != nil {
		return nil, permanent(err)
	}
	if tok.TrustDomain != p.td.Name() || tok.FederatorID != p.id.String() {
		return nil, permanent(fmt.Errorf("the token in Secret %s names %s (%s), the FederationPeer %s (%s)", sec.Name, tok.TrustDomain, tok.FederatorID, p.td, p.id))
	}
	if tok.Expired(m.clock.Now()) {
		// A link made with it whose token could not be deleted is
		// answered again by the peer, expired or not; with nothing
		// stored, there is no such link.
		if _, found, _ := m.loadPeerBundle(ctx, p.name, p.td); !found {
			return nil, permanent(fmt.Errorf("%w: it expired at %s before the link was established; ask the peer for a new one", ErrInvalidToken, tok.Expires.Format(time.RFC3339)))
		}
	}
	b, err := m.establish(ctx, tok)
	if err != nil {
		return nil, err
	}
	if err := m.storePeerBundle(ctx, p.name, b); err != nil {
		return nil, err
	}
	// The secret is spent; the token is of no further use. Only this
	// token: a Secret replaced since (joined again) is not this one's.
	uid, rv := sec.UID, sec.ResourceVersion
	err = m.kube.CoreV1().Secrets(m.cfg.Namespace).Delete(ctx, sec.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid, ResourceVersion: &rv}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		m.log.Warn("delete the spent token", "peer", p.name, "err", err)
	}
	m.log.Info("link established", "peer", p.name)
	return b, nil
}

// dial connects to a peer's federator, verifying it against bundle and id.
func (m *Manager) dial(addr string, bundle x509bundle.Source, id spiffeid.ID) (*grpc.ClientConn, error) {
	cfg := tlsconfig.MTLSClientConfig(m.svid, bundle, tlsconfig.AuthorizeID(id))
	cfg.ServerName = ReservedSNI
	return grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(m.cfg.Limits.MaxMessageBytes)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: m.cfg.Heartbeat, Timeout: m.cfg.HeartbeatTimeout, PermitWithoutStream: false}),
	)
}

// dialSession opens one Exchange stream to the peer and runs it.
func (m *Manager) dialSession(ctx context.Context, p *peer, addr string) error {
	conn, err := m.dial(addr, m.trust, p.id)
	if err != nil {
		p.tracker.unreachable(m.clock.Now(), err)
		return err
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := fedv1.NewFederationServiceClient(conn).Exchange(sctx)
	if err != nil {
		err = fmt.Errorf("open stream to %s: %w", addr, err)
		p.tracker.unreachable(m.clock.Now(), err)
		return err
	}
	return p.runSession(ctx, m.sessionConfig(), st, cancel)
}

func (m *Manager) sessionConfig() sessionConfig {
	return sessionConfig{clusterName: m.cfg.ClusterName, heartbeat: m.cfg.Heartbeat,
		heartbeatTimeout: m.cfg.HeartbeatTimeout, limits: m.cfg.Limits, log: m.log}
}

// Exchange serves a peer's stream: the client certificate must verify
// against a peer's bundle and be the federator ID its FederationPeer
// names.
func (m *Manager) Exchange(srv fedv1.FederationService_ExchangeServer) error {
	certs := peerCertificates(srv.Context())
	if len(certs) == 0 {
		return status.Error(codes.Unauthenticated, "no client certificate: federation streams need the peer federator's SVID")
	}
	id, _, err := x509svid.Verify(certs, m.trust)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "the client certificate does not verify against any linked peer's bundle: %v", err)
	}
	e := m.peerByID(id)
	if e == nil {
		return status.Errorf(codes.PermissionDenied, "no FederationPeer expects federator %s", id)
	}
	if e.specErr != nil {
		return status.Errorf(codes.FailedPrecondition, "this cluster's FederationPeer %q is not accepted by its federator (see its Accepted condition there); the link is not run until it is fixed", e.p.name)
	}
	// The session ends with the manager too: Run returns only once every
	// stream it served is over.
	if !m.sessions.add() {
		return status.Error(codes.Unavailable, "the federator is shutting down")
	}
	defer m.sessions.done()
	ctx, cancel := context.WithCancel(srv.Context())
	defer cancel()
	defer context.AfterFunc(m.life, cancel)()
	// And with the peer object: one replaced (a new federator ID or
	// trust domain) or removed since peerByID found it serves nothing.
	defer context.AfterFunc(e.peerLife, cancel)()
	err = e.p.runSession(ctx, m.sessionConfig(), srv, nil)
	switch {
	case errors.Is(err, ErrTerminated):
		m.log.Warn("the peer terminated the link; its imports and trust bundle are dropped", "peer", e.p.name, "err", err)
		fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.DialTimeout)
		defer fcancel()
		m.forgetPeer(fctx, e.p.name, e.p)
		return nil
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Unavailable, "stream ended")
	case errors.Is(err, ErrProtocol):
		return status.Error(codes.InvalidArgument, err.Error())
	default:
		return status.Error(codes.Unavailable, err.Error())
	}
}

// peerByID returns the entry that expects federator id: the one that
// holds its trust domain, before one refused for claiming it too. (An
// entry whose federator ID is outside its own trust domain is refused
// and runs no link; it expects nobody.)
func (m *Manager) peerByID(id spiffeid.ID) *peerEntry {
	m.mu.Lock()
	defer m.mu.Unlock()
	if id.TrustDomain() == m.trust.LocalTrustDomain() {
		return nil
	}
	var found *peerEntry
	for _, e := range m.byTrustDomain[id.TrustDomain()] {
		if e.p.id == id && (found == nil || found.conflict) {
			found = e
		}
	}
	return found
}

// Synced reports whether every peer's imports are known: each peer sent
// its services in this process, or was given keepFor to do so (the same
// grace a peer lost at runtime gets). The import writer deletes nothing
// before, so a federator restart does not churn every import.
func (m *Manager) Synced() bool {
	if !m.informer.HasSynced() {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started.IsZero() {
		return false
	}
	elapsed := m.clock.Since(m.started)
	for _, name := range m.informer.GetStore().ListKeys() {
		e, ok := m.peers[name]
		switch {
		case !ok && elapsed < m.cfg.KeepFor:
			return false
		case ok && !e.p.servicesSynced() && elapsed < e.keepFor:
			return false
		}
	}
	return true
}

// Statuses returns every peer's status, sorted by name.
func (m *Manager) Statuses() []PeerStatus {
	m.mu.Lock()
	entries := slices.Collect(maps.Values(m.peers))
	m.mu.Unlock()
	out := make([]PeerStatus, 0, len(entries))
	for _, e := range entries {
		s := e.p.tracker.Snapshot()
		s.Name = e.p.name
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b PeerStatus) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out
}

// housekeeping ages lost peers' imports and writes changed status.
func (m *Manager) housekeeping(ctx context.Context) {
	tick := m.clock.NewTicker(min(m.cfg.StatusInterval, time.Second))
	defer tick.Stop()
	lastWrite := time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
		}
		now := m.clock.Now()
		m.mu.Lock()
		entries := slices.Collect(maps.Values(m.peers))
		m.mu.Unlock()
		for _, e := range entries {
			e.p.age(now, e.keepFor, e.drainFor)
		}
		if now.Sub(lastWrite) < m.cfg.StatusInterval {
			continue
		}
		lastWrite = now
		for _, e := range entries {
			m.writeStatus(ctx, e, now)
		}
	}
}
