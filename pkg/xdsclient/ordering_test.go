package xdsclient

import (
	"net"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// scriptedServer is an ADS server whose responses the test writes by
// hand, in orders go-control-plane's cache never produces (an assignment
// before its cluster, a listener before its clusters). Real gRPC over
// loopback all the same.
type scriptedServer struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	addr    string
	streams chan *scriptedStream
}

type scriptedStream struct {
	s    discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesServer
	reqs chan *discoveryv3.DiscoveryRequest
	done chan struct{}
}

func startScriptedServer(t *testing.T) *scriptedServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &scriptedServer{addr: lis.Addr().String(), streams: make(chan *scriptedStream, 4)}
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, srv)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = gs.Serve(lis)
	}()
	t.Cleanup(func() {
		gs.Stop()
		<-served
	})
	return srv
}

func (srv *scriptedServer) StreamAggregatedResources(s discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	st := &scriptedStream{s: s, reqs: make(chan *discoveryv3.DiscoveryRequest, 64), done: make(chan struct{})}
	srv.streams <- st
	defer close(st.done)
	for {
		req, err := s.Recv()
		if err != nil {
			return nil
		}
		st.reqs <- req
	}
}

func (srv *scriptedServer) accept(t testing.TB) *scriptedStream {
	t.Helper()
	select {
	case st := <-srv.streams:
		return st
	case <-time.After(waitFor):
		t.Fatal("no stream")
		return nil
	}
}

func (st *scriptedStream) recv(t testing.TB) *discoveryv3.DiscoveryRequest {
	t.Helper()
	select {
	case r := <-st.reqs:
		return r
	case <-time.After(waitFor):
		t.Fatal("no request")
		return nil
	}
}

// noRequest checks that the client sent nothing more (it answers every
// response before reading the next, so a later response's answer proves
// the absence of an earlier one's).
func (st *scriptedStream) noRequest(t testing.TB) {
	t.Helper()
	select {
	case r := <-st.reqs:
		t.Fatalf("unexpected request %v", r)
	default:
	}
}

func (st *scriptedStream) send(t testing.TB, typeURL, version, nonce string, ms ...proto.Message) {
	t.Helper()
	resp := &discoveryv3.DiscoveryResponse{TypeUrl: typeURL, VersionInfo: version, Nonce: nonce}
	for _, m := range ms {
		resp.Resources = append(resp.Resources, mustAny(t, m))
	}
	require.NoError(t, st.s.Send(resp))
}

func requireRequest(t testing.TB, r *discoveryv3.DiscoveryRequest, typeURL, version, nonce string, names ...string) {
	t.Helper()
	require.Equal(t, typeURL, r.GetTypeUrl(), "request %v", r)
	require.Equal(t, version, r.GetVersionInfo(), "request %v", r)
	require.Equal(t, nonce, r.GetResponseNonce(), "request %v", r)
	require.Equal(t, names, r.GetResourceNames(), "request %v", r)
	require.Nil(t, r.GetErrorDetail(), "request %v", r)
}

// An assignment before its cluster, a listener before its clusters, a
// cluster before its assignment: nothing is published until every piece
// is there, and then at once.
func TestPublishedOnlyWhenConsistent(t *testing.T) {
	srv := startScriptedServer(t)
	c := startClient(t, plaintextConfig(t, srv.addr))
	st := srv.accept(t)

	lds := st.recv(t)
	requireRequest(t, lds, TypeListener, "", "")
	require.Equal(t, gatewayNode.ID, lds.GetNode().GetId())
	cds := st.recv(t)
	requireRequest(t, cds, TypeCluster, "", "")
	require.Nil(t, cds.GetNode(), "the node goes in the stream's first request only")
	// EDS has no names to ask for yet; SDS asks for ROOTCA by name.
	requireRequest(t, st.recv(t), TypeSecret, "", "", RootCASecretName)

	a, b := echo, api
	// An assignment nobody asked for yet: ignored, not even answered.
	st.send(t, TypeClusterLoadAssignment, "e0", "n1", assignment(b.cluster(), b.eps...))
	// A listener whose chains name clusters CDS has not sent.
	st.send(t, TypeListener, "l1", "n2", gatewayListener(t, tcpChain(t, a.sni(), a.cluster()), tcpChain(t, b.sni(), b.cluster())))
	requireRequest(t, st.recv(t), TypeListener, "l1", "n2")
	st.noRequest(t)
	require.Nil(t, c.Current())

	// CDS with only a: the EDS subscription starts, b's chain still has
	// no cluster.
	st.send(t, TypeCluster, "c1", "n3", edsCluster(a.cluster()))
	requireRequest(t, st.recv(t), TypeCluster, "c1", "n3")
	requireRequest(t, st.recv(t), TypeClusterLoadAssignment, "", "", a.cluster())
	require.Nil(t, c.Current())

	// CDS with both: the EDS subscription grows (sorted names).
	st.send(t, TypeCluster, "c2", "n4", edsCluster(a.cluster()), edsCluster(b.cluster()))
	requireRequest(t, st.recv(t), TypeCluster, "c2", "n4")
	requireRequest(t, st.recv(t), TypeClusterLoadAssignment, "", "", a.cluster(), b.cluster())
	require.Nil(t, c.Current(), "b's assignment came before it was asked for, and was dropped")

	// a's assignment: b's is still missing.
	st.send(t, TypeClusterLoadAssignment, "e1", "n5", assignment(a.cluster(), a.eps...))
	requireRequest(t, st.recv(t), TypeClusterLoadAssignment, "e1", "n5", a.cluster(), b.cluster())
	require.Nil(t, c.Current())

	// b's alone: an EDS response updates what it carries and keeps the
	// rest, so now everything is there.
	st.send(t, TypeClusterLoadAssignment, "e2", "n6", assignment(b.cluster(), b.eps...))
	requireRequest(t, st.recv(t), TypeClusterLoadAssignment, "e2", "n6", a.cluster(), b.cluster())
	cfg := c.Current()
	require.NotNil(t, cfg)
	require.Len(t, cfg.Clusters[a.cluster()].Endpoints, 3)
	require.Len(t, cfg.Clusters[b.cluster()].Endpoints, 1)
	require.Equal(t, map[string]string{TypeListener: "l1", TypeCluster: "c2", TypeClusterLoadAssignment: "e2"}, cfg.Versions)

	// CDS drops a: a's assignment is forgotten, EDS narrows with the last
	// EDS nonce, and the listener still names a, so the last good config
	// stays.
	st.send(t, TypeCluster, "c3", "n7", edsCluster(b.cluster()))
	requireRequest(t, st.recv(t), TypeCluster, "c3", "n7")
	requireRequest(t, st.recv(t), TypeClusterLoadAssignment, "e2", "n6", b.cluster())
	require.Same(t, cfg, c.Current())

	// The listener follows: consistent again, published.
	st.send(t, TypeListener, "l2", "n8", gatewayListener(t, tcpChain(t, b.sni(), b.cluster())))
	requireRequest(t, st.recv(t), TypeListener, "l2", "n8")
	cfg2 := c.Current()
	require.NotSame(t, cfg, cfg2)
	require.Len(t, cfg2.Clusters, 1)
	require.Contains(t, cfg2.Clusters, b.cluster())

	// A bad EDS response: NACKed with the version accepted last, and the
	// subscription it answers.
	bad := assignment(b.cluster(), ep{ip: "not-an-ip", port: 80})
	st.send(t, TypeClusterLoadAssignment, "e3", "n9", bad)
	n := st.recv(t)
	require.Equal(t, "e2", n.GetVersionInfo())
	require.Equal(t, "n9", n.GetResponseNonce())
	require.Equal(t, []string{b.cluster()}, n.GetResourceNames())
	require.Equal(t, `cluster_load_assignment "outbound|9090||api.shop.svc.cluster.local": endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: "not-an-ip" is not an IP address`,
		n.GetErrorDetail().GetMessage())
	require.Same(t, cfg2, c.Current())

	// A response of a type never subscribed is ignored.
	require.NoError(t, st.s.Send(&discoveryv3.DiscoveryResponse{
		TypeUrl: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", VersionInfo: "r1", Nonce: "n10", Resources: []*anypb.Any{},
	}))
	st.send(t, TypeListener, "l2", "n11", gatewayListener(t, tcpChain(t, b.sni(), b.cluster())))
	requireRequest(t, st.recv(t), TypeListener, "l2", "n11")
	st.noRequest(t)
}
