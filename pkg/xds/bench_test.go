package xds

import (
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// Run with
//
//	go test -run '^$' -bench . -benchmem ./pkg/xds/
//
// The catalogs are shaped like bench-federation's: one TCP port per
// service, ten namespaces, endpoints spread over three zones.
//
// Besides ns/op, the wall time, the translations report cpu-ns/op, the
// CPU time the process spent (GC included) per operation: on a shared
// machine it moves less with the neighbours' load.

var benchSizes = []struct{ services, endpoints int }{
	{1000, 0}, {1000, 10}, {10000, 0}, {10000, 10},
}

const benchUpstream = "10.0.0.1:15019"

func benchService(i, endpoints int, ready bool) catalog.Service {
	svc := catalog.Service{
		Namespace: fmt.Sprintf("ns-%02d", i%10), Name: fmt.Sprintf("svc-%05d", i), Cluster: "a",
		Ports: []catalog.Port{{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, AppProtocol: "http", TargetPort: 8080}},
	}
	for z := range 3 {
		le := catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r1", Zone: fmt.Sprintf("z%d", z)}}
		for j := z; j < endpoints; j += 3 {
			le.Addresses = append(le.Addresses, catalog.Address{IP: fmt.Sprintf("10.%d.%d.%d", 10+j, i/256%256, i%256), Ready: true})
			le.Ready++
		}
		if len(le.Addresses) > 0 && !ready {
			// One endpoint of the service turns not ready.
			le.Addresses[0].Ready = false
			le.Ready--
			le.NotReady++
		}
		if le.Ready+le.NotReady > 0 {
			svc.Endpoints = append(svc.Endpoints, le)
		}
	}
	if endpoints == 0 && !ready {
		// Without endpoints, the change is a new target port.
		svc.Ports[0].TargetPort = 8081
	}
	return svc
}

func benchCatalog(tb testing.TB, services, endpoints int) *catalog.Snapshot {
	tb.Helper()
	b := catalog.NewBuilder(catalog.LocalSource)
	for i := range services {
		if err := b.Put(benchService(i, endpoints, true)); err != nil {
			tb.Fatal(err)
		}
	}
	return b.Build()
}

// benchChanges returns the catalogs a one-service change alternates
// between: base, and base with service i changed, for a few i spread
// over the catalog. Each is built from base by the catalog's Builder,
// as pkg/kube builds it, so unchanged services keep their entries.
func benchChanges(tb testing.TB, base *catalog.Snapshot, services, endpoints int) []*catalog.Snapshot {
	tb.Helper()
	var out []*catalog.Snapshot
	for _, i := range []int{0, services / 3, services / 2, services - 1} {
		b := base.Builder()
		if err := b.Put(benchService(i, endpoints, false)); err != nil {
			tb.Fatal(err)
		}
		out = append(out, b.Build())
	}
	return out
}

// cpuMeter reports the process's CPU time per operation of the loop it
// brackets: start it before b.Loop, report after.
type cpuMeter struct {
	start time.Duration
	ok    bool
}

func startCPU() cpuMeter {
	start, ok := processCPU()
	return cpuMeter{start: start, ok: ok}
}

func (m cpuMeter) report(b *testing.B) {
	end, ok := processCPU()
	if m.ok && ok && b.N > 0 {
		b.ReportMetric(float64(end-m.start)/float64(b.N), "cpu-ns/op")
	}
}

func benchName(services, endpoints int) string {
	return fmt.Sprintf("services=%d/endpoints=%d", services, endpoints)
}

// BenchmarkTranslateGateway is the gateway's translation of the local
// catalog: from scratch (full, TranslateGateway), and by the federator's
// GatewayTranslator on a change of one service's endpoints
// (one-service-change) and on a service added or removed
// (one-service-added), which is what the federator pays on every change
// of the local catalog.
func BenchmarkTranslateGateway(b *testing.B) {
	opts := GatewayOptions{FederationUpstream: benchUpstream}
	for _, sz := range benchSizes {
		base := benchCatalog(b, sz.services, sz.endpoints)
		changes := benchChanges(b, base, sz.services, sz.endpoints)
		b.Run(benchName(sz.services, sz.endpoints)+"/full", func(b *testing.B) {
			cpu := startCPU()
			for b.Loop() {
				if _, err := TranslateGateway(base, opts); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
		b.Run(benchName(sz.services, sz.endpoints)+"/one-service-change", func(b *testing.B) {
			tr, err := NewGatewayTranslator(opts)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := tr.Translate(base); err != nil {
				b.Fatal(err)
			}
			i := 0
			cpu := startCPU()
			for b.Loop() {
				// change 0, base, change 1, base, …: every translation
				// sees one service differ from the one before.
				snap := base
				if i%2 == 0 {
					snap = changes[i/2%len(changes)]
				}
				if _, err := tr.Translate(snap); err != nil {
					b.Fatal(err)
				}
				i++
			}
			cpu.report(b)
		})
		b.Run(benchName(sz.services, sz.endpoints)+"/one-service-added", func(b *testing.B) {
			// A new service is new chains and clusters: the listener
			// and every cluster are hashed again, not only endpoints.
			bld := base.Builder()
			if err := bld.Put(benchService(sz.services, sz.endpoints, true)); err != nil {
				b.Fatal(err)
			}
			more := bld.Build()
			tr, err := NewGatewayTranslator(opts)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := tr.Translate(base); err != nil {
				b.Fatal(err)
			}
			i := 0
			cpu := startCPU()
			for b.Loop() {
				// Added, removed, added, …
				snap := base
				if i%2 == 0 {
					snap = more
				}
				if _, err := tr.Translate(snap); err != nil {
					b.Fatal(err)
				}
				i++
			}
			cpu.report(b)
		})
	}
}

// BenchmarkGatewaySnapshot is what follows each new translation: the
// go-control-plane snapshot and its consistency check.
func BenchmarkGatewaySnapshot(b *testing.B) {
	for _, sz := range benchSizes {
		res, err := TranslateGateway(benchCatalog(b, sz.services, sz.endpoints), GatewayOptions{FederationUpstream: benchUpstream})
		if err != nil {
			b.Fatal(err)
		}
		b.Run(benchName(sz.services, sz.endpoints), func(b *testing.B) {
			cpu := startCPU()
			for b.Loop() {
				if _, err := res.Snapshot(); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
	}
}

// BenchmarkGatewayRetained reports the heap the federator keeps for the
// gateway's configuration of a catalog: its GatewayTranslator (whose
// last result is the Resources served) and the go-control-plane
// snapshot. It is the live heap after a GC with them held, minus the
// live heap without.
func BenchmarkGatewayRetained(b *testing.B) {
	for _, sz := range benchSizes {
		snap := benchCatalog(b, sz.services, sz.endpoints)
		b.Run(benchName(sz.services, sz.endpoints), func(b *testing.B) {
			var mb float64
			for b.Loop() {
				mb = retainedMB(func() any {
					tr, err := NewGatewayTranslator(GatewayOptions{FederationUpstream: benchUpstream})
					if err != nil {
						b.Fatal(err)
					}
					res, err := tr.Translate(snap)
					if err != nil {
						b.Fatal(err)
					}
					s, err := res.Snapshot()
					if err != nil {
						b.Fatal(err)
					}
					return []any{tr, s}
				})
			}
			b.ReportMetric(mb, "retained-MB")
		})
	}
}

func retainedMB(build func() any) float64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v := build()
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(v)
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / 1e6
}
