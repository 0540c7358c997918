package main

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// The in-process half of bench-federation: what the exporting federator
// does with its local catalog on every change, profiled where the
// end-to-end run only sees latency and RSS (the federator serves no
// pprof). Run with
//
//	go test -run '^$' -bench . -benchmem ./test/bench/federation/
//
// and add -cpuprofile / -memprofile to see where the time and bytes go.

// exportedServices is a local catalog shaped like bench-federation's:
// n services of one TCP port in 10 namespaces, each with endpoints ready
// endpoints (bench-federation's have none) on 3 zones.
func exportedServices(tb testing.TB, n, endpoints int) *catalog.Snapshot {
	tb.Helper()
	b := catalog.NewBuilder(catalog.LocalSource)
	for i := range n {
		if err := b.Put(service(i, endpoints, 80)); err != nil {
			tb.Fatal(err)
		}
	}
	return b.Build()
}

func service(i, endpoints int, port int32) catalog.Service {
	svc := catalog.Service{
		Namespace: syncNS(i, 10), Name: fmt.Sprintf("svc-%05d", i), Cluster: "a",
		Ports: []catalog.Port{{Name: "http", Port: port, Protocol: catalog.ProtocolTCP, AppProtocol: "http", TargetPort: 8080}},
	}
	for z := range 3 {
		le := catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r1", Zone: fmt.Sprintf("z%d", z)}}
		for j := z; j < endpoints; j += 3 {
			le.Addresses = append(le.Addresses, catalog.Address{IP: fmt.Sprintf("10.%d.%d.%d", 10+j, i/256%256, i%256), Ready: true})
			le.Ready++
		}
		if le.Ready > 0 {
			svc.Endpoints = append(svc.Endpoints, le)
		}
	}
	return svc
}

var sizes = []struct{ services, endpoints int }{{10000, 0}, {10000, 10}}

// BenchmarkLocalChange is one exported service changing among n: the
// exporter's new snapshot (copy, sort and hash of the whole catalog)
// and, since the federator serves the gateway over xDS, the gateway's
// configuration translated again by the federator's GatewayTranslator
// (the changed service anew, the others reused) and made into a
// go-control-plane snapshot. Both run on every change of the local
// catalog, whatever changed.
func BenchmarkLocalChange(b *testing.B) {
	for _, sz := range sizes {
		snap := exportedServices(b, sz.services, sz.endpoints)
		name := fmt.Sprintf("services=%d/endpoints=%d", sz.services, sz.endpoints)
		b.Run(name+"/catalog-snapshot", func(b *testing.B) {
			i := 0
			for b.Loop() {
				bld := snap.Builder()
				if err := bld.Put(service(i%sz.services, sz.endpoints, 81+int32(i%2))); err != nil {
					b.Fatal(err)
				}
				_ = bld.Build()
				i++
			}
		})
		b.Run(name+"/xds-gateway", func(b *testing.B) {
			tr, err := xds.NewGatewayTranslator(xds.GatewayOptions{FederationUpstream: "10.0.0.1:15019"})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := tr.Translate(snap); err != nil {
				b.Fatal(err)
			}
			// The changed catalogs are made beforehand: the exporter's
			// part is the catalog-snapshot case.
			var changed []*catalog.Snapshot
			for i := range 8 {
				bld := snap.Builder()
				if err := bld.Put(service(i*sz.services/8, sz.endpoints, 81)); err != nil {
					b.Fatal(err)
				}
				changed = append(changed, bld.Build())
			}
			i := 0
			for b.Loop() {
				// A changed catalog, then the base again, and so on:
				// every translation sees one service change.
				cur := snap
				if i%2 == 0 {
					cur = changed[i/2%len(changed)]
				}
				res, err := tr.Translate(cur)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := res.Snapshot(); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkRetained reports the heap that the exporting federator keeps
// for n exported services: the local catalog snapshot, and the gateway's
// GatewayTranslator (its resources, their encodings, the last result)
// with the go-control-plane snapshot. Each is measured
// as the live heap after a GC with the object held, minus the live heap
// without it.
func BenchmarkRetained(b *testing.B) {
	for _, sz := range sizes {
		name := fmt.Sprintf("services=%d/endpoints=%d", sz.services, sz.endpoints)
		b.Run(name+"/catalog-snapshot", func(b *testing.B) {
			var mb float64
			for b.Loop() {
				mb = retainedMB(func() any { return exportedServices(b, sz.services, sz.endpoints) })
			}
			b.ReportMetric(mb, "retained-MB")
		})
		b.Run(name+"/xds-gateway", func(b *testing.B) {
			snap := exportedServices(b, sz.services, sz.endpoints)
			var mb float64
			for b.Loop() {
				mb = retainedMB(func() any {
					tr, err := xds.NewGatewayTranslator(xds.GatewayOptions{FederationUpstream: "10.0.0.1:15019"})
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
