package e2e

import (
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	xdsresource "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/internal/sysmon"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/pkg/federator"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// What deploy/multicluster installs.
const (
	systemNS      = "isthmus-system"
	federatorName = "isthmus-federator"
	gatewayName   = "isthmus-eastwest-gw"
	gatewaySA     = "system:serviceaccount:isthmus-system:isthmus-eastwest-gw"
)

// kustomizeBinary finds kustomize: $ISTHMUS_KUSTOMIZE, the repository's
// bin/ (make tools puts it there), or PATH.
func kustomizeBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ISTHMUS_KUSTOMIZE"); p != "" {
		return p
	}
	if p, err := filepath.Abs("../../bin/kustomize"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, err := exec.LookPath("kustomize")
	require.NoError(t, err, "kustomize not found: run `make tools`")
	return p
}

// applyDeploy builds deploy/multicluster with kustomize and applies the
// result to c, exactly what `kubectl apply -k deploy/multicluster` sends:
// server-side apply with strict field validation.
func applyDeploy(t *testing.T, ctx context.Context, c *localcluster.Cluster) {
	t.Helper()
	out, err := exec.CommandContext(ctx, kustomizeBinary(t), "build", "../../deploy/multicluster").Output()
	require.NoError(t, err, "kustomize build deploy/multicluster")
	cfg, err := c.RESTConfig(localcluster.UserAdmin)
	require.NoError(t, err)
	require.NoError(t, install.Apply(ctx, cfg, out))
}

// TestDeployManifests applies exactly what an operator applies
// (`kubectl apply -k deploy/multicluster`) to a real API server with strict
// field validation, and checks what the objects promise: the federator's
// ServiceAccount gets what it needs and nothing more; the east-west
// gateway's gets nothing at all, and its only token is one the CA accepts
// and the API server refuses; the gateway's Deployment, Service and
// PodDisruptionBudget carry the ports, probes, drain, mounts and flags the
// binary expects; both Deployments pass the "restricted" Pod Security
// level.
func TestDeployManifests(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	env := localcluster.StartT(t, "a")
	a := env.Cluster("a")
	kc := a.Client()
	applyDeploy(t, ctx, a)

	fedDeploy, err := kc.AppsV1().Deployments(systemNS).Get(ctx, federatorName, metav1.GetOptions{})
	require.NoError(t, err)
	gwDeploy, err := kc.AppsV1().Deployments(systemNS).Get(ctx, gatewayName, metav1.GetOptions{})
	require.NoError(t, err)

	can := func(user string, groups []string, verb, group, res, ns, name string) bool {
		t.Helper()
		r, err := kc.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{
			Spec: authzv1.SubjectAccessReviewSpec{User: user, Groups: groups, ResourceAttributes: &authzv1.ResourceAttributes{
				Verb: verb, Group: group, Resource: res, Namespace: ns, Name: name,
			}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		return r.Status.Allowed
	}
	type access struct {
		verb, group, resource, ns, name string
		allowed                         bool
	}

	t.Run("federator RBAC", func(t *testing.T) {
		sa := "system:serviceaccount:isthmus-system:isthmus-federator"
		for _, tc := range []access{
			{"watch", "", "services", "", "", true},
			{"list", "discovery.k8s.io", "endpointslices", "", "", true},
			{"list", "", "nodes", "", "", true},
			{"watch", "", "pods", "", "", true},
			{"list", "", "pods", "", "", true},
			{"watch", "multicluster.x-k8s.io", "serviceexports", "", "", true},
			// Istio's AuthorizationPolicies, every namespace, read only.
			{"list", "security.istio.io", "authorizationpolicies", "", "", true},
			{"watch", "security.istio.io", "authorizationpolicies", "", "", true},
			{"get", "security.istio.io", "authorizationpolicies", "demo", "allow-web", true},
			// Istio's PeerAuthentications, every namespace, read only.
			{"list", "security.istio.io", "peerauthentications", "", "", true},
			{"watch", "security.istio.io", "peerauthentications", "", "", true},
			{"get", "security.istio.io", "peerauthentications", "demo", "permissive", true},
			{"update", "multicluster.x-k8s.io", "serviceexports/status", "demo", "echo", true},
			{"create", "authentication.k8s.io", "tokenreviews", "", "", true},
			{"get", "", "secrets", "isthmus-system", "isthmus-ca", true},
			{"update", "", "secrets", "isthmus-system", "isthmus-ca", true},
			{"get", "", "secrets", "isthmus-system", "cacerts", true},
			{"update", "", "configmaps", "isthmus-system", "isthmus-cluster", true},
			// The CA's roots, for the gateway to mount.
			{"update", "", "configmaps", "isthmus-system", ca.RootsConfigMapName, true},
			// Peering: token records and join tokens are read and spent, peer
			// bundles kept in ConfigMaps, all inside the federator's namespace.
			{"delete", "", "secrets", "isthmus-system", "isthmus-token-0123456789abcdef", true},
			{"get", "", "secrets", "isthmus-system", "isthmus-join-b", true},
			{"update", "", "configmaps", "isthmus-system", "isthmus-peer-b", true},
			// Listed at start, to delete those no FederationPeer names.
			{"list", "", "configmaps", "isthmus-system", "", true},
			{"list", "", "configmaps", "demo", "", false},
			{"watch", "federation.isthmus.dev", "federationpeers", "", "", true},
			{"create", "federation.isthmus.dev", "federationpeers", "", "", true},
			{"patch", "federation.isthmus.dev", "federationpeers/status", "", "b", true},
			{"create", "networking.istio.io", "serviceentries", "demo", "", true},
			{"delete", "multicluster.x-k8s.io", "serviceimports", "demo", "echo", true},
			{"watch", "", "namespaces", "", "", true},
			{"list", "", "namespaces", "", "", true},
			// The CA's roots in every namespace: created anywhere, then
			// read (by name, or listed and watched with the field selector
			// on that name, cluster-wide) and updated by that name only.
			{"create", "", "configmaps", "demo", "", true},
			{"get", "", "configmaps", "demo", ca.RootsConfigMapName, true},
			{"update", "", "configmaps", "demo", ca.RootsConfigMapName, true},
			{"list", "", "configmaps", "", ca.RootsConfigMapName, true},
			{"watch", "", "configmaps", "", ca.RootsConfigMapName, true},
			// Least privilege: nothing beyond that.
			{"list", "", "configmaps", "", "", false},
			{"watch", "", "configmaps", "demo", "", false},
			{"get", "", "configmaps", "demo", "app-settings", false},
			{"update", "", "configmaps", "demo", "app-settings", false},
			{"patch", "", "configmaps", "demo", ca.RootsConfigMapName, false},
			{"delete", "", "configmaps", "demo", ca.RootsConfigMapName, false},
			{"update", "", "namespaces", "", "demo", false},
			{"update", "", "secrets", "isthmus-system", "cacerts", false},
			{"update", "", "secrets", "isthmus-system", "some-other-secret", false},
			{"get", "", "secrets", "demo", "some-other-secret", false},
			{"update", "federation.isthmus.dev", "federationpeers", "", "b", false},
			{"delete", "federation.isthmus.dev", "federationpeers", "", "b", false},
			{"create", "", "namespaces", "", "", false},
			{"create", "networking.istio.io", "virtualservices", "demo", "", false},
			{"create", "security.istio.io", "authorizationpolicies", "demo", "", false},
			{"update", "security.istio.io", "authorizationpolicies", "demo", "allow-web", false},
			{"patch", "security.istio.io", "authorizationpolicies", "demo", "allow-web", false},
			{"delete", "security.istio.io", "authorizationpolicies", "demo", "allow-web", false},
			{"create", "security.istio.io", "peerauthentications", "demo", "", false},
			{"update", "security.istio.io", "peerauthentications", "demo", "permissive", false},
			{"patch", "security.istio.io", "peerauthentications", "demo", "permissive", false},
			{"delete", "security.istio.io", "peerauthentications", "demo", "permissive", false},
			{"list", "security.istio.io", "requestauthentications", "", "", false},
			{"list", "", "secrets", "", "", false},
			{"get", "", "secrets", "kube-system", "isthmus-ca", false},
			{"update", "multicluster.x-k8s.io", "serviceexports", "demo", "echo", false},
			{"delete", "", "services", "demo", "echo", false},
			{"create", "", "pods", "demo", "", false},
			{"delete", "", "pods", "demo", "echo-0", false},
			{"get", "", "pods/log", "demo", "echo-0", false},
			// Informers list and watch; nothing gets one by name, and
			// ServiceExport status is updated, never patched.
			{"get", "", "pods", "demo", "echo-0", false},
			{"get", "", "services", "demo", "echo", false},
			{"get", "", "nodes", "", "node-1", false},
			{"get", "discovery.k8s.io", "endpointslices", "demo", "echo-abc", false},
			{"get", "multicluster.x-k8s.io", "serviceexports", "demo", "echo", false},
			{"patch", "multicluster.x-k8s.io", "serviceexports/status", "demo", "echo", false},
		} {
			require.Equal(t, tc.allowed, can(sa, nil, tc.verb, tc.group, tc.resource, tc.ns, tc.name),
				"%s %s/%s %s/%s", tc.verb, tc.group, tc.resource, tc.ns, tc.name)
		}
	})

	t.Run("gateway has no API access", func(t *testing.T) {
		// As the API server would see the account, with its groups: what
		// the cluster grants every ServiceAccount counts too.
		groups := []string{"system:serviceaccounts", "system:serviceaccounts:isthmus-system", "system:authenticated"}
		for _, tc := range []access{
			// The roots and the cluster's name reach it as a volume and
			// environment from the kubelet, never through the API.
			{"get", "", "configmaps", systemNS, ca.RootsConfigMapName, false},
			{"get", "", "configmaps", systemNS, federation.ClusterInfoConfigMap, false},
			{"list", "", "configmaps", systemNS, "", false},
			{"get", "", "secrets", systemNS, ca.DefaultSecretName, false},
			{"list", "", "secrets", "", "", false},
			{"create", "authentication.k8s.io", "tokenreviews", "", "", false},
			{"create", "", "serviceaccounts/token", systemNS, "isthmus-eastwest-gw", false},
			{"create", "", "serviceaccounts/token", systemNS, federatorName, false},
			{"list", "", "services", "", "", false},
			{"list", "discovery.k8s.io", "endpointslices", "", "", false},
			{"list", "", "pods", "", "", false},
			{"watch", "multicluster.x-k8s.io", "serviceexports", "", "", false},
			{"get", "federation.isthmus.dev", "federationpeers", "", "b", false},
			{"patch", "apps", "deployments", systemNS, gatewayName, false},
			{"create", "", "pods", systemNS, "", false},
		} {
			require.Equal(t, tc.allowed, can(gatewaySA, groups, tc.verb, tc.group, tc.resource, tc.ns, tc.name),
				"%s %s/%s %s/%s", tc.verb, tc.group, tc.resource, tc.ns, tc.name)
		}
		// No binding names the account, or every account of its namespace.
		crbs, err := kc.RbacV1().ClusterRoleBindings().List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		rbs, err := kc.RbacV1().RoleBindings("").List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		check := func(kind, name string, subjects []rbacv1.Subject) {
			for _, s := range subjects {
				require.False(t, s.Kind == "ServiceAccount" && s.Namespace == systemNS && s.Name == "isthmus-eastwest-gw",
					"%s %s binds the gateway's ServiceAccount", kind, name)
				require.False(t, s.Kind == "Group" && s.Name == "system:serviceaccounts:"+systemNS,
					"%s %s binds every ServiceAccount of %s", kind, name, systemNS)
			}
		}
		for _, b := range crbs.Items {
			check("ClusterRoleBinding", b.Name, b.Subjects)
		}
		for _, b := range rbs.Items {
			check("RoleBinding", b.Namespace+"/"+b.Name, b.Subjects)
		}

		sa, err := kc.CoreV1().ServiceAccounts(systemNS).Get(ctx, "isthmus-eastwest-gw", metav1.GetOptions{})
		require.NoError(t, err)
		require.NotNil(t, sa.AutomountServiceAccountToken)
		require.False(t, *sa.AutomountServiceAccountToken, "no API token is mounted by default")
	})

	t.Run("gateway token: the CA accepts it, the API server refuses it", func(t *testing.T) {
		spec := gwDeploy.Spec.Template.Spec
		require.NotNil(t, spec.AutomountServiceAccountToken)
		require.False(t, *spec.AutomountServiceAccountToken)
		vol := volumeNamed(t, spec, "isthmus-ca-token")
		require.NotNil(t, vol.Projected)
		require.Len(t, vol.Projected.Sources, 1)
		src := vol.Projected.Sources[0].ServiceAccountToken
		require.NotNil(t, src)
		require.Equal(t, federator.DefaultConfig().TokenAudience, src.Audience, "the audience the federator's CA checks (--token-audience)")
		require.NotNil(t, src.ExpirationSeconds)
		require.LessOrEqual(t, *src.ExpirationSeconds, int64(24*3600), "a short-lived token: the gateway reads it at every certificate request")

		// The token the kubelet would mount, asked for exactly as the
		// volume says.
		tr, err := kc.CoreV1().ServiceAccounts(systemNS).CreateToken(ctx, spec.ServiceAccountName, &authenticationv1.TokenRequest{
			Spec: authenticationv1.TokenRequestSpec{Audiences: []string{src.Audience}, ExpirationSeconds: src.ExpirationSeconds},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		require.WithinDuration(t, time.Now().Add(time.Duration(*src.ExpirationSeconds)*time.Second), tr.Status.ExpirationTimestamp.Time, time.Minute)

		// The CA's own authenticator (a TokenReview) takes it for the
		// gateway's identity: the SPIFFE ID the gateway asks for.
		caller, err := caserver.TokenReviewAuthenticator{Client: kc, Audiences: []string{federator.DefaultConfig().TokenAudience}}.Authenticate(ctx, tr.Status.Token)
		require.NoError(t, err)
		require.Equal(t, caserver.Caller{Namespace: systemNS, ServiceAccount: "isthmus-eastwest-gw"}, caller)

		// The API server does not: the audience is not its own.
		anon := &rest.Config{Host: a.APIServerURL(), BearerToken: tr.Status.Token,
			TLSClientConfig: rest.TLSClientConfig{CAData: a.CAPEM()}}
		gwClient, err := kubernetes.NewForConfig(anon)
		require.NoError(t, err)
		_, err = gwClient.CoreV1().ConfigMaps(systemNS).Get(ctx, ca.RootsConfigMapName, metav1.GetOptions{})
		require.True(t, apierrors.IsUnauthorized(err), "the API server refuses a token for audience %s: %v", src.Audience, err)
	})

	t.Run("gateway Deployment", func(t *testing.T) {
		checkLabels(t, gwDeploy.ObjectMeta, "eastwest-gw")
		require.Equal(t, int32(2), *gwDeploy.Spec.Replicas)
		tmpl := gwDeploy.Spec.Template
		require.Equal(t, gwDeploy.Spec.Selector.MatchLabels["app.kubernetes.io/name"], tmpl.Labels["app.kubernetes.io/name"])
		spec := tmpl.Spec
		require.Equal(t, "isthmus-eastwest-gw", spec.ServiceAccountName)
		c := containerNamed(t, spec.Containers, "eastwest-gw")
		fed := containerNamed(t, fedDeploy.Spec.Template.Spec.Containers, "federator")
		require.Equal(t, strings.Replace(fed.Image, "/federator:", "/eastwest-gw:", 1), c.Image, "named like the federator's image")

		require.Equal(t, int32(15443), portNamed(t, c, "tls"))
		require.Equal(t, int32(15021), portNamed(t, c, "status-port"))
		require.Equal(t, int32(15020), portNamed(t, c, "http-metrics"))
		require.NotNil(t, c.ReadinessProbe)
		require.NotNil(t, c.ReadinessProbe.HTTPGet)
		require.Equal(t, "/healthz/ready", c.ReadinessProbe.HTTPGet.Path)
		require.Equal(t, int32(15021), resolvePort(t, c, c.ReadinessProbe.HTTPGet.Port))

		// Downward API: the xDS node ID and namespace.
		for name, field := range map[string]string{"POD_IP": "status.podIP", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"} {
			e := envNamed(t, c, name)
			require.NotNil(t, e.ValueFrom, name)
			require.NotNil(t, e.ValueFrom.FieldRef, name)
			require.Equal(t, field, e.ValueFrom.FieldRef.FieldPath, name)
		}
		// The cluster name and trust domain as the federator publishes
		// them: every key the Deployment reads exists in what the real
		// code writes.
		require.NoError(t, federation.PublishClusterInfo(ctx, kc, systemNS,
			federation.ClusterInfo{ClusterName: "a", TrustDomain: td, FederatorID: federatorID}))
		published, err := kc.CoreV1().ConfigMaps(systemNS).Get(ctx, federation.ClusterInfoConfigMap, metav1.GetOptions{})
		require.NoError(t, err)
		values := map[string]string{}
		for _, name := range []string{"CLUSTER_NAME", "TRUST_DOMAIN"} {
			ref := envNamed(t, c, name).ValueFrom.ConfigMapKeyRef
			require.NotNil(t, ref, name)
			require.Equal(t, federation.ClusterInfoConfigMap, ref.Name, name)
			v, ok := published.Data[ref.Key]
			require.True(t, ok, "%s reads key %q, which the federator does not publish", name, ref.Key)
			values[name] = v
		}
		require.Equal(t, map[string]string{"CLUSTER_NAME": "a", "TRUST_DOMAIN": "a.mesh"}, values)

		// The flags, as the kubelet expands them: the binary accepts them
		// all, and the files they name are the mounted ones.
		args := expandArgs(c.Args, values)
		out, err := exec.CommandContext(ctx, filepath.Join(binDir, "eastwest-gw"), append(args, "--version")...).CombinedOutput()
		require.NoError(t, err, "eastwest-gw refuses the Deployment's flags: %s", out)
		flags := flagValues(args)
		require.Equal(t, "a", flags["cluster-name"])
		require.Equal(t, "a.mesh", flags["trust-domain"])
		require.Equal(t, federatorName+"."+systemNS+".svc:"+servicePort(t, ctx, kc, federatorName, "grpc-ca"), flags["xds-address"],
			"the federator Service's CA and xDS port")
		tokenVol := volumeNamed(t, spec, "isthmus-ca-token")
		require.Equal(t, path.Join(mountOf(t, c, tokenVol.Name), tokenVol.Projected.Sources[0].ServiceAccountToken.Path), flags["token-file"])
		rootsVol := volumeNamed(t, spec, "isthmus-ca-root-cert")
		require.NotNil(t, rootsVol.ConfigMap)
		require.Equal(t, ca.RootsConfigMapName, rootsVol.ConfigMap.Name)
		require.Len(t, rootsVol.ConfigMap.Items, 1)
		require.Equal(t, ca.KeyRootCert, rootsVol.ConfigMap.Items[0].Key)
		require.Equal(t, path.Join(mountOf(t, c, rootsVol.Name), rootsVol.ConfigMap.Items[0].Path), flags["ca-roots-file"])
		for _, m := range c.VolumeMounts {
			require.True(t, m.ReadOnly, "mount %s", m.Name)
		}

		// Shutdown: the preStop sleep, the gateway's accepting after
		// SIGTERM and its drain all fit in the grace period.
		drain, err := time.ParseDuration(flags["drain-timeout"])
		require.NoError(t, err)
		delay, err := time.ParseDuration(flags["drain-delay"])
		require.NoError(t, err)
		drain += delay
		require.NotNil(t, c.Lifecycle)
		require.NotNil(t, c.Lifecycle.PreStop)
		require.NotNil(t, c.Lifecycle.PreStop.Sleep, "distroless has no shell: the kubelet's own sleep")
		preStop := time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
		require.Positive(t, preStop)
		require.NotNil(t, spec.TerminationGracePeriodSeconds)
		grace := time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
		require.Greater(t, grace, preStop+drain, "terminationGracePeriodSeconds covers preStop %s + --drain-delay and --drain-timeout %s", preStop, drain)

		// Hardened.
		require.NotNil(t, spec.SecurityContext.RunAsNonRoot)
		require.True(t, *spec.SecurityContext.RunAsNonRoot)
		sc := c.SecurityContext
		require.NotNil(t, sc)
		require.True(t, *sc.ReadOnlyRootFilesystem, "readOnlyRootFilesystem")
		require.False(t, *sc.AllowPrivilegeEscalation, "allowPrivilegeEscalation")
		require.Equal(t, []corev1.Capability{"ALL"}, sc.Capabilities.Drop, "capabilities.drop")
		require.Empty(t, sc.Capabilities.Add, "capabilities.add")

		// Sized: requests for scheduling, a memory limit above them.
		req, lim := c.Resources.Requests, c.Resources.Limits
		require.False(t, req.Cpu().IsZero())
		require.GreaterOrEqual(t, req.Memory().Cmp(resource.MustParse("32Mi")), 0, "the measured footprint is 13-23 MB idle with 1,000 routes")
		require.Greater(t, lim.Memory().Cmp(*req.Memory()), 0)
		gomem := envNamed(t, c, "GOMEMLIMIT").ValueFrom
		require.NotNil(t, gomem.ResourceFieldRef)
		require.Equal(t, "limits.memory", gomem.ResourceFieldRef.Resource)
	})

	t.Run("gateway Service and PodDisruptionBudget", func(t *testing.T) {
		c := containerNamed(t, gwDeploy.Spec.Template.Spec.Containers, "eastwest-gw")
		svc, err := kc.CoreV1().Services(systemNS).Get(ctx, gatewayName, metav1.GetOptions{})
		require.NoError(t, err)
		checkLabels(t, svc.ObjectMeta, "eastwest-gw")
		require.Equal(t, corev1.ServiceTypeLoadBalancer, svc.Spec.Type)
		require.Equal(t, gwDeploy.Spec.Selector.MatchLabels, svc.Spec.Selector)
		got := map[string][2]int32{}
		for _, p := range svc.Spec.Ports {
			require.Equal(t, corev1.ProtocolTCP, p.Protocol)
			got[p.Name] = [2]int32{p.Port, resolvePort(t, c, p.TargetPort)}
		}
		require.Equal(t, map[string][2]int32{"tls": {15443, 15443}, "status-port": {15021, 15021}}, got,
			"peers' TLS and their probes; metrics stay inside the cluster")

		pdb, err := kc.PolicyV1().PodDisruptionBudgets(systemNS).Get(ctx, gatewayName, metav1.GetOptions{})
		require.NoError(t, err)
		checkLabels(t, pdb.ObjectMeta, "eastwest-gw")
		require.Equal(t, gwDeploy.Spec.Selector.MatchLabels, pdb.Spec.Selector.MatchLabels)
		require.NotNil(t, pdb.Spec.MinAvailable)
		require.Equal(t, intstr.FromInt32(1), *pdb.Spec.MinAvailable)
		require.Less(t, pdb.Spec.MinAvailable.IntVal, *gwDeploy.Spec.Replicas, "a node drain can still evict one gateway")
	})

	t.Run("federator advertises the gateway", func(t *testing.T) {
		c := containerNamed(t, fedDeploy.Spec.Template.Spec.Containers, "federator")
		require.Contains(t, c.Args, "--gateway-address=$(GATEWAY_ADDRESS)")
		e := envNamed(t, c, "GATEWAY_ADDRESS")
		require.Nil(t, e.ValueFrom)
		values := map[string]string{"CLUSTER_NAME": envNamed(t, c, "CLUSTER_NAME").Value}
		for _, v := range []string{e.Value, "gw.a.example.com:15443"} {
			values["GATEWAY_ADDRESS"] = v
			args := expandArgs(c.Args, values)
			out, err := exec.CommandContext(ctx, filepath.Join(binDir, "federator"), append(args, "--help")...).CombinedOutput()
			require.NoError(t, err, "federator refuses the Deployment's flags %q: %s", args, out)
		}
	})

	t.Run("meshed pod example", func(t *testing.T) { checkMeshedPodExample(t, ctx, kc) })

	t.Run("restricted Pod Security", func(t *testing.T) {
		_, err := kc.CoreV1().Namespaces().Patch(ctx, systemNS, types.MergePatchType,
			[]byte(`{"metadata":{"labels":{"pod-security.kubernetes.io/enforce":"restricted"}}}`), metav1.PatchOptions{})
		require.NoError(t, err)
		dryRun := func(tmpl corev1.PodTemplateSpec) error {
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: "dry-run-", Namespace: systemNS, Labels: tmpl.Labels}, Spec: tmpl.Spec}
			_, err := kc.CoreV1().Pods(systemNS).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			return err
		}
		for _, d := range []*appsv1.Deployment{fedDeploy, gwDeploy} {
			require.NoError(t, dryRun(d.Spec.Template), "%s's pods are admitted at the restricted level", d.Name)
		}
		// The admission is real: without dropping capabilities, refused.
		loose := *gwDeploy.Spec.Template.DeepCopy()
		loose.Spec.Containers[0].SecurityContext.Capabilities = nil
		err = dryRun(loose)
		require.True(t, apierrors.IsForbidden(err), "%v", err)
		require.ErrorContains(t, err, "capabilities")
	})
}

// TestGatewayAsDeployed runs the real eastwest-gw binary as the kubelet
// would run deploy/multicluster's Deployment beside the real federator:
// its arguments and environment resolved from the applied object (the
// cluster name and trust domain from the ConfigMap the federator
// published, the downward API), the projected token asked for as the
// volume says, the roots from the federator's ConfigMap. Only what needs
// cluster DNS or a pod network is pointed at the harness instead: the
// federator's address and the listen addresses. The gateway gets its SVID
// from the CA with that token, fetches its routes over xDS on 15012 with
// it, and turns ready.
func TestGatewayAsDeployed(t *testing.T) {
	env := localcluster.StartT(t, "a")
	a := env.Cluster("a")
	ctx := t.Context()
	kc := a.Client()
	applyCtx, cancel := context.WithTimeout(ctx, time.Minute)
	applyDeploy(t, applyCtx, a)
	cancel()
	installIsthmus(t, env) // the harness runs the federator as a user with its roles
	f := startFederator(t, a)

	d, err := kc.AppsV1().Deployments(systemNS).Get(ctx, gatewayName, metav1.GetOptions{})
	require.NoError(t, err)
	podName := gatewayName + "-7d9f8b6c5-x2x4q"
	args, environ := asKubelet(t, kc, d.Spec.Template.Spec, "eastwest-gw", f.Host, podName, t.TempDir())

	bind := f.Host
	if a.NetNS() != "" {
		bind = "0.0.0.0"
	}
	// Later flags win: no cluster DNS for isthmus-federator.isthmus-system.svc
	// here, and no pod network of its own.
	args = append(args, "--xds-address="+f.CAAddr,
		"--listen-addr="+net.JoinHostPort(bind, fedproc.GatewayPort),
		"--health-addr="+net.JoinHostPort(bind, fedproc.GatewayHealthPort),
		"--metrics-addr="+net.JoinHostPort(bind, fedproc.GatewayMetricsPort))
	gw, err := a.StartProcess(ctx, localcluster.ProcessSpec{Name: "eastwest-gw", Env: environ,
		Command: append([]string{filepath.Join(binDir, "eastwest-gw")}, args...)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = gw.Stop(10 * time.Second) })

	// Its readiness probe, as the kubelet sends it.
	health := "http://" + net.JoinHostPort(f.Host, fedproc.GatewayHealthPort) + "/healthz/ready"
	probe := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}
	var last string
	require.Eventually(t, func() bool {
		if exited, _ := gw.Exited(); exited {
			return true
		}
		resp, err := probe.Get(health)
		if err != nil {
			last = err.Error()
			return false
		}
		_ = resp.Body.Close()
		last = resp.Status
		return resp.StatusCode == http.StatusOK
	}, time.Minute, 100*time.Millisecond, "the gateway never turned ready; last: %s", last)
	exited, _ := gw.Exited()
	require.False(t, exited, "eastwest-gw exited:\n%s", gw.Tail(30))
	// The Deployment sets no GODEBUG: the gateway ran itself again with
	// sysmon kept awake (internal/sysmon), and logs what it runs with.
	require.Regexp(t, `godebug"?[=:]"`+regexp.QuoteMeta(sysmon.Setting)+`"`, gw.Tail(200))

	// The federator served it over TLS, to the identity from its token.
	wantNode := "eastwest-gw~" + f.Host + "~" + podName + "." + systemNS + "~" + systemNS + ".svc.cluster.local"
	var st xds.Status
	require.Eventually(t, func() bool {
		st, err = f.XDS(ctx)
		return err == nil && len(st.Proxies) == 1 && st.Proxies[0].Acked[xdsresource.ListenerType] == st.Gateway.Versions[xdsresource.ListenerType]
	}, 10*time.Second, 50*time.Millisecond, "the gateway's stream and ACK in /debug/xds (last: %+v)", st)
	p := st.Proxies[0]
	require.Equal(t, wantNode, p.Node)
	require.Equal(t, "spiffe://a.mesh/ns/isthmus-system/sa/isthmus-eastwest-gw", p.Identity)
	require.Zero(t, p.NACKs, p.LastNACK)
}

// asKubelet prepares container name of spec as the kubelet would for a
// pod named podName with IP podIP in isthmus-system: the arguments with
// $(VAR) expanded, and the environment, resolved from the downward API,
// ConfigMaps and resources. The volumes it mounts are written under root
// (a projected ServiceAccount token asked for as the volume says, and
// ConfigMap items), and arguments naming a file under a mount are
// rewritten to point there.
func asKubelet(t *testing.T, kc kubernetes.Interface, spec corev1.PodSpec, name, podIP, podName, root string) (args, environ []string) {
	t.Helper()
	ctx := t.Context()
	c := containerNamed(t, spec.Containers, name)
	values := map[string]string{}
	for _, e := range c.Env {
		v := e.Value
		switch src := e.ValueFrom; {
		case src == nil:
		case src.FieldRef != nil:
			v = map[string]string{"status.podIP": podIP, "metadata.name": podName, "metadata.namespace": systemNS}[src.FieldRef.FieldPath]
			require.NotEmpty(t, v, "%s: field %s", e.Name, src.FieldRef.FieldPath)
		case src.ConfigMapKeyRef != nil:
			cm, err := kc.CoreV1().ConfigMaps(systemNS).Get(ctx, src.ConfigMapKeyRef.Name, metav1.GetOptions{})
			require.NoError(t, err, e.Name)
			var ok bool
			v, ok = cm.Data[src.ConfigMapKeyRef.Key]
			require.True(t, ok, "%s: ConfigMap %s has no key %s", e.Name, cm.Name, src.ConfigMapKeyRef.Key)
		case src.ResourceFieldRef != nil:
			q, ok := c.Resources.Limits[corev1.ResourceName(strings.TrimPrefix(src.ResourceFieldRef.Resource, "limits."))]
			require.True(t, ok, "%s: %s", e.Name, src.ResourceFieldRef.Resource)
			v = strconv.FormatInt(q.Value(), 10)
		default:
			require.FailNow(t, "environment variable "+e.Name+": a source the harness does not resolve")
		}
		values[e.Name] = v
		environ = append(environ, e.Name+"="+v)
	}

	mounts := map[string]string{} // mount path -> where it is written
	for _, m := range c.VolumeMounts {
		dir := filepath.Join(root, m.MountPath)
		require.NoError(t, os.MkdirAll(dir, 0o755))
		mounts[m.MountPath] = dir
		v := volumeNamed(t, spec, m.Name)
		switch {
		case v.Projected != nil:
			for _, s := range v.Projected.Sources {
				sat := s.ServiceAccountToken
				require.NotNil(t, sat, "volume %s: only ServiceAccount tokens are projected", v.Name)
				tr, err := kc.CoreV1().ServiceAccounts(systemNS).CreateToken(ctx, spec.ServiceAccountName, &authenticationv1.TokenRequest{
					Spec: authenticationv1.TokenRequestSpec{Audiences: []string{sat.Audience}, ExpirationSeconds: sat.ExpirationSeconds},
				}, metav1.CreateOptions{})
				require.NoError(t, err)
				require.NoError(t, os.WriteFile(filepath.Join(dir, sat.Path), []byte(tr.Status.Token), 0o600))
			}
		case v.ConfigMap != nil:
			cm, err := kc.CoreV1().ConfigMaps(systemNS).Get(ctx, v.ConfigMap.Name, metav1.GetOptions{})
			require.NoError(t, err, "volume %s", v.Name)
			for _, it := range v.ConfigMap.Items {
				data, ok := cm.Data[it.Key]
				require.True(t, ok, "volume %s: ConfigMap %s has no key %s", v.Name, cm.Name, it.Key)
				require.NoError(t, os.WriteFile(filepath.Join(dir, it.Path), []byte(data), 0o644))
			}
		default:
			require.FailNow(t, "volume "+v.Name+": a kind the harness does not write")
		}
	}
	for _, a := range expandArgs(c.Args, values) {
		if k, v, ok := strings.Cut(a, "="); ok {
			for mp, dir := range mounts {
				if rest, ok := strings.CutPrefix(v, mp+"/"); ok {
					a = k + "=" + filepath.Join(dir, rest)
				}
			}
		}
		args = append(args, a)
	}
	return args, environ
}

// checkLabels checks the labels every Isthmus object carries.
func checkLabels(t *testing.T, m metav1.ObjectMeta, name string) {
	t.Helper()
	require.Equal(t, systemNS, m.Namespace, m.Name)
	require.Equal(t, name, m.Labels["app.kubernetes.io/name"], m.Name)
	require.Equal(t, "isthmus", m.Labels["app.kubernetes.io/part-of"], m.Name)
}

// containerNamed is the container called name among cs (a pod's
// containers or init containers).
func containerNamed(t *testing.T, cs []corev1.Container, name string) corev1.Container {
	t.Helper()
	for _, c := range cs {
		if c.Name == name {
			return c
		}
	}
	require.FailNow(t, "no container "+name)
	return corev1.Container{}
}

func volumeNamed(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	require.FailNow(t, "no volume "+name)
	return corev1.Volume{}
}

// mountOf is where container c mounts volume name.
func mountOf(t *testing.T, c corev1.Container, name string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == name {
			return m.MountPath
		}
	}
	require.FailNow(t, "volume "+name+" is not mounted in "+c.Name)
	return ""
}

func envNamed(t *testing.T, c corev1.Container, name string) corev1.EnvVar {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == name {
			return e
		}
	}
	require.FailNow(t, "no environment variable "+name+" in "+c.Name)
	return corev1.EnvVar{}
}

func portNamed(t *testing.T, c corev1.Container, name string) int32 {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name {
			require.Equal(t, corev1.ProtocolTCP, p.Protocol, name)
			return p.ContainerPort
		}
	}
	require.FailNow(t, "no port "+name+" in "+c.Name)
	return 0
}

// resolvePort is the container port a probe or a Service's targetPort
// reaches: a number, or a named port of c.
func resolvePort(t *testing.T, c corev1.Container, p intstr.IntOrString) int32 {
	t.Helper()
	if p.Type == intstr.Int {
		return p.IntVal
	}
	return portNamed(t, c, p.StrVal)
}

// servicePort is the port named name of Service svc in isthmus-system.
func servicePort(t *testing.T, ctx context.Context, kc kubernetes.Interface, svc, name string) string {
	t.Helper()
	s, err := kc.CoreV1().Services(systemNS).Get(ctx, svc, metav1.GetOptions{})
	require.NoError(t, err)
	for _, p := range s.Spec.Ports {
		if p.Name == name {
			return strconv.Itoa(int(p.Port))
		}
	}
	require.FailNow(t, "Service "+svc+" has no port "+name)
	return ""
}

// expandArgs replaces $(NAME) in args with values, as the kubelet does
// with a container's environment.
func expandArgs(args []string, values map[string]string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		for k, v := range values {
			a = strings.ReplaceAll(a, "$("+k+")", v)
		}
		out[i] = a
	}
	return out
}

// flagValues reads "--name=value" arguments.
func flagValues(args []string) map[string]string {
	m := map[string]string{}
	for _, a := range args {
		if k, v, ok := strings.Cut(strings.TrimPrefix(a, "--"), "="); ok && strings.HasPrefix(a, "--") {
			m[k] = v
		}
	}
	return m
}
