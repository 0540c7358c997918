// Command demo is what `make demo` runs. It starts three local clusters
// on real kube-apiservers, each in its own network namespaces
// (test/mesh: a and b in region r1, c in r2), installs Isthmus from
// deploy/, runs a federator and an east-west gateway in each, serves
// demo/echo from a and c with a sidecar beside every pod, and exports it.
// b joins a and c with the real `federator token create` and `federator
// join` and imports the service (its ServiceEntry, ServiceImport and
// `federator status` are shown). A client pod in b then calls
// echo.demo.svc.clusterset.local over HTTP/1.1, HTTP/2, gRPC and raw TCP
// — captured by iptables, carried by b's sidecar over mTLS through a's
// gateway — and prints who answered and the caller identity a's sidecar
// verified. a's echo pod goes unready and c answers, until it recovers and
// a answers again. Then everything is torn down (--keep-running waits for
// Ctrl-C first; Ctrl-C at any time tears down too).
//
// Without root there are no network namespaces: the clusters share the
// host network on loopback addresses, pods have no sidecars, and the demo
// stops after the import.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
	"github.com/isthmus-mesh/isthmus/test/mesh"
)

func main() {
	binDir := flag.String("bin-dir", "bin", "directory holding federator, eastwest-gw and sidecar (make build); echo is built into it")
	keepRunning := flag.Bool("keep-running", false, "after the demo, keep the clusters running until Ctrl-C")
	exitAfter := flag.Duration("exit-after", 0, "after the demo, keep the clusters running this long, then tear down")
	verbose := flag.Bool("v", false, "log the harness's debug messages")
	loopback := flag.Bool("loopback", false, "share the host network even as root (what a non-root user gets): no isolation, no sidecars, no traffic")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, log, *binDir, *keepRunning, *exitAfter, *loopback); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...)
}

func run(ctx context.Context, log *slog.Logger, binDir string, keepRunning bool, exitAfter time.Duration, loopback bool) (err error) {
	t0 := time.Now()
	binDir, err = filepath.Abs(binDir)
	if err != nil {
		return err
	}
	if err := buildEcho(ctx, filepath.Join(binDir, "echo")); err != nil {
		return err
	}

	step("starting clusters a, b and c: a real etcd, kube-apiserver and kube-controller-manager each")
	fmt.Println("  then Isthmus from deploy/ (CRDs, namespace, least-privilege RBAC) and Istio's ServiceEntry,")
	fmt.Println("  AuthorizationPolicy and PeerAuthentication CRDs, which Istio's own installation provides in a real")
	fmt.Println("  cluster, in each; then a federator and an east-west gateway per cluster. a and b are in region r1, c in r2.")
	m, err := mesh.Start(ctx, mesh.Options{
		BinDir:        binDir,
		Clusters:      []mesh.ClusterSpec{{Name: "a", Region: "r1"}, {Name: "b", Region: "r1"}, {Name: "c", Region: "r2"}},
		FederatorArgs: []string{"--heartbeat", "2s"},
		Logger:        log,
		ForceLoopback: loopback,
	})
	if err != nil {
		return err
	}
	defer func() {
		step("tearing down")
		if cerr := m.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		} else {
			fmt.Println("every process, network namespace and file of the demo is gone")
		}
	}()
	a, b, c := m.Cluster("a"), m.Cluster("b"), m.Cluster("c")
	isolated := m.Env.Isolated()
	fmt.Printf("3 clusters up in %s; isolated by network namespaces: %t\n", m.Env.StartupDuration().Round(time.Millisecond), isolated)
	if !isolated {
		fmt.Println("  loopback mode (not root, or --loopback): the clusters share the host network on 127.x")
		fmt.Println("  addresses and isolation is NOT enforced. Kubernetes refuses loopback addresses in")
		fmt.Println("  EndpointSlices, so the echo service will have 0 ready endpoints, and pods get no sidecar")
		fmt.Println("  (capture needs a network namespace per pod): linking, export and import still happen,")
		fmt.Println("  traffic does not. Run as root for the whole demo.")
	}
	for _, mc := range m.Clusters() {
		host, _, _ := mc.K.KubeconfigFor(localcluster.UserAdmin)
		fmt.Printf("  cluster %s (region %s): API %s  kubeconfig %s\n", mc.Name(), mc.Region, mc.K.APIServerURL(), host)
		fmt.Printf("    federator %s/debug/catalog  (log %s)\n", mc.Federator.Monitoring, mc.Federator.Proc.LogPath())
		fmt.Printf("    federation endpoint %s; east-west gateway %s, what peers are told\n",
			mc.Federator.FederationAddr, net.JoinHostPort(mc.K.WANIP().String(), fedproc.GatewayPort))
	}
	if isolated {
		fmt.Println("  each cluster's node namespace holds its control plane, federator and gateway, on its pod")
		fmt.Println("  network (10.1x.0.1/16) and on the WAN (10.254.0.0/24); pods reach their federator at the")
		fmt.Println("  node's address and, on the WAN, only other clusters' gateways (port 15443)")
	}

	var echoPods []*mesh.Pod
	for _, mc := range []*mesh.Cluster{a, c} {
		step("cluster %s: an echo pod, Service demo/echo and a ServiceExport", mc.Name())
		pods, err := serveEcho(ctx, mc, binDir, isolated)
		if err != nil {
			return err
		}
		echoPods = append(echoPods, pods...)
		ready := 0
		if isolated {
			ready = 1
		}
		if err := mc.Export(ctx, "demo", "echo", ready); err != nil {
			return err
		}
		fmt.Printf("  federator %s exports demo/echo with %d ready endpoint(s)\n", mc.Name(), ready)
	}

	step("federator a's catalog")
	d, err := a.Federator.Catalog(ctx)
	if err != nil {
		return err
	}
	out, _ := json.MarshalIndent(d, "", "  ")
	fmt.Println(string(out))

	// Imports land in the namespace of the same name, which b has before
	// it links (its client pod lives there).
	if err := ensureNamespace(ctx, b, "demo"); err != nil {
		return err
	}
	if err := link(ctx, a, b); err != nil {
		return err
	}
	if err := link(ctx, c, b); err != nil {
		return err
	}
	if err := showImport(ctx, b, "demo", "echo", a, c); err != nil {
		return err
	}
	for _, exporter := range []*mesh.Cluster{a, c} {
		if err := showImported(ctx, b.Federator, exporter.Name(), "demo", "echo"); err != nil {
			return err
		}
	}
	if err := showStatus(ctx, b, a, c); err != nil {
		return err
	}
	fmt.Println("\nNo cluster holds credentials for another's API server: b learnt about demo/echo only")
	fmt.Println("over the federation streams. Delete the ServiceExport in a and c and b's ServiceEntry goes;")
	fmt.Println("delete FederationPeer b in a and a tells b (Terminate): both drop the link's imports.")

	if isolated {
		if err := showTraffic(ctx, a, b, c, echoPods); err != nil {
			return err
		}
	} else {
		step("traffic needs root")
		fmt.Println("  sidecars capture with iptables in each pod's network namespace; run `make demo` as root")
		fmt.Println("  to see b's client call a's echo, then fail over to c")
	}
	fmt.Printf("\nthe demo ran in %s\n", time.Since(t0).Round(time.Second))

	switch {
	case keepRunning:
		step("clusters keep running; press Ctrl-C to end the demo")
		<-ctx.Done()
	case exitAfter > 0:
		step("clusters keep running for %s (Ctrl-C ends it sooner)", exitAfter)
		select {
		case <-ctx.Done():
		case <-time.After(exitAfter):
		}
	}
	return nil
}

func buildEcho(ctx context.Context, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "github.com/isthmus-mesh/isthmus/test/echo")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build echo workload: %w", err)
	}
	return nil
}

// serveEcho runs demo/echo in mc: a pod with its sidecar as root; as
// anyone else a bare echo process, since capture needs a pod namespace.
func serveEcho(ctx context.Context, mc *mesh.Cluster, binDir string, isolated bool) ([]*mesh.Pod, error) {
	if isolated {
		pods, err := mc.ServeEcho(ctx, "demo", "echo", 1)
		if err != nil {
			return nil, err
		}
		fmt.Printf("  Service ports http 80 → 8080, grpc 9090, tcp 9000\n")
		for _, p := range pods {
			fmt.Printf("  pod demo/%s at %s: `sidecar iptables` captured its traffic, then its sidecar (uid %d) got\n", p.Name(), p.W.IP, mesh.ProxyUser.UID)
			fmt.Printf("  the certificate of %s from federator %s and its\n", p.SPIFFEID(), mc.Name())
			fmt.Printf("  configuration over xDS; the echo app runs as uid %d\n", mesh.AppUser.UID)
		}
		return pods, nil
	}
	w, err := mc.K.RunWorkload(ctx, localcluster.WorkloadSpec{
		Name: "echo-0", Namespace: "demo", Labels: map[string]string{"app": "echo"},
		Command: []string{filepath.Join(binDir, "echo")}, Env: []string{"CLUSTER_NAME=" + mc.Name()},
	})
	if err != nil {
		return nil, err
	}
	fmt.Printf("  pod demo/%s running at %s (no sidecar in loopback mode)\n", w.Name, w.IP)
	_, err = mc.K.Client().CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Name: "http", Port: mesh.ServiceHTTPPort, TargetPort: intstr.FromInt32(mesh.EchoHTTPPort),
				Protocol: corev1.ProtocolTCP, AppProtocol: new("http")}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create Service demo/echo: %w", err)
	}
	return nil, nil
}

// showImported prints what f's catalog holds from peer for ns/name: what
// proxies will be given, straight from memory (the ServiceEntry is only a
// mirror of it).
func showImported(ctx context.Context, f *fedproc.Federator, peer, ns, name string) error {
	d, err := f.Catalog(ctx)
	if err != nil {
		return err
	}
	for _, src := range d.Sources {
		if src.Source != peer {
			continue
		}
		for _, s := range src.Services {
			if s.Namespace == ns && s.Name == name {
				fmt.Printf("\n  federator %s's catalog, source %q (version %s): %s/%s, %d ready endpoints behind gateway %s, served by %s\n",
					f.Cluster.Name(), peer, src.Version, ns, name, s.ReadyEndpoints(), orDash(strings.Join(s.Gateways, ", ")), orDash(strings.Join(s.Identities, ", ")))
				return nil
			}
		}
	}
	return fmt.Errorf("federator %s's catalog has no %s/%s from %s", f.Cluster.Name(), ns, name, peer)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
