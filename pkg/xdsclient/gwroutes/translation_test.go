package gwroutes

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// What the federator translates for the gateway (docs/gateway-xds.md),
// the client decodes and this package routes, as cmd/eastwest-gw wires
// them: every cluster's healthy_panic_threshold 0% is accepted, and the
// unready pod stays known but unhealthy, so it is never picked.
func TestRoutesOfTheTranslation(t *testing.T) {
	svc := catalog.Service{
		Namespace: "demo", Name: "echo", Cluster: "a",
		Ports: []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1, NotReady: 1,
			Addresses: []catalog.Address{{IP: "10.1.0.1", Ready: true}, {IP: "10.1.0.2", Ready: false}}}},
	}
	snap, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{svc})
	require.NoError(t, err)
	r, err := xds.TranslateGateway(snap, xds.GatewayOptions{FederationUpstream: "10.96.0.19:15019"})
	require.NoError(t, err)

	var anys []*anypb.Any
	add := func(m proto.Message) {
		a, err := anypb.New(m)
		require.NoError(t, err)
		anys = append(anys, a)
	}
	for _, l := range r.Listeners {
		add(l)
	}
	require.Len(t, r.Clusters, 2, "echo's port and the federation")
	for _, c := range r.Clusters {
		pt := c.GetCommonLbConfig().GetHealthyPanicThreshold()
		require.NotNil(t, pt, "cluster %s: no healthy_panic_threshold: Envoy's 50%% default would route to unhealthy endpoints", c.GetName())
		require.Zero(t, pt.GetValue(), "cluster %s", c.GetName())
		add(c)
	}
	for _, e := range r.Endpoints {
		add(e)
	}
	cfg, err := xdsclient.Decode(anys...)
	require.NoError(t, err)
	require.NoError(t, Check(cfg))
	routes, err := Routes(cfg)
	require.NoError(t, err)
	rt, ok := routes.Route(xds.ServiceSNI("demo", "echo", 80))
	require.True(t, ok)
	require.Equal(t, []gateway.Endpoint{
		{Addr: netip.MustParseAddrPort("10.1.0.1:8080"), Healthy: true},
		{Addr: netip.MustParseAddrPort("10.1.0.2:8080"), Healthy: false},
	}, rt.Endpoints)
}
