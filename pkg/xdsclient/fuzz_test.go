package xdsclient

import (
	"crypto/x509"
	"slices"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/internal/pemutil"
)

// FuzzDecodeResources feeds arbitrary bytes as the Any-wrapped listener,
// cluster, assignment and ROOTCA Secret of a response: what a broken or
// hostile server could send. Decode must never panic, and what it accepts
// must keep the promises a published Config makes. The last argument is a
// whole sidecar resource set, decoded for the sidecar role
// (sidecar_fuzz_test.go).
func FuzzDecodeResources(f *testing.F) {
	alpha, beta := testRoot(f, "alpha.mesh"), testRoot(f, "beta.mesh")
	goodSecret := rootCA(f, map[string][]*x509.Certificate{"alpha.mesh": {alpha}, "beta.mesh": {beta}})
	marshal := func(m proto.Message) []byte {
		b, err := proto.Marshal(m)
		require.NoError(f, err)
		return b
	}
	seed := func(m *mutable, secret *tlsv3.Secret) {
		f.Add(marshal(m.l), marshal(m.eds), marshal(m.cla), marshal(secret), []byte{})
	}
	seed(newMutable(f), goodSecret)
	m := newMutable(f)
	m.fed = fedClusterFor("federator.example", 15012)
	m.eds = m.fed
	m.l.FilterChains = m.l.FilterChains[:1]
	seed(m, goodSecret)
	m = newMutable(f)
	m.echoChain().Filters = append(m.echoChain().Filters, m.echoChain().Filters[0])
	m.echoChain().FilterChainMatch.DestinationPort = wrapperspb.UInt32(1)
	seed(m, goodSecret)
	alphaPEM := pemutil.EncodeCertificates(alpha)
	for _, bad := range []*tlsv3.Secret{
		{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{}}},
		{Name: RootCASecretName, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: alphaPEM}}}}},
		spiffeSecret(f, trustDomainEntry("alpha.mesh", alphaPEM[:len(alphaPEM)/2])),
		spiffeSecret(f, trustDomainEntry("alpha.mesh", alphaPEM), trustDomainEntry("alpha.mesh", alphaPEM)),
		spiffeSecret(f, trustDomainEntry("spiffe://alpha.mesh", alphaPEM)),
		spiffeSecret(f),
	} {
		seed(newMutable(f), bad)
	}
	f.Add([]byte{}, []byte{}, []byte{}, []byte{}, []byte{})
	for _, sc := range sidecarFuzzSeeds(f) {
		f.Add([]byte{}, []byte{}, []byte{}, []byte{}, sc)
	}

	gwBase := acceptedState(f, RoleGateway, append(buildGateway(f, "10.0.0.5", echo).anys(f), mustAny(f, goodSecret)))
	scBase := acceptedState(f, RoleSidecar, newSidecarMutable(f).anys(f))

	f.Fuzz(func(t *testing.T, listener, cluster, cla, secret, sidecar []byte) {
		checkSidecarDecode(t, sidecar, scBase)
		res := []*anypb.Any{
			{TypeUrl: TypeListener, Value: listener},
			{TypeUrl: TypeCluster, Value: cluster},
			{TypeUrl: TypeClusterLoadAssignment, Value: cla},
			{TypeUrl: TypeSecret, Value: secret},
		}
		checkCached(t, gwBase, res)
		checkParts(t, gwBase, res[0])
		cfg, err := Decode(res...)
		if err != nil {
			require.Nil(t, cfg)
			require.NotEmpty(t, nackMessage(err))
			return
		}
		requireConsistent(t, cfg)
		for _, l := range cfg.Listeners {
			require.NotEmpty(t, l.Name)
			require.NotZero(t, l.Port)
			require.NotEmpty(t, l.Chains)
			for _, ch := range l.Chains {
				require.NotEmpty(t, ch.SNIs)
				require.NotEmpty(t, ch.Cluster)
				require.Positive(t, ch.IdleTimeout)
				for _, sni := range ch.SNIs {
					require.NoError(t, validServerName(sni))
				}
			}
		}
		for _, c := range cfg.Clusters {
			require.Contains(t, []ClusterType{Static, StrictDNS, EDS}, c.Type)
			require.Positive(t, c.ConnectTimeout)
			for _, e := range c.Endpoints {
				if c.Type != StrictDNS {
					require.True(t, e.Addr.IsValid(), "cluster %s: endpoint %+v", c.Name, e)
				}
			}
		}
		if cfg.Bundles != nil {
			require.Positive(t, cfg.Bundles.Len())
			for _, b := range cfg.Bundles.Bundles() {
				td, err := spiffeid.TrustDomainFromString(b.TrustDomain().Name())
				require.NoError(t, err)
				require.Equal(t, td, b.TrustDomain())
				require.NotEmpty(t, b.X509Authorities(), "trust domain %s trusts nothing", td)
			}
		}
		again, err := Decode(res...)
		require.NoError(t, err)
		require.True(t, sameBundles(cfg.Bundles, again.Bundles), "decoding is deterministic")
		cfgRest, againRest := *cfg, *again
		cfgRest.Bundles, againRest.Bundles = nil, nil
		require.Equal(t, cfgRest, againRest, "decoding is deterministic")
	})
}

// acceptedState is the state of a client of role that accepted res, one
// response per type.
func acceptedState(tb testing.TB, role string, res []*anypb.Any) *state {
	s, err := newState(role)
	require.NoError(tb, err)
	for _, typ := range decodeOrder(role) {
		s, err = s.apply(typ, filterType(res, typ))
		require.NoError(tb, err)
	}
	require.True(tb, s.complete())
	return s
}

// checkCached applies each type's resources of res to base, a state that
// holds entries to reuse, and to an empty one: the client decides the
// same either way, refusing with the same reason or accepting the same
// values.
func checkCached(t *testing.T, base *state, res []*anypb.Any) {
	t.Helper()
	byType := map[string][]*anypb.Any{}
	for _, r := range res {
		byType[r.GetTypeUrl()] = append(byType[r.GetTypeUrl()], r)
	}
	for typ, list := range byType {
		if !slices.Contains(decodeOrder(roleOf(base)), typ) {
			continue
		}
		fresh, err := newState(roleOf(base))
		require.NoError(t, err)
		want, wantErr := fresh.apply(typ, list)
		got, gotErr := base.apply(typ, list)
		if wantErr != nil {
			require.Error(t, gotErr)
			require.Equal(t, nackMessage(wantErr), nackMessage(gotErr))
			continue
		}
		require.NoError(t, gotErr)
		switch typ {
		case TypeListener:
			require.Equal(t, values(want.listeners), values(got.listeners))
			if want.sc != nil {
				require.Equal(t, want.sc.outbound.v, got.sc.outbound.v)
				require.Equal(t, want.sc.inbound.v, got.sc.inbound.v)
			}
		case TypeRouteConfiguration:
			for name, e := range want.sc.routes {
				require.Equal(t, e.v, got.sc.routes[name].v)
			}
		case TypeCluster:
			require.Equal(t, values(want.clusters), values(got.clusters))
			if want.sc != nil {
				require.Equal(t, want.sc.hostVIP, got.sc.hostVIP)
			}
		case TypeClusterLoadAssignment:
			for name, e := range want.assignments {
				require.Equal(t, e.v, got.assignments[name].v)
			}
		case TypeSecret:
			require.True(t, sameBundles(want.bundles(), got.bundles()) || want.secret == nil)
		}
	}
}

func roleOf(s *state) string {
	if s.sc != nil {
		return RoleSidecar
	}
	return RoleGateway
}

func values[V any](m map[string]*entry[V]) map[string]V {
	out := make(map[string]V, len(m))
	for k, e := range m {
		out[k] = e.v
	}
	return out
}

// checkParts decodes r by parts, with the parts of base's version of it
// to reuse and without, and whole: both ways accept the same resources
// and decode them the same.
func checkParts(t *testing.T, base *state, r *anypb.Any) {
	t.Helper()
	switch r.GetTypeUrl() {
	case TypeListener:
		wantName, want, err := gatewayListenerCodec.decode(r)
		for _, prev := range []*entry[Listener]{nil, base.listeners[wantName]} {
			name, got, _, ok := gatewayListenerParts(r, prev)
			require.Equal(t, err == nil, ok, "decoded whole: %v", err)
			if ok {
				require.Equal(t, wantName, name)
				require.Equal(t, want, got)
			}
		}
		m := new(listenerv3.Listener)
		if unpack(r, TypeListener, m) != nil || m.GetName() != OutboundListenerName {
			_, _, ok := outboundParts(r, nil)
			require.False(t, ok)
			return
		}
		want2, err := decodeOutbound(m)
		prevs := []*entry[*OutboundListener]{nil}
		if base.sc != nil {
			prevs = append(prevs, base.sc.outbound)
		}
		for _, prev := range prevs {
			got, _, ok := outboundParts(r, prev)
			require.Equal(t, err == nil, ok, "decoded whole: %v", err)
			if ok {
				require.Equal(t, want2, got)
			}
		}
	case TypeRouteConfiguration:
		wantName, want, err := routeCodec.decode(r)
		prevs := []*entry[*RouteConfig]{nil}
		if base.sc != nil {
			prevs = append(prevs, base.sc.routes[wantName])
		}
		for _, prev := range prevs {
			name, got, _, ok := routeConfigParts(r, prev)
			require.Equal(t, err == nil, ok, "decoded whole: %v", err)
			if ok {
				require.Equal(t, wantName, name)
				require.Equal(t, want, got)
			}
		}
	}
}
