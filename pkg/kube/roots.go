package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/client-go/util/workqueue"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// RootsSource is the cluster CA as the RootsPublisher reads it; *ca.CA is
// one.
type RootsSource interface {
	// Bundle is the current trust bundle: every root a workload must
	// trust, a rotation's new root included as soon as it is published.
	Bundle() *x509bundle.Bundle
	// Subscribe signals (coalesced, capacity one) every change of the
	// bundle; the func unsubscribes.
	Subscribe() (<-chan struct{}, func())
}

// RootsOptions tunes a RootsPublisher. The zero value of every field
// means its documented default.
type RootsOptions struct {
	// Logger receives lifecycle logs and conflicts at Info and Warn, and
	// per-namespace writes at Debug; nil discards them.
	Logger *slog.Logger
	// QPS and Burst limit the publisher's writes to the API server (a
	// token bucket on top of the client's own limit), so that a root
	// rotation in a cluster of thousands of namespaces is a steady trickle
	// rather than a burst; defaults 20 and 40.
	QPS   float32
	Burst int
	// Workers reconcile namespaces in parallel; default 2.
	Workers int
	// ResyncPeriod is how often the informers replay their caches, so
	// every namespace is checked now and then even when nothing happens;
	// default 10 minutes.
	ResyncPeriod time.Duration
}

// RootsPublisher keeps ConfigMap isthmus-ca-root-cert (ca.RootsConfigMapName)
// in every active namespace equal to the cluster CA's roots, so that any
// pod can mount it and verify the federator's CA and xDS on 15012 before
// it holds a certificate: pods can mount ConfigMaps of their own namespace
// only. Istio's namespace controller does the same for istio-ca-root-cert.
//
//	Namespace ─────────────────────────────┐
//	ConfigMap isthmus-ca-root-cert (any ns) ┼─► work queue (namespace) ─► reconcile ─► create / update (rate limited)
//	RootsSource (root rotation) ────────────┘ (every namespace)
//
// Each copy holds the roots under ca.KeyRootCert, in the same PEM as the
// CA writes in its own namespace (ca.PublishRoots), and is labelled
// app.kubernetes.io/managed-by=isthmus. The loop is level-triggered: an
// event only enqueues a namespace, and the worker compares what the
// informer caches hold with the CA's current roots, so a user's edit or
// deletion of a copy is put right, and a rotation reaches every namespace.
// Other keys in a copy are left alone, as ca.PublishRoots does.
//
// A ConfigMap of that name without the label is someone else's: it is
// never changed, and its namespace is reported (Conflicts, and a log at
// Warn when it appears) until it goes or is labelled. Removing the label
// from Isthmus's copy hands it over the same way. Namespaces being deleted
// are skipped: nothing can be created in them, and what is there goes
// with them.
//
// In RBAC terms it needs list and watch on namespaces, create on
// configmaps, and get, list, watch and update on configmaps named
// isthmus-ca-root-cert, in every namespace: its ConfigMap informer lists
// and watches with the field selector metadata.name=isthmus-ca-root-cert,
// which the API server authorizes against resourceNames.
type RootsPublisher struct {
	opts    RootsOptions
	log     *slog.Logger
	kube    kubernetes.Interface
	source  RootsSource
	limiter flowcontrol.RateLimiter

	nsInformers informers.SharedInformerFactory
	cmInformers informers.SharedInformerFactory
	namespaces  corelisters.NamespaceLister
	configMaps  corelisters.ConfigMapLister
	synced      []cache.InformerSynced

	queue workqueue.TypedRateLimitingInterface[string]

	// want is the PEM every copy must hold: set before Run's workers start
	// and on every change of the source, before the namespaces are
	// enqueued again.
	want atomic.Pointer[string]

	// mu guards conflicts: the namespaces whose ConfigMap of our name is
	// someone else's, with the reason.
	mu        sync.Mutex
	conflicts map[string]string
}

// RootsConflict is a namespace where someone else's ConfigMap holds the
// name of the roots ConfigMap, so pods there do not get Isthmus's roots.
type RootsConflict struct {
	Namespace string `json:"namespace"`
	Reason    string `json:"reason"`
}

// NewRootsPublisher wires informers for the cluster behind kube; nothing
// runs until Run.
func NewRootsPublisher(kube kubernetes.Interface, source RootsSource, opts RootsOptions) (*RootsPublisher, error) {
	if kube == nil || source == nil {
		return nil, errors.New("roots publisher: the kube client and the roots source are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.QPS <= 0 {
		opts.QPS = 20
	}
	if opts.Burst <= 0 {
		opts.Burst = 40
	}
	if opts.Workers <= 0 {
		opts.Workers = 2
	}
	if opts.ResyncPeriod <= 0 {
		opts.ResyncPeriod = 10 * time.Minute
	}
	p := &RootsPublisher{
		opts:    opts,
		log:     opts.Logger.With("component", "roots-publisher", "configMap", ca.RootsConfigMapName),
		kube:    kube,
		source:  source,
		limiter: flowcontrol.NewTokenBucketRateLimiter(opts.QPS, opts.Burst),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "ca-root-configmaps"}),
		conflicts: map[string]string{},
	}
	p.nsInformers = informers.NewSharedInformerFactory(kube, opts.ResyncPeriod)
	// Only ConfigMaps of our name: the cache stays one small object per
	// namespace, and RBAC can be limited to that name.
	p.cmInformers = informers.NewSharedInformerFactoryWithOptions(kube, opts.ResyncPeriod,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", ca.RootsConfigMapName).String()
		}))
	nsInf := p.nsInformers.Core().V1().Namespaces()
	cmInf := p.cmInformers.Core().V1().ConfigMaps()
	p.namespaces = nsInf.Lister()
	p.configMaps = cmInf.Lister()

	nsKey := func(obj any) (string, bool) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		switch o := obj.(type) {
		case *corev1.Namespace:
			return o.Name, true
		case *corev1.ConfigMap:
			return o.Namespace, true
		}
		return "", false
	}
	enqueue := func(obj any) {
		if ns, ok := nsKey(obj); ok {
			p.queue.Add(ns)
		}
	}
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: enqueue,
	}
	for _, inf := range []cache.SharedIndexInformer{nsInf.Informer(), cmInf.Informer()} {
		reg, err := inf.AddEventHandler(h)
		if err != nil {
			return nil, fmt.Errorf("roots publisher: add event handler: %w", err)
		}
		p.synced = append(p.synced, reg.HasSynced)
	}
	return p, nil
}

// Conflicts lists, by namespace, where someone else's ConfigMap holds the
// roots ConfigMap's name, as of the last reconcile of each namespace.
func (p *RootsPublisher) Conflicts() []RootsConflict {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]RootsConflict, 0, len(p.conflicts))
	for ns, reason := range p.conflicts {
		out = append(out, RootsConflict{Namespace: ns, Reason: reason})
	}
	slices.SortFunc(out, func(a, b RootsConflict) int {
		switch {
		case a.Namespace < b.Namespace:
			return -1
		case a.Namespace > b.Namespace:
			return 1
		}
		return 0
	})
	return out
}

// Run starts the informers and keeps every namespace's copy current until
// ctx ends. It returns nil on a clean shutdown, after every goroutine it
// started has stopped. Run may be called once.
func (p *RootsPublisher) Run(ctx context.Context) error {
	defer utilruntime.HandleCrash()
	defer p.nsInformers.Shutdown()
	defer p.cmInformers.Shutdown()
	// Cancelled first (defers run last-in first-out), so the Shutdowns
	// above find their informers stopping.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer p.queue.ShutDown()

	// Subscribed before the first read, so no change falls between.
	changed, unsubscribe := p.source.Subscribe()
	defer unsubscribe()
	p.setWant()

	p.log.Info("starting", "qps", p.opts.QPS, "burst", p.opts.Burst, "workers", p.opts.Workers)
	p.nsInformers.Start(ctx.Done())
	p.cmInformers.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), p.synced...) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("roots publisher: informer caches did not sync")
	}
	p.log.Info("caches synced, publishing the roots in every namespace")

	var wg sync.WaitGroup
	for range p.opts.Workers {
		wg.Go(func() { p.worker(ctx) })
	}
	wg.Go(func() { p.watchRoots(ctx, changed) })
	<-ctx.Done()
	p.queue.ShutDown()
	wg.Wait()
	p.log.Info("stopped")
	return nil
}

// watchRoots takes every change of the CA's roots and enqueues every
// namespace, so a rotation reaches them all.
func (p *RootsPublisher) watchRoots(ctx context.Context, changed <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		if !p.setWant() {
			continue
		}
		nss, err := p.namespaces.List(labels.Everything())
		if err != nil {
			continue
		}
		p.log.Info("the CA's roots changed, updating every namespace", "namespaces", len(nss), "roots", len(p.source.Bundle().X509Authorities()))
		for _, ns := range nss {
			p.queue.Add(ns.Name)
		}
	}
}

// setWant reads the source's roots, reporting whether they changed.
func (p *RootsPublisher) setWant() bool {
	pemRoots := string(pemutil.EncodeCertificates(p.source.Bundle().X509Authorities()...))
	if old := p.want.Load(); old != nil && *old == pemRoots {
		return false
	}
	p.want.Store(&pemRoots)
	return true
}

// worker drains the queue until it shuts down; a failed namespace is
// retried after the queue's backoff (5ms doubling up to 1000s, and 10/s
// overall).
func (p *RootsPublisher) worker(ctx context.Context) {
	for {
		ns, quit := p.queue.Get()
		if quit {
			return
		}
		err := p.reconcile(ctx, ns)
		switch {
		case err == nil, ctx.Err() != nil:
			p.queue.Forget(ns)
		default:
			p.log.Debug("publishing the roots failed, retrying", "namespace", ns, "error", err)
			p.queue.AddRateLimited(ns)
		}
		p.queue.Done(ns)
	}
}

// reconcile makes namespace ns's copy hold the current roots. It reads
// only the caches, and calls the API server only to write.
func (p *RootsPublisher) reconcile(ctx context.Context, ns string) error {
	n, err := p.namespaces.Get(ns)
	if apierrors.IsNotFound(err) {
		p.setConflict(ns, "")
		return nil
	}
	if err != nil {
		return err
	}
	if n.DeletionTimestamp != nil || n.Status.Phase == corev1.NamespaceTerminating {
		p.setConflict(ns, "")
		return nil
	}
	want := *p.want.Load()
	cms := p.kube.CoreV1().ConfigMaps(ns)
	cur, err := p.configMaps.ConfigMaps(ns).Get(ca.RootsConfigMapName)
	if apierrors.IsNotFound(err) {
		p.setConflict(ns, "")
		if err := p.limiter.Wait(ctx); err != nil {
			return err
		}
		_, err := cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ca.RootsConfigMapName, Labels: ca.RootsLabels()},
			Data:       map[string]string{ca.KeyRootCert: want},
		}, metav1.CreateOptions{FieldManager: rootsFieldManager})
		switch {
		case err == nil:
			p.log.Debug("created", "namespace", ns)
			return nil
		case apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause):
			// Deleted since the cache saw it: the namespace event follows.
			return nil
		}
		// AlreadyExists too: the cache is behind, its event will bring the
		// object, and the retry looks at it.
		return fmt.Errorf("create ConfigMap %s/%s: %w", ns, ca.RootsConfigMapName, err)
	}
	if err != nil {
		return err
	}
	if !isManaged(cur) {
		p.setConflict(ns, fmt.Sprintf("ConfigMap %s/%s exists and is not managed by Isthmus (no label %s=%s); left untouched, so pods in %s do not get the CA's roots from it",
			ns, ca.RootsConfigMapName, LabelManagedBy, ManagedByIsthmus, ns))
		return nil
	}
	p.setConflict(ns, "")
	if cur.DeletionTimestamp != nil {
		// Going: its deletion event brings the create.
		return nil
	}
	if cur.Data[ca.KeyRootCert] == want && hasLabels(cur.Labels, ca.RootsLabels()) {
		return nil
	}
	updated := cur.DeepCopy()
	if updated.Data == nil {
		updated.Data = map[string]string{}
	}
	updated.Data[ca.KeyRootCert] = want
	updated.Labels = withLabels(updated.Labels, ca.RootsLabels())
	if err := p.limiter.Wait(ctx); err != nil {
		return err
	}
	// The update carries the cached resourceVersion: if someone changed
	// the object since (relabelled it, say), it fails with a conflict and
	// the retry sees their version.
	if _, err := cms.Update(ctx, updated, metav1.UpdateOptions{FieldManager: rootsFieldManager}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil // deleted meanwhile: its event brings the create
		}
		return fmt.Errorf("update ConfigMap %s/%s: %w", ns, ca.RootsConfigMapName, err)
	}
	p.log.Debug("updated", "namespace", ns)
	return nil
}

// setConflict records why ns's ConfigMap is not Isthmus's, or clears it
// (reason ""), logging the changes.
func (p *RootsPublisher) setConflict(ns, reason string) {
	p.mu.Lock()
	old, had := p.conflicts[ns]
	if reason == "" {
		delete(p.conflicts, ns)
	} else {
		p.conflicts[ns] = reason
	}
	p.mu.Unlock()
	switch {
	case reason != "" && old != reason:
		p.log.Warn("someone else's ConfigMap holds the roots ConfigMap's name; leaving it alone", "namespace", ns, "reason", reason)
	case reason == "" && had:
		p.log.Info("the roots ConfigMap's name is free again or Isthmus's", "namespace", ns)
	}
}

// rootsFieldManager names the publisher in managedFields.
const rootsFieldManager = "isthmus-roots-publisher"
