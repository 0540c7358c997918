// The gRPC glue of FederationService, written here rather than generated:
// protoc-gen-go-grpc always adds an "Unimplemented" server whose methods
// answer "not implemented", and pkg/federation implements every method
// itself. The method names and stream shapes are those of
// federation.proto; TestServiceDescMatchesProto checks they agree.

package federationv1

import (
	context "context"

	grpc "google.golang.org/grpc"
)

const (
	FederationService_Establish_FullMethodName = "/isthmus.federation.v1.FederationService/Establish"
	FederationService_Exchange_FullMethodName  = "/isthmus.federation.v1.FederationService/Exchange"
)

// FederationServiceClient is the client API for FederationService service.
//
// For semantics around ctx use and closing/ending streaming RPCs, please refer to https://pkg.go.dev/google.golang.org/grpc/?tab=doc#ClientConn.NewStream.
type FederationServiceClient interface {
	// Establish spends a one-time peering secret and records the joiner as a
	// peer of the acceptor. It is the only call made without a client
	// certificate the acceptor already trusts.
	Establish(ctx context.Context, in *EstablishRequest, opts ...grpc.CallOption) (*EstablishResponse, error)
	// Exchange is the one long-lived bidirectional stream between two peered
	// federators: exported services, trust bundles, heartbeats, terminate.
	Exchange(ctx context.Context, opts ...grpc.CallOption) (grpc.BidiStreamingClient[ExchangeMessage, ExchangeMessage], error)
}

type federationServiceClient struct {
	cc grpc.ClientConnInterface
}

func NewFederationServiceClient(cc grpc.ClientConnInterface) FederationServiceClient {
	return &federationServiceClient{cc}
}

func (c *federationServiceClient) Establish(ctx context.Context, in *EstablishRequest, opts ...grpc.CallOption) (*EstablishResponse, error) {
	cOpts := append([]grpc.CallOption{grpc.StaticMethod()}, opts...)
	out := new(EstablishResponse)
	err := c.cc.Invoke(ctx, FederationService_Establish_FullMethodName, in, out, cOpts...)
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (c *federationServiceClient) Exchange(ctx context.Context, opts ...grpc.CallOption) (grpc.BidiStreamingClient[ExchangeMessage, ExchangeMessage], error) {
	cOpts := append([]grpc.CallOption{grpc.StaticMethod()}, opts...)
	stream, err := c.cc.NewStream(ctx, &FederationService_ServiceDesc.Streams[0], FederationService_Exchange_FullMethodName, cOpts...)
	if err != nil {
		return nil, err
	}
	x := &grpc.GenericClientStream[ExchangeMessage, ExchangeMessage]{ClientStream: stream}
	return x, nil
}

// This type alias is provided for backwards compatibility with existing code that references the prior non-generic stream type by name.
type FederationService_ExchangeClient = grpc.BidiStreamingClient[ExchangeMessage, ExchangeMessage]

// FederationServiceServer is the server API for FederationService service.
type FederationServiceServer interface {
	// Establish spends a one-time peering secret and records the joiner as a
	// peer of the acceptor. It is the only call made without a client
	// certificate the acceptor already trusts.
	Establish(context.Context, *EstablishRequest) (*EstablishResponse, error)
	// Exchange is the one long-lived bidirectional stream between two peered
	// federators: exported services, trust bundles, heartbeats, terminate.
	Exchange(grpc.BidiStreamingServer[ExchangeMessage, ExchangeMessage]) error
}

func RegisterFederationServiceServer(s grpc.ServiceRegistrar, srv FederationServiceServer) {
	s.RegisterService(&FederationService_ServiceDesc, srv)
}

func _FederationService_Establish_Handler(srv interface{}, ctx context.Context, dec func(interface{}) error, interceptor grpc.UnaryServerInterceptor) (interface{}, error) {
	in := new(EstablishRequest)
	if err := dec(in); err != nil {
		return nil, err
	}
	if interceptor == nil {
		return srv.(FederationServiceServer).Establish(ctx, in)
	}
	info := &grpc.UnaryServerInfo{
		Server:     srv,
		FullMethod: FederationService_Establish_FullMethodName,
	}
	handler := func(ctx context.Context, req interface{}) (interface{}, error) {
		return srv.(FederationServiceServer).Establish(ctx, req.(*EstablishRequest))
	}
	return interceptor(ctx, in, info, handler)
}

func _FederationService_Exchange_Handler(srv interface{}, stream grpc.ServerStream) error {
	return srv.(FederationServiceServer).Exchange(&grpc.GenericServerStream[ExchangeMessage, ExchangeMessage]{ServerStream: stream})
}

// This type alias is provided for backwards compatibility with existing code that references the prior non-generic stream type by name.
type FederationService_ExchangeServer = grpc.BidiStreamingServer[ExchangeMessage, ExchangeMessage]

// FederationService_ServiceDesc is the grpc.ServiceDesc for FederationService service.
// It's only intended for direct use with grpc.RegisterService,
// and not to be introspected or modified (even as a copy)
var FederationService_ServiceDesc = grpc.ServiceDesc{
	ServiceName: "isthmus.federation.v1.FederationService",
	HandlerType: (*FederationServiceServer)(nil),
	Methods: []grpc.MethodDesc{
		{
			MethodName: "Establish",
			Handler:    _FederationService_Establish_Handler,
		},
	},
	Streams: []grpc.StreamDesc{
		{
			StreamName:    "Exchange",
			Handler:       _FederationService_Exchange_Handler,
			ServerStreams: true,
			ClientStreams: true,
		},
	},
	Metadata: "federation/v1/federation.proto",
}
