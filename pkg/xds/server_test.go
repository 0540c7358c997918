package xds

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	pb "istio.io/api/security/v1alpha1"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
)

var (
	tdA         = spiffeid.RequireTrustDomainFromString("a.mesh")
	tdB         = spiffeid.RequireTrustDomainFromString("b.mesh")
	federatorID = spiffeid.RequireFromPath(tdA, "/ns/isthmus-system/sa/isthmus-federator")
	gatewayID   = spiffeid.RequireFromPath(tdA, "/ns/isthmus-system/sa/isthmus-eastwest-gw")
)

const (
	gatewayNode = "eastwest-gw~10.0.0.5~eastwest-gw-0.isthmus-system~isthmus-system.svc.cluster.local"
	echo80      = "outbound_.80_._.echo.demo.svc.cluster.local"
	echoCluster = "outbound|80||echo.demo.svc.cluster.local"
	web8080     = "outbound_.8080_._.web.demo.svc.cluster.local"
	// wait bounds every wait for something that must happen; quiet is
	// how long a test watches for something that must not.
	wait  = 10 * time.Second
	quiet = 300 * time.Millisecond
)

// logSink sends log lines to t.Logf and keeps them for assertions.
type logSink struct {
	tb testing.TB
	// mu guards buf and done.
	mu  sync.Mutex
	buf bytes.Buffer
	// done is set once the test's cleanups ran: go-control-plane's watch
	// goroutines may still log a line after the gRPC server stopped, and
	// testing panics on a Logf after the test completed.
	done bool
}

func newLogSink(tb testing.TB) *logSink {
	s := &logSink{tb: tb}
	// Registered first, so it runs after every other cleanup.
	tb.Cleanup(func() {
		s.mu.Lock()
		s.done = true
		s.mu.Unlock()
	})
	return s
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf.Write(p)
	if !s.done {
		s.tb.Logf("%s", bytes.TrimRight(p, "\n"))
	}
	return len(p), nil
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

func newCA(t testing.TB, td spiffeid.TrustDomain) *ca.CA {
	t.Helper()
	c, err := ca.New(t.Context(), kubefake.NewClientset(), ca.Options{TrustDomain: td, Namespace: "isthmus-system"})
	require.NoError(t, err)
	return c
}

func svidOf(t testing.TB, c *ca.CA, id spiffeid.ID) x509svid.Source {
	t.Helper()
	s, err := ca.NewSelfSource(c.Authority, id, nil)
	require.NoError(t, err)
	return s
}

// fakeAuth accepts bearer tokens "tok:<ns>:<sa>".
type fakeAuth struct{}

func (fakeAuth) Authenticate(_ context.Context, token string) (caserver.Caller, error) {
	if rest, ok := strings.CutPrefix(token, "tok:"); ok {
		if ns, sa, ok := strings.Cut(rest, ":"); ok {
			return caserver.Caller{Namespace: ns, ServiceAccount: sa}, nil
		}
	}
	return caserver.Caller{}, fmt.Errorf("%w: token not authenticated", caserver.ErrUnauthenticated)
}

// fixture is a federator's xDS side: the catalog store, the xDS server
// and the certificate service on one TLS port as the federator serves
// them, plus the plaintext port.
type fixture struct {
	t         *testing.T
	store     *catalog.Store
	ca        *ca.CA
	srv       *Server
	tlsAddr   string
	plainAddr string
	logs      *logSink
	metrics   *sdkmetric.ManualReader
	secure    *grpc.Server
	// stopRun ends Run and waits for it; stop also stops the servers.
	stopRun, stop func()
}

func newFixture(t *testing.T, opts Options) *fixture {
	t.Helper()
	f := &fixture{t: t, store: catalog.NewStore(), logs: newLogSink(t), metrics: sdkmetric.NewManualReader()}
	f.ca = newCA(t, tdA)
	bundles := trust.NewStore(tdA)
	bundles.SetLocal(f.ca.Bundle().X509Authorities(), 1, 0)
	opts.Logger = slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts.Meter = sdkmetric.NewMeterProvider(sdkmetric.WithReader(f.metrics)).Meter("test")
	if opts.Gateway.FederationUpstream == "" {
		opts.Gateway.FederationUpstream = "127.0.0.1:15019"
	}
	srv, err := NewServer(f.store, tdA, bundles, opts)
	require.NoError(t, err)
	f.srv = srv

	secure := grpc.NewServer(srv.SecureServerOptions(svidOf(t, f.ca, federatorID))...)
	srv.Register(secure)
	caserver.New(f.ca, fakeAuth{}, caserver.Options{}).Register(secure)
	plain := grpc.NewServer(srv.PlaintextServerOptions()...)
	srv.Register(plain)
	serve := func(g *grpc.Server) (string, chan struct{}) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = g.Serve(ln)
		}()
		return ln.Addr().String(), done
	}
	var secureDone, plainDone chan struct{}
	f.tlsAddr, secureDone = serve(secure)
	f.plainAddr, plainDone = serve(plain)

	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(ctx) }()
	f.secure = secure
	var runOnce, stopOnce sync.Once
	f.stopRun = func() {
		runOnce.Do(func() {
			cancel()
			require.NoError(t, <-ran)
		})
	}
	f.stop = func() {
		stopOnce.Do(func() {
			f.stopRun()
			secure.Stop()
			plain.Stop()
			<-secureDone
			<-plainDone
		})
	}
	t.Cleanup(f.stop)
	return f
}

func (f *fixture) setCatalog(svcs ...catalog.Service) *catalog.Snapshot {
	f.t.Helper()
	snap := snapshotOf(f.t, svcs...)
	f.store.Set(snap)
	return snap
}

// waitTranslated waits until the server has translated catalog version v.
func (f *fixture) waitTranslated(v string) {
	f.t.Helper()
	require.Eventually(f.t, func() bool { return f.srv.Status().Gateway.CatalogVersion == v }, wait, 5*time.Millisecond,
		"catalog %s never translated", v)
}

// metric sums the data points of an integer sum instrument whose
// attributes include every attr ("key=value").
func (f *fixture) metric(name string, attrs ...string) int64 {
	f.t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(f.t, f.metrics.Collect(context.Background(), &rm))
	var total int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			sum, ok := m.Data.(metricdata.Sum[int64])
			require.True(f.t, ok, "%s is not an int64 sum", name)
		points:
			for _, dp := range sum.DataPoints {
				for _, a := range attrs {
					k, v, _ := strings.Cut(a, "=")
					got, ok := dp.Attributes.Value(attribute.Key(k))
					if !ok || got.String() != v {
						continue points
					}
				}
				total += dp.Value
			}
		}
	}
	return total
}

func (f *fixture) dialTLS(svid x509svid.Source) *grpc.ClientConn {
	f.t.Helper()
	bundle := f.ca.Bundle()
	var cfg = tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(federatorID))
	if svid != nil {
		cfg = tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(federatorID))
	}
	conn, err := grpc.NewClient(f.tlsAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	require.NoError(f.t, err)
	f.t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func (f *fixture) dialPlain() *grpc.ClientConn {
	f.t.Helper()
	conn, err := grpc.NewClient(f.plainAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(f.t, err)
	f.t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// adsClient is a raw state-of-the-world ADS stream, driven by hand the way
// a gateway drives it.
type adsClient struct {
	t      *testing.T
	stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *corev3.Node
	resps  chan *discoveryv3.DiscoveryResponse
	// err receives the stream's end.
	err chan error

	// What the client holds, as a gateway would: by type URL the last
	// version and nonce received, and the resources.
	versions, nonces map[string]string
	listener         *listenerv3.Listener
	clusters         []*clusterv3.Cluster
	loads            map[string]*endpointv3.ClusterLoadAssignment
	// carried is how many assignments the last EDS response carried.
	carried int
}

func openADS(t *testing.T, conn *grpc.ClientConn, nodeID string) *adsClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	require.NoError(t, err)
	c := &adsClient{
		t: t, stream: stream, node: &corev3.Node{Id: nodeID, Cluster: "a"},
		resps: make(chan *discoveryv3.DiscoveryResponse, 16), err: make(chan error, 1),
		versions: map[string]string{}, nonces: map[string]string{}, loads: map[string]*endpointv3.ClusterLoadAssignment{},
	}
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				c.err <- err
				return
			}
			c.resps <- r
		}
	}()
	return c
}

func (c *adsClient) send(typeURL string, names []string, nack string) {
	c.t.Helper()
	req := &discoveryv3.DiscoveryRequest{
		Node: c.node, TypeUrl: typeURL, ResourceNames: names,
		VersionInfo: c.versions[typeURL], ResponseNonce: c.nonces[typeURL],
	}
	if nack != "" {
		req.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: nack}
	}
	require.NoError(c.t, c.stream.Send(req))
}

// subscribe asks for listeners and clusters, as a gateway starts.
func (c *adsClient) subscribe() {
	c.send(resource.ClusterType, nil, "")
	c.send(resource.ListenerType, nil, "")
}

// next waits for the next response.
func (c *adsClient) next() *discoveryv3.DiscoveryResponse {
	c.t.Helper()
	return nextResponse(c.t, c.resps, c.err, "ADS")
}

// nothing asserts that no response comes for a while.
func (c *adsClient) nothing(why string) {
	c.t.Helper()
	if r, ok := quietFor(c.resps); ok {
		c.t.Fatalf("%s: got a %s response, version %s", why, r.GetTypeUrl(), r.GetVersionInfo())
	}
}

// nextResponse waits for a stream's next response, failing t when the
// stream ends first or nothing comes within wait.
func nextResponse[R any](t testing.TB, resps <-chan R, errs <-chan error, stream string) R {
	t.Helper()
	select {
	case r := <-resps:
		return r
	case err := <-errs:
		t.Fatalf("%s stream ended: %v", stream, err)
	case <-time.After(wait):
		t.Fatalf("no %s response", stream)
	}
	var zero R
	return zero
}

// quietFor reports a response that comes within quiet, if one does.
func quietFor[R any](resps <-chan R) (R, bool) {
	select {
	case r := <-resps:
		return r, true
	case <-time.After(quiet):
		var zero R
		return zero, false
	}
}

// refused waits for the stream to end and returns its gRPC status.
func (c *adsClient) refused() *status.Status {
	c.t.Helper()
	select {
	case r := <-c.resps:
		c.t.Fatalf("got a %s response; want the stream refused", r.GetTypeUrl())
	case err := <-c.err:
		return status.Convert(err)
	case <-time.After(wait):
		c.t.Fatal("stream neither answered nor ended")
	}
	return nil
}

// apply takes in one response and ACKs it; a new cluster list is
// followed, as a gateway does, by an EDS request naming every EDS
// cluster.
func (c *adsClient) apply(r *discoveryv3.DiscoveryResponse) {
	c.t.Helper()
	typ := r.GetTypeUrl()
	c.versions[typ], c.nonces[typ] = r.GetVersionInfo(), r.GetNonce()
	switch typ {
	case resource.ListenerType:
		require.Len(c.t, r.GetResources(), 1)
		c.listener = unpack[*listenerv3.Listener](c.t, r.GetResources()[0])
		c.send(typ, nil, "")
	case resource.ClusterType:
		c.clusters = nil
		for _, a := range r.GetResources() {
			c.clusters = append(c.clusters, unpack[*clusterv3.Cluster](c.t, a))
		}
		c.send(typ, nil, "")
		c.send(resource.EndpointType, c.edsNames(), "")
	case resource.EndpointType:
		c.holdAssignments(r)
		c.send(typ, c.edsNames(), "")
	default:
		c.t.Fatalf("unexpected type %s", typ)
	}
}

// holdAssignments takes an EDS response as Envoy does: it adds or
// replaces the assignments it carries and keeps the others, those of
// clusters that are gone excepted.
func (c *adsClient) holdAssignments(r *discoveryv3.DiscoveryResponse) {
	if c.loads == nil {
		c.loads = map[string]*endpointv3.ClusterLoadAssignment{}
	}
	for _, a := range r.GetResources() {
		cla := unpack[*endpointv3.ClusterLoadAssignment](c.t, a)
		c.loads[cla.GetClusterName()] = cla
	}
	names := c.edsNames()
	maps.DeleteFunc(c.loads, func(name string, _ *endpointv3.ClusterLoadAssignment) bool { return !slices.Contains(names, name) })
	c.carried = len(r.GetResources())
}

func (c *adsClient) edsNames() []string {
	var names []string
	for _, cl := range c.clusters {
		if cl.GetType() == clusterv3.Cluster_EDS {
			names = append(names, cl.GetName())
		}
	}
	return names
}

// syncTo applies responses until listener, clusters and endpoints are
// each at r's version of its type.
func (c *adsClient) syncTo(r Resources) {
	c.t.Helper()
	for c.versions[resource.ListenerType] != r.ListenersVersion || c.versions[resource.ClusterType] != r.ClustersVersion ||
		c.versions[resource.EndpointType] != r.EndpointsVersion {
		c.apply(c.next())
	}
}

func (c *adsClient) snis() []string {
	var out []string
	for _, fc := range c.listener.GetFilterChains() {
		out = append(out, fc.GetFilterChainMatch().GetServerNames()...)
	}
	return out
}

func unpack[M proto.Message](t testing.TB, a *anypb.Any) M {
	t.Helper()
	m, err := a.UnmarshalNew()
	require.NoError(t, err)
	out, ok := m.(M)
	require.True(t, ok, "resource is a %T", m)
	return out
}

func webService() catalog.Service {
	return catalog.Service{
		Namespace: "demo", Name: "web", Cluster: "a",
		Ports: []catalog.Port{{Name: "http", Port: 8080, TargetPort: 80}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1,
			Addresses: []catalog.Address{{IP: "10.0.1.9", Ready: true}}}},
	}
}

// translated is what TranslateGateway gives for svcs.
func translated(t testing.TB, svcs ...catalog.Service) Resources {
	t.Helper()
	r, err := TranslateGateway(snapshotOf(t, svcs...), GatewayOptions{FederationUpstream: "127.0.0.1:15019"})
	require.NoError(t, err)
	return r
}

// A gateway with a valid SVID gets its listener, clusters and endpoints,
// ACKs them, and then follows exports and unexports; an unchanged
// configuration is not pushed again.
func TestGatewayFollowsTheCatalog(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.subscribe()
	v1 := translated(t, echoService())
	gw.syncTo(v1)

	require.Equal(t, []string{federation.ReservedSNI, echo80, "outbound_.9090_._.echo.demo.svc.cluster.local"}, gw.snis())
	cla := gw.loads[echoCluster]
	require.NotNil(t, cla)
	var eps []string
	for _, le := range cla.GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			eps = append(eps, fmt.Sprintf("%s:%d %s", sa.GetAddress(), sa.GetPortValue(), e.GetHealthStatus()))
		}
	}
	require.Equal(t, []string{"10.0.1.2:8080 HEALTHY", "10.0.1.3:8080 UNHEALTHY", "10.0.2.2:8080 HEALTHY"}, eps)

	// The server saw the ACKs of all three types, from the gateway's SVID.
	require.Eventually(t, func() bool {
		st := f.srv.Status()
		return len(st.Proxies) == 1 && len(st.Proxies[0].Acked) == 3
	}, wait, 5*time.Millisecond)
	st := f.srv.Status()
	require.Equal(t, v1.Version, st.Gateway.Version)
	p := st.Proxies[0]
	require.Equal(t, gatewayNode, p.Node)
	require.Equal(t, gatewayID.String(), p.Identity)
	want := map[string]string{resource.ListenerType: v1.ListenersVersion, resource.ClusterType: v1.ClustersVersion, resource.EndpointType: v1.EndpointsVersion}
	require.Equal(t, want, p.Acked)
	want[resource.SecretType] = st.Gateway.SecretsVersion
	require.Equal(t, want, st.Gateway.Versions, "what /debug/xds serves is what the proxy acked")
	require.Equal(t, int64(1), f.metric("isthmus_xds_connected_proxies", "transport=tls"))
	require.Equal(t, int64(1), f.metric("isthmus_xds_snapshot_updates", "role=eastwest-gw"))

	// A new export: a new version with its chain and endpoints.
	f.setCatalog(echoService(), webService())
	v2 := translated(t, echoService(), webService())
	require.NotEqual(t, v1.Version, v2.Version)
	gw.syncTo(v2)
	require.Contains(t, gw.snis(), web8080)
	require.Equal(t, "10.0.1.9", gw.loads["outbound|8080||web.demo.svc.cluster.local"].GetEndpoints()[0].GetLbEndpoints()[0].
		GetEndpoint().GetAddress().GetSocketAddress().GetAddress())

	// Unexport: the chain and its cluster are gone.
	f.setCatalog(webService())
	v3 := translated(t, webService())
	gw.syncTo(v3)
	require.Equal(t, []string{federation.ReservedSNI, web8080}, gw.snis())
	require.NotContains(t, gw.edsNames(), echoCluster)
	require.NotContains(t, gw.loads, echoCluster)

	// A catalog change the gateway does not see: same version, no push.
	w := webService()
	w.Identities = []string{"spiffe://a.mesh/ns/demo/sa/web"}
	w.Ports[0].AppProtocol = "http"
	snap := f.setCatalog(w)
	f.waitTranslated(snap.Version())
	gw.nothing("an unchanged gateway configuration was pushed again")
	require.Equal(t, v3.Version, f.srv.Status().Gateway.Version)
	require.Equal(t, int64(3), f.metric("isthmus_xds_snapshot_updates", "role=eastwest-gw"))
}

// Proxies authenticate with an SVID of the local trust domain; anything
// else is refused with Unauthenticated and a reason.
func TestStreamsWithoutALocalSVIDAreRefused(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	rogue := newCA(t, tdA) // the same trust domain name, another root
	tests := []struct {
		name string
		svid x509svid.Source
		want string
	}{
		{"no client certificate", nil, "no client certificate was presented"},
		{"SVID of a peer trust domain", svidOf(t, newCA(t, tdB), spiffeid.RequireFromPath(tdB, "/ns/isthmus-system/sa/isthmus-eastwest-gw")),
			"SVID spiffe://b.mesh/ns/isthmus-system/sa/isthmus-eastwest-gw is of another trust domain"},
		{"SVID from another root", svidOf(t, rogue, gatewayID), "SVID spiffe://a.mesh/ns/isthmus-system/sa/isthmus-eastwest-gw does not verify"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := openADS(t, f.dialTLS(tc.svid), gatewayNode)
			// The send itself may already see the stream's end.
			_ = c.stream.Send(&discoveryv3.DiscoveryRequest{Node: c.node, TypeUrl: resource.ClusterType})
			st := c.refused()
			require.Equal(t, codes.Unauthenticated, st.Code(), st.Message())
			require.Contains(t, st.Message(), `xDS needs an X.509 SVID of trust domain "a.mesh"`)
			require.Contains(t, st.Message(), tc.want)
			require.Contains(t, f.logs.String(), tc.want)
		})
	}
	require.Equal(t, int64(3), f.metric("isthmus_xds_streams_refused"))
	require.Empty(t, f.srv.Status().Proxies, "a refused stream never counts as a proxy")
	require.Contains(t, f.logs.String(), "refused xDS stream")
}

// The certificate service shares the TLS port: a workload with no
// certificate yet still gets one with its token, and one renewing with
// its old certificate presented still does too.
func TestCertificateServiceSharesThePort(t *testing.T) {
	f := newFixture(t, Options{})
	for _, tc := range []struct {
		name string
		svid x509svid.Source
	}{{"first certificate, no client certificate", nil}, {"renewal, presenting the old SVID", svidOf(t, f.ca, gatewayID)}} {
		t.Run(tc.name, func(t *testing.T) {
			client := pb.NewIstioCertificateServiceClient(f.dialTLS(tc.svid))
			ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer tok:demo:web")
			resp, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: webCSR(t)})
			require.NoError(t, err)
			block, _ := pem.Decode([]byte(resp.GetCertChain()[0]))
			leaf, err := x509.ParseCertificate(block.Bytes)
			require.NoError(t, err)
			id, err := x509svid.IDFromCert(leaf)
			require.NoError(t, err)
			require.Equal(t, "spiffe://a.mesh/ns/demo/sa/web", id.String())
		})
	}
	// And a bad token is still the CA's to refuse, not the xDS side's
	// (with a well-formed CSR: the CA checks the request before it asks
	// the API server about the token).
	client := pb.NewIstioCertificateServiceClient(f.dialTLS(nil))
	_, err := client.CreateCertificate(metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer nope"),
		&pb.IstioCertificateRequest{Csr: webCSR(t)})
	require.Equal(t, codes.Unauthenticated, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "token refused")
}

// webCSR is a PEM CSR, with a fresh key, for spiffe://a.mesh/ns/demo/sa/web.
func webCSR(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{{Scheme: "spiffe", Host: "a.mesh", Path: "/ns/demo/sa/web"}},
	}, key)
	require.NoError(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// A NACK is counted and logged with the proxy's reason, the rejected
// version is not sent straight back, and the next version is.
func TestNACKIsCountedLoggedAndNotRepeated(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.send(resource.ListenerType, nil, "")
	r := gw.next()
	require.Equal(t, resource.ListenerType, r.GetTypeUrl())
	bad := r.GetVersionInfo()

	// Reject it: version_info stays at what was accepted before (nothing).
	gw.nonces[resource.ListenerType] = r.GetNonce()
	const reason = `listener "eastwest-gw": filter_chains[1]: transport_socket is not supported`
	gw.send(resource.ListenerType, nil, reason)
	require.Eventually(t, func() bool { return f.metric("isthmus_xds_nacks", "type_url="+resource.ListenerType) == 1 }, wait, 5*time.Millisecond)
	require.Contains(t, f.logs.String(), "proxy rejected configuration (NACK)")
	require.Contains(t, f.logs.String(), "transport_socket is not supported")
	require.Contains(t, f.logs.String(), "rejectedVersion="+bad)
	p := f.srv.Status().Proxies[0]
	require.Equal(t, 1, p.NACKs)
	require.Equal(t, resource.ListenerType+": "+reason, p.LastNACK)
	require.Empty(t, p.Acked)
	gw.nothing("the rejected version was sent again")

	// The next configuration reaches the proxy.
	f.setCatalog(echoService(), webService())
	r = gw.next()
	require.Equal(t, resource.ListenerType, r.GetTypeUrl())
	require.Equal(t, translated(t, echoService(), webService()).ListenersVersion, r.GetVersionInfo())
}

// A request for a type the server does not serve ends that stream with
// InvalidArgument naming it, on both protocols; nothing of it is kept.
// Before, the cache kept an entry per type URL asked (any string, up to
// 4 MiB) for good, and a stream asking for a dozen new ones with a stale
// version_info filled go-control-plane's per-stream response buffer
// while holding the cache's lock: no proxy got an update again.
func TestUnservedTypeEndsTheStream(t *testing.T) {
	f := newFixture(t, Options{})
	f.waitTranslated(f.setCatalog(webService()).Version())
	bogus := "type.googleapis.com/bogus.T." + strings.Repeat("p", 32<<10)
	wantErr := func(err error) {
		t.Helper()
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		require.Contains(t, status.Convert(err).Message(), "is not served")
		require.Less(t, len(status.Convert(err).Message()), 1024, "the type URL is quoted in part")
	}

	sotw, err := discoveryv3.NewAggregatedDiscoveryServiceClient(f.dialPlain()).StreamAggregatedResources(t.Context())
	require.NoError(t, err)
	require.NoError(t, sotw.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: gatewayNode}, VersionInfo: "x", TypeUrl: bogus}))
	_, err = sotw.Recv()
	wantErr(err)

	delta, err := discoveryv3.NewAggregatedDiscoveryServiceClient(f.dialPlain()).DeltaAggregatedResources(t.Context())
	require.NoError(t, err)
	require.NoError(t, delta.Send(&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: gatewayNode}, TypeUrl: bogus}))
	_, err = delta.Recv()
	wantErr(err)

	c := f.srv.cache.(*encodedCache)
	c.mu.Lock()
	for _, g := range c.groups {
		require.NotContains(t, g.encoded, bogus)
	}
	c.mu.Unlock()

	// Other proxies are served as ever.
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.send(resource.ClusterType, nil, "")
	require.Equal(t, resource.ClusterType, gw.next().GetTypeUrl())
}

// A proxy on the TLS port is the node its SVID allows, as istiod checks:
// a node names its namespace, which must be its identity's, a gateway
// runs where gateways run, and the node ID never changes on a stream.
// Before, any workload got the gateway's configuration (the pod endpoints
// of every export) by claiming its node ID.
func TestNodeBoundToItsSVID(t *testing.T) {
	f := newFixture(t, Options{Gateway: GatewayOptions{Namespace: "isthmus-system"}})
	f.waitTranslated(f.setCatalog(webService()).Version())
	web := svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))
	refused := func(conn *grpc.ClientConn, node string, code codes.Code, words string) {
		t.Helper()
		stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(t.Context())
		require.NoError(t, err)
		require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.ClusterType}))
		_, err = stream.Recv()
		require.Equal(t, code, status.Code(err), "%s: %v", node, err)
		require.Contains(t, status.Convert(err).Message(), words)
	}
	refused(f.dialTLS(web), gatewayNode, codes.PermissionDenied, `is in namespace "isthmus-system", but its certificate's identity spiffe://a.mesh/ns/demo/sa/web is in "demo"`)
	refused(f.dialTLS(web), "eastwest-gw~10.0.1.9~gw.demo~demo.svc.cluster.local", codes.PermissionDenied, `gateways run in namespace "isthmus-system"`)
	refused(f.dialTLS(web), "sidecar~10.0.1.9~cart-0.shop~shop.svc.cluster.local", codes.PermissionDenied, `is in namespace "shop"`)
	refused(f.dialTLS(web), "sidecar~10.0.1.9", codes.InvalidArgument, "is not of the form")
	refused(f.dialTLS(web), "sidecar~10.0.1.9~cart-0.shop~demo.svc.cluster.local", codes.InvalidArgument, "third field is not <pod>.demo")
	odd := svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/workload/web"))
	refused(f.dialTLS(odd), sidecarNode, codes.PermissionDenied, "not of a Kubernetes ServiceAccount")
	require.EqualValues(t, 6, f.metric("isthmus_xds_streams_refused"))
	require.Contains(t, f.logs.String(), "xDS node refused")

	// Its own node is served; another node ID on the same stream is not.
	sc := openADS(t, f.dialTLS(web), sidecarNode)
	sc.send(resource.ClusterType, nil, "")
	require.Equal(t, resource.ClusterType, sc.next().GetTypeUrl())
	sc.node = &corev3.Node{Id: gatewayNode}
	sc.send(resource.ListenerType, nil, "")
	select {
	case err := <-sc.err:
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		require.Contains(t, status.Convert(err).Message(), "the node ID changed on the stream")
	case <-time.After(wait):
		t.Fatal("the stream went on under another node ID")
	}

	// The gateway's own identity is served.
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.send(resource.ClusterType, nil, "")
	require.Equal(t, resource.ClusterType, gw.next().GetTypeUrl())
}

// A NACK's reason is the proxy's to choose, up to 4 MiB: the logs and
// Status keep its first 4 KiB.
func TestNACKReasonKeptInPart(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.send(resource.ListenerType, nil, "")
	r := gw.next()
	gw.nonces[resource.ListenerType] = r.GetNonce()
	gw.send(resource.ListenerType, nil, strings.Repeat("r", 1<<20))
	require.Eventually(t, func() bool { return f.metric("isthmus_xds_nacks", "type_url="+resource.ListenerType) == 1 }, wait, 5*time.Millisecond)
	p := f.srv.Status().Proxies[0]
	require.Less(t, len(p.LastNACK), 5<<10)
	require.Contains(t, p.LastNACK, "(1044480 more bytes)")
	require.Less(t, len(f.logs.String()), 64<<10, "the whole reason was logged")
}

// Nothing is served before the local catalog is published, so a
// restarted federator never replaces a gateway's configuration with an
// empty one; nodes of other roles get nothing at all.
func TestWhatIsNotServed(t *testing.T) {
	f := newFixture(t, Options{})
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.subscribe()
	web := svidOf(t, f.ca, spiffeid.RequireFromPath(tdA, "/ns/demo/sa/web"))
	sidecar := openADS(t, f.dialTLS(web), sidecarNode)
	sidecar.subscribe()
	other := openADS(t, f.dialTLS(web), "router~10.0.1.3~web-1.demo~demo.svc.cluster.local")
	other.subscribe()
	gw.nothing("configuration served before the local catalog was published")
	sidecar.nothing("configuration served to a sidecar before the local catalog was published")

	f.setCatalog() // published, and empty
	gw.syncTo(translated(t))
	require.Equal(t, []string{federation.ReservedSNI}, gw.snis())
	r := sidecar.next()
	require.Equal(t, resource.ClusterType, r.GetTypeUrl(), "a sidecar gets its own configuration, not the gateway's")
	require.Equal(t, sidecarTranslated(t, nil, nil).ClustersVersion, r.GetVersionInfo())
	other.nothing("a node of a role not served got configuration")
	require.Contains(t, f.logs.String(), "xDS node of a role not served yet")
}

// The plaintext port serves the same configuration to anyone (tests
// only), and delta xDS is served too.
func TestPlaintextAndDelta(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog(echoService())
	gw := openADS(t, f.dialPlain(), gatewayNode)
	gw.subscribe()
	gw.syncTo(translated(t, echoService()))
	require.Contains(t, gw.snis(), echo80)
	require.Eventually(t, func() bool { return f.metric("isthmus_xds_connected_proxies", "transport=plaintext") == 1 }, wait, 5*time.Millisecond)
	require.Empty(t, f.srv.Status().Proxies[0].Identity)

	delta, err := discoveryv3.NewAggregatedDiscoveryServiceClient(f.dialTLS(svidOf(t, f.ca, gatewayID))).DeltaAggregatedResources(t.Context())
	require.NoError(t, err)
	require.NoError(t, delta.Send(&discoveryv3.DeltaDiscoveryRequest{
		Node: &corev3.Node{Id: gatewayNode}, TypeUrl: resource.ClusterType, ResourceNamesSubscribe: []string{"*"},
	}))
	resp, err := delta.Recv()
	require.NoError(t, err)
	var names []string
	for _, r := range resp.GetResources() {
		names = append(names, r.GetName())
	}
	slices.Sort(names)
	require.Equal(t, []string{"isthmus-federation", echoCluster, "outbound|9090||echo.demo.svc.cluster.local"}, names)
}

// A burst of catalog changes becomes a few pushes, and the last state
// is what is served.
func TestBurstIsCoalesced(t *testing.T) {
	f := newFixture(t, Options{Coalesce: 200 * time.Millisecond})
	var last *catalog.Snapshot
	for i := range 50 {
		w := webService()
		w.Endpoints[0].Addresses[0].IP = fmt.Sprintf("10.0.9.%d", i+1)
		last = f.setCatalog(echoService(), w)
	}
	f.waitTranslated(last.Version())
	w := webService()
	w.Endpoints[0].Addresses[0].IP = "10.0.9.50"
	require.Equal(t, translated(t, echoService(), w).Version, f.srv.Status().Gateway.Version)
	require.Less(t, f.metric("isthmus_xds_snapshot_updates"), int64(10), "50 changes in a burst")
}

// When Run ends, open streams end with it, so the gRPC server stops
// gracefully instead of waiting for proxies that never hang up.
func TestRunEndEndsStreams(t *testing.T) {
	f := newFixture(t, Options{})
	f.setCatalog()
	gw := openADS(t, f.dialTLS(svidOf(t, f.ca, gatewayID)), gatewayNode)
	gw.subscribe()
	gw.syncTo(translated(t))
	f.stopRun()
	select {
	case err := <-gw.err:
		require.Error(t, err)
	case <-time.After(wait):
		t.Fatal("stream still open after Run returned")
	}
	stopped := make(chan struct{})
	go func() {
		f.secure.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(wait):
		t.Fatal("graceful stop waits for the proxy")
	}
	require.Equal(t, int64(0), f.metric("isthmus_xds_connected_proxies"))
}

func TestNewServerNeedsItsInputs(t *testing.T) {
	bundles := trust.NewStore(tdA)
	_, err := NewServer(catalog.NewStore(), tdA, bundles, Options{})
	require.ErrorContains(t, err, "no federation upstream")
	_, err = NewServer(catalog.NewStore(), spiffeid.TrustDomain{}, bundles, Options{Gateway: GatewayOptions{FederationUpstream: "127.0.0.1:15019"}})
	require.ErrorContains(t, err, "trust domain")
	var none TrustBundles
	_, err = NewServer(catalog.NewStore(), tdA, none, Options{Gateway: GatewayOptions{FederationUpstream: "127.0.0.1:15019"}})
	require.ErrorContains(t, err, "bundle source")
}
