package federationv1_test

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

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

// The hand-written gRPC glue (service.go) must say what the proto says.
func TestServiceDescMatchesProto(t *testing.T) {
	svc := federationv1.File_federation_v1_federation_proto.Services().ByName("FederationService")
	desc := federationv1.FederationService_ServiceDesc
	require.Equal(t, string(svc.FullName()), desc.ServiceName)
	var unary, streams []string
	for _, m := range desc.Methods {
		unary = append(unary, m.MethodName)
	}
	for _, s := range desc.Streams {
		streams = append(streams, s.StreamName)
		m := svc.Methods().ByName(protoreflect.Name(s.StreamName))
		require.NotNil(t, m, s.StreamName)
		require.Equal(t, m.IsStreamingClient(), s.ClientStreams, s.StreamName)
		require.Equal(t, m.IsStreamingServer(), s.ServerStreams, s.StreamName)
	}
	var wantUnary, wantStreams []string
	for i := range svc.Methods().Len() {
		m := svc.Methods().Get(i)
		if m.IsStreamingClient() || m.IsStreamingServer() {
			wantStreams = append(wantStreams, string(m.Name()))
		} else {
			wantUnary = append(wantUnary, string(m.Name()))
		}
		require.Equal(t, "/"+string(svc.FullName())+"/"+string(m.Name()),
			map[string]string{"Establish": federationv1.FederationService_Establish_FullMethodName,
				"Exchange": federationv1.FederationService_Exchange_FullMethodName}[string(m.Name())])
	}
	require.Equal(t, wantUnary, unary)
	require.Equal(t, wantStreams, streams)
}
