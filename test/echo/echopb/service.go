// The gRPC glue of EchoService, written here rather than generated:
// protoc-gen-go-grpc always adds an "Unimplemented" server whose methods
// answer "not implemented", and test/echo implements every method itself.
// The method names and stream shapes are those of echo.proto;
// TestServiceDescMatchesProto checks they agree.

package echopb

import (
	"context"

	"google.golang.org/grpc"
)

const (
	EchoService_Echo_FullMethodName   = "/isthmus.echo.v1.EchoService/Echo"
	EchoService_Stream_FullMethodName = "/isthmus.echo.v1.EchoService/Stream"
)

// EchoServiceClient is the client API for EchoService.
type EchoServiceClient interface {
	// Echo answers with one Reply.
	Echo(ctx context.Context, in *EchoRequest, opts ...grpc.CallOption) (*EchoResponse, error)
	// Stream answers with count Replies, then trailers.
	Stream(ctx context.Context, in *StreamRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[StreamResponse], error)
}

type echoServiceClient struct {
	cc grpc.ClientConnInterface
}

// NewEchoServiceClient returns a client calling EchoService over cc.
func NewEchoServiceClient(cc grpc.ClientConnInterface) EchoServiceClient {
	return &echoServiceClient{cc}
}

func (c *echoServiceClient) Echo(ctx context.Context, in *EchoRequest, opts ...grpc.CallOption) (*EchoResponse, error) {
	cOpts := append([]grpc.CallOption{grpc.StaticMethod()}, opts...)
	out := new(EchoResponse)
	if err := c.cc.Invoke(ctx, EchoService_Echo_FullMethodName, in, out, cOpts...); err != nil {
		return nil, err
	}
	return out, nil
}

func (c *echoServiceClient) Stream(ctx context.Context, in *StreamRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[StreamResponse], error) {
	cOpts := append([]grpc.CallOption{grpc.StaticMethod()}, opts...)
	stream, err := c.cc.NewStream(ctx, &EchoService_ServiceDesc.Streams[0], EchoService_Stream_FullMethodName, cOpts...)
	if err != nil {
		return nil, err
	}
	x := &grpc.GenericClientStream[StreamRequest, StreamResponse]{ClientStream: stream}
	if err := x.SendMsg(in); err != nil {
		return nil, err
	}
	if err := x.CloseSend(); err != nil {
		return nil, err
	}
	return x, nil
}

// EchoServiceServer is the server API for EchoService.
type EchoServiceServer interface {
	// Echo answers with one Reply.
	Echo(context.Context, *EchoRequest) (*EchoResponse, error)
	// Stream answers with count Replies, then trailers.
	Stream(*StreamRequest, grpc.ServerStreamingServer[StreamResponse]) error
}

// RegisterEchoServiceServer registers srv on s.
func RegisterEchoServiceServer(s grpc.ServiceRegistrar, srv EchoServiceServer) {
	s.RegisterService(&EchoService_ServiceDesc, srv)
}

func _EchoService_Echo_Handler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	in := new(EchoRequest)
	if err := dec(in); err != nil {
		return nil, err
	}
	if interceptor == nil {
		return srv.(EchoServiceServer).Echo(ctx, in)
	}
	info := &grpc.UnaryServerInfo{
		Server:     srv,
		FullMethod: EchoService_Echo_FullMethodName,
	}
	handler := func(ctx context.Context, req any) (any, error) {
		return srv.(EchoServiceServer).Echo(ctx, req.(*EchoRequest))
	}
	return interceptor(ctx, in, info, handler)
}

func _EchoService_Stream_Handler(srv any, stream grpc.ServerStream) error {
	in := new(StreamRequest)
	if err := stream.RecvMsg(in); err != nil {
		return err
	}
	return srv.(EchoServiceServer).Stream(in, &grpc.GenericServerStream[StreamRequest, StreamResponse]{ServerStream: stream})
}

// EchoService_ServiceDesc is the grpc.ServiceDesc for EchoService, for
// grpc.RegisterService.
var EchoService_ServiceDesc = grpc.ServiceDesc{
	ServiceName: "isthmus.echo.v1.EchoService",
	HandlerType: (*EchoServiceServer)(nil),
	Methods: []grpc.MethodDesc{
		{
			MethodName: "Echo",
			Handler:    _EchoService_Echo_Handler,
		},
	},
	Streams: []grpc.StreamDesc{
		{
			StreamName:    "Stream",
			Handler:       _EchoService_Stream_Handler,
			ServerStreams: true,
		},
	},
	Metadata: "echopb/echo.proto",
}
