package xdsclient

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

var sidecarNode = SidecarNode("alpha", "10.1.0.1", "web-0", "demo")

// snapshot is r as go-control-plane's cache serves it, RDS and SDS
// included.
func (r sidecarResources) snapshot(tb testing.TB, version string) *cache.Snapshot {
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
		resource.RouteType:    conv(r.routes),
		resource.ClusterType:  conv(r.clusters),
		resource.EndpointType: conv(r.assignments),
		resource.SecretType:   conv(r.secrets),
	})
	require.NoError(tb, err)
	return snap
}

func setSidecar(t testing.TB, srv *xdsServer, snap *cache.Snapshot) {
	t.Helper()
	require.NoError(t, srv.cache.SetSnapshot(context.Background(), sidecarNode.ID, snap))
}

// A sidecar against go-control-plane's own ADS server: LDS, then RDS for
// exactly the route configurations the listeners name, CDS, EDS, SDS; a
// config published only once all of it is there; the RDS subscription
// following the listeners; a bad route configuration NACKed with its
// name and field while the last good config stays.
func TestSidecarOverADS(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	v1 := buildSidecar(t, scEcho, scDB)
	// One ROOTCA throughout: a new root would be a new config.
	build := func(svcs ...scService) sidecarResources {
		r := buildSidecar(t, svcs...)
		r.secrets = v1.secrets
		return r
	}
	setSidecar(t, srv, v1.snapshot(t, "v1"))
	cfg := plaintextConfig(t, srv.addr)
	cfg.Node = sidecarNode
	c := startClient(t, cfg)

	got := waitReady(t, c)
	requireSidecarConsistent(t, got)
	require.Equal(t, []string{"80", "explicit"}, slices.Sorted(mapKeys(got.Sidecar.Routes)))
	require.Equal(t, "outbound|80||echo.demo.svc.clusterset.local",
		got.Sidecar.Route("80").VirtualHost("echo.demo.svc.clusterset.local:80").Route("/").Cluster)
	vip, ok := got.Sidecar.LookupHost("db.shop.svc.clusterset.local")
	require.True(t, ok)
	require.Equal(t, "240.240.3.9", vip.String())
	for _, typ := range SidecarTypes() {
		require.Equal(t, "v1", got.Versions[typ], typ)
	}

	// The protocol as the server saw it: the sidecar's node, RDS for the
	// names the outbound listener uses (sorted), EDS for the EDS
	// clusters, SDS for ROOTCA, every type ACKed.
	for _, typ := range SidecarTypes() {
		srv.waitRequest(t, 0, "ACK of "+typ, ack(typ, "v1"))
	}
	reqs := srv.requests()
	require.Equal(t, sidecarNode.ID, reqs[0].GetNode().GetId())
	require.Equal(t, "sidecar", reqs[0].GetNode().GetMetadata().GetFields()["ISTHMUS_ROLE"].GetStringValue())
	rds := srv.waitRequest(t, 0, "RDS subscription", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeRouteConfiguration && r.GetVersionInfo() == ""
	})
	require.Equal(t, []string{"80", "explicit"}, rds.GetResourceNames())
	eds := srv.waitRequest(t, 0, "EDS subscription", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeClusterLoadAssignment && r.GetVersionInfo() == ""
	})
	require.Equal(t, []string{
		"outbound|5432||db.shop.svc.clusterset.local",
		"outbound|80||echo.demo.svc.clusterset.local",
		"outbound|9000||echo.demo.svc.clusterset.local",
	}, eds.GetResourceNames())

	// A new service on a new HTTP port: the listeners name route
	// configuration "9090", the client subscribes to it, and the config
	// is published only once it has arrived.
	mark := srv.mark()
	setSidecar(t, srv, build(scEcho, scDB, scGreeter).snapshot(t, "v2"))
	rds = srv.waitRequest(t, mark, "RDS resubscription", func(r *discoveryv3.DiscoveryRequest) bool {
		return r.GetTypeUrl() == TypeRouteConfiguration && slices.Contains(r.GetResourceNames(), "9090")
	})
	require.Equal(t, []string{"80", "9090", "explicit"}, rds.GetResourceNames())
	eventually(t, "greeter's port 9090 routes", func() bool {
		cur := c.Current()
		return cur.Sidecar.Route("9090") != nil
	})
	v2 := c.Current()
	requireSidecarConsistent(t, v2)
	require.Equal(t, "outbound|9090||greeter.shop.svc.clusterset.local",
		v2.Sidecar.Route("9090").VirtualHost("greeter.shop.svc.clusterset.local:9090").Route("/").Cluster)
	for _, typ := range SidecarTypes() {
		srv.waitRequest(t, mark, "ACK of "+typ+" v2", ack(typ, "v2"))
	}

	// A route configuration outside the contract is NACKed, naming it and
	// the field; the v2 config stays.
	bad := build(scEcho, scDB, scGreeter)
	for _, m := range bad.routes {
		if rc := m.(*routev3.RouteConfiguration); rc.GetName() == "9090" {
			rc.VirtualHosts[0].Domains[0] = "*.shop.svc.clusterset.local"
		}
	}
	mark = srv.mark()
	setSidecar(t, srv, bad.snapshot(t, "v3"))
	n := srv.waitRequest(t, mark, "RDS NACK", nack(TypeRouteConfiguration))
	require.Equal(t, "v2", n.GetVersionInfo())
	require.Equal(t, `route_configuration "9090": virtual_hosts[0].domains[0]: "*.shop.svc.clusterset.local": wildcard domains are not supported (only "*" alone)`,
		n.GetErrorDetail().GetMessage())
	// The types whose v3 is the same as v2 are accepted, but nothing
	// new is published: the routes v3 would change were refused.
	for _, typ := range []string{TypeListener, TypeCluster, TypeClusterLoadAssignment, TypeSecret} {
		srv.waitRequest(t, mark, "ACK of "+typ+" v3", ack(typ, "v3"))
	}
	require.Same(t, v2, c.Current())
	require.True(t, strings.HasPrefix(c.Stats().LastNACK, `route_configuration "9090"`))

	// Fixed: published again.
	setSidecar(t, srv, build(scEcho, scGreeter).snapshot(t, "v4"))
	eventually(t, "db gone", func() bool {
		_, ok := c.Current().Sidecar.LookupHost("db.shop.svc.clusterset.local")
		return !ok
	})
	requireSidecarConsistent(t, c.Current())
	// The routes of v4 are v2's: accepted (the NACK is over) without a
	// new config of their own.
	srv.waitRequest(t, mark, "ACK of RDS v4", ack(TypeRouteConfiguration, "v4"))
	eventually(t, "RDS v4 in the stats", func() bool { return c.Stats().Versions[TypeRouteConfiguration] == "v4" })
}

// A route configuration that names a cluster CDS has not sent yet is not
// an error: the client waits, and publishes once the cluster arrives.
func TestSidecarWaitsForRoutedClusters(t *testing.T) {
	srv := startXDSServer(t, "127.0.0.1:0", nil)
	r := buildSidecar(t, scEcho, scGreeter)
	partial := r
	partial.clusters = slices.DeleteFunc(slices.Clone(r.clusters), func(m proto.Message) bool {
		return strings.Contains(m.(interface{ GetName() string }).GetName(), "greeter")
	})
	partial.assignments = slices.DeleteFunc(slices.Clone(r.assignments), func(m proto.Message) bool {
		return strings.Contains(m.(interface{ GetClusterName() string }).GetClusterName(), "greeter")
	})
	setSidecar(t, srv, partial.snapshot(t, "v1"))
	cfg := plaintextConfig(t, srv.addr)
	cfg.Node = sidecarNode
	c := startClient(t, cfg)
	for _, typ := range SidecarTypes() {
		srv.waitRequest(t, 0, "ACK of "+typ, ack(typ, "v1"))
	}
	require.Nil(t, c.Current(), "routes name clusters that are not there")
	require.Zero(t, c.Stats().Rejected)

	setSidecar(t, srv, r.snapshot(t, "v2"))
	got := waitReady(t, c)
	requireSidecarConsistent(t, got)
	require.Contains(t, got.Clusters, "outbound|9090||greeter.shop.svc.clusterset.local")
	select {
	case <-c.Updated():
	case <-time.After(waitFor):
		t.Fatal("Updated did not fire")
	}
}
