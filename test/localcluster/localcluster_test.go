package localcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// sliceTimeout bounds waits for the EndpointSlice controller.
const sliceTimeout = 30 * time.Second

func TestTwoClusters(t *testing.T) {
	t.Parallel()
	env := StartT(t)
	t.Logf("two-cluster start-up took %s (isolated=%t)", env.StartupDuration().Round(time.Millisecond), env.Isolated())
	a, b := env.Cluster("a"), env.Cluster("b")
	require.NotNil(t, a)
	require.NotNil(t, b)

	t.Run("separate API servers", func(t *testing.T) {
		testSeparateAPIServers(t, a, b)
	})
	t.Run("RBAC is enforced for the federator", func(t *testing.T) {
		testFederatorRBAC(t, a)
	})
	t.Run("kubeconfigs", func(t *testing.T) {
		testKubeconfigs(t, a)
	})
	t.Run("workloads and EndpointSlices", func(t *testing.T) {
		testWorkloadEndpointSlices(t, a)
	})
	t.Run("reachability", func(t *testing.T) {
		testReachability(t, env, a, b)
	})
	t.Run("node processes", func(t *testing.T) {
		testNodeProcess(t, a)
	})
	t.Run("pod with init, sidecar, user and resolv.conf", func(t *testing.T) {
		testPodContainers(t, a)
	})
	t.Run("close leaves nothing behind", func(t *testing.T) {
		testCloseLeavesNothing(t, env)
	})
}

// TestLoopbackMode runs the loopback fallback (what a non-root user gets)
// even when the tests run as root.
func TestLoopbackMode(t *testing.T) {
	t.Parallel()
	env := StartTWith(t, Options{ForceLoopback: true})
	t.Logf("two-cluster start-up (loopback) took %s", env.StartupDuration().Round(time.Millisecond))
	require.False(t, env.Isolated())
	a, b := env.Cluster("a"), env.Cluster("b")
	assert.Equal(t, "https://127."+slotOctet(env)+".10.1:6443", a.APIServerURL())
	assert.Equal(t, a.APIServerURL(), a.InClusterAPIServerURL())
	assert.Empty(t, a.NetNS())

	testSeparateAPIServers(t, a, b)
	testFederatorRBAC(t, a)
	testKubeconfigs(t, a)

	ctx := t.Context()
	web := runServe(t, a, "web-1", map[string]string{"app": "web"})
	assert.True(t, web.IP.IsLoopback(), "pod IP %s", web.IP)
	idleB := runIdle(t, b, "client")
	t.Log("loopback mode: isolation is NOT enforced, a pod of cluster b reaches a pod of cluster a")
	body, err := fetch(ctx, idleB.Command, "http://"+net.JoinHostPort(web.IP.String(), "8080"))
	require.NoError(t, err)
	assert.Equal(t, "web-1", body)

	// Kubernetes refuses loopback addresses in EndpointSlices, so the
	// controller cannot publish this pod; show that rather than pretend.
	createService(t, a, "web", map[string]string{"app": "web"})
	require.EventuallyWithT(t, func(ct *assert.CollectT) {
		events, err := a.Client().CoreV1().Events("default").List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.kind=Service,involvedObject.name=web,reason=FailedToUpdateEndpointSlices",
		})
		require.NoError(ct, err)
		require.NotEmpty(ct, events.Items)
		assert.Contains(ct, events.Items[0].Message, "may not be in the loopback range")
	}, sliceTimeout, 200*time.Millisecond)
	_, found, err := findEndpoint(ctx, a, "web", web.IP)
	require.NoError(t, err)
	assert.False(t, found)
	t.Log("loopback mode: EndpointSlices cannot carry loopback pod addresses (the controller reports FailedToUpdateEndpointSlices)")

	testCloseLeavesNothing(t, env)
}

func slotOctet(env *Env) string {
	return strings.Split(env.Clusters()[0].NodeIP().String(), ".")[1]
}

func testSeparateAPIServers(t *testing.T, a, b *Cluster) {
	ctx := t.Context()
	for _, c := range []*Cluster{a, b} {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "only-in-" + c.Name()}}
		_, err := c.Client().CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
		require.NoError(t, err, "cluster %s", c.Name())
	}
	_, err := b.Client().CoreV1().Namespaces().Get(ctx, "only-in-a", metav1.GetOptions{})
	assert.True(t, apierrors.IsNotFound(err), "namespace of a visible in b: %v", err)
	_, err = a.Client().CoreV1().Namespaces().Get(ctx, "only-in-b", metav1.GetOptions{})
	assert.True(t, apierrors.IsNotFound(err), "namespace of b visible in a: %v", err)
	got, err := a.Client().CoreV1().Namespaces().Get(ctx, "only-in-a", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, "only-in-a", got.Name)

	// Each cluster has its own CA: a's CA does not vouch for b's server.
	cfg, err := a.RESTConfig(UserAdmin)
	require.NoError(t, err)
	cfg.Host = b.APIServerURL()
	cs, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	_, err = cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "certificate signed by unknown authority")

	// The default node exists with its topology labels.
	node, err := a.Client().CoreV1().Nodes().Get(ctx, a.DefaultNode(), metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, "r1", node.Labels[LabelRegion])
	assert.Equal(t, "a-z1", node.Labels[LabelZone])
	assert.Equal(t, a.DefaultNode(), node.Labels[LabelHostname])
}

func testFederatorRBAC(t *testing.T, c *Cluster) {
	ctx := t.Context()
	cfg, err := c.RESTConfig(UserFederator)
	require.NoError(t, err)
	user, err := whoAmI(ctx, cfg)
	require.NoError(t, err)
	assert.Equal(t, "system:isthmus:federator", user.Username)
	assert.Equal(t, []string{"system:authenticated"}, user.Groups)

	fed, err := c.ClientFor(UserFederator)
	require.NoError(t, err)
	_, err = fed.CoreV1().Secrets("default").List(ctx, metav1.ListOptions{})
	require.Error(t, err)
	var status apierrors.APIStatus
	require.True(t, errors.As(err, &status), "not an API error: %v", err)
	assert.EqualValues(t, 403, status.Status().Code, "listing secrets before any binding: %v", err)

	// Granting it through RBAC works: the authorizer is the real one.
	ns := "rbac-" + c.Name()
	_, err = c.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = c.Client().RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "read-secrets"},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"list"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = c.Client().RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "federator-reads-secrets"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "read-secrets"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "system:isthmus:federator"}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	require.EventuallyWithT(t, func(ct *assert.CollectT) {
		_, err := fed.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
		assert.NoError(ct, err)
	}, 10*time.Second, 100*time.Millisecond)
	_, err = fed.CoreV1().Secrets("default").List(ctx, metav1.ListOptions{})
	assert.True(t, apierrors.IsForbidden(err), "binding in %s leaked to default: %v", ns, err)
}

// testKubeconfigs uses the written kubeconfigs: the host one from the test
// process, the in-cluster one from the node namespace (a federator's view).
func testKubeconfigs(t *testing.T, c *Cluster) {
	ctx := t.Context()
	host, inCluster, err := c.KubeconfigFor(UserFederator)
	require.NoError(t, err)
	cfg, err := restConfigFromKubeconfig(host)
	require.NoError(t, err)
	assert.False(t, cfg.Insecure)
	assert.Equal(t, c.APIServerURL(), cfg.Host)
	user, err := whoAmI(ctx, cfg)
	require.NoError(t, err)
	assert.Equal(t, "system:isthmus:federator", user.Username)

	cmd := c.Command(ctx, os.Args[0])
	cmd.Env = append(os.Environ(), roleEnv+"="+roleWhoAmI, "KUBECONFIG="+inCluster)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "whoami in the node namespace: %s", out)
	assert.Equal(t, "system:isthmus:federator", string(out))

	_, _, err = c.KubeconfigFor("nobody")
	require.Error(t, err)
}

func testWorkloadEndpointSlices(t *testing.T, a *Cluster) {
	if !a.env.Isolated() {
		// Not a missing prerequisite but a property of loopback mode, which
		// TestLoopbackMode shows: the API server refuses the addresses.
		t.Skip("loopback mode: EndpointSlices cannot carry loopback pod addresses; run as root to test them")
	}
	ctx := t.Context()
	web := runServe(t, a, "web-1", map[string]string{"app": "web"})
	createService(t, a, "web", map[string]string{"app": "web"})

	pod, err := a.Client().CoreV1().Pods("default").Get(ctx, "web-1", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, corev1.PodRunning, pod.Status.Phase)
	assert.Equal(t, web.IP.String(), pod.Status.PodIP)
	assert.Equal(t, a.DefaultNode(), pod.Spec.NodeName)

	ep := waitEndpoint(t, a, "web", web.IP, func(ep discoveryv1.Endpoint) bool { return isReady(ep) })
	require.NotNil(t, ep.Zone)
	assert.Equal(t, "a-z1", *ep.Zone)
	require.NotNil(t, ep.NodeName)
	assert.Equal(t, a.DefaultNode(), *ep.NodeName)
	require.NotNil(t, ep.TargetRef)
	assert.Equal(t, "web-1", ep.TargetRef.Name)
	slices, err := a.Client().DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
	require.NoError(t, err)
	require.NotEmpty(t, slices.Items)
	assert.Equal(t, "endpointslice-controller.k8s.io", slices.Items[0].Labels[discoveryv1.LabelManagedBy], "written by kube-controller-manager")

	require.NoError(t, web.SetReady(ctx, false))
	waitEndpoint(t, a, "web", web.IP, func(ep discoveryv1.Endpoint) bool { return !isReady(ep) })
	require.NoError(t, web.SetReady(ctx, true))
	waitEndpoint(t, a, "web", web.IP, isReady)

	// A second pod on another node in another zone.
	_, err = a.AddNode(ctx, "a-node-2", "r1", "a-z2")
	require.NoError(t, err)
	web2, err := a.RunWorkload(ctx, WorkloadSpec{
		Name: "web-2", Labels: map[string]string{"app": "web"}, Node: "a-node-2",
		Command: []string{os.Args[0]}, Env: []string{roleEnv + "=" + roleServe}, ReadyPort: 8080,
	})
	require.NoError(t, err)
	ep2 := waitEndpoint(t, a, "web", web2.IP, isReady)
	require.NotNil(t, ep2.Zone)
	assert.Equal(t, "a-z2", *ep2.Zone)

	// Stopping removes process, Pod, endpoint and namespace.
	require.NoError(t, web2.Stop(ctx))
	require.NoError(t, web2.Stop(ctx), "Stop is idempotent")
	_, err = a.Client().CoreV1().Pods("default").Get(ctx, "web-2", metav1.GetOptions{})
	assert.True(t, apierrors.IsNotFound(err), "pod after Stop: %v", err)
	exited, _ := web2.Process().Exited()
	assert.True(t, exited)
	if web2.NetNS != "" {
		assert.NoFileExists(t, filepath.Join(netnsDir, web2.NetNS))
	}
	require.EventuallyWithT(t, func(ct *assert.CollectT) {
		_, found, err := findEndpoint(ctx, a, "web", web2.IP)
		assert.NoError(ct, err)
		assert.False(ct, found, "endpoint of a stopped pod")
	}, sliceTimeout, 200*time.Millisecond)

	// A workload that dies before it listens: a clear error, nothing left.
	_, err = a.RunWorkload(ctx, WorkloadSpec{
		Name: "broken", Command: []string{"/bin/sh", "-c", "echo boom >&2; exit 3"}, ReadyPort: 8080,
	})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "boom")
	assert.Contains(t, err.Error(), "exit status 3")
	_, err = a.Client().CoreV1().Pods("default").Get(ctx, "broken", metav1.GetOptions{})
	assert.True(t, apierrors.IsNotFound(err), "pod of a failed workload: %v", err)
	if a.NetNS() != "" {
		assert.NoFileExists(t, filepath.Join(netnsDir, a.env.runID+"-a-default-broken"))
	}

	// Same name again works (address is not reused at once).
	web2b, err := a.RunWorkload(ctx, WorkloadSpec{
		Name: "web-2", Labels: map[string]string{"app": "web"},
		Command: []string{os.Args[0]}, Env: []string{roleEnv + "=" + roleServe},
	})
	require.NoError(t, err)
	assert.NotEqual(t, web2.IP, web2b.IP)
	_, err = a.RunWorkload(ctx, WorkloadSpec{Name: "web-2", Command: []string{"true"}})
	require.Error(t, err, "duplicate workload")
}

func testReachability(t *testing.T, env *Env, a, b *Cluster) {
	ctx := t.Context()
	webA := runServe(t, a, "reach-web", nil)
	clientA := runIdle(t, a, "reach-client")
	webB := runServe(t, b, "reach-web", nil)
	clientB := runIdle(t, b, "reach-client")
	urlA := "http://" + net.JoinHostPort(webA.IP.String(), "8080")

	body, err := fetch(ctx, clientA.Command, urlA)
	require.NoError(t, err, "pod to pod in cluster a")
	assert.Equal(t, "reach-web", body)
	body, err = fetch(ctx, clientB.Command, "http://"+net.JoinHostPort(webB.IP.String(), "8080"))
	require.NoError(t, err, "pod to pod in cluster b")
	assert.Equal(t, "reach-web", body)

	if !env.Isolated() {
		t.Log("loopback mode: isolation is NOT enforced; skipping the cross-cluster checks")
		return
	}
	// The pods' addresses look alike but live in separate networks.
	assert.True(t, a.PodPrefix().Contains(webA.IP))
	assert.False(t, b.PodPrefix().Contains(webA.IP))

	_, err = fetch(ctx, clientB.Command, urlA)
	require.Error(t, err, "a pod of cluster b reached a pod of cluster a")
	t.Logf("b → a pod, as expected: %v", err)

	// From Go, through the namespaces: nodes reach their own pods and each
	// other over the WAN; pods reach neither the WAN nor other nodes.
	// A server in node b listening on its WAN address, as a gateway will.
	gw, err := b.StartProcess(ctx, ProcessSpec{Name: "wan-serve", Command: []string{os.Args[0]},
		Env: []string{roleEnv + "=" + roleServe, "POD_IP=" + b.WANIP().String(), "POD_NAME=wan-serve"}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = gw.Stop(5 * time.Second) })
	wanB := netip.AddrPortFrom(b.WANIP(), 8080).String()
	require.Eventually(t, func() bool { return dialGo(ctx, a.DialContext, wanB) == nil }, 10*time.Second, 50*time.Millisecond,
		"node a → node b over the WAN")
	require.NoError(t, dial(ctx, a.Command, wanB), "a process in node a → node b over the WAN")
	// The API server listens on every address of its node, but the WAN
	// never reaches it: no cluster can talk to another's API server.
	err = dialGo(ctx, a.DialContext, netip.AddrPortFrom(b.WANIP(), apiServerPort).String())
	require.Error(t, err, "node a reached node b's API server over the WAN")
	t.Logf("node a → b's API server over the WAN, as expected: %v", err)
	podA := netip.AddrPortFrom(webA.IP, 8080).String()
	require.NoError(t, dialGo(ctx, a.DialContext, podA), "node a → its pod")
	err = dialGo(ctx, b.DialContext, podA)
	require.Error(t, err, "node b reached a pod of cluster a")
	t.Logf("node b → pod a, as expected: %v", err)
	err = dialGo(ctx, clientA.DialContext, wanB)
	require.Error(t, err, "a pod reached the WAN")
	t.Logf("pod a → WAN, as expected: %v", err)
	err = dialGo(ctx, clientA.DialContext, netip.AddrPortFrom(b.NodeIP(), apiServerPort).String())
	require.Error(t, err, "a pod of cluster a reached node b")
	// The pod does reach its own API server, as in a real cluster.
	require.NoError(t, dialGo(ctx, clientA.DialContext, netip.AddrPortFrom(a.NodeIP(), apiServerPort).String()))

	// Egress: a's pods may now reach port 8080 on the WAN, as sidecars
	// reach other clusters' gateways, and nothing else beyond their node.
	require.NoError(t, a.AllowPodEgress(ctx, 8080))
	require.Error(t, a.AllowPodEgress(ctx, 8080), "a second call")
	body, err = fetch(ctx, clientA.Command, "http://"+wanB)
	require.NoError(t, err, "pod a → WAN port 8080 after AllowPodEgress")
	assert.Equal(t, "wan-serve", body)
	err = dialGo(ctx, clientA.DialContext, netip.AddrPortFrom(b.WANIP(), apiServerPort).String())
	require.Error(t, err, "pod a reached node b's API server over the WAN")
	_, err = fetch(ctx, clientA.Command, "http://"+net.JoinHostPort(webB.IP.String(), "8080"))
	require.Error(t, err, "pod a reached a pod of cluster b")
	err = dialGo(ctx, clientA.DialContext, netip.AddrPortFrom(b.NodeIP(), apiServerPort).String())
	require.Error(t, err, "pod a reached node b")
	body, err = fetch(ctx, clientA.Command, urlA)
	require.NoError(t, err, "pod to pod in cluster a, with the node forwarding")
	assert.Equal(t, "reach-web", body)
}

// testPodContainers runs a pod the way a mesh does: an init step (as
// root, in the pod's namespace), a sidecar whose readiness gates the
// Pod's, the app as another user, and the pod's own resolv.conf.
func testPodContainers(t *testing.T, c *Cluster) {
	ctx := t.Context()
	if !c.env.Isolated() {
		_, err := c.RunWorkload(ctx, WorkloadSpec{Name: "init-loopback", Command: []string{"true"}, Init: [][]string{{"true"}}})
		require.ErrorContains(t, err, "root mode")
		t.Skip("loopback mode: init steps, users and resolv.conf need a pod network namespace; run as root to test them")
	}
	nobody := Credential{UID: 65534, GID: 65534}
	resolv := "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"
	w, err := c.RunWorkload(ctx, WorkloadSpec{
		Name:    "meshed",
		Command: []string{"sleep", "600"}, RunAs: &nobody,
		Init:       [][]string{{"ip", "link", "add", "init0", "type", "veth", "peer", "name", "init1"}},
		Sidecars:   []ProcessSpec{{Name: "proxy", Command: []string{os.Args[0]}, Env: []string{roleEnv + "=" + roleServe}}},
		ResolvConf: resolv,
		ReadyHTTP:  &HTTPProbe{Port: 8080, Path: "/healthz/ready"},
	})
	require.NoError(t, err)

	out, err := w.Command(ctx, "ip", "-o", "link", "show", "init0").CombinedOutput()
	require.NoError(t, err, "the init step ran in the pod's namespace: %s", out)
	_, err = net.InterfaceByName("init0")
	require.Error(t, err, "the init step changed the host's network")
	out, err = w.Command(ctx, "cat", "/etc/resolv.conf").Output()
	require.NoError(t, err)
	assert.Equal(t, resolv, string(out), "the pod's processes see its resolv.conf")
	host, err := os.ReadFile("/etc/resolv.conf")
	require.NoError(t, err)
	assert.NotEqual(t, resolv, string(host), "the host's resolv.conf is its own")

	// ip netns exec and setpriv exec in place: the pid is the app's.
	require.EventuallyWithT(t, func(ct *assert.CollectT) {
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.Process().Pid()))
		require.NoError(ct, err)
		assert.Regexp(ct, `(?m)^Uid:\s+65534\s+65534`, string(status))
		assert.Regexp(ct, `(?m)^Groups:\s*$`, string(status))
	}, 5*time.Second, 50*time.Millisecond)
	cmd, err := w.CommandAs(ctx, nobody, "id", "-u")
	require.NoError(t, err)
	out, err = cmd.Output()
	require.NoError(t, err)
	assert.Equal(t, "65534", strings.TrimSpace(string(out)))

	pod, err := c.Client().CoreV1().Pods("default").Get(ctx, "meshed", metav1.GetOptions{})
	require.NoError(t, err)
	require.Len(t, pod.Spec.InitContainers, 1)
	require.Len(t, pod.Spec.Containers, 2)
	assert.Equal(t, "proxy", pod.Spec.Containers[1].Name)
	require.Len(t, pod.Status.ContainerStatuses, 2)
	for _, cs := range pod.Status.ContainerStatuses {
		assert.True(t, cs.Ready, "container %s", cs.Name)
	}
	sidecar := w.Sidecars()[0]
	assert.Equal(t, filepath.Join(c.LogDir(), "workload-default-meshed-proxy.log"), sidecar.LogPath())

	require.NoError(t, w.Stop(ctx))
	for _, p := range []*Process{w.Process(), sidecar} {
		exited, _ := p.Exited()
		assert.True(t, exited, "%s after Stop", p.Name())
	}
	assert.NoDirExists(t, filepath.Join(etcNetNSDir, w.NetNS))

	_, err = c.RunWorkload(ctx, WorkloadSpec{Name: "bad-sidecar", Command: []string{"true"},
		Sidecars: []ProcessSpec{{Name: "Not_A_Label", Command: []string{"true"}}}})
	require.ErrorContains(t, err, "DNS label")
	_, err = c.RunWorkload(ctx, WorkloadSpec{Name: "bad-init", Command: []string{"sleep", "600"},
		ResolvConf: resolv, Init: [][]string{{"sh", "-c", "echo no capture for you >&2; exit 4"}}})
	require.ErrorContains(t, err, "no capture for you")
	_, err = c.Client().CoreV1().Pods("default").Get(ctx, "bad-init", metav1.GetOptions{})
	assert.True(t, apierrors.IsNotFound(err), "pod of a failed init: %v", err)
	assert.NoDirExists(t, filepath.Join(etcNetNSDir, c.env.runID+"-"+c.name+"-default-bad-init"))
}

func dialGo(ctx context.Context, dialer func(context.Context, string, string) (net.Conn, error), addr string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	conn, err := dialer(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return conn.Close()
}

func testNodeProcess(t *testing.T, a *Cluster) {
	ctx := t.Context()
	p, err := a.StartProcess(ctx, ProcessSpec{
		Name:    "fake-federator",
		Command: []string{os.Args[0]},
		Env:     []string{roleEnv + "=" + roleIdle},
	})
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(a.LogDir(), "fake-federator.log"), p.LogPath())
	if a.NetNS() != "" {
		// ip netns exec switches namespace just after the fork.
		require.EventuallyWithT(t, func(ct *assert.CollectT) {
			pids, err := netnsPids(ctx, a.NetNS())
			require.NoError(ct, err)
			assert.Contains(ct, pids, p.Pid(), "process runs in the node namespace")
		}, 5*time.Second, 50*time.Millisecond)
	}
	require.NoError(t, p.Stop(time.Second))
	exited, _ := p.Exited()
	assert.True(t, exited)

	_, err = a.StartProcess(ctx, ProcessSpec{Name: "bad/name", Command: []string{"true"}})
	require.Error(t, err)
}

func testCloseLeavesNothing(t *testing.T, env *Env) {
	pids := env.pids()
	require.NotEmpty(t, pids)
	var uplinks []string
	for _, c := range env.clusters {
		if c.uplink != "" {
			uplinks = append(uplinks, c.uplink)
		}
	}
	t0 := time.Now()
	require.NoError(t, env.Close())
	t.Logf("Close took %s", time.Since(t0).Round(time.Millisecond))
	require.NoError(t, env.Close(), "Close is idempotent")

	for _, pid := range pids {
		assert.False(t, pidAlive(pid), "pid %d alive after Close", pid)
	}
	entries, err := os.ReadDir(netnsDir)
	if err == nil {
		for _, e := range entries {
			assert.False(t, strings.HasPrefix(e.Name(), env.RunID()+"-"), "netns %s left after Close", e.Name())
		}
	}
	for _, l := range uplinks {
		_, err := net.InterfaceByName(l)
		assert.Error(t, err, "veth %s left after Close", l)
	}
	entries, err = os.ReadDir(etcNetNSDir)
	if err == nil {
		for _, e := range entries {
			assert.False(t, strings.HasPrefix(e.Name(), env.RunID()+"-"), "%s/%s left after Close", etcNetNSDir, e.Name())
		}
	}
	if !env.keepDir {
		assert.NoDirExists(t, env.WorkDir())
	}
	_, err = env.Clusters()[0].RunWorkload(t.Context(), WorkloadSpec{Name: "late", Command: []string{"true"}})
	assert.Error(t, err, "RunWorkload after Close")
}

// TestDeadRunIsSwept kills a process that runs an environment: the kernel
// kills its children (Pdeathsig), and the next Start sweeps the namespaces,
// veths and work directory the dead run left behind.
func TestDeadRunIsSwept(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	cmd := exec.CommandContext(ctx, os.Args[0])
	cmd.Env = append(os.Environ(), roleEnv+"="+roleHarness)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	var rep harnessReport
	decodeErr := json.NewDecoder(stdout).Decode(&rep)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	require.NoError(t, decodeErr, "harness output; stderr:\n%s", stderr.String())
	require.NotEmpty(t, rep.Pids)
	t.Logf("killed run %s with children %v", rep.RunID, rep.Pids)

	require.EventuallyWithT(t, func(ct *assert.CollectT) {
		for _, pid := range rep.Pids {
			assert.False(ct, pidAlive(pid), "pid %d of the dead run", pid)
		}
	}, 10*time.Second, 100*time.Millisecond)

	root := os.Geteuid() == 0
	if _, err := os.Stat(rep.WorkDir); err != nil {
		// Any Start sweeps, including one in a concurrently running test.
		t.Logf("the dead run's leftovers were already swept: %v", err)
	}
	sweepLeftovers(ctx, slog.New(slog.NewTextHandler(&testLogWriter{t: t}, nil)), root)
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		assert.False(t, strings.HasPrefix(e.Name(), rep.RunID+"-"), "netns %s survived the sweep", e.Name())
	}
	ifaces, err := net.Interfaces()
	require.NoError(t, err)
	pid, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(rep.RunID, "isth"), "r1"))
	for _, ifc := range ifaces {
		assert.False(t, strings.HasPrefix(ifc.Name, fmt.Sprintf("ib%xr", pid)), "veth %s survived the sweep", ifc.Name)
	}
	assert.NoDirExists(t, rep.WorkDir)
}

func TestOptionsValidation(t *testing.T) {
	tests := []struct {
		name     string
		clusters []ClusterOptions
		want     string
	}{
		{"duplicate", []ClusterOptions{{Name: "a"}, {Name: "a"}}, "used twice"},
		{"uppercase", []ClusterOptions{{Name: "A"}}, "lowercase"},
		{"reserved", []ClusterOptions{{Name: "wan"}}, "reserved"},
		{"too long", []ClusterOptions{{Name: strings.Repeat("x", 21)}}, "1-20"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Start(t.Context(), Options{Clusters: tc.clusters})
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestMissingBinaries(t *testing.T) {
	dir := t.TempDir()
	_, err := Start(t.Context(), Options{KubeBinDir: dir})
	require.ErrorIs(t, err, ErrMissingBinary)
	assert.Contains(t, err.Error(), "kube-apiserver not found in "+dir+": run `make kube-binaries`")
}

func TestAddressPlan(t *testing.T) {
	root := addressPlan{root: true, slot: 0, idx: 1}
	assert.Equal(t, "10.11.0.1", root.nodeIP().String())
	assert.Equal(t, "169.254.101.1", root.uplinkRoot().String())
	assert.Equal(t, "169.254.101.2", root.uplinkNode().String())
	assert.Equal(t, "169.254.101.2", root.hostAPIAddr().String())
	assert.Equal(t, "10.254.0.2", root.wanIP().String())
	assert.Equal(t, "10.11.1.7", root.podIP(7).String())
	root3 := addressPlan{root: true, slot: 3, idx: 0}
	assert.Equal(t, "169.254.100.13", root3.uplinkRoot().String())
	assert.Equal(t, "169.254.100.14", root3.uplinkNode().String())
	lo := addressPlan{slot: 0, idx: 1}
	assert.Equal(t, "127.0.11.1", lo.nodeIP().String())
	assert.Equal(t, "127.0.11.1", lo.wanIP().String())
	assert.Equal(t, "127.0.11.17", lo.podIP(7).String())

	name, err := uplinkName(4194304, 255, 31)
	require.NoError(t, err)
	assert.LessOrEqual(t, len(name), 15)
	assert.Regexp(t, uplinkRe, name)
}

// helpers

func runServe(t *testing.T, c *Cluster, name string, labels map[string]string) *Workload {
	t.Helper()
	w, err := c.RunWorkload(t.Context(), WorkloadSpec{
		Name: name, Labels: labels,
		Command: []string{os.Args[0]}, Env: []string{roleEnv + "=" + roleServe},
		Ports:     []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
		ReadyPort: 8080,
	})
	require.NoError(t, err)
	return w
}

func runIdle(t *testing.T, c *Cluster, name string) *Workload {
	t.Helper()
	w, err := c.RunWorkload(t.Context(), WorkloadSpec{
		Name: name, Command: []string{os.Args[0]}, Env: []string{roleEnv + "=" + roleIdle},
	})
	require.NoError(t, err)
	return w
}

func createService(t *testing.T, c *Cluster, name string, selector map[string]string) {
	t.Helper()
	_, err := c.Client().CoreV1().Services("default").Create(t.Context(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{
			Selector: selector,
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
}

type commander func(ctx context.Context, name string, args ...string) *exec.Cmd

// fetch GETs url once from inside a namespace (a pod's or a node's) and
// returns the body.
func fetch(ctx context.Context, in commander, url string) (string, error) {
	return runRoleIn(ctx, in, roleFetch, "FETCH_URL="+url)
}

func dial(ctx context.Context, in commander, addr string) error {
	_, err := runRoleIn(ctx, in, roleDial, "DIAL_ADDR="+addr)
	return err
}

func runRoleIn(ctx context.Context, in commander, role string, env ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 4*probeDeadline)
	defer cancel()
	cmd := in(ctx, os.Args[0])
	cmd.Env = append(append(os.Environ(), roleEnv+"="+role), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), errors.New(strings.TrimSpace(stderr.String()) + " (" + err.Error() + ")")
	}
	return string(out), nil
}

func isReady(ep discoveryv1.Endpoint) bool {
	return ep.Conditions.Ready != nil && *ep.Conditions.Ready
}

// findEndpoint looks for ip in service's EndpointSlices.
func findEndpoint(ctx context.Context, c *Cluster, service string, ip netip.Addr) (discoveryv1.Endpoint, bool, error) {
	list, err := c.Client().DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=" + service,
	})
	if err != nil {
		return discoveryv1.Endpoint{}, false, err
	}
	for _, s := range list.Items {
		for _, ep := range s.Endpoints {
			for _, addr := range ep.Addresses {
				if addr == ip.String() {
					return ep, true, nil
				}
			}
		}
	}
	return discoveryv1.Endpoint{}, false, nil
}

// waitEndpoint waits until service's slices hold ip in a state ok accepts.
func waitEndpoint(t *testing.T, c *Cluster, service string, ip netip.Addr, ok func(discoveryv1.Endpoint) bool) discoveryv1.Endpoint {
	t.Helper()
	var got discoveryv1.Endpoint
	require.EventuallyWithT(t, func(ct *assert.CollectT) {
		ep, found, err := findEndpoint(t.Context(), c, service, ip)
		require.NoError(ct, err)
		require.True(ct, found, "no endpoint %s in the slices of %s", ip, service)
		require.True(ct, ok(ep), "endpoint %s: ready=%v", ip, ep.Conditions.Ready)
		got = ep
	}, sliceTimeout, 200*time.Millisecond)
	return got
}
