package xdsclient

import (
	"fmt"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// What one state-of-the-world response costs the client once it holds
// 10,000 services: the whole of session.handle (decode, validate,
// assemble, compare, publish, ACK, resubscribe), over a stream that
// sends nowhere. Each iteration alternates between two responses that
// differ in one resource, so every one of them is a change.

// nullStream is an ADS stream whose sends go nowhere; only Send is used.
type nullStream struct {
	grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	sent   int
	nonces int
}

func (s *nullStream) Send(*discoveryv3.DiscoveryRequest) error {
	s.sent++
	return nil
}

// offlineSession is a client and a session of it over a nullStream,
// subscribed as after the stream opened.
func offlineSession(tb testing.TB, node Node) *session {
	tb.Helper()
	c, err := New(ClientConfig{Server: "127.0.0.1:15010", Plaintext: true, Node: node})
	require.NoError(tb, err)
	s := &session{
		c: c, stream: &nullStream{},
		nonce: map[string]string{}, names: map[string][]string{},
		rejected: map[string]rejection{}, deferred: map[string]deferredNACK{},
	}
	require.NoError(tb, s.subscribe())
	return s
}

// respond hands s a response of type t with resources, as the reader
// goroutine would, and fails if it is NACKed.
func (s *session) respond(tb testing.TB, t, version string, resources []*anypb.Any) {
	ns := s.stream.(*nullStream)
	ns.nonces++
	err := s.handle(&discoveryv3.DiscoveryResponse{
		TypeUrl: t, VersionInfo: version, Resources: resources, Nonce: itoa(ns.nonces),
	})
	if err != nil {
		tb.Fatal(err)
	}
	if s.c.stats.rejected.Load() > 0 {
		tb.Fatalf("%s response %s NACKed: %s", t, version, s.c.Stats().LastNACK)
	}
}

// responses are a snapshot's resources by type, for state-of-the-world
// responses.
type responses map[string][]*anypb.Any

// byType sorts res by type, each marshaled as go-control-plane's cache
// marshals resources (cache.MarshalResource): deterministically, so
// that a resource that did not change has the same bytes in every
// snapshot, maps (cluster metadata, typed_extension_protocol_options)
// included.
func byType(tb testing.TB, res []*anypb.Any) responses {
	out := responses{}
	for _, r := range res {
		out[r.GetTypeUrl()] = append(out[r.GetTypeUrl()], deterministicAny(tb, anyMessage(tb, r)))
	}
	return out
}

func deterministicAny(tb testing.TB, m proto.Message) *anypb.Any {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	require.NoError(tb, err)
	return &anypb.Any{TypeUrl: "type.googleapis.com/" + string(m.ProtoReflect().Descriptor().FullName()), Value: b}
}

// with is r with the resource at index i of type t replaced by m.
func (r responses) with(tb testing.TB, t string, i int, m proto.Message) responses {
	out := responses{}
	for k, v := range r {
		out[k] = v
	}
	out[t] = slices.Clone(r[t])
	out[t][i] = deterministicAny(tb, m)
	return out
}

// changeOne is a change of one resource of a type: the index of the
// resource and the mutation.
type changeOne struct {
	typ    string
	index  int
	mutate func(m proto.Message)
}

// benchOneChange accepts base in order, then alternates each change's
// type between base and base with that one resource changed.
func benchOneChange(b *testing.B, node Node, order []string, base responses, changes []changeOne) {
	for _, ch := range changes {
		b.Run(shortType(ch.typ), func(b *testing.B) {
			s := offlineSession(b, node)
			for _, t := range order {
				s.respond(b, t, "base", base[t])
			}
			require.NotNil(b, s.c.Current(), "the base snapshot is consistent")
			m := anyMessage(b, base[ch.typ][ch.index])
			ch.mutate(m)
			changed := base.with(b, ch.typ, ch.index, m)
			published := s.c.stats.published.Load()
			size := 0
			for _, r := range base[ch.typ] {
				size += len(r.GetValue())
			}
			b.SetBytes(int64(size))
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if i%2 == 0 {
					s.respond(b, ch.typ, "changed", changed[ch.typ])
				} else {
					s.respond(b, ch.typ, "base", base[ch.typ])
				}
				i++
			}
			b.StopTimer()
			require.Equal(b, published+uint64(i), s.c.stats.published.Load(), "every response published a new config")
		})
	}
}

// benchExport alternates between base and base with one more service,
// each a sequence of responses in order, as a federator sends them when
// a service is exported and unexported.
func benchExport(b *testing.B, node Node, order []string, base, exported responses) {
	b.Run("export", func(b *testing.B) {
		s := offlineSession(b, node)
		for _, t := range order {
			s.respond(b, t, "base", base[t])
		}
		require.NotNil(b, s.c.Current())
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			next, v := exported, "exported"
			if i%2 == 1 {
				next, v = base, "base"
			}
			for _, t := range order {
				s.respond(b, t, v, next[t])
			}
			i++
		}
		b.StopTimer()
		want := "base"
		if i%2 == 1 {
			want = "exported"
		}
		require.Equal(b, want, s.c.Current().Versions[TypeCluster])
	})
}

func anyMessage(tb testing.TB, a *anypb.Any) proto.Message {
	m, err := a.UnmarshalNew()
	require.NoError(tb, err)
	return m
}

func shortType(t string) string {
	switch t {
	case TypeListener:
		return "LDS"
	case TypeRouteConfiguration:
		return "RDS"
	case TypeCluster:
		return "CDS"
	case TypeClusterLoadAssignment:
		return "EDS"
	case TypeSecret:
		return "SDS"
	}
	return t
}

// gatewayServices are n exported services as services1000 makes them.
func gatewayServices(n int) []service {
	svcs := make([]service, n)
	for i := range svcs {
		svcs[i] = service{name: fmt.Sprintf("svc-%05d", i), ns: "bench", port: 8080, eps: []ep{
			{ip: fmt.Sprintf("10.%d.%d.1", i/256, i%256), port: 8080, healthy: true, region: "eu", zone: "eu-a"},
			{ip: fmt.Sprintf("10.%d.%d.2", i/256, i%256), port: 8080, healthy: true, region: "eu", zone: "eu-b"},
			{ip: fmt.Sprintf("10.%d.%d.3", i/256, i%256), port: 8080, healthy: false, region: "eu", zone: "eu-c"},
		}}
	}
	return svcs
}

// BenchmarkApplyOneChangeGateway: the gateway holds 10,000 exported
// services; a response changes one cluster (CDS), one assignment (EDS)
// or one filter chain of the one listener (LDS, which resends that
// whole listener); "export" is the LDS, CDS and EDS responses that
// export a 10,001st service, alternating with those that unexport it.
func BenchmarkApplyOneChangeGateway(b *testing.B) {
	svcs := gatewayServices(10000)
	base := byType(b, buildGateway(b, "10.0.0.5", svcs...).anys(b))
	const k = 5000 // the resource changed: a service's, mid-list
	order := []string{TypeListener, TypeCluster, TypeClusterLoadAssignment}
	benchOneChange(b, gatewayNode, order, base, []changeOne{
		{TypeListener, 0, func(m proto.Message) {
			fc := m.(*listenerv3.Listener).FilterChains[k]
			tp := new(tcpproxyv3.TcpProxy)
			require.NoError(b, fc.Filters[0].GetTypedConfig().UnmarshalTo(tp))
			tp.IdleTimeout = durationpb.New(2 * time.Hour)
			fc.Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(b, tp)}
		}},
		{TypeCluster, k, func(m proto.Message) { m.(*clusterv3.Cluster).ConnectTimeout = durationpb.New(2 * time.Second) }},
		{TypeClusterLoadAssignment, k, func(m proto.Message) {
			m.(*endpointv3.ClusterLoadAssignment).Endpoints[0].LbEndpoints[0].HealthStatus = corev3.HealthStatus_UNHEALTHY
		}},
	})
	extra := service{name: "new-export", ns: "bench", port: 8080, eps: []ep{{ip: "10.250.0.1", port: 8080, healthy: true}}}
	exported := byType(b, buildGateway(b, "10.0.0.5", append(slices.Clone(svcs), extra)...).anys(b))
	benchExport(b, gatewayNode, order, base, exported)
}

// BenchmarkApplyOneChangeSidecar: a sidecar holds 10,000 clusterset
// services (services10k: 20,002 clusters and assignments, 10,100
// outbound chains, route configurations "80" and "explicit" of 10,000
// virtual hosts each); a response changes one cluster (CDS), one
// assignment (EDS), one TCP chain of the outbound listener (LDS, which
// resends both listeners) or one virtual host of route configuration
// "80" (RDS, which resends both route configurations); "export" adds a
// 10,001st service (CDS, EDS, LDS, RDS) and removes it again.
func BenchmarkApplyOneChangeSidecar(b *testing.B) {
	svcs := services10k(b)
	base := byType(b, buildSidecar(b, svcs...).anys(b))
	const k = 5000
	order := []string{TypeCluster, TypeClusterLoadAssignment, TypeListener, TypeRouteConfiguration, TypeSecret}
	benchOneChange(b, sidecarNode, order, base, []changeOne{
		{TypeListener, 0, func(m proto.Message) {
			l := m.(*listenerv3.Listener)
			require.Equal(b, OutboundListenerName, l.Name)
			fc := l.FilterChains[1+k] // chain 0 is port 80's; then one TCP chain per service
			require.Equal(b, "envoy.filters.network.tcp_proxy", fc.Filters[0].Name)
			tp := new(tcpproxyv3.TcpProxy)
			require.NoError(b, fc.Filters[0].GetTypedConfig().UnmarshalTo(tp))
			tp.IdleTimeout = durationpb.New(2 * time.Hour)
			fc.Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(b, tp)}
		}},
		{TypeRouteConfiguration, 0, func(m proto.Message) {
			rc := m.(*routev3.RouteConfiguration)
			require.Equal(b, "80", rc.Name)
			rc.VirtualHosts[k].Routes[0].GetRoute().Timeout = durationpb.New(5 * time.Second)
		}},
		{TypeCluster, 2 + k, func(m proto.Message) { m.(*clusterv3.Cluster).ConnectTimeout = durationpb.New(2 * time.Second) }},
		{TypeClusterLoadAssignment, k, func(m proto.Message) {
			m.(*endpointv3.ClusterLoadAssignment).Endpoints[0].LbEndpoints[0].HealthStatus = corev3.HealthStatus_UNHEALTHY
		}},
	})
	extra := svcs[0]
	extra.name, extra.vip = "new-export", "240.241.0.1"
	extra.ids = []string{"spiffe://alpha.mesh/ns/bench/sa/new-export"}
	exported := byType(b, buildSidecar(b, append(slices.Clone(svcs), extra)...).anys(b))
	benchExport(b, sidecarNode, order, base, exported)
}

// BenchmarkUnmarshalResponseSidecar10k is the floor under every response
// above, measured in the same run: the CDS response of services10k
// (20,002 Anys) as gRPC hands it to the codec, in 16 KiB chunks, read by
// gRPC's proto codec and by the client's (codec.go).
func BenchmarkUnmarshalResponseSidecar10k(b *testing.B) {
	base := byType(b, buildSidecar(b, services10k(b)...).anys(b))
	data, err := proto.Marshal(&discoveryv3.DiscoveryResponse{TypeUrl: TypeCluster, VersionInfo: "v1", Resources: base[TypeCluster], Nonce: "1"})
	require.NoError(b, err)
	var chunks mem.BufferSlice
	for rest := data; len(rest) > 0; {
		n := min(len(rest), 16<<10)
		chunks = append(chunks, mem.SliceBuffer(rest[:n]))
		rest = rest[n:]
	}
	for _, codec := range []encoding.CodecV2{encoding.GetCodecV2(encproto.Name), newResponseCodec()} {
		name := "proto"
		if _, ours := codec.(responseCodec); ours {
			name = "client"
		}
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				var resp discoveryv3.DiscoveryResponse
				if err := codec.Unmarshal(chunks, &resp); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
