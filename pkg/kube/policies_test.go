package kube

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	metaapi "istio.io/api/meta/v1alpha1"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"

	"github.com/isthmus-mesh/isthmus/deploy"
	"github.com/isthmus-mesh/isthmus/internal/testlog"
	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// federatorUser is the user the harness's federator credentials carry,
// bound to deploy/'s ClusterRole by install.Isthmus.
const federatorUser = "system:isthmus:federator"

func selectorOf(kv ...string) *typeapi.WorkloadSelector {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return &typeapi.WorkloadSelector{MatchLabels: m}
}

// allowFrom allows principal on every port of the pods sel selects (all
// of the namespace's when nil).
func allowFrom(sel *typeapi.WorkloadSelector, principal string) *securityapi.AuthorizationPolicy {
	return &securityapi.AuthorizationPolicy{
		Selector: sel,
		Action:   securityapi.AuthorizationPolicy_ALLOW,
		Rules:    []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{principal}}}}}},
	}
}

// denyPort denies port on the pods sel selects (all of the namespace's
// when nil).
func denyPort(sel *typeapi.WorkloadSelector, port string) *securityapi.AuthorizationPolicy {
	return &securityapi.AuthorizationPolicy{
		Selector: sel,
		Action:   securityapi.AuthorizationPolicy_DENY,
		Rules:    []*securityapi.Rule{{To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{port}}}}}},
	}
}

func authorizationPolicy(ns, name string, spec *securityapi.AuthorizationPolicy) *securityv1.AuthorizationPolicy {
	ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	spec.DeepCopyInto(&ap.Spec)
	return ap
}

func peerAuthentication(ns, name string, spec *securityapi.PeerAuthentication) *securityv1.PeerAuthentication {
	pa := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	spec.DeepCopyInto(&pa.Spec)
	return pa
}

// peerMode is a PeerAuthentication's mtls of mode.
func peerMode(mode securityapi.PeerAuthentication_MutualTLS_Mode) *securityapi.PeerAuthentication_MutualTLS {
	return &securityapi.PeerAuthentication_MutualTLS{Mode: mode}
}

// namespaceMTLS is a namespace-wide PeerAuthentication of mode.
func namespaceMTLS(mode securityapi.PeerAuthentication_MutualTLS_Mode) *securityapi.PeerAuthentication {
	return &securityapi.PeerAuthentication{Mtls: peerMode(mode)}
}

// podMTLS is the mutual TLS the snapshot gives pod, as a string
// (authz.MTLS's), or "none" when the pod has no set (Strict on every
// port, and no AuthorizationPolicy).
func podMTLS(snap *authz.Snapshot, pod string) string {
	set, ok := snap.Pod(pod)
	if !ok {
		return "none"
	}
	return set.MTLS.String()
}

func labelledPod(ns, name string, kv ...string) *corev1.Pod {
	p := pod(ns, name, "")
	p.Labels = selectorOf(kv...).MatchLabels
	return p
}

// policyRefs is the refs of the policies the snapshot says select pod
// ("namespace/name"), in the store's order; nil when none does.
func policyRefs(snap *authz.Snapshot, pod string) []string {
	set, ok := snap.Pod(pod)
	if !ok {
		return nil
	}
	out := make([]string, len(set.Policies))
	for i, p := range set.Policies {
		out[i] = p.Ref()
	}
	return out
}

// seenLogs is a slog handler that keeps the messages logged at Info and
// above and passes every record on to the test's log.
type seenLogs struct {
	next slog.Handler
	mu   *sync.Mutex
	msgs *[]string
}

func newSeenLogs(t *testing.T) seenLogs {
	return seenLogs{next: testlog.New(t).Handler(), mu: &sync.Mutex{}, msgs: new([]string)}
}

func (s seenLogs) Enabled(ctx context.Context, l slog.Level) bool { return s.next.Enabled(ctx, l) }
func (s seenLogs) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelInfo {
		s.mu.Lock()
		*s.msgs = append(*s.msgs, r.Message)
		s.mu.Unlock()
	}
	return s.next.Handle(ctx, r)
}
func (s seenLogs) WithAttrs(a []slog.Attr) slog.Handler {
	s.next = s.next.WithAttrs(a)
	return s
}
func (s seenLogs) WithGroup(g string) slog.Handler {
	s.next = s.next.WithGroup(g)
	return s
}

// logged reports whether a message containing part was logged.
func (s seenLogs) logged(part string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.ContainsFunc(*s.msgs, func(m string) bool { return strings.Contains(m, part) })
}

// policyEnv is a real kube-apiserver with deploy/'s CRDs and RBAC,
// namespaces istio-system (the root namespace), demo and other, and the
// Istio CRDs it was started with.
type policyEnv struct {
	cluster  *localcluster.Cluster
	adminCfg *rest.Config
	admin    kubernetes.Interface
	istio    istioclient.Interface
}

// istioCRDs are the CRDs of both kinds the exporter reads.
var istioCRDs = [][]byte{install.IstioAuthorizationPolicyCRD, install.IstioPeerAuthenticationCRD}

func startPolicyEnv(t *testing.T, crds ...[]byte) *policyEnv {
	t.Helper()
	env := localcluster.StartT(t, "a")
	a := env.Cluster("a")
	ctx := t.Context()
	adminCfg, err := a.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	require.NoError(t, install.Isthmus(ctx, adminCfg, federatorUser))
	if len(crds) > 0 {
		require.NoError(t, install.Apply(ctx, adminCfg, crds...))
	}
	pe := &policyEnv{cluster: a, adminCfg: adminCfg, admin: a.Client()}
	pe.istio, err = istioclient.NewForConfig(adminCfg)
	require.NoError(t, err)
	for _, ns := range []string{authz.DefaultRootNamespace, "demo", "other"} {
		_, err := pe.admin.CoreV1().Namespaces().Create(ctx, namespace(ns), metav1.CreateOptions{})
		require.NoError(t, err)
		// Pods are admitted only once their ServiceAccount exists; the
		// controller would make it a moment later.
		_, err = pe.admin.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: defaultServiceAccount}}, metav1.CreateOptions{})
		if !apierrors.IsAlreadyExists(err) {
			require.NoError(t, err)
		}
	}
	return pe
}

func (pe *policyEnv) createPods(t *testing.T, pods ...*corev1.Pod) {
	t.Helper()
	for _, p := range pods {
		_, err := pe.admin.CoreV1().Pods(p.Namespace).Create(t.Context(), p, metav1.CreateOptions{})
		require.NoError(t, err)
	}
}

func (pe *policyEnv) createPolicies(t *testing.T, aps ...*securityv1.AuthorizationPolicy) {
	t.Helper()
	for _, ap := range aps {
		_, err := pe.istio.SecurityV1().AuthorizationPolicies(ap.Namespace).Create(t.Context(), ap, metav1.CreateOptions{})
		require.NoError(t, err)
	}
}

func (pe *policyEnv) createPeerAuthentications(t *testing.T, pas ...*securityv1.PeerAuthentication) {
	t.Helper()
	for _, pa := range pas {
		_, err := pe.istio.SecurityV1().PeerAuthentications(pa.Namespace).Create(t.Context(), pa, metav1.CreateOptions{})
		require.NoError(t, err)
	}
}

func (pe *policyEnv) relabel(t *testing.T, ns, name string, kv ...string) {
	t.Helper()
	p, err := pe.admin.CoreV1().Pods(ns).Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	p.Labels = selectorOf(kv...).MatchLabels
	_, err = pe.admin.CoreV1().Pods(ns).Update(t.Context(), p, metav1.UpdateOptions{})
	require.NoError(t, err)
}

// withoutRule takes the rule on resource out of the federator's
// ClusterRole, and waits until the API server refuses it the list.
func (pe *policyEnv) withoutRule(t *testing.T, group, resource string) {
	t.Helper()
	ctx := t.Context()
	roles := pe.admin.RbacV1().ClusterRoles()
	cr, err := roles.Get(ctx, "isthmus-federator", metav1.GetOptions{})
	require.NoError(t, err)
	n := len(cr.Rules)
	cr.Rules = slices.DeleteFunc(cr.Rules, func(r rbacv1.PolicyRule) bool { return slices.Contains(r.Resources, resource) })
	require.Less(t, len(cr.Rules), n, "deploy/'s ClusterRole has a rule on %s", resource)
	_, err = roles.Update(ctx, cr, metav1.UpdateOptions{})
	require.NoError(t, err)
	pe.waitAccess(t, group, resource, false)
}

// restoreRBAC applies deploy/'s RBAC again, and waits until the API
// server lets the federator list resource.
func (pe *policyEnv) restoreRBAC(t *testing.T, group, resource string) {
	t.Helper()
	require.NoError(t, install.Apply(t.Context(), pe.adminCfg, deploy.FederatorRBAC))
	pe.waitAccess(t, group, resource, true)
}

func (pe *policyEnv) waitAccess(t *testing.T, group, resource string, allowed bool) {
	t.Helper()
	require.Eventually(t, func() bool {
		r, err := pe.admin.AuthorizationV1().SubjectAccessReviews().Create(t.Context(), &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{User: federatorUser, ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: "list", Group: group, Resource: resource,
			}},
		}, metav1.CreateOptions{})
		return err == nil && r.Status.Allowed == allowed
	}, 10*time.Second, 20*time.Millisecond, "list %s.%s allowed=%t", resource, group, allowed)
}

// policyRun is an Exporter running as the federator's user, with
// exactly deploy/'s RBAC, filling store.
type policyRun struct {
	exp   *Exporter
	store *authz.Store
	logs  seenLogs
}

// startExporter runs an Exporter as the federator's user, its policies
// rechecked every recheck when not zero, after tweaks.
func (pe *policyEnv) startExporter(t *testing.T, recheck time.Duration, tweaks ...func(*Exporter)) *policyRun {
	t.Helper()
	cfg, err := pe.cluster.RESTConfig(localcluster.UserFederator)
	require.NoError(t, err)
	kc, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	mcs, err := mcsclient.NewForConfig(cfg)
	require.NoError(t, err)
	ic, err := istioclient.NewForConfig(cfg)
	require.NoError(t, err)
	r := &policyRun{store: authz.NewStore(""), logs: newSeenLogs(t)}
	r.exp, err = NewExporter(kc, mcs, catalog.NewStore(), Options{
		ClusterName: "a", TrustDomain: "a.mesh", Logger: slog.New(r.logs), FlushDelay: time.Millisecond,
		Policies: r.store, Istio: ic,
	})
	require.NoError(t, err)
	if recheck != 0 {
		r.exp.policyRecheck = recheck
	}
	for _, tweak := range tweaks {
		tweak(r.exp)
	}
	runUntilCleanup(t, "exporter", r.exp.Run)
	return r
}

// synced waits until the store is synced and returns the first synced
// snapshot seen.
func (r *policyRun) synced(t *testing.T) *authz.Snapshot {
	t.Helper()
	var snap *authz.Snapshot
	require.Eventually(t, func() bool {
		snap = r.store.Snapshot()
		return snap.Synced
	}, 60*time.Second, 10*time.Millisecond, "policy store synced")
	return snap
}

// eventually waits until the store's snapshot satisfies cond.
func (r *policyRun) eventually(t *testing.T, what string, cond func(*authz.Snapshot) bool) {
	t.Helper()
	var last *authz.Snapshot
	require.Eventually(t, func() bool {
		last = r.store.Snapshot()
		return cond(last)
	}, 30*time.Second, 10*time.Millisecond, "%s", what)
}

// TestPoliciesSelectPods runs the exporter as the federator's user
// against a real kube-apiserver with Istio's AuthorizationPolicy CRD and
// follows the store through a cluster's life: policies with and without
// a selector, one in the root namespace, one with a targetRef; a pod whose
// labels change, a pod created late, a root policy whose selector
// changes, a policy and a pod deleted, a policy created late.
func TestPoliciesSelectPods(t *testing.T) {
	pe := startPolicyEnv(t, istioCRDs...)
	root := authz.DefaultRootNamespace
	allowWeb := allowFrom(selectorOf("app", "web"), "cluster.local/ns/demo/sa/client")
	denyDB := denyPort(nil, "5432")
	withNoise := authorizationPolicy("demo", "allow-web", allowWeb)
	withNoise.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 1024)}
	withNoise.Labels = map[string]string{"team": "web"}
	pe.createPods(t,
		labelledPod("demo", "web", "app", "web"),
		labelledPod("demo", "db", "app", "db"),
		labelledPod("other", "web", "app", "web"),
		labelledPod(root, "istiod", "app", "istiod"))
	pe.createPolicies(t,
		withNoise,
		authorizationPolicy("demo", "deny-db-port", denyDB),
		authorizationPolicy(root, "root-web", allowFrom(selectorOf("app", "web"), "cluster.local/ns/other/sa/client")),
		// A targetRef applies to a gateway or waypoint, never a sidecar.
		authorizationPolicy("demo", "waypoint", &securityapi.AuthorizationPolicy{
			TargetRef: &typeapi.PolicyTargetReference{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "waypoint"},
			Action:    securityapi.AuthorizationPolicy_ALLOW,
			Rules:     []*securityapi.Rule{{}},
		}))
	r := pe.startExporter(t, 0)

	// Everything that existed at start is in the first synced snapshot.
	snap := r.synced(t)
	require.Equal(t, []string{"demo/allow-web", "demo/deny-db-port", root + "/root-web"}, policyRefs(snap, "demo/web"))
	require.Equal(t, []string{"demo/deny-db-port"}, policyRefs(snap, "demo/db"), "a policy without a selector selects the whole namespace")
	require.Equal(t, []string{root + "/root-web"}, policyRefs(snap, "other/web"), "a root namespace policy selects in every namespace")
	require.Nil(t, policyRefs(snap, root+"/istiod"))
	for ref, set := range snap.Pods() {
		for _, p := range set.Policies {
			require.NotEqual(t, "demo/waypoint", p.Ref(), "%s is selected by a policy with a targetRef", ref)
		}
	}
	set, _ := snap.Pod("demo/web")
	require.True(t, proto.Equal(allowWeb, set.Policies[0].Spec), "the spec as written: %v", set.Policies[0].Spec)
	require.True(t, proto.Equal(denyDB, set.Policies[1].Spec), "the spec as written: %v", set.Policies[1].Spec)
	// The informer's cache keeps the spec and the names, nothing else.
	obj, ok, err := r.exp.istioInformers.Security().V1().AuthorizationPolicies().Informer().GetStore().GetByKey("demo/allow-web")
	require.NoError(t, err)
	require.True(t, ok)
	cached := obj.(*securityv1.AuthorizationPolicy)
	require.Empty(t, cached.Annotations)
	require.Empty(t, cached.Labels)
	require.Empty(t, cached.ManagedFields)
	require.NotEmpty(t, cached.ResourceVersion)

	// A pod whose labels change moves to the set of the pods it now
	// looks like.
	pe.relabel(t, "demo", "db", "app", "web")
	r.eventually(t, "relabelled demo/db joins demo/web's set", func(s *authz.Snapshot) bool {
		db, ok1 := s.Pod("demo/db")
		web, ok2 := s.Pod("demo/web")
		return ok1 && ok2 && db.Key == web.Key
	})

	// A pod created later, in another namespace, gets the root policy.
	pe.createPods(t, labelledPod("other", "late", "app", "web"))
	r.eventually(t, "a new pod is selected", func(s *authz.Snapshot) bool {
		return slices.Equal(policyRefs(s, "other/late"), []string{root + "/root-web"})
	})

	// The root policy's selector changes: it leaves every namespace's
	// web pods and selects istiod in its own.
	rootWeb, err := pe.istio.SecurityV1().AuthorizationPolicies(root).Get(t.Context(), "root-web", metav1.GetOptions{})
	require.NoError(t, err)
	rootWeb.Spec.Selector = selectorOf("app", "istiod")
	_, err = pe.istio.SecurityV1().AuthorizationPolicies(root).Update(t.Context(), rootWeb, metav1.UpdateOptions{})
	require.NoError(t, err)
	r.eventually(t, "the root policy moves to istiod", func(s *authz.Snapshot) bool {
		return slices.Equal(policyRefs(s, root+"/istiod"), []string{root + "/root-web"}) &&
			policyRefs(s, "other/web") == nil && policyRefs(s, "other/late") == nil &&
			slices.Equal(policyRefs(s, "demo/web"), []string{"demo/allow-web", "demo/deny-db-port"})
	})

	// A policy deleted leaves every set.
	require.NoError(t, pe.istio.SecurityV1().AuthorizationPolicies("demo").Delete(t.Context(), "allow-web", metav1.DeleteOptions{}))
	r.eventually(t, "a deleted policy selects nothing", func(s *authz.Snapshot) bool {
		return slices.Equal(policyRefs(s, "demo/web"), []string{"demo/deny-db-port"}) &&
			slices.Equal(policyRefs(s, "demo/db"), []string{"demo/deny-db-port"})
	})

	// A pod deleted is forgotten (grace period 0: no kubelet here to
	// confirm a graceful one).
	require.NoError(t, pe.admin.CoreV1().Pods("demo").Delete(t.Context(), "web", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}))
	r.eventually(t, "a deleted pod is forgotten", func(s *authz.Snapshot) bool {
		_, ok := s.Pod("demo/web")
		return !ok && slices.Equal(policyRefs(s, "demo/db"), []string{"demo/deny-db-port"})
	})

	// A policy created later, without a selector, selects its
	// namespace's pods.
	pe.createPolicies(t, authorizationPolicy("other", "deny-all", denyPort(nil, "22")))
	r.eventually(t, "a new policy selects", func(s *authz.Snapshot) bool {
		return slices.Equal(policyRefs(s, "other/web"), []string{"other/deny-all"}) &&
			slices.Equal(policyRefs(s, "other/late"), []string{"other/deny-all"})
	})
	require.True(t, r.store.Snapshot().Synced)
}

// The store is synced only once the pods and both policy kinds are read:
// with any of the three lists refused by RBAC the store stays unsynced
// (and the catalog, which needs no policy, gets ready all the same; a
// refused kind holds back neither the other nor the pods), and once the
// RBAC is back the first synced snapshot holds every pod and policy.
func TestPoliciesSyncedOnlyOncePodsAndPoliciesAreRead(t *testing.T) {
	pe := startPolicyEnv(t, istioCRDs...)
	pe.createPods(t, labelledPod("demo", "web", "app", "web"))
	pe.createPolicies(t, authorizationPolicy("demo", "allow-web", allowFrom(selectorOf("app", "web"), "cluster.local/ns/demo/sa/client")))
	pe.createPeerAuthentications(t, peerAuthentication("demo", "permissive", namespaceMTLS(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)))

	t.Run("policies refused", func(t *testing.T) {
		pe.withoutRule(t, "security.istio.io", "authorizationpolicies")
		r := pe.startExporter(t, 0)
		require.Eventually(t, func() bool { return r.exp.Ready() && r.exp.podsSynced() }, 30*time.Second, 10*time.Millisecond,
			"the catalog and the pods do not wait for the policies")
		snap := r.store.Snapshot()
		require.False(t, snap.Synced, "synced before the policies were read")
		require.Empty(t, policyRefs(snap, "demo/web"))

		pe.restoreRBAC(t, "security.istio.io", "authorizationpolicies")
		require.Equal(t, []string{"demo/allow-web"}, policyRefs(r.synced(t), "demo/web"))
	})

	t.Run("peer authentications refused", func(t *testing.T) {
		pe.withoutRule(t, "security.istio.io", "peerauthentications")
		r := pe.startExporter(t, 0, func(e *Exporter) { e.policyWarnAfter = 500 * time.Millisecond })
		ap := r.exp.policyKinds[0]
		require.Equal(t, "AuthorizationPolicy", ap.kind)
		require.Eventually(t, func() bool { return r.exp.Ready() && r.exp.podsSynced() && ap.listed() }, 30*time.Second, 10*time.Millisecond,
			"the catalog, the pods and the AuthorizationPolicies do not wait for the PeerAuthentications")
		require.Eventually(t, func() bool {
			return r.logs.logged("PeerAuthentications not listed yet: the policy store stays unsynced, so sidecars are held back, until they are; the federator needs list and watch on peerauthentications.security.istio.io")
		}, 30*time.Second, 10*time.Millisecond, "the warning names the kind's resource and the RBAC it needs")
		snap := r.store.Snapshot()
		require.False(t, snap.Synced, "synced before the PeerAuthentications were read")
		require.False(t, r.logs.logged("AuthorizationPolicies not listed yet"), "the AuthorizationPolicies are listed")

		pe.restoreRBAC(t, "security.istio.io", "peerauthentications")
		require.Equal(t, "PERMISSIVE", podMTLS(r.synced(t), "demo/web"), "the first synced snapshot has the PeerAuthentication")
	})

	t.Run("pods refused", func(t *testing.T) {
		pe.withoutRule(t, "", "pods")
		r := pe.startExporter(t, 0)
		require.Eventually(t, r.exp.policiesSynced, 30*time.Second, 10*time.Millisecond, "the policies are read")
		snap := r.store.Snapshot()
		require.False(t, snap.Synced, "synced before the pods were read")
		require.Empty(t, policyRefs(snap, "demo/web"))
		require.False(t, r.exp.Ready(), "the catalog waits for the pods")

		pe.restoreRBAC(t, "", "pods")
		require.Equal(t, []string{"demo/allow-web"}, policyRefs(r.synced(t), "demo/web"))
	})
}

// A cluster without Istio's AuthorizationPolicy CRD has no policy: the
// store is synced with none (sidecars are not held back forever), the
// log says so, and a CRD installed later is found by the next look,
// without a restart.
func TestPoliciesWithoutTheCRD(t *testing.T) {
	pe := startPolicyEnv(t)
	pe.createPods(t, labelledPod("demo", "web", "app", "web"))
	r := pe.startExporter(t, 200*time.Millisecond)

	snap := r.synced(t)
	for ref := range snap.Pods() {
		t.Errorf("%s is selected, and there is no policy", ref)
	}
	require.True(t, r.logs.logged("no AuthorizationPolicy in this cluster"), "the log says why no policy is enforced")

	require.NoError(t, install.Apply(t.Context(), pe.adminCfg, install.IstioAuthorizationPolicyCRD))
	pe.createPolicies(t, authorizationPolicy("demo", "allow-web", allowFrom(selectorOf("app", "web"), "cluster.local/ns/demo/sa/client")))
	r.eventually(t, "a policy created after the CRD is read", func(s *authz.Snapshot) bool {
		return s.Synced && slices.Equal(policyRefs(s, "demo/web"), []string{"demo/allow-web"})
	})
	require.True(t, r.logs.logged("AuthorizationPolicy now served"))
}

func TestPoliciesNeedATrustDomainAndAnIstioClient(t *testing.T) {
	_, err := NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(),
		Options{ClusterName: "a", Policies: authz.NewStore(""), Istio: istiofake.NewSimpleClientset()})
	require.ErrorContains(t, err, "authorization policies need a trust domain")
	_, err = NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(),
		Options{ClusterName: "a", TrustDomain: "a.mesh", Policies: authz.NewStore("")})
	require.ErrorContains(t, err, "authorization policies need an Istio client")
}

// Deletions the informer missed arrive as tombstones, for pods and
// policies alike; the store forgets them all the same.
func TestPolicyAndPodTombstones(t *testing.T) {
	store := authz.NewStore("")
	e, err := NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(),
		Options{ClusterName: "a", TrustDomain: "a.mesh", Policies: store, Istio: istiofake.NewSimpleClientset()})
	require.NoError(t, err)
	web := labelledPod("demo", "web", "app", "web")
	e.podSet(web)
	e.podSet(labelledPod("demo", "db", "app", "db"))
	e.policySet(authorizationPolicy("demo", "deny-all", denyPort(nil, "22")))
	require.Equal(t, []string{"demo/deny-all"}, policyRefs(store.Snapshot(), "demo/web"))

	e.podDeleted(cache.DeletedFinalStateUnknown{Key: "demo/web", Obj: web})
	_, ok := store.Snapshot().Pod("demo/web")
	require.False(t, ok, "a pod's tombstone")
	require.Equal(t, []string{"demo/deny-all"}, policyRefs(store.Snapshot(), "demo/db"))
	e.policyDeleted(cache.DeletedFinalStateUnknown{Key: "demo/deny-all", Obj: authorizationPolicy("demo", "deny-all", denyPort(nil, "22"))})
	require.Nil(t, policyRefs(store.Snapshot(), "demo/db"), "a policy's tombstone")
}

func TestStripLegacyPolicy(t *testing.T) {
	ap := &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "p", UID: "u", ResourceVersion: "7",
		Annotations: map[string]string{"a": "b"}, ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}}}
	ap.Spec.Action = 1
	stripped, err := stripPolicy(ap)
	require.NoError(t, err)
	got := stripped.(*securityv1beta1.AuthorizationPolicy)
	require.Equal(t, metav1.ObjectMeta{Namespace: "demo", Name: "p", UID: "u", ResourceVersion: "7"}, got.ObjectMeta)
	require.EqualValues(t, 1, got.Spec.Action, "spec kept")
}

func TestStripPolicy(t *testing.T) {
	spec := denyPort(selectorOf("app", "db"), "5432")
	ap := authorizationPolicy("demo", "deny-db", spec)
	ap.TypeMeta = metav1.TypeMeta{APIVersion: "security.istio.io/v1", Kind: "AuthorizationPolicy"}
	ap.UID, ap.ResourceVersion, ap.Generation = "uid-1", "42", 3
	ap.CreationTimestamp = metav1.NewTime(time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC))
	ap.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{}"}
	ap.Labels = map[string]string{"team": "db"}
	ap.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
	(&metaapi.IstioStatus{ObservedGeneration: 3}).DeepCopyInto(&ap.Status)

	check := func(obj any) {
		t.Helper()
		got := obj.(*securityv1.AuthorizationPolicy)
		require.Equal(t, metav1.TypeMeta{}, got.TypeMeta)
		require.Equal(t, metav1.ObjectMeta{Namespace: "demo", Name: "deny-db", UID: "uid-1", ResourceVersion: "42", CreationTimestamp: ap.CreationTimestamp}, got.ObjectMeta)
		require.True(t, proto.Equal(&metaapi.IstioStatus{}, &got.Status), "status dropped: %v", &got.Status)
		require.True(t, proto.Equal(spec, &got.Spec), "spec kept: %v", &got.Spec)
	}
	stripped, err := stripPolicy(ap)
	require.NoError(t, err)
	check(stripped)
	again, err := stripPolicy(stripped)
	require.NoError(t, err)
	check(again)
	tomb := cache.DeletedFinalStateUnknown{Key: "demo/deny-db", Obj: ap}
	same, err := stripPolicy(tomb)
	require.NoError(t, err)
	require.Equal(t, tomb, same, "anything but a policy passes through")
}

// With the policies, the pod cache keeps every label, and still nothing
// else.
func TestStripPodKeepLabels(t *testing.T) {
	p := meshedPod("demo", "p", "sa")
	p.Labels["version"] = "v2"
	p.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{}"}
	want := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "p", UID: "uid-p",
			Labels: map[string]string{"app": "echo", "version": "v2", TLSModeLabel: TLSModeIstio}},
		Spec: corev1.PodSpec{ServiceAccountName: "sa"},
	}
	stripped, err := stripPodKeepLabels(p)
	require.NoError(t, err)
	require.Equal(t, want, stripped)
	again, err := stripPodKeepLabels(stripped)
	require.NoError(t, err)
	require.Equal(t, want, again, "idempotent")
}

// A cluster whose Istio CRDs predate 1.22 serves AuthorizationPolicy as
// security.istio.io/v1beta1 only: its policies are read there (the same
// spec), not left unenforced.
func TestPoliciesFromALegacyCRD(t *testing.T) {
	pe := startPolicyEnv(t)
	crd := string(install.IstioAuthorizationPolicyCRD)
	// v1 neither served nor stored; v1beta1 both, as before Istio 1.22.
	crd = strings.Replace(crd, "    served: true\n    storage: true\n", "    served: false\n    storage: false\n", 1)
	crd = strings.Replace(crd, "    served: true\n    storage: false\n", "    served: true\n    storage: true\n", 1)
	require.NoError(t, install.Apply(t.Context(), pe.adminCfg, []byte(crd)))
	pe.createPods(t, labelledPod("demo", "web", "app", "web"))
	legacy := &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "allow-web"}}
	proto.Merge(&legacy.Spec, allowFrom(selectorOf("app", "web"), "cluster.local/ns/demo/sa/client"))
	require.Eventually(t, func() bool {
		_, err := pe.istio.SecurityV1beta1().AuthorizationPolicies("demo").Create(t.Context(), legacy, metav1.CreateOptions{})
		return err == nil
	}, 30*time.Second, 100*time.Millisecond, "the v1beta1 CRD serves")

	r := pe.startExporter(t, time.Minute)
	snap := r.synced(t)
	require.Equal(t, []string{"demo/allow-web"}, policyRefs(snap, "demo/web"))
	require.True(t, r.logs.logged("served only as security.istio.io/v1beta1"), "the log says where the policies are read")
}

// TestPeerAuthenticationsSetPodsMTLS runs the exporter as the
// federator's user against a real kube-apiserver with both of Istio's
// CRDs and follows each pod's mutual TLS through PeerAuthentications
// created, updated and deleted: the namespace-wide policy that decides
// is the older one (so the creationTimestamp reached the store), a
// workload policy's portLevelMtls applies to its pods' ports, and a pod
// whose policies are all gone has no set again.
func TestPeerAuthenticationsSetPodsMTLS(t *testing.T) {
	pe := startPolicyEnv(t, istioCRDs...)
	pe.createPods(t,
		labelledPod("demo", "web", "app", "web"),
		labelledPod("demo", "db", "app", "db"),
		labelledPod("other", "web", "app", "web"))
	// The older of two namespace-wide policies decides. Its name sorts
	// last, so only its creationTimestamp (whole seconds) makes it win.
	older := peerAuthentication("demo", "z-older", namespaceMTLS(securityapi.PeerAuthentication_MutualTLS_STRICT))
	older.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": strings.Repeat("x", 1024)}
	older.Labels = map[string]string{"team": "web"}
	pe.createPeerAuthentications(t, older)
	time.Sleep(1100 * time.Millisecond)
	pe.createPeerAuthentications(t,
		peerAuthentication("demo", "a-newer", namespaceMTLS(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)),
		peerAuthentication("demo", "db-port", &securityapi.PeerAuthentication{
			Selector:      selectorOf("app", "db"),
			PortLevelMtls: map[uint32]*securityapi.PeerAuthentication_MutualTLS{8080: peerMode(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)},
		}))
	r := pe.startExporter(t, 0)

	snap := r.synced(t)
	require.Equal(t, "none", podMTLS(snap, "demo/web"), "the older, STRICT, decides: Strict everywhere is no set")
	require.Equal(t, "STRICT,8080=PERMISSIVE", podMTLS(snap, "demo/db"))
	require.Equal(t, "none", podMTLS(snap, "other/web"))
	require.Contains(t, snap.PeerNotes(), authz.Note{Policy: "demo/a-newer",
		Reason: "demo/z-older, older, is the namespace-wide policy of demo (as in Istio, the oldest decides): ignored"})
	// The informer's cache keeps the spec, the names and the
	// creationTimestamp, nothing else.
	obj, ok, err := r.exp.istioInformers.Security().V1().PeerAuthentications().Informer().GetStore().GetByKey("demo/z-older")
	require.NoError(t, err)
	require.True(t, ok)
	cached := obj.(*securityv1.PeerAuthentication)
	require.Empty(t, cached.Annotations)
	require.Empty(t, cached.Labels)
	require.Empty(t, cached.ManagedFields)
	require.NotEmpty(t, cached.ResourceVersion)
	require.False(t, cached.CreationTimestamp.IsZero())

	// The older one deleted, the newer decides.
	require.NoError(t, pe.istio.SecurityV1().PeerAuthentications("demo").Delete(t.Context(), "z-older", metav1.DeleteOptions{}))
	r.eventually(t, "the remaining namespace-wide policy decides", func(s *authz.Snapshot) bool {
		// db's port 8080 is PERMISSIVE like the rest: no port differs.
		return podMTLS(s, "demo/web") == "PERMISSIVE" && podMTLS(s, "demo/db") == "PERMISSIVE" && len(s.PeerNotes()) == 0
	})

	// Updated to STRICT, it returns web to no set and leaves db's port.
	newer, err := pe.istio.SecurityV1().PeerAuthentications("demo").Get(t.Context(), "a-newer", metav1.GetOptions{})
	require.NoError(t, err)
	newer.Spec.Mtls = peerMode(securityapi.PeerAuthentication_MutualTLS_STRICT)
	_, err = pe.istio.SecurityV1().PeerAuthentications("demo").Update(t.Context(), newer, metav1.UpdateOptions{})
	require.NoError(t, err)
	r.eventually(t, "an updated policy", func(s *authz.Snapshot) bool {
		return podMTLS(s, "demo/web") == "none" && podMTLS(s, "demo/db") == "STRICT,8080=PERMISSIVE"
	})

	// Created later, in another namespace.
	pe.createPeerAuthentications(t, peerAuthentication("other", "permissive", namespaceMTLS(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)))
	r.eventually(t, "a new policy applies", func(s *authz.Snapshot) bool { return podMTLS(s, "other/web") == "PERMISSIVE" })

	// Every policy deleted: no pod has a set.
	for _, ref := range []string{"demo/a-newer", "demo/db-port", "other/permissive"} {
		ns, name, _ := strings.Cut(ref, "/")
		require.NoError(t, pe.istio.SecurityV1().PeerAuthentications(ns).Delete(t.Context(), name, metav1.DeleteOptions{}))
	}
	r.eventually(t, "no policy, no set", func(s *authz.Snapshot) bool {
		for range s.Pods() {
			return false
		}
		return true
	})
	require.True(t, r.store.Snapshot().Synced)
}

// A cluster with Istio's AuthorizationPolicy CRD and not the
// PeerAuthentication one: the store syncs with the policies, the log
// says no PeerAuthentication is read, and a PeerAuthentication CRD
// installed later is found by the next look, without a restart.
func TestPeerAuthenticationsWithoutTheirCRD(t *testing.T) {
	pe := startPolicyEnv(t, install.IstioAuthorizationPolicyCRD)
	pe.createPods(t, labelledPod("demo", "web", "app", "web"))
	pe.createPolicies(t, authorizationPolicy("demo", "allow-web", allowFrom(selectorOf("app", "web"), "cluster.local/ns/demo/sa/client")))
	r := pe.startExporter(t, 200*time.Millisecond)

	snap := r.synced(t)
	require.Equal(t, []string{"demo/allow-web"}, policyRefs(snap, "demo/web"))
	require.Equal(t, "STRICT", podMTLS(snap, "demo/web"))
	require.True(t, r.logs.logged("no PeerAuthentication in this cluster"), "the log says why no PeerAuthentication is read")
	require.False(t, r.logs.logged("no AuthorizationPolicy in this cluster"))

	require.NoError(t, install.Apply(t.Context(), pe.adminCfg, install.IstioPeerAuthenticationCRD))
	pe.createPeerAuthentications(t, peerAuthentication("demo", "permissive", namespaceMTLS(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)))
	r.eventually(t, "a PeerAuthentication created after the CRD is read", func(s *authz.Snapshot) bool {
		return s.Synced && podMTLS(s, "demo/web") == "PERMISSIVE" && slices.Equal(policyRefs(s, "demo/web"), []string{"demo/allow-web"})
	})
	require.True(t, r.logs.logged("PeerAuthentication now served"))
}

// A cluster whose PeerAuthentication CRD serves only v1beta1 (Istio's
// before 1.22), beside a current AuthorizationPolicy one: the
// PeerAuthentications are read there, with their creationTimestamp.
func TestPeerAuthenticationsFromALegacyCRD(t *testing.T) {
	pe := startPolicyEnv(t, install.IstioAuthorizationPolicyCRD)
	crd := string(install.IstioPeerAuthenticationCRD)
	// v1 neither served nor stored; v1beta1 both, as before Istio 1.22.
	crd = strings.Replace(crd, "    served: true\n    storage: true\n", "    served: false\n    storage: false\n", 1)
	crd = strings.Replace(crd, "    served: true\n    storage: false\n", "    served: true\n    storage: true\n", 1)
	require.NoError(t, install.Apply(t.Context(), pe.adminCfg, []byte(crd)))
	pe.createPods(t, labelledPod("demo", "web", "app", "web"))
	create := func(name string, mode securityapi.PeerAuthentication_MutualTLS_Mode) {
		t.Helper()
		legacy := &securityv1beta1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name}}
		namespaceMTLS(mode).DeepCopyInto(&legacy.Spec)
		require.Eventually(t, func() bool {
			_, err := pe.istio.SecurityV1beta1().PeerAuthentications("demo").Create(t.Context(), legacy, metav1.CreateOptions{})
			return err == nil
		}, 30*time.Second, 100*time.Millisecond, "the v1beta1 CRD serves")
	}
	// The older decides, though its name sorts last.
	create("z-older", securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)
	time.Sleep(1100 * time.Millisecond)
	create("a-newer", securityapi.PeerAuthentication_MutualTLS_STRICT)

	r := pe.startExporter(t, time.Minute)
	snap := r.synced(t)
	require.Equal(t, "PERMISSIVE", podMTLS(snap, "demo/web"))
	require.True(t, r.logs.logged("PeerAuthentications are served only as security.istio.io/v1beta1"), "the log says where they are read")
	require.False(t, r.logs.logged("AuthorizationPolicies are served only as"), "the AuthorizationPolicies are read in v1")
}

// Deletions the informer missed arrive as tombstones for
// PeerAuthentications too; the store forgets them all the same.
func TestPeerAuthenticationTombstone(t *testing.T) {
	store := authz.NewStore("")
	e, err := NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(),
		Options{ClusterName: "a", TrustDomain: "a.mesh", Policies: store, Istio: istiofake.NewSimpleClientset()})
	require.NoError(t, err)
	e.podSet(labelledPod("demo", "web", "app", "web"))
	pa := peerAuthentication("demo", "permissive", namespaceMTLS(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE))
	e.peerAuthenticationSet(pa)
	require.Equal(t, "PERMISSIVE", podMTLS(store.Snapshot(), "demo/web"))
	e.peerAuthenticationDeleted(cache.DeletedFinalStateUnknown{Key: "demo/permissive", Obj: pa})
	require.Equal(t, "none", podMTLS(store.Snapshot(), "demo/web"), "a PeerAuthentication's tombstone")
}

func TestStripPeerAuthentication(t *testing.T) {
	created := metav1.NewTime(time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC))
	noisy := metav1.ObjectMeta{Namespace: "demo", Name: "p", UID: "u", ResourceVersion: "7", Generation: 2, CreationTimestamp: created,
		Annotations: map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{}"}, Labels: map[string]string{"team": "web"},
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}}
	want := metav1.ObjectMeta{Namespace: "demo", Name: "p", UID: "u", ResourceVersion: "7", CreationTimestamp: created}
	spec := &securityapi.PeerAuthentication{
		Selector:      selectorOf("app", "db"),
		Mtls:          peerMode(securityapi.PeerAuthentication_MutualTLS_STRICT),
		PortLevelMtls: map[uint32]*securityapi.PeerAuthentication_MutualTLS{8080: peerMode(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)},
	}

	t.Run("v1", func(t *testing.T) {
		pa := &securityv1.PeerAuthentication{TypeMeta: metav1.TypeMeta{APIVersion: "security.istio.io/v1", Kind: "PeerAuthentication"}, ObjectMeta: *noisy.DeepCopy()}
		spec.DeepCopyInto(&pa.Spec)
		(&metaapi.IstioStatus{ObservedGeneration: 2}).DeepCopyInto(&pa.Status)
		for range 2 { // idempotent
			stripped, err := stripPolicy(pa)
			require.NoError(t, err)
			got := stripped.(*securityv1.PeerAuthentication)
			require.Equal(t, metav1.TypeMeta{}, got.TypeMeta)
			require.Equal(t, want, got.ObjectMeta)
			require.True(t, proto.Equal(&metaapi.IstioStatus{}, &got.Status), "status dropped: %v", &got.Status)
			require.True(t, proto.Equal(spec, &got.Spec), "spec kept: %v", &got.Spec)
			pa = got
		}
	})
	t.Run("v1beta1", func(t *testing.T) {
		pa := &securityv1beta1.PeerAuthentication{TypeMeta: metav1.TypeMeta{APIVersion: "security.istio.io/v1beta1", Kind: "PeerAuthentication"}, ObjectMeta: *noisy.DeepCopy()}
		spec.DeepCopyInto(&pa.Spec)
		(&metaapi.IstioStatus{ObservedGeneration: 2}).DeepCopyInto(&pa.Status)
		stripped, err := stripPolicy(pa)
		require.NoError(t, err)
		got := stripped.(*securityv1beta1.PeerAuthentication)
		require.Equal(t, metav1.TypeMeta{}, got.TypeMeta)
		require.Equal(t, want, got.ObjectMeta)
		require.True(t, proto.Equal(&metaapi.IstioStatus{}, &got.Status), "status dropped: %v", &got.Status)
		require.True(t, proto.Equal(spec, &got.Spec), "spec kept: %v", &got.Spec)
	})
}
