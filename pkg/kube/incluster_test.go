package kube

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/utils/ptr"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// meshedPod is pod with the label a meshed pod carries.
func meshedPod(ns, name, serviceAccount string) *corev1.Pod {
	p := pod(ns, name, serviceAccount)
	p.Labels[TLSModeLabel] = TLSModeIstio
	return p
}

// clusterIPService is service with a ClusterIP.
func clusterIPService(ns, name, ip string, ports ...corev1.ServicePort) *corev1.Service {
	s := service(ns, name, ports...)
	s.Spec.ClusterIP = ip
	return s
}

func startInCluster(t *testing.T, kubeObjs []runtime.Object, mcsObjs []runtime.Object) (*fixture, *catalog.Store) {
	t.Helper()
	in := catalog.NewStore()
	f := startWith(t, Options{TrustDomain: "a.mesh", InCluster: in}, kubeObjs, mcsObjs)
	return f, in
}

func inCluster(in *catalog.Store, ns, name string) (*catalog.Service, bool) {
	return in.Get(catalog.InClusterSource).Get(catalog.ServiceKey{Namespace: ns, Name: name})
}

// A Service whose endpoints are all meshed pods is an in-cluster service,
// exported or not, with its ClusterIP and its pods' identities; one with
// a plain pod, no ClusterIP, or no TCP port is not, and the local catalog
// (what peers see) is unchanged by any of it.
func TestInClusterServices(t *testing.T) {
	http := corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}
	headless := clusterIPService("demo", "headless", corev1.ClusterIPNone, http)
	f, in := startInCluster(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			clusterIPService("demo", "echo", "10.96.0.10", http),
			slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.1", "echo"),
			clusterIPService("demo", "mixed", "10.96.0.11", http),
			slice("demo", "mixed", "mixed-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.2", "n1", nil}, ep{"10.0.0.3", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.2", "mixed"),
			pod("demo", "pod-10.0.0.3", "mixed"),
			headless,
			slice("demo", "headless", "headless-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.4", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.4", "headless"),
			clusterIPService("demo", "udp", "10.96.0.12", corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}),
			slice("demo", "udp", "udp-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.5", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.5", "udp"),
			clusterIPService("demo", "empty", "10.96.0.13", http),
		},
		nil)
	ctx := t.Context()

	got, ok := inCluster(in, "demo", "echo")
	require.True(t, ok, "every endpoint meshed")
	require.Equal(t, "10.96.0.10", got.ClusterIP)
	require.Equal(t, "a", got.Cluster)
	require.Equal(t, spiffeIDs("demo", "echo"), got.Identities)
	require.Equal(t, []catalog.LocalityEndpoints{{
		Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1,
		Addresses: []catalog.Address{{IP: "10.0.0.1", Ready: true}},
	}}, got.Endpoints)
	require.Equal(t, int32(8080), got.Ports[0].TargetPort)
	for _, name := range []string{"mixed", "headless", "udp", "empty"} {
		_, ok := inCluster(in, "demo", name)
		require.False(t, ok, "%s is not an in-cluster service", name)
	}
	require.Zero(t, f.store.Get(catalog.LocalSource).Len(), "nothing is exported")

	// The plain pod becomes meshed: the Service joins.
	_, err := f.kube.CoreV1().Pods("demo").Update(ctx, meshedPod("demo", "pod-10.0.0.3", "mixed"), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "a label change makes the service meshed", func() bool {
		s, ok := inCluster(in, "demo", "mixed")
		return ok && s.ReadyEndpoints() == 2
	})
	// And leaves when one of its pods is no longer meshed.
	_, err = f.kube.CoreV1().Pods("demo").Update(ctx, pod("demo", "pod-10.0.0.2", "mixed"), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "a plain pod takes the service out", func() bool {
		_, ok := inCluster(in, "demo", "mixed")
		return !ok
	})

	// Exporting a service leaves its in-cluster entry alone; the local
	// catalog gets it without a ClusterIP.
	_, err = f.mcs.MulticlusterV1alpha1().ServiceExports("demo").Create(ctx, export("demo", "echo"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "exported", func() bool { _, ok := f.service(t, echoKey); return ok })
	exported, _ := f.service(t, echoKey)
	require.Empty(t, exported.ClusterIP)
	_, ok = inCluster(in, "demo", "echo")
	require.True(t, ok)

	// Deleting the Service removes it.
	require.NoError(t, f.kube.CoreV1().Services("demo").Delete(ctx, "echo", metav1.DeleteOptions{}))
	f.eventually(t, "a deleted Service leaves", func() bool {
		_, ok := inCluster(in, "demo", "echo")
		return !ok
	})
}

func TestInClusterNeedsATrustDomain(t *testing.T) {
	_, err := NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(),
		Options{ClusterName: "a", InCluster: catalog.NewStore()})
	require.ErrorContains(t, err, "need a trust domain")
}

// The pod cache keeps the meshed label and nothing else of the labels.
func TestStripPodKeepsTheMeshLabel(t *testing.T) {
	p := meshedPod("demo", "p", "sa")
	stripped, err := stripPod(p)
	require.NoError(t, err)
	require.Equal(t, map[string]string{TLSModeLabel: TLSModeIstio}, stripped.(*corev1.Pod).Labels)
}

// A pod the exporter does not know (deleted before the slice controller
// drops its endpoint, or not seen yet) leaves its endpoint out without
// taking the Service out of the in-cluster catalog.
func TestInClusterUnknownPodsAreLeftOut(t *testing.T) {
	http := corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}
	f, in := startInCluster(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			clusterIPService("demo", "echo", "10.96.0.10", http),
			slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4,
				ep{"10.0.0.1", "n1", nil}, ep{"10.0.0.2", "n1", nil}, ep{"10.0.0.3", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.1", "echo"),
			meshedPod("demo", "pod-10.0.0.2", "echo"),
			// pod-10.0.0.3 is not created yet.
		},
		nil)
	ctx := t.Context()
	addresses := func() []string {
		s, ok := inCluster(in, "demo", "echo")
		if !ok {
			return nil
		}
		var out []string
		for _, le := range s.Endpoints {
			for _, a := range le.Addresses {
				out = append(out, a.IP)
			}
		}
		return out
	}
	require.Equal(t, []string{"10.0.0.1", "10.0.0.2"}, addresses(), "a pod not seen yet is left out")

	_, err := f.kube.CoreV1().Pods("demo").Create(ctx, meshedPod("demo", "pod-10.0.0.3", "echo"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "its arrival adds it", func() bool { return len(addresses()) == 3 })

	require.NoError(t, f.kube.CoreV1().Pods("demo").Delete(ctx, "pod-10.0.0.1", metav1.DeleteOptions{}))
	f.eventually(t, "a deleted pod's endpoint leaves before the slice changes", func() bool {
		a := addresses()
		return len(a) == 2 && a[0] == "10.0.0.2"
	})
}

// Two Services with one ClusterIP (one deleted and made again before the
// deletion is seen): the second waits until the first is gone.
func TestInClusterClusterIPHeldByAnother(t *testing.T) {
	http := corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}
	f, in := startInCluster(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			clusterIPService("demo", "old", "10.96.0.10", http),
			slice("demo", "old", "old-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.1", "old"),
		},
		nil)
	ctx := t.Context()
	_, ok := inCluster(in, "demo", "old")
	require.True(t, ok)
	for _, obj := range []runtime.Object{
		clusterIPService("demo", "new", "10.96.0.10", http),
		slice("demo", "new", "new-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.2", "n1", nil}),
		meshedPod("demo", "pod-10.0.0.2", "new"),
	} {
		require.NoError(t, f.kube.Tracker().Add(obj))
	}
	// Once the exporter's caches hold the new Service, its slice and its
	// pod, a reconcile of it (the workers' own, or this one) leaves it
	// out.
	newKey := catalog.ServiceKey{Namespace: "demo", Name: "new"}
	f.eventually(t, "the caches hold the new Service", func() bool {
		_, svcErr := f.exp.services.Services("demo").Get("new")
		slices, err := f.exp.slicesOf(newKey)
		known, _ := f.exp.accounts.meshedPod("demo", "pod-10.0.0.2")
		return svcErr == nil && err == nil && len(slices) == 1 && known
	})
	require.NoError(t, f.exp.reconcile(ctx, newKey))
	f.exp.flush()
	_, ok = inCluster(in, "demo", "new")
	require.False(t, ok, "two in-cluster services at one address")
	_, ok = inCluster(in, "demo", "old")
	require.True(t, ok, "the holder keeps it")

	require.NoError(t, f.kube.CoreV1().Services("demo").Delete(ctx, "old", metav1.DeleteOptions{}))
	f.eventually(t, "the new Service takes the address once the old one is gone", func() bool {
		_, oldThere := inCluster(in, "demo", "old")
		_, newThere := inCluster(in, "demo", "new")
		return !oldThere && newThere
	})
}

// A slice may point at a pod of another namespace; that pod's label
// change still reaches the Service.
func TestInClusterPodOfAnotherNamespace(t *testing.T) {
	http := corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}
	s := slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", nil})
	s.Endpoints[0].TargetRef.Namespace = "other"
	s.Endpoints[0].TargetRef.Name = "far"
	f, in := startInCluster(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			clusterIPService("demo", "echo", "10.96.0.10", http),
			s,
			pod("other", "far", "echo"),
		},
		nil)
	_, ok := inCluster(in, "demo", "echo")
	require.False(t, ok)
	_, err := f.kube.CoreV1().Pods("other").Update(t.Context(), meshedPod("other", "far", "echo"), metav1.UpdateOptions{})
	require.NoError(t, err)
	f.eventually(t, "the label change reaches the Service in another namespace", func() bool {
		_, ok := inCluster(in, "demo", "echo")
		return ok
	})
}

func declared(in *catalog.Store, ns, name string) (*catalog.Service, bool) {
	return in.Get(catalog.DeclaredSource).Get(catalog.ServiceKey{Namespace: ns, Name: name})
}

// Every Service with a TCP port and endpoints declares its ports for the
// pods behind it, headless, mixed (some pods not meshed) and unexported
// ones included, with every address of both families and the pod behind
// it; a named targetPort the pods resolve to different numbers makes an
// entry per number, so that each pod declares the port it listens on.
func TestDeclaredPorts(t *testing.T) {
	http := corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, AppProtocol: ptr.To("http")}
	dualA := slice("demo", "dual", "dual-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.6", "n1", nil})
	dualB := slice("demo", "dual", "dual-b", discoveryv1.AddressTypeIPv6, ep{"fd00::6", "n1", nil})
	dualB.Endpoints[0].TargetRef.Name = "pod-10.0.0.6"
	named9090 := slice("demo", "named", "named-b", discoveryv1.AddressTypeIPv4, ep{"10.0.0.8", "n1", nil})
	named9090.Ports[0].Port = ptr.To(int32(9090))
	// An address no pod is named for (an EndpointSlice written by hand).
	noRef := slice("demo", "noref", "noref-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.10", "n1", nil})
	noRef.Endpoints[0].TargetRef = nil
	f, in := startInCluster(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			clusterIPService("demo", "mixed", "10.96.0.11", http),
			slice("demo", "mixed", "mixed-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.2", "n1", nil}, ep{"10.0.0.3", "n1", nil}),
			meshedPod("demo", "pod-10.0.0.2", "mixed"),
			pod("demo", "pod-10.0.0.3", "mixed"),
			clusterIPService("demo", "headless", corev1.ClusterIPNone, http),
			slice("demo", "headless", "headless-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.4", "n1", ptr.To(false)}),
			meshedPod("demo", "pod-10.0.0.4", "headless"),
			clusterIPService("demo", "dual", "10.96.0.14", http),
			dualA, dualB,
			clusterIPService("demo", "named", "10.96.0.15", http),
			slice("demo", "named", "named-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.7", "n1", nil}),
			named9090,
			clusterIPService("demo", "udp", "10.96.0.12", corev1.ServicePort{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}),
			slice("demo", "udp", "udp-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.5", "n1", nil}),
			clusterIPService("demo", "empty", "10.96.0.13", http),
			// One address in two slices of the same ports: listed once.
			clusterIPService("demo", "dup", "10.96.0.16", http),
			slice("demo", "dup", "dup-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.9", "n1", nil}),
			slice("demo", "dup", "dup-2", discoveryv1.AddressTypeIPv4, ep{"10.0.0.9", "n1", nil}),
			clusterIPService("demo", "noref", "10.96.0.17", http),
			noRef,
		},
		nil)
	f.eventually(t, "the declared ports are published", func() bool {
		_, ok := declared(in, "demo", "named@9090")
		return ok
	})
	addrs := func(name string) []catalog.Address {
		t.Helper()
		s, ok := declared(in, "demo", name)
		require.True(t, ok, name)
		require.Len(t, s.Endpoints, 1, name)
		return s.Endpoints[0].Addresses
	}
	require.Equal(t, []catalog.Address{{IP: "10.0.0.2", Ready: true, Pod: "pod-10.0.0.2"}, {IP: "10.0.0.3", Ready: true, Pod: "pod-10.0.0.3"}},
		addrs("mixed"), "a pod that is not meshed does not hide the others")
	require.Equal(t, []catalog.Address{{IP: "10.0.0.4", Ready: false, Pod: "pod-10.0.0.4"}}, addrs("headless"), "headless, and not ready")
	require.Equal(t, []catalog.Address{{IP: "10.0.0.6", Ready: true, Pod: "pod-10.0.0.6"}, {IP: "fd00::6", Ready: true, Pod: "pod-10.0.0.6"}},
		addrs("dual"), "both families, one pod")
	require.Equal(t, []catalog.Address{{IP: "10.0.0.7", Ready: true, Pod: "pod-10.0.0.7"}}, addrs("named"))
	require.Equal(t, []catalog.Address{{IP: "10.0.0.8", Ready: true, Pod: "pod-10.0.0.8"}}, addrs("named@9090"))
	require.Equal(t, []catalog.Address{{IP: "10.0.0.9", Ready: true, Pod: "pod-10.0.0.9"}}, addrs("dup"), "an address in two slices, once")
	require.Equal(t, []catalog.Address{{IP: "10.0.0.10", Ready: true}}, addrs("noref"), "no pod named: known by its IP only")
	s, _ := declared(in, "demo", "named")
	require.Equal(t, int32(8080), s.Ports[0].TargetPort)
	s, _ = declared(in, "demo", "named@9090")
	require.Equal(t, int32(9090), s.Ports[0].TargetPort)
	require.Equal(t, "http", s.Ports[0].AppProtocol)
	for _, name := range []string{"udp", "empty"} {
		_, ok := declared(in, "demo", name)
		require.False(t, ok, "%s declares nothing", name)
	}

	// The pods that listened on 9090 are gone: so is their entry.
	require.NoError(t, f.kube.DiscoveryV1().EndpointSlices("demo").Delete(t.Context(), "named-b", metav1.DeleteOptions{}))
	f.eventually(t, "the entry of the other number goes with its slice", func() bool {
		_, ok := declared(in, "demo", "named@9090")
		return !ok
	})
	_, ok := declared(in, "demo", "named")
	require.True(t, ok)
	// The Service goes: so do its entries.
	require.NoError(t, f.kube.CoreV1().Services("demo").Delete(t.Context(), "mixed", metav1.DeleteOptions{}))
	f.eventually(t, "a deleted Service declares nothing", func() bool {
		_, ok := declared(in, "demo", "mixed")
		return !ok
	})
}
