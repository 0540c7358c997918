package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

const (
	echoSNI     = "outbound_.80_._.echo.demo.svc.cluster.local"
	echoCluster = "outbound|80||echo.demo.svc.cluster.local"
	gatewayNode = "eastwest-gw~10.0.0.5~eastwest-gw-0.isthmus-system~isthmus-system.svc.cluster.local"
)

// TestGatewayXDS fetches the east-west gateway's configuration from the
// real federator binary over ADS, as the gateway does: in plaintext on
// the harness's port, and over TLS on :15012 with an SVID the same
// federator's CA issued to a real ServiceAccount token. An exported
// Service with real pods becomes a filter chain whose endpoints are the
// pods' IPs at the target port; unexporting it removes the chain.
func TestGatewayXDS(t *testing.T) {
	env := localcluster.StartT(t, "a")
	if !env.Isolated() {
		t.Skip("needs root: without network namespaces pods have loopback IPs, which EndpointSlices refuse")
	}
	installIsthmus(t, env)
	a := env.Cluster("a")
	ctx := t.Context()
	kc := a.Client()
	adminCfg, err := a.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	mcs, err := mcsclient.NewForConfig(adminCfg)
	require.NoError(t, err)

	var podIPs []string
	for i := range 2 {
		w, err := a.RunWorkload(ctx, localcluster.WorkloadSpec{
			Name: fmt.Sprintf("echo-%d", i), Namespace: "demo", Labels: map[string]string{"app": "echo"},
			Command: []string{filepath.Join(binDir, "echo")}, Env: []string{"CLUSTER_NAME=a"}, ReadyPort: 8080,
		})
		require.NoError(t, err)
		podIPs = append(podIPs, w.IP.String())
	}
	slices.Sort(podIPs)
	_, err = kc.CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "echo"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = mcs.MulticlusterV1alpha1().ServiceExports("demo").Create(ctx,
		&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"}}, metav1.CreateOptions{})
	require.NoError(t, err)

	f := startFederator(t, a)

	// Plaintext (tests only): the chain, and the pods at the target port.
	plain, err := grpc.NewClient(f.XDSAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = plain.Close() })
	gw := openGatewayXDS(t, plain)
	var want []string
	for _, ip := range podIPs {
		want = append(want, ip+":8080 HEALTHY")
	}
	gw.until("the echo chain with both pods", func() bool {
		return slices.Contains(gw.snis(), echoSNI) && slices.Equal(gw.endpoints(echoCluster), want)
	})
	require.Equal(t, []string{federation.ReservedSNI, echoSNI}, gw.snis())
	fed := gw.clusters["isthmus-federation"]
	require.NotNil(t, fed)
	require.Equal(t, clusterv3.Cluster_STATIC, fed.GetType(), "the harness points the gateway at the federator's IP")

	// The federator shows what it serves and to whom.
	served, err := f.XDS(ctx)
	require.NoError(t, err)
	require.Equal(t, gw.versions[resource.ListenerType], served.Gateway.Versions[resource.ListenerType])
	require.Contains(t, served.Gateway.Resources[resource.ClusterType], echoCluster)
	require.Eventually(t, func() bool {
		st, err := f.XDS(ctx)
		return err == nil && len(st.Proxies) == 1 && st.Proxies[0].Node == gatewayNode && len(st.Proxies[0].Acked) == 3
	}, 10*time.Second, 50*time.Millisecond, "the gateway's stream and ACKs in /debug/xds")

	// Over TLS on :15012 with an SVID from the federator's own CA, got
	// with a real ServiceAccount token on the same port.
	src, roots := svidFromFederator(t, kc, f, "isthmus-system", "isthmus-eastwest-gw")
	bundle, err := x509bundle.Parse(td, roots)
	require.NoError(t, err)
	secure, err := grpc.NewClient(f.CAAddr, grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.MTLSClientConfig(src, bundle, tlsconfig.AuthorizeID(federatorID)))))
	require.NoError(t, err)
	t.Cleanup(func() { _ = secure.Close() })
	tlsGW := openGatewayXDS(t, secure)
	tlsGW.until("the same configuration over TLS", func() bool {
		return tlsGW.versions[resource.EndpointType] == gw.versions[resource.EndpointType] && tlsGW.versions[resource.ListenerType] == gw.versions[resource.ListenerType]
	})
	require.Equal(t, want, tlsGW.endpoints(echoCluster))

	// Without a client certificate: refused, with the reason.
	anon, err := grpc.NewClient(f.CAAddr, grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(federatorID)))))
	require.NoError(t, err)
	t.Cleanup(func() { _ = anon.Close() })
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(anon).StreamAggregatedResources(ctx)
	require.NoError(t, err)
	_ = stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: gatewayNode}, TypeUrl: resource.ListenerType})
	_, err = stream.Recv()
	require.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "no client certificate was presented")

	// Unexport: the chain goes, on both streams.
	require.NoError(t, mcs.MulticlusterV1alpha1().ServiceExports("demo").Delete(ctx, "echo", metav1.DeleteOptions{}))
	gw.until("the echo chain removed", func() bool { return !slices.Contains(gw.snis(), echoSNI) })
	require.Equal(t, []string{federation.ReservedSNI}, gw.snis())
	require.NotContains(t, gw.clusters, echoCluster)
	tlsGW.until("the echo chain removed over TLS", func() bool { return !slices.Contains(tlsGW.snis(), echoSNI) })

	metrics, err := f.Metrics(ctx)
	require.NoError(t, err)
	require.Contains(t, metrics, `isthmus_xds_connected_proxies{transport="plaintext"} 1`)
	require.Contains(t, metrics, `isthmus_xds_connected_proxies{transport="tls"} 1`)
	require.Contains(t, metrics, `isthmus_xds_streams_refused_total 1`)
	require.Contains(t, metrics, `isthmus_xds_snapshot_updates_total{role="eastwest-gw"}`)
}

// gatewayXDS is a raw ADS stream driven the way the gateway drives it:
// listeners and clusters by wildcard, endpoints by the EDS clusters'
// names, every response ACKed.
type gatewayXDS struct {
	t      *testing.T
	stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *corev3.Node
	resps  chan *discoveryv3.DiscoveryResponse
	errs   chan error

	versions, nonces map[string]string
	listener         *listenerv3.Listener
	clusters         map[string]*clusterv3.Cluster
	loads            map[string]*endpointv3.ClusterLoadAssignment
}

func openGatewayXDS(t *testing.T, conn *grpc.ClientConn) *gatewayXDS {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	require.NoError(t, err)
	g := &gatewayXDS{
		t: t, stream: stream, node: &corev3.Node{Id: gatewayNode, Cluster: "a"},
		resps: make(chan *discoveryv3.DiscoveryResponse, 16), errs: make(chan error, 1),
		versions: map[string]string{}, nonces: map[string]string{},
		clusters: map[string]*clusterv3.Cluster{}, loads: map[string]*endpointv3.ClusterLoadAssignment{},
	}
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				g.errs <- err
				return
			}
			g.resps <- r
		}
	}()
	g.send(resource.ClusterType, nil)
	g.send(resource.ListenerType, nil)
	return g
}

func (g *gatewayXDS) send(typeURL string, names []string) {
	g.t.Helper()
	require.NoError(g.t, g.stream.Send(&discoveryv3.DiscoveryRequest{
		Node: g.node, TypeUrl: typeURL, ResourceNames: names,
		VersionInfo: g.versions[typeURL], ResponseNonce: g.nonces[typeURL],
	}))
}

// until applies responses until cond holds, at most 30 s.
func (g *gatewayXDS) until(what string, cond func() bool) {
	g.t.Helper()
	deadline := time.After(30 * time.Second)
	for !cond() {
		select {
		case r := <-g.resps:
			g.apply(r)
		case err := <-g.errs:
			g.t.Fatalf("%s: ADS stream ended: %v", what, err)
		case <-deadline:
			g.t.Fatalf("%s: not within 30s; SNIs %v, versions %v", what, g.snis(), g.versions)
		}
	}
}

func (g *gatewayXDS) apply(r *discoveryv3.DiscoveryResponse) {
	g.t.Helper()
	typ := r.GetTypeUrl()
	g.versions[typ], g.nonces[typ] = r.GetVersionInfo(), r.GetNonce()
	switch typ {
	case resource.ListenerType:
		require.Len(g.t, r.GetResources(), 1)
		g.listener = &listenerv3.Listener{}
		require.NoError(g.t, r.GetResources()[0].UnmarshalTo(g.listener))
		g.send(typ, nil)
	case resource.ClusterType:
		g.clusters = map[string]*clusterv3.Cluster{}
		for _, a := range r.GetResources() {
			c := &clusterv3.Cluster{}
			require.NoError(g.t, a.UnmarshalTo(c))
			g.clusters[c.GetName()] = c
		}
		g.send(typ, nil)
		g.send(resource.EndpointType, g.edsNames())
	case resource.EndpointType:
		g.loads = map[string]*endpointv3.ClusterLoadAssignment{}
		for _, a := range r.GetResources() {
			cla := &endpointv3.ClusterLoadAssignment{}
			require.NoError(g.t, a.UnmarshalTo(cla))
			g.loads[cla.GetClusterName()] = cla
		}
		g.send(typ, g.edsNames())
	}
}

func (g *gatewayXDS) edsNames() []string {
	var names []string
	for name, c := range g.clusters {
		if c.GetType() == clusterv3.Cluster_EDS {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names
}

func (g *gatewayXDS) snis() []string {
	var out []string
	for _, fc := range g.listener.GetFilterChains() {
		out = append(out, fc.GetFilterChainMatch().GetServerNames()...)
	}
	return out
}

// endpoints lists a cluster's endpoints as "ip:port HEALTH", sorted.
func (g *gatewayXDS) endpoints(cluster string) []string {
	var out []string
	for _, le := range g.loads[cluster].GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			sa := e.GetEndpoint().GetAddress().GetSocketAddress()
			out = append(out, fmt.Sprintf("%s:%d %s", sa.GetAddress(), sa.GetPortValue(), e.GetHealthStatus()))
		}
	}
	slices.Sort(out)
	return out
}
