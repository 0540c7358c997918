package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// MaxRequestBytes bounds one message on a port that serves xDS. A
// gateway's EDS request names every cluster, about 50 bytes each, so a
// cluster with tens of thousands of exported ports needs megabytes; this
// is gRPC's own default and istiod's.
const MaxRequestBytes = 4 << 20

// xdsMethodPrefix starts the full method name of every xDS service.
const xdsMethodPrefix = "/envoy.service."

// Keepalive: a gateway that vanished without closing its connection is
// noticed within about 40 s, and clients may ping every 10 s.
var (
	keepaliveParams = keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}
	keepalivePolicy = keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}
)

// SecureServerOptions returns the options of the gRPC server that serves
// xDS over TLS next to the certificate service (pkg/caserver) on one port:
//
//   - TLS presenting svid (read at every handshake, so rotation needs no
//     restart) that requests a client certificate but does not require
//     or verify one at the handshake: a workload asking the certificate
//     service for its first SVID has none to present, and authenticates
//     with its ServiceAccount token instead;
//   - a stream interceptor that refuses every xDS stream whose client did
//     not present a valid X.509 SVID of the local trust domain
//     (codes.Unauthenticated, naming why);
//   - MaxRequestBytes, keepalive.
//
// The certificate service keeps its own bound on what it reads (its CSR
// size check); its requests are unary, so the interceptor never sees them.
func (s *Server) SecureServerOptions(svid x509svid.Source) []grpc.ServerOption {
	cfg := tlsconfig.TLSServerConfig(svid)
	cfg.ClientAuth = tls.RequestClientCert
	return []grpc.ServerOption{
		grpc.Creds(credentials.NewTLS(cfg)),
		grpc.MaxRecvMsgSize(MaxRequestBytes),
		grpc.ChainStreamInterceptor(s.authenticate),
		grpc.KeepaliveParams(keepaliveParams),
		grpc.KeepaliveEnforcementPolicy(keepalivePolicy),
	}
}

// PlaintextServerOptions returns the options of the plaintext xDS server
// (Istio's 15010). It authenticates nobody: anyone who reaches the port
// reads every exported service's endpoints. For tests only; never expose
// it.
func (s *Server) PlaintextServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxRequestBytes),
		grpc.KeepaliveParams(keepaliveParams),
		grpc.KeepaliveEnforcementPolicy(keepalivePolicy),
	}
}

type identityKey struct{}

// authedStream carries the authenticated SPIFFE ID in its context, for
// the stream callbacks.
type authedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (a *authedStream) Context() context.Context { return a.ctx }

// authenticate is the stream interceptor of the TLS port: xDS streams
// need a valid SVID of the local trust domain; other streams pass.
func (s *Server) authenticate(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !strings.HasPrefix(info.FullMethod, xdsMethodPrefix) {
		return handler(srv, ss)
	}
	ctx := ss.Context()
	id, err := s.verifyPeer(ctx)
	if err != nil {
		s.metrics.refused.Add(ctx, 1)
		s.log.Warn("refused xDS stream", "peer", peerAddr(ctx), "method", info.FullMethod, "reason", err.Error())
		return status.Errorf(codes.Unauthenticated, "xDS needs an X.509 SVID of trust domain %q as TLS client certificate: %v", s.td.Name(), err)
	}
	return handler(srv, &authedStream{ServerStream: ss, ctx: context.WithValue(ctx, identityKey{}, id)})
}

// verifyPeer checks the client certificate chain of the stream's TLS
// connection against the local trust domain's bundle.
func (s *Server) verifyPeer(ctx context.Context) (spiffeid.ID, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, errors.New("no peer information")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return spiffeid.ID{}, errors.New("not a TLS connection")
	}
	certs := info.State.PeerCertificates
	if len(certs) == 0 {
		return spiffeid.ID{}, errors.New("no client certificate was presented")
	}
	id, err := x509svid.IDFromCert(certs[0])
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("client certificate is not an SVID: %w", err)
	}
	if !id.MemberOf(s.td) {
		return spiffeid.ID{}, fmt.Errorf("SVID %s is of another trust domain", id)
	}
	if _, _, err := x509svid.Verify(certs, s.bundles); err != nil {
		return spiffeid.ID{}, fmt.Errorf("SVID %s does not verify: %w", id, err)
	}
	return id, nil
}

// identityOf returns the SPIFFE ID authenticate put in ctx, or "" on the
// plaintext port.
func identityOf(ctx context.Context) string {
	if id, ok := ctx.Value(identityKey{}).(spiffeid.ID); ok {
		return id.String()
	}
	return ""
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return "unknown"
}
