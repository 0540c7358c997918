package kube

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/pkg/authz"
)

const (
	// policyGVLegacy is the only version Istio's security CRDs served
	// before 1.22.
	policyGVLegacy = "security.istio.io/v1beta1"
	// policySyncWarnAfter is how long a policy kind may take to be
	// listed before a warning says why it is not.
	policySyncWarnAfter = 30 * time.Second
	// policyDiscoveryRetry bounds how soon a discovery that failed is
	// asked again.
	policyDiscoveryRetry = 5 * time.Second
)

// policyGV is the group/version the policies are read in: the one
// Istio's CRDs store, served since Istio 1.22.
var policyGV = securityv1.SchemeGroupVersion.String()

// policyKind is one of the Istio kinds the exporter mirrors into
// Options.Policies: how it is read, and how far. Each kind is
// discovered, started and waited for on its own (syncKind), since a
// cluster may have one kind's CRD and not the other's, or serve one only
// in v1beta1.
type policyKind struct {
	// kind and plural name it in the logs: "AuthorizationPolicy",
	// "AuthorizationPolicies".
	kind, plural string
	// resource is its resource name, in policyGV and policyGVLegacy.
	resource string
	// without says, for the log, what the sidecars do in a cluster
	// without the kind.
	without string
	// informer is the kind's informer in f, in policyGV or (legacy)
	// policyGVLegacy: made on the first call, the same one after.
	informer func(f istioinformers.SharedInformerFactory, legacy bool) cache.SharedIndexInformer
	// set handles an object added or updated; deleted, one deleted,
	// tombstones included.
	set, deleted func(obj any)

	// handlerSynced is the handler's HasSynced, once syncKind has
	// started the informer (listed reads it from any goroutine).
	handlerSynced atomic.Pointer[cache.InformerSynced]
	// absent is set once discovery found the kind not served: it then
	// counts as read, with no object, for good.
	absent atomic.Bool
	// listErr is the last error of the informer's list or watch, to say
	// why it has not synced.
	listErr atomic.Pointer[error]
}

// listed reports whether the kind's handler has seen every object of
// the first list; false before the informer is started.
func (k *policyKind) listed() bool {
	f := k.handlerSynced.Load()
	return f != nil && (*f)()
}

// read reports whether the store may count the kind as read: listed, or
// found not served.
func (k *policyKind) read() bool { return k.absent.Load() || k.listed() }

// newPolicyKinds is what e mirrors into Options.Policies: the
// AuthorizationPolicies and the PeerAuthentications.
func newPolicyKinds(e *Exporter) []*policyKind {
	return []*policyKind{{
		kind: "AuthorizationPolicy", plural: "AuthorizationPolicies", resource: "authorizationpolicies",
		without: "sidecars enforce none",
		informer: func(f istioinformers.SharedInformerFactory, legacy bool) cache.SharedIndexInformer {
			if legacy {
				return f.Security().V1beta1().AuthorizationPolicies().Informer()
			}
			return f.Security().V1().AuthorizationPolicies().Informer()
		},
		set: e.policySet, deleted: e.policyDeleted,
	}, {
		kind: "PeerAuthentication", plural: "PeerAuthentications", resource: "peerauthentications",
		without: "sidecars accept mutual TLS only (STRICT, Isthmus's default)",
		informer: func(f istioinformers.SharedInformerFactory, legacy bool) cache.SharedIndexInformer {
			if legacy {
				return f.Security().V1beta1().PeerAuthentications().Informer()
			}
			return f.Security().V1().PeerAuthentications().Informer()
		},
		set: e.peerAuthenticationSet, deleted: e.peerAuthenticationDeleted,
	}}
}

// startKind wires k's informer, all namespaces, in security.istio.io/v1
// or, legacy, v1beta1 (the same spec), whose handler keeps
// Options.Policies equal to the cluster's objects of the kind, and
// starts it.
func (e *Exporter) startKind(ctx context.Context, k *policyKind, legacy bool) (cache.SharedIndexInformer, error) {
	// The factory's Start starts every informer it holds: another
	// kind's, made but not yet given its transform and handler, would
	// refuse them once started.
	e.istioStartMu.Lock()
	defer e.istioStartMu.Unlock()
	inf := k.informer(e.istioInformers, legacy)
	if err := inf.SetTransform(stripPolicy); err != nil {
		return nil, fmt.Errorf("kube exporter: strip %s: %w", k.resource, err)
	}
	err := inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		k.listErr.Store(&err)
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	if err != nil {
		return nil, fmt.Errorf("kube exporter: %s watch error handler: %w", k.resource, err)
	}
	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    k.set,
		UpdateFunc: func(_, obj any) { k.set(obj) },
		DeleteFunc: k.deleted,
	})
	if err != nil {
		return nil, fmt.Errorf("kube exporter: add %s event handler: %w", k.resource, err)
	}
	// As for pods: synced once the handler has put every object of the
	// first list in the store, not only once the cache holds them.
	synced := cache.InformerSynced(reg.HasSynced)
	k.handlerSynced.Store(&synced)
	e.istioInformers.Start(ctx.Done())
	return inf, nil
}

// policySet handles an AuthorizationPolicy added or updated.
func (e *Exporter) policySet(obj any) {
	// The informer's own object: nothing modifies it after the
	// transform (an update is a new object), so the store may keep its
	// spec.
	switch p := obj.(type) {
	case *securityv1.AuthorizationPolicy:
		e.opts.Policies.SetPolicy(authz.Policy{Namespace: p.Namespace, Name: p.Name, Spec: &p.Spec})
	case *securityv1beta1.AuthorizationPolicy:
		e.opts.Policies.SetPolicy(authz.Policy{Namespace: p.Namespace, Name: p.Name, Spec: &p.Spec})
	}
}

// policyDeleted handles an AuthorizationPolicy deleted, tombstones
// included: only its name counts.
func (e *Exporter) policyDeleted(obj any) {
	if key, ok := objectKey(obj); ok {
		e.opts.Policies.DeletePolicy(key.Namespace, key.Name)
	}
}

// peerAuthenticationSet handles a PeerAuthentication added or updated.
// Its creationTimestamp goes along: of two policies at one level, the
// older decides.
func (e *Exporter) peerAuthenticationSet(obj any) {
	// As in policySet, the store may keep the informer's spec.
	switch p := obj.(type) {
	case *securityv1.PeerAuthentication:
		e.opts.Policies.SetPeerAuthentication(authz.PeerPolicy{Namespace: p.Namespace, Name: p.Name, Created: p.CreationTimestamp.Time, Spec: &p.Spec})
	case *securityv1beta1.PeerAuthentication:
		e.opts.Policies.SetPeerAuthentication(authz.PeerPolicy{Namespace: p.Namespace, Name: p.Name, Created: p.CreationTimestamp.Time, Spec: &p.Spec})
	}
}

// peerAuthenticationDeleted handles a PeerAuthentication deleted,
// tombstones included: only its name counts.
func (e *Exporter) peerAuthenticationDeleted(obj any) {
	if key, ok := objectKey(obj); ok {
		e.opts.Policies.DeletePeerAuthentication(key.Namespace, key.Name)
	}
}

// syncPolicies reads every policy kind into Options.Policies, each on
// its own (syncKind), and marks the store synced once the pod handler
// has seen every pod and every kind has been listed or found not
// served: the sidecars, served nothing until then, never get a store
// that lacks a policy the cluster holds. It returns once every kind's
// informer is started and listed, or ctx ends.
func (e *Exporter) syncPolicies(ctx context.Context) {
	var kinds sync.WaitGroup
	read := []cache.InformerSynced{e.podsSynced}
	for _, k := range e.policyKinds {
		kinds.Go(func() { e.syncKind(ctx, k) })
		read = append(read, k.read)
	}
	if cache.WaitForCacheSync(ctx.Done(), read...) {
		e.opts.Policies.SetSynced()
		var absent []string
		for _, k := range e.policyKinds {
			if !k.listed() {
				absent = append(absent, k.kind)
			}
		}
		e.log.Info("policy store synced: the sidecars are served", "notServed", absent)
	}
	kinds.Wait()
}

// syncKind starts k's informer once the API server serves the kind, and
// returns once its handler has seen every object (waitKindListed) or ctx
// ends.
//
// A cluster without Istio's CRD of the kind has none of it, and an
// informer on a kind that is not served never syncs: the sidecars,
// which are served nothing until the store is synced, would wait
// forever. So when discovery says the kind is not served in v1 nor in
// the legacy v1beta1, it counts as read with none (k.absent), much as
// istiod's informers on a missing CRD count as synced; and discovery is
// asked again every policyRecheck (a minute), so that installing the
// CRD later needs no restart. The cost: a policy created in the minute
// after the CRD is installed is enforced only once the next look finds
// the kind and lists it; the store cannot become unsynced again, and
// holding every sidecar back until then would be worse. Discovery
// needs no RBAC, where watching CRDs as istiod does would. A discovery
// that fails decides nothing: the kind stays unread, and it is asked
// again.
func (e *Exporter) syncKind(ctx context.Context, k *policyKind) {
	failures := 0
	for {
		absent := k.absent.Load()
		retry := e.policyRecheck
		served, err := e.serves(ctx, policyGV, k.resource)
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			failures++
			level := slog.LevelDebug
			if failures == workerFailuresLogged {
				level = slog.LevelWarn
			}
			e.log.Log(ctx, level, "discovery of "+k.kind+" failed, will retry; the policies are not synced until it answers",
				"groupVersion", policyGV, "failures", failures, "error", err)
			retry = min(retry, policyDiscoveryRetry)
		case served:
			if absent {
				e.log.Info(k.kind+" now served by the API server: reading them", "groupVersion", policyGV)
			}
			e.startAndWait(ctx, k, false)
			return
		default:
			failures = 0
			legacy, err := e.serves(ctx, policyGVLegacy, k.resource)
			if err != nil {
				// Decide nothing: asked again, sooner.
				retry = min(retry, policyDiscoveryRetry)
				break
			}
			if legacy {
				e.log.Info(k.plural+" are served only as "+policyGVLegacy+" (Istio's CRDs before 1.22): reading them there, the same spec",
					"groupVersion", policyGVLegacy)
				e.startAndWait(ctx, k, true)
				return
			}
			if !absent {
				e.log.Info("no "+k.kind+" in this cluster: the API server does not serve "+k.resource+"."+policyGV+" (Istio's CRD is not installed), so "+k.without+"; a CRD installed later is found at the next recheck, without a restart",
					"recheck", e.policyRecheck)
				k.absent.Store(true)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(retry):
		}
	}
}

// startAndWait starts k's informer (legacy: in v1beta1) and waits for
// it as waitKindListed does.
func (e *Exporter) startAndWait(ctx context.Context, k *policyKind, legacy bool) {
	inf, err := e.startKind(ctx, k, legacy)
	if err != nil {
		// Only a programming error (a transform set twice); the kind
		// stays unread, so the sidecars are held back, and says why.
		e.log.Error(k.kind+" informer not started: sidecars are held back", "error", err)
		return
	}
	e.waitKindListed(ctx, k, inf)
}

// waitKindListed returns once k's handler has seen every object of the
// first list, or ctx ends, and warns, with the last list error, when
// that takes longer than policyWarnAfter (policySyncWarnAfter).
func (e *Exporter) waitKindListed(ctx context.Context, k *policyKind, inf cache.SharedIndexInformer) {
	wctx, cancel := context.WithTimeout(ctx, e.policyWarnAfter)
	ok := cache.WaitForCacheSync(wctx.Done(), k.listed)
	cancel()
	if !ok {
		if ctx.Err() != nil {
			return
		}
		why := "no answer yet"
		if err := k.listErr.Load(); err != nil {
			why = (*err).Error()
		}
		held := "the policy store stays unsynced, so sidecars are held back, until they are"
		if k.absent.Load() {
			// The store already counted the kind as read, with none.
			held = "the store holds none of them until they are"
		}
		e.log.Warn(k.plural+" not listed yet: "+held+"; the federator needs list and watch on "+k.resource+".security.istio.io",
			"waited", e.policyWarnAfter, "lastError", why)
		if !cache.WaitForCacheSync(ctx.Done(), k.listed) {
			return
		}
	}
	e.log.Info(k.plural+" listed", "count", len(inf.GetStore().ListKeys()))
}

// policiesSynced reports whether every policy kind has been listed;
// false before their informers are started.
func (e *Exporter) policiesSynced() bool {
	for _, k := range e.policyKinds {
		if !k.listed() {
			return false
		}
	}
	return true
}

// serves asks discovery whether the API server serves resource in gv; a
// group/version it does not serve at all is false, not an error.
func (e *Exporter) serves(ctx context.Context, gv, resource string) (bool, error) {
	list, err := discovery.ToServerResourcesInterfaceWithContext(e.kube.Discovery()).ServerResourcesForGroupVersionWithContext(ctx, gv)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == resource }), nil
}

// stripPolicy is the policy informers' transform: it keeps the
// namespace, name, uid, resourceVersion, creationTimestamp (of two
// PeerAuthentications at one level, the older decides) and spec, and
// drops the rest of the metadata (managedFields, annotations such as
// kubectl's last-applied-configuration, labels) and the status. Like
// stripPod it strips in place, is idempotent, and passes anything else
// through.
func stripPolicy(obj any) (any, error) {
	strip := func(t *metav1.TypeMeta, m *metav1.ObjectMeta) {
		*t = metav1.TypeMeta{}
		*m = metav1.ObjectMeta{Namespace: m.Namespace, Name: m.Name, UID: m.UID, ResourceVersion: m.ResourceVersion,
			CreationTimestamp: m.CreationTimestamp}
	}
	switch p := obj.(type) {
	case *securityv1.AuthorizationPolicy:
		strip(&p.TypeMeta, &p.ObjectMeta)
		p.Status.Reset()
	case *securityv1beta1.AuthorizationPolicy:
		strip(&p.TypeMeta, &p.ObjectMeta)
		p.Status.Reset()
	case *securityv1.PeerAuthentication:
		strip(&p.TypeMeta, &p.ObjectMeta)
		p.Status.Reset()
	case *securityv1beta1.PeerAuthentication:
		strip(&p.TypeMeta, &p.ObjectMeta)
		p.Status.Reset()
	}
	return obj, nil
}
