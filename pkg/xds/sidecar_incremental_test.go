package xds

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

// requireSameSidecar fails unless got is want byte for byte: the same
// versions (of each type and of all), the same skipped list, and in the same order resources whose
// deterministic encodings are equal.
func requireSameSidecar(t testing.TB, want, got Resources, wantSkipped, gotSkipped []Skipped, msg string) {
	t.Helper()
	require.Equal(t, want.Names(), got.Names(), "%s: names", msg)
	same := func(kind string, a, b proto.Message) {
		t.Helper()
		x, err := deterministic.Marshal(a)
		require.NoError(t, err)
		y, err := deterministic.Marshal(b)
		require.NoError(t, err)
		require.Equal(t, x, y, "%s: %s differs", msg, kind)
	}
	for i := range want.Listeners {
		same("listener "+want.Listeners[i].GetName(), want.Listeners[i], got.Listeners[i])
	}
	for i := range want.Routes {
		same("route "+want.Routes[i].GetName(), want.Routes[i], got.Routes[i])
	}
	for i := range want.Clusters {
		same("cluster "+want.Clusters[i].GetName(), want.Clusters[i], got.Clusters[i])
	}
	for i := range want.Endpoints {
		same("endpoints "+want.Endpoints[i].GetClusterName(), want.Endpoints[i], got.Endpoints[i])
	}
	require.Equal(t, wantSkipped, gotSkipped, "%s: skipped", msg)
	// The pods' inbound profiles: which pod has which, and each one's
	// listener.
	require.Equal(t, want.Inbound == nil, got.Inbound == nil, "%s: profiles", msg)
	if want.Inbound != nil {
		require.Equal(t, want.Inbound.pods, got.Inbound.pods, "%s: pods' profiles", msg)
		require.Equal(t, want.Inbound.Status(), got.Inbound.Status(), "%s: profiles", msg)
		for k, pr := range want.Inbound.byKey {
			same("profile "+k, pr.listeners[0], got.Inbound.byKey[k].listeners[0])
			require.Same(t, got.Listeners[1], got.Inbound.byKey[k].listeners[1], "%s: profile %s serves the outbound listener", msg, k)
		}
	}
	require.Equal(t, want.TypeVersions(), got.TypeVersions(), "%s: versions by type", msg)
	require.Equal(t, want.Version, got.Version, "%s: version", msg)
}

// The golden cases, each from a fresh translator, and all of them in
// turn through one translator: every result is TranslateSidecar's and
// the golden file's.
func TestSidecarTranslatorGolden(t *testing.T) {
	chained := map[string]*SidecarTranslator{}
	for _, region := range []string{"r1", "r2", ""} {
		tr, err := NewSidecarTranslator(SidecarOptions{Region: region})
		require.NoError(t, err)
		chained[region] = tr
	}
	cases := sidecarCases()
	// Forth and back, so every case follows two others.
	var seq []sidecarCase
	seq = append(seq, cases...)
	for i := len(cases) - 1; i >= 0; i-- {
		seq = append(seq, cases[i])
	}
	for _, tc := range seq {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.input(t)
			want, wantSkipped := tc.translate(t)
			fresh, err := NewSidecarTranslator(SidecarOptions{Region: tc.region})
			require.NoError(t, err)
			got, gotSkipped, err := fresh.Translate(in)
			require.NoError(t, err)
			requireSameSidecar(t, want, got, wantSkipped, gotSkipped, "fresh")
			golden(t, "sidecar-"+tc.name+".json", renderSidecar(t, got, gotSkipped))

			got, gotSkipped, err = chained[tc.region].Translate(in)
			require.NoError(t, err)
			requireSameSidecar(t, want, got, wantSkipped, gotSkipped, "after other cases")
			validateResources(t, got)
			xs, err := got.Snapshot()
			require.NoError(t, err)
			require.NoError(t, xs.Consistent())
		})
	}
}

// randomMesh makes random catalogs for a cluster "a" and peers b, c, d:
// services from a small pool of names (two of which share a VIP hash),
// exported by any of the clusters, with random ports (HTTP, TCP, UDP, a
// port some exporters define differently), localities in two regions,
// pods (some not ready, some not an IP), gateways (some hostnames, some
// shared by two peers) and identities (sometimes none).
type randomMesh struct {
	rng   *rand.Rand
	local *catalog.Builder
	peers map[string]*catalog.Builder
	// gone are the peers whose imports are not in the store.
	gone map[string]bool
	// inCluster are a's in-cluster services.
	inCluster *catalog.Builder
	// declared makes catalogs give the declared ports too.
	declared bool
}

var meshPeers = []string{"b", "c", "d"}

func newRandomMesh(seed uint64) *randomMesh {
	m := &randomMesh{rng: rand.New(rand.NewPCG(seed, 7)), local: catalog.NewBuilder(catalog.LocalSource),
		peers: map[string]*catalog.Builder{}, gone: map[string]bool{}, inCluster: catalog.NewBuilder(catalog.InClusterSource)}
	for _, p := range meshPeers {
		m.peers[p] = catalog.NewBuilder(p)
	}
	return m
}

// key is one of the pool's names; svc134 and svc270 hash to one VIP, so
// adding and removing the first moves the second's.
func (m *randomMesh) key() catalog.ServiceKey {
	pool := []catalog.ServiceKey{{Namespace: "demo", Name: "svc134"}, {Namespace: "demo", Name: "svc270"},
		{Namespace: "demo", Name: "svc15"}, {Namespace: "demo", Name: "echo"}}
	if i := m.rng.IntN(len(pool) + 16); i < len(pool) {
		return pool[i]
	}
	i := m.rng.IntN(16)
	return catalog.ServiceKey{Namespace: fmt.Sprintf("ns%d", i%3), Name: fmt.Sprintf("s%d", i)}
}

// clusterIP is key's ClusterIP: one per key, IPv6 in namespace ns2, and
// svc15's in the clusterset VIP range (skipped).
func clusterIP(key catalog.ServiceKey) string {
	sum := sha256.Sum256([]byte(key.String()))
	switch {
	case key.Name == "svc15":
		return "240.240.1.1"
	case key.Namespace == "ns2":
		return fmt.Sprintf("fd00:96::%x", sum[0])
	}
	// Keys are few: the first two bytes of their hashes differ.
	return fmt.Sprintf("10.96.%d.%d", sum[0], sum[1])
}

func (m *randomMesh) service(key catalog.ServiceKey, cluster string) catalog.Service {
	r := m.rng
	svc := catalog.Service{Namespace: key.Namespace, Name: key.Name, Cluster: cluster}
	if r.IntN(8) > 0 {
		svc.Identities = []string{"spiffe://" + cluster + ".mesh/ns/" + key.Namespace + "/sa/" + key.Name}
		if r.IntN(4) == 0 {
			svc.Identities = append(svc.Identities, "spiffe://"+cluster+".mesh/ns/"+key.Namespace+"/sa/other")
		}
	}
	ports := []catalog.Port{
		{Name: "http", Port: 80, AppProtocol: "http", TargetPort: 8080},
		{Name: "grpc-api", Port: 9090},
		{Name: "tcp-db", Port: 5432, TargetPort: 15432},
		{Name: "http-alt", Port: 8080},
		// Port 81 is HTTP/1.1, HTTP/2 or TCP depending on the exporter,
		// by its appProtocol alone.
		{Name: "metrics", AppProtocol: []string{"http", "grpc", "tcp"}[r.IntN(3)], Port: 81},
		{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP},
		// The pod's 8080 again, as TCP: a conflict with "http", within
		// the service or with another one selecting the same pods.
		{Name: "tcp-raw", Port: 8081, TargetPort: 8080},
	}
	for _, p := range ports {
		if r.IntN(3) == 0 {
			svc.Ports = append(svc.Ports, p)
		}
	}
	if len(svc.Ports) == 0 {
		svc.Ports = ports[r.IntN(len(ports)):][:1]
	}
	regions := []string{"r1", "r2"}
	for z := range r.IntN(3) {
		le := catalog.LocalityEndpoints{Locality: catalog.Locality{Region: regions[r.IntN(2)], Zone: fmt.Sprintf("z%d", z)}}
		if cluster == "a" {
			for i := range 1 + r.IntN(3) {
				ip := fmt.Sprintf("10.%d.%d.%d", z, r.IntN(4), i)
				if r.IntN(20) == 0 {
					ip = "pod.example"
				}
				ready := r.IntN(3) > 0
				le.Addresses = append(le.Addresses, catalog.Address{IP: ip, Ready: ready})
				if ready {
					le.Ready++
				} else {
					le.NotReady++
				}
			}
		} else {
			le.Ready, le.NotReady = r.IntN(3), r.IntN(2)
			if le.Ready+le.NotReady == 0 {
				le.Ready = 1
			}
		}
		svc.Endpoints = append(svc.Endpoints, le)
	}
	if cluster != "a" {
		gws := map[string][]string{
			"b": {"192.0.2.10:15443", "192.0.2.11:15443"},
			"c": {"198.51.100.7:15443", "gw.c.example:15443"},
			// d shares b's first gateway now and then.
			"d": {"203.0.113.9:15443", "192.0.2.10:15443"},
		}[cluster]
		for _, g := range gws {
			if r.IntN(2) == 0 {
				svc.Gateways = append(svc.Gateways, g)
			}
		}
	}
	if r.IntN(6) == 0 {
		svc.Peers = []string{"b"}
	}
	return svc
}

// step makes one random change and describes it.
func (m *randomMesh) step(t testing.TB) string {
	t.Helper()
	r := m.rng
	cluster := "a"
	b := m.local
	inCluster := false
	switch i := r.IntN(5); {
	case i == 4:
		b, inCluster = m.inCluster, true
	case i > 0:
		cluster = meshPeers[i-1]
		b = m.peers[cluster]
	}
	key := m.key()
	switch op := r.IntN(20); {
	case op < 10:
		svc := m.service(key, cluster)
		if inCluster {
			svc.ClusterIP = clusterIP(key)
			require.NoError(t, b.Put(svc))
			return fmt.Sprintf("put %s in-cluster", key)
		}
		require.NoError(t, b.Put(svc))
		return fmt.Sprintf("put %s in %s", key, cluster)
	case op < 15:
		b.Delete(key)
		return fmt.Sprintf("delete %s from %s", key, cluster)
	case op < 16 && cluster != "a" && !inCluster:
		m.gone[cluster] = !m.gone[cluster]
		return fmt.Sprintf("peer %s gone: %v", cluster, m.gone[cluster])
	case op < 17:
		// The same content in new entries, as a peer's full resend.
		fresh := catalog.NewBuilder(b.Build().Source())
		for svc := range b.Build().All() {
			require.NoError(t, fresh.Put(svc.Clone()))
		}
		switch {
		case inCluster:
			m.inCluster = fresh
		case cluster == "a":
			m.local = fresh
		default:
			m.peers[cluster] = fresh
		}
		return fmt.Sprintf("rebuild %s", cluster)
	case op < 18:
		// What the sidecar does not read.
		snap := b.Build()
		svc, ok := snap.Get(key)
		if !ok {
			return "nothing"
		}
		c := svc.Clone()
		c.Peers = append(c.Peers, "zz")
		require.NoError(t, b.Put(c))
		return fmt.Sprintf("narrow %s in %s", key, cluster)
	default:
		// Several at once.
		for range 2 + r.IntN(4) {
			m.step(t)
		}
		return "several"
	}
}

// catalogs are the current snapshots, the peers in a random order.
func (m *randomMesh) catalogs() SidecarInput {
	var peers []*catalog.Snapshot
	for _, p := range meshPeers {
		if !m.gone[p] {
			peers = append(peers, m.peers[p].Build())
		}
	}
	m.rng.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	in := SidecarInput{Local: m.local.Build(), InCluster: m.inCluster.Build(), Peers: peers}
	if m.declared {
		// What the exporter declares: the local and in-cluster services,
		// the in-cluster ones' addresses with the pod behind them.
		b := catalog.NewBuilder(catalog.DeclaredSource)
		for c, snap := range []*catalog.Snapshot{in.Local, in.InCluster} {
			for svc := range snap.All() {
				d := svc.Clone()
				d.Name = fmt.Sprintf("%s-%d", d.Name, c)
				d.Peers, d.ClusterIP = nil, ""
				for i := range d.Endpoints {
					for j := range d.Endpoints[i].Addresses {
						if c == 1 {
							d.Endpoints[i].Addresses[j].Pod = "pod-" + d.Endpoints[i].Addresses[j].IP
						}
					}
				}
				if err := b.Put(d); err != nil {
					panic(err)
				}
			}
		}
		in.Declared = b.Build()
	}
	return in
}

// Random sequences of adds, changes and removals of local and imported
// services, peers leaving and coming back, and full resends, each
// translated incrementally and from scratch.
func TestSidecarTranslatorRandomChanges(t *testing.T) {
	for seed := range uint64(6) {
		region := []string{"r1", "r2", ""}[seed%3]
		t.Run(fmt.Sprintf("seed=%d/region=%q", seed, region), func(t *testing.T) {
			opts := SidecarOptions{Region: region}
			m := newRandomMesh(seed)
			m.declared = seed%2 == 1
			tr, err := NewSidecarTranslator(opts)
			require.NoError(t, err)
			var prev Resources
			var prevInbound *InboundProfiles
			// What the in-cluster services made along the way: the
			// sequence must have exercised them.
			inClusterHTTP, inClusterTCP, inClusterSkipped := false, false, false
			// What the profiles went through: some, a pod's profile
			// changing, and conflicts.
			profiles, profileChanged, conflicts := false, false, false
			// With declared ports, AuthorizationPolicies too: pods
			// relabelled, policies set and deleted.
			policies := authz.NewStore("")
			policies.SetSynced()
			withPolicies, withPlaintext := false, false
			for i := range 250 {
				what := m.step(t)
				in := m.catalogs()
				if m.declared {
					what += "; " + m.policyStep(policies, in.InCluster)
					in.Policies = policies.Snapshot()
				}
				want, wantSkipped, err := TranslateSidecar(in, opts)
				require.NoError(t, err)
				got, gotSkipped, err := tr.Translate(in)
				require.NoError(t, err)
				msg := fmt.Sprintf("step %d (%s)", i, what)
				requireSameSidecar(t, want, got, wantSkipped, gotSkipped, msg)
				if got.Version == prev.Version {
					// Nothing the sidecars read changed: the very same result.
					require.Same(t, prev.Listeners[1], got.Listeners[1], msg)
				}
				if i%25 == 0 {
					validateResources(t, got)
				}
				xs, err := got.Snapshot()
				require.NoError(t, err, msg)
				require.NoError(t, xs.Consistent(), msg)
				prev = got
				for _, c := range got.Clusters {
					if strings.HasSuffix(c.GetName(), "."+InClusterDomain) {
						http := c.GetTypedExtensionProtocolOptions() != nil
						inClusterHTTP, inClusterTCP = inClusterHTTP || http, inClusterTCP || !http
					}
				}
				for _, sk := range gotSkipped {
					inClusterSkipped = inClusterSkipped || strings.HasPrefix(sk.Reason, "in-cluster service:")
					conflicts = conflicts || strings.Contains(sk.Reason, "inbound chain")
				}
				if got.Inbound != nil {
					profiles = true
					for k, pr := range got.Inbound.byKey {
						withPolicies = withPolicies || strings.Contains(k, authzSep)
						for _, fc := range pr.listeners[0].GetFilterChains() {
							withPlaintext = withPlaintext || fc.GetFilterChainMatch().GetTransportProtocol() == rawBufferTransport
						}
					}
					if prevInbound != nil {
						for ip, k := range got.Inbound.pods {
							if old, ok := prevInbound.pods[ip]; ok && old != k {
								profileChanged = true
							}
						}
					}
				}
				prevInbound = got.Inbound
			}
			require.True(t, inClusterHTTP && inClusterTCP && inClusterSkipped, "in-cluster HTTP %v, TCP %v, skipped %v", inClusterHTTP, inClusterTCP, inClusterSkipped)
			require.True(t, profiles && profileChanged && conflicts, "profiles %v, a pod's changed %v, conflicts %v", profiles, profileChanged, conflicts)
			require.Equal(t, m.declared, withPolicies, "profiles with policies")
			require.Equal(t, m.declared, withPlaintext, "profiles with plaintext chains")
		})
	}
}

// policyStep changes the AuthorizationPolicies or a pod's labels at
// random (the pods are the in-cluster services', named as catalogs
// declares them), and says what it did.
func (m *randomMesh) policyStep(store *authz.Store, inCluster *catalog.Snapshot) string {
	var pods []string
	for svc := range inCluster.All() {
		for _, le := range svc.Endpoints {
			for _, a := range le.Addresses {
				pods = append(pods, "pod-"+a.IP)
			}
		}
	}
	apps := []string{"x", "y"}
	switch n := m.rng.IntN(10); {
	case n < 3 && len(pods) > 0:
		pod := pods[m.rng.IntN(len(pods))]
		app := apps[m.rng.IntN(len(apps))]
		store.SetPod("demo", pod, map[string]string{"app": app})
		return "pod " + pod + " app=" + app
	case n < 5:
		name := fmt.Sprintf("p%d", m.rng.IntN(3))
		spec := &securityv1beta1.AuthorizationPolicy{Action: securityv1beta1.AuthorizationPolicy_Action(m.rng.IntN(2))}
		if app := m.rng.IntN(3); app < len(apps) {
			spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": apps[app]}}
		}
		for range m.rng.IntN(3) {
			spec.Rules = append(spec.Rules, &securityv1beta1.Rule{
				From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{"demo", "ops"}[m.rng.IntN(2):]}}},
				To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{strconv.Itoa(8000 + m.rng.IntN(3))}, Methods: []string{"GET"}[m.rng.IntN(2):]}}},
			})
		}
		store.SetPolicy(authz.Policy{Namespace: "demo", Name: name, Spec: spec})
		return "policy " + name
	case n < 6:
		name := fmt.Sprintf("p%d", m.rng.IntN(3))
		store.DeletePolicy("demo", name)
		return "no policy " + name
	case n < 7 && len(pods) > 0:
		pod := pods[m.rng.IntN(len(pods))]
		store.DeletePod("demo", pod)
		return "pod " + pod + " gone"
	case n < 8:
		name := fmt.Sprintf("pa%d", m.rng.IntN(2))
		mode := func() *securityv1beta1.PeerAuthentication_MutualTLS {
			return &securityv1beta1.PeerAuthentication_MutualTLS{Mode: securityv1beta1.PeerAuthentication_MutualTLS_Mode(m.rng.IntN(4))}
		}
		spec := &securityv1beta1.PeerAuthentication{Mtls: mode()}
		if app := m.rng.IntN(3); app < len(apps) {
			spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": apps[app]}}
			spec.PortLevelMtls = map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{}
			for range m.rng.IntN(3) {
				spec.PortLevelMtls[uint32(8000+m.rng.IntN(4))] = mode()
			}
		}
		store.SetPeerAuthentication(authz.PeerPolicy{Namespace: "demo", Name: name, Created: time.Unix(int64(m.rng.IntN(2)), 0), Spec: spec})
		return "peer authentication " + name
	case n < 9:
		name := fmt.Sprintf("pa%d", m.rng.IntN(2))
		store.DeletePeerAuthentication("demo", name)
		return "no peer authentication " + name
	}
	return "policies unchanged"
}

// A change of one service's endpoints makes that service's load
// assignment again and nothing else: every other message is the last
// result's.
func TestSidecarTranslatorReusesUnchangedServices(t *testing.T) {
	local, peers := sidecarBenchCatalogs(t, 40)
	tr, err := NewSidecarTranslator(SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	first, _, err := tr.Translate(SidecarInput{Local: local, Peers: peers})
	require.NoError(t, err)

	b := local.Builder()
	svc, ok := local.Get(catalog.ServiceKey{Namespace: "ns-03", Name: "svc-00003"})
	require.True(t, ok)
	c := podNotReady(svc, 0)
	require.NoError(t, b.Put(c))
	second, _, err := tr.Translate(SidecarInput{Local: b.Build(), Peers: peers})
	require.NoError(t, err)
	require.NotEqual(t, first.Version, second.Version)
	want, _, err := TranslateSidecar(SidecarInput{Local: b.Build(), Peers: peers}, SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	require.Equal(t, want.Version, second.Version)

	requireOnlyAssignmentsMadeAgain(t, first, second, "outbound|80||svc-00003.ns-03.svc.clusterset.local", "outbound|5432||svc-00003.ns-03.svc.clusterset.local")

	// The same catalogs again: the same result.
	third, _, err := tr.Translate(SidecarInput{Local: b.Build(), Peers: peers})
	require.NoError(t, err)
	require.Equal(t, second.Version, third.Version)
	require.Same(t, second.Endpoints[0], third.Endpoints[0])
}

// The same for an in-cluster service: one pod turning not ready makes
// its assignment again, and the listener, clusters and routes stay the
// messages they were.
func TestSidecarTranslatorReusesUnchangedInClusterServices(t *testing.T) {
	local, peers := sidecarBenchCatalogs(t, 40)
	in := catalog.NewBuilder(catalog.InClusterSource)
	for svc := range local.All() {
		c := svc.Clone()
		c.ClusterIP = clusterIP(c.Key())
		require.NoError(t, in.Put(c))
	}
	inCluster := in.Build()
	tr, err := NewSidecarTranslator(SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	first, _, err := tr.Translate(SidecarInput{Local: local, InCluster: inCluster, Peers: peers})
	require.NoError(t, err)

	key := catalog.ServiceKey{Namespace: "ns-03", Name: "svc-00003"}
	svc, ok := inCluster.Get(key)
	require.True(t, ok)
	c := podNotReady(svc, 0)
	b := inCluster.Builder()
	require.NoError(t, b.Put(c))
	next := SidecarInput{Local: local, InCluster: b.Build(), Peers: peers}
	second, _, err := tr.Translate(next)
	require.NoError(t, err)
	want, _, err := TranslateSidecar(next, SidecarOptions{Region: "r1"})
	require.NoError(t, err)
	require.Equal(t, want.Version, second.Version)
	require.Equal(t, first.ListenersVersion, second.ListenersVersion)
	require.NotEqual(t, first.EndpointsVersion, second.EndpointsVersion)

	requireOnlyAssignmentsMadeAgain(t, first, second, "outbound|80||svc-00003.ns-03.svc.cluster.local", "outbound|5432||svc-00003.ns-03.svc.cluster.local")
}

// requireOnlyAssignmentsMadeAgain checks that second is first with the
// assignments of the clusters named made again, and every other message
// the very one first had.
func requireOnlyAssignmentsMadeAgain(t *testing.T, first, second Resources, clusters ...string) {
	t.Helper()
	for i, e := range second.Endpoints {
		if slices.Contains(clusters, e.GetClusterName()) {
			require.NotSame(t, first.Endpoints[i], e, e.GetClusterName())
			continue
		}
		require.Same(t, first.Endpoints[i], e, e.GetClusterName())
	}
	for i, c := range second.Clusters {
		require.Same(t, first.Clusters[i], c, c.GetName())
	}
	for i, l := range second.Listeners {
		require.Same(t, first.Listeners[i], l, l.GetName())
	}
	for i, rc := range second.Routes {
		require.Same(t, first.Routes[i], rc, rc.GetName())
	}
}

// Endpoint changes anywhere among more ClusterLoadAssignments than one
// checkpoint of the endpoints' hash covers, then services added and
// removed (moving VIPs, chains and virtual hosts): each result is the
// from-scratch one, and an endpoint change resumes the hash at its
// block.
func TestSidecarTranslatorResumesTheHash(t *testing.T) {
	opts := SidecarOptions{Region: "r1"}
	const n = 2*claBlock + 100
	local, peers := sidecarBenchCatalogs(t, n)
	tr, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	b := local.Builder()
	check := func(what string) {
		t.Helper()
		snap := b.Build()
		want, wantSkipped, err := TranslateSidecar(SidecarInput{Local: snap, Peers: peers}, opts)
		require.NoError(t, err, what)
		got, gotSkipped, err := tr.Translate(SidecarInput{Local: snap, Peers: peers})
		require.NoError(t, err, what)
		requireSameSidecar(t, want, got, wantSkipped, gotSkipped, what)
	}
	check("all")
	require.NotEmpty(t, tr.checkpoints)
	keys := local.Keys()
	for _, i := range []int{0, claBlock - 1, claBlock, claBlock + 1, 2 * claBlock, n - 1} {
		svc, _ := local.Get(keys[i])
		c := podNotReady(svc, 1)
		require.NoError(t, b.Put(c))
		last, lastCheckpoints := tr.last, tr.checkpoints
		check(fmt.Sprintf("endpoints of %s", keys[i]))
		requireResumed(t, last, lastCheckpoints, tr.last, tr.checkpoints)
		require.NoError(t, b.Put(*svc))
		check(fmt.Sprintf("endpoints of %s back", keys[i]))
	}
	b.Delete(keys[7])
	check("one removed")
	extra, _ := sidecarBenchCatalogs(t, n+1)
	svc, _ := extra.Get(catalog.ServiceKey{Namespace: fmt.Sprintf("ns-%02d", n%10), Name: fmt.Sprintf("svc-%05d", n)})
	require.NoError(t, b.Put(*svc))
	check("one added")
}

// Bad catalogs are refused as TranslateSidecar refuses them, and the
// translator goes on from what it had.
func TestSidecarTranslatorRefusesWhatTranslateSidecarRefuses(t *testing.T) {
	opts := SidecarOptions{Region: "r1"}
	tr, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	tc := caseNamed(t, "local-and-peers-in-two-regions")
	local, peers := tc.snapshots(t)
	inCluster := inClusterSnapshot(t, inClusterEcho())
	good, _, err := tr.Translate(SidecarInput{Local: local, InCluster: inCluster, Peers: peers})
	require.NoError(t, err)

	// A second in-cluster service at echo's ClusterIP: the translator
	// keeps echo, and finds the clash around the fresh one.
	sameIP := inClusterEcho()
	sameIP.Namespace = "shop"
	for _, bad := range []struct {
		name      string
		local     *catalog.Snapshot
		inCluster *catalog.Snapshot
		peers     []*catalog.Snapshot
	}{
		{"local from a peer", peerSnapshot(t, "b"), inCluster, nil},
		{"a peer twice", local, inCluster, []*catalog.Snapshot{peerSnapshot(t, "b"), peerSnapshot(t, "b")}},
		{"a peer named local", local, inCluster, []*catalog.Snapshot{snapshotOf(t)}},
		// "c.a" in "b" and "c" in "a.b" are both c.a.b.svc.clusterset.local.
		{"two services, one host", snapshotOf(t, localEcho(),
			catalog.Service{Namespace: "b", Name: "c.a", Cluster: "a", Identities: []string{echoID}, Ports: []catalog.Port{{Port: 80}}},
			catalog.Service{Namespace: "a.b", Name: "c", Cluster: "a", Identities: []string{echoID}, Ports: []catalog.Port{{Port: 80}}},
		), inCluster, peers},
		{"in-cluster services from a peer", local, peerSnapshot(t, "b"), peers},
		{"two in-cluster services, one ClusterIP", local, inClusterSnapshot(t, inClusterEcho(), sameIP), peers},
	} {
		in := SidecarInput{Local: bad.local, InCluster: bad.inCluster, Peers: bad.peers}
		_, _, want := TranslateSidecar(in, opts)
		require.Error(t, want, bad.name)
		_, _, got := tr.Translate(in)
		require.EqualError(t, got, want.Error(), bad.name)
	}
	_, _, err = TranslateSidecar(SidecarInput{Local: snapshotOf(t,
		catalog.Service{Namespace: "b", Name: "c.a", Cluster: "a", Identities: []string{echoID}, Ports: []catalog.Port{{Port: 80}}},
		catalog.Service{Namespace: "a.b", Name: "c", Cluster: "a", Identities: []string{echoID}, Ports: []catalog.Port{{Port: 80}}},
	)}, opts)
	require.ErrorContains(t, err, `services a.b/c and b/c.a have one clusterset host "c.a.b.svc.clusterset.local"`)
	_, _, err = tr.Translate(SidecarInput{Local: local, InCluster: inClusterSnapshot(t, inClusterEcho(), sameIP), Peers: peers})
	require.EqualError(t, err, "in-cluster services demo/echo and shop/echo have one ClusterIP 10.96.0.10")
	_, _, err = tr.Translate(SidecarInput{Local: local, InCluster: peerSnapshot(t, "b"), Peers: peers})
	require.EqualError(t, err, `in-cluster catalog has source "b", not "in-cluster"`)

	again, _, err := tr.Translate(SidecarInput{Local: local, InCluster: inCluster, Peers: peers})
	require.NoError(t, err)
	requireSameSidecar(t, good, again, nil, nil, "after the refusals")
	other := caseNamed(t, "tcp-grpc-h2c-ports")
	local, peers = other.snapshots(t)
	want, wantSkipped := other.translate(t)
	got, gotSkipped, err := tr.Translate(SidecarInput{Local: local, Peers: peers})
	require.NoError(t, err)
	requireSameSidecar(t, want, got, wantSkipped, gotSkipped, "then another catalog")
}

// The outbound listener's and the route configurations' encodings made
// of their parts are their encodings; and were they not, the translator
// encodes them whole, with the same result.
func TestSidecarTranslatorEncodings(t *testing.T) {
	opts := SidecarOptions{Region: "r1"}
	tc := caseNamed(t, "tcp-grpc-h2c-ports")
	tc.local = append(tc.local, localEcho())
	local, peers := tc.snapshots(t)
	spliced, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	require.True(t, spliced.outbound.splice, "head, chains and tail are the listener's encoding")
	require.True(t, spliced.spliceRoutes, "name and virtual hosts are a route configuration's encoding")
	got, skipped, err := spliced.Translate(SidecarInput{Local: local, Peers: peers})
	require.NoError(t, err)
	want, wantSkipped := tc.translate(t)
	requireSameSidecar(t, want, got, wantSkipped, skipped, "spliced")

	whole, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	whole.outbound.splice, whole.spliceRoutes = false, false
	whole.explicitRoute, err = whole.route(ExplicitRouteName, nil)
	require.NoError(t, err)
	got, skipped, err = whole.Translate(SidecarInput{Local: local, Peers: peers})
	require.NoError(t, err)
	requireSameSidecar(t, want, got, wantSkipped, skipped, "whole")
	// And incrementally: one service removed.
	tc.local = tc.local[1:]
	local, peers = tc.snapshots(t)
	want, wantSkipped = tc.translate(t)
	got, skipped, err = whole.Translate(SidecarInput{Local: local, Peers: peers})
	require.NoError(t, err)
	requireSameSidecar(t, want, got, wantSkipped, skipped, "whole, one removed")
}
