package xdsclient

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
)

// tlsFixture is a cluster CA with the federator's and the gateway's SVIDs.
type tlsFixture struct {
	ca                 *ca.CA
	federator, gateway *ca.SelfSource
	federatorID, gwID  spiffeid.ID
	td                 spiffeid.TrustDomain
}

func newTLSFixture(t *testing.T) *tlsFixture {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("alpha.mesh")
	authority, err := ca.New(t.Context(), fake.NewClientset(), ca.Options{TrustDomain: td, Namespace: "isthmus-system"})
	require.NoError(t, err)
	f := &tlsFixture{
		ca:          authority,
		td:          td,
		federatorID: spiffeid.RequireFromPath(td, "/ns/isthmus-system/sa/isthmus-federator"),
		gwID:        spiffeid.RequireFromPath(td, "/ns/isthmus-system/sa/eastwest-gw"),
	}
	f.federator, err = ca.NewSelfSource(authority.Authority, f.federatorID, nil)
	require.NoError(t, err)
	f.gateway, err = ca.NewSelfSource(authority.Authority, f.gwID, nil)
	require.NoError(t, err)
	return f
}

func (f *tlsFixture) server(t *testing.T) *xdsServer {
	return startXDSServer(t, "127.0.0.1:0", tlsconfig.MTLSServerConfig(f.federator, f.ca.Bundle(), tlsconfig.AuthorizeMemberOf(f.td)))
}

func (f *tlsFixture) clientConfig(t *testing.T, addr string, serverID spiffeid.ID) ClientConfig {
	cfg := plaintextConfig(t, addr)
	cfg.Plaintext = false
	cfg.TLS = &TLSConfig{SVID: f.gateway, Bundle: f.ca.Bundle(), Authorizer: tlsconfig.AuthorizeID(serverID)}
	return cfg
}

func TestMutualTLSWithSPIFFEIDs(t *testing.T) {
	f := newTLSFixture(t)
	srv := f.server(t)
	srv.set(t, buildGateway(t, "10.0.0.5", echo).snapshot(t, "v1"))
	c := startClient(t, f.clientConfig(t, srv.addr, f.federatorID))

	cfg := waitReady(t, c)
	require.Contains(t, cfg.Clusters, echo.cluster())
	// The federator saw the gateway's SPIFFE ID.
	require.Equal(t, []spiffeid.ID{f.gwID}, srv.peerIDs())
}

func TestWrongServerIDRefused(t *testing.T) {
	f := newTLSFixture(t)
	srv := f.server(t)
	srv.set(t, buildGateway(t, "10.0.0.5", echo).snapshot(t, "v1"))
	// The client expects another identity than the federator's.
	impostor := spiffeid.RequireFromPath(f.td, "/ns/isthmus-system/sa/someone-else")
	c := startClient(t, f.clientConfig(t, srv.addr, impostor))

	eventually(t, "two refused attempts", func() bool { return c.Stats().Reconnects >= 2 })
	require.Contains(t, c.Stats().LastError, `authentication handshake failed: unexpected ID`)
	require.Contains(t, c.Stats().LastError, `spiffe://alpha.mesh/ns/isthmus-system/sa/isthmus-federator`)
	require.Nil(t, c.Current())
	require.Empty(t, srv.requests(), "no request may reach a server the client does not trust")
	require.Zero(t, c.Stats().Streams)
}
