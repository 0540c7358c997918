package xds

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	securityv1beta1 "istio.io/api/security/v1beta1"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

func peerAuth(ns, name string, spec *securityv1beta1.PeerAuthentication) authz.PeerPolicy {
	return authz.PeerPolicy{Namespace: ns, Name: name, Created: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), Spec: spec}
}

func mtlsMode(m securityv1beta1.PeerAuthentication_MutualTLS_Mode) *securityv1beta1.PeerAuthentication_MutualTLS {
	return &securityv1beta1.PeerAuthentication_MutualTLS{Mode: m}
}

// inboundChains renders the inbound listener the pod demo/pod is served,
// chain by chain: "<port or *> <transport> <application protocols>
// <http|tcp>[ rbac]".
func inboundChains(t *testing.T, res Resources, pod, ip string) []string {
	t.Helper()
	id := nodeid.ID{Role: nodeid.RoleSidecar, IP: ip, Pod: pod, Namespace: "demo"}.String()
	listeners := res.Inbound.Listeners(id)
	if listeners == nil {
		listeners = res.Listeners
	}
	for _, l := range listeners {
		if l.GetName() != InboundListenerName {
			continue
		}
		require.NoError(t, l.Validate())
		var out []string
		for _, fc := range l.GetFilterChains() {
			m := fc.GetFilterChainMatch()
			port := "*"
			if m.GetDestinationPort() != nil {
				port = fmt.Sprint(m.GetDestinationPort().GetValue())
			}
			kind := "tcp"
			rbac := ""
			for _, f := range fc.GetFilters() {
				switch f.GetName() {
				case "envoy.filters.network.http_connection_manager":
					kind = "http"
				case authz.NetworkFilterName:
					rbac = " rbac"
				}
			}
			if (m.GetTransportProtocol() == "tls") != (fc.GetTransportSocket() != nil) {
				t.Fatalf("chain %v: transport %q with transport socket %v", m, m.GetTransportProtocol(), fc.GetTransportSocket() != nil)
			}
			out = append(out, fmt.Sprintf("%s %s %s %s%s", port, m.GetTransportProtocol(), strings.Join(m.GetApplicationProtocols(), ","), kind, rbac))
		}
		return out
	}
	t.Fatal("no inbound listener")
	return nil
}

// PeerAuthentications give the ports they make PERMISSIVE a plaintext
// chain beside the mutual TLS ones (Istio's raw_buffer chains), with the
// same filters: a STRICT port's group has none, so it refuses plaintext
// whatever the pod's other ports take. A port-level mode on a port no
// Service declares gets a group of its own. STRICT is the default.
func TestPeerAuthenticationPlaintextChains(t *testing.T) {
	store := authz.NewStore("")
	store.SetPod("demo", "web-0", map[string]string{"app": "web"})
	store.SetPod("demo", "db-0", map[string]string{"app": "db"})
	store.SetPod("demo", "free-0", map[string]string{"app": "free"})
	store.SetSynced()
	ports := []catalog.Port{{Name: "http", Port: 80, TargetPort: 8080}, {Name: "tcp-admin", Port: 9000, TargetPort: 9000}}
	declared := declaredPods(t, "web", ports, map[string]string{"web-0": "10.0.1.2", "free-0": "10.0.1.4"},
		catalog.Service{Namespace: "demo", Name: "db", Cluster: "a", Ports: []catalog.Port{{Name: "tcp", Port: 5432, TargetPort: 5432}, {Name: "tcp-m", Port: 9187, TargetPort: 9187}},
			Endpoints: []catalog.LocalityEndpoints{{Addresses: []catalog.Address{{IP: "10.0.1.3", Pod: "db-0", Ready: true}}, Ready: 1}}})
	opts := SidecarOptions{Region: "r1", TrustDomain: "a.mesh"}
	in := SidecarInput{Declared: declared, Policies: store.Snapshot()}
	res, _, err := TranslateSidecar(in, opts)
	require.NoError(t, err)
	strictWeb := []string{
		"8080 tls  http", "9000 tls  tcp",
		"* tls istio-http/1.1,istio-h2 http", "* tls  tcp",
	}
	require.Equal(t, strictWeb, inboundChains(t, res, "web-0", "10.0.1.2"), "no PeerAuthentication: STRICT")

	store.SetPeerAuthentication(peerAuth("demo", "default", &securityv1beta1.PeerAuthentication{Mtls: mtlsMode(securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE)}))
	store.SetPeerAuthentication(peerAuth("demo", "web", &securityv1beta1.PeerAuthentication{
		Selector: selectApp("web"), Mtls: mtlsMode(securityv1beta1.PeerAuthentication_MutualTLS_STRICT),
		PortLevelMtls: map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{
			9000: mtlsMode(securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE),
			7070: mtlsMode(securityv1beta1.PeerAuthentication_MutualTLS_DISABLE),
		},
	}))
	store.SetPeerAuthentication(peerAuth("demo", "db", &securityv1beta1.PeerAuthentication{
		Selector: selectApp("db"),
		PortLevelMtls: map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{
			5432: mtlsMode(securityv1beta1.PeerAuthentication_MutualTLS_STRICT),
		},
	}))
	store.SetPolicy(policy("demo", "db-allow", &securityv1beta1.AuthorizationPolicy{Selector: selectApp("db"), Rules: []*securityv1beta1.Rule{{}}}))
	in.Policies = store.Snapshot()
	res, skipped, err := TranslateSidecar(in, opts)
	require.NoError(t, err)
	require.Contains(t, skipped, Skipped{Service: "PeerAuthentication demo/web", Reason: "port 7070: mode DISABLE is read as PERMISSIVE"})

	require.Equal(t, []string{
		"8080 tls  http",
		"9000 tls  tcp", "9000 raw_buffer  tcp",
		// 7070, which no Service declares: the base chains on that port,
		// and plaintext as TCP.
		"7070 tls istio-http/1.1,istio-h2 http", "7070 tls  tcp", "7070 raw_buffer  tcp",
		"* tls istio-http/1.1,istio-h2 http", "* tls  tcp",
	}, inboundChains(t, res, "web-0", "10.0.1.2"), "STRICT but for 9000 and 7070")
	require.Equal(t, []string{
		"5432 tls  tcp rbac",
		"9187 tls  tcp rbac", "9187 raw_buffer  tcp rbac",
		"* tls istio-http/1.1,istio-h2 http", "* tls  tcp rbac", "* raw_buffer  tcp rbac",
	}, inboundChains(t, res, "db-0", "10.0.1.3"), "the namespace's PERMISSIVE but for 5432, with its RBAC on every chain")
	require.Equal(t, []string{
		"8080 tls  http", "8080 raw_buffer  http",
		"9000 tls  tcp", "9000 raw_buffer  tcp",
		"* tls istio-http/1.1,istio-h2 http", "* tls  tcp", "* raw_buffer  tcp",
	}, inboundChains(t, res, "free-0", "10.0.1.4"), "PERMISSIVE: the namespace's")

	// /debug/xds says which mode and policies each profile's pods have.
	status := res.Inbound.Status()
	webKey, _ := res.Inbound.nodeProfile(nodeid.ID{Role: nodeid.RoleSidecar, IP: "10.0.1.2", Pod: "web-0", Namespace: "demo"}.String())
	require.Equal(t, "STRICT,7070=PERMISSIVE,9000=PERMISSIVE", status[webKey].MTLS)
	require.Empty(t, status[webKey].Policies)
	dbKey, _ := res.Inbound.nodeProfile(nodeid.ID{Role: nodeid.RoleSidecar, IP: "10.0.1.3", Pod: "db-0", Namespace: "demo"}.String())
	require.Equal(t, "PERMISSIVE,5432=STRICT", status[dbKey].MTLS)
	require.Equal(t, []string{"demo/db-allow"}, status[dbKey].Policies)

	// The Go sidecar accepts them and matches as Envoy does: a STRICT
	// port's group has no plaintext chain, whatever the any-port group
	// has; a plaintext caller has no identity for the RBAC.
	web := sidecarOf(t, res, "web-0", "10.0.1.2").Sidecar.Inbound
	require.Nil(t, web.MatchPlaintext(8080), "8080 is STRICT")
	require.NotNil(t, web.MatchPlaintext(9000).TCP)
	require.NotNil(t, web.MatchPlaintext(7070).TCP, "an undeclared port's plaintext is TCP")
	require.NotNil(t, web.Match(7070, []string{"istio-http/1.1"}).HTTP, "and its mutual TLS as on any port")
	require.Nil(t, web.MatchPlaintext(5555), "the pod is STRICT")
	db := sidecarOf(t, res, "db-0", "10.0.1.3").Sidecar.Inbound
	require.Nil(t, db.MatchPlaintext(5432), "5432 is STRICT by port")
	require.True(t, db.MatchPlaintext(9187).RBAC.Allows(&xdsclient.RBACRequest{ID: "", Port: 9187}), "rules: [{}] allows anyone, plaintext too")
	require.True(t, db.MatchPlaintext(5555).RBAC.Allows(&xdsclient.RBACRequest{ID: "", Port: 5555}))
	free := sidecarOf(t, res, "free-0", "10.0.1.4").Sidecar.Inbound
	require.NotNil(t, free.MatchPlaintext(8080).HTTP, "a port declared HTTP: its connection manager, plaintext too")
	require.NotNil(t, free.MatchPlaintext(5555).TCP)

	// An ALLOW policy that names its callers keeps plaintext out.
	store.SetPolicy(policy("demo", "db-allow", &securityv1beta1.AuthorizationPolicy{Selector: selectApp("db"), Rules: []*securityv1beta1.Rule{{
		From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{"*"}}}},
	}}}))
	in.Policies = store.Snapshot()
	res, skipped, err = TranslateSidecar(in, opts)
	require.NoError(t, err)
	db = sidecarOf(t, res, "db-0", "10.0.1.3").Sidecar.Inbound
	require.False(t, db.MatchPlaintext(9187).RBAC.Allows(&xdsclient.RBACRequest{ID: "", Port: 9187}), "principals: [*] is any authenticated caller")
	require.True(t, db.Match(9187, nil).RBAC.Allows(&xdsclient.RBACRequest{ID: "spiffe://b.mesh/ns/demo/sa/client", Port: 9187}))

	// The incremental translator follows, and the default comes back.
	tr, err := NewSidecarTranslator(opts)
	require.NoError(t, err)
	got, gotSkipped, err := tr.Translate(in)
	require.NoError(t, err)
	require.Equal(t, renderSidecar(t, res, skipped), renderSidecar(t, got, gotSkipped))
	store.DeletePeerAuthentication("demo", "default")
	store.DeletePeerAuthentication("demo", "web")
	in.Policies = store.Snapshot()
	got, _, err = tr.Translate(in)
	require.NoError(t, err)
	require.Equal(t, strictWeb, inboundChains(t, got, "web-0", "10.0.1.2"))
	require.Equal(t, []string{"8080 tls  http", "9000 tls  tcp", "* tls istio-http/1.1,istio-h2 http", "* tls  tcp"},
		inboundChains(t, got, "free-0", "10.0.1.4"))
	want, _, err := TranslateSidecar(in, opts)
	require.NoError(t, err)
	require.Equal(t, want.Version, got.Version)
}
