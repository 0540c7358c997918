package xds

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
)

// BenchmarkPush is what one push costs the federator with 10,000
// services and N proxy streams over real gRPC on loopback: a readiness
// change of one service's endpoints is set (alternating with the
// catalog before it) and the op ends when every stream has received, at
// its new version, every type whose version the change moved (with one
// version for every type, all of them; with a version per type, the
// endpoints).
//
//   - role=gateway: 10,000 exported services with 10 endpoints each, of
//     which one per zone (three) of one service turns not ready; the
//     gateway's streams (CDS, EDS, LDS), translated by a
//     GatewayTranslator; cache=snapshot is go-control-plane's snapshot
//     cache, as the Server used before, cache=encoded is encodedCache,
//     the Server's now.
//   - role=sidecar: sidecarBenchCatalogs' 10,000 clusterset services
//     (local pods and two peers), of which one pod of one service turns
//     not ready; the sidecars' streams (CDS, EDS, LDS, RDS), translated
//     by a SidecarTranslator, served by encodedCache.
//
// The translators keep what did not change, as the Server's do, so the
// two snapshots share every message the change did not touch.
// allocs/op and B/op are the whole process's per push, the streams'
// clients included: they read only the responses' version, type and
// nonce (a codec that skips the resources), so what is left is nearly
// all the server's. resp-B/stream/op is the size of the responses one
// stream receives per push (the DiscoveryResponse messages; gRPC and
// HTTP/2 framing not counted), resps/stream/op how many.
func BenchmarkPush(b *testing.B) {
	gw, err := NewGatewayTranslator(GatewayOptions{FederationUpstream: benchUpstream})
	if err != nil {
		b.Fatal(err)
	}
	base := benchCatalog(b, 10000, 10)
	// One endpoint of a service a third into the catalog turns not
	// ready.
	cats := [2]*catalog.Snapshot{benchChanges(b, base, 10000, 10)[1], base}
	gateway := pushSetup(b, func(i int) Resources {
		res, err := gw.Translate(cats[i])
		if err != nil {
			b.Fatal(err)
		}
		return res
	})
	for _, kind := range []string{"snapshot", "encoded"} {
		for _, streams := range []int{1, 4, 16} {
			b.Run(fmt.Sprintf("role=gateway/cache=%s/streams=%d", kind, streams), func(b *testing.B) {
				var c cache.SnapshotCache = cache.NewSnapshotCache(true, nodeGroups{}, nil)
				if kind == "encoded" {
					c = newEncodedCache(nodeGroups{}, nil)
				}
				benchPush(b, c, gateway, streams, func(i int) *corev3.Node {
					return &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleGateway, IP: fmt.Sprintf("10.0.0.%d", i+1), Pod: fmt.Sprintf("gw-%d", i), Namespace: "isthmus-system"}.String()}
				})
			})
		}
	}

	sc, err := NewSidecarTranslator(SidecarOptions{Region: "r1"})
	if err != nil {
		b.Fatal(err)
	}
	local, peers := sidecarBenchCatalogs(b, 10000)
	// A pod of a service a third into the catalog turns not ready.
	svc, _ := local.Get(local.Keys()[10000/3])
	c := podNotReady(svc, 0)
	bld := local.Builder()
	if err := bld.Put(c); err != nil {
		b.Fatal(err)
	}
	cats = [2]*catalog.Snapshot{bld.Build(), local}
	sidecar := pushSetup(b, func(i int) Resources {
		res, _, err := sc.Translate(SidecarInput{Local: cats[i], Peers: peers})
		if err != nil {
			b.Fatal(err)
		}
		return res
	})
	for _, streams := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("role=sidecar/cache=encoded/streams=%d", streams), func(b *testing.B) {
			benchPush(b, newEncodedCache(nodeGroups{}, nil), sidecar, streams, func(i int) *corev3.Node {
				return &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleSidecar, IP: fmt.Sprintf("10.0.1.%d", i+1), Pod: fmt.Sprintf("web-%d", i), Namespace: "demo"}.String()}
			})
		})
	}
}

// pushBench is what benchPush alternates between: two snapshots, the
// types each one's push must deliver (those whose version differs from
// the other's) at their versions, and the names the streams subscribe to
// by type (nil: wildcard).
type pushBench struct {
	group string
	snaps [2]*cache.Snapshot
	want  [2]map[string]string
	names map[string][]string
	types []string
}

// pushSetup translates the two catalogs in order (translate(0), then
// translate(1), as a translator sees them) into a pushBench.
func pushSetup(b *testing.B, translate func(int) Resources) *pushBench {
	p := &pushBench{names: map[string][]string{}}
	var res [2]Resources
	for i := range res {
		res[i] = translate(i)
		var err error
		if p.snaps[i], err = res[i].Snapshot(); err != nil {
			b.Fatal(err)
		}
	}
	p.group, p.types = gatewayGroup, []string{resource.ClusterType, resource.EndpointType, resource.ListenerType}
	if len(res[1].Routes) > 0 {
		p.group, p.types = sidecarGroup, append(p.types, resource.RouteType)
		for _, rc := range res[1].Routes {
			p.names[resource.RouteType] = append(p.names[resource.RouteType], rc.GetName())
		}
	}
	for _, e := range res[1].Endpoints {
		p.names[resource.EndpointType] = append(p.names[resource.EndpointType], e.GetClusterName())
	}
	for i := range p.want {
		p.want[i] = map[string]string{}
		for _, typ := range p.types {
			if v := p.snaps[i].GetVersion(typ); v != p.snaps[1-i].GetVersion(typ) {
				p.want[i][typ] = v
			}
		}
		if len(p.want[i]) == 0 {
			b.Fatal("the two snapshots have the same versions")
		}
	}
	if !slices.Equal(slices.Sorted(maps.Keys(p.snaps[0].GetResources(resource.EndpointType))),
		slices.Sorted(maps.Keys(p.snaps[1].GetResources(resource.EndpointType)))) {
		b.Fatal("the change must keep the EDS names the streams subscribe to")
	}
	return p
}

// typedVersion is a response's type and version.
type typedVersion struct{ typ, version string }

func benchPush(b *testing.B, c cache.SnapshotCache, p *pushBench, streams int, node func(int) *corev3.Node) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 20))
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, c, nil, sotw.WithOrderedADS()))
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	defer func() {
		cancel()
		gs.Stop()
		<-served
	}()
	// Each snapshot is pushed alternately; the second one is set before
	// the streams open, so the loop's first push is a change.
	if err := c.SetSnapshot(ctx, p.group, p.snaps[1]); err != nil {
		b.Fatal(err)
	}
	got := make(chan typedVersion, len(p.types)*streams)
	clients := make(chan error, streams)
	codec := skipResources{received: &atomic.Int64{}, responses: &atomic.Int64{}}
	for i := range streams {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.ForceCodecV2(codec)))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		go func() { clients <- benchStream(ctx, conn, node(i), p.types, p.names, got) }()
	}
	// wait reads until every stream has every type of want at its
	// version.
	wait := func(want map[string]string) {
		for n := 0; n < len(want)*streams; {
			select {
			case tv := <-got:
				if v, ok := want[tv.typ]; ok && v == tv.version {
					n++
				}
			case err := <-clients:
				b.Fatalf("stream ended: %v", err)
			case <-time.After(time.Minute):
				b.Fatalf("%d of %d responses at versions %v", n, len(want)*streams, want)
			}
		}
	}
	initial := map[string]string{}
	for _, typ := range p.types {
		initial[typ] = p.snaps[1].GetVersion(typ)
	}
	wait(initial)
	cpu := startCPU()
	received, responses := codec.received.Load(), codec.responses.Load()
	i := 0
	for b.Loop() {
		if err := c.SetSnapshot(ctx, p.group, p.snaps[i%2]); err != nil {
			b.Fatal(err)
		}
		wait(p.want[i%2])
		i++
	}
	cpu.report(b)
	if b.N > 0 {
		per := float64(b.N) * float64(streams)
		b.ReportMetric(float64(codec.received.Load()-received)/per, "resp-B/stream/op")
		b.ReportMetric(float64(codec.responses.Load()-responses)/per, "resps/stream/op")
	}
}

// benchStream is a proxy's ADS stream, as pkg/xdsclient runs it: types
// in order, those names has by name and the others wildcard, each
// response ACKed. It sends the type and version of each response it
// reads to got.
func benchStream(ctx context.Context, conn *grpc.ClientConn, node *corev3.Node, types []string, names map[string][]string, got chan<- typedVersion) error {
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	for _, typ := range types {
		if err := st.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ, ResourceNames: names[typ]}); err != nil {
			return err
		}
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		select {
		case got <- typedVersion{resp.GetTypeUrl(), resp.GetVersionInfo()}:
		case <-ctx.Done():
			return nil
		}
		if err := st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), VersionInfo: resp.GetVersionInfo(),
			ResponseNonce: resp.GetNonce(), ResourceNames: names[resp.GetTypeUrl()]}); err != nil {
			return err
		}
	}
}

// skipResources is the benchmark clients' codec: requests are proto,
// and of a DiscoveryResponse only version_info, type_url and nonce are
// read, the resources skipped, so the clients cost the process little
// next to the server. It counts the responses and their bytes.
type skipResources struct {
	received, responses *atomic.Int64
}

func (skipResources) Name() string { return "proto" }

func (skipResources) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("marshal %T", v)
	}
	data, err := proto.Marshal(m)
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(data)}, nil
}

func (c skipResources) Unmarshal(data mem.BufferSlice, v any) error {
	resp, ok := v.(*discoveryv3.DiscoveryResponse)
	if !ok {
		return fmt.Errorf("unmarshal %T", v)
	}
	c.received.Add(int64(data.Len()))
	c.responses.Add(1)
	r := data.Reader()
	defer r.Close()
	for r.Remaining() > 0 {
		tag, err := binary.ReadUvarint(r)
		if err != nil {
			return err
		}
		if tag&7 != 2 {
			return fmt.Errorf("field %d: wire type %d", tag>>3, tag&7)
		}
		n, err := binary.ReadUvarint(r)
		if err != nil {
			return err
		}
		var dst *string
		switch tag >> 3 {
		case 1:
			dst = &resp.VersionInfo
		case 4:
			dst = &resp.TypeUrl
		case 5:
			dst = &resp.Nonce
		}
		if dst == nil {
			if d, err := r.Discard(int(n)); err != nil || d != int(n) {
				return errors.Join(io.ErrUnexpectedEOF, err)
			}
			continue
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(r, buf); err != nil {
			return err
		}
		*dst = string(buf)
	}
	return nil
}
