package kube

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"

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

type ep struct {
	ip, node string
	ready    *bool
}

func slice(ns, svc, name string, af discoveryv1.AddressType, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: af,
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

func start(t *testing.T, kubeObjs []runtime.Object, mcsObjs []runtime.Object) *fixture {
	t.Helper()
	f := &fixture{
		kube:  kubefake.NewClientset(kubeObjs...),
		mcs:   mcsfake.NewSimpleClientset(mcsObjs...),
		store: catalog.NewStore(),
	}
	var err error
	f.exp, err = NewExporter(f.kube, f.mcs, f.store, Options{ClusterName: "a", FlushDelay: time.Millisecond})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- f.exp.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(10 * time.Second):
			t.Error("exporter did not stop within 10s")
		}
	})
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
		},
		[]runtime.Object{export("demo", "echo")})

	got, ok := f.service(t, echoKey)
	require.True(t, ok, "exported service is in the catalog once ready")
	require.Equal(t, "a", got.Cluster)
	require.Equal(t, []catalog.Port{
		{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP},
		{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, AppProtocol: "http"},
	}, got.Ports)
	require.Equal(t, []catalog.LocalityEndpoints{
		{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 2},
		{Locality: catalog.Locality{Region: "r1", Zone: "z2"}, NotReady: 1},
	}, got.Endpoints)

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
