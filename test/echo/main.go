// Command echo is the small workload that Isthmus's tests and demo run as
// pods, and the client they call it with. Whatever protocol reaches it, it
// answers with who it is (pod, namespace, cluster), what it was sent, and
// which caller the sidecar in front of it authenticated, so a test can see
// that HTTP/1.1, HTTP/2, gRPC and raw TCP all cross the mesh.
//
// # Serving
//
//	echo [-listen addr] [-grpc-listen addr] [-tcp-listen addr] [-cluster name]
//
// listens on all three addresses before it serves any, so a readiness
// check on one means all accept. The defaults use the POD_IP the harness
// sets; POD_NAME and POD_NAMESPACE name the pod, CLUSTER_NAME the cluster.
//
//   - -listen (POD_IP:8080): HTTP/1.1 and HTTP/2 with prior knowledge (h2c)
//     on the same port. Every request, whatever its method and path, gets a
//     JSON Reply; proto is the protocol the server saw (HTTP/1.1 or
//     HTTP/2.0), xfcc the X-Forwarded-Client-Cert header, callerIdentity the
//     SPIFFE ID in the URI of its last element (the caller as the nearest
//     sidecar authenticated it), xfccError why the header did not parse.
//   - -grpc-listen (POD_IP:9090, "" for none): the isthmus.echo.v1.EchoService
//     of echopb/echo.proto. Echo answers with one Reply; Stream with count
//     Replies numbered from 1. The identity comes from the
//     x-forwarded-client-cert metadata, and trailers carry echo-replies,
//     the number of replies sent.
//   - -tcp-listen (POD_IP:9000, "" for none): raw TCP. On connect echo
//     writes one JSON line (pod, namespace, cluster, proto "tcp", remote),
//     then echoes every byte back until the client half-closes, then
//     closes: so a half-close that a proxy loses shows as a hang.
//
// SIGINT or SIGTERM stops it, finishing HTTP and gRPC calls in flight for
// at most 5 s.
//
// # Calling
//
//	echo call --proto http1|h2c|grpc|tcp --target host:port [flags]
//
// makes one call, prints the Reply as one JSON line on stdout (a stream's
// Replies one per line) and exits 0; on any failure it prints why on
// stderr and exits 1 (2 for bad flags). It is a plain process, so a test
// can run it in a pod's network namespace under another uid. Flags:
//
//	--proto    http1 (default), h2c, grpc or tcp
//	--target   host:port to connect to; required
//	--host     Host header (HTTP) or :authority (gRPC); default: the target
//	--path     request path, HTTP only; default /
//	--header   "Name: value" to send, HTTP header or gRPC metadata; repeatable
//	--stream   gRPC only: call Stream for this many replies instead of Echo
//	--data     tcp only: bytes to send before half-closing; default "ping\n"
//	--timeout  bound on the whole call, connect to last byte; default 10s
//
// A gRPC call fails unless its trailers say echo-replies: <count> and the
// stream's Replies are numbered 1…count. A tcp call fails unless what comes
// back is exactly --data followed by the server's close.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx)
	stop()
	os.Exit(code)
}

func run(ctx context.Context) int {
	if len(os.Args) > 1 && os.Args[1] == "call" {
		return runCall(ctx, os.Args[2:], os.Stdout, os.Stderr)
	}
	podIP := os.Getenv("POD_IP")
	var cfg Config
	flag.StringVar(&cfg.HTTPAddr, "listen", net.JoinHostPort(podIP, "8080"), "address for HTTP/1.1 and h2c")
	flag.StringVar(&cfg.GRPCAddr, "grpc-listen", net.JoinHostPort(podIP, "9090"), `address for gRPC; "" for none`)
	flag.StringVar(&cfg.TCPAddr, "tcp-listen", net.JoinHostPort(podIP, "9000"), `address for raw TCP echo; "" for none`)
	flag.StringVar(&cfg.Identity.Cluster, "cluster", os.Getenv("CLUSTER_NAME"), "cluster name to report")
	flag.Parse()
	cfg.Identity.Pod, cfg.Identity.Namespace = os.Getenv("POD_NAME"), os.Getenv("POD_NAMESPACE")
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := Run(ctx, log, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		return 1
	}
	return 0
}
