package kube

import (
	"fmt"
	"slices"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"

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
