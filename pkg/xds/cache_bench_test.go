package xds

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
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
)

// BenchmarkPush is what one push of the gateway's configuration costs
// the federator with 10,000 exported services (10 endpoints each) and N
// gateway streams over real gRPC on loopback: a one-service change is
// set (alternating with the catalog before it) and the op ends when
// every stream has received the new CDS, EDS and LDS. "snapshot" is
// go-control-plane's snapshot cache, as the Server used before;
// "encoded" is encodedCache, the Server's now. allocs/op and B/op are
// the whole process's per push, the streams' clients included: they
// read only the responses' version, type and nonce (a codec that skips
// the resources), so what is left is nearly all the server's.
func BenchmarkPush(b *testing.B) {
	tr, err := NewGatewayTranslator(GatewayOptions{FederationUpstream: benchUpstream})
	if err != nil {
		b.Fatal(err)
	}
	base := benchCatalog(b, 10000, 10)
	// The translator keeps what did not change, as the Server's does:
	// the two snapshots share every message but the changed service's
	// and the listener.
	var snaps [2]*cache.Snapshot
	var versions [2]string
	var edsNames []string
	for i, cat := range [2]*catalog.Snapshot{benchChanges(b, base, 10000, 10)[1], base} {
		res, err := tr.Translate(cat)
		if err != nil {
			b.Fatal(err)
		}
		if snaps[i], err = res.Snapshot(); err != nil {
			b.Fatal(err)
		}
		versions[i] = res.Version
		edsNames = edsNames[:0]
		for _, e := range res.Endpoints {
			edsNames = append(edsNames, e.GetClusterName())
		}
	}
	for _, kind := range []string{"snapshot", "encoded"} {
		for _, streams := range []int{1, 4, 16} {
			b.Run(fmt.Sprintf("cache=%s/streams=%d", kind, streams), func(b *testing.B) {
				var c cache.SnapshotCache = cache.NewSnapshotCache(true, nodeGroups{}, nil)
				if kind == "encoded" {
					c = newEncodedCache(nodeGroups{}, nil)
				}
				benchPush(b, c, snaps, versions, edsNames, streams)
			})
		}
	}
}

func benchPush(b *testing.B, c cache.SnapshotCache, snaps [2]*cache.Snapshot, versions [2]string, edsNames []string, streams int) {
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
	// Each version is pushed alternately; the first one is set before
	// the streams open, so the loop's first push is a change.
	if err := c.SetSnapshot(ctx, gatewayGroup, snaps[1]); err != nil {
		b.Fatal(err)
	}
	got := make(chan string, 3*streams)
	clients := make(chan error, streams)
	for i := range streams {
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.ForceCodecV2(skipResources{})))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		node := &corev3.Node{Id: fmt.Sprintf("%s~10.0.0.%d~gw-%d.isthmus-system~isthmus-system.svc.cluster.local", GatewayNodePrefix, i+1, i)}
		go func() { clients <- benchStream(ctx, conn, node, edsNames, got) }()
	}
	// wait reads until every stream has every type at version v.
	wait := func(v string) {
		for n := 0; n < 3*streams; {
			select {
			case gv := <-got:
				if gv == v {
					n++
				}
			case err := <-clients:
				b.Fatalf("stream ended: %v", err)
			case <-time.After(time.Minute):
				b.Fatalf("%d of %d responses at version %s", n, 3*streams, v)
			}
		}
	}
	wait(versions[1])
	cpu := startCPU()
	i := 0
	for b.Loop() {
		if err := c.SetSnapshot(ctx, gatewayGroup, snaps[i%2]); err != nil {
			b.Fatal(err)
		}
		wait(versions[i%2])
		i++
	}
	cpu.report(b)
}

// benchStream is a gateway's ADS stream, as pkg/xdsclient runs it:
// CDS and LDS wildcard, EDS naming every cluster, each response ACKed.
// It sends the version of each response it reads to got.
func benchStream(ctx context.Context, conn *grpc.ClientConn, node *corev3.Node, edsNames []string, got chan<- string) error {
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	names := map[string][]string{resource.EndpointType: edsNames}
	for _, typ := range []string{resource.ClusterType, resource.EndpointType, resource.ListenerType} {
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
		case got <- resp.GetVersionInfo():
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
// next to the server.
type skipResources struct{}

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

func (skipResources) Unmarshal(data mem.BufferSlice, v any) error {
	resp, ok := v.(*discoveryv3.DiscoveryResponse)
	if !ok {
		return fmt.Errorf("unmarshal %T", v)
	}
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
