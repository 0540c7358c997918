package xdsclient

import (
	"fmt"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// services1000 is a snapshot of 1,000 exported services: one listener
// with 1,000 chains (plus federation), 1,001 clusters, 1,000 assignments
// of 3 endpoints each.
func services1000(tb testing.TB) []*anypb.Any {
	svcs := make([]service, 1000)
	for i := range svcs {
		svcs[i] = service{name: fmt.Sprintf("svc-%04d", i), ns: "bench", port: 8080, eps: []ep{
			{ip: fmt.Sprintf("10.%d.%d.1", i/256, i%256), port: 8080, healthy: true, region: "eu", zone: "eu-a"},
			{ip: fmt.Sprintf("10.%d.%d.2", i/256, i%256), port: 8080, healthy: true, region: "eu", zone: "eu-b"},
			{ip: fmt.Sprintf("10.%d.%d.3", i/256, i%256), port: 8080, healthy: false, region: "eu", zone: "eu-c"},
		}}
	}
	return buildGateway(tb, "10.0.0.5", svcs...).anys(tb)
}

func BenchmarkDecode1000Services(b *testing.B) {
	res := services1000(b)
	size := 0
	for _, r := range res {
		size += len(r.GetValue())
	}
	cfg, err := Decode(res...)
	require.NoError(b, err)
	require.Len(b, cfg.Listeners[0].Chains, 1001)
	require.Len(b, cfg.Clusters, 1001)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(res...); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnmarshal1000Services is the floor Decode is measured against
// in the same run: proto.Unmarshal of the same resources, no validation.
func BenchmarkUnmarshal1000Services(b *testing.B) {
	res := services1000(b)
	size := 0
	for _, r := range res {
		size += len(r.GetValue())
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	for b.Loop() {
		for _, r := range res {
			var m proto.Message
			switch r.GetTypeUrl() {
			case TypeListener:
				m = new(listenerv3.Listener)
			case TypeCluster:
				m = new(clusterv3.Cluster)
			default:
				m = new(endpointv3.ClusterLoadAssignment)
			}
			if err := proto.Unmarshal(r.GetValue(), m); err != nil {
				b.Fatal(err)
			}
		}
	}
}
