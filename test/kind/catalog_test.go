//go:build kind

package kind

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federator"
)

// Bounds on what the federator has to notice.
const (
	catalogWait   = 2 * time.Minute
	conditionWait = time.Minute
	pollEvery     = 2 * time.Second
)

// TestMulticluster installs Isthmus with deploy/multicluster on two kind
// clusters, from images built with build/*.Dockerfile, and checks what each
// federator sees: cluster a exports demo/echo, cluster b runs the same
// Service without exporting it.
func TestMulticluster(t *testing.T) {
	s := setUp(t)
	a, b := s.clusters["a"], s.clusters["b"]
	ctx := t.Context()

	// The federator runs as its ServiceAccount with the least privilege
	// deploy/multicluster grants it, and no more.
	t.Run("federator RBAC", func(t *testing.T) {
		sa := "system:serviceaccount:" + systemNamespace + ":" + federatorName
		for _, c := range []struct {
			args []string
			want string
		}{
			{[]string{"list", "endpointslices.discovery.k8s.io"}, "yes"},
			{[]string{"watch", "pods", "--all-namespaces"}, "yes"},
			{[]string{"delete", "pods", "--all-namespaces"}, "no"},
			{[]string{"patch", "serviceexports.multicluster.x-k8s.io", "--subresource=status"}, "yes"},
			{[]string{"update", "serviceexports.multicluster.x-k8s.io"}, "no"},
			{[]string{"list", "secrets", "--all-namespaces"}, "no"},
		} {
			require.Equal(t, c.want, canI(ctx, t, a, sa, c.args...), "%s may %s", sa, strings.Join(c.args, " "))
		}
	})

	// Two echo pods and Service demo/echo in both clusters; only a exports
	// it (and exports ghost, which has no Service).
	for _, c := range s.orderedClusters() {
		m, err := echoManifests(c.clusterSpec, s.imageIDs[echoImage], c == a)
		require.NoError(t, err)
		_, err = c.kubectl(ctx, applyTimeout, m, "apply", "-f", "-")
		require.NoError(t, err)
	}
	for _, c := range s.orderedClusters() {
		require.NoError(t, c.waitRollout(ctx, demoNamespace, echoName, rolloutWait))
	}

	t.Run("echo answers through its Service", func(t *testing.T) {
		// The API server's service proxy: Service port 80 → pod port 8080,
		// on the pod IP echo listens on.
		body, err := a.getRaw(ctx, "/api/v1/namespaces/"+demoNamespace+"/services/http:"+echoName+":80/proxy/kind-e2e")
		require.NoError(t, err)
		var reply struct {
			Pod, Namespace, Cluster, Path string
		}
		require.NoError(t, json.Unmarshal(body, &reply), "echo's reply: %s", body)
		require.Equal(t, demoNamespace, reply.Namespace)
		require.Equal(t, "a", reply.Cluster)
		require.Equal(t, "/kind-e2e", reply.Path)
		require.True(t, strings.HasPrefix(reply.Pod, echoName+"-"), "pod name from the downward API: %q", reply.Pod)
	})

	t.Run("cluster a exports demo/echo", func(t *testing.T) {
		// Both pods run on the one node, so one locality: the node's
		// labels. Waiting for exactly this (not just for 2 ready) also
		// waits out pods of an earlier rollout that are still terminating
		// (NotReady) in a reused cluster.
		want := []catalog.LocalityEndpoints{
			{Locality: catalog.Locality{Region: a.Region, Zone: a.Zone}, Ready: echoReplicas},
		}
		var last catalog.Service
		err := eventually(ctx, catalogWait, pollEvery,
			fmt.Sprintf("demo/echo in cluster a's catalog with endpoints %+v", want),
			func(ctx context.Context) (bool, string, error) {
				d, err := catalogOf(ctx, a)
				if err != nil {
					return false, "", err
				}
				svc, ok := localService(d, demoNamespace, echoName)
				if !ok {
					return false, fmt.Sprintf("not in the catalog: %+v", d), nil
				}
				last = svc
				return reflect.DeepEqual(svc.Endpoints, want), fmt.Sprintf("%+v", svc), nil
			})
		require.NoError(t, err)
		require.Equal(t, "a", last.Cluster)
		require.Equal(t, []catalog.Port{{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, AppProtocol: "http"}}, last.Ports)

		d, err := catalogOf(ctx, a)
		require.NoError(t, err)
		require.Equal(t, "a", d.Cluster, "CLUSTER_NAME from the overlay")
		_, ok := localService(d, demoNamespace, ghostName)
		require.False(t, ok, "a ServiceExport without a Service is never in the catalog")

		valid := waitCondition(ctx, t, a, echoName, func(c *metav1.Condition) bool {
			return c != nil && c.Status == metav1.ConditionTrue
		})
		require.Equal(t, string(mcsv1alpha1.ServiceExportReasonValid), valid.Reason)
		// Bad input: the export says why it is refused.
		ghost := waitCondition(ctx, t, a, ghostName, func(c *metav1.Condition) bool {
			return c != nil && c.Status == metav1.ConditionFalse
		})
		require.Equal(t, string(mcsv1alpha1.ServiceExportReasonNoService), ghost.Reason)
		require.Contains(t, ghost.Message, "Service demo/ghost not found")
	})

	t.Run("cluster b exports nothing", func(t *testing.T) {
		// After a's federator has seen its export, b's has had as long to
		// (wrongly) see b's unexported Service.
		d, err := catalogOf(ctx, b)
		require.NoError(t, err)
		require.Equal(t, "b", d.Cluster, "CLUSTER_NAME from the overlay")
		var local []catalog.Service
		found := false
		for _, src := range d.Sources {
			if src.Source == catalog.LocalSource {
				found, local = true, src.Services
			}
		}
		require.True(t, found, "cluster b's catalog has a local source: %+v", d)
		require.Empty(t, local, "cluster b exports nothing, and a Service is only exported with a ServiceExport")
	})
}

// catalogOf fetches the federator's /debug/catalog through the API
// server's service proxy.
func catalogOf(ctx context.Context, c *cluster) (federator.CatalogDump, error) {
	var d federator.CatalogDump
	body, err := c.getRaw(ctx, fmt.Sprintf("/api/v1/namespaces/%s/services/http:%s:%d/proxy/debug/catalog",
		systemNamespace, federatorName, monitoringPort))
	if err != nil {
		return d, err
	}
	if err := json.Unmarshal(body, &d); err != nil {
		return d, fmt.Errorf("cluster %s: /debug/catalog: %w: %s", c.Name, err, body)
	}
	return d, nil
}

// localService finds namespace/name among the local (exported) services.
func localService(d federator.CatalogDump, namespace, name string) (catalog.Service, bool) {
	for _, src := range d.Sources {
		if src.Source != catalog.LocalSource {
			continue
		}
		for _, s := range src.Services {
			if s.Namespace == namespace && s.Name == name {
				return s, true
			}
		}
	}
	return catalog.Service{}, false
}

// waitCondition waits until the Valid condition of ServiceExport
// demo/name satisfies ok, and returns it.
func waitCondition(ctx context.Context, t *testing.T, c *cluster, name string, ok func(*metav1.Condition) bool) *metav1.Condition {
	t.Helper()
	var last *metav1.Condition
	err := eventually(ctx, conditionWait, pollEvery, "ServiceExport "+demoNamespace+"/"+name+" condition Valid",
		func(ctx context.Context) (bool, string, error) {
			out, err := c.kubectl(ctx, kubectlTimeout, nil, "-n", demoNamespace, "get",
				"serviceexports."+mcsv1alpha1.GroupVersion.Version+"."+mcsv1alpha1.GroupName, name, "-o", "json")
			if err != nil {
				return false, "", err
			}
			var se mcsv1alpha1.ServiceExport
			if err := json.Unmarshal([]byte(out), &se); err != nil {
				return false, "", err
			}
			last = meta.FindStatusCondition(se.Status.Conditions, string(mcsv1alpha1.ServiceExportConditionValid))
			return ok(last), fmt.Sprintf("conditions %+v", se.Status.Conditions), nil
		})
	require.NoError(t, err)
	return last
}

// canI asks the API server whether user may do what args say (kubectl
// auth can-i, which exits 1 for "no").
func canI(ctx context.Context, t *testing.T, c *cluster, user string, args ...string) string {
	t.Helper()
	out, err := c.kubectl(ctx, kubectlTimeout, nil, append([]string{"auth", "can-i", "--as", user}, args...)...)
	answer := strings.TrimSpace(out)
	if err != nil && answer != "no" {
		t.Fatal(err)
	}
	return answer
}
