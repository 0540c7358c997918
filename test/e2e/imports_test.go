package e2e

import (
	"context"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	networkingapi "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/kube"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// importWriterRBAC grants the federator's user exactly what the
// ImportWriter's documentation says it needs, so the test also proves that
// list is complete.
const importWriterRBAC = `apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: isthmus-import-writer-test
rules:
  - apiGroups: [""]
    resources: ["namespaces"]
    verbs: ["list", "watch"]
  - apiGroups: ["networking.istio.io"]
    resources: ["serviceentries"]
    verbs: ["get", "list", "watch", "create", "update", "delete"]
  - apiGroups: ["multicluster.x-k8s.io"]
    resources: ["serviceimports"]
    verbs: ["get", "list", "watch", "create", "update", "delete"]
  - apiGroups: ["multicluster.x-k8s.io"]
    resources: ["serviceimports/status"]
    verbs: ["update"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: isthmus-import-writer-test
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: isthmus-import-writer-test
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: User
    name: system:isthmus:federator
`

// TestImportWriterObjectsPassIstioSchema runs the import writer against a
// real kube-apiserver that has Istio's own ServiceEntry CRD (copied from
// istio.io/api, with its OpenAPI schema and CEL rules) and the MCS CRDs
// from deploy/crds, and checks that every object reads back exactly as
// written: nothing refused, nothing pruned.
func TestImportWriterObjectsPassIstioSchema(t *testing.T) {
	env := localcluster.StartT(t, "a")
	installIsthmus(t, env)
	a := env.Cluster("a")
	ctx := t.Context()
	adminCfg, err := a.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	applyCtx, cancel := context.WithTimeout(ctx, time.Minute)
	require.NoError(t, install.Apply(applyCtx, adminCfg, install.IstioServiceEntryCRD, install.IstioAuthorizationPolicyCRD, install.IstioPeerAuthenticationCRD, []byte(importWriterRBAC)))
	cancel()
	for _, ns := range []string{"demo"} {
		_, err := a.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}

	adminIstio, err := istioclient.NewForConfig(adminCfg)
	require.NoError(t, err)
	// The schema is really enforced here: a port name Istio refuses is
	// refused by the API server.
	bad := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "bad"}}
	bad.Spec.Hosts = []string{"bad.example.com"}
	bad.Spec.Resolution = networkingapi.ServiceEntry_STATIC
	bad.Spec.Endpoints = []*networkingapi.WorkloadEntry{{Address: "10.0.0.1", Ports: map[string]uint32{"Bad_Name": 80}}}
	_, err = adminIstio.NetworkingV1().ServiceEntries("demo").Create(ctx, bad, metav1.CreateOptions{})
	require.True(t, apierrors.IsInvalid(err), "Istio's CEL rules must be active, got %v", err)
	require.ErrorContains(t, err, "port name must be valid")

	// Someone else's ServiceEntry under the name the writer would use.
	theirs := &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "other.clusterset.local"}}
	theirs.Spec.Hosts = []string{"other.example.com"}
	theirs.Spec.Resolution = networkingapi.ServiceEntry_DNS
	_, err = adminIstio.NetworkingV1().ServiceEntries("demo").Create(ctx, theirs, metav1.CreateOptions{})
	require.NoError(t, err)

	// The writer runs with the federator's identity and only the RBAC above.
	fedCfg, err := a.RESTConfig(localcluster.UserFederator)
	require.NoError(t, err)
	kc, err := kubernetes.NewForConfig(fedCfg)
	require.NoError(t, err)
	ic, err := istioclient.NewForConfig(fedCfg)
	require.NoError(t, err)
	mc, err := mcsclient.NewForConfig(fedCfg)
	require.NoError(t, err)

	echoB := catalog.Service{
		Namespace: "demo", Name: "echo", Cluster: "b",
		Ports: []catalog.Port{
			{Name: "http", Port: 80, AppProtocol: "http"},
			{Name: "", Port: 9090},
			{Name: "grpc", Port: 7070, AppProtocol: "grpc"},
			{Name: "admin", Port: 8443, AppProtocol: "https"},
			{Name: "dns", Port: 53, Protocol: catalog.ProtocolUDP},
		},
		Endpoints: []catalog.LocalityEndpoints{
			{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 3},
			{Locality: catalog.Locality{Region: "r1", Zone: "z2", Subzone: "s1"}, Ready: 1, NotReady: 1},
			{Locality: catalog.Locality{Region: "r2"}, NotReady: 2},
		},
		Identities: []string{"spiffe://b.mesh/ns/demo/sa/echo"},
		Gateways:   []string{"10.254.0.2:15443", "[fd00::2]:15443"},
	}
	otherB := catalog.Service{
		Namespace: "demo", Name: "other", Cluster: "b",
		Ports:     []catalog.Port{{Name: "http", Port: 80}},
		Endpoints: []catalog.LocalityEndpoints{{Ready: 1}},
		Gateways:  []string{"10.254.0.2:15443"},
	}
	missingB := otherB
	missingB.Namespace, missingB.Name = "missing", "echo"
	webC := catalog.Service{
		Namespace: "demo", Name: "web", Cluster: "c",
		Ports:      []catalog.Port{{Name: "http-alt", Port: 8080}},
		Endpoints:  []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r3", Zone: "z1"}, Ready: 2}},
		Identities: []string{"spiffe://c.mesh/ns/demo/sa/web", "spiffe://c.mesh/ns/demo/sa/web-canary"},
		Gateways:   []string{"gw.c.example.net:15443"},
	}
	store := catalog.NewStore()
	setPeer := func(peer string, svcs ...catalog.Service) {
		t.Helper()
		snap, err := catalog.NewSnapshot(peer, svcs)
		require.NoError(t, err)
		store.Set(snap)
	}
	setPeer("b", echoB, otherB, missingB)
	setPeer("c", webC)

	w, err := kube.NewImportWriter(kc, ic, mc, store, kube.ImportOptions{
		ClusterName: "a", FlushInterval: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Error("import writer did not stop within 30s")
		}
	})

	dyn, err := dynamic.NewForConfig(adminCfg)
	require.NoError(t, err)
	seGVR := networkingv1.SchemeGroupVersion.WithResource("serviceentries")
	// readBack waits for the writer's ServiceEntry name to hold want, read
	// both typed and as raw JSON: a field the schema pruned or defaulted
	// would show in the raw spec.
	readBack := func(name string, want *networkingapi.ServiceEntry) {
		t.Helper()
		wantJSON, err := json.Marshal(want)
		require.NoError(t, err)
		var lastRaw string
		require.Eventually(t, func() bool {
			u, err := dyn.Resource(seGVR).Namespace("demo").Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				lastRaw = err.Error()
				return false
			}
			raw, err := json.Marshal(u.Object["spec"])
			require.NoError(t, err)
			lastRaw = string(raw)
			var got, exp any
			require.NoError(t, json.Unmarshal(raw, &got))
			require.NoError(t, json.Unmarshal(wantJSON, &exp))
			return equalJSON(got, exp)
		}, 30*time.Second, 100*time.Millisecond, "ServiceEntry %s: want spec %s, API server has %s", name, wantJSON, lastRaw)
		se, err := ic.NetworkingV1().ServiceEntries("demo").Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		gotJSON, err := json.Marshal(&se.Spec)
		require.NoError(t, err)
		require.JSONEq(t, string(wantJSON), string(gotJSON))
		require.Equal(t, kube.ManagedByIsthmus, se.Labels[kube.LabelManagedBy])
	}

	epLabels := func(peer, svc string) map[string]string {
		return map[string]string{kube.LabelSourceCluster: peer, kube.LabelServiceName: svc}
	}
	echoPorts := func(gw uint32) map[string]uint32 {
		return map[string]uint32{"http": gw, "grpc": gw, "admin": gw, "tcp-9090": gw}
	}
	readBack("echo.clusterset.local", &networkingapi.ServiceEntry{
		Hosts: []string{"echo.demo.svc.clusterset.local"},
		Ports: []*networkingapi.ServicePort{
			{Number: 80, Protocol: "HTTP", Name: "http"},
			{Number: 7070, Protocol: "GRPC", Name: "grpc"},
			{Number: 8443, Protocol: "TLS", Name: "admin"},
			{Number: 9090, Protocol: "TCP", Name: "tcp-9090"},
		},
		Location:   networkingapi.ServiceEntry_MESH_INTERNAL,
		Resolution: networkingapi.ServiceEntry_STATIC,
		Endpoints: []*networkingapi.WorkloadEntry{
			// Three ready in r1/z1, shared by the two gateways; nothing for
			// r2, which has no ready endpoint.
			{Address: "10.254.0.2", Ports: echoPorts(15443), Labels: epLabels("b", "echo"), Network: "b", Locality: "r1/z1", Weight: 2},
			{Address: "fd00::2", Ports: echoPorts(15443), Labels: epLabels("b", "echo"), Network: "b", Locality: "r1/z1", Weight: 1},
			{Address: "10.254.0.2", Ports: echoPorts(15443), Labels: epLabels("b", "echo"), Network: "b", Locality: "r1/z2/s1", Weight: 1},
		},
		SubjectAltNames: []string{"spiffe://b.mesh/ns/demo/sa/echo"},
	})
	readBack("web.clusterset.local", &networkingapi.ServiceEntry{
		Hosts:      []string{"web.demo.svc.clusterset.local"},
		Ports:      []*networkingapi.ServicePort{{Number: 8080, Protocol: "HTTP", Name: "http-alt"}},
		Location:   networkingapi.ServiceEntry_MESH_INTERNAL,
		Resolution: networkingapi.ServiceEntry_DNS,
		Endpoints: []*networkingapi.WorkloadEntry{
			{Address: "gw.c.example.net", Ports: map[string]uint32{"http-alt": 15443}, Labels: epLabels("c", "web"), Network: "c", Locality: "r3/z1", Weight: 2},
		},
		SubjectAltNames: []string{"spiffe://c.mesh/ns/demo/sa/web", "spiffe://c.mesh/ns/demo/sa/web-canary"},
	})

	// The ServiceImport, status included (a subresource, written apart).
	var si *mcsv1alpha1.ServiceImport
	require.Eventually(t, func() bool {
		si, err = mc.MulticlusterV1alpha1().ServiceImports("demo").Get(ctx, "echo", metav1.GetOptions{})
		return err == nil && len(si.Status.Clusters) == 1
	}, 30*time.Second, 100*time.Millisecond, "ServiceImport demo/echo with its status")
	require.Equal(t, mcsv1alpha1.ClusterSetIP, si.Spec.Type)
	require.Equal(t, "b", si.Status.Clusters[0].Cluster)
	require.Equal(t, kube.ManagedByIsthmus, si.Labels[kube.LabelManagedBy])
	var siPorts []string
	for _, p := range si.Spec.Ports {
		app := ""
		if p.AppProtocol != nil {
			app = *p.AppProtocol
		}
		siPorts = append(siPorts, p.Name+"/"+string(p.Protocol)+"/"+app)
	}
	require.Equal(t, []string{"http/TCP/http", "grpc/TCP/grpc", "admin/TCP/https", "tcp-9090/TCP/"}, siPorts)

	// What could not be written is reported, and someone else's object is
	// untouched.
	require.Eventually(t, func() bool { return len(w.Skipped()["b"]) == 3 }, 30*time.Second, 50*time.Millisecond,
		"three skipped imports for b; have %v", w.Skipped())
	require.Equal(t, []kube.SkippedImport{
		{Namespace: "demo", Name: "echo", Reason: "port 53/UDP not imported: ServiceEntry ports carry only TCP-based protocols"},
		{Namespace: "demo", Name: "other", Reason: "ServiceEntry demo/other.clusterset.local exists and is not managed by Isthmus (no label app.kubernetes.io/managed-by=isthmus); left untouched"},
		{Namespace: "missing", Name: "echo", Reason: "namespace missing does not exist in this cluster"},
	}, w.Skipped()["b"])
	got, err := adminIstio.NetworkingV1().ServiceEntries("demo").Get(ctx, "other.clusterset.local", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, []string{"other.example.com"}, got.Spec.Hosts)
	require.Empty(t, got.Labels)

	// Updates go through on the real server too: readiness moves weights.
	echoB.Endpoints = []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 4}}
	setPeer("b", echoB, otherB, missingB)
	require.Eventually(t, func() bool {
		se, err := ic.NetworkingV1().ServiceEntries("demo").Get(ctx, "echo.clusterset.local", metav1.GetOptions{})
		return err == nil && len(se.Spec.Endpoints) == 2 && se.Spec.Endpoints[0].Weight == 2 && se.Spec.Endpoints[1].Weight == 2
	}, 30*time.Second, 100*time.Millisecond, "weights follow readiness")

	// Peer c goes: its service's objects go.
	store.Delete("c")
	require.Eventually(t, func() bool {
		_, err := ic.NetworkingV1().ServiceEntries("demo").Get(ctx, "web.clusterset.local", metav1.GetOptions{})
		_, siErr := mc.MulticlusterV1alpha1().ServiceImports("demo").Get(ctx, "web", metav1.GetOptions{})
		return apierrors.IsNotFound(err) && apierrors.IsNotFound(siErr)
	}, 30*time.Second, 100*time.Millisecond, "web's ServiceEntry and ServiceImport deleted")
}

// equalJSON compares two decoded JSON values.
func equalJSON(a, b any) bool {
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && string(ja) == string(jb)
}
