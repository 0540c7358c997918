package xds

import (
	"context"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// podsAt is a local service of namespace demo whose ports are ports and
// whose pods are at ips, all ready in r1/z1.
func podsAt(name string, ports []catalog.Port, ips ...string) catalog.Service {
	s := catalog.Service{
		Namespace: "demo", Name: name, Cluster: "a", ClusterIP: "10.96.1." + string(rune('0'+len(name))),
		Identities: []string{"spiffe://a.mesh/ns/demo/sa/" + name}, Ports: ports,
	}
	le := catalog.LocalityEndpoints{Locality: catalog.Locality{Region: "r1", Zone: "z1"}}
	for _, ip := range ips {
		le.Addresses = append(le.Addresses, catalog.Address{IP: ip, Ready: true})
		le.Ready++
	}
	s.Endpoints = []catalog.LocalityEndpoints{le}
	return s
}

// chainPorts describes a profile's inbound chains: "<port>/HTTP" or
// "<port>/TCP" for a port chain, "alpn/HTTP" and "any/TCP" for the
// listener's own.
func chainPorts(t testing.TB, l *listenerv3.Listener) []string {
	t.Helper()
	var out []string
	for _, fc := range l.GetFilterChains() {
		m := fc.GetFilterChainMatch()
		require.Equal(t, "tls", m.GetTransportProtocol(), "every inbound chain is mTLS")
		require.NotNil(t, fc.GetTransportSocket(), "every inbound chain terminates TLS")
		proto := "TCP"
		if fc.GetFilters()[0].GetName() == "envoy.filters.network.http_connection_manager" {
			proto = "HTTP"
		}
		switch {
		case m.GetDestinationPort() != nil:
			require.Empty(t, m.GetApplicationProtocols(), "a port chain takes every ALPN")
			out = append(out, DeclaredPort{Port: uint16(m.GetDestinationPort().GetValue()), HTTP: proto == "HTTP"}.String())
		case len(m.GetApplicationProtocols()) > 0:
			out = append(out, "alpn/"+proto)
		default:
			out = append(out, "any/"+proto)
		}
	}
	return out
}

// A pod's inbound listener has a chain per port its Services declare,
// by target port, HTTP or TCP as declared, before the ALPN chains; pods
// that declare the same ports share it; a port two Services declare
// with different protocols keeps the first one's, and the other is
// reported; ports that are not TCP or whose target port is unknown
// declare nothing.
func TestInboundProfiles(t *testing.T) {
	web := podsAt("web", []catalog.Port{
		{Name: "http", Port: 80, TargetPort: 8080},
		{Name: "grpc", Port: 9090, TargetPort: 9090},
		{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP, TargetPort: 5353},
		{Name: "unknown", Port: 81},
	}, "10.0.1.2", "10.0.1.3")
	db := podsAt("db", []catalog.Port{{Name: "tcp-pg", Port: 5432, TargetPort: 5432}}, "10.0.1.3")
	// zlegacy selects web-1 too and says 8080 is TCP; it comes after web
	// in key order, so web's HTTP stands.
	legacy := podsAt("zlegacy", []catalog.Port{{Name: "tcp", Port: 8080, TargetPort: 8080}}, "10.0.1.3")
	in := SidecarInput{InCluster: inClusterSnapshot(t, web, db, legacy)}
	res, skipped, err := TranslateSidecar(in, SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	require.Contains(t, skipped, Skipped{Service: "demo/zlegacy", Reason: "target port 8080 is TCP here but HTTP in demo/web, which comes first, for pods both select: their inbound chain for it is HTTP"})

	require.Equal(t, map[string]int{"8080/HTTP,9090/HTTP": 1, "5432/TCP,8080/HTTP,9090/HTTP": 1}, func() map[string]int {
		out := map[string]int{}
		for k, st := range res.Inbound.Status() {
			out[k] = st.Pods
		}
		return out
	}())
	at := func(ip string) string {
		return nodeid.ID{Role: nodeid.RoleSidecar, IP: ip, Pod: "p", Namespace: "demo"}.String()
	}
	require.Equal(t, []string{"8080/HTTP", "9090/HTTP", "alpn/HTTP", "any/TCP"}, chainPorts(t, res.Inbound.Listeners(at("10.0.1.2"))[0]))
	require.Equal(t, []string{"5432/TCP", "8080/HTTP", "9090/HTTP", "alpn/HTTP", "any/TCP"}, chainPorts(t, res.Inbound.Listeners(at("10.0.1.3"))[0]))
	require.Nil(t, res.Inbound.Listeners(at("10.0.9.9")), "a pod no Service selects gets the base listeners")
	require.Equal(t, []string{"alpn/HTTP", "any/TCP"}, chainPorts(t, res.Listeners[0]))

	// The node ID's pod IP picks the profile; an IPv4-mapped one too.
	for id, want := range map[string]string{
		nodeid.ID{Role: nodeid.RoleSidecar, IP: "10.0.1.2", Pod: "web-0", Namespace: "demo"}.String():        res.Inbound.byKey["8080/HTTP,9090/HTTP"].version,
		nodeid.ID{Role: nodeid.RoleSidecar, IP: "::ffff:10.0.1.3", Pod: "web-1", Namespace: "demo"}.String(): res.Inbound.byKey["5432/TCP,8080/HTTP,9090/HTTP"].version,
		nodeid.ID{Role: nodeid.RoleSidecar, IP: "10.0.9.9", Pod: "other", Namespace: "demo"}.String():        res.ListenersVersion,
		"sidecar~not-an-ip~x.demo~demo.svc.cluster.local":                                                    res.ListenersVersion,
	} {
		require.Equal(t, want, res.TypeVersionsFor(id)[resource.ListenerType], id)
	}

	// The incremental translator makes the same, and keeps what it made
	// while the pods' declarations and the base listeners stay.
	tr, err := NewSidecarTranslator(SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	got, gotSkipped, err := tr.Translate(in)
	require.NoError(t, err)
	require.Equal(t, res.Version, got.Version)
	require.Equal(t, renderSidecar(t, res, skipped), renderSidecar(t, got, gotSkipped))
	// A pod turning not ready changes neither what the pods declare nor
	// the listeners: the profiles' listeners are not made again.
	webDown := web.Clone()
	webDown.Endpoints[0].Addresses[0].Ready = false
	webDown.Endpoints[0].Ready, webDown.Endpoints[0].NotReady = 1, 1
	flip, _, err := tr.Translate(SidecarInput{InCluster: inClusterSnapshot(t, webDown, db, legacy)})
	require.NoError(t, err)
	require.NotEqual(t, got.EndpointsVersion, flip.EndpointsVersion)
	require.Equal(t, got.Inbound.Version, flip.Inbound.Version)
	for k, pr := range got.Inbound.byKey {
		require.Same(t, pr.listeners[0], flip.Inbound.byKey[k].listeners[0], "profile %s", k)
	}
	again, _, err := tr.Translate(SidecarInput{InCluster: in.InCluster, Peers: []*catalog.Snapshot{peerSnapshot(t, "b", peerEcho("b", catalog.Locality{Region: "r1"}, 1, 0, "192.0.2.1:15443"))}})
	require.NoError(t, err)
	require.NotEqual(t, got.ListenersVersion, again.ListenersVersion, "the import adds an outbound chain")
	require.NotEqual(t, got.Inbound.byKey["8080/HTTP,9090/HTTP"].version, again.Inbound.byKey["8080/HTTP,9090/HTTP"].version,
		"a profile's version covers the outbound listener it serves")
	require.Same(t, again.Listeners[1], again.Inbound.byKey["8080/HTTP,9090/HTTP"].listeners[1])

	// Without any declared port there are no profiles, and the version
	// is what it was before profiles existed (no "inbound" in it).
	none, _, err := TranslateSidecar(SidecarInput{}, SidecarOptions{})
	require.NoError(t, err)
	require.Nil(t, none.Inbound)
	bare := none
	bare.combine()
	require.Equal(t, none.Version, bare.Version)
}

// The cache serves each sidecar the listeners of its pod's profile, and
// the rest of the snapshot to all alike; when a new snapshot changes a
// pod's profile, its open listener watch is answered with its new
// listeners, and the watch of a pod whose listeners did not change is
// not. Listeners the profiles share are encoded once.
func TestCacheServesEachPodItsProfile(t *testing.T) {
	c := newEncodedCache(nodeGroups{}, nil)
	node := func(ip string) *corev3.Node {
		return &corev3.Node{Id: nodeid.ID{Role: nodeid.RoleSidecar, IP: ip, Pod: "p", Namespace: "demo"}.String()}
	}
	web0, web1, other := node("10.0.1.2"), node("10.0.1.3"), node("10.0.9.9")
	web := []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}}
	set := func(svcs ...catalog.Service) Resources {
		t.Helper()
		res, _, err := TranslateSidecar(SidecarInput{InCluster: inClusterSnapshot(t, svcs...)}, SidecarOptions{Region: "r1"})
		require.NoError(t, err)
		snap, err := res.served()
		require.NoError(t, err)
		require.NoError(t, c.SetSnapshot(context.Background(), sidecarGroup, snap))
		return res
	}
	type watch struct {
		ch chan cache.Response
	}
	open := func(n *corev3.Node, version string) watch {
		t.Helper()
		sub := stream.NewSotwSubscription(nil, true)
		if version != "" {
			// The stream holds both listeners at version.
			sub.SetReturnedResources(map[string]string{InboundListenerName: version, OutboundListenerName: version})
		}
		w := watch{ch: make(chan cache.Response, 1)}
		_, err := c.CreateWatch(&discoveryv3.DiscoveryRequest{Node: n, TypeUrl: resource.ListenerType, VersionInfo: version}, &sub, w.ch)
		require.NoError(t, err)
		return w
	}
	inbound := func(r cache.Response) (string, []string) {
		t.Helper()
		resp, err := r.GetDiscoveryResponse()
		require.NoError(t, err)
		for _, a := range resp.GetResources() {
			l := unpack[*listenerv3.Listener](t, a)
			if l.GetName() == InboundListenerName {
				return resp.GetVersionInfo(), chainPorts(t, l)
			}
		}
		t.Fatal("no inbound listener")
		return "", nil
	}

	r1 := set(podsAt("web", web, "10.0.1.2", "10.0.1.3"))
	v0, ch0 := inbound(receive(open(web0, "").ch))
	v1, ch1 := inbound(receive(open(web1, "").ch))
	vo, cho := inbound(receive(open(other, "").ch))
	require.Equal(t, []string{"8080/HTTP", "alpn/HTTP", "any/TCP"}, ch0)
	require.Equal(t, ch0, ch1)
	require.Equal(t, v0, v1, "one profile, one version")
	require.Equal(t, r1.TypeVersionsFor(web0.GetId())[resource.ListenerType], v0)
	require.Equal(t, []string{"alpn/HTTP", "any/TCP"}, cho)
	require.Equal(t, r1.ListenersVersion, vo)

	// Each profile's listeners and the base ones share the outbound
	// listener's encoding.
	c.mu.Lock()
	g := c.group(sidecarGroup)
	base, err := g.typ(resource.ListenerType, other)
	require.NoError(t, err)
	prof, err := g.typ(resource.ListenerType, web0)
	require.NoError(t, err)
	require.Same(t, base.items[base.index[OutboundListenerName]], prof.items[prof.index[OutboundListenerName]])
	c.mu.Unlock()

	// Now web-1 also serves db's 5432: its watch is answered with its
	// new profile's listeners.
	w0, w1, wo := open(web0, v0), open(web1, v1), open(other, vo)
	r2 := set(podsAt("web", web, "10.0.1.2", "10.0.1.3"), podsAt("db", []catalog.Port{{Name: "tcp", Port: 5432, TargetPort: 5432}}, "10.0.1.3"))
	v1b, ch1b := inbound(receive(w1.ch))
	require.Equal(t, []string{"5432/TCP", "8080/HTTP", "alpn/HTTP", "any/TCP"}, ch1b)
	require.Equal(t, r2.TypeVersionsFor(web1.GetId())[resource.ListenerType], v1b)
	// db adds an outbound chain: every listener version moves, so the
	// others are answered too, with their own profile's listeners.
	v0b, ch0b := inbound(receive(w0.ch))
	require.Equal(t, []string{"8080/HTTP", "alpn/HTTP", "any/TCP"}, ch0b)
	require.NotEqual(t, v0b, v1b)
	_, chob := inbound(receive(wo.ch))
	require.Equal(t, []string{"alpn/HTTP", "any/TCP"}, chob)

	// The same snapshot again answers nobody.
	db := podsAt("db", []catalog.Port{{Name: "tcp", Port: 5432, TargetPort: 5432}}, "10.0.1.3")
	w0, w1, wo = open(web0, v0b), open(web1, v1b), open(other, r2.ListenersVersion)
	set(podsAt("web", web, "10.0.1.2", "10.0.1.3"), db)
	require.Empty(t, w0.ch)
	require.Empty(t, w1.ch)
	require.Empty(t, wo.ch)

	// A new pod of web changes no shared listener, only that pod's
	// profile: its watch alone is answered.
	r3 := set(podsAt("web", web, "10.0.1.2", "10.0.1.3", "10.0.9.9"), db)
	require.Equal(t, r2.ListenersVersion, r3.ListenersVersion)
	vob, chob := inbound(receive(wo.ch))
	require.Equal(t, []string{"8080/HTTP", "alpn/HTTP", "any/TCP"}, chob)
	require.Equal(t, v0b, vob, "the profile web-0 has")
	require.Empty(t, w0.ch)
	require.Empty(t, w1.ch)

	// A profile no pod has any more is forgotten with its encodings.
	set(podsAt("web", web, "10.0.1.2"))
	c.mu.Lock()
	defer c.mu.Unlock()
	for key := range c.group(sidecarGroup).encoded {
		require.NotContains(t, key, "5432/TCP", "the encodings of a profile gone")
	}
}

// With the declared ports (every Service with endpoints, the pod behind
// each address), a pod is found by its name, whatever address its node
// ID carries: a single-stack IPv6 Service still protects pods whose
// primary address is IPv4. Each entry of a Service declares the numbers
// its own pods listen on. The local and in-cluster catalogs are then not
// read: the declared ports hold their services too.
func TestInboundProfilesFromTheDeclaredPorts(t *testing.T) {
	entry := func(name string, port catalog.Port, addrs ...catalog.Address) catalog.Service {
		return catalog.Service{Namespace: "demo", Name: name, Cluster: "a", Ports: []catalog.Port{port},
			Endpoints: []catalog.LocalityEndpoints{{Ready: len(addrs), Addresses: addrs}}}
	}
	http := catalog.Port{Name: "http", Port: 80, AppProtocol: "http", TargetPort: 8080}
	http9090 := http
	http9090.TargetPort = 9090
	decl, err := catalog.NewSnapshot(catalog.DeclaredSource, []catalog.Service{
		entry("v6only", http, catalog.Address{IP: "fd00::2", Ready: true, Pod: "web-0"}),
		entry("named", http, catalog.Address{IP: "10.0.1.7", Ready: true, Pod: "named-a"}),
		entry("named@9090", http9090, catalog.Address{IP: "10.0.1.8", Ready: true, Pod: "named-b"}),
		entry("headless", catalog.Port{Name: "tcp-db", Port: 5432, TargetPort: 5432}, catalog.Address{IP: "10.0.1.9", Pod: "db-0"}),
	})
	require.NoError(t, err)
	// A local export the declared ports do not hold: not read.
	res, _, err := TranslateSidecar(SidecarInput{Local: snapshotOf(t, localEcho()), Declared: decl}, SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	node := func(ip, pod string) string {
		return nodeid.ID{Role: nodeid.RoleSidecar, IP: ip, Pod: pod, Namespace: "demo"}.String()
	}
	for _, tc := range []struct {
		id   string
		want []string
	}{
		{node("10.0.1.2", "web-0"), []string{"8080/HTTP", "alpn/HTTP", "any/TCP"}},
		{node("10.0.1.7", "named-a"), []string{"8080/HTTP", "alpn/HTTP", "any/TCP"}},
		{node("10.0.1.8", "named-b"), []string{"9090/HTTP", "alpn/HTTP", "any/TCP"}},
		{node("10.0.1.9", "db-0"), []string{"5432/TCP", "alpn/HTTP", "any/TCP"}},
	} {
		l := res.Inbound.Listeners(tc.id)
		require.NotNil(t, l, tc.id)
		require.Equal(t, tc.want, chainPorts(t, l[0]), tc.id)
		require.Equal(t, res.Inbound.byKey[strings.Join(tc.want[:len(tc.want)-2], ",")].version, res.TypeVersionsFor(tc.id)[resource.ListenerType], tc.id)
	}
	// localEcho's pod 10.0.1.3, known only to the local catalog.
	require.Nil(t, res.Inbound.Listeners(node("10.0.1.3", "echo-1")), "the local catalog is not read")

	// The incremental translator agrees.
	tr, err := NewSidecarTranslator(SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	got, gotSkipped, err := tr.Translate(SidecarInput{Local: snapshotOf(t, localEcho()), Declared: decl})
	require.NoError(t, err)
	_, wantSkipped, _ := TranslateSidecar(SidecarInput{Local: snapshotOf(t, localEcho()), Declared: decl}, SidecarOptions{Region: "r1"})
	requireSameSidecar(t, res, got, wantSkipped, gotSkipped, "declared")
}
