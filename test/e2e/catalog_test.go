package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// TestCatalog drives the federator's view of its cluster through real
// objects on a real kube-apiserver, with EndpointSlices written by the real
// kube-controller-manager from pods whose processes really run.
func TestCatalog(t *testing.T) {
	env := localcluster.StartT(t, "a")
	if !env.Isolated() {
		// The API server refuses 127.0.0.0/8 addresses in EndpointSlices,
		// so without network namespaces no pod can have endpoints.
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

	// Two zones: the default node and one more.
	z1Node := a.DefaultNode()
	n1, err := kc.CoreV1().Nodes().Get(ctx, z1Node, metav1.GetOptions{})
	require.NoError(t, err)
	region, z1 := n1.Labels[corev1.LabelTopologyRegion], n1.Labels[corev1.LabelTopologyZone]
	_, err = a.AddNode(ctx, "a-node-2", region, "a-z2")
	require.NoError(t, err)

	// Three echo pods: two in the first zone, one in the second.
	var pods []*localcluster.Workload
	for i, node := range []string{z1Node, z1Node, "a-node-2"} {
		w, err := a.RunWorkload(ctx, localcluster.WorkloadSpec{
			Name: fmt.Sprintf("echo-%d", i), Namespace: "demo", Labels: map[string]string{"app": "echo"},
			Node: node, Command: []string{filepath.Join(binDir, "echo")}, Env: []string{"CLUSTER_NAME=a"},
		})
		require.NoError(t, err)
		pods = append(pods, w)
	}
	svc := func(name string) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name},
			Spec: corev1.ServiceSpec{
				Selector: map[string]string{"app": "echo"},
				Ports: []corev1.ServicePort{
					{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP, AppProtocol: new("http")},
					{Name: "grpc", Port: 9090, Protocol: corev1.ProtocolTCP},
				},
			},
		}
	}
	_, err = kc.CoreV1().Services("demo").Create(ctx, svc("echo"), metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = kc.CoreV1().Services("demo").Create(ctx, svc("private"), metav1.CreateOptions{})
	require.NoError(t, err)
	export := func(name string) {
		t.Helper()
		_, err := mcs.MulticlusterV1alpha1().ServiceExports("demo").Create(ctx,
			&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: name}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	export("echo")
	export("ghost") // no Service of that name

	f := startFederator(t, a)

	// counts drops the addresses, which are checked on their own.
	counts := func(eps []catalog.LocalityEndpoints) []catalog.LocalityEndpoints {
		out := make([]catalog.LocalityEndpoints, len(eps))
		for i, e := range eps {
			e.Addresses = nil
			out[i] = e
		}
		return out
	}
	wantEndpoints := func(z1Ready, z1NotReady int) []catalog.LocalityEndpoints {
		return []catalog.LocalityEndpoints{
			{Locality: catalog.Locality{Region: region, Zone: z1}, Ready: z1Ready, NotReady: z1NotReady},
			{Locality: catalog.Locality{Region: region, Zone: "a-z2"}, Ready: 1},
		}
	}
	var last catalog.Service
	eventuallyService := func(what string, cond func(s catalog.Service, ok bool) bool) {
		t.Helper()
		require.Eventually(t, func() bool {
			s, ok := fedproc.LocalService(catalogOf(t, f), "demo", "echo")
			last = s
			return cond(s, ok)
		}, 30*time.Second, 100*time.Millisecond, "%s; last seen: %+v", what, last)
	}

	// Export → catalog entry with the right ports and per-locality counts.
	eventuallyService("three ready endpoints in two zones", func(s catalog.Service, ok bool) bool {
		return ok && s.ReadyEndpoints() == 3
	})
	require.Equal(t, "a", last.Cluster)
	require.Equal(t, []catalog.Port{
		{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, AppProtocol: "http", TargetPort: 8080},
		{Name: "grpc", Port: 9090, Protocol: catalog.ProtocolTCP, TargetPort: 9090},
	}, last.Ports)
	require.Equal(t, wantEndpoints(2, 0), counts(last.Endpoints))
	var ips []string
	for _, e := range last.Endpoints {
		for _, a := range e.Addresses {
			require.True(t, a.Ready)
			ips = append(ips, a.IP)
		}
	}
	require.ElementsMatch(t, []string{pods[0].IP.String(), pods[1].IP.String(), pods[2].IP.String()}, ips)
	_, ok := fedproc.LocalService(catalogOf(t, f), "demo", "private")
	require.False(t, ok, "a Service without a ServiceExport is never in the catalog")
	metrics, err := f.Metrics(ctx)
	require.NoError(t, err)
	require.Contains(t, metrics, `isthmus_catalog_services{source="local"} 1`)

	condition := func(name string, typ mcsv1alpha1.ServiceExportConditionType) *metav1.Condition {
		se, err := mcs.MulticlusterV1alpha1().ServiceExports("demo").Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		return meta.FindStatusCondition(se.Status.Conditions, string(typ))
	}
	require.Eventually(t, func() bool {
		c := condition("echo", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Status == metav1.ConditionTrue
	}, 30*time.Second, 100*time.Millisecond)
	// ServiceExport without a Service → Valid=False, NoService.
	require.Eventually(t, func() bool {
		c := condition("ghost", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == string(mcsv1alpha1.ServiceExportReasonNoService)
	}, 30*time.Second, 100*time.Millisecond)
	require.Contains(t, condition("ghost", mcsv1alpha1.ServiceExportConditionValid).Message, "Service demo/ghost not found")

	// Readiness change → counts change.
	require.NoError(t, pods[0].SetReady(ctx, false))
	eventuallyService("one z1 endpoint not ready", func(s catalog.Service, ok bool) bool {
		return ok && s.ReadyEndpoints() == 2
	})
	require.Equal(t, wantEndpoints(1, 1), counts(last.Endpoints))

	// Federator restart → the same catalog, same version, rebuilt.
	before := catalogOf(t, f)
	require.NoError(t, f.Stop(10*time.Second))
	f = startFederator(t, a)
	after := catalogOf(t, f)
	require.Equal(t, fedproc.LocalVersion(before), fedproc.LocalVersion(after), "restart rebuilds the same catalog")
	s, ok := fedproc.LocalService(after, "demo", "echo")
	require.True(t, ok)
	require.Equal(t, wantEndpoints(1, 1), counts(s.Endpoints))

	// A pod that goes away leaves the counts.
	require.NoError(t, pods[2].Stop(ctx))
	eventuallyService("the a-z2 pod is gone", func(s catalog.Service, ok bool) bool {
		return ok && len(s.Endpoints) == 1
	})

	// Unexport → gone.
	require.NoError(t, mcs.MulticlusterV1alpha1().ServiceExports("demo").Delete(ctx, "echo", metav1.DeleteOptions{}))
	eventuallyService("unexported service leaves the catalog", func(_ catalog.Service, ok bool) bool { return !ok })

	// Export again, then delete the Service → gone, and the export says why.
	export("echo")
	eventuallyService("re-exported", func(_ catalog.Service, ok bool) bool { return ok })
	require.NoError(t, kc.CoreV1().Services("demo").Delete(ctx, "echo", metav1.DeleteOptions{}))
	eventuallyService("deleted Service leaves the catalog", func(_ catalog.Service, ok bool) bool { return !ok })
	require.Eventually(t, func() bool {
		c := condition("echo", mcsv1alpha1.ServiceExportConditionValid)
		return c != nil && c.Reason == string(mcsv1alpha1.ServiceExportReasonNoService)
	}, 30*time.Second, 100*time.Millisecond)

	// No secret in the logs: the federator's bearer token never appears.
	fedCfg, err := a.RESTConfig(localcluster.UserFederator)
	require.NoError(t, err)
	logs, err := os.ReadFile(f.Proc.LogPath())
	require.NoError(t, err)
	require.NotEmpty(t, logs)
	require.NotContains(t, string(logs), fedCfg.BearerToken)
	if !env.Isolated() {
		t.Log("e2e: not running as root: the cluster shares the host network; isolation is NOT enforced")
	}
}
