package main

// The traffic half of the demo (root only): a client pod in b calls
// echo.demo.svc.clusterset.local by name over HTTP/1.1, h2c (to a port
// declared http and one declared http2), gRPC and raw TCP, and prints
// who answered and the caller identity the answering sidecar verified; then a's echo pod goes unready and c answers, until
// a's pod is ready again; then an AuthorizationPolicy in a lets b's
// client in only with a header; a pod of a outside the mesh calls echo's
// pod in plaintext, refused until a PeerAuthentication makes it
// PERMISSIVE; last, it calls a Service of its own
// cluster that nobody exported, over mTLS too.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
	"github.com/isthmus-mesh/isthmus/test/mesh"
)

const (
	// echoHost is the clusterset name the client calls.
	echoHost = "echo.demo.svc.clusterset.local"
	// trafficTimeout bounds each wait for a call to be answered as
	// expected: the mesh converging after a change.
	trafficTimeout = 60 * time.Second
)

func showTraffic(ctx context.Context, a, b, c *mesh.Cluster, echoPods []*mesh.Pod) error {
	step("cluster b: pod demo/client, with its sidecar, calls %s", echoHost)
	client, err := b.RunPod(ctx, mesh.PodSpec{Name: "client"})
	if err != nil {
		return err
	}
	fmt.Printf("  pod demo/client at %s: its app runs as uid %d; `sidecar iptables` sends the app's TCP to the\n", client.W.IP, mesh.AppUser.UID)
	fmt.Printf("  sidecar (15001) and its DNS queries to the sidecar's DNS proxy (15053); the sidecar is\n")
	fmt.Printf("  %s. The commands below run in the pod as the app's user.\n", client.SPIFFEID())

	var addrs []netip.Addr
	err = mesh.Poll(ctx, trafficTimeout, "b's client to resolve "+echoHost, func(ctx context.Context) (bool, string) {
		var err error
		if addrs, err = client.Resolve(ctx, echoHost); err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	if err != nil {
		return err
	}
	fmt.Printf("\n  [b/demo/client]$ getent ahostsv4 %s\n", echoHost)
	fmt.Printf("    %s: a virtual IP from the federator's name table, answered by the sidecar's DNS proxy\n", addrs)

	before := gatewayRouted(ctx, a, c)
	for _, call := range []mesh.Call{
		{Proto: "http1", Target: echoHost + ":80"},
		{Proto: "h2c", Target: echoHost + ":80"},
		{Proto: "h2c", Target: echoHost + ":81"},
		{Proto: "grpc", Target: echoHost + ":9090"},
		{Proto: "tcp", Target: echoHost + ":9000"},
	} {
		if _, err := callUntil(ctx, client, call, "a"); err != nil {
			return err
		}
		if call.Proto == "h2c" {
			if strings.HasSuffix(call.Target, ":80") {
				fmt.Printf("    (port 80 is declared http: the sidecars carry the call as HTTP/1.1, as Istio's do)\n")
			} else {
				fmt.Printf("    (port 81 is declared http2: HTTP/2 end to end)\n")
			}
		}
	}
	after := gatewayRouted(ctx, a, c)
	fmt.Printf("\n  a's east-west gateway routed %d connections to echo's pods meanwhile (c's: %d): b's sidecar\n", after["a"]-before["a"], after["c"]-before["c"])
	fmt.Printf("  reached a's pod through it, end-to-end mTLS that the gateway routed by SNI without decrypting.\n")
	fmt.Printf("  a is in b's region; c, in r2, is the fallback.\n")

	var podsOfA []*mesh.Pod
	for _, p := range echoPods {
		if p.Cluster == a {
			podsOfA = append(podsOfA, p)
		}
	}
	step("failover: a's echo pod becomes unready, as a failing readiness probe would make it")
	t0 := time.Now()
	for _, p := range podsOfA {
		if err := p.SetReady(ctx, false); err != nil {
			return err
		}
	}
	fmt.Println("  a's federator then exports demo/echo with 0 ready endpoints; b's federator hears it over the")
	fmt.Println("  federation stream, and b's sidecars now see a's gateway unhealthy and go to the next priority: c")
	if _, err := callUntil(ctx, client, mesh.Call{Proto: "http1", Target: echoHost + ":80"}, "c"); err != nil {
		return err
	}
	fmt.Printf("  c answers %s after a's pod went unready\n", time.Since(t0).Round(10*time.Millisecond))
	if _, err := callUntil(ctx, client, mesh.Call{Proto: "tcp", Target: echoHost + ":9000"}, "c"); err != nil {
		return err
	}

	step("a's echo pod is ready again")
	t0 = time.Now()
	for _, p := range podsOfA {
		if err := p.SetReady(ctx, true); err != nil {
			return err
		}
	}
	if _, err := callUntil(ctx, client, mesh.Call{Proto: "http1", Target: echoHost + ":80"}, "a"); err != nil {
		return err
	}
	fmt.Printf("  a answers again %s after its pod became ready\n", time.Since(t0).Round(10*time.Millisecond))

	if err := showPolicy(ctx, a, client); err != nil {
		return err
	}
	if err := showPeerAuthentication(ctx, a, podsOfA[0]); err != nil {
		return err
	}

	step("cluster b: Service demo/local, which nobody exported, with a meshed pod of b behind it")
	if _, err := b.ServeEcho(ctx, "demo", "local", 1); err != nil {
		return err
	}
	fmt.Println("  Its pods carry security.istio.io/tlsMode=istio, as every meshed pod does, so b's federator gives")
	fmt.Println("  b's sidecars mTLS to it by its ClusterIP and its cluster.local name; it never leaves b")
	if _, err := callUntil(ctx, client, mesh.Call{Proto: "http1", Target: "local.demo.svc.cluster.local:80"}, "b"); err != nil {
		return err
	}
	return nil
}

// callUntil prints the call's command line, repeats the call until
// cluster answers it (bounded), and prints the reply.
func callUntil(ctx context.Context, client *mesh.Pod, call mesh.Call, cluster string) (mesh.Reply, error) {
	fmt.Printf("\n  [%s/%s/%s]$ echo %s\n", client.Cluster.Name(), client.Spec.Namespace, client.Name(), strings.Join(call.Args(), " "))
	var r mesh.Reply
	err := mesh.Poll(ctx, trafficTimeout, fmt.Sprintf("cluster %s to answer echo %s", cluster, strings.Join(call.Args(), " ")),
		func(ctx context.Context) (bool, string) {
			replies, err := client.Call(ctx, call)
			if err != nil {
				return false, err.Error()
			}
			r = replies[0]
			return r.Cluster == cluster, "answered by cluster " + r.Cluster
		})
	if err != nil {
		return r, err
	}
	printReply(r)
	return r, nil
}

func printReply(r mesh.Reply) {
	if r.Proto == "tcp" {
		fmt.Printf("    answered by cluster %s, pod %s/%s, over raw TCP: the bytes came back whole. Raw TCP has no\n", r.Cluster, r.Namespace, r.Pod)
		fmt.Printf("    headers to carry the caller's identity; the answering sidecar checked it in the mTLS handshake\n")
		return
	}
	fmt.Printf("    answered by cluster %s, pod %s/%s, whose app saw %s %s %s from %s (its own sidecar)\n",
		r.Cluster, r.Namespace, r.Pod, r.Proto, r.Method, r.Path, r.Remote)
	fmt.Printf("    caller identity, as the answering sidecar verified it: \033[1m%s\033[0m\n", r.CallerIdentity)
	fmt.Printf("    X-Forwarded-Client-Cert: %s\n", r.XFCC)
}

// gatewayRouted counts, per cluster, the connections its gateway routed
// to echo's pods; a cluster whose metrics cannot be read is left out.
func gatewayRouted(ctx context.Context, clusters ...*mesh.Cluster) map[string]int {
	counts := map[string]int{}
	for _, c := range clusters {
		metrics, err := c.GatewayMetrics(ctx)
		if err != nil {
			continue
		}
		for _, port := range []int{mesh.ServiceHTTPPort, mesh.ServiceGRPCPort, mesh.ServiceTCPPort} {
			counts[c.Name()] += int(mesh.MetricSum(metrics, "isthmus_gateway_routed_connections_total",
				fmt.Sprintf(`cluster="outbound|%d||echo.demo.svc.cluster.local"`, port)))
		}
	}
	return counts
}

// showPolicy applies, in a, an AuthorizationPolicy on demo/echo that
// lets b's client in only when it sends x-team: blue, shows a call
// without the header refused and one with it answered, and deletes it.
func showPolicy(ctx context.Context, a *mesh.Cluster, client *mesh.Pod) error {
	step("cluster a: an AuthorizationPolicy on demo/echo lets b's client in, with header x-team: blue only")
	const policy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-callers, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["b.mesh/ns/demo/sa/client"]}}]
    when: [{key: "request.headers[x-team]", values: ["blue"]}]
`
	indent(policy, "    ")
	cfg, err := a.K.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return err
	}
	if err := install.Apply(ctx, cfg, []byte(policy)); err != nil {
		return fmt.Errorf("apply the AuthorizationPolicy: %w", err)
	}
	fmt.Println("  a's federator gives echo's sidecar the policy, which names b's client by b's trust domain")
	call := mesh.Call{Proto: "http1", Target: echoHost + ":80"}
	fmt.Printf("\n  [%s/%s/%s]$ echo %s\n", client.Cluster.Name(), client.Spec.Namespace, client.Name(), strings.Join(call.Args(), " "))
	var refusal string
	err = mesh.Poll(ctx, trafficTimeout, "a's echo to refuse b's call without the header", func(ctx context.Context) (bool, string) {
		_, err := client.Call(ctx, call)
		if err == nil {
			return false, "still answered"
		}
		refusal = err.Error()
		return strings.Contains(refusal, "403"), refusal
	})
	if err != nil {
		return err
	}
	fmt.Printf("    refused by a's echo sidecar: %s\n", refusal[strings.Index(refusal, "HTTP/1.1 403"):])
	call.Headers = []string{"x-team: blue"}
	if _, err := callUntil(ctx, client, call, "a"); err != nil {
		return err
	}
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if err := ic.SecurityV1().AuthorizationPolicies("demo").Delete(ctx, "echo-callers", metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete the AuthorizationPolicy: %w", err)
	}
	fmt.Println("\n  policy deleted: echo takes every caller with a certificate again")
	return nil
}

// showPeerAuthentication runs, in a, a pod outside the mesh (no sidecar,
// no certificate) that calls echo's pod in plaintext: refused, STRICT
// being the default; then a PeerAuthentication makes echo PERMISSIVE and
// the call is answered, with no caller identity; then it is deleted.
func showPeerAuthentication(ctx context.Context, a *mesh.Cluster, echo *mesh.Pod) error {
	step("cluster a: a pod outside the mesh calls echo's pod in plaintext; a PeerAuthentication lets it in")
	outsider, err := a.RunPod(ctx, mesh.PodSpec{Name: "outsider", NoSidecar: true})
	if err != nil {
		return err
	}
	addr := netip.AddrPortFrom(echo.W.IP, mesh.EchoHTTPPort).String()
	fmt.Printf("  pod demo/outsider at %s has no sidecar and no certificate\n", outsider.W.IP)
	fmt.Printf("\n  [a/demo/outsider]$ curl http://%s/\n", addr)
	status, _, err := plainGet(ctx, outsider, addr)
	switch {
	case err != nil:
		return fmt.Errorf("plaintext call to echo's pod: %w", err)
	case status != "":
		return fmt.Errorf("echo's STRICT sidecar answered plaintext: %s", status)
	}
	fmt.Println("    refused: echo's sidecar closed the connection; it takes only mutual TLS (STRICT, Isthmus's default)")

	const policy = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-permissive, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: PERMISSIVE}
`
	fmt.Println()
	indent(policy, "    ")
	cfg, err := a.K.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return err
	}
	if err := install.Apply(ctx, cfg, []byte(policy)); err != nil {
		return fmt.Errorf("apply the PeerAuthentication: %w", err)
	}
	var reply mesh.Reply
	err = mesh.Poll(ctx, trafficTimeout, "a's echo to answer plaintext", func(ctx context.Context) (bool, string) {
		status, body, err := plainGet(ctx, outsider, addr)
		if err != nil || !strings.HasPrefix(status, "HTTP/1.1 200") {
			return false, fmt.Sprint(status, err)
		}
		return json.Unmarshal([]byte(body), &reply) == nil, body
	})
	if err != nil {
		return err
	}
	fmt.Printf("\n  [a/demo/outsider]$ curl http://%s/\n", addr)
	fmt.Printf("    answered by pod %s, caller identity %q: a plaintext caller has none, so an\n", reply.Pod, reply.CallerIdentity)
	fmt.Println("    AuthorizationPolicy that names its callers still keeps it out; the mesh keeps using mutual TLS")
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if err := ic.SecurityV1().PeerAuthentications("demo").Delete(ctx, "echo-permissive", metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete the PeerAuthentication: %w", err)
	}
	err = mesh.Poll(ctx, trafficTimeout, "a's echo to refuse plaintext again", func(ctx context.Context) (bool, string) {
		status, _, err := plainGet(ctx, outsider, addr)
		return err == nil && status == "", fmt.Sprint(status, err)
	})
	if err != nil {
		return err
	}
	fmt.Println("\n  PeerAuthentication deleted: echo is STRICT again, and refuses the outsider's plaintext call")
	return nil
}

// plainGet sends GET / in plaintext from p to addr and returns the
// answer's status line and body. A connection the sidecar closed with
// nothing answered is an empty status and no error; one that could not
// be opened or written to is an error.
func plainGet(ctx context.Context, p *mesh.Pod, addr string) (status, body string, err error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := p.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(3 * time.Second)); err != nil {
		return "", "", err
	}
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"); err != nil {
		return "", "", fmt.Errorf("write: %w", err)
	}
	got, err := io.ReadAll(io.LimitReader(conn, 64<<10))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		// Neither answered nor closed: not a refusal.
		return "", "", fmt.Errorf("nothing within the deadline: %w", err)
	}
	head, body, _ := strings.Cut(string(got), "\r\n\r\n")
	status, _, _ = strings.Cut(head, "\r\n")
	return status, body, nil
}
