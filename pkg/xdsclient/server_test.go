package xdsclient

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/testlog"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/proto"
)

// waitFor bounds every wait in these tests: behaviour, not speed.
const waitFor = 15 * time.Second

func testLogger(t testing.TB) *slog.Logger { return testlog.New(t) }

// More services, for the client tests.
// snapshot is r as go-control-plane's cache serves it.
func (r gatewayResources) snapshot(tb testing.TB, version string) *cache.Snapshot {
	tb.Helper()
	conv := func(ms []proto.Message) []types.Resource {
		out := make([]types.Resource, len(ms))
		for i, m := range ms {
			out[i] = m
		}
		return out
	}
	snap, err := cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ListenerType: conv(r.listeners),
		resource.ClusterType:  conv(r.clusters),
		resource.EndpointType: conv(r.assignments),
	})
	require.NoError(tb, err)
	return snap
}

var (
	api = service{name: "api", ns: "shop", port: 9090, eps: []ep{
		{ip: "fd00::7", port: 9090, healthy: true},
	}}
	cart = service{name: "cart", ns: "shop", port: 7070, eps: []ep{
		{ip: "10.2.0.1", port: 7070, healthy: true},
	}}
)

// --- the go-control-plane server ---

var gatewayNode = GatewayNode("alpha", "10.0.0.9", "eastwest-gw-0", "isthmus-system")

// xdsServer is go-control-plane's own ADS server over loopback, recording
// every request it receives.
type xdsServer struct {
	cache cache.SnapshotCache
	addr  string
	gs    *grpc.Server
	done  chan struct{}

	// mu guards reqs, peers and changed.
	mu    sync.Mutex
	reqs  []*discoveryv3.DiscoveryRequest
	peers []spiffeid.ID
	// changed is closed and replaced at every new request.
	changed chan struct{}
}

// startXDSServer serves on addr ("127.0.0.1:0" for a new port) with TLS if
// tlsCfg is set, until the test ends or stop.
func startXDSServer(t *testing.T, addr string, tlsCfg *tls.Config) *xdsServer {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	s := &xdsServer{
		cache:   cache.NewSnapshotCache(true, cache.IDHash{}, nil),
		addr:    lis.Addr().String(),
		done:    make(chan struct{}),
		changed: make(chan struct{}),
	}
	cb := serverv3.CallbackFuncs{
		StreamOpenFunc: func(ctx context.Context, _ int64, _ string) error {
			if p, ok := peer.FromContext(ctx); ok {
				if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
					id, err := x509svid.IDFromCert(ti.State.PeerCertificates[0])
					if err == nil {
						s.mu.Lock()
						s.peers = append(s.peers, id)
						s.mu.Unlock()
					}
				}
			}
			return nil
		},
		StreamRequestFunc: func(_ int64, req *discoveryv3.DiscoveryRequest) error {
			s.mu.Lock()
			s.reqs = append(s.reqs, proto.Clone(req).(*discoveryv3.DiscoveryRequest))
			close(s.changed)
			s.changed = make(chan struct{})
			s.mu.Unlock()
			return nil
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	var opts []grpc.ServerOption
	if tlsCfg != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(tlsCfg)))
	}
	s.gs = grpc.NewServer(opts...)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(s.gs, serverv3.NewServer(ctx, s.cache, cb))
	go func() {
		defer close(s.done)
		defer cancel()
		_ = s.gs.Serve(lis)
	}()
	t.Cleanup(s.stop)
	return s
}

// stop kills the server as a crash would: every connection closed at once.
func (s *xdsServer) stop() {
	s.gs.Stop()
	<-s.done
}

func (s *xdsServer) set(t testing.TB, snap *cache.Snapshot) {
	t.Helper()
	require.NoError(t, s.cache.SetSnapshot(context.Background(), gatewayNode.ID, snap))
}

// mark is the number of requests seen so far, for waitRequest.
func (s *xdsServer) mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.reqs)
}

func (s *xdsServer) requests() []*discoveryv3.DiscoveryRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*discoveryv3.DiscoveryRequest(nil), s.reqs...)
}

func (s *xdsServer) peerIDs() []spiffeid.ID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]spiffeid.ID(nil), s.peers...)
}

// waitRequest returns the first request at index since or later that
// matches, failing the test if none arrives in time.
func (s *xdsServer) waitRequest(t testing.TB, since int, what string, match func(*discoveryv3.DiscoveryRequest) bool) *discoveryv3.DiscoveryRequest {
	t.Helper()
	deadline := time.After(waitFor)
	for {
		s.mu.Lock()
		for _, r := range s.reqs[min(since, len(s.reqs)):] {
			if match(r) {
				s.mu.Unlock()
				return r
			}
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("the server saw no %s in %v; requests: %v", what, waitFor, s.requests())
		}
	}
}

// ack matches an ACK of version for type typeURL.
func ack(typeURL, version string) func(*discoveryv3.DiscoveryRequest) bool {
	return func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == typeURL && r.GetVersionInfo() == version && r.GetResponseNonce() != "" && r.GetErrorDetail() == nil
	}
}

func nack(typeURL string) func(*discoveryv3.DiscoveryRequest) bool {
	return func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == typeURL && r.GetErrorDetail() != nil
	}
}

// waitACKs waits for the client to ACK version of the three routing
// types (listeners, clusters, endpoints).
func (s *xdsServer) waitACKs(t testing.TB, since int, version string) {
	t.Helper()
	for _, typ := range routingTypes {
		s.waitRequest(t, since, "ACK of "+typ+" "+version, ack(typ, version))
	}
}

// --- the client ---

func plaintextConfig(t testing.TB, addr string) ClientConfig {
	return ClientConfig{
		Server:     addr,
		Plaintext:  true,
		Node:       gatewayNode,
		BackoffMin: 10 * time.Millisecond,
		BackoffMax: 100 * time.Millisecond,
		Logger:     testLogger(t),
	}
}

// startClient runs a client until the test ends, then checks Run returned
// nil.
func startClient(t *testing.T, cfg ClientConfig) *Client {
	t.Helper()
	c, err := New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(waitFor):
			t.Error("Run did not return after its context ended")
		}
	})
	return c
}

func waitReady(t testing.TB, c *Client) *Config {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(t, c.WaitReady(ctx))
	return c.Current()
}

// waitUpdated waits for Updated to fire.
func waitUpdated(t testing.TB, c *Client) {
	t.Helper()
	select {
	case <-c.Updated():
	case <-time.After(waitFor):
		t.Fatal("Updated did not fire")
	}
}

// eventually polls cond (for state with no event to wait on).
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not true within %v: %s", waitFor, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
