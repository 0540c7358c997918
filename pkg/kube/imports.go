package kube

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
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// DefaultReservedNamespaces are never imported into, whatever a peer
// exports: they belong to the cluster's own control plane.
var DefaultReservedNamespaces = []string{"kube-system", "kube-public", "kube-node-lease"}

const (
	// importResync replays the informer caches, so the writer compares the
	// cluster with the catalog now and then even when nothing happens.
	importResync = 10 * time.Minute
	// maxRetryDelay caps the backoff of a failed write and the re-check of
	// an object that is in the way.
	maxRetryDelay = 5 * time.Minute
	// rediscoverEvery is how often a kind the API server did not serve is
	// looked up again, so installing Istio or the MCS CRDs after the
	// federator needs no restart.
	rediscoverEvery = time.Minute
)

// ImportOptions tunes an ImportWriter. The zero value of every field but
// ClusterName means its documented default.
type ImportOptions struct {
	// ClusterName names this cluster. Required. A catalog source of that
	// name is this cluster's own, never an import.
	ClusterName string
	// Logger receives lifecycle logs at Info and per-object logs at Debug;
	// nil discards them.
	Logger *slog.Logger
	// FlushInterval is how long catalog and cluster changes are collected
	// before the writer compares and writes; default 1s. It is also the
	// first retry delay after a failed write.
	FlushInterval time.Duration
	// QPS and Burst limit the writer's calls to the API server (a token
	// bucket, on top of the clients' own limits); defaults 20 and 40.
	QPS   float32
	Burst int
	// ReservedNamespaces are never imported into; nil means
	// DefaultReservedNamespaces. An empty, non-nil slice reserves none.
	ReservedNamespaces []string
	// Synced, when set, reports whether every peer's imports are known;
	// until it does, the writer creates and updates but deletes nothing.
	Synced func() bool
	// ListTimeout is how long a served kind's objects may take to be
	// listed (the writer's cache to sync) before every import of that
	// kind is reported in Skipped as not written; default 30s.
	ListTimeout time.Duration
}

// ImportWriter writes the services peers export to this cluster as Istio
// ServiceEntries and MCS ServiceImports, for visibility and for interop
// with Istio and MCS tooling. It is never on the propagation path: proxies
// get imported services from the catalog in memory, and the writer only
// mirrors that catalog into the API server, batched and rate limited.
//
// For every service (namespace, name) that at least one peer exports, it
// keeps, in the namespace of the same name:
//
//   - ServiceEntry "<name>.clusterset.local" (networking.istio.io/v1) for
//     host <name>.<namespace>.svc.clusterset.local, MESH_INTERNAL, with one
//     endpoint per (peer, gateway, locality with ready endpoints) that
//     points at the peer's east-west gateway, weighted by ready endpoints
//     (one peer's gateways in a locality share its ready count), in
//     network <peer>, labelled with the source cluster; resolution STATIC
//     when every endpoint address is an IP, DNS otherwise;
//     subjectAltNames are the SPIFFE IDs that serve the service;
//   - ServiceImport "<name>" (multicluster.x-k8s.io/v1alpha1), type
//     ClusterSetIP, with the same ports and status.clusters listing the
//     peers.
//
// Each kind is written only while the API server serves it (checked with
// discovery at start, after a failed write, and every minute while it is
// not served). Only objects labelled app.kubernetes.io/managed-by=isthmus
// are ever changed or deleted: an object of someone else's in the way
// makes the writer skip that service and say so in Skipped.
//
// In RBAC terms the writer needs list and watch on namespaces, and get,
// list, watch, create, update and delete on serviceentries
// (networking.istio.io) and serviceimports (multicluster.x-k8s.io), plus
// update on serviceimports/status.
type ImportWriter struct {
	opts     ImportOptions
	log      *slog.Logger
	kube     kubernetes.Interface
	istio    istioclient.Interface
	mcs      mcsclient.Interface
	store    *catalog.Store
	reserved map[string]bool
	limiter  flowcontrol.RateLimiter

	kubeInformers  informers.SharedInformerFactory
	istioInformers istioinformers.SharedInformerFactory
	mcsInformers   mcsinformers.SharedInformerFactory
	namespaces     corelisters.NamespaceLister
	nsSynced       cache.InformerSynced
	entries        *importKind
	imports        *importKind

	// dirty is signalled (capacity one) by informer events.
	dirty   chan struct{}
	updated chan struct{}

	// The fields below are owned by Run's goroutine.

	// retries holds, per object, when it may be tried again and why it
	// failed: failed writes, and objects of someone else's in the way.
	retries map[objectRef]*retry

	// progressEvery is how long a flush runs before it says which peers'
	// imports it is still writing, and how often it says it again:
	// progressEvery, the constant, which tests shorten.
	progressEvery time.Duration

	// mu guards skipped, the last published Skipped, and writing, the
	// peers whose imports the flush under way has yet to write.
	mu      sync.Mutex
	skipped map[string][]SkippedImport
	writing map[string]bool
}

// progressEvery: a flush that ends sooner (every flush but a first sync
// or a large change, at the writer's QPS) never says it is writing, so
// a peer's status does not flap at each one.
const progressEvery = time.Second

// importKind is one of the two kinds the writer keeps.
type importKind struct {
	kind       string // for messages: "ServiceEntry"
	gv         string // discovery group/version
	resource   string
	factory    interface{ Start(<-chan struct{}) }
	informer   cache.SharedIndexInformer
	served     bool
	started    bool
	startedAt  time.Time
	checkAfter time.Time // next discovery; zero: now
	// listErr is the last error of the informer's list or watch, kept
	// to say why its cache has not synced.
	listErr atomic.Pointer[error]
}

// objectRef names one object the writer owns or wants.
type objectRef struct {
	kind            string
	namespace, name string
}

func (r objectRef) String() string { return r.kind + " " + r.namespace + "/" + r.name }

// retry is the backoff state of one object.
type retry struct {
	delay     time.Duration
	notBefore time.Time
	// conflict is set when someone else's object holds the name.
	conflict bool
	// reason is reported in Skipped while set (conflicts, write errors
	// that retrying alone will not fix, and any that keeps coming back).
	reason string
	// failures counts the failed tries in a row, since the first.
	failures int
	since    time.Time
}

// at is when r may be tried again; zero for nil.
func (r *retry) at() time.Time {
	if r == nil {
		return time.Time{}
	}
	return r.notBefore
}

// NewImportWriter wires informers for the cluster behind the clients;
// nothing runs until Run.
func NewImportWriter(kube kubernetes.Interface, istio istioclient.Interface, mcs mcsclient.Interface, store *catalog.Store, opts ImportOptions) (*ImportWriter, error) {
	if opts.ClusterName == "" {
		return nil, errors.New("import writer: cluster name is required")
	}
	if kube == nil || istio == nil || mcs == nil || store == nil {
		return nil, errors.New("import writer: kube, istio and mcs clients and the store are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = time.Second
	}
	if opts.ListTimeout <= 0 {
		opts.ListTimeout = 30 * time.Second
	}
	if opts.QPS <= 0 {
		opts.QPS = 20
	}
	if opts.Burst <= 0 {
		opts.Burst = 40
	}
	if opts.ReservedNamespaces == nil {
		opts.ReservedNamespaces = DefaultReservedNamespaces
	}
	w := &ImportWriter{
		opts:     opts,
		log:      opts.Logger.With("component", "import-writer"),
		kube:     kube,
		istio:    istio,
		mcs:      mcs,
		store:    store,
		reserved: map[string]bool{},
		limiter:  flowcontrol.NewTokenBucketRateLimiter(opts.QPS, opts.Burst),
		dirty:    make(chan struct{}, 1),
		updated:  make(chan struct{}, 1),
		retries:  map[objectRef]*retry{},

		progressEvery: progressEvery,
		skipped:       map[string][]SkippedImport{},
	}
	for _, ns := range opts.ReservedNamespaces {
		w.reserved[ns] = true
	}

	managed := func(o *metav1.ListOptions) {
		o.LabelSelector = labels.Set{LabelManagedBy: ManagedByIsthmus}.String()
	}
	w.kubeInformers = informers.NewSharedInformerFactory(kube, importResync)
	w.istioInformers = istioinformers.NewSharedInformerFactoryWithOptions(istio, importResync, istioinformers.WithTweakListOptions(managed))
	w.mcsInformers = mcsinformers.NewSharedInformerFactoryWithOptions(mcs, importResync, mcsinformers.WithTweakListOptions(managed))

	nsInf := w.kubeInformers.Core().V1().Namespaces()
	w.namespaces = nsInf.Lister()
	w.entries = &importKind{
		kind: "ServiceEntry", gv: networkingv1.SchemeGroupVersion.String(), resource: "serviceentries",
		factory:  w.istioInformers,
		informer: w.istioInformers.Networking().V1().ServiceEntries().Informer(),
	}
	w.imports = &importKind{
		kind: "ServiceImport", gv: mcsv1alpha1.SchemeGroupVersion.String(), resource: "serviceimports",
		factory:  w.mcsInformers,
		informer: w.mcsInformers.Multicluster().V1alpha1().ServiceImports().Informer(),
	}
	// Every event only marks the writer dirty: the flush reads the current
	// state of everything, so what an event says does not matter.
	mark := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { w.markDirty() },
		UpdateFunc: func(any, any) { w.markDirty() },
		DeleteFunc: func(any) { w.markDirty() },
	}
	for _, inf := range []cache.SharedIndexInformer{nsInf.Informer(), w.entries.informer, w.imports.informer} {
		if _, err := inf.AddEventHandler(mark); err != nil {
			return nil, fmt.Errorf("import writer: add event handler: %w", err)
		}
	}
	for _, k := range []*importKind{w.entries, w.imports} {
		err := k.informer.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
			k.listErr.Store(&err)
			cache.DefaultWatchErrorHandler(ctx, r, err)
		})
		if err != nil {
			return nil, fmt.Errorf("import writer: watch error handler: %w", err)
		}
	}
	w.nsSynced = nsInf.Informer().HasSynced
	return w, nil
}

// Skipped returns, by peer cluster name, what the writer could not write
// for that peer's services and why, as of the last flush. The caller owns
// the result.
func (w *ImportWriter) Skipped() map[string][]SkippedImport {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string][]SkippedImport, len(w.skipped))
	for peer, list := range w.skipped {
		out[peer] = slices.Clone(list)
	}
	return out
}

// Writing reports whether the writer is still writing peer's imports: a
// flush that has run for a second or more (a first sync of thousands of
// imports takes minutes at the writer's QPS) has not reached every
// service of that peer yet. Skipped is as of the last flush until then.
func (w *ImportWriter) Writing(peer string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writing[peer]
}

// Updated receives a value (capacity one, sends never block) whenever
// Skipped or Writing changes; read them after it.
func (w *ImportWriter) Updated() <-chan struct{} { return w.updated }

func (w *ImportWriter) markDirty() {
	select {
	case w.dirty <- struct{}{}:
	default:
	}
}

// Run starts the informers and keeps the cluster's imports equal to the
// catalog until ctx ends. It returns nil on a clean shutdown, after every
// goroutine it started has stopped. Run may be called once.
func (w *ImportWriter) Run(ctx context.Context) error {
	defer utilruntime.HandleCrash()
	defer w.kubeInformers.Shutdown()
	defer w.istioInformers.Shutdown()
	defer w.mcsInformers.Shutdown()
	// Cancelled first (defers run last-in first-out), so the Shutdowns
	// above find their informers stopping.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	w.log.Info("starting", "cluster", w.opts.ClusterName, "flushInterval", w.opts.FlushInterval,
		"qps", w.opts.QPS, "burst", w.opts.Burst, "reservedNamespaces", w.opts.ReservedNamespaces)
	w.kubeInformers.Start(ctx.Done())
	for _, k := range []*importKind{w.entries, w.imports} {
		w.discover(ctx, k, time.Now())
	}
	// Only the namespaces are waited for: a kind whose CRD is missing or
	// whose RBAC is wrong must not keep the writer from writing the other.
	if !cache.WaitForCacheSync(ctx.Done(), w.nsSynced) {
		return nil
	}

	changes, unsubscribe := w.store.Subscribe()
	defer unsubscribe()

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var due time.Time // when timer fires; zero when it is stopped
	schedule := func(at time.Time) {
		if !due.IsZero() && !at.Before(due) {
			return
		}
		due = at
		timer.Reset(max(time.Until(at), 0))
	}
	for {
		select {
		case <-ctx.Done():
			w.log.Info("stopped")
			return nil
		case <-changes:
			schedule(time.Now().Add(w.opts.FlushInterval))
		case <-w.dirty:
			schedule(time.Now().Add(w.opts.FlushInterval))
		case <-timer.C:
			due = time.Time{}
			if next := w.flush(ctx); !next.IsZero() {
				schedule(next)
			}
		}
	}
}

// discover asks the API server whether it serves k, and starts k's
// informer the first time it does.
func (w *ImportWriter) discover(ctx context.Context, k *importKind, now time.Time) {
	k.checkAfter = now.Add(rediscoverEvery)
	list, err := discovery.ToServerResourcesInterfaceWithContext(w.kube.Discovery()).ServerResourcesForGroupVersionWithContext(ctx, k.gv)
	served := false
	if err == nil {
		served = slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == k.resource })
	} else if !apierrors.IsNotFound(err) {
		w.log.Debug("discovery failed, will retry", "kind", k.kind, "groupVersion", k.gv, "error", err)
	}
	if served != k.served {
		if served {
			w.log.Info("kind served, writing it", "kind", k.kind, "groupVersion", k.gv)
		} else {
			w.log.Info("kind not served by the API server, not writing it", "kind", k.kind, "groupVersion", k.gv)
		}
	}
	k.served = served
	if served && !k.started {
		k.started, k.startedAt = true, now
		k.factory.Start(ctx.Done())
	}
}

// unsyncedRecheck is how often the flush looks again at a served kind
// whose cache has not synced within ImportOptions.ListTimeout.
const unsyncedRecheck = 10 * time.Second

// unreadable says why k cannot be written now although it is served,
// once its cache has failed to sync for timeout; "" otherwise.
func (k *importKind) unreadable(now time.Time, timeout time.Duration) string {
	if !k.served || !k.started || k.informer.HasSynced() || now.Sub(k.startedAt) < timeout {
		return ""
	}
	why := "no answer yet"
	if err := k.listErr.Load(); err != nil {
		why = (*err).Error()
	}
	// Nothing in it that changes from one flush to the next: a reason
	// that did would rewrite every peer's status at each look.
	return fmt.Sprintf("%s objects cannot be read from the API server (not listed within %s: %s); the federator needs list and watch on %s.%s",
		k.kind, timeout, why, k.resource, strings.Split(k.gv, "/")[0])
}

// usable reports whether k can be written now: served, and its cache
// synced.
func (k *importKind) usable() bool { return k.served && k.started && k.informer.HasSynced() }

// namespaceProblem says why nothing can be imported into ns, or "".
func (w *ImportWriter) namespaceProblem(ns string) string {
	if w.reserved[ns] {
		return fmt.Sprintf("namespace %s is reserved: Isthmus never imports into it", ns)
	}
	n, err := w.namespaces.Get(ns)
	if err != nil {
		return fmt.Sprintf("namespace %s does not exist in this cluster", ns)
	}
	if n.DeletionTimestamp != nil || n.Status.Phase == corev1.NamespaceTerminating {
		return fmt.Sprintf("namespace %s is being deleted", ns)
	}
	return ""
}

// flush makes the cluster match the catalog: it writes what differs,
// deletes what no peer exports any more, and publishes Skipped. It returns
// when it wants to run again (zero: only on the next change).
func (w *ImportWriter) flush(ctx context.Context) time.Time {
	now := time.Now()
	var next time.Time
	wake := func(ats ...time.Time) {
		for _, at := range ats {
			if !at.IsZero() && (next.IsZero() || at.Before(next)) {
				next = at
			}
		}
	}
	// unreadable says, once per flush, why a served kind cannot be
	// written (its objects not listed in time).
	unreadable := map[*importKind]string{}
	for _, k := range []*importKind{w.entries, w.imports} {
		if !k.served && !now.Before(k.checkAfter) {
			w.discover(ctx, k, now)
		}
		unreadable[k] = k.unreadable(now, w.opts.ListTimeout)
		switch {
		case !k.served:
			wake(k.checkAfter)
		case k.usable():
		case unreadable[k] != "":
			// Not syncing (RBAC, a broken conversion webhook): reported,
			// and looked at again now and then, not at every interval.
			wake(now.Add(max(unsyncedRecheck, w.opts.FlushInterval)))
		default:
			// Cache still syncing: look again shortly.
			wake(now.Add(w.opts.FlushInterval))
		}
	}

	var snaps []*catalog.Snapshot
	for _, src := range w.store.Sources() {
		snaps = append(snaps, w.store.Get(src))
	}
	plan := planImports(w.opts.ClusterName, snaps, w.namespaceProblem)
	skipped := plan.skipped

	// remaining counts, by peer, the services not yet begun; a long
	// flush says which peers have some (Writing).
	remaining := map[string]int{}
	for _, svc := range plan.services {
		for _, peer := range svc.peers {
			remaining[peer]++
		}
	}
	lastProgress := now
	var begun *importedService

	// planned holds both objects of every service in the plan, wanted
	// those that are to exist (no conflict, kind usable).
	planned, wanted := map[objectRef]bool{}, map[objectRef]bool{}
	for _, svc := range plan.services {
		if ctx.Err() != nil {
			return time.Time{}
		}
		if begun != nil {
			for _, peer := range begun.peers {
				remaining[peer]--
			}
		}
		begun = svc
		if t := time.Now(); t.Sub(lastProgress) >= w.progressEvery {
			lastProgress = t
			w.publishWriting(remaining)
		}
		seRef := objectRef{kind: w.entries.kind, namespace: svc.se.Namespace, name: svc.se.Name}
		siRef := objectRef{kind: w.imports.kind, namespace: svc.si.Namespace, name: svc.si.Name}
		planned[seRef], planned[siRef] = true, true
		// Someone else's object in the way of either kind skips the whole
		// service, so that a user sees it served by one owner only.
		inTheWay := false
		for _, reason := range []string{w.conflict(ctx, seRef, w.entries, now), w.conflict(ctx, siRef, w.imports, now)} {
			if reason != "" {
				inTheWay = true
				skipped.addAll(svc.peers, svc.key, "%s", reason)
				wake(w.retries[seRef].at(), w.retries[siRef].at())
			}
		}
		if inTheWay {
			continue
		}
		for _, step := range []struct {
			ref   objectRef
			kind  *importKind
			write func(context.Context) error
		}{
			{seRef, w.entries, func(ctx context.Context) error { return w.writeServiceEntry(ctx, svc.se) }},
			{siRef, w.imports, func(ctx context.Context) error { return w.writeServiceImport(ctx, svc.si) }},
		} {
			if !step.kind.usable() {
				if reason := unreadable[step.kind]; reason != "" {
					skipped.addAll(svc.peers, svc.key, "%s", reason)
				}
				continue
			}
			wanted[step.ref] = true
			if r := w.retries[step.ref]; r != nil && now.Before(r.notBefore) {
				wake(r.notBefore)
				if r.reason != "" {
					skipped.addAll(svc.peers, svc.key, "%s", r.reason)
				}
				continue
			}
			err := step.write(ctx)
			if err == nil {
				delete(w.retries, step.ref)
				continue
			}
			if ctx.Err() != nil {
				return time.Time{}
			}
			r := w.fail(step.ref, step.kind, err, now)
			wake(r.notBefore)
			if r.conflict {
				// Found out only now: the next flush skips the service and
				// removes what was written of it.
				skipped.addAll(svc.peers, svc.key, "%s", r.reason)
				wake(now)
				break
			}
			if r.reason != "" {
				skipped.addAll(svc.peers, svc.key, "%s", r.reason)
			}
		}
	}

	// What Isthmus wrote and nobody exports any more goes, once every
	// peer has had its chance to say what it exports: after a federator
	// restart the catalog is empty until the peers resync, and deleting
	// then would only churn every import.
	synced := w.opts.Synced == nil || w.opts.Synced()
	if !synced {
		wake(now.Add(w.opts.FlushInterval))
	}
	for _, k := range []*importKind{w.entries, w.imports} {
		if !k.usable() || !synced {
			continue
		}
		for _, ref := range w.managedObjects(k) {
			if wanted[ref] || ctx.Err() != nil {
				continue
			}
			if r := w.retries[ref]; r != nil && now.Before(r.notBefore) {
				wake(r.notBefore)
				continue
			}
			if err := w.deleteObject(ctx, ref); err != nil {
				if ctx.Err() != nil {
					return time.Time{}
				}
				wake(w.fail(ref, k, err, now).notBefore)
				continue
			}
			delete(w.retries, ref)
		}
	}
	// Forget the retry state of objects that are neither planned nor ours.
	for ref, r := range w.retries {
		if !planned[ref] && (r.conflict || !w.isManaged(ref)) {
			delete(w.retries, ref)
		}
	}
	w.publish(skipped.normalize())
	w.publishWriting(nil)
	return next
}

// publishWriting makes Writing say the peers with a service remaining,
// and signals Updated when that changed.
func (w *ImportWriter) publishWriting(remaining map[string]int) {
	writing := map[string]bool{}
	for peer, n := range remaining {
		if n > 0 {
			writing[peer] = true
		}
	}
	w.mu.Lock()
	changed := !maps.Equal(w.writing, writing)
	if changed {
		w.writing = writing
	}
	w.mu.Unlock()
	if !changed {
		return
	}
	w.log.Debug("imports being written", "peers", len(writing))
	select {
	case w.updated <- struct{}{}:
	default:
	}
}

// conflict returns why someone else's object holds ref's name, or "". An
// object known to be in the way is looked at again (one GET) once its
// backoff is over, so the import is written soon after it goes away.
func (w *ImportWriter) conflict(ctx context.Context, ref objectRef, k *importKind, now time.Time) string {
	if !k.usable() {
		return ""
	}
	if obj, ok := w.cached(k, ref); ok {
		if isManaged(obj) {
			return ""
		}
		// A cache that was not filtered by label (fake clients) shows
		// other owners' objects directly.
		return w.markConflict(ref, now).reason
	}
	r := w.retries[ref]
	if r == nil || !r.conflict {
		return ""
	}
	if now.Before(r.notBefore) {
		return r.reason
	}
	managed, err := w.getLive(ctx, ref)
	switch {
	case apierrors.IsNotFound(err):
		delete(w.retries, ref)
		return ""
	case err != nil:
		w.log.Debug("re-checking object in the way failed", "object", ref, "error", err)
		return w.markConflict(ref, now).reason
	case managed:
		delete(w.retries, ref)
		return ""
	}
	return w.markConflict(ref, now).reason
}

func conflictReason(ref objectRef) string {
	return fmt.Sprintf("%s exists and is not managed by Isthmus (no label %s=%s); left untouched", ref, LabelManagedBy, ManagedByIsthmus)
}

func (w *ImportWriter) markConflict(ref objectRef, now time.Time) *retry {
	r := w.backoff(ref, now)
	if !r.conflict {
		w.log.Info("object in the way, not importing the service", "object", ref)
	}
	r.conflict = true
	r.reason = conflictReason(ref)
	return r
}

// backoff moves ref's retry time forward: FlushInterval the first time,
// doubling up to maxRetryDelay.
func (w *ImportWriter) backoff(ref objectRef, now time.Time) *retry {
	r := w.retries[ref]
	if r == nil {
		r = &retry{}
		w.retries[ref] = r
	}
	r.delay = min(max(2*r.delay, w.opts.FlushInterval), maxRetryDelay)
	r.notBefore = now.Add(r.delay)
	return r
}

// fail records a failed write or delete of ref.
func (w *ImportWriter) fail(ref objectRef, k *importKind, err error, now time.Time) *retry {
	if errors.Is(err, errNotManaged) {
		return w.markConflict(ref, now)
	}
	r := w.backoff(ref, now)
	r.conflict = false
	r.reason = ""
	if r.failures == 0 {
		r.since = now
	}
	r.failures++
	switch {
	case apierrors.IsInvalid(err), apierrors.IsBadRequest(err), apierrors.IsForbidden(err), apierrors.IsRequestEntityTooLargeError(err):
		// Retrying alone will not fix these: tell the user.
		r.reason = fmt.Sprintf("%s: write refused by the API server: %v", ref, err)
		w.log.Info("write refused, will retry", "object", ref, "retryIn", r.delay, "error", err)
	case apierrors.IsNotFound(err) || apierrors.IsMethodNotSupported(err):
		// The CRD may have gone: ask discovery before the next write.
		k.checkAfter = time.Time{}
		k.served = false
		w.log.Debug("write failed, re-checking whether the kind is served", "object", ref, "error", err)
	case r.failures >= failuresReported:
		// Retried a while and still failing (a webhook down, the API
		// server overloaded): tell the user, once it is not a blip.
		r.reason = fmt.Sprintf("%s: write failing since %s, still retrying: %v", ref, r.since.UTC().Format(time.RFC3339), err)
		if r.failures == failuresReported {
			w.log.Warn("write keeps failing, will retry", "object", ref, "failures", r.failures, "retryIn", r.delay, "error", err)
		}
	default:
		w.log.Debug("write failed, will retry", "object", ref, "retryIn", r.delay, "error", err)
	}
	return r
}

// failuresReported is how many failed tries in a row of an object's
// write make it reported in Skipped: with the backoff, about 7 flush
// intervals after the first.
const failuresReported = 3

var errNotManaged = errors.New("object exists and is not managed by Isthmus")

// publish stores a new Skipped and signals Updated when it changed.
func (w *ImportWriter) publish(skipped map[string][]SkippedImport) {
	w.mu.Lock()
	changed := !maps.EqualFunc(w.skipped, skipped, slices.Equal[[]SkippedImport])
	if changed {
		w.skipped = skipped
	}
	w.mu.Unlock()
	if !changed {
		return
	}
	n := 0
	for _, l := range skipped {
		n += len(l)
	}
	w.log.Debug("skipped imports changed", "count", n)
	select {
	case w.updated <- struct{}{}:
	default:
	}
}

func isManaged(obj metav1.Object) bool { return obj.GetLabels()[LabelManagedBy] == ManagedByIsthmus }

// cached returns ref's object from k's informer cache.
func (w *ImportWriter) cached(k *importKind, ref objectRef) (metav1.Object, bool) {
	obj, ok, err := k.informer.GetIndexer().GetByKey(ref.namespace + "/" + ref.name)
	if err != nil || !ok {
		return nil, false
	}
	m, ok := obj.(metav1.Object)
	return m, ok
}

func (w *ImportWriter) isManaged(ref objectRef) bool {
	k := w.kindOf(ref)
	obj, ok := w.cached(k, ref)
	return ok && isManaged(obj)
}

func (w *ImportWriter) kindOf(ref objectRef) *importKind {
	if ref.kind == w.entries.kind {
		return w.entries
	}
	return w.imports
}

// managedObjects lists the objects of kind k in the cache that this writer
// owns: labelled as Isthmus's, for a named service, under the name the
// writer gives that service's object. Other Isthmus objects of the same
// kind, should there ever be any, are not the import writer's to delete.
func (w *ImportWriter) managedObjects(k *importKind) []objectRef {
	var out []objectRef
	for _, obj := range k.informer.GetIndexer().List() {
		m, ok := obj.(metav1.Object)
		if !ok || !isManaged(m) {
			continue
		}
		svc := m.GetLabels()[LabelServiceName]
		want := svc
		if k == w.entries {
			want = ServiceEntryName(svc)
		}
		if svc == "" || m.GetName() != want {
			continue
		}
		out = append(out, objectRef{kind: k.kind, namespace: m.GetNamespace(), name: m.GetName()})
	}
	slices.SortFunc(out, func(a, b objectRef) int {
		return cmp.Or(strings.Compare(a.namespace, b.namespace), strings.Compare(a.name, b.name))
	})
	return out
}

// getLive reads ref from the API server, reporting whether it is Isthmus's.
func (w *ImportWriter) getLive(ctx context.Context, ref objectRef) (managed bool, err error) {
	if err := w.limiter.Wait(ctx); err != nil {
		return false, err
	}
	var obj metav1.Object
	if ref.kind == w.entries.kind {
		obj, err = w.istio.NetworkingV1().ServiceEntries(ref.namespace).Get(ctx, ref.name, metav1.GetOptions{})
	} else {
		obj, err = w.mcs.MulticlusterV1alpha1().ServiceImports(ref.namespace).Get(ctx, ref.name, metav1.GetOptions{})
	}
	if err != nil {
		return false, err
	}
	return isManaged(obj), nil
}

// writeServiceEntry creates or updates the ServiceEntry when the cluster's
// differs from want. Labels other than the writer's own are kept.
func (w *ImportWriter) writeServiceEntry(ctx context.Context, want *networkingv1.ServiceEntry) error {
	ref := objectRef{kind: w.entries.kind, namespace: want.Namespace, name: want.Name}
	client := w.istio.NetworkingV1().ServiceEntries(want.Namespace)
	cur, ok := w.cached(w.entries, ref)
	if !ok {
		if err := w.limiter.Wait(ctx); err != nil {
			return err
		}
		_, err := client.Create(ctx, want, metav1.CreateOptions{FieldManager: fieldManager})
		if !apierrors.IsAlreadyExists(err) {
			if err == nil {
				w.log.Debug("created", "object", ref)
			}
			return err
		}
		// Not in the cache, which only holds Isthmus's objects: most
		// likely someone else's. Read it to be sure.
		if err := w.limiter.Wait(ctx); err != nil {
			return err
		}
		live, err := client.Get(ctx, want.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cur = live
	}
	se, isSE := cur.(*networkingv1.ServiceEntry)
	if !isSE || !isManaged(se) {
		return errNotManaged
	}
	if proto.Equal(&se.Spec, &want.Spec) && hasLabels(se.Labels, want.Labels) {
		return nil
	}
	updated := se.DeepCopy()
	want.Spec.DeepCopyInto(&updated.Spec)
	updated.Labels = withLabels(updated.Labels, want.Labels)
	if err := w.limiter.Wait(ctx); err != nil {
		return err
	}
	if _, err := client.Update(ctx, updated, metav1.UpdateOptions{FieldManager: fieldManager}); err != nil {
		return err
	}
	w.log.Debug("updated", "object", ref)
	return nil
}

// writeServiceImport creates or updates the ServiceImport, then its
// status, when they differ from want.
func (w *ImportWriter) writeServiceImport(ctx context.Context, want *mcsv1alpha1.ServiceImport) error {
	ref := objectRef{kind: w.imports.kind, namespace: want.Namespace, name: want.Name}
	client := w.mcs.MulticlusterV1alpha1().ServiceImports(want.Namespace)
	obj, ok := w.cached(w.imports, ref)
	var cur *mcsv1alpha1.ServiceImport
	if ok {
		cur, _ = obj.(*mcsv1alpha1.ServiceImport)
	}
	if !ok {
		if err := w.limiter.Wait(ctx); err != nil {
			return err
		}
		created, err := client.Create(ctx, want, metav1.CreateOptions{FieldManager: fieldManager})
		switch {
		case err == nil:
			w.log.Debug("created", "object", ref)
			cur = created
		case apierrors.IsAlreadyExists(err):
			if err := w.limiter.Wait(ctx); err != nil {
				return err
			}
			if cur, err = client.Get(ctx, want.Name, metav1.GetOptions{}); err != nil {
				return err
			}
		default:
			return err
		}
	}
	if cur == nil || !isManaged(cur) {
		return errNotManaged
	}
	// The writer owns the type and the ports. The cluster-set IPs are an
	// MCS controller's to allocate (the CoreDNS multicluster plugin reads
	// them): kept as another sets them, rather than fought over.
	spec := *want.Spec.DeepCopy()
	spec.IPs, spec.IPFamilies = cur.Spec.IPs, cur.Spec.IPFamilies
	if !equality.Semantic.DeepEqual(cur.Spec, spec) || !hasLabels(cur.Labels, want.Labels) {
		updated := cur.DeepCopy()
		updated.Spec = spec
		updated.Labels = withLabels(updated.Labels, want.Labels)
		if err := w.limiter.Wait(ctx); err != nil {
			return err
		}
		var err error
		if cur, err = client.Update(ctx, updated, metav1.UpdateOptions{FieldManager: fieldManager}); err != nil {
			return err
		}
		w.log.Debug("updated", "object", ref)
	}
	// Status is a subresource: Create and Update ignore it.
	if equality.Semantic.DeepEqual(cur.Status.Clusters, want.Status.Clusters) {
		return nil
	}
	updated := cur.DeepCopy()
	updated.Status.Clusters = slices.Clone(want.Status.Clusters)
	if err := w.limiter.Wait(ctx); err != nil {
		return err
	}
	if _, err := client.UpdateStatus(ctx, updated, metav1.UpdateOptions{FieldManager: fieldManager}); err != nil {
		return err
	}
	w.log.Debug("status updated", "object", ref, "clusters", len(want.Status.Clusters))
	return nil
}

// deleteObject deletes one of the writer's objects, on the condition that
// it is still the version the cache saw, so that an object someone else
// re-created under the name in the meantime is not deleted.
func (w *ImportWriter) deleteObject(ctx context.Context, ref objectRef) error {
	k := w.kindOf(ref)
	obj, ok := w.cached(k, ref)
	if !ok {
		return nil
	}
	// Only the object as last seen: one re-created meanwhile has another
	// uid, and one a user took over (the managed-by label removed) a
	// newer resourceVersion; either fails the delete, which is retried
	// once the cache has caught up.
	var pre metav1.Preconditions
	if uid := obj.GetUID(); uid != "" {
		pre.UID = &uid
	}
	if rv := obj.GetResourceVersion(); rv != "" {
		pre.ResourceVersion = &rv
	}
	opts := metav1.DeleteOptions{Preconditions: &pre}
	if err := w.limiter.Wait(ctx); err != nil {
		return err
	}
	var err error
	if k == w.entries {
		err = w.istio.NetworkingV1().ServiceEntries(ref.namespace).Delete(ctx, ref.name, opts)
	} else {
		err = w.mcs.MulticlusterV1alpha1().ServiceImports(ref.namespace).Delete(ctx, ref.name, opts)
	}
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err == nil {
		w.log.Debug("deleted", "object", ref)
	}
	return err
}

// fieldManager names the writer in managedFields.
const fieldManager = "isthmus-import-writer"

func hasLabels(have, want map[string]string) bool {
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

func withLabels(have, want map[string]string) map[string]string {
	out := maps.Clone(have)
	if out == nil {
		out = map[string]string{}
	}
	maps.Copy(out, want)
	return out
}
