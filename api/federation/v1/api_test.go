package federationv1_test

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	federationv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
)

// The wire names are the contract with other clusters' federators, which
// may run other versions: changing them breaks peering.
func TestWireNames(t *testing.T) {
	svc := federationv1.File_federation_v1_federation_proto.Services().ByName("FederationService")
	require.NotNil(t, svc)
	require.Equal(t, "isthmus.federation.v1.FederationService", string(svc.FullName()))
	exchange := svc.Methods().ByName("Exchange")
	require.NotNil(t, exchange)
	require.True(t, exchange.IsStreamingClient() && exchange.IsStreamingServer(), "Exchange is bidirectional")
	require.Equal(t, "isthmus.federation.v1.ExchangeMessage", string(exchange.Input().FullName()))
	establish := svc.Methods().ByName("Establish")
	require.NotNil(t, establish)
	require.False(t, establish.IsStreamingClient() || establish.IsStreamingServer(), "Establish is unary")
	require.Equal(t, "isthmus.federation.v1.ExportedService", string((&federationv1.ExportedService{}).ProtoReflect().Descriptor().FullName()))
}

func TestUpdateRoundTrip(t *testing.T) {
	in := &federationv1.ExchangeMessage{Kind: &federationv1.ExchangeMessage_Update{Update: &federationv1.Update{
		TypeUrl: "isthmus.federation.v1.ExportedService", Version: "v1", Nonce: "n1",
		Resources: []*federationv1.Resource{{
			Name: "demo/echo",
			Body: &federationv1.Resource_Service{Service: &federationv1.ExportedService{
				Namespace: "demo", Name: "echo",
				Ports:     []*federationv1.ServicePort{{Name: "http", Port: 80, Protocol: "TCP", AppProtocol: "http"}},
				Endpoints: []*federationv1.LocalityEndpoints{{Region: "r1", Zone: "z1", Ready: 3}},
			}},
		}},
	}}}
	b, err := proto.Marshal(in)
	require.NoError(t, err)
	out := &federationv1.ExchangeMessage{}
	require.NoError(t, proto.Unmarshal(b, out))
	require.True(t, proto.Equal(in, out))
	require.Equal(t, uint32(3), out.GetUpdate().GetResources()[0].GetService().GetEndpoints()[0].GetReady())
}
