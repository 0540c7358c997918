package fedtest

import (
	"net"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

func TestTokens(t *testing.T) {
	tokens := Tokens{"tok": {Namespace: "demo", ServiceAccount: "web"}}
	c, err := tokens.Authenticate(t.Context(), "tok")
	require.NoError(t, err)
	require.Equal(t, "demo/web", c.String())
	_, err = tokens.Authenticate(t.Context(), "other")
	require.ErrorIs(t, err, caserver.ErrUnauthenticated)
}

// The snapshot is the federator's translation plus the ROOTCA Secret of
// the CA's bundle; without a bundle it is refused.
func TestSidecarSnapshot(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	authority, err := StartCA(t.Context(), ln, spiffeid.RequireTrustDomainFromString("alpha.mesh"), nil)
	require.NoError(t, err)
	defer authority.Close()
	require.Contains(t, string(authority.RootsPEM()), "BEGIN CERTIFICATE")

	local, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{{
		Namespace: "demo", Name: "echo", Cluster: "alpha",
		Ports:      []catalog.Port{{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, TargetPort: 8080}},
		Endpoints:  []catalog.LocalityEndpoints{{Ready: 1, Addresses: []catalog.Address{{IP: "10.0.0.8", Ready: true}}}},
		Identities: []string{"spiffe://alpha.mesh/ns/demo/sa/echo"},
	}})
	require.NoError(t, err)
	snap, err := SidecarSnapshot(local, nil, xds.SidecarOptions{}, authority.Bundle())
	require.NoError(t, err)
	require.Contains(t, snap.GetResources(resource.SecretType), "ROOTCA")
	require.Contains(t, snap.GetResources(resource.ClusterType), "outbound|80||echo.demo.svc.clusterset.local")

	_, err = SidecarSnapshot(local, nil, xds.SidecarOptions{})
	require.ErrorContains(t, err, "no trust bundle")
}
