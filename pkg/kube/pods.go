package kube

import (
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// defaultServiceAccount is the ServiceAccount of a pod that names none.
const defaultServiceAccount = "default"

// TLSModeLabel marks a meshed pod when its value is TLSModeIstio: its
// sidecar accepts only mTLS, so the other sidecars must speak mTLS to
// it. It is the label Istio's injector sets and reads.
const (
	TLSModeLabel = "security.istio.io/tlsMode"
	TLSModeIstio = "istio"
)

// stripPod is the Pod informer's transform: it keeps only what identities
// need (namespace, name, uid, resourceVersion, spec.serviceAccountName,
// and the TLSModeLabel that says the pod is meshed), so
// a pod costs its cache about 1.4 KB, the size of an empty Pod, instead of
// its whole metadata, spec and status. client-go hands the transform each
// object before anyone else sees it, so it strips in place rather than
// allocate again on every pod event. It is idempotent, as client-go asks,
// and passes anything that is not a Pod through.
func stripPod(obj any) (any, error) { return stripPodLabels(obj, false) }

// stripPodKeepLabels is stripPod keeping every label: the pod's
// AuthorizationPolicies are chosen by them (Options.Policies).
func stripPodKeepLabels(obj any) (any, error) { return stripPodLabels(obj, true) }

func stripPodLabels(obj any, all bool) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	p.TypeMeta = metav1.TypeMeta{}
	labels := p.Labels
	if !all {
		labels = nil
		if v, ok := p.Labels[TLSModeLabel]; ok {
			if len(p.Labels) == 1 {
				labels = p.Labels
			} else {
				labels = map[string]string{TLSModeLabel: v}
			}
		}
	}
	p.ObjectMeta = metav1.ObjectMeta{
		Namespace:       p.Namespace,
		Name:            p.Name,
		UID:             p.UID,
		ResourceVersion: p.ResourceVersion,
		Labels:          labels,
	}
	p.Spec = corev1.PodSpec{ServiceAccountName: p.Spec.ServiceAccountName}
	p.Status = corev1.PodStatus{}
	return p, nil
}

// podFromEvent unwraps a Pod from an informer event, tombstones included.
func podFromEvent(obj any) (*corev1.Pod, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	p, ok := obj.(*corev1.Pod)
	return p, ok
}

// podRef names a pod, or a ServiceAccount, in a namespace. A struct key
// rather than "namespace/name", so that looking up the pod of each endpoint
// allocates nothing.
type podRef struct{ namespace, name string }

// account is one ServiceAccount that pods run as, with its SPIFFE ID built
// once rather than on every reconcile of every service it serves.
type account struct {
	ref podRef
	// id is spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>;
	// empty when that is not a valid SPIFFE ID (impossible for names the
	// API server accepted, but then no identity is better than a wrong one).
	id string
	// ids is []string{id}, shared by every service this account alone
	// serves; nil when id is empty.
	ids []string
	// pods counts the pods that run as the account; at zero it is
	// forgotten.
	pods int
}

// podAccounts maps pods to their ServiceAccounts and SPIFFE IDs.
//
// The Pod informer's own cache holds the same facts, but reading it takes a
// "namespace/name" key string per lookup: one allocation per endpoint on
// every reconcile, twice the allocations of a whole catalog build (see
// BenchmarkBuildCatalog). The Exporter keeps this map current from the
// informer's events instead, at about 40 bytes a pod.
type podAccounts struct {
	td spiffeid.TrustDomain

	// mu guards byPod and accounts.
	mu sync.RWMutex
	// byPod is the account of every pod the informer has seen.
	byPod map[podRef]*account
	// meshed holds the pods labelled TLSModeLabel=istio.
	meshed map[podRef]struct{}
	// accounts holds each ServiceAccount (namespace, name) pods run as.
	accounts map[podRef]*account
}

func newPodAccounts(td spiffeid.TrustDomain) *podAccounts {
	return &podAccounts{td: td, byPod: make(map[podRef]*account), meshed: make(map[podRef]struct{}), accounts: make(map[podRef]*account)}
}

// set records a pod's ServiceAccount ("default" when it names none) and
// whether it is meshed, and reports whether that changed what was known
// about the pod.
func (a *podAccounts) set(p *corev1.Pod) bool {
	ref := podRef{p.Namespace, p.Name}
	acct := podRef{p.Namespace, p.Spec.ServiceAccountName}
	if acct.name == "" {
		acct.name = defaultServiceAccount
	}
	meshed := p.Labels[TLSModeLabel] == TLSModeIstio
	a.mu.Lock()
	defer a.mu.Unlock()
	_, wasMeshed := a.meshed[ref]
	if meshed {
		a.meshed[ref] = struct{}{}
	} else {
		delete(a.meshed, ref)
	}
	old, known := a.byPod[ref]
	if known && old.ref == acct {
		return meshed != wasMeshed
	}
	if known {
		a.releaseLocked(old)
	}
	cur, ok := a.accounts[acct]
	if !ok {
		cur = &account{ref: acct}
		if id, err := spiffeid.FromSegments(a.td, "ns", acct.namespace, "sa", acct.name); err == nil {
			cur.id = id.String()
			cur.ids = []string{cur.id}
		}
		a.accounts[acct] = cur
	}
	cur.pods++
	a.byPod[ref] = cur
	return true
}

// remove forgets a pod and reports whether it was known.
func (a *podAccounts) remove(namespace, name string) bool {
	ref := podRef{namespace, name}
	a.mu.Lock()
	defer a.mu.Unlock()
	old, ok := a.byPod[ref]
	if !ok {
		return false
	}
	delete(a.byPod, ref)
	delete(a.meshed, ref)
	a.releaseLocked(old)
	return true
}

// meshedPod reports whether the pod is known, and if so whether it is
// labelled meshed.
func (a *podAccounts) meshedPod(namespace, name string) (known, meshed bool) {
	ref := podRef{namespace, name}
	a.mu.RLock()
	defer a.mu.RUnlock()
	_, known = a.byPod[ref]
	_, meshed = a.meshed[ref]
	return known, meshed
}

func (a *podAccounts) releaseLocked(acct *account) {
	if acct.pods--; acct.pods <= 0 {
		delete(a.accounts, acct.ref)
	}
}

// account returns the account of a pod; nil while the pod is unknown
// (deleted, or not yet seen by the informer: its arrival re-enqueues the
// services that point at it). The account must not be modified.
func (a *podAccounts) account(namespace, name string) *account {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.byPod[podRef{namespace, name}]
}

// identities returns the SPIFFE IDs of distinct accounts. The result may
// be shared: it must not be modified.
func (a *podAccounts) identities(accts []*account) []string {
	switch len(accts) {
	case 0:
		return nil
	case 1:
		return accts[0].ids
	}
	out := make([]string, 0, len(accts))
	for _, acct := range accts {
		if acct.id != "" {
			out = append(out, acct.id)
		}
	}
	return out
}
