package kube

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// queueWatcher is an Exporter whose informers run but whose workers do
// not: a test reads what events put on its queue. Once it is made, the
// handlers have seen the first lists.
type queueWatcher struct {
	e    *Exporter
	kube *kubefake.Clientset
}

func watchQueue(t *testing.T, opts Options, kubeObjs, mcsObjs []runtime.Object) *queueWatcher {
	t.Helper()
	opts.ClusterName = "a"
	kube := kubefake.NewClientset(kubeObjs...)
	e, err := NewExporter(kube, watchFromList(mcsfake.NewSimpleClientset(mcsObjs...)), catalog.NewStore(), opts)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	e.kubeInformers.Start(ctx.Done())
	e.mcsInformers.Start(ctx.Done())
	t.Cleanup(func() {
		cancel()
		e.queue.ShutDown()
		e.statusQueue.ShutDown()
		e.kubeInformers.Shutdown()
		e.mcsInformers.Shutdown()
	})
	require.True(t, cache.WaitForCacheSync(ctx.Done(), e.synced...))
	e.started.Store(true)
	return &queueWatcher{e: e, kube: kube}
}

// until takes keys off the queue until it has taken last, then what is
// left, and returns them all. Events of one informer reach its handler in
// order, so an event that queues last ends what those before it queued.
func (w *queueWatcher) until(t *testing.T, last catalog.ServiceKey) map[catalog.ServiceKey]bool {
	t.Helper()
	got := map[catalog.ServiceKey]bool{}
	take := func() {
		key, _ := w.e.queue.Get()
		got[key] = true
		w.e.queue.Forget(key)
		w.e.queue.Done(key)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !got[last] {
		require.True(t, time.Now().Before(deadline), "%v never queued; queued %v", last, got)
		if w.e.queue.Len() == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		take()
	}
	for w.e.queue.Len() > 0 {
		take()
	}
	return got
}

func (w *queueWatcher) setNode(t *testing.T, n *corev1.Node) {
	t.Helper()
	_, err := w.kube.CoreV1().Nodes().Update(t.Context(), n, metav1.UpdateOptions{})
	require.NoError(t, err)
}

// A node event queues the services with endpoints on that node and no
// other: of them the exports, or every Service when the in-cluster
// services are kept. A node change that leaves its locality alone
// queues nothing.
func TestNodeEventQueuesOnlyItsServices(t *testing.T) {
	key := func(name string) catalog.ServiceKey { return catalog.ServiceKey{Namespace: "demo", Name: name} }
	set := func(names ...string) map[catalog.ServiceKey]bool {
		out := map[catalog.ServiceKey]bool{}
		for _, n := range names {
			out[key(n)] = true
		}
		return out
	}
	http := corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}
	kubeObjs := []runtime.Object{
		node("n1", "r1", "z1"), node("n2", "r1", "z2"), node("sentinel", "r1", "z3"),
		clusterIPService("demo", "on-n1", "10.96.0.1", http),
		slice("demo", "on-n1", "on-n1-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", nil}),
		clusterIPService("demo", "on-n2", "10.96.0.2", http),
		slice("demo", "on-n2", "on-n2-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.2", "n2", nil}),
		// Its endpoints on n1 are in its second slice.
		clusterIPService("demo", "on-both", "10.96.0.3", http),
		slice("demo", "on-both", "on-both-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.3", "n2", nil}),
		slice("demo", "on-both", "on-both-b", discoveryv1.AddressTypeIPv4, ep{"10.0.0.4", "n1", nil}, ep{"10.0.0.5", "n1", nil}),
		clusterIPService("demo", "unexported-on-n1", "10.96.0.4", http),
		slice("demo", "unexported-on-n1", "unexported-on-n1-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.6", "n1", nil}),
		clusterIPService("demo", "sentinel", "10.96.0.5", http),
		slice("demo", "sentinel", "sentinel-a", discoveryv1.AddressTypeIPv4, ep{"10.0.0.7", "sentinel", nil}),
	}
	mcsObjs := []runtime.Object{export("demo", "on-n1"), export("demo", "on-n2"), export("demo", "on-both"), export("demo", "sentinel")}

	for _, tc := range []struct {
		name string
		opts Options
		// n1 is what a locality change of n1 queues.
		n1 map[catalog.ServiceKey]bool
	}{
		{"exports", Options{TrustDomain: "a.mesh"}, set("on-n1", "on-both")},
		{"in-cluster", Options{TrustDomain: "a.mesh", InCluster: catalog.NewStore()}, set("on-n1", "on-both", "unexported-on-n1")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := watchQueue(t, tc.opts, kubeObjs, mcsObjs)
			// What the informers' first lists queued, all queued by now.
			require.Len(t, w.until(t, key("sentinel")), 5)
			zone := 0
			sentinel := func() {
				zone++
				w.setNode(t, node("sentinel", "r1", fmt.Sprintf("s%d", zone)))
			}

			w.setNode(t, node("n1", "r1", "z9"))
			sentinel()
			got := w.until(t, key("sentinel"))
			delete(got, key("sentinel"))
			require.Equal(t, tc.n1, got, "n1 moved zone")

			unlabelled := node("n1", "r1", "z9")
			unlabelled.Labels["example.com/pool"] = "blue"
			w.setNode(t, unlabelled)
			sentinel()
			require.Equal(t, set("sentinel"), w.until(t, key("sentinel")), "n1 changed, not its locality")

			require.NoError(t, w.kube.CoreV1().Nodes().Delete(t.Context(), "n2", metav1.DeleteOptions{}))
			sentinel()
			got = w.until(t, key("sentinel"))
			delete(got, key("sentinel"))
			require.Equal(t, set("on-n2", "on-both"), got, "n2 went")

			_, err := w.kube.CoreV1().Nodes().Create(t.Context(), node("n3", "r1", "z1"), metav1.CreateOptions{})
			require.NoError(t, err)
			sentinel()
			require.Equal(t, set("sentinel"), w.until(t, key("sentinel")), "n3 came, with no endpoints on it")
		})
	}
}

// An endpoint on a node the exporter does not know yet has no locality;
// when the node comes, the service is placed.
func TestEndpointsOnALaterNodeArePlaced(t *testing.T) {
	f := start(t,
		[]runtime.Object{
			node("n1", "r1", "z1"),
			service("demo", "echo", corev1.ServicePort{Port: 80, Protocol: corev1.ProtocolTCP}),
			slice("demo", "echo", "echo-1", discoveryv1.AddressTypeIPv4, ep{"10.0.0.1", "n1", nil}, ep{"10.0.0.2", "late", nil}),
		},
		[]runtime.Object{export("demo", "echo")})
	localities := func() []catalog.Locality {
		got, ok := f.service(t, echoKey)
		if !ok {
			return nil
		}
		var out []catalog.Locality
		for _, le := range got.Endpoints {
			out = append(out, le.Locality)
		}
		return out
	}
	require.ElementsMatch(t, []catalog.Locality{{Region: "r1", Zone: "z1"}, {}}, localities(), "the late node's endpoint has no locality yet")

	_, err := f.kube.CoreV1().Nodes().Create(t.Context(), node("late", "r2", "z7"), metav1.CreateOptions{})
	require.NoError(t, err)
	f.eventually(t, "the endpoint is placed once its node comes", func() bool {
		got := localities()
		return len(got) == 2 && (got[0] == catalog.Locality{Region: "r2", Zone: "z7"} || got[1] == catalog.Locality{Region: "r2", Zone: "z7"})
	})
}
