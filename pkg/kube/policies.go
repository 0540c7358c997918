package kube

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/pkg/authz"
)

const (
	// policyResource is the AuthorizationPolicy's resource name, in
	// policyGV and in the legacy v1beta1.
	policyResource = "authorizationpolicies"
	// policyGVLegacy is the only version Istio's CRD served before 1.22.
	policyGVLegacy = "security.istio.io/v1beta1"
	// policySyncWarnAfter is how long the policies may take to be listed
	// before a warning says why they are not.
	policySyncWarnAfter = 30 * time.Second
	// policyDiscoveryRetry bounds how soon a discovery that failed is
	// asked again.
	policyDiscoveryRetry = 5 * time.Second
)

// policyGV is the group/version the policies are read in: the one
// Istio's CRD stores, served since Istio 1.22.
var policyGV = securityv1.SchemeGroupVersion.String()

// startPolicyInformer wires the AuthorizationPolicy informer, all
// namespaces, in security.istio.io/v1 or, legacy, v1beta1 (the same
// spec), whose handler keeps Options.Policies equal to the cluster's
// policies, and starts it.
func (e *Exporter) startPolicyInformer(ctx context.Context, legacy bool) (cache.SharedIndexInformer, error) {
	inf := e.istioInformers.Security().V1().AuthorizationPolicies().Informer()
	if legacy {
		inf = e.istioInformers.Security().V1beta1().AuthorizationPolicies().Informer()
	}
	if err := inf.SetTransform(stripPolicy); err != nil {
		return nil, fmt.Errorf("kube exporter: strip authorization policies: %w", err)
	}
	err := inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		e.policyListErr.Store(&err)
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	if err != nil {
		return nil, fmt.Errorf("kube exporter: authorization policy watch error handler: %w", err)
	}
	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    e.policySet,
		UpdateFunc: func(_, obj any) { e.policySet(obj) },
		DeleteFunc: e.policyDeleted,
	})
	if err != nil {
		return nil, fmt.Errorf("kube exporter: add authorization policy event handler: %w", err)
	}
	// As for pods: synced once the handler has put every policy of the
	// first list in the store, not only once the cache holds them.
	synced := cache.InformerSynced(reg.HasSynced)
	e.policyHandlerSynced.Store(&synced)
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

// syncPolicies starts the AuthorizationPolicy informer once the API
// server serves the kind, and marks Options.Policies synced once the
// policy and pod handlers have both seen every object. It returns when
// that is done or ctx ends.
//
// A cluster without Istio's AuthorizationPolicy CRD has no policy, and
// an informer on a kind that is not served never syncs: the sidecars,
// which are served nothing until the store is synced, would wait
// forever. So when discovery says the kind is not served, the store is
// marked synced with no policy (once the pods are read), much as
// istiod's informers on a missing CRD count as synced; and discovery is
// asked again every policyRecheck (a minute), so that installing the
// CRD later needs no restart. The cost: a policy created in the minute
// after the CRD is installed is enforced only once the next look finds
// the kind and lists it; the store cannot become unsynced again, and
// holding every sidecar back until then would be worse. Discovery
// needs no RBAC, where watching CRDs as istiod does would. A discovery
// that fails decides nothing: the store stays unsynced, and it is asked
// again.
func (e *Exporter) syncPolicies(ctx context.Context) {
	absent, failures := false, 0
	for {
		retry := e.policyRecheck
		served, err := e.serves(ctx, policyGV)
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
			e.log.Log(ctx, level, "discovery of AuthorizationPolicy failed, will retry; the policies are not synced until it answers",
				"groupVersion", policyGV, "failures", failures, "error", err)
			retry = min(retry, policyDiscoveryRetry)
		case served:
			if absent {
				e.log.Info("AuthorizationPolicy now served by the API server: reading the policies", "groupVersion", policyGV)
			}
			e.startAndWait(ctx, false)
			return
		case !absent:
			absent, failures = true, 0
			legacy, err := e.serves(ctx, policyGVLegacy)
			if err != nil {
				// Decide nothing: asked again, sooner.
				absent, retry = false, min(retry, policyDiscoveryRetry)
				break
			}
			if legacy {
				e.log.Info("AuthorizationPolicies are served only as "+policyGVLegacy+" (Istio's CRDs before 1.22): reading them there, the same spec",
					"groupVersion", policyGVLegacy)
				e.startAndWait(ctx, true)
				return
			}
			e.log.Info("no AuthorizationPolicy in this cluster: the API server does not serve "+policyResource+"."+policyGV+" (Istio's CRD is not installed), so sidecars enforce none; a CRD installed later is found at the next recheck, without a restart",
				"recheck", e.policyRecheck)
			if !cache.WaitForCacheSync(ctx.Done(), e.podsSynced) {
				return
			}
			e.opts.Policies.SetSynced()
		default:
			failures = 0
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(retry):
		}
	}
}

// policiesSynced reports whether the policy handler has seen every
// policy of the first list; false before the informer is started.
func (e *Exporter) policiesSynced() bool {
	f := e.policyHandlerSynced.Load()
	return f != nil && (*f)()
}

// startAndWait starts the policy informer (legacy: in v1beta1) and
// waits for it as waitPoliciesSynced does.
func (e *Exporter) startAndWait(ctx context.Context, legacy bool) {
	inf, err := e.startPolicyInformer(ctx, legacy)
	if err != nil {
		// Only a programming error (a transform set twice); the store
		// stays unsynced, so the sidecars are held back, and says why.
		e.log.Error("AuthorizationPolicy informer not started: sidecars are held back", "error", err)
		return
	}
	e.waitPoliciesSynced(ctx, inf)
}

// waitPoliciesSynced marks Options.Policies synced once the policy and
// pod handlers have seen every object, and warns, with the last list
// error, when the policies take longer than policySyncWarnAfter.
func (e *Exporter) waitPoliciesSynced(ctx context.Context, inf cache.SharedIndexInformer) {
	synced := []cache.InformerSynced{e.podsSynced, e.policiesSynced}
	wctx, cancel := context.WithTimeout(ctx, policySyncWarnAfter)
	ok := cache.WaitForCacheSync(wctx.Done(), synced...)
	cancel()
	if !ok {
		if ctx.Err() != nil {
			return
		}
		if !e.policiesSynced() {
			why := "no answer yet"
			if err := e.policyListErr.Load(); err != nil {
				why = (*err).Error()
			}
			e.log.Warn("AuthorizationPolicies not listed yet: the policy store stays unsynced, so sidecars are held back, until they are; the federator needs list and watch on "+policyResource+".security.istio.io",
				"waited", policySyncWarnAfter, "lastError", why)
		}
		if !cache.WaitForCacheSync(ctx.Done(), synced...) {
			return
		}
	}
	e.opts.Policies.SetSynced()
	n := len(inf.GetStore().ListKeys())
	e.log.Info("authorization policies synced", "policies", n)
}

// serves asks discovery whether the API server serves AuthorizationPolicy
// in gv; a group/version it does not serve at all is false, not an error.
func (e *Exporter) serves(ctx context.Context, gv string) (bool, error) {
	list, err := discovery.ToServerResourcesInterfaceWithContext(e.kube.Discovery()).ServerResourcesForGroupVersionWithContext(ctx, gv)
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == policyResource }), nil
}

// stripPolicy is the AuthorizationPolicy informer's transform: it keeps
// the namespace, name, uid, resourceVersion and spec, and drops the rest
// of the metadata (managedFields, annotations such as kubectl's
// last-applied-configuration, labels) and the status. Like stripPod it
// strips in place, is idempotent, and passes anything else through.
func stripPolicy(obj any) (any, error) {
	strip := func(m *metav1.ObjectMeta) {
		*m = metav1.ObjectMeta{Namespace: m.Namespace, Name: m.Name, UID: m.UID, ResourceVersion: m.ResourceVersion}
	}
	switch p := obj.(type) {
	case *securityv1.AuthorizationPolicy:
		p.TypeMeta = metav1.TypeMeta{}
		strip(&p.ObjectMeta)
		p.Status.Reset()
	case *securityv1beta1.AuthorizationPolicy:
		p.TypeMeta = metav1.TypeMeta{}
		strip(&p.ObjectMeta)
		p.Status.Reset()
	}
	return obj, nil
}
