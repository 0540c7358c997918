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

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"
	mcslisters "sigs.k8s.io/mcs-api/pkg/client/listers/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// indexByService indexes EndpointSlices by "namespace/service-name".
const indexByService = "service"

// indexByPod indexes EndpointSlices by the "namespace/name" of every pod
// their endpoints point at; only kept with the in-cluster services.
const indexByPod = "pod"

// indexByNode indexes EndpointSlices by the name of every node their
// endpoints are on: the services a node's locality places.
const indexByNode = "node"

// inClusterRetry is how soon a Service whose ClusterIP another in-cluster
// service still holds is tried again.
const inClusterRetry = time.Second

// Condition reasons this controller sets beyond the ones the MCS API defines.
const (
	// ReasonInvalidService: the Service exists but cannot be exported as it
	// is (for example it has no ports).
	ReasonInvalidService mcsv1alpha1.ServiceExportConditionReason = "InvalidService"
	// ReasonInvalidPeers: the peers annotation has an item that is not a
	// peer name; the service is exported to no peer until it is fixed.
	ReasonInvalidPeers mcsv1alpha1.ServiceExportConditionReason = "InvalidPeers"
	// ReasonNoPeers: the peers annotation is set but names no peer; the
	// service is exported to no peer.
	ReasonNoPeers mcsv1alpha1.ServiceExportConditionReason = "NoPeers"
)

// Options tunes an Exporter. The zero value of every field means its
// documented default.
type Options struct {
	// ClusterName names this cluster in the catalog. Required.
	ClusterName string
	// Logger receives lifecycle logs at Info and per-event logs at Debug;
	// nil discards them.
	Logger *slog.Logger
	// FlushDelay is how long changes are collected before a new catalog
	// snapshot is published; default 50ms.
	FlushDelay time.Duration
	// ResyncPeriod is how often informers replay their whole cache, so
	// that a lost status update is retried; default 10 minutes.
	ResyncPeriod time.Duration
	// Workers is the number of reconcile workers, and of the workers
	// that write ServiceExport statuses; default 2 of each.
	Workers int
	// TrustDomain is this cluster's SPIFFE trust domain. When set, each
	// service's Identities are the SPIFFE IDs of the ServiceAccounts of the
	// pods behind it, which takes a Pod informer (and RBAC to list and
	// watch pods). Empty means identities are not computed and pods are
	// not watched.
	TrustDomain string
	// InCluster, when set, receives catalog.InClusterSource: every
	// Service of the cluster, exported or not, that the sidecars carry
	// over mTLS (a ClusterIP, a TCP port, and endpoints that are all
	// meshed pods; docs/sidecar-xds.md), and catalog.DeclaredSource:
	// every Service with a TCP port and endpoints, for the ports they
	// declare. It needs TrustDomain.
	InCluster *catalog.Store
	// Policies, when set, receives the cluster's AuthorizationPolicies
	// and PeerAuthentications (security.istio.io/v1, every namespace)
	// and the labels of every pod, and is marked synced once the pods
	// and both kinds are read. A kind the cluster does not serve (its
	// Istio CRD is not installed) counts as read, with none, and is
	// looked for again every minute. The catalog never waits for it. It
	// needs TrustDomain, since the pods are watched only with one, and
	// Istio; the pod cache then keeps every label of every pod.
	Policies *authz.Store
	// Istio is the client the AuthorizationPolicies and
	// PeerAuthentications are read with; required with Policies, unused
	// without.
	Istio istioclient.Interface
}

// Exporter keeps catalog.LocalSource in a Store equal to the cluster's
// exported services, and reports on each ServiceExport in its status.
type Exporter struct {
	opts  Options
	log   *slog.Logger
	kube  kubernetes.Interface
	mcs   mcsclient.Interface
	store *catalog.Store

	kubeInformers informers.SharedInformerFactory
	mcsInformers  mcsinformers.SharedInformerFactory
	services      corelisters.ServiceLister
	sliceIndex    cache.Indexer
	nodes         corelisters.NodeLister
	exports       mcslisters.ServiceExportLister
	synced        []cache.InformerSynced
	// accounts is nil unless Options.TrustDomain is set.
	accounts *podAccounts
	// podsSynced is the pod handler's HasSynced; nil without accounts.
	podsSynced cache.InformerSynced

	// istioInformers holds the informers of policyKinds, each started
	// once the API server serves its kind; nil without Options.Policies.
	istioInformers istioinformers.SharedInformerFactory
	// istioStartMu serializes the wiring and start of the istioInformers
	// (startKind).
	istioStartMu sync.Mutex
	// policyKinds are the kinds mirrored into Options.Policies
	// (AuthorizationPolicy, PeerAuthentication); nil without it.
	policyKinds []*policyKind
	// policyRecheck is how often discovery is asked again while a policy
	// kind is not served.
	policyRecheck time.Duration
	// policyWarnAfter is how long a policy kind may take to be listed
	// before a warning says why it is not.
	policyWarnAfter time.Duration

	// started is set once the initial build begins: before that, a pod
	// event need not look for the services it affects, since the initial
	// build reads every pod anyway.
	started atomic.Bool

	queue workqueue.TypedRateLimitingInterface[catalog.ServiceKey]
	dirty chan struct{}
	ready atomic.Bool

	// statusQueue holds the exports whose status may need writing. Its
	// own workers write them, so that status writes, paced by the API
	// server and the client's rate limit, never hold up the catalog: with
	// one queue, a burst of exports entered the catalog only as fast as
	// their statuses could be written (50/s, make bench-propagation).
	statusQueue workqueue.TypedRateLimitingInterface[catalog.ServiceKey]
	// statusMu guards desired: by export, the conditions its last
	// reconcile wants on its status.
	statusMu sync.Mutex
	desired  map[catalog.ServiceKey][]metav1.Condition

	// mu guards builder, the catalog being assembled, and inCluster,
	// the in-cluster services' (nil without Options.InCluster), with
	// icOwner and icIP: which in-cluster service holds which ClusterIP,
	// both ways.
	// declared is every Service with endpoints (nil without
	// Options.InCluster).
	mu        sync.Mutex
	builder   *catalog.Builder
	inCluster *catalog.Builder
	declared  *catalog.Builder
	// declKeys are the declared entries each Service made.
	declKeys map[catalog.ServiceKey][]catalog.ServiceKey
	icOwner  map[string]catalog.ServiceKey
	icIP     map[catalog.ServiceKey]string
}

// NewExporter wires informers for the cluster behind kube and mcs; nothing
// runs until Run.
func NewExporter(kube kubernetes.Interface, mcs mcsclient.Interface, store *catalog.Store, opts Options) (*Exporter, error) {
	if opts.ClusterName == "" {
		return nil, errors.New("kube exporter: cluster name is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.FlushDelay <= 0 {
		opts.FlushDelay = 50 * time.Millisecond
	}
	if opts.ResyncPeriod <= 0 {
		opts.ResyncPeriod = 10 * time.Minute
	}
	if opts.Workers <= 0 {
		opts.Workers = 2
	}
	var accounts *podAccounts
	if opts.InCluster != nil && opts.TrustDomain == "" {
		return nil, errors.New("kube exporter: in-cluster services need a trust domain: their identities are their pods'")
	}
	if opts.Policies != nil && opts.TrustDomain == "" {
		return nil, errors.New("kube exporter: authorization policies need a trust domain: pods, which policies select, are watched only with one")
	}
	if opts.Policies != nil && opts.Istio == nil {
		return nil, errors.New("kube exporter: authorization policies need an Istio client")
	}
	if opts.TrustDomain != "" {
		td, err := spiffeid.TrustDomainFromString(opts.TrustDomain)
		if err != nil {
			return nil, fmt.Errorf("kube exporter: trust domain %q: %w", opts.TrustDomain, err)
		}
		accounts = newPodAccounts(td)
	}
	e := &Exporter{
		opts:          opts,
		log:           opts.Logger.With("component", "kube-exporter"),
		kube:          kube,
		mcs:           mcs,
		store:         store,
		kubeInformers: informers.NewSharedInformerFactory(kube, opts.ResyncPeriod),
		mcsInformers:  mcsinformers.NewSharedInformerFactory(mcs, opts.ResyncPeriod),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[catalog.ServiceKey](),
			workqueue.TypedRateLimitingQueueConfig[catalog.ServiceKey]{Name: "serviceexports"}),
		statusQueue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[catalog.ServiceKey](),
			workqueue.TypedRateLimitingQueueConfig[catalog.ServiceKey]{Name: "serviceexport-status"}),
		desired:  map[catalog.ServiceKey][]metav1.Condition{},
		dirty:    make(chan struct{}, 1),
		builder:  catalog.NewBuilder(catalog.LocalSource),
		accounts: accounts,

		policyRecheck:   rediscoverEvery,
		policyWarnAfter: policySyncWarnAfter,
	}
	if opts.InCluster != nil {
		e.inCluster = catalog.NewBuilder(catalog.InClusterSource)
		e.declared = catalog.NewBuilder(catalog.DeclaredSource)
		e.declKeys = map[catalog.ServiceKey][]catalog.ServiceKey{}
		e.icOwner, e.icIP = map[string]catalog.ServiceKey{}, map[catalog.ServiceKey]string{}
	}

	svcInf := e.kubeInformers.Core().V1().Services()
	sliceInf := e.kubeInformers.Discovery().V1().EndpointSlices()
	nodeInf := e.kubeInformers.Core().V1().Nodes()
	exportInf := e.mcsInformers.Multicluster().V1alpha1().ServiceExports()
	indexers := cache.Indexers{indexByService: sliceServiceIndex, indexByNode: sliceNodeIndex}
	if e.inCluster != nil {
		// A pod's event then finds its Services' slices at once; a scan
		// of its namespace's Services took 17 ms per pod at 10,000.
		indexers[indexByPod] = slicePodIndex
	}
	if err := sliceInf.Informer().AddIndexers(indexers); err != nil {
		return nil, fmt.Errorf("kube exporter: index endpoint slices: %w", err)
	}
	e.services = svcInf.Lister()
	e.sliceIndex = sliceInf.Informer().GetIndexer()
	e.nodes = nodeInf.Lister()
	e.exports = exportInf.Lister()

	keyHandler := func(key func(obj any) (catalog.ServiceKey, bool)) cache.ResourceEventHandler {
		enqueue := func(obj any) {
			if k, ok := key(obj); ok {
				e.queue.Add(k)
			}
		}
		return cache.ResourceEventHandlerFuncs{
			AddFunc:    enqueue,
			UpdateFunc: func(old, obj any) { enqueue(old); enqueue(obj) },
			DeleteFunc: enqueue,
		}
	}
	handlers := []struct {
		inf cache.SharedIndexInformer
		h   cache.ResourceEventHandler
	}{
		{svcInf.Informer(), keyHandler(objectKey)},
		{exportInf.Informer(), keyHandler(objectKey)},
		{sliceInf.Informer(), keyHandler(sliceKey)},
		{nodeInf.Informer(), cache.ResourceEventHandlerFuncs{
			AddFunc: e.nodeChanged,
			UpdateFunc: func(old, obj any) {
				o, ok1 := old.(*corev1.Node)
				n, ok2 := obj.(*corev1.Node)
				if !ok1 || !ok2 || nodeLocality(o) != nodeLocality(n) {
					e.nodeChanged(obj)
				}
			},
			DeleteFunc: e.nodeChanged,
		}},
	}
	for _, h := range handlers {
		reg, err := h.inf.AddEventHandler(h.h)
		if err != nil {
			return nil, fmt.Errorf("kube exporter: add event handler: %w", err)
		}
		// Synced once the handler, not only the cache, has seen the
		// first list: what it queued for it is then all queued.
		e.synced = append(e.synced, reg.HasSynced)
	}
	if accounts != nil {
		if err := e.watchPods(); err != nil {
			return nil, err
		}
	}
	if opts.Policies != nil {
		// syncPolicies adds the informers, in the version the API server
		// serves. No resync: the handlers mirror each object into the
		// store, which would only find it unchanged.
		e.istioInformers = istioinformers.NewSharedInformerFactory(opts.Istio, 0)
		e.policyKinds = newPolicyKinds(e)
	}
	return e, nil
}

// watchPods keeps e.accounts equal to the pods' ServiceAccounts and
// re-enqueues the services whose endpoints point at a pod whose
// ServiceAccount or meshed label became known, changed, or went away. Pod
// updates that leave both alone (status, other labels: nearly all of
// them) cost a map lookup. With Options.Policies it also keeps the
// store's pod labels.
func (e *Exporter) watchPods() error {
	podInf := e.kubeInformers.Core().V1().Pods().Informer()
	strip := stripPod
	if e.opts.Policies != nil {
		strip = stripPodKeepLabels
	}
	if err := podInf.SetTransform(strip); err != nil {
		return fmt.Errorf("kube exporter: strip pods: %w", err)
	}
	reg, err := podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    e.podSet,
		UpdateFunc: func(_, obj any) { e.podSet(obj) },
		DeleteFunc: e.podDeleted,
	})
	if err != nil {
		return fmt.Errorf("kube exporter: add pod event handler: %w", err)
	}
	// e.accounts is written by this handler, so the initial build must
	// wait until the handler (not only the informer's cache) has seen
	// every pod.
	e.synced = append(e.synced, reg.HasSynced)
	e.podsSynced = reg.HasSynced
	return nil
}

// podSet handles a pod added or updated.
func (e *Exporter) podSet(obj any) {
	p, ok := podFromEvent(obj)
	if !ok {
		return
	}
	if e.opts.Policies != nil {
		// The informer never modifies the labels it handed out (an
		// update is a new object), so the store may keep them; it
		// ignores labels that did not change, as in nearly every update.
		e.opts.Policies.SetPod(p.Namespace, p.Name, p.Labels)
	}
	if e.accounts.set(p) {
		e.enqueuePodServices(p.Namespace, p.Name)
	}
}

// podDeleted handles a pod deleted, tombstones included.
func (e *Exporter) podDeleted(obj any) {
	p, ok := podFromEvent(obj)
	if !ok {
		return
	}
	if e.opts.Policies != nil {
		e.opts.Policies.DeletePod(p.Namespace, p.Name)
	}
	if e.accounts.remove(p.Namespace, p.Name) {
		e.enqueuePodServices(p.Namespace, p.Name)
	}
}

// enqueuePodServices enqueues the services whose EndpointSlices point at
// the pod. With the in-cluster services kept, every Service counts, and an
// index of slices by pod finds them (a key per endpoint, about 50 bytes);
// without, only the exports do, and their endpoints in the pod's
// namespace are scanned: pod churn is rare next to endpoint count.
func (e *Exporter) enqueuePodServices(namespace, pod string) {
	if !e.started.Load() {
		return
	}
	if e.inCluster != nil {
		objs, err := e.sliceIndex.ByIndex(indexByPod, namespace+"/"+pod)
		if err != nil {
			return
		}
		for _, o := range objs {
			if key, ok := sliceKey(o); ok {
				e.queue.Add(key)
			}
		}
		return
	}
	exports, err := e.exports.ServiceExports(namespace).List(labels.Everything())
	if err != nil {
		return
	}
	for _, se := range exports {
		key := catalog.ServiceKey{Namespace: se.Namespace, Name: se.Name}
		objs, err := e.sliceIndex.ByIndex(indexByService, key.String())
		if err != nil {
			continue
		}
		if slicesReferencePod(objs, namespace, pod) {
			e.queue.Add(key)
		}
	}
}

// slicesReferencePod reports whether any of the EndpointSlices (all in
// namespace) has an endpoint pointing at the pod.
func slicesReferencePod(objs []any, namespace, pod string) bool {
	for _, o := range objs {
		s, ok := o.(*discoveryv1.EndpointSlice)
		if !ok {
			continue
		}
		for i := range s.Endpoints {
			ref := s.Endpoints[i].TargetRef
			if ref == nil || ref.Kind != "Pod" || ref.Name != pod {
				continue
			}
			if ref.Namespace == "" || ref.Namespace == namespace {
				return true
			}
		}
	}
	return false
}

// Ready reports whether the informers have synced and the first complete
// catalog has been published. The Istio policies are not waited
// for: Options.Policies says itself when it has synced.
func (e *Exporter) Ready() bool { return e.ready.Load() }

// Run starts the informers, builds the full catalog once the caches are
// synced, publishes it, and then keeps it current until ctx ends. It
// returns nil on a clean shutdown, after every goroutine it started has
// stopped.
func (e *Exporter) Run(ctx context.Context) error {
	defer utilruntime.HandleCrash()
	defer e.queue.ShutDown()
	defer e.statusQueue.ShutDown()

	e.log.Info("starting", "cluster", e.opts.ClusterName)
	defer e.kubeInformers.Shutdown()
	defer e.mcsInformers.Shutdown()
	if e.istioInformers != nil {
		defer e.istioInformers.Shutdown()
	}
	var background sync.WaitGroup
	defer background.Wait()
	// Cancelled first (defers run last-in first-out), so that what Run
	// started has stopped before the Shutdowns above wait for it, on an
	// error return too.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	e.kubeInformers.Start(ctx.Done())
	e.mcsInformers.Start(ctx.Done())
	if e.opts.Policies != nil {
		// Apart from the catalog: the exports and the gateway never read
		// the policies, so a policy list that fails (RBAC not upgraded
		// yet) must not hold them up.
		background.Go(func() { e.syncPolicies(ctx) })
	}
	if !cache.WaitForCacheSync(ctx.Done(), e.synced...) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("kube exporter: informer caches did not sync")
	}

	// Build the whole catalog before serving it, so a restarted federator
	// never publishes a partial view. Events queued meanwhile are
	// reconciled again by the workers; that is harmless. The statuses are
	// written once the status workers start, after the catalog is out.
	e.started.Store(true)
	if _, err := e.exports.List(labels.Everything()); err != nil {
		return fmt.Errorf("kube exporter: list service exports: %w", err)
	}
	for _, key := range e.keysToBuild() {
		if err := e.reconcile(ctx, key); err != nil {
			e.log.Debug("initial reconcile failed, will retry", "export", key, "error", err)
			e.queue.AddRateLimited(key)
		}
	}
	e.flush()
	e.ready.Store(true)
	if e.inCluster != nil {
		e.log.Info("catalog ready", "exported", e.store.Get(catalog.LocalSource).Len(), "in-cluster", e.opts.InCluster.Get(catalog.InClusterSource).Len())
	} else {
		e.log.Info("catalog ready", "exported", e.store.Get(catalog.LocalSource).Len())
	}

	var wg sync.WaitGroup
	for i := 0; i < e.opts.Workers; i++ {
		wg.Go(func() { e.worker(ctx, e.queue, "reconcile", e.reconcile) })
		wg.Go(func() { e.worker(ctx, e.statusQueue, "status write", e.writeStatus) })
	}
	wg.Go(func() { e.flusher(ctx) })
	<-ctx.Done()
	e.queue.ShutDown()
	e.statusQueue.ShutDown()
	wg.Wait()
	e.log.Info("stopped")
	return nil
}

// workerFailuresLogged is the failure of one key, counted from 0, that a
// worker logs at Warn; those before and after are at Debug.
const workerFailuresLogged = 4

// worker drains queue with work until the queue shuts down; what fails
// is retried after the queue's backoff.
func (e *Exporter) worker(ctx context.Context, queue workqueue.TypedRateLimitingInterface[catalog.ServiceKey], what string, work func(context.Context, catalog.ServiceKey) error) {
	for {
		key, quit := queue.Get()
		if quit {
			return
		}
		err := work(ctx, key)
		switch {
		case err == nil:
			queue.Forget(key)
		case ctx.Err() != nil:
			queue.Forget(key)
		default:
			// The first failures are a conflict or a blip; one that keeps
			// coming back (RBAC without serviceexports/status, say) is
			// the operator's to see.
			level := slog.LevelDebug
			if queue.NumRequeues(key) == workerFailuresLogged {
				level = slog.LevelWarn
			}
			e.log.Log(ctx, level, what+" failed, retrying", "export", key, "failures", queue.NumRequeues(key)+1, "error", err)
			queue.AddRateLimited(key)
		}
		queue.Done(key)
	}
}

// flusher publishes the catalog a short while after it changes, so a burst
// of changes becomes one snapshot.
func (e *Exporter) flusher(ctx context.Context) {
	timer := time.NewTimer(0)
	if !timer.Stop() {
		<-timer.C
	}
	for {
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-e.dirty:
			timer.Reset(e.opts.FlushDelay)
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-timer.C:
			}
			e.flush()
		}
	}
}

func (e *Exporter) flush() {
	e.mu.Lock()
	snap := e.builder.Build()
	var in, declared *catalog.Snapshot
	if e.inCluster != nil {
		in, declared = e.inCluster.Build(), e.declared.Build()
	}
	e.mu.Unlock()
	// The in-cluster services first: the local catalog's subscribers
	// then find them current when an export changes both.
	if declared != nil && e.opts.InCluster.Set(declared) {
		e.log.Debug("declared ports published", "version", declared.Version(), "services", declared.Len())
	}
	if in != nil && e.opts.InCluster.Set(in) {
		e.log.Debug("in-cluster catalog published", "version", in.Version(), "services", in.Len())
	}
	if e.store.Set(snap) {
		e.log.Debug("catalog published", "version", snap.Version(), "services", snap.Len())
	}
}

func (e *Exporter) markDirty() {
	select {
	case e.dirty <- struct{}{}:
	default:
	}
}

func (e *Exporter) put(svc catalog.Service) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.builder.Put(svc); err != nil {
		return err
	}
	e.markDirty()
	return nil
}

func (e *Exporter) remove(key catalog.ServiceKey) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.builder.Has(key) {
		e.builder.Delete(key)
		e.markDirty()
	}
}

// reconcile makes the catalog entries for key match the current state of
// the cluster, and queues the ServiceExport status that goes with it. It
// reads only informer caches: it never waits for the API server.
func (e *Exporter) reconcile(ctx context.Context, key catalog.ServiceKey) error {
	return errors.Join(e.reconcileExport(ctx, key), e.reconcileInCluster(key), e.reconcileDeclared(key))
}

// reconcileDeclared keeps key's entries among the declared ports:
// present when the Service has a TCP port and endpoints with an
// address, whether or not it has a ClusterIP or its pods are meshed. A
// pod's sidecar serves each port a Service selecting it declares with
// the declared protocol, whatever a caller offers.
func (e *Exporter) reconcileDeclared(key catalog.ServiceKey) error {
	if e.declared == nil {
		return nil
	}
	var entries []catalog.Service
	svc, err := e.services.Services(key.Namespace).Get(key.Name)
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return err
	case svc.Spec.Type != corev1.ServiceTypeExternalName && hasTCPPort(svc):
		endpointSlices, err := e.slicesOf(key)
		if err != nil {
			return err
		}
		entries = declaredFromObjects(e.opts.ClusterName, svc, endpointSlices)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	keep := map[catalog.ServiceKey]bool{}
	for _, entry := range entries {
		if err := e.declared.Put(entry); err != nil {
			e.log.Warn("declared ports left out", "service", key, "entry", entry.Key(), "error", err)
			continue
		}
		keep[entry.Key()] = true
	}
	for _, old := range e.declKeys[key] {
		if !keep[old] {
			e.declared.Delete(old)
		}
	}
	if len(keep) == 0 {
		delete(e.declKeys, key)
	} else {
		e.declKeys[key] = slices.Collect(maps.Keys(keep))
	}
	e.markDirty()
	return nil
}

// reconcileInCluster keeps key's in-cluster entry: present when the
// Service has a ClusterIP, a TCP port, and endpoints that are all meshed
// pods.
func (e *Exporter) reconcileInCluster(key catalog.ServiceKey) error {
	if e.inCluster == nil {
		return nil
	}
	svc, err := e.services.Services(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		e.removeInCluster(key)
		return nil
	}
	if err != nil {
		return err
	}
	ip := svc.Spec.ClusterIP
	if svc.Spec.Type == corev1.ServiceTypeExternalName || ip == "" || ip == corev1.ClusterIPNone || !hasTCPPort(svc) {
		e.removeInCluster(key)
		return nil
	}
	endpointSlices, err := e.slicesOf(key)
	if err != nil {
		return err
	}
	meshed, ok := meshedSlices(endpointSlices, e.accounts)
	if !ok {
		e.removeInCluster(key)
		return nil
	}
	entry := serviceFromObjects(e.opts.ClusterName, svc, meshed, nil, e.locate, e.accounts)
	entry.ClusterIP = ip
	if len(entry.Identities) == 0 {
		e.removeInCluster(key)
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if owner, taken := e.icOwner[ip]; taken && owner != key {
		// Another Service still holds the address: a Service deleted and
		// made again with the same clusterIP, whose deletion is not in
		// yet. The sidecars would refuse two services at one address.
		e.log.Debug("in-cluster service waits for its ClusterIP", "service", key, "clusterIP", ip, "heldBy", owner)
		e.removeInClusterLocked(key)
		e.queue.AddAfter(key, inClusterRetry)
		return nil
	}
	if err := e.inCluster.Put(entry); err != nil {
		// The API server accepted the Service, so this is a bug or an
		// API change; the Service stays out, as a plain one would.
		e.log.Warn("in-cluster service left out", "service", key, "error", err)
		e.removeInClusterLocked(key)
		return nil
	}
	if old, ok := e.icIP[key]; ok && old != ip {
		delete(e.icOwner, old)
	}
	e.icOwner[ip], e.icIP[key] = key, ip
	e.markDirty()
	return nil
}

func (e *Exporter) removeInCluster(key catalog.ServiceKey) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.removeInClusterLocked(key)
}

func (e *Exporter) removeInClusterLocked(key catalog.ServiceKey) {
	if ip, ok := e.icIP[key]; ok {
		delete(e.icOwner, ip)
		delete(e.icIP, key)
	}
	if e.inCluster.Has(key) {
		e.inCluster.Delete(key)
		e.markDirty()
	}
}

// slicesOf returns the EndpointSlices of the Service key.
func (e *Exporter) slicesOf(key catalog.ServiceKey) ([]*discoveryv1.EndpointSlice, error) {
	objs, err := e.sliceIndex.ByIndex(indexByService, key.String())
	if err != nil {
		return nil, err
	}
	out := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if s, ok := o.(*discoveryv1.EndpointSlice); ok {
			out = append(out, s)
		}
	}
	return out, nil
}

func hasTCPPort(svc *corev1.Service) bool {
	for _, p := range svc.Spec.Ports {
		if p.Protocol == "" || p.Protocol == corev1.ProtocolTCP {
			return true
		}
	}
	return false
}

// meshedSlices returns the slices with only the endpoints of pods that
// the exporter knows and that are labelled meshed, and whether the
// Service is an in-cluster one: at least one such endpoint, and none that
// is known to be anything else (a pod not labelled meshed, an endpoint
// that is not a pod), since mTLS to it would be refused. A pod the
// exporter does not know is left out without deciding anything: deleted
// (its endpoint goes next) or not seen yet (its arrival reconciles the
// Service again). The slices are returned as they are when nothing is
// left out.
func meshedSlices(endpointSlices []*discoveryv1.EndpointSlice, accounts *podAccounts) ([]*discoveryv1.EndpointSlice, bool) {
	n, unknown := 0, false
	for _, s := range endpointSlices {
		if s.AddressType == discoveryv1.AddressTypeFQDN {
			if len(s.Endpoints) > 0 {
				return nil, false
			}
			continue
		}
		for i := range s.Endpoints {
			ep := &s.Endpoints[i]
			if len(ep.Addresses) == 0 {
				continue
			}
			ref := ep.TargetRef
			if ref == nil || ref.Kind != "Pod" {
				return nil, false
			}
			ns := cmp.Or(ref.Namespace, s.Namespace)
			switch known, meshed := accounts.meshedPod(ns, ref.Name); {
			case !known:
				unknown = true
			case !meshed:
				return nil, false
			default:
				n++
			}
		}
	}
	if n == 0 {
		return nil, false
	}
	if !unknown {
		return endpointSlices, true
	}
	out := make([]*discoveryv1.EndpointSlice, 0, len(endpointSlices))
	for _, s := range endpointSlices {
		c := *s
		c.Endpoints = nil
		for _, ep := range s.Endpoints {
			if ref := ep.TargetRef; ref != nil {
				if known, _ := accounts.meshedPod(cmp.Or(ref.Namespace, s.Namespace), ref.Name); known {
					c.Endpoints = append(c.Endpoints, ep)
				}
			}
		}
		out = append(out, &c)
	}
	return out, true
}

// reconcileExport keeps key's entry in the local catalog, the exported
// services, and the export's status.
func (e *Exporter) reconcileExport(_ context.Context, key catalog.ServiceKey) error {
	se, err := e.exports.ServiceExports(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		e.remove(key)
		e.forgetStatus(key)
		return nil
	}
	if err != nil {
		return err
	}
	svc, err := e.services.Services(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		e.remove(key)
		e.wantStatus(key, invalid(mcsv1alpha1.ServiceExportReasonNoService,
			fmt.Sprintf("Service %s not found", key)))
		return nil
	}
	if err != nil {
		return err
	}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		e.remove(key)
		e.wantStatus(key, invalid(mcsv1alpha1.ServiceExportReasonInvalidServiceType,
			fmt.Sprintf("Service %s is of type ExternalName, which cannot be exported", key)))
		return nil
	}
	endpointSlices, err := e.slicesOf(key)
	if err != nil {
		return err
	}
	var peers []string
	exportedTo := "every peer"
	if v, ok := se.Annotations[AnnotationPeers]; ok {
		if peers, err = parsePeers(v); err != nil {
			e.remove(key)
			e.wantStatus(key, invalid(ReasonInvalidPeers, err.Error()+"; the service is exported to no peer until the annotation is fixed"))
			return nil
		}
		if len(peers) == 0 {
			e.remove(key)
			e.wantStatus(key, invalid(ReasonNoPeers, fmt.Sprintf("%s is set but names no peer, so the service is exported to no peer; list the peers to export to, or remove the annotation to export to every peer", AnnotationPeers)))
			return nil
		}
		exportedTo = "peers " + strings.Join(peers, ", ") + " only"
	}
	entry := serviceFromObjects(e.opts.ClusterName, svc, endpointSlices, peers, e.locate, e.accounts)
	if err := e.put(entry); err != nil {
		e.remove(key)
		e.wantStatus(key, invalid(ReasonInvalidService, err.Error()))
		return nil
	}
	e.wantStatus(key, []metav1.Condition{
		condition(mcsv1alpha1.ServiceExportConditionValid, metav1.ConditionTrue, mcsv1alpha1.ServiceExportReasonValid,
			fmt.Sprintf("Service %s is exported from cluster %s to %s", key, e.opts.ClusterName, exportedTo)),
		condition(mcsv1alpha1.ServiceExportConditionReady, metav1.ConditionTrue, mcsv1alpha1.ServiceExportReasonExported,
			fmt.Sprintf("in the catalog with %d ready endpoints", entry.ReadyEndpoints())),
	})
	return nil
}

// wantStatus records the conditions the export's status should carry and
// queues their write.
func (e *Exporter) wantStatus(key catalog.ServiceKey, conds []metav1.Condition) {
	e.statusMu.Lock()
	e.desired[key] = conds
	e.statusMu.Unlock()
	e.statusQueue.Add(key)
}

// forgetStatus drops what was wanted for an export that is gone.
func (e *Exporter) forgetStatus(key catalog.ServiceKey) {
	e.statusMu.Lock()
	delete(e.desired, key)
	e.statusMu.Unlock()
}

// writeStatus writes the conditions last wanted for key on the
// ServiceExport as the informer cache holds it now. The wanted
// conditions stay after a write: a reconcile that wanted newer ones
// while this write was in flight has queued key again.
func (e *Exporter) writeStatus(ctx context.Context, key catalog.ServiceKey) error {
	e.statusMu.Lock()
	conds, ok := e.desired[key]
	e.statusMu.Unlock()
	if !ok {
		return nil
	}
	se, err := e.exports.ServiceExports(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return e.setConditions(ctx, se, conds)
}

func (e *Exporter) locate(node string) (catalog.Locality, bool) {
	n, err := e.nodes.Get(node)
	if err != nil {
		return catalog.Locality{}, false
	}
	return nodeLocality(n), true
}

// nodeChanged enqueues the services a node event may move (the node
// came, went, or changed locality): those with endpoints on the node,
// found by an index of EndpointSlices by node, and of them only the
// exports unless the in-cluster services are kept. Before the initial
// build nothing is: it reads every node.
//
// A slice the index does not hold yet has not reached its own handler
// either; that handler enqueues its service after the node is in the
// node cache, so an endpoint whose node comes later is placed all the
// same.
func (e *Exporter) nodeChanged(obj any) {
	if !e.started.Load() {
		return
	}
	key, ok := objectKey(obj)
	if !ok {
		return
	}
	objs, err := e.sliceIndex.ByIndex(indexByNode, key.Name)
	if err != nil {
		return
	}
	for _, o := range objs {
		svc, ok := sliceKey(o)
		if !ok {
			continue
		}
		if e.inCluster == nil {
			if _, err := e.exports.ServiceExports(svc.Namespace).Get(svc.Name); err != nil {
				continue
			}
		}
		e.queue.Add(svc)
	}
}

// keysToBuild are the keys the catalogs are built from: the exports, and
// every Service when the in-cluster services are kept.
func (e *Exporter) keysToBuild() []catalog.ServiceKey {
	var keys []catalog.ServiceKey
	exports, err := e.exports.List(labels.Everything())
	if err == nil {
		for _, se := range exports {
			keys = append(keys, catalog.ServiceKey{Namespace: se.Namespace, Name: se.Name})
		}
	}
	if e.inCluster != nil {
		svcs, err := e.services.List(labels.Everything())
		if err == nil {
			for _, svc := range svcs {
				keys = append(keys, catalog.ServiceKey{Namespace: svc.Namespace, Name: svc.Name})
			}
		}
		// An exported Service is listed twice: reconcile it once.
		slices.SortFunc(keys, catalog.CompareKeys)
		keys = slices.Compact(keys)
	}
	return keys
}

func condition(t mcsv1alpha1.ServiceExportConditionType, s metav1.ConditionStatus, r mcsv1alpha1.ServiceExportConditionReason, msg string) metav1.Condition {
	return metav1.Condition{Type: string(t), Status: s, Reason: string(r), Message: msg}
}

func invalid(reason mcsv1alpha1.ServiceExportConditionReason, msg string) []metav1.Condition {
	return []metav1.Condition{
		condition(mcsv1alpha1.ServiceExportConditionValid, metav1.ConditionFalse, reason, msg),
		condition(mcsv1alpha1.ServiceExportConditionReady, metav1.ConditionFalse, mcsv1alpha1.ServiceExportReasonFailed,
			"not exported: "+msg),
	}
}

// setConditions writes the conditions to the ServiceExport's status when
// they differ from what is there, so steady state costs no API calls.
func (e *Exporter) setConditions(ctx context.Context, se *mcsv1alpha1.ServiceExport, conds []metav1.Condition) error {
	updated := se.DeepCopy()
	changed := false
	for _, c := range conds {
		c.ObservedGeneration = se.Generation
		if meta.SetStatusCondition(&updated.Status.Conditions, c) {
			changed = true
		}
	}
	if !changed {
		return nil
	}
	_, err := e.mcs.MulticlusterV1alpha1().ServiceExports(se.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("update status of ServiceExport %s/%s: %w", se.Namespace, se.Name, err)
	}
	return nil
}

func objectKey(obj any) (catalog.ServiceKey, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	m, err := meta.Accessor(obj)
	if err != nil {
		return catalog.ServiceKey{}, false
	}
	return catalog.ServiceKey{Namespace: m.GetNamespace(), Name: m.GetName()}, true
}

func sliceKey(obj any) (catalog.ServiceKey, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return catalog.ServiceKey{}, false
	}
	name := s.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return catalog.ServiceKey{}, false
	}
	return catalog.ServiceKey{Namespace: s.Namespace, Name: name}, true
}

// slicePodIndex lists the pods a slice's endpoints point at.
func slicePodIndex(obj any) ([]string, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	var out []string
	for i := range s.Endpoints {
		if ref := s.Endpoints[i].TargetRef; ref != nil && ref.Kind == "Pod" {
			out = append(out, cmp.Or(ref.Namespace, s.Namespace)+"/"+ref.Name)
		}
	}
	return out, nil
}

// sliceNodeIndex lists the nodes a slice's endpoints are on, each once.
func sliceNodeIndex(obj any) ([]string, error) {
	s, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	var out []string
	for i := range s.Endpoints {
		if n := s.Endpoints[i].NodeName; n != nil && *n != "" {
			out = append(out, *n)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func sliceServiceIndex(obj any) ([]string, error) {
	k, ok := sliceKey(obj)
	if !ok {
		return nil, nil
	}
	return []string{k.String()}, nil
}
