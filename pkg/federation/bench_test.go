package federation

import (
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

// exportedServices builds n local services, three localities each.
func exportedServices(n int) []catalog.Service {
	out := make([]catalog.Service, n)
	for i := range out {
		out[i] = catalog.Service{
			Namespace: fmt.Sprintf("ns-%d", i%50), Name: fmt.Sprintf("svc-%d", i), Cluster: "here",
			Ports:      []catalog.Port{{Name: "http", Port: 80, AppProtocol: "http"}, {Name: "grpc", Port: 9090}},
			Identities: []string{fmt.Sprintf("spiffe://here.mesh/ns/ns-%d/sa/svc-%d", i%50, i)},
			Endpoints: []catalog.LocalityEndpoints{
				{Locality: catalog.Locality{Region: "r", Zone: "z1"}, Ready: 3},
				{Locality: catalog.Locality{Region: "r", Zone: "z2"}, Ready: 2, NotReady: 1},
				{Locality: catalog.Locality{Region: "r", Zone: "z3"}, Ready: 1},
			},
		}
	}
	return out
}

// BenchmarkInitialSync is the work of one full set of 10,000 services:
// the sender's desired set and update, and the receiver checking and
// importing it. `go test -run '^$' -bench InitialSync -benchmem ./pkg/federation/`
func BenchmarkInitialSync(b *testing.B) {
	sender := fuzzPeer(b)
	snap, err := catalog.NewSnapshot(catalog.LocalSource, exportedServices(10000))
	if err != nil {
		b.Fatal(err)
	}
	sender.exports.catalog.Set(snap)
	// The receiver's peer is named after the sender's cluster, in the
	// sender's trust domain.
	lim := Limits{}.withDefaults()
	log := slog.New(slog.DiscardHandler)
	b.ReportAllocs()
	for b.Loop() {
		sender.exports.forget("evil")
		want, err := sender.exports.desired(TypeService, "evil")
		if err != nil {
			b.Fatal(err)
		}
		out := newOutbound(TypeService)
		out.resume("", want)
		u, _ := out.next(want, time.Time{})
		receiver := fuzzPeer(b)
		receiver.td = sender.exports.trust.LocalTrustDomain()
		a, err := receiver.handle(b.Context(), updateMsg(u), lim, log)
		if err != nil || a.GetError() != nil {
			b.Fatalf("refused: %v %v", err, a.GetError())
		}
	}
}

// BenchmarkIncrementalUpdate is one service changing among 10,000: the
// sender's diff and the receiver applying it.
// `go test -run '^$' -bench IncrementalUpdate -benchmem ./pkg/federation/`
func BenchmarkIncrementalUpdate(b *testing.B) {
	sender := fuzzPeer(b)
	services := exportedServices(10000)
	snap, err := catalog.NewSnapshot(catalog.LocalSource, services)
	if err != nil {
		b.Fatal(err)
	}
	sender.exports.catalog.Set(snap)
	want, err := sender.exports.desired(TypeService, "evil")
	if err != nil {
		b.Fatal(err)
	}
	out := newOutbound(TypeService)
	out.resume("", want)
	receiver := fuzzPeer(b)
	receiver.td = sender.exports.trust.LocalTrustDomain()
	lim := Limits{}.withDefaults()
	log := slog.New(slog.DiscardHandler)
	apply := func(u *fedv1.Update) {
		a, err := receiver.handle(b.Context(), updateMsg(u), lim, log)
		if err != nil || a.GetError() != nil {
			b.Fatalf("refused: %v %v", err, a.GetError())
		}
		out.ack(a)
	}
	first, _ := out.next(want, time.Time{})
	apply(first)
	builder := snap.Builder()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		svc := services[i%len(services)].Clone()
		svc.Endpoints[0].Ready = 4 + i
		i++
		if err := builder.Put(svc); err != nil {
			b.Fatal(err)
		}
		sender.exports.catalog.Set(builder.Build())
		want, err := sender.exports.desired(TypeService, "evil")
		if err != nil {
			b.Fatal(err)
		}
		u, _ := out.next(want, time.Time{})
		if len(u.Resources) != 1 {
			b.Fatalf("diff of one change carries %d resources", len(u.Resources))
		}
		apply(u)
	}
}

// BenchmarkReconcileUnchanged is one FederationPeer among 1,000 seen
// again with its spec unchanged, as after each of its status writes: a
// status round costs this once per peer.
// `go test -run '^$' -bench ReconcileUnchanged -benchmem ./pkg/federation/`
func BenchmarkReconcileUnchanged(b *testing.B) {
	const peers = 1000
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{v1alpha1.Resource: "FederationPeerList"})
	td := spiffeid.RequireTrustDomainFromString("here.mesh")
	id := spiffeid.RequireFromPath(td, "/fed")
	m, err := NewManager(fake.NewClientset(), dyn, catalog.NewStore(), trust.NewStore(td), nil,
		Config{ClusterName: "here", FederatorID: id, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	created := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	for i := range peers {
		name := fmt.Sprintf("peer-%d", i)
		ptd := spiffeid.RequireTrustDomainFromString(name + ".mesh")
		spec := v1alpha1.FederationPeerSpec{TrustDomain: ptd.String(), FederatorID: "spiffe://" + ptd.String() + "/fed"}
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": v1alpha1.GroupVersion.String(), "kind": "FederationPeer",
			"metadata": map[string]any{"name": name, "generation": int64(1), "creationTimestamp": created.Add(time.Duration(i) * time.Second).Format(time.RFC3339)},
			"spec":     map[string]any{"trustDomain": spec.TrustDomain, "federatorID": spec.FederatorID},
		}}
		if err := m.informer.GetIndexer().Add(u); err != nil {
			b.Fatal(err)
		}
		m.setPeerLocked(name, &peerEntry{p: &peer{name: name, td: ptd}, spec: spec})
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := m.reconcile(b.Context(), "peer-500"); err != nil {
			b.Fatal(err)
		}
	}
}
