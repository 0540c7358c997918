package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// member is one cluster of a federation test with its running federator.
type member struct {
	t     *testing.T
	c     *localcluster.Cluster
	f     *fedproc.Federator
	args  []string
	istio istioclient.Interface
	mcs   mcsclient.Interface
}

func newMember(t *testing.T, c *localcluster.Cluster, args ...string) *member {
	t.Helper()
	cfg, err := c.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	m := &member{t: t, c: c, args: args}
	m.istio, err = istioclient.NewForConfig(cfg)
	require.NoError(t, err)
	m.mcs, err = mcsclient.NewForConfig(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	require.NoError(t, install.Apply(ctx, cfg, install.IstioServiceEntryCRD, install.IstioAuthorizationPolicyCRD, install.IstioPeerAuthenticationCRD))
	cancel()
	m.start()
	return m
}

func (m *member) start() {
	m.t.Helper()
	f, err := fedproc.Start(m.t.Context(), m.c, binDir, append([]string{"--log-level", "debug"}, m.args...)...)
	require.NoError(m.t, err)
	m.f = f
	m.t.Cleanup(func() { _ = f.Stop(10 * time.Second) })
}

// cli runs the federator CLI against the member's cluster as its admin.
func (m *member) cli(args ...string) string {
	m.t.Helper()
	_, kubeconfig, err := m.c.KubeconfigFor(localcluster.UserAdmin)
	require.NoError(m.t, err)
	cmd := m.c.Command(m.t.Context(), filepath.Join(binDir, "federator"), append(args, "--kubeconfig", kubeconfig)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(m.t, err, "federator %s: %s", strings.Join(args, " "), stderr.String())
	return strings.TrimSpace(string(out))
}

// link runs token create on the acceptor and join on the joiner, as an
// operator would.
func link(t *testing.T, acceptor, joiner *member) {
	t.Helper()
	token := acceptor.cli("token", "create", "--peer", joiner.c.Name(), "--address", acceptor.f.FederationAddr)
	file := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(file, []byte(token), 0o600))
	joiner.cli("join", "--name", acceptor.c.Name(), "--token-file", file)
}

// status is `federator status -o json` decoded.
type statusJSON struct {
	Peers []struct {
		Name       string                        `json:"name"`
		Generation int64                         `json:"generation"`
		Status     v1alpha1.FederationPeerStatus `json:"status"`
	} `json:"peers"`
}

func (m *member) peerStatus(peer string) (v1alpha1.FederationPeerStatus, bool) {
	m.t.Helper()
	st, _, ok := m.peerStatusGeneration(peer)
	return st, ok
}

// peerStatusGeneration is peerStatus with the FederationPeer's
// metadata.generation.
func (m *member) peerStatusGeneration(peer string) (v1alpha1.FederationPeerStatus, int64, bool) {
	m.t.Helper()
	var s statusJSON
	require.NoError(m.t, json.Unmarshal([]byte(m.cli("status", "-o", "json")), &s))
	for _, p := range s.Peers {
		if p.Name == peer {
			return p.Status, p.Generation, true
		}
	}
	return v1alpha1.FederationPeerStatus{}, 0, false
}

func (m *member) serviceEntry(ns, name string) (*networkingv1.ServiceEntry, error) {
	return m.istio.NetworkingV1().ServiceEntries(ns).Get(m.t.Context(), name+".clusterset.local", metav1.GetOptions{})
}

// imported returns the service as the member's catalog holds it from peer.
func (m *member) imported(peer, ns, name string) (catalog.Service, bool) {
	m.t.Helper()
	d, err := m.f.Catalog(m.t.Context())
	require.NoError(m.t, err)
	for _, src := range d.Sources {
		if src.Source != peer {
			continue
		}
		for _, s := range src.Services {
			if s.Namespace == ns && s.Name == name {
				return s, true
			}
		}
	}
	return catalog.Service{}, false
}

// serve runs n echo pods behind Service ns/name and exports it.
func (m *member) serve(ns, name string, n int) []*localcluster.Workload {
	m.t.Helper()
	ctx := m.t.Context()
	kc := m.c.Client()
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		require.NoError(m.t, err)
	}
	var pods []*localcluster.Workload
	for i := range n {
		w, err := m.c.RunWorkload(ctx, localcluster.WorkloadSpec{
			Name: fmt.Sprintf("%s-%d", name, i), Namespace: ns, Labels: map[string]string{"app": name},
			Command: []string{filepath.Join(binDir, "echo")}, Env: []string{"CLUSTER_NAME=" + m.c.Name()},
		})
		require.NoError(m.t, err)
		pods = append(pods, w)
	}
	_, err := kc.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP, AppProtocol: new("http")},
		}},
	}, metav1.CreateOptions{})
	require.NoError(m.t, err)
	_, err = m.mcs.MulticlusterV1alpha1().ServiceExports(ns).Create(ctx,
		&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{})
	require.NoError(m.t, err)
	return pods
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, 60*time.Second, 200*time.Millisecond, what)
}

// TestFederation links three real clusters with the CLI and follows an
// export from a into b and c, through readiness changes, unexport, the
// loss of a federator and its return.
func TestFederation(t *testing.T) {
	env := localcluster.StartT(t, "a", "b", "c")
	if !env.Isolated() {
		t.Skip("needs root: without network namespaces pods have loopback IPs, which EndpointSlices refuse")
	}
	installIsthmus(t, env)
	a := newMember(t, env.Cluster("a"), "--heartbeat", "500ms", "--keep-for", "3s", "--drain-for", "1h")
	b := newMember(t, env.Cluster("b"), "--heartbeat", "500ms")
	c := newMember(t, env.Cluster("c"), "--heartbeat", "500ms")
	ctx := t.Context()

	link(t, a, b)
	link(t, a, c)
	for _, m := range []*member{b, c} {
		waitFor(t, "a connected to "+m.c.Name(), func() bool {
			s, ok := a.peerStatus(m.c.Name())
			return ok && s.State == v1alpha1.StateConnected
		})
		waitFor(t, m.c.Name()+" connected to a", func() bool {
			s, ok := m.peerStatus("a")
			return ok && s.State == v1alpha1.StateConnected
		})
		// Every condition says which spec it is about (kubectl wait
		// compares observedGeneration with the API server's generation).
		waitFor(t, "a's conditions of "+m.c.Name()+" observed its generation", func() bool {
			s, gen, _ := a.peerStatusGeneration(m.c.Name())
			for _, c := range s.Conditions {
				if c.ObservedGeneration != gen {
					return false
				}
			}
			return gen > 0 && len(s.Conditions) > 0
		})
	}
	// The token records are spent, the join tokens gone.
	recs, err := a.c.Client().CoreV1().Secrets("isthmus-system").List(ctx, metav1.ListOptions{LabelSelector: federation.LabelTokenFor})
	require.NoError(t, err)
	require.Empty(t, recs.Items)

	// b has the namespace; c does not yet.
	_, err = b.c.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	pods := a.serve("demo", "echo", 2)

	gateway := a.c.WANIP().String()
	var se *networkingv1.ServiceEntry
	waitFor(t, "b has the ServiceEntry with a's two ready endpoints", func() bool {
		se, err = b.serviceEntry("demo", "echo")
		return err == nil && len(se.Spec.Endpoints) == 1 && se.Spec.Endpoints[0].Weight == 2
	})
	require.Equal(t, []string{"echo.demo.svc.clusterset.local"}, se.Spec.Hosts)
	ep := se.Spec.Endpoints[0]
	require.Equal(t, gateway, ep.Address)
	require.Equal(t, map[string]uint32{"http": 15443}, ep.Ports)
	require.Equal(t, "a", ep.Network)
	require.Equal(t, "a", ep.Labels["multicluster.kubernetes.io/source-cluster"])
	require.Equal(t, "echo", ep.Labels["multicluster.kubernetes.io/service-name"])
	require.Equal(t, []string{"spiffe://a.mesh/ns/demo/sa/default"}, se.Spec.SubjectAltNames)

	waitFor(t, "c reports the import it cannot write", func() bool {
		s, _ := c.peerStatus("a")
		for _, cond := range s.Conditions {
			if cond.Type == v1alpha1.ConditionImportsWritten && cond.Status == metav1.ConditionFalse &&
				strings.Contains(cond.Message, "namespace demo does not exist in this cluster") {
				return true
			}
		}
		return false
	})
	_, err = c.c.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	waitFor(t, "c writes it once the namespace exists", func() bool {
		_, err := c.serviceEntry("demo", "echo")
		return err == nil
	})

	require.NoError(t, pods[0].SetReady(ctx, false))
	waitFor(t, "b's weight follows a's readiness", func() bool {
		se, err = b.serviceEntry("demo", "echo")
		return err == nil && len(se.Spec.Endpoints) == 1 && se.Spec.Endpoints[0].Weight == 1
	})

	require.NoError(t, a.mcs.MulticlusterV1alpha1().ServiceExports("demo").Delete(ctx, "echo", metav1.DeleteOptions{}))
	waitFor(t, "unexport removes b's and c's ServiceEntries", func() bool {
		_, errB := b.serviceEntry("demo", "echo")
		_, errC := c.serviceEntry("demo", "echo")
		return apierrors.IsNotFound(errB) && apierrors.IsNotFound(errC)
	})

	// b exports to a; then b's federator dies.
	b.serve("demo", "hello", 1)
	waitFor(t, "a imports b's hello", func() bool {
		s, ok := a.imported("b", "demo", "hello")
		return ok && s.ReadyEndpoints() == 1
	})
	require.NoError(t, b.f.Proc.Kill())
	waitFor(t, "a shows b disconnected, with its stale age", func() bool {
		s, _ := a.peerStatus("b")
		return s.State == v1alpha1.StateDisconnected && s.DisconnectedSince != nil
	})
	table := a.cli("status")
	require.Regexp(t, `(?m)^b\s+Disconnected\s+b\.mesh\s+.*\d+s ago`, table)
	waitFor(t, "b's imports drained after keepFor", func() bool {
		s, ok := a.imported("b", "demo", "hello")
		return ok && s.ReadyEndpoints() == 0 && s.Endpoints[0].NotReady == 1
	})
	waitFor(t, "a's ServiceEntry carries no traffic to b", func() bool {
		se, err := a.serviceEntry("demo", "hello")
		return err == nil && len(se.Spec.Endpoints) == 0
	})

	b.start()
	waitFor(t, "b back: a's import is live again, once", func() bool {
		s, ok := a.imported("b", "demo", "hello")
		se, err := a.serviceEntry("demo", "hello")
		return ok && s.ReadyEndpoints() == 1 && err == nil && len(se.Spec.Endpoints) == 1
	})
	waitFor(t, "a's status shows b connected again", func() bool {
		st, _ := a.peerStatus("b")
		return st.State == v1alpha1.StateConnected && st.DisconnectedSince == nil
	})
}
