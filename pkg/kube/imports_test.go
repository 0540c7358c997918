package kube

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/testlog"

	"github.com/stretchr/testify/require"
	networkingapi "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

func writerLogger(tb testing.TB) *slog.Logger { return testlog.New(tb) }

func namespace(name string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
}

// servedKinds makes fake discovery serve ServiceEntry, and ServiceImport
// when withImports.
func servedKinds(kc *kubefake.Clientset, withImports bool) {
	d := kc.Discovery().(*fakediscovery.FakeDiscovery)
	d.Resources = []*metav1.APIResourceList{{
		GroupVersion: networkingv1.SchemeGroupVersion.String(),
		APIResources: []metav1.APIResource{{Name: "serviceentries", Namespaced: true, Kind: "ServiceEntry"}},
	}}
	if withImports {
		d.Resources = append(d.Resources, &metav1.APIResourceList{
			GroupVersion: mcsv1alpha1.SchemeGroupVersion.String(),
			APIResources: []metav1.APIResource{{Name: "serviceimports", Namespaced: true, Kind: "ServiceImport"}},
		})
	}
}

type writerFixture struct {
	kube  *kubefake.Clientset
	istio *istiofake.Clientset
	mcs   *mcsfake.Clientset
	store *catalog.Store
	w     *ImportWriter
}

type writerSetup struct {
	namespaces   []string
	istioObjs    []runtime.Object
	noImportsCRD bool
	// synced becomes ImportOptions.Synced when set.
	synced func() bool
	// before runs on the fixture before the writer starts (reactors).
	before func(*writerFixture)
	// listTimeout becomes ImportOptions.ListTimeout when set.
	listTimeout time.Duration
	// progressEvery replaces the writer's progressEvery when set.
	progressEvery time.Duration
}

func startWriter(t *testing.T, s writerSetup) *writerFixture {
	t.Helper()
	var nsObjs []runtime.Object
	for _, n := range s.namespaces {
		nsObjs = append(nsObjs, namespace(n))
	}
	f := &writerFixture{
		kube:  kubefake.NewClientset(nsObjs...),
		istio: watchFromList(istiofake.NewSimpleClientset(s.istioObjs...)),
		mcs:   watchFromList(mcsfake.NewSimpleClientset()),
		store: catalog.NewStore(),
	}
	servedKinds(f.kube, !s.noImportsCRD)
	if s.before != nil {
		s.before(f)
	}
	var err error
	f.w, err = NewImportWriter(f.kube, f.istio, f.mcs, f.store, ImportOptions{
		ClusterName: "a", Logger: writerLogger(t), FlushInterval: 10 * time.Millisecond, QPS: 1000, Burst: 1000,
		Synced: s.synced, ListTimeout: s.listTimeout,
	})
	require.NoError(t, err)
	if s.progressEvery != 0 {
		f.w.progressEvery = s.progressEvery
	}
	runUntilCleanup(t, "import writer", f.w.Run)
	return f
}

func (f *writerFixture) set(t *testing.T, peer string, svcs ...catalog.Service) {
	t.Helper()
	f.store.Set(snapOf(t, peer, svcs...))
}

func (f *writerFixture) serviceEntry(t *testing.T, ns, name string) (*networkingv1.ServiceEntry, bool) {
	t.Helper()
	se, err := f.istio.NetworkingV1().ServiceEntries(ns).Get(t.Context(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false
	}
	require.NoError(t, err)
	return se, true
}

func (f *writerFixture) serviceImport(t *testing.T, ns, name string) (*mcsv1alpha1.ServiceImport, bool) {
	t.Helper()
	si, err := f.mcs.MulticlusterV1alpha1().ServiceImports(ns).Get(t.Context(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, false
	}
	require.NoError(t, err)
	return si, true
}

// eventuallySE waits until the ServiceEntry satisfies cond and returns it.
func (f *writerFixture) eventuallySE(t *testing.T, what string, cond func(se *networkingv1.ServiceEntry, ok bool) bool) *networkingv1.ServiceEntry {
	t.Helper()
	var last *networkingv1.ServiceEntry
	require.Eventually(t, func() bool {
		se, ok := f.serviceEntry(t, "demo", "echo.clusterset.local")
		last = se
		return cond(se, ok)
	}, 10*time.Second, 5*time.Millisecond, "%s; last seen: %v", what, last)
	return last
}

// writes returns the write actions (create, update, patch, delete) the
// writer sent to the istio and mcs fakes.
func (f *writerFixture) writes() []string {
	var out []string
	for _, a := range slices.Concat(f.istio.Actions(), f.mcs.Actions()) {
		switch a.GetVerb() {
		case "create", "update", "patch", "delete":
			out = append(out, a.GetVerb()+" "+a.GetResource().Resource+"/"+a.GetSubresource())
		}
	}
	return out
}

// waitSkipped waits for Updated until Skipped satisfies cond.
func (f *writerFixture) waitSkipped(t *testing.T, what string, cond func(map[string][]SkippedImport) bool) map[string][]SkippedImport {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		got := f.w.Skipped()
		if cond(got) {
			return got
		}
		select {
		case <-f.w.Updated():
		case <-deadline:
			t.Fatalf("%s; Skipped is %v", what, got)
		}
	}
}

type endpointView struct {
	address, network, locality, cluster string
	weight                              uint32
}

func endpointsOf(se *networkingv1.ServiceEntry) []endpointView {
	var out []endpointView
	for _, ep := range se.Spec.Endpoints {
		out = append(out, endpointView{ep.Address, ep.Network, ep.Locality, ep.Labels[LabelSourceCluster], ep.Weight})
	}
	return out
}

func TestImportWriterTwoPeers(t *testing.T) {
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "z1", "", 2, 0), loc("r1", "z2", "", 1, 1)))
	f.set(t, "c", importSvc("c", []string{"10.2.0.1:15443"}, loc("r2", "z1", "s1", 3, 0)))

	se := f.eventuallySE(t, "ServiceEntry with both peers", func(se *networkingv1.ServiceEntry, ok bool) bool {
		return ok && len(se.Spec.Endpoints) == 3
	})
	require.Equal(t, map[string]string{LabelManagedBy: ManagedByIsthmus, LabelServiceName: "echo"}, se.Labels)
	require.Equal(t, []string{"echo.demo.svc.clusterset.local"}, se.Spec.Hosts)
	require.Equal(t, networkingapi.ServiceEntry_MESH_INTERNAL, se.Spec.Location)
	require.Equal(t, networkingapi.ServiceEntry_STATIC, se.Spec.Resolution)
	require.Equal(t, []string{"spiffe://b.mesh/ns/demo/sa/echo", "spiffe://c.mesh/ns/demo/sa/echo"}, se.Spec.SubjectAltNames)
	require.Equal(t, []endpointView{
		{"10.1.0.1", "b", "r1/z1", "b", 2},
		{"10.1.0.1", "b", "r1/z2", "b", 1},
		{"10.2.0.1", "c", "r2/z1/s1", "c", 3},
	}, endpointsOf(se))
	for _, ep := range se.Spec.Endpoints {
		require.Equal(t, map[string]uint32{"http": 15443, "grpc-api": 15443}, ep.Ports)
		require.Equal(t, "echo", ep.Labels[LabelServiceName])
	}
	var ports []string
	for _, p := range se.Spec.Ports {
		ports = append(ports, p.Name+"/"+p.Protocol)
	}
	require.Equal(t, []string{"http/HTTP", "grpc-api/GRPC"}, ports)

	var si *mcsv1alpha1.ServiceImport
	require.Eventually(t, func() bool {
		var ok bool
		si, ok = f.serviceImport(t, "demo", "echo")
		return ok && len(si.Status.Clusters) == 2
	}, 10*time.Second, 5*time.Millisecond, "ServiceImport with both peers in its status")
	require.Equal(t, mcsv1alpha1.ClusterSetIP, si.Spec.Type)
	require.Equal(t, ManagedByIsthmus, si.Labels[LabelManagedBy])
	require.Equal(t, []mcsv1alpha1.ClusterStatus{{Cluster: "b"}, {Cluster: "c"}}, si.Status.Clusters)
	require.Len(t, si.Spec.Ports, 2)
	require.Equal(t, int32(80), si.Spec.Ports[0].Port)
	require.Equal(t, "http", *si.Spec.Ports[0].AppProtocol)
	require.Empty(t, f.w.Skipped())

	// Readiness changes move the weights; the drained locality goes.
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "z1", "", 5, 0), loc("r1", "z2", "", 0, 2)))
	se = f.eventuallySE(t, "weights follow readiness", func(se *networkingv1.ServiceEntry, ok bool) bool {
		return ok && len(se.Spec.Endpoints) == 2 && se.Spec.Endpoints[0].Weight == 5
	})
	require.Equal(t, []endpointView{
		{"10.1.0.1", "b", "r1/z1", "b", 5},
		{"10.2.0.1", "c", "r2/z1/s1", "c", 3},
	}, endpointsOf(se))

	// A gateway known by name makes the entry resolve by DNS.
	f.set(t, "c", importSvc("c", []string{"gw.c.example.net:443"}, loc("r2", "z1", "s1", 3, 0)))
	se = f.eventuallySE(t, "hostname gateway: DNS", func(se *networkingv1.ServiceEntry, ok bool) bool {
		return ok && se.Spec.Resolution == networkingapi.ServiceEntry_DNS
	})
	require.Equal(t, "gw.c.example.net", se.Spec.Endpoints[1].Address)
	require.Equal(t, uint32(443), se.Spec.Endpoints[1].Ports["http"])

	// A peer's source goes: its endpoints, SANs and status entry go.
	f.store.Delete("c")
	se = f.eventuallySE(t, "peer c gone", func(se *networkingv1.ServiceEntry, ok bool) bool {
		return ok && len(se.Spec.Endpoints) == 1
	})
	require.Equal(t, "b", se.Spec.Endpoints[0].Network)
	require.Equal(t, []string{"spiffe://b.mesh/ns/demo/sa/echo"}, se.Spec.SubjectAltNames)
	require.Eventually(t, func() bool {
		si, ok := f.serviceImport(t, "demo", "echo")
		return ok && len(si.Status.Clusters) == 1 && si.Status.Clusters[0].Cluster == "b"
	}, 10*time.Second, 5*time.Millisecond, "ServiceImport status lists only b")

	// The last peer goes: both objects are deleted.
	f.store.Delete("b")
	f.eventuallySE(t, "ServiceEntry deleted", func(_ *networkingv1.ServiceEntry, ok bool) bool { return !ok })
	require.Eventually(t, func() bool {
		_, ok := f.serviceImport(t, "demo", "echo")
		return !ok
	}, 10*time.Second, 5*time.Millisecond, "ServiceImport deleted")
}

func TestImportWriterWaitsForNamespace(t *testing.T) {
	f := startWriter(t, writerSetup{namespaces: []string{"other"}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))

	want := []SkippedImport{{Namespace: "demo", Name: "echo", Reason: "namespace demo does not exist in this cluster"}}
	f.waitSkipped(t, "missing namespace reported", func(s map[string][]SkippedImport) bool {
		return slices.Equal(s["b"], want)
	})
	_, ok := f.serviceEntry(t, "demo", "echo.clusterset.local")
	require.False(t, ok)

	_, err := f.kube.CoreV1().Namespaces().Create(t.Context(), namespace("demo"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventuallySE(t, "written once the namespace exists", func(_ *networkingv1.ServiceEntry, ok bool) bool { return ok })
	f.waitSkipped(t, "nothing skipped any more", func(s map[string][]SkippedImport) bool { return len(s) == 0 })
}

func TestImportWriterLeavesOthersObjectsAlone(t *testing.T) {
	theirs := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{
		Namespace: "demo", Name: "echo.clusterset.local", Labels: map[string]string{"owner": "someone"},
	}}
	theirs.Spec.Hosts = []string{"echo.example.com"}
	theirs.Spec.Resolution = networkingapi.ServiceEntry_DNS
	f := startWriter(t, writerSetup{namespaces: []string{"demo", "kube-system"}, istioObjs: []runtime.Object{theirs}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))
	sys := importSvc("c", []string{"10.2.0.1:15443"}, loc("r1", "", "", 1, 0))
	sys.Namespace = "kube-system"
	f.set(t, "c", importSvc("c", []string{"10.2.0.1:15443"}, loc("r1", "", "", 1, 0)), sys)

	conflict := "ServiceEntry demo/echo.clusterset.local exists and is not managed by Isthmus (no label app.kubernetes.io/managed-by=isthmus); left untouched"
	got := f.waitSkipped(t, "conflict and reserved namespace reported", func(s map[string][]SkippedImport) bool {
		return len(s["b"]) == 1 && len(s["c"]) == 2
	})
	require.Equal(t, map[string][]SkippedImport{
		"b": {{Namespace: "demo", Name: "echo", Reason: conflict}},
		"c": {
			{Namespace: "demo", Name: "echo", Reason: conflict},
			{Namespace: "kube-system", Name: "echo", Reason: "namespace kube-system is reserved: Isthmus never imports into it"},
		},
	}, got)

	se, ok := f.serviceEntry(t, "demo", "echo.clusterset.local")
	require.True(t, ok)
	require.Equal(t, []string{"echo.example.com"}, se.Spec.Hosts, "someone else's ServiceEntry is untouched")
	require.Equal(t, map[string]string{"owner": "someone"}, se.Labels)
	_, ok = f.serviceImport(t, "demo", "echo")
	require.False(t, ok, "the whole service is skipped, ServiceImport included")
	_, ok = f.serviceEntry(t, "kube-system", "echo.clusterset.local")
	require.False(t, ok)
	for _, w := range f.writes() {
		require.NotEqual(t, "update serviceentries/", w, "no update of someone else's object")
		require.NotEqual(t, "delete serviceentries/", w)
	}

	// Once they delete theirs, the import is written (after a re-check).
	require.NoError(t, f.istio.NetworkingV1().ServiceEntries("demo").Delete(t.Context(), "echo.clusterset.local", metav1.DeleteOptions{}))
	se = f.eventuallySE(t, "written after the other object went", func(se *networkingv1.ServiceEntry, ok bool) bool {
		return ok && se.Labels[LabelManagedBy] == ManagedByIsthmus
	})
	require.Len(t, se.Spec.Endpoints, 2)
}

func TestImportWriterUnchangedCatalogWritesNothing(t *testing.T) {
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "z1", "", 2, 0)))
	require.Eventually(t, func() bool {
		si, ok := f.serviceImport(t, "demo", "echo")
		_, seOK := f.serviceEntry(t, "demo", "echo.clusterset.local")
		return ok && seOK && len(si.Status.Clusters) == 1
	}, 10*time.Second, 5*time.Millisecond)
	// Let the informer events of those writes cause their flush.
	time.Sleep(100 * time.Millisecond)
	before := f.writes()
	require.Equal(t, []string{"create serviceentries/", "create serviceimports/"}, before,
		"the fake keeps the status given at create, so no status update was needed")

	// Another peer exporting into a reserved namespace changes the catalog
	// and Skipped, but not what is wanted for demo/echo: the flush that
	// publishes the new Skipped writes nothing.
	sys := importSvc("c", []string{"10.2.0.1:15443"}, loc("r1", "", "", 1, 0))
	sys.Namespace = "kube-system"
	f.set(t, "c", sys)
	f.waitSkipped(t, "flush happened", func(s map[string][]SkippedImport) bool { return len(s["c"]) == 1 })
	// The same content again is not even a change.
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "z1", "", 2, 0)))
	time.Sleep(100 * time.Millisecond)
	require.Equal(t, before, f.writes())
}

func TestImportWriterWithoutServiceImportCRD(t *testing.T) {
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}, noImportsCRD: true})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))
	f.eventuallySE(t, "ServiceEntry written", func(_ *networkingv1.ServiceEntry, ok bool) bool { return ok })
	time.Sleep(100 * time.Millisecond)
	_, ok := f.serviceImport(t, "demo", "echo")
	require.False(t, ok, "no ServiceImport where the CRD is not served")
	for _, a := range f.mcs.Actions() {
		require.NotEqual(t, "create", a.GetVerb(), "no ServiceImport write attempted")
	}
	require.Empty(t, f.w.Skipped(), "an optional kind that is not installed is not a skipped import")
}

func TestImportWriterRetriesAndReportsRefusals(t *testing.T) {
	// The first two creates fail as an overloaded server would; the writer
	// retries with backoff. ServiceImports are refused as invalid, which
	// retrying does not fix: that is reported.
	var mu sync.Mutex
	attempts := 0
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}, before: func(f *writerFixture) {
		f.istio.PrependReactor("create", "serviceentries", func(k8stesting.Action) (bool, runtime.Object, error) {
			mu.Lock()
			defer mu.Unlock()
			attempts++
			if attempts <= 2 {
				return true, nil, apierrors.NewServiceUnavailable("try later")
			}
			return false, nil, nil
		})
		f.mcs.PrependReactor("create", "serviceimports", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewInvalid(schema.GroupKind{Group: "multicluster.x-k8s.io", Kind: "ServiceImport"}, "echo", nil)
		})
	}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))
	f.eventuallySE(t, "written after two failures", func(_ *networkingv1.ServiceEntry, ok bool) bool { return ok })
	mu.Lock()
	require.Equal(t, 3, attempts)
	mu.Unlock()

	got := f.waitSkipped(t, "refusal reported", func(s map[string][]SkippedImport) bool { return len(s["b"]) == 1 })
	require.Contains(t, got["b"][0].Reason, "ServiceImport demo/echo: write refused by the API server")
	require.Contains(t, got["b"][0].Reason, "is invalid")
}

// A write that keeps failing with an error retrying could fix (here
// Istio's validating webhook down, a 500) is retried, and reported in
// Skipped once it has failed three times in a row: before, nothing but a
// debug log said so, and ImportsWritten said every import was written.
func TestImportWriterReportsWritesThatKeepFailing(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}, before: func(f *writerFixture) {
		f.istio.PrependReactor("create", "serviceentries", func(k8stesting.Action) (bool, runtime.Object, error) {
			if down.Load() {
				return true, nil, apierrors.NewInternalError(errors.New(`failed calling webhook "validation.istio.io": connection refused`))
			}
			return false, nil, nil
		})
	}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))
	got := f.waitSkipped(t, "the failing write reported", func(s map[string][]SkippedImport) bool { return len(s["b"]) == 1 })
	require.Contains(t, got["b"][0].Reason, "ServiceEntry demo/echo.clusterset.local: write failing since")
	require.Contains(t, got["b"][0].Reason, "failed calling webhook")
	_, ok := f.serviceImport(t, "demo", "echo")
	require.True(t, ok, "the other kind is written meanwhile")

	down.Store(false)
	f.eventuallySE(t, "written once the webhook is back", func(_ *networkingv1.ServiceEntry, ok bool) bool { return ok })
	f.waitSkipped(t, "nothing reported once written", func(s map[string][]SkippedImport) bool { return len(s) == 0 })
}

// While a flush is still writing a peer's imports (a first sync of
// thousands takes minutes), Writing says so for that peer, so that its
// ImportsWritten condition does not read True with imports missing;
// once every service is written, it says so no more.
func TestImportWriterSaysWhileItIsWriting(t *testing.T) {
	release := make(chan struct{})
	var held atomic.Bool
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}, progressEvery: time.Nanosecond, before: func(f *writerFixture) {
		f.istio.PrependReactor("create", "serviceentries", func(a k8stesting.Action) (bool, runtime.Object, error) {
			if a.(k8stesting.CreateAction).GetObject().(metav1.Object).GetName() == "b2.clusterset.local" {
				held.Store(true)
				<-release
			}
			return false, nil, nil
		})
	}})
	named := func(peer, name string) catalog.Service {
		s := importSvc(peer, []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0))
		s.Name = name
		return s
	}
	f.set(t, "b", named("b", "b1"), named("b", "b2"), named("b", "b3"))
	f.set(t, "c", named("c", "c1"))
	require.Eventually(t, held.Load, 10*time.Second, time.Millisecond, "the write of b2 started")
	require.Eventually(t, func() bool { return f.w.Writing("b") && f.w.Writing("c") }, 10*time.Second, time.Millisecond,
		"b's and c's imports are being written")
	require.False(t, f.w.Writing("d"), "a peer with nothing to write")
	require.Empty(t, f.w.Skipped())

	close(release)
	require.Eventually(t, func() bool { return !f.w.Writing("b") && !f.w.Writing("c") }, 10*time.Second, time.Millisecond,
		"done writing")
	for _, name := range []string{"b1", "b2", "b3", "c1"} {
		_, err := f.istio.NetworkingV1().ServiceEntries("demo").Get(t.Context(), name+".clusterset.local", metav1.GetOptions{})
		require.NoError(t, err, name)
	}
	require.Empty(t, f.w.Skipped())
}

// A kind the API server serves but whose objects the writer cannot list
// (RBAC without list, a broken conversion webhook) is reported for every
// import once ListTimeout has passed, with the list's error. Before, its
// imports were silently never written.
func TestImportWriterReportsAKindItCannotList(t *testing.T) {
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}, listTimeout: 200 * time.Millisecond, before: func(f *writerFixture) {
		f.istio.PrependReactor("list", "serviceentries", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "networking.istio.io", Resource: "serviceentries"}, "", errors.New("RBAC: no list"))
		})
	}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))
	got := f.waitSkipped(t, "the unlistable kind reported", func(s map[string][]SkippedImport) bool { return len(s["b"]) == 1 })
	require.Contains(t, got["b"][0].Reason, "ServiceEntry objects cannot be read from the API server")
	require.Contains(t, got["b"][0].Reason, "not listed within 200ms", "the same words at every look, not the time so far")
	require.Contains(t, got["b"][0].Reason, "forbidden")
	require.Contains(t, got["b"][0].Reason, "list and watch on serviceentries.networking.istio.io")
	_, ok := f.serviceImport(t, "demo", "echo")
	require.True(t, ok, "the other kind is written")
}

// The cluster-set IPs of a ServiceImport are an MCS controller's to set:
// the writer keeps them, and does not fight the controller over them. It
// used to write its spec whole, removing them at every flush.
func TestImportWriterKeepsTheClusterSetIPs(t *testing.T) {
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}})
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 1, 0)))
	require.Eventually(t, func() bool { _, ok := f.serviceImport(t, "demo", "echo"); return ok }, 10*time.Second, 5*time.Millisecond)
	si, _ := f.serviceImport(t, "demo", "echo")
	si.Spec.IPs = []string{"10.96.7.7"}
	_, err := f.mcs.MulticlusterV1alpha1().ServiceImports("demo").Update(t.Context(), si, metav1.UpdateOptions{})
	require.NoError(t, err)
	writes := len(f.writes())

	// A catalog change makes the writer write the ServiceImport's ports.
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "", "", 2, 0)))
	f.eventuallySE(t, "the change written", func(se *networkingv1.ServiceEntry, ok bool) bool {
		return ok && len(se.Spec.Endpoints) == 1 && se.Spec.Endpoints[0].Weight == 2
	})
	time.Sleep(200 * time.Millisecond) // 20 flush intervals
	si, _ = f.serviceImport(t, "demo", "echo")
	require.Equal(t, []string{"10.96.7.7"}, si.Spec.IPs)
	require.Len(t, f.writes(), writes+1, "one write, of the ServiceEntry: %v", f.writes()[writes:])
}

func TestNewImportWriterNeedsClusterName(t *testing.T) {
	_, err := NewImportWriter(kubefake.NewClientset(), istiofake.NewSimpleClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(), ImportOptions{})
	require.ErrorContains(t, err, "cluster name is required")
	_, err = NewImportWriter(nil, nil, nil, nil, ImportOptions{ClusterName: "a"})
	require.Error(t, err)
	require.False(t, errors.Is(err, context.Canceled))
}

func TestImportWriterDeletesNothingUntilPeersSynced(t *testing.T) {
	var synced atomic.Bool
	f := startWriter(t, writerSetup{namespaces: []string{"demo"}, synced: synced.Load})
	// Written before the restart: b's echo.
	f.set(t, "b", importSvc("b", []string{"10.1.0.1:15443"}, loc("r1", "z1", "", 2, 0)))
	f.eventuallySE(t, "written", func(_ *networkingv1.ServiceEntry, ok bool) bool { return ok })
	// A restarted federator's catalog is empty until b resyncs.
	f.store.Delete("b")
	time.Sleep(200 * time.Millisecond)
	_, ok := f.serviceEntry(t, "demo", "echo.clusterset.local")
	require.True(t, ok, "deleted before the peers synced")
	synced.Store(true)
	f.eventuallySE(t, "deleted once synced", func(_ *networkingv1.ServiceEntry, ok bool) bool { return !ok })
}
