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
	require.Equal(t, "isthmus.federation.v1.FederationService", federationv1.FederationService_ServiceDesc.ServiceName)
	require.Equal(t, "/isthmus.federation.v1.FederationService/Exchange", federationv1.FederationService_Exchange_FullMethodName)
	require.Equal(t, "/isthmus.federation.v1.FederationService/Establish", federationv1.FederationService_Establish_FullMethodName)
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
