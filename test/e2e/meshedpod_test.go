package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/federator"
)

// meshedPodExample is the example a user applies to run a workload with
// the sidecar (README, "Run a workload in the mesh").
const meshedPodExample = "../../deploy/examples/meshed-pod.yaml"

// decodeStrict reads every object of a multi-document YAML file into the
// client-go types, refusing unknown and duplicate fields, as kubectl's
// strict validation would.
func decodeStrict(t *testing.T, file string) []runtime.Object {
	t.Helper()
	data, err := os.ReadFile(file)
	require.NoError(t, err)
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []runtime.Object
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		require.NoError(t, err)
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, _, err := dec.Decode(doc, nil, nil)
		require.NoError(t, err, "%s: strict decoding", file)
		out = append(out, obj)
	}
}

// checkMeshedPodExample creates every object of the example in a
// namespace with a server-side dry run (admission, defaulting and
// validation by the real API server, nothing stored), then checks that
// the pod is what the sidecar binary expects: the flags it accepts, the
// identity inputs, the token and roots where the flags point, the
// capture sparing the sidecar's uid, and Pod Security: every container
// "restricted" but the capture step, whose NET_ADMIN and NET_RAW as root
// are the only exception.
func checkMeshedPodExample(t *testing.T, ctx context.Context, kc kubernetes.Interface) {
	const ns = "demo"
	_, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
	dry := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: metav1.FieldValidationStrict}
	var deploy *appsv1.Deployment
	var kinds []string
	for _, obj := range decodeStrict(t, meshedPodExample) {
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			_, err = kc.CoreV1().ServiceAccounts(ns).Create(ctx, o, dry)
		case *corev1.Service:
			_, err = kc.CoreV1().Services(ns).Create(ctx, o, dry)
		case *appsv1.Deployment:
			deploy, err = kc.AppsV1().Deployments(ns).Create(ctx, o, dry)
		default:
			require.FailNow(t, "the example holds a kind this test does not create", "%T", obj)
		}
		require.NoError(t, err, "server-side dry-run create of %T", obj)
		kinds = append(kinds, obj.GetObjectKind().GroupVersionKind().Kind)
	}
	require.Equal(t, []string{"ServiceAccount", "Service", "Deployment"}, kinds)
	spec := deploy.Spec.Template.Spec
	require.NotNil(t, spec.AutomountServiceAccountToken)
	require.False(t, *spec.AutomountServiceAccountToken, "the sidecar needs no API token")

	initC := containerNamed(t, spec.InitContainers, "isthmus-init")
	proxy := containerNamed(t, spec.InitContainers, "isthmus-proxy")
	app := containerNamed(t, spec.Containers, "echo")
	require.Equal(t, []string{"isthmus-init", "isthmus-proxy"}, []string{spec.InitContainers[0].Name, spec.InitContainers[1].Name},
		"the capture first, then the proxy, before the app")
	require.NotNil(t, proxy.RestartPolicy)
	require.Equal(t, corev1.ContainerRestartPolicyAlways, *proxy.RestartPolicy, "a native sidecar: up before the app starts, down after it stops")

	// The capture step: the real binary takes its flags (--dry-run prints
	// the rules without privileges), and spares the proxy's own uid.
	require.Equal(t, "iptables", initC.Args[0])
	out, err := exec.CommandContext(ctx, filepath.Join(binDir, "sidecar"), append(slices.Clone(initC.Args), "--dry-run")...).CombinedOutput()
	require.NoError(t, err, "sidecar refuses the capture step's flags: %s", out)
	require.Contains(t, string(out), "--uid-owner 1337", "the sidecar's own traffic is never captured")
	isc := initC.SecurityContext
	require.Equal(t, int64(0), *isc.RunAsUser, "iptables needs root")
	require.ElementsMatch(t, []corev1.Capability{"NET_ADMIN", "NET_RAW"}, isc.Capabilities.Add)
	require.Equal(t, []corev1.Capability{"ALL"}, isc.Capabilities.Drop)
	require.False(t, *isc.AllowPrivilegeEscalation)
	require.True(t, *isc.ReadOnlyRootFilesystem)

	// The proxy: as the kubelet expands its arguments, the real binary
	// accepts them; the files they name are the mounted token and roots.
	require.Equal(t, "run", proxy.Args[0])
	values := map[string]string{}
	for _, e := range proxy.Env {
		if e.ValueFrom == nil {
			values[e.Name] = e.Value
		}
	}
	args := expandArgs(proxy.Args, values)
	out, err = exec.CommandContext(ctx, filepath.Join(binDir, "sidecar"), append(args, "--help")...).CombinedOutput()
	require.NoError(t, err, "sidecar refuses the proxy's flags %q: %s", args, out)
	flags := flagValues(args[1:])
	require.Equal(t, federatorName+"."+systemNS+".svc:"+servicePort(t, ctx, kc, federatorName, "grpc-ca"), flags["xds-address"],
		"the federator Service's CA and xDS port")
	require.Equal(t, values["CLUSTER_NAME"]+".mesh", flags["trust-domain"], "the example's trust domain is the default one for its cluster name")
	tokenVol := volumeNamed(t, spec, "isthmus-ca-token")
	require.NotNil(t, tokenVol.Projected)
	require.Len(t, tokenVol.Projected.Sources, 1)
	sat := tokenVol.Projected.Sources[0].ServiceAccountToken
	require.NotNil(t, sat)
	require.Equal(t, federator.DefaultConfig().TokenAudience, sat.Audience, "the audience the federator's CA checks")
	require.Equal(t, path.Join(mountOf(t, proxy, tokenVol.Name), sat.Path), flags["token-file"])
	rootsVol := volumeNamed(t, spec, "isthmus-ca-root-cert")
	require.NotNil(t, rootsVol.ConfigMap)
	require.Equal(t, ca.RootsConfigMapName, rootsVol.ConfigMap.Name, "the copy the federator keeps in every namespace")
	require.Equal(t, []corev1.KeyToPath{{Key: ca.KeyRootCert, Path: path.Base(flags["ca-roots-file"])}}, rootsVol.ConfigMap.Items)
	require.Equal(t, path.Dir(flags["ca-roots-file"]), mountOf(t, proxy, rootsVol.Name))
	for _, m := range proxy.VolumeMounts {
		require.True(t, m.ReadOnly, "mount %s", m.Name)
	}
	for _, c := range []corev1.Container{app, initC} {
		for _, m := range c.VolumeMounts {
			require.NotContains(t, []string{tokenVol.Name, rootsVol.Name}, m.Name, "only the proxy sees the token and the roots; %s mounts %s", c.Name, m.Name)
		}
	}

	// Who the proxy says it is: the pod's own namespace, name, IP and
	// ServiceAccount, from the downward API.
	for name, field := range map[string]string{"POD_IP": "status.podIP", "POD_NAME": "metadata.name",
		"POD_NAMESPACE": "metadata.namespace", "SERVICE_ACCOUNT": "spec.serviceAccountName"} {
		e := envNamed(t, proxy, name)
		require.NotNil(t, e.ValueFrom, name)
		require.NotNil(t, e.ValueFrom.FieldRef, name)
		require.Equal(t, field, e.ValueFrom.FieldRef.FieldPath, name)
	}

	// Readiness (and start-up, which holds the app back) on the health
	// port the proxy serves and the capture spares.
	require.Equal(t, int32(15020), portNamed(t, proxy, "http-health"))
	require.Equal(t, ":15020", flags["health-addr"])
	for _, p := range []*corev1.Probe{proxy.ReadinessProbe, proxy.StartupProbe} {
		require.NotNil(t, p)
		require.NotNil(t, p.HTTPGet)
		require.Equal(t, "/healthz/ready", p.HTTPGet.Path)
		require.Equal(t, int32(15020), resolvePort(t, proxy, p.HTTPGet.Port))
	}

	// Everything but the capture step is hardened as "restricted" asks.
	psc := proxy.SecurityContext
	require.Equal(t, int64(1337), *psc.RunAsUser, "the uid the capture spares")
	for _, c := range []corev1.Container{proxy, app} {
		sc := c.SecurityContext
		require.NotNil(t, sc, c.Name)
		require.True(t, *sc.RunAsNonRoot, c.Name)
		require.False(t, *sc.AllowPrivilegeEscalation, c.Name)
		require.True(t, *sc.ReadOnlyRootFilesystem, c.Name)
		require.Equal(t, []corev1.Capability{"ALL"}, sc.Capabilities.Drop, c.Name)
		require.Empty(t, sc.Capabilities.Add, c.Name)
	}
	require.NotEqual(t, int64(1337), *app.SecurityContext.RunAsUser, "the app must not share the uid the capture spares")

	// Pod Security, by the real admission: at "restricted" the pod is
	// refused for the capture step alone, and admitted without it.
	_, err = kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "restricted",
		Labels: map[string]string{"pod-security.kubernetes.io/enforce": "restricted"}}}, metav1.CreateOptions{})
	require.NoError(t, err)
	// A pod, unlike a Deployment, is refused unless its ServiceAccount
	// exists, dry run or not.
	for _, n := range []string{ns, "restricted"} {
		_, err := kc.CoreV1().ServiceAccounts(n).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: spec.ServiceAccountName}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	podDryRun := func(n string, s corev1.PodSpec) error {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: "echo-", Namespace: n}, Spec: s}
		_, err := kc.CoreV1().Pods(n).Create(ctx, pod, dry)
		return err
	}
	err = podDryRun("restricted", spec)
	require.True(t, apierrors.IsForbidden(err), "%v", err)
	require.ErrorContains(t, err, `container "isthmus-init"`)
	for _, other := range []string{`"isthmus-proxy"`, `"echo"`} {
		require.NotContains(t, err.Error(), other, "only the capture step breaks the restricted level")
	}
	withoutCapture := *spec.DeepCopy()
	withoutCapture.InitContainers = withoutCapture.InitContainers[1:]
	require.NoError(t, podDryRun("restricted", withoutCapture), "the proxy and the app are admitted at the restricted level")
	// In the example's own namespace (no Pod Security label) it is
	// admitted as it is.
	require.NoError(t, podDryRun(ns, spec))
}
