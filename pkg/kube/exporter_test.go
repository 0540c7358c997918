package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"
	mcsv1alpha1client "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/typed/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

func node(name, region, zone string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
		LabelRegion: region, LabelZone: zone,
	}}}
}

func service(ns, name string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: corev1.ServiceSpec{Ports: ports}}
}

func export(ns, name string) *mcsv1alpha1.ServiceExport {
	return &mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
}

// pod is a Pod with a ServiceAccount; the endpoints of slice point at
// "pod-<ip>".
func pod(ns, name, serviceAccount string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + name), Labels: map[string]string{"app": "echo"}},
		Spec: corev1.PodSpec{
			ServiceAccountName: serviceAccount,
			Containers:         []corev1.Container{{Name: "app", Image: "echo:1", Args: []string{"--port", "8080"}}},
		},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.1"},
	}
}

func spiffeIDs(ns string, serviceAccounts ...string) []string {
	out := make([]string, len(serviceAccounts))
	for i, sa := range serviceAccounts {
		out[i] = "spiffe://a.mesh/ns/" + ns + "/sa/" + sa
	}
	return out
}

type ep struct {
	ip, node string
	ready    *bool
}

func slice(ns, svc, name string, af discoveryv1.AddressType, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: af,
		// The endpoints' port for the service port named http.
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080))}},
	}
	for _, e := range eps {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{e.ip},
			NodeName:   ptr.To(e.node),
			Conditions: discoveryv1.EndpointConditions{Ready: e.ready},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: "pod-" + e.ip},
		})
	}
	return s
}

type fixture struct {
	kube  *kubefake.Clientset
	mcs   *mcsfake.Clientset
	store *catalog.Store
	exp   *Exporter
}

// start runs an Exporter for cluster "a" in trust domain "a.mesh".
func start(t *testing.T, kubeObjs []runtime.Object, mcsObjs []runtime.Object) *fixture {
	t.Helper()
	return startWith(t, Options{TrustDomain: "a.mesh"}, kubeObjs, mcsObjs)
}

func startWith(t *testing.T, opts Options, kubeObjs []runtime.Object, mcsObjs []runtime.Object) *fixture {
	t.Helper()
	return startWrapped(t, opts, kubeObjs, mcsObjs, nil)
}

// startWrapped is startWith with the exporter's MCS client wrapped by
// wrap (when not nil); the fixture's own client is the fake itself.
func startWrapped(t *testing.T, opts Options, kubeObjs []runtime.Object, mcsObjs []runtime.Object, wrap func(mcsclient.Interface) mcsclient.Interface) *fixture {
	t.Helper()
	opts.ClusterName = "a"
	opts.FlushDelay = time.Millisecond
	f := &fixture{
		kube:  kubefake.NewClientset(kubeObjs...),
		mcs:   watchFromList(mcsfake.NewSimpleClientset(mcsObjs...)),
		store: catalog.NewStore(),
	}
	var mcs mcsclient.Interface = f.mcs
	if wrap != nil {
		mcs = wrap(f.mcs)
	}
	var err error
	f.exp, err = NewExporter(f.kube, mcs, f.store, opts)
	require.NoError(t, err)
	runUntilCleanup(t, "exporter", f.exp.Run)
	require.Eventually(t, f.exp.Ready, 10*time.Second, 5*time.Millisecond)
	return f
}

func (f *fixture) service(t *testing.T, key catalog.ServiceKey) (*catalog.Service, bool) {
	t.Helper()
	return f.store.Get(catalog.LocalSource).Get(key)
}

func (f *fixture) eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, 10*time.Second, 5*time.Millisecond, what)
}

func (f *fixture) condition(t *testing.T, ns, name string, typ mcsv1alpha1.ServiceExportConditionType) *metav1.Condition {
	t.Helper()
	se, err := f.mcs.MulticlusterV1alpha1().ServiceExports(ns).Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	return meta.FindStatusCondition(se.Status.Conditions, string(typ))
}

var echoKey = catalog.ServiceKey{Namespace: "demo", Name: "echo"}

func TestExportedServiceEntersCatalog(t *testing.T) {
	f := start(t,
		[]runtime.Object{
			node("n1", "r1", "z1"), node("n2", "r1", "z2"),
			service("demo", "echo",
				corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, AppProtocol: ptr.To("http")},
				corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}),
			service("demo", "private", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}),
			slice("demo", "echo", "echo-v4", discoveryv1.AddressTypeIPv4,
				ep{"10.0.0.1", "n1", nil}, ep{"10.0.0.2", "n1", ptr.To(true)}, ep{"10.0.0.3", "n2", ptr.To(false)}),
			// The same pod again in an IPv6 slice counts once.
			slice("demo", "echo", "echo-v6", discoveryv1.AddressTypeIPv6, ep{"10.0.0.1", "n1", nil}),
			slice("demo", "private", "private-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.9", "n1", nil}),
			// Two ServiceAccounts behind echo, one only on a not-ready
			// pod, which still counts; a pod naming none runs as
			// "default". The private service's account is never seen.
			pod("demo", "pod-10.0.0.1", "echo"), pod("demo", "pod-10.0.0.2", ""), pod("demo", "pod-10.0.0.3", "canary"),
			pod("demo", "pod-10.0.0.9", "private"),
		},
		[]runtime.Object{export("demo", "echo")})

	got, ok := f.service(t, echoKey)
	require.True(t, ok, "exported service is in the catalog once ready")
	require.Equal(t, "a", got.Cluster)
	require.Equal(t, []catalog.Port{
		{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP},
		{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, AppProtocol: "http", TargetPort: 8080},
	}, got.Ports)
	require.Equal(t, []catalog.LocalityEndpoints{
		{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 2,
			Addresses: []catalog.Address{{IP: "10.0.0.1", Ready: true}, {IP: "10.0.0.2", Ready: true}}},
		{Locality: catalog.Locality{Region: "r1", Zone: "z2"}, NotReady: 1,
			Addresses: []catalog.Address{{IP: "10.0.0.3"}}},
	}, got.Endpoints)
	require.Equal(t, spiffeIDs("demo", "canary", "default", "echo"), got.Identities)

	_, ok = f.service(t, catalog.ServiceKey{Namespace: "demo", Name: "private"})
	require.False(t, ok, "a service without ServiceExport never enters the catalog")

	f.eventually(t, "Valid=True", func() bool {
		c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Status == metav1.ConditionTrue
	})
}

func TestReadinessAndUnexport(t *testing.T) {
	f := start(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}),
			slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", ptr.To(true)}),
		},
		[]runtime.Object{export("demo", "echo")})
	ctx := t.Context()

	s := slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", ptr.To(false)}, ep{"10.0.0.2", "n1", ptr.To(true)}, ep{"10.0.0.3", "n1", ptr.To(true)})
	_, err := f.kube.DiscoveryV1().EndpointSlices("demo").Update(ctx, s, metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "counts follow readiness", func() bool {
		got, ok := f.service(t, echoKey)
		return ok && len(got.Endpoints) == 1 && got.Endpoints[0].Ready == 2 && got.Endpoints[0].NotReady == 1
	})

	// A node moving zones moves its endpoints.
	_, err = f.kube.CoreV1().Nodes().Update(ctx, node("n1", "r2", "z9"), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "locality follows node labels", func() bool {
		got, ok := f.service(t, echoKey)
		return ok && got.Endpoints[0].Locality == catalog.Locality{Region: "r2", Zone: "z9"}
	})

	require.NoError(t, f.mcs.MulticlusterV1alpha1().ServiceExports("demo").Delete(ctx, "echo", metav1.DeleteOptions{}))
	f.eventually(t, "unexported service leaves the catalog", func() bool {
		_, ok := f.service(t, echoKey)
		return !ok
	})
}

func TestExportWithoutServiceIsInvalid(t *testing.T) {
	f := start(t, nil, []runtime.Object{export("demo", "echo"), export("demo", "ext")})
	ctx := t.Context()

	f.eventually(t, "Valid=False NoService", func() bool {
		c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == string(mcsv1alpha1.ServiceExportReasonNoService)
	})
	c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
	require.Contains(t, c.Message, "demo/echo not found")
	_, ok := f.service(t, echoKey)
	require.False(t, ok)

	// An ExternalName service cannot be exported.
	ext := service("demo", "ext")
	ext.Spec.Type = corev1.ServiceTypeExternalName
	ext.Spec.ExternalName = "example.invalid"
	_, err := f.kube.CoreV1().Services("demo").Create(ctx, ext, metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "Valid=False InvalidServiceType", func() bool {
		c := f.condition(t, "demo", "ext", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Reason == string(mcsv1alpha1.ServiceExportReasonInvalidServiceType)
	})

	// A headless Service with no ports is named as invalid.
	_, err = f.kube.CoreV1().Services("demo").Create(ctx, service("demo", "echo"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "Valid=False InvalidService", func() bool {
		c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Reason == string(ReasonInvalidService)
	})
	require.Contains(t, f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid).Message, "no ports")

	// Once the Service is right, the export becomes valid.
	_, err = f.kube.CoreV1().Services("demo").Update(ctx, service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "export valid once the Service exists", func() bool {
		c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
		_, ok := f.service(t, echoKey)
		return ok && c != nil && c.Status == metav1.ConditionTrue
	})
	ready := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionReady)
	require.NotNil(t, ready)
	require.Equal(t, metav1.ConditionTrue, ready.Status)
}

// heldStatus is an MCS client whose ServiceExport status writes wait
// until release is closed, as they do behind a slow API server or a
// client-side rate limit; everything else goes straight through.
type heldStatus struct {
	mcsclient.Interface
	release <-chan struct{}
	waiting *atomic.Int32
}

func (h heldStatus) MulticlusterV1alpha1() mcsv1alpha1client.MulticlusterV1alpha1Interface {
	return heldStatusV1{h.Interface.MulticlusterV1alpha1(), h}
}

type heldStatusV1 struct {
	mcsv1alpha1client.MulticlusterV1alpha1Interface
	h heldStatus
}

func (v heldStatusV1) ServiceExports(ns string) mcsv1alpha1client.ServiceExportInterface {
	return heldStatusExports{v.MulticlusterV1alpha1Interface.ServiceExports(ns), v.h}
}

type heldStatusExports struct {
	mcsv1alpha1client.ServiceExportInterface
	h heldStatus
}

func (e heldStatusExports) UpdateStatus(ctx context.Context, se *mcsv1alpha1.ServiceExport, opts metav1.UpdateOptions) (*mcsv1alpha1.ServiceExport, error) {
	e.h.waiting.Add(1)
	defer e.h.waiting.Add(-1)
	select {
	case <-e.h.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return e.ServiceExportInterface.UpdateStatus(ctx, se, opts)
}

// Status writes held up by the API server never hold up the catalog: with
// every status write waiting, a burst of exports still enters the
// catalog, and the statuses are written once the API server answers.
func TestStatusWritesDoNotHoldUpTheCatalog(t *testing.T) {
	const n = 5
	kubeObjs := []runtime.Object{node("n1", "r1", "z1")}
	for i := range n {
		kubeObjs = append(kubeObjs, service("demo", fmt.Sprintf("svc-%d", i), corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}))
	}
	release := make(chan struct{})
	var waiting atomic.Int32
	f := startWrapped(t, Options{Workers: 1}, kubeObjs, nil, func(c mcsclient.Interface) mcsclient.Interface {
		return heldStatus{Interface: c, release: release, waiting: &waiting}
	})
	for i := range n {
		_, err := f.mcs.MulticlusterV1alpha1().ServiceExports("demo").Create(t.Context(), export("demo", fmt.Sprintf("svc-%d", i)), metav1.CreateOptions{})
		require.NoError(t, err)
	}

	f.eventually(t, "every export in the catalog while status writes wait", func() bool {
		return f.store.Get(catalog.LocalSource).Len() == n
	})
	require.Positive(t, waiting.Load(), "a status write is waiting")
	for i := range n {
		require.Nil(t, f.condition(t, "demo", fmt.Sprintf("svc-%d", i), mcsv1alpha1.ServiceExportConditionReady), "no status written yet")
	}

	close(release)
	f.eventually(t, "every status written once the API server answers", func() bool {
		for i := range n {
			c := f.condition(t, "demo", fmt.Sprintf("svc-%d", i), mcsv1alpha1.ServiceExportConditionReady)
			if c == nil || c.Status != metav1.ConditionTrue {
				return false
			}
		}
		return true
	})
}

// A status write that keeps failing (here the API server refusing it,
// as without RBAC for serviceexports/status) is logged at Warn once,
// not only at Debug: the export has no conditions, and the operator
// needs to see why.
func TestStatusWritesThatKeepFailingAreLogged(t *testing.T) {
	var logs warnings
	kubeObjs := []runtime.Object{node("n1", "r1", "z1"), service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP})}
	f := startWrapped(t, Options{Workers: 1, Logger: slog.New(&logs)}, kubeObjs, nil, func(c mcsclient.Interface) mcsclient.Interface {
		return refusedStatus{c}
	})
	_, err := f.mcs.MulticlusterV1alpha1().ServiceExports("demo").Create(t.Context(), export("demo", "echo"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "the failing status write logged at Warn", func() bool { return logs.count("status write failed, retrying") == 1 })
}

// refusedStatus refuses every ServiceExport status write.
type refusedStatus struct{ mcsclient.Interface }

func (r refusedStatus) MulticlusterV1alpha1() mcsv1alpha1client.MulticlusterV1alpha1Interface {
	return refusedStatusV1{r.Interface.MulticlusterV1alpha1()}
}

type refusedStatusV1 struct {
	mcsv1alpha1client.MulticlusterV1alpha1Interface
}

func (v refusedStatusV1) ServiceExports(ns string) mcsv1alpha1client.ServiceExportInterface {
	return refusedStatusExports{v.MulticlusterV1alpha1Interface.ServiceExports(ns)}
}

type refusedStatusExports struct {
	mcsv1alpha1client.ServiceExportInterface
}

func (refusedStatusExports) UpdateStatus(context.Context, *mcsv1alpha1.ServiceExport, metav1.UpdateOptions) (*mcsv1alpha1.ServiceExport, error) {
	return nil, apierrors.NewForbidden(schema.GroupResource{Group: "multicluster.x-k8s.io", Resource: "serviceexports/status"}, "echo", errors.New("RBAC"))
}

// warnings is a slog handler that keeps the messages logged at Warn.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, r.Message)
	return nil
}
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnings) WithGroup(string) slog.Handler      { return w }

func (w *warnings) count(msg string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, m := range w.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

func TestPeersAnnotationNarrowsExport(t *testing.T) {
	se := export("demo", "echo")
	se.Annotations = map[string]string{AnnotationPeers: " c, b ,,"}
	f := start(t,
		[]runtime.Object{service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP})},
		[]runtime.Object{se})
	got, ok := f.service(t, echoKey)
	require.True(t, ok)
	require.Equal(t, []string{"b", "c"}, got.Peers)
	require.False(t, got.ExportedTo("d"))
}

func TestParsePeers(t *testing.T) {
	for _, tc := range []struct {
		name, value string
		want        []string
		bad         []string // quoted in the error, when there is one
	}{
		{name: "one", value: "west", want: []string{"west"}},
		{name: "trimmed and sorted", value: " west , north", want: []string{"north", "west"}},
		{name: "empty items ignored", value: "west,,north,", want: []string{"north", "west"}},
		{name: "the same name twice counts once", value: "west,west , west", want: []string{"west"}},
		{name: "blank", value: " ", want: nil},
		{name: "only commas", value: " , ,", want: nil},
		{name: "digits and dashes", value: "1a,eu-west-1", want: []string{"1a", "eu-west-1"}},
		{name: "a name differing only by case is not folded", value: "west, West,nrth", bad: []string{`"West" (names are lowercase: "west")`}},
		{name: "every bad item", value: "we st,a_b,-x,x.y,west", bad: []string{`"-x"`, `"a_b"`, `"we st"`, `"x.y"`}},
		{name: "too long", value: strings.Repeat("a", 64), bad: []string{`"` + strings.Repeat("a", 64) + `"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePeers(tc.value)
			if tc.bad == nil {
				require.NoError(t, err)
				require.Equal(t, tc.want, got)
				return
			}
			require.Error(t, err)
			require.Nil(t, got)
			require.Contains(t, err.Error(), AnnotationPeers+": not a peer cluster name: "+strings.Join(tc.bad, ", ")+" (")
		})
	}

	// A long list of bad items is summed up, not quoted whole.
	var many []string
	for i := range 15 {
		many = append(many, fmt.Sprintf("Peer%02d", i))
	}
	_, err := parsePeers(strings.Join(many, ","))
	require.ErrorContains(t, err, "and 5 more (")
}

// The peers annotation is checked: a list with an item that is not a peer
// name, or one that names no peer, exports the service to nobody and says
// so in the Valid condition; a list of peer names narrows the export and
// names the peers; no annotation exports to every peer.
func TestPeersAnnotationIsChecked(t *testing.T) {
	se := export("demo", "echo")
	se.Annotations = map[string]string{AnnotationPeers: "west, West,nrth"}
	f := start(t,
		[]runtime.Object{service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP})},
		[]runtime.Object{se})
	ctx := t.Context()
	annotate := func(v *string) {
		t.Helper()
		se, err := f.mcs.MulticlusterV1alpha1().ServiceExports("demo").Get(ctx, "echo", metav1.GetOptions{})
		require.NoError(t, err)
		if v == nil {
			delete(se.Annotations, AnnotationPeers)
		} else {
			se.Annotations = map[string]string{AnnotationPeers: *v}
		}
		_, err = f.mcs.MulticlusterV1alpha1().ServiceExports("demo").Update(ctx, se, metav1.UpdateOptions{})
		require.NoError(t, err)
	}
	valid := func(what string, status metav1.ConditionStatus, reason mcsv1alpha1.ServiceExportConditionReason, msg string) {
		t.Helper()
		f.eventually(t, what, func() bool {
			c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
			return c != nil && c.Status == status && c.Reason == string(reason) && strings.Contains(c.Message, msg)
		})
	}
	notExported := func() {
		t.Helper()
		// The catalog is published apart from the status write, so the
		// condition may come first.
		f.eventually(t, "exported to nobody: not in the catalog, so no peer and no gateway route has it", func() bool {
			_, ok := f.service(t, echoKey)
			return !ok
		})
		f.eventually(t, "Ready is False", func() bool {
			r := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionReady)
			return r != nil && r.Status == metav1.ConditionFalse
		})
	}

	valid("a name that is not a peer name", metav1.ConditionFalse, ReasonInvalidPeers,
		`not a peer cluster name: "West" (names are lowercase: "west")`)
	require.Contains(t, f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid).Message,
		"the service is exported to no peer until the annotation is fixed")
	notExported()

	annotate(new(" west, nrth,west"))
	valid("a list of peer names", metav1.ConditionTrue, mcsv1alpha1.ServiceExportReasonValid, "to peers nrth, west only")
	// The catalog is published apart from the status write.
	f.eventually(t, "exported to nrth and west only", func() bool {
		got, ok := f.service(t, echoKey)
		return ok && slices.Equal(got.Peers, []string{"nrth", "west"})
	})

	annotate(new(" "))
	valid("a blank list", metav1.ConditionFalse, ReasonNoPeers, "names no peer, so the service is exported to no peer")
	notExported()
	annotate(new(","))
	f.eventually(t, "only commas: still no peer", func() bool {
		c := f.condition(t, "demo", "echo", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Reason == string(ReasonNoPeers)
	})
	notExported()

	annotate(nil)
	valid("no annotation", metav1.ConditionTrue, mcsv1alpha1.ServiceExportReasonValid, "to every peer")
	f.eventually(t, "exported to every peer", func() bool {
		got, ok := f.service(t, echoKey)
		return ok && len(got.Peers) == 0 && got.ExportedTo("anyone")
	})
}

// Identities follow the pods behind the endpoints: a pod seen after the
// slice that points at it, a ServiceAccount that changes (a StatefulSet
// pod recreated under the same name), a pod that goes away.
func TestIdentitiesFollowPods(t *testing.T) {
	noRef := slice("demo", "echo", "echo-2", discoveryv1.AddressTypeIPv4, ep{"10.0.0.7", "n1", nil})
	noRef.Endpoints[0].TargetRef = nil
	f := start(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}),
			slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", ptr.To(true)}, ep{"10.0.0.2", "n1", ptr.To(true)}),
			// An endpoint that is not a pod counts but names no identity.
			noRef,
			pod("demo", "pod-10.0.0.1", "echo"),
			// The same pod name in another namespace is another pod.
			pod("other", "pod-10.0.0.2", "intruder"),
		},
		[]runtime.Object{export("demo", "echo")})
	ctx := t.Context()
	identities := func() []string {
		got, ok := f.service(t, echoKey)
		require.True(t, ok)
		return got.Identities
	}
	got, _ := f.service(t, echoKey)
	require.Equal(t, 3, got.ReadyEndpoints())
	require.Equal(t, spiffeIDs("demo", "echo"), identities(), "a pod not seen yet adds no identity")

	_, err := f.kube.CoreV1().Pods("demo").Create(ctx, pod("demo", "pod-10.0.0.2", "worker"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "a pod seen after its slice adds its identity", func() bool {
		return slices.Equal(identities(), spiffeIDs("demo", "echo", "worker"))
	})

	// A status change leaves identities alone.
	p := pod("demo", "pod-10.0.0.1", "echo")
	p.Status.Phase = corev1.PodFailed
	_, err = f.kube.CoreV1().Pods("demo").UpdateStatus(ctx, p, metav1.UpdateOptions{})
	require.NoError(t, err)

	// Pod specs are immutable, but a relist after the pod was recreated
	// under the same name shows up as an update.
	_, err = f.kube.CoreV1().Pods("demo").Update(ctx, pod("demo", "pod-10.0.0.1", "echo-v2"), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "a changed ServiceAccount replaces the identity", func() bool {
		return slices.Equal(identities(), spiffeIDs("demo", "echo-v2", "worker"))
	})

	require.NoError(t, f.kube.CoreV1().Pods("demo").Delete(ctx, "pod-10.0.0.2", metav1.DeleteOptions{}))
	f.eventually(t, "a deleted pod takes its identity away", func() bool {
		return slices.Equal(identities(), spiffeIDs("demo", "echo-v2"))
	})

	// The slice moving to new pods moves the identities with it.
	_, err = f.kube.CoreV1().Pods("demo").Create(ctx, pod("demo", "pod-10.0.0.3", "echo-v3"), metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = f.kube.DiscoveryV1().EndpointSlices("demo").Update(ctx,
		slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.3", "n1", ptr.To(false)}), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "identities follow the slice", func() bool {
		return slices.Equal(identities(), spiffeIDs("demo", "echo-v3"))
	})

	// The informer's cache holds pods stripped to what identities need.
	cached, err := f.exp.kubeInformers.Core().V1().Pods().Lister().Pods("demo").Get("pod-10.0.0.3")
	require.NoError(t, err)
	require.Equal(t, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "pod-10.0.0.3", UID: "uid-pod-10.0.0.3", ResourceVersion: cached.ResourceVersion},
		Spec:       corev1.PodSpec{ServiceAccountName: "echo-v3"},
	}, cached)
}

// Without a trust domain no identity is computed and pods are never
// listed or watched, so the federator needs no RBAC on pods.
func TestNoTrustDomainNoPods(t *testing.T) {
	f := startWith(t, Options{},
		[]runtime.Object{
			service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}),
			slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", nil}),
			pod("demo", "pod-10.0.0.1", "echo"),
		},
		[]runtime.Object{export("demo", "echo")})
	got, ok := f.service(t, echoKey)
	require.True(t, ok)
	require.Equal(t, 1, got.ReadyEndpoints())
	require.Nil(t, got.Identities)
	for _, a := range f.kube.Actions() {
		require.NotEqual(t, "pods", a.GetResource().Resource, "%s pods without a trust domain", a.GetVerb())
	}
}

func TestInvalidTrustDomain(t *testing.T) {
	_, err := NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(),
		Options{ClusterName: "a", TrustDomain: "spiffe://A.mesh"})
	require.ErrorContains(t, err, `trust domain "spiffe://A.mesh"`)
}

func TestStripPod(t *testing.T) {
	p := pod("demo", "p", "")
	p.ResourceVersion = "42"
	p.Annotations = map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{}"}
	p.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
	stripped, err := stripPod(p)
	require.NoError(t, err)
	want := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "p", UID: "uid-p", ResourceVersion: "42"}}
	require.Equal(t, want, stripped)
	again, err := stripPod(stripped)
	require.NoError(t, err)
	require.Equal(t, want, again, "idempotent")
	tomb := cache.DeletedFinalStateUnknown{Key: "demo/p", Obj: pod("demo", "p", "")}
	same, err := stripPod(tomb)
	require.NoError(t, err)
	require.Equal(t, tomb, same, "anything but a Pod passes through")
}
