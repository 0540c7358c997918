package main

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/test/echo/echopb"
)

const (
	// xfccMetadata is X-Forwarded-Client-Cert as gRPC metadata.
	xfccMetadata = "x-forwarded-client-cert"
	// repliesTrailer counts the replies a call sent; the client checks it,
	// so trailers lost on the way fail the call.
	repliesTrailer = "echo-replies"
	// maxStreamReplies bounds StreamRequest.count.
	maxStreamReplies = 1000
)

func serveGRPC(ctx context.Context, cfg Config, ln net.Listener) error {
	srv := grpc.NewServer(
		grpc.ConnectionTimeout(10*time.Second),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: cfg.IdleTimeout, Timeout: 10 * time.Second}),
	)
	echopb.RegisterEchoServiceServer(srv, grpcEcho{id: cfg.Identity})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return fmt.Errorf("grpc: %w", err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(shutdownTimeout):
		srv.Stop()
		<-stopped
	}
	<-served
	return nil
}

// grpcEcho implements EchoService.
type grpcEcho struct {
	id Identity
}

var _ echopb.EchoServiceServer = grpcEcho{}

func (s grpcEcho) Echo(ctx context.Context, _ *echopb.EchoRequest) (*echopb.EchoResponse, error) {
	method, _ := grpc.Method(ctx)
	reply := s.reply(ctx, method)
	if err := grpc.SetTrailer(ctx, metadata.Pairs(repliesTrailer, "1")); err != nil {
		return nil, err
	}
	return &echopb.EchoResponse{Reply: replyToProto(reply)}, nil
}

func (s grpcEcho) Stream(req *echopb.StreamRequest, stream grpc.ServerStreamingServer[echopb.StreamResponse]) error {
	if req.GetCount() > maxStreamReplies {
		return status.Errorf(codes.InvalidArgument, "count %d is more than %d", req.GetCount(), maxStreamReplies)
	}
	method, _ := grpc.MethodFromServerStream(stream)
	reply := s.reply(stream.Context(), method)
	for i := range req.GetCount() {
		reply.Seq = i + 1
		if err := stream.Send(&echopb.StreamResponse{Reply: replyToProto(reply)}); err != nil {
			return err
		}
	}
	stream.SetTrailer(metadata.Pairs(repliesTrailer, strconv.FormatUint(uint64(req.GetCount()), 10)))
	return nil
}

func (s grpcEcho) reply(ctx context.Context, method string) Reply {
	md, _ := metadata.FromIncomingContext(ctx)
	reply := s.id.reply(md.Get(xfccMetadata))
	reply.Method, reply.Path, reply.Proto = "POST", method, "grpc"
	if a := md.Get(":authority"); len(a) > 0 {
		reply.Host = a[0]
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		reply.Remote = p.Addr.String()
	}
	return reply
}

func replyToProto(r Reply) *echopb.Reply {
	return &echopb.Reply{
		Pod: r.Pod, Namespace: r.Namespace, Cluster: r.Cluster,
		Method: r.Method, Host: r.Host, Path: r.Path, Proto: r.Proto,
		Xfcc: r.XFCC, CallerIdentity: r.CallerIdentity, XfccError: r.XFCCError,
		Remote: r.Remote, Seq: r.Seq,
	}
}

func replyFromProto(r *echopb.Reply) Reply {
	return Reply{
		Pod: r.GetPod(), Namespace: r.GetNamespace(), Cluster: r.GetCluster(),
		Method: r.GetMethod(), Host: r.GetHost(), Path: r.GetPath(), Proto: r.GetProto(),
		XFCC: r.GetXfcc(), CallerIdentity: r.GetCallerIdentity(), XFCCError: r.GetXfccError(),
		Remote: r.GetRemote(), Seq: r.GetSeq(),
	}
}
