package xdsclient

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	testingclock "k8s.io/utils/clock/testing"
)

func TestInitialConfigDecodedExactly(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	srv.set(t, buildGateway(t, "10.0.0.5", echo, api).snapshot(t, "v1"))
	c := startClient(t, plaintextConfig(t, srv.addr))

	got := waitReady(t, c)
	v1 := map[string]string{TypeListener: "v1", TypeCluster: "v1", TypeClusterLoadAssignment: "v1"}
	eu := func(zone string) Locality { return Locality{Region: "eu", Zone: zone} }
	want := &Config{
		Listeners: []Listener{{
			Name: "eastwest-gw",
			Addr: netip.MustParseAddr("0.0.0.0"),
			Port: 15443,
			Chains: []Chain{
				{SNIs: []string{"federation.isthmus.internal"}, Cluster: "isthmus-federation", StatPrefix: "isthmus-federation", IdleTimeout: time.Hour},
				{SNIs: []string{"outbound_.80_._.echo.demo.svc.cluster.local"}, Cluster: "outbound|80||echo.demo.svc.cluster.local", StatPrefix: "outbound|80||echo.demo.svc.cluster.local", IdleTimeout: time.Hour},
				{SNIs: []string{"outbound_.9090_._.api.shop.svc.cluster.local"}, Cluster: "outbound|9090||api.shop.svc.cluster.local", StatPrefix: "outbound|9090||api.shop.svc.cluster.local", IdleTimeout: time.Hour},
			},
		}},
		Clusters: map[string]Cluster{
			"isthmus-federation": {
				Name: "isthmus-federation", Type: Static, ConnectTimeout: time.Second,
				Endpoints: []Endpoint{{Addr: netip.MustParseAddrPort("10.0.0.5:15012"), Port: 15012, Healthy: true}},
			},
			"outbound|80||echo.demo.svc.cluster.local": {
				Name: "outbound|80||echo.demo.svc.cluster.local", Type: EDS, ServiceName: "outbound|80||echo.demo.svc.cluster.local", ConnectTimeout: time.Second,
				Endpoints: []Endpoint{
					{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Port: 8080, Healthy: true, Locality: eu("eu-a")},
					{Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Port: 8080, Healthy: true, Locality: eu("eu-a")},
					{Addr: netip.MustParseAddrPort("10.1.1.1:8080"), Port: 8080, Healthy: false, Locality: eu("eu-b")},
				},
			},
			"outbound|9090||api.shop.svc.cluster.local": {
				Name: "outbound|9090||api.shop.svc.cluster.local", Type: EDS, ServiceName: "outbound|9090||api.shop.svc.cluster.local", ConnectTimeout: time.Second,
				Endpoints: []Endpoint{{Addr: netip.MustParseAddrPort("[fd00::7]:9090"), Port: 9090, Healthy: true}},
			},
		},
		Versions: v1,
	}
	require.Equal(t, want, got)

	// The protocol as the server saw it: node first, LDS and CDS as
	// wildcards, EDS for exactly the EDS clusters (sorted), every response
	// ACKed with its version and nonce.
	srv.waitACKs(t, 0, "v1")
	reqs := srv.requests()
	first := reqs[0]
	require.Equal(t, TypeListener, first.GetTypeUrl())
	require.Equal(t, "eastwest-gw~10.0.0.9~eastwest-gw-0.isthmus-system~isthmus-system.svc.cluster.local", first.GetNode().GetId())
	require.Equal(t, "alpha", first.GetNode().GetCluster())
	require.Equal(t, "eastwest-gw", first.GetNode().GetMetadata().GetFields()["ISTHMUS_ROLE"].GetStringValue())
	require.Empty(t, first.GetResourceNames())
	require.Empty(t, first.GetVersionInfo())
	require.Equal(t, TypeCluster, reqs[1].GetTypeUrl())
	require.Empty(t, reqs[1].GetResourceNames())
	eds := srv.waitRequest(t, 0, "EDS subscription", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeClusterLoadAssignment && r.GetVersionInfo() == ""
	})
	require.Equal(t, []string{"outbound|80||echo.demo.svc.cluster.local", "outbound|9090||api.shop.svc.cluster.local"}, eds.GetResourceNames())

	st := c.Stats()
	require.EqualValues(t, 3, st.Accepted)
	require.Zero(t, st.Rejected)
	require.EqualValues(t, 1, st.Published)
	require.EqualValues(t, 1, st.Streams)
	require.True(t, st.Connected)
}

func TestUpdateSwapsAtomicallyAndSignals(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	srv.set(t, buildGateway(t, "10.0.0.5", echo).snapshot(t, "v1"))
	c := startClient(t, plaintextConfig(t, srv.addr))
	v1 := waitReady(t, c)
	waitUpdated(t, c) // the first publication's signal
	v1Copy := cloneConfig(v1)

	// Readers never see a half-applied config: every one they load is
	// consistent on its own.
	var stop atomic.Bool
	var wg sync.WaitGroup
	var seen atomic.Int64
	for range 4 {
		wg.Go(func() {
			for !stop.Load() {
				cfg := c.Current()
				requireConsistent(t, cfg)
				seen.Add(1)
			}
		})
	}

	echo2 := echo
	echo2.eps = []ep{{ip: "10.1.0.9", port: 8081, healthy: true}}
	srv.set(t, buildGateway(t, "10.0.0.5", echo2, cart).snapshot(t, "v2"))
	waitUpdated(t, c)
	eventually(t, "v2 published", func() bool {
		return c.Current().Versions[TypeListener] == "v2" && len(c.Current().Clusters) == 3 && c.Current().Versions[TypeClusterLoadAssignment] == "v2"
	})
	stop.Store(true)
	wg.Wait()
	require.Positive(t, seen.Load())

	v2 := c.Current()
	require.Len(t, v2.Listeners[0].Chains, 3)
	require.Equal(t, []Endpoint{{Addr: netip.MustParseAddrPort("10.1.0.9:8081"), Port: 8081, Healthy: true}},
		v2.Clusters[echo.cluster()].Endpoints)
	require.Equal(t, []Endpoint{{Addr: netip.MustParseAddrPort("10.2.0.1:7070"), Port: 7070, Healthy: true}},
		v2.Clusters[cart.cluster()].Endpoints)
	// The old value was replaced, not modified.
	require.Equal(t, v1Copy, v1)
	require.NotSame(t, v1, v2)
}

func TestBadResourceNACKedAndPreviousConfigStays(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	good := buildGateway(t, "10.0.0.5", echo)
	srv.set(t, good.snapshot(t, "v1"))
	c := startClient(t, plaintextConfig(t, srv.addr))
	v1 := waitReady(t, c)
	waitUpdated(t, c)
	srv.waitACKs(t, 0, "v1")

	// v2: the same clusters and endpoints, but the listener gains an HTTP
	// chain the gateway does not implement.
	bad := buildGateway(t, "10.0.0.5", echo)
	l := proto.Clone(bad.listeners[0]).(*listenerv3.Listener)
	hcm := tcpChain(t, "web.example.com", echo.cluster())
	hcm.Filters[0].Name = "envoy.filters.network.http_connection_manager"
	hcm.Filters[0].ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, &hcmv3.HttpConnectionManager{StatPrefix: "web"})}
	l.FilterChains = append(l.FilterChains, hcm)
	bad.listeners[0] = l
	mark := srv.mark()
	srv.set(t, bad.snapshot(t, "v2"))

	n := srv.waitRequest(t, mark, "NACK of the listener", nack(TypeListener))
	require.Equal(t, int32(codes.InvalidArgument), n.GetErrorDetail().GetCode())
	require.Contains(t, n.GetErrorDetail().GetMessage(), `listener "eastwest-gw": filter_chains[2].filters[0].name: unsupported network filter "envoy.filters.network.http_connection_manager"`)
	require.Equal(t, "v1", n.GetVersionInfo(), "a NACK carries the version accepted last")
	require.NotEmpty(t, n.GetResponseNonce())
	// CDS and EDS v2 are the same content: accepted, nothing republished.
	srv.waitRequest(t, mark, "ACK of CDS v2", ack(TypeCluster, "v2"))
	srv.waitRequest(t, mark, "ACK of EDS v2", ack(TypeClusterLoadAssignment, "v2"))
	require.Same(t, v1, c.Current(), "the previous config stays")
	select {
	case <-c.Updated():
		t.Fatal("Updated fired for a NACKed response")
	default:
	}
	st := c.Stats()
	require.GreaterOrEqual(t, st.Rejected, uint64(1)) // go-control-plane sends v2 again after each NACK
	require.Equal(t, n.GetErrorDetail().GetMessage(), st.LastNACK)
	require.EqualValues(t, 1, st.Published)

	// A fixed v3 is accepted.
	srv.set(t, buildGateway(t, "10.0.0.5", echo, cart).snapshot(t, "v3"))
	waitUpdated(t, c)
	// The listener follows once its deferred NACK lets the server send v3.
	eventually(t, "v3 published", func() bool { return c.Current().Versions[TypeListener] == "v3" })
	require.Len(t, c.Current().Clusters, 3)
	require.Len(t, c.Current().Listeners[0].Chains, 3)
}

func TestCheckRefusalIsNACKed(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	srv.set(t, buildGateway(t, "10.0.0.5", echo).snapshot(t, "v1"))
	cfg := plaintextConfig(t, srv.addr)
	cfg.Check = func(c *Config) error {
		if _, ok := c.Clusters[cart.cluster()]; ok {
			return errFake("the gateway refuses cart")
		}
		return nil
	}
	c := startClient(t, cfg)
	v1 := waitReady(t, c)

	mark := srv.mark()
	srv.set(t, buildGateway(t, "10.0.0.5", echo, cart).snapshot(t, "v2"))
	n := srv.waitRequest(t, mark, "NACK", func(r *discoveryv3.DiscoveryRequest) bool { return r.GetErrorDetail() != nil })
	require.Contains(t, n.GetErrorDetail().GetMessage(), "the gateway refuses cart")
	require.Same(t, v1, c.Current())
}

type errFake string

func (e errFake) Error() string { return string(e) }

func TestFederatorRestartKeepsConfigAndResubscribes(t *testing.T) {
	// The server comes back on its port. On an address of its own, no
	// connection's source port can take that port meanwhile (connections
	// to 127.0.0.0/8 come from 127.0.0.1).
	srv := startXDSServer(t, "127.0.21.1:0", nil)
	res := buildGateway(t, "10.0.0.5", echo, api)
	srv.set(t, res.snapshot(t, "v1"))
	c := startClient(t, plaintextConfig(t, srv.addr))
	v1 := waitReady(t, c)
	waitUpdated(t, c)
	srv.waitACKs(t, 0, "v1")

	// The federator goes away: the client keeps retrying and keeps v1.
	srv.stop()
	eventually(t, "two failed reconnects", func() bool { return c.Stats().Reconnects >= 2 && !c.Stats().Connected })
	require.Same(t, v1, c.Current())
	require.NotEmpty(t, c.Stats().LastError)

	// It comes back on the same address with the same configuration: the
	// client resubscribes with the versions it holds, ACKs the same
	// version again and republishes nothing.
	srv2 := startXDSServer(t, srv.addr, nil)
	srv2.set(t, res.snapshot(t, "v1"))
	lds := srv2.waitRequest(t, 0, "LDS resubscription", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeListener && r.GetResponseNonce() == ""
	})
	require.Equal(t, "v1", lds.GetVersionInfo())
	require.Equal(t, gatewayNode.ID, lds.GetNode().GetId())
	eds := srv2.waitRequest(t, 0, "EDS resubscription", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeClusterLoadAssignment && r.GetResponseNonce() == ""
	})
	require.Equal(t, "v1", eds.GetVersionInfo())
	require.Equal(t, []string{echo.cluster(), api.cluster()}, eds.GetResourceNames())
	srv2.waitACKs(t, 0, "v1")
	require.Same(t, v1, c.Current())
	select {
	case <-c.Updated():
		t.Fatal("Updated fired for an unchanged configuration")
	default:
	}
	require.EqualValues(t, 1, c.Stats().Published)
	require.EqualValues(t, 2, c.Stats().Streams)

	// And it picks up a new version from the restarted server.
	srv2.set(t, buildGateway(t, "10.0.0.5", api).snapshot(t, "v2"))
	waitUpdated(t, c)
	eventually(t, "v2 published", func() bool { return len(c.Current().Clusters) == 2 })
	_, hasEcho := c.Current().Clusters[echo.cluster()]
	require.False(t, hasEcho)
	// The EDS subscription follows CDS: echo is unsubscribed.
	srv2.waitRequest(t, 0, "EDS for api only", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeClusterLoadAssignment && len(r.GetResourceNames()) == 1 && r.GetResourceNames()[0] == api.cluster()
	})
}

func TestMissingAssignmentNotPublished(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	// CDS names echo and api, EDS has only echo's assignment.
	res := buildGateway(t, "10.0.0.5", echo, api)
	partial := res
	partial.assignments = res.assignments[:1]
	srv.set(t, partial.snapshot(t, "v1"))
	c := startClient(t, plaintextConfig(t, srv.addr))

	srv.waitACKs(t, 0, "v1")
	require.Nil(t, c.Current())
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, c.WaitReady(ctx), context.DeadlineExceeded)
	require.Zero(t, c.Stats().Published)

	srv.set(t, res.snapshot(t, "v2"))
	cfg := waitReady(t, c)
	require.Len(t, cfg.Clusters[api.cluster()].Endpoints, 1)
	require.Len(t, cfg.Clusters[echo.cluster()].Endpoints, 3)
}

func TestOversizedResponseEndsStreamKeepsConfig(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	srv.set(t, buildGateway(t, "10.0.0.5", echo).snapshot(t, "v1"))
	cfg := plaintextConfig(t, srv.addr)
	cfg.MaxRecvMsgSize = 2048
	c := startClient(t, cfg)
	v1 := waitReady(t, c)

	var many []service
	for i := range 50 {
		many = append(many, service{name: "svc" + itoa(i), ns: "big", port: 80, eps: []ep{{ip: "10.9.0.1", port: 80, healthy: true}}})
	}
	srv.set(t, buildGateway(t, "10.0.0.5", many...).snapshot(t, "v2"))
	// Watched for rather than read after: the client redials, and the
	// next attempt's error (the same, or an EOF while the server ends the
	// stream) may already be the last one.
	eventually(t, "the stream ends on the oversized response", func() bool {
		st := c.Stats()
		return st.Reconnects >= 1 && strings.Contains(st.LastError, "larger than max")
	})
	require.Same(t, v1, c.Current())
}

func TestBackoffUsesTheClock(t *testing.T) {
	// A port with nothing listening.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	require.NoError(t, lis.Close())

	fc := testingclock.NewFakeClock(time.Now())
	cfg := plaintextConfig(t, addr)
	cfg.Clock = fc
	cfg.BackoffMin, cfg.BackoffMax = time.Second, 4*time.Second
	c := startClient(t, cfg)

	// Each failed attempt waits on the clock; with equal jitter the n-th
	// wait is within [d/2, d], d = min(1s·2ⁿ, 4s).
	for i, d := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second} {
		eventually(t, "the client waits on the clock", fc.HasWaiters)
		require.EqualValues(t, i, c.Stats().Reconnects)
		require.Contains(t, c.Stats().LastError, "connection refused")
		fc.Step(d/2 - time.Millisecond)
		time.Sleep(20 * time.Millisecond) // a wrongly short timer would fire now
		require.EqualValues(t, i, c.Stats().Reconnects, "attempt %d came before its backoff", i+1)
		fc.Step(d/2 + time.Millisecond)
		eventually(t, "the next attempt", func() bool { return c.Stats().Reconnects == uint64(i+1) })
	}
	require.Nil(t, c.Current())
}

func TestBackoffDelay(t *testing.T) {
	lo := func(n int64) int64 { return 0 }
	hi := func(n int64) int64 { return n - 1 }
	for _, tc := range []struct {
		n      int
		lo, hi time.Duration
	}{
		{0, 50 * time.Millisecond, 100 * time.Millisecond},
		{1, 100 * time.Millisecond, 200 * time.Millisecond},
		{3, 400 * time.Millisecond, 800 * time.Millisecond},
		{4, 500 * time.Millisecond, time.Second},
		{100, 500 * time.Millisecond, time.Second},
	} {
		require.Equal(t, tc.lo, backoffDelay(100*time.Millisecond, time.Second, tc.n, lo), "attempt %d", tc.n)
		require.Equal(t, tc.hi, backoffDelay(100*time.Millisecond, time.Second, tc.n, hi), "attempt %d", tc.n)
	}
}

func TestRunOnceAndValidate(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	c := startClient(t, plaintextConfig(t, srv.addr))
	eventually(t, "running", func() bool { return c.running.Load() })
	require.ErrorIs(t, c.Run(t.Context()), errRunTwice)

	_, err := New(ClientConfig{
		Types:      []string{TypeSecret, TypeListener, TypeSecret, "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"},
		BackoffMin: -1,
	})
	require.Error(t, err)
	for _, want := range []string{
		`server "" is not host:port`, "neither TLS nor Plaintext", "Node.ID is empty", "BackoffMin -1ns is negative",
		`type "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret" is listed twice`,
		`type "type.googleapis.com/envoy.config.route.v3.RouteConfiguration" is not supported`,
		`type "type.googleapis.com/envoy.config.cluster.v3.Cluster" is required`,
		`type "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment" is required`,
	} {
		require.ErrorContains(t, err, want)
	}
	require.NotContains(t, err.Error(), `Listener" is required`)

	// Following SDS needs the Secret type.
	f := newTLSFixture(t)
	cfg := f.clientConfig(t, srv.addr, f.federatorID)
	cfg.TLS.FollowSDS = true
	cfg.Types = routingTypes
	_, err = New(cfg)
	require.ErrorContains(t, err, "TLS.FollowSDS needs the type "+TypeSecret)
	cfg.Types = nil
	_, err = New(cfg)
	require.NoError(t, err)
}

func cloneConfig(c *Config) *Config {
	out := &Config{Clusters: map[string]Cluster{}, Versions: map[string]string{}}
	for _, l := range c.Listeners {
		l.Chains = append([]Chain(nil), l.Chains...)
		out.Listeners = append(out.Listeners, l)
	}
	for k, v := range c.Clusters {
		v.Endpoints = append([]Endpoint(nil), v.Endpoints...)
		out.Clusters[k] = v
	}
	for k, v := range c.Versions {
		out.Versions[k] = v
	}
	return out
}

// go-control-plane's cache answers a NACK by sending the same version
// again. The client NACKs the first copy at once and each further copy
// after a growing delay, so the two do not spin; a fixed version is taken
// as soon as the deferred NACK lets the server send it.
func TestRepeatedNACKsBackOff(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	bad := buildGateway(t, "10.0.0.5", echo)
	bad.listeners[0].(*listenerv3.Listener).FilterChains[0].Filters = nil
	srv.set(t, bad.snapshot(t, "v1"))
	fc := testingclock.NewFakeClock(time.Now())
	cfg := plaintextConfig(t, srv.addr)
	cfg.Clock = fc
	cfg.BackoffMin, cfg.BackoffMax = time.Second, 4*time.Second
	c := startClient(t, cfg)

	ldsNACKs := func() int {
		n := 0
		for _, r := range srv.requests() {
			if nack(TypeListener)(r) {
				n++
			}
		}
		return n
	}
	srv.waitRequest(t, 0, "first NACK", nack(TypeListener))
	// Repeat n waits within [d/2, d], d = min(1s·2ⁿ⁻¹, 4s).
	for i, d := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		eventually(t, "the server sent v1 again and the client judged it", func() bool { return c.Stats().Rejected == uint64(i+2) })
		eventually(t, "the deferred NACK waits on the clock", fc.HasWaiters)
		require.Equal(t, i+1, ldsNACKs())
		fc.Step(d/2 - time.Millisecond)
		time.Sleep(20 * time.Millisecond) // a wrongly short delay would send now
		require.Equal(t, i+1, ldsNACKs(), "repeat %d came before its delay", i+1)
		fc.Step(d/2 + time.Millisecond)
		eventually(t, "the deferred NACK", func() bool { return ldsNACKs() == i+2 })
	}
	require.Nil(t, c.Current())

	// The federator fixes its output: the next deferred NACK opens the way.
	eventually(t, "the client waits again", fc.HasWaiters)
	srv.set(t, buildGateway(t, "10.0.0.5", echo).snapshot(t, "v2"))
	fc.Step(4 * time.Second)
	cfg2 := waitReady(t, c)
	require.Equal(t, "v2", cfg2.Versions[TypeListener])
}
