package e2e

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/test/localcluster"
	"github.com/isthmus-mesh/isthmus/test/mesh"
)

// authorizationPolicies checks, in cluster a, that AuthorizationPolicies
// reach the sidecar of the pod they select and decide each connection:
// private (a's Service that nobody exports, so no call to it can be
// answered elsewhere) is called by a's own client, and echo by b's.
func authorizationPolicies(t *testing.T, a *mesh.Cluster, clientA, clientB, private *mesh.Pod, callerB string) {
	ctx := t.Context()
	cfg, err := a.K.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	ic, err := istioclient.NewForConfig(cfg)
	require.NoError(t, err)
	policies := ic.SecurityV1().AuthorizationPolicies("demo")
	apply := func(name string, spec *securityapi.AuthorizationPolicy) {
		t.Helper()
		p, err := policies.Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			proto.Reset(&p.Spec)
			proto.Merge(&p.Spec, spec)
			_, err = policies.Update(ctx, p, metav1.UpdateOptions{})
		} else {
			p = &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name}}
			proto.Merge(&p.Spec, spec)
			_, err = policies.Create(ctx, p, metav1.CreateOptions{})
		}
		require.NoError(t, err)
	}
	t.Cleanup(func() {
		for _, name := range []string{"private-callers", "private-deny", "echo-callers"} {
			_ = policies.Delete(context.Background(), name, metav1.DeleteOptions{})
		}
	})
	rbacRefusals := func() float64 {
		metrics, err := private.SidecarMetrics(ctx)
		if err != nil {
			t.Logf("sidecar metrics: %v", err)
			return -1
		}
		return mesh.MetricSum(metrics, "isthmus_sidecar_refusals_total", `listener="inbound"`, `reason="rbac"`)
	}
	httpCall := mesh.Call{Proto: "http1", Target: "private.demo:80"}
	tcpCall := mesh.Call{Proto: "tcp", Target: "private.demo:9000"}
	refused := func(what string, call mesh.Call) {
		t.Helper()
		eventually(t, what, func() error {
			// An HTTP call is refused by the answering sidecar's HTTP
			// RBAC (403 with Envoy's body); a TCP one by its network
			// RBAC, which closes the connection: echo's call fails. Any
			// other failure is not the policy's doing.
			_, err := clientA.Call(ctx, call)
			switch {
			case err == nil:
				return errors.New("still answered")
			case call.Proto != "tcp" && !strings.Contains(err.Error(), "RBAC: access denied"):
				return fmt.Errorf("failed, but not refused by RBAC: %w", err)
			}
			return nil
		})
	}
	before := rbacRefusals()
	require.GreaterOrEqual(t, before, 0.0)

	// Only a's client ("cluster.local" names a's own trust domain, as in
	// Istio), and only on the TCP port.
	apply("private-callers", &securityapi.AuthorizationPolicy{
		Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "private"}},
		Rules: []*securityapi.Rule{{
			From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{"cluster.local/ns/demo/sa/client"}}}},
			To:   []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{"9000"}}}},
		}},
	})
	refused("a's client's HTTP call to private is refused", httpCall)
	r := callOK(t, clientA, tcpCall)
	assert.Equal(t, private.Name(), r.Pod, "the TCP port is allowed")
	assert.Eventually(t, func() bool { return rbacRefusals() > before }, 10*time.Second, 100*time.Millisecond,
		"private's sidecar counted no refusal for reason rbac")

	// The HTTP port too, now.
	apply("private-callers", &securityapi.AuthorizationPolicy{
		Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "private"}},
		Rules: []*securityapi.Rule{{
			From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{"cluster.local/ns/demo/sa/client"}}}},
			To:   []*securityapi.Rule_To{{Operation: &securityapi.Operation{Ports: []string{"9000", "8080"}}}},
		}},
	})
	r = callOK(t, clientA, httpCall)
	assert.Equal(t, a.SPIFFEID("demo", "client"), r.CallerIdentity)

	// A DENY policy wins over the ALLOW one.
	apply("private-deny", &securityapi.AuthorizationPolicy{
		Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "private"}},
		Action:   securityapi.AuthorizationPolicy_DENY,
		Rules:    []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Namespaces: []string{"demo"}}}}}},
	})
	refused("a DENY policy refuses a's client", tcpCall)

	// Without policies, everyone with a certificate again.
	require.NoError(t, policies.Delete(ctx, "private-deny", metav1.DeleteOptions{}))
	require.NoError(t, policies.Delete(ctx, "private-callers", metav1.DeleteOptions{}))
	callOK(t, clientA, httpCall)

	// Across clusters: an ALLOW policy on a's echo that names b's client
	// by b's trust domain lets it through.
	apply("echo-callers", &securityapi.AuthorizationPolicy{
		Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "echo"}},
		Rules: []*securityapi.Rule{{
			From: []*securityapi.Rule_From{{Source: &securityapi.Source{Principals: []string{"b.mesh/ns/demo/sa/client"}}}},
		}},
	})
	refusedA := mesh.Call{Proto: "http1", Target: "echo.demo.svc.cluster.local:80"}
	refused("a's own client no longer reaches a's echo", refusedA)
	r = callOK(t, clientB, mesh.Call{Proto: "http1", Target: echoHost + ":80"})
	assert.Equal(t, "a", r.Cluster, "b's client is allowed in a, not failed over to c")
	assert.Equal(t, callerB, r.CallerIdentity)
	require.NoError(t, policies.Delete(ctx, "echo-callers", metav1.DeleteOptions{}))
	callOK(t, clientA, refusedA)
}
