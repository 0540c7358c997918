package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/test/localcluster"
	"github.com/isthmus-mesh/isthmus/test/mesh"
)

// peerAuthentication checks, in cluster a, that a PeerAuthentication
// opens a pod's ports to plaintext callers outside the mesh where it
// says PERMISSIVE, and only there: outsider (a pod without a sidecar)
// calls private's pod directly, and a's client keeps calling it with
// mutual TLS. An AuthorizationPolicy that names its callers keeps
// plaintext out, unless a rule lets it in by its address (ipBlocks).
func peerAuthentication(t *testing.T, a *mesh.Cluster, clientA, outsider, private *mesh.Pod) {
	ctx := t.Context()
	cfg, err := a.K.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	ic, err := istioclient.NewForConfig(cfg)
	require.NoError(t, err)
	peers := ic.SecurityV1().PeerAuthentications("demo")
	policies := ic.SecurityV1().AuthorizationPolicies("demo")
	t.Cleanup(func() {
		_ = peers.Delete(context.Background(), "private-permissive", metav1.DeleteOptions{})
		_ = policies.Delete(context.Background(), "private-mesh-only", metav1.DeleteOptions{})
	})
	selector := &typeapi.WorkloadSelector{MatchLabels: private.Spec.Labels}
	mode := func(m securityapi.PeerAuthentication_MutualTLS_Mode) *securityapi.PeerAuthentication_MutualTLS {
		return &securityapi.PeerAuthentication_MutualTLS{Mode: m}
	}

	httpAddr := netip.AddrPortFrom(private.W.IP, mesh.EchoHTTPPort).String()
	tcpAddr := netip.AddrPortFrom(private.W.IP, mesh.EchoTCPPort).String()
	forged := "By=spiffe://a.mesh/ns/demo/sa/private;Hash=00;URI=spiffe://a.mesh/ns/demo/sa/admin"
	httpRequest := "GET / HTTP/1.1\r\nHost: private\r\nX-Forwarded-Client-Cert: " + forged + "\r\nConnection: close\r\n\r\n"
	plainHTTP := func() string {
		answer, _ := exchange(ctx, outsider, httpAddr, nil, httpRequest)
		return answer
	}
	// echo greets a TCP connection at once, but a PERMISSIVE port's
	// sidecar reads the caller's first byte to tell plaintext from TLS:
	// the caller speaks first (server-first protocols need STRICT, as
	// in Istio).
	plainTCP := func() string {
		answer, _ := exchange(ctx, outsider, tcpAddr, nil, "hello\n")
		return answer
	}
	// refused is a plaintext call the pod's sidecar closed: connected,
	// then closed or reset with nothing from the app (reached); not a
	// call that never connected or timed out, which says nothing of
	// the sidecar.
	refused := func(addr, request, reached string) (bool, string) {
		answer, err := exchange(ctx, outsider, addr, nil, request)
		closed := err != nil && (err.Error() == "closed" || strings.Contains(err.Error(), "connection reset"))
		return closed && !strings.Contains(answer, reached), fmt.Sprintf("%q, %v", answer, err)
	}
	requireRefused := func(what, addr, request, reached string) {
		t.Helper()
		ok, got := refused(addr, request, reached)
		require.True(t, ok, "%s: %s", what, got)
	}
	meshCall := func() {
		t.Helper()
		r := callOK(t, clientA, mesh.Call{Proto: "http1", Target: "private.demo:80"})
		assert.Equal(t, a.SPIFFEID("demo", "client"), r.CallerIdentity, "mutual TLS from the mesh, whatever the mode")
	}

	// STRICT, the default: nothing in plaintext.
	requireRefused("plaintext HTTP to a STRICT pod", httpAddr, httpRequest, "HTTP/")
	requireRefused("plaintext TCP to a STRICT pod", tcpAddr, "hello\n", `"pod"`)

	// PERMISSIVE, but for the TCP port.
	pa := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "private-permissive"}}
	pa.Spec.Selector = selector
	pa.Spec.Mtls = mode(securityapi.PeerAuthentication_MutualTLS_PERMISSIVE)
	pa.Spec.PortLevelMtls = map[uint32]*securityapi.PeerAuthentication_MutualTLS{mesh.EchoTCPPort: mode(securityapi.PeerAuthentication_MutualTLS_STRICT)}
	pa, err = peers.Create(ctx, pa, metav1.CreateOptions{})
	require.NoError(t, err)
	require.NoError(t, mesh.Poll(ctx, meshWait, "private's sidecar takes plaintext HTTP", func(context.Context) (bool, string) {
		answer := plainHTTP()
		return strings.Contains(answer, "HTTP/1.1 200"), answer
	}))
	answer := plainHTTP()
	assert.NotContains(t, answer, "sa/admin", "a plaintext caller's X-Forwarded-Client-Cert reached the app")
	assert.NotContains(t, answer, "Hash=00")
	requireRefused("the TCP port is STRICT by port", tcpAddr, "hello\n", `"pod"`)
	meshCall()

	// An AuthorizationPolicy that names its callers lets no plaintext
	// caller in: it has no identity.
	ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "private-mesh-only"}}
	ap.Spec.Selector = selector
	ap.Spec.Rules = []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{"a.mesh/ns/demo/sa/client"}}}}}}
	_, err = policies.Create(ctx, ap, metav1.CreateOptions{})
	require.NoError(t, err)
	require.NoError(t, mesh.Poll(ctx, meshWait, "a plaintext caller is refused by RBAC", func(context.Context) (bool, string) {
		answer := plainHTTP()
		return strings.Contains(answer, "403") && strings.Contains(answer, "RBAC: access denied"), answer
	}))
	meshCall()

	// Unless a rule lets it in by its address, as a health checker is:
	// ipBlocks is the caller's address as the pod sees it.
	ap, err = policies.Get(ctx, "private-mesh-only", metav1.GetOptions{})
	require.NoError(t, err)
	byAddress := &securityapi.Rule{From: []*securityapi.Rule_From{{Source: &securityapi.Source{IpBlocks: []string{outsider.W.IP.String()}}}}}
	ap.Spec.Rules = append(ap.Spec.Rules, byAddress)
	ap, err = policies.Update(ctx, ap, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.NoError(t, mesh.Poll(ctx, meshWait, "the outsider's address lets it in", func(context.Context) (bool, string) {
		answer := plainHTTP()
		return strings.Contains(answer, "HTTP/1.1 200"), answer
	}))
	byAddress.From[0].Source.IpBlocks = []string{"192.0.2.0/24"}
	ap.Spec.Rules[1] = byAddress
	_, err = policies.Update(ctx, ap, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.NoError(t, mesh.Poll(ctx, meshWait, "another range does not", func(context.Context) (bool, string) {
		answer := plainHTTP()
		return strings.Contains(answer, "403"), answer
	}))
	meshCall()
	require.NoError(t, policies.Delete(ctx, "private-mesh-only", metav1.DeleteOptions{}))

	// The whole pod PERMISSIVE: plaintext TCP too.
	pa.Spec.PortLevelMtls = nil
	pa, err = peers.Update(ctx, pa, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.NoError(t, mesh.Poll(ctx, meshWait, "private's sidecar takes plaintext TCP", func(context.Context) (bool, string) {
		answer := plainTCP()
		return strings.Contains(answer, `"pod"`), answer
	}))
	require.Contains(t, plainHTTP(), "HTTP/1.1 200")

	// STRICT again once the policy is gone.
	require.NoError(t, peers.Delete(ctx, pa.Name, metav1.DeleteOptions{}))
	require.NoError(t, mesh.Poll(ctx, meshWait, "private's sidecar is STRICT again", func(context.Context) (bool, string) {
		return refused(httpAddr, httpRequest, "HTTP/")
	}))
	requireRefused("plaintext TCP once STRICT again", tcpAddr, "hello\n", `"pod"`)
	meshCall()
}
