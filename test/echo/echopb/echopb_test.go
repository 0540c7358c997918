package echopb_test

import (
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/isthmus-mesh/isthmus/test/echo/echopb"
)

// The hand-written gRPC glue (service.go) must say what the proto says.
func TestServiceDescMatchesProto(t *testing.T) {
	svc := echopb.File_echopb_echo_proto.Services().ByName("EchoService")
	require.NotNil(t, svc)
	desc := echopb.EchoService_ServiceDesc
	require.Equal(t, string(svc.FullName()), desc.ServiceName)
	require.Equal(t, svc.ParentFile().Path(), desc.Metadata)

	fullNames := map[string]string{
		"Echo":   echopb.EchoService_Echo_FullMethodName,
		"Stream": echopb.EchoService_Stream_FullMethodName,
	}
	var unary, streams, wantUnary, wantStreams []string
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
	for i := range svc.Methods().Len() {
		m := svc.Methods().Get(i)
		if m.IsStreamingClient() || m.IsStreamingServer() {
			wantStreams = append(wantStreams, string(m.Name()))
		} else {
			wantUnary = append(wantUnary, string(m.Name()))
		}
		require.Equal(t, "/"+string(svc.FullName())+"/"+string(m.Name()), fullNames[string(m.Name())])
	}
	require.Equal(t, wantUnary, unary)
	require.Equal(t, wantStreams, streams)
}
