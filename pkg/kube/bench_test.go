package kube

import (
	"fmt"
	"slices"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	mcsfake "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned/fake"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// BenchmarkBuildCatalog measures turning a cluster's objects into the
// catalog: 10,000 exported services with 10 endpoints each (100,000
// endpoints) spread over 30 nodes in 3 zones, each service's pods under a
// ServiceAccount of its own, translated (identities included) and
// assembled into one snapshot, as the federator does at start-up.
func BenchmarkBuildCatalog(b *testing.B) {
	const services, perService, nodes = 10_000, 10, 30
	localities := make(map[string]catalog.Locality, nodes)
	for i := range nodes {
		localities[fmt.Sprintf("node-%d", i)] = catalog.Locality{Region: "r1", Zone: fmt.Sprintf("z%d", i%3)}
	}
	locate := func(n string) (catalog.Locality, bool) { l, ok := localities[n]; return l, ok }
	accounts := newPodAccounts(spiffeid.RequireTrustDomainFromString("a.mesh"))

	svcs := make([]*corev1.Service, services)
	svcSlices := make([][]*discoveryv1.EndpointSlice, services)
	for i := range services {
		ns := fmt.Sprintf("ns-%d", i%100)
		name := fmt.Sprintf("svc-%d", i)
		svcs[i] = service(ns, name,
			corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, AppProtocol: ptr.To("http")},
			corev1.ServicePort{Name: "grpc", Port: 9090, Protocol: corev1.ProtocolTCP})
		eps := make([]ep, perService)
		for j := range perService {
			eps[j] = ep{ip: fmt.Sprintf("10.%d.%d.%d", i/65536, (i/256)%256, j), node: fmt.Sprintf("node-%d", (i+j)%nodes), ready: ptr.To(j != 0)}
		}
		s := slice(ns, name, name+"-abc", discoveryv1.AddressTypeIPv4, eps...)
		for j := range s.Endpoints {
			// Addresses repeat across services; pod names must not.
			s.Endpoints[j].TargetRef.Name = fmt.Sprintf("%s-%d", name, j)
			accounts.set(pod(ns, s.Endpoints[j].TargetRef.Name, name))
		}
		svcSlices[i] = []*discoveryv1.EndpointSlice{s}
	}

	b.ReportAllocs()
	b.ResetTimer()
	var snap *catalog.Snapshot
	for b.Loop() {
		bld := catalog.NewBuilder(catalog.LocalSource)
		for i, svc := range svcs {
			if err := bld.Put(serviceFromObjects("a", svc, svcSlices[i], nil, locate, accounts)); err != nil {
				b.Fatal(err)
			}
		}
		if snap = bld.Build(); snap.Len() != services {
			b.Fatalf("catalog has %d services, want %d", snap.Len(), services)
		}
	}
	b.StopTimer()
	got, _ := snap.Get(catalog.ServiceKey{Namespace: "ns-7", Name: "svc-7"})
	if want := []string{"spiffe://a.mesh/ns/ns-7/sa/svc-7"}; !slices.Equal(got.Identities, want) {
		b.Fatalf("identities %v, want %v", got.Identities, want)
	}
}

// BenchmarkNodeEvent measures what one node changing zone costs the
// exporter: the services its event re-queues (keys/op) and their
// reconciles, run here one after the other on the benchmark's goroutine
// (the catalog's publication and the status writes are left out). The
// cluster: 10,000 Services, each exported, with a ClusterIP and 10 meshed
// pods on consecutive nodes of the nodes (so a node holds endpoints of
// 10/nodes of them), with (in-cluster=true) or without the in-cluster
// services kept. The informers' caches are filled directly; nothing
// watches an API server.
func BenchmarkNodeEvent(b *testing.B) {
	const services, perService = 10_000, 10
	for _, nodes := range []int{30, 300} {
		for _, withInCluster := range []bool{false, true} {
			b.Run(fmt.Sprintf("nodes=%d/in-cluster=%t", nodes, withInCluster), func(b *testing.B) {
				opts := Options{ClusterName: "a", TrustDomain: "a.mesh"}
				if withInCluster {
					opts.InCluster = catalog.NewStore()
				}
				e, err := NewExporter(kubefake.NewClientset(), mcsfake.NewSimpleClientset(), catalog.NewStore(), opts)
				if err != nil {
					b.Fatal(err)
				}
				defer e.queue.ShutDown()
				defer e.statusQueue.ShutDown()
				add := func(inf cache.SharedIndexInformer, obj any) {
					if err := inf.GetIndexer().Add(obj); err != nil {
						b.Fatal(err)
					}
				}
				core := e.kubeInformers.Core().V1()
				for i := range nodes {
					add(core.Nodes().Informer(), node(fmt.Sprintf("node-%d", i), "r1", fmt.Sprintf("z%d", i%3)))
				}
				for i := range services {
					ns, name := fmt.Sprintf("ns-%d", i%100), fmt.Sprintf("svc-%d", i)
					add(core.Services().Informer(), clusterIPService(ns, name, fmt.Sprintf("10.96.%d.%d", i/256, i%256),
						corev1.ServicePort{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}))
					add(e.mcsInformers.Multicluster().V1alpha1().ServiceExports().Informer(), export(ns, name))
					eps := make([]ep, perService)
					for j := range perService {
						eps[j] = ep{ip: fmt.Sprintf("10.%d.%d.%d", i/65536, (i/256)%256, j), node: fmt.Sprintf("node-%d", (i+j)%nodes)}
					}
					s := slice(ns, name, name+"-abc", discoveryv1.AddressTypeIPv4, eps...)
					for j := range s.Endpoints {
						s.Endpoints[j].TargetRef.Name = fmt.Sprintf("%s-%d", name, j)
						e.accounts.set(meshedPod(ns, s.Endpoints[j].TargetRef.Name, name))
					}
					add(e.kubeInformers.Discovery().V1().EndpointSlices().Informer(), s)
				}
				e.started.Store(true)
				ctx := b.Context()
				drain := func() int {
					n := 0
					for e.queue.Len() > 0 {
						key, _ := e.queue.Get()
						if err := e.reconcile(ctx, key); err != nil {
							b.Fatal(err)
						}
						e.queue.Forget(key)
						e.queue.Done(key)
						n++
					}
					return n
				}
				for _, key := range e.keysToBuild() {
					e.queue.Add(key)
				}
				drain()
				nodeIdx := core.Nodes().Informer().GetIndexer()
				keys := 0
				i := 0
				for b.Loop() {
					n := node("node-7", "r1", fmt.Sprintf("z%d", 10+i%2))
					if err := nodeIdx.Update(n); err != nil {
						b.Fatal(err)
					}
					e.nodeChanged(n)
					keys += drain()
					i++
				}
				b.ReportMetric(float64(keys)/float64(b.N), "keys/op")
			})
		}
	}
}
