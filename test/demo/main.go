// Command demo is what `make demo` runs: it starts two local clusters on
// real kube-apiservers (test/localcluster), installs Isthmus from deploy/,
// runs a federator in each cluster, exports an echo service from cluster
// a, links b to a with the real `federator token create` and `federator
// join`, and shows b importing the service: its ServiceEntry and
// ServiceImport, and `federator status` on both sides. It then waits for
// Ctrl-C (or --exit-after) and tears everything down.
package main

import (
	"cmp"
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

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/identity"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

func main() {
	binDir := flag.String("bin-dir", "bin", "directory holding the federator binary (make build)")
	echoBin := flag.String("echo", "", "echo workload binary; empty builds test/echo into the bin dir")
	exitAfter := flag.Duration("exit-after", 0, "end the demo after this long instead of waiting for Ctrl-C (0: wait)")
	verbose := flag.Bool("v", false, "log the harness's debug messages")
	loopback := flag.Bool("loopback", false, "share the host network even as root (what a non-root user gets): no isolation, no ready endpoints")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, log, *binDir, *echoBin, *exitAfter, *loopback); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...)
}

func run(ctx context.Context, log *slog.Logger, binDir, echoBin string, exitAfter time.Duration, loopback bool) (err error) {
	binDir, err = filepath.Abs(binDir)
	if err != nil {
		return err
	}
	if echoBin == "" {
		echoBin = filepath.Join(binDir, "echo")
		if err := buildEcho(ctx, echoBin); err != nil {
			return err
		}
	}

	step("starting clusters a and b (real kube-apiserver, etcd and kube-controller-manager each)")
	env, err := localcluster.Start(ctx, localcluster.Options{
		Clusters:      []localcluster.ClusterOptions{{Name: "a"}, {Name: "b"}},
		Logger:        log,
		ForceLoopback: loopback,
	})
	if err != nil {
		return err
	}
	defer func() {
		step("tearing down")
		if cerr := env.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		} else {
			fmt.Println("every process, network namespace and file of the demo is gone")
		}
	}()
	fmt.Printf("2 clusters up in %s; isolated by network namespaces: %t\n", env.StartupDuration().Round(time.Millisecond), env.Isolated())
	if !env.Isolated() {
		fmt.Println("  loopback mode (not root, or --loopback): the clusters share the host network on 127.x")
		fmt.Println("  addresses and isolation is NOT enforced. Kubernetes refuses loopback addresses in")
		fmt.Println("  EndpointSlices, so the echo service will have 0 ready endpoints; linking, export and")
		fmt.Println("  import still happen. Run as root for one network namespace per cluster.")
	}
	for _, c := range env.Clusters() {
		host, _, _ := c.KubeconfigFor(localcluster.UserAdmin)
		fmt.Printf("  cluster %s: API %s  kubeconfig %s\n", c.Name(), c.APIServerURL(), host)
	}

	step("installing Isthmus from deploy/ (CRDs, namespace, least-privilege RBAC)")
	fmt.Println("  plus Istio's ServiceEntry CRD, which Istio's own installation provides in a real cluster:")
	fmt.Println("  a federator writes the services it imports as ServiceEntries")
	for _, c := range env.Clusters() {
		cfg, err := c.RESTConfig(localcluster.UserAdmin)
		if err != nil {
			return err
		}
		if err := install.Isthmus(ctx, cfg, "system:isthmus:federator"); err != nil {
			return fmt.Errorf("install into %s: %w", c.Name(), err)
		}
		if err := install.Apply(ctx, cfg, install.IstioServiceEntryCRD); err != nil {
			return fmt.Errorf("install Istio's ServiceEntry CRD into %s: %w", c.Name(), err)
		}
	}

	step("starting a federator in each cluster")
	feds := map[string]*fedproc.Federator{}
	members := map[string]*member{}
	for _, c := range env.Clusters() {
		f, err := fedproc.Start(ctx, c, binDir)
		if err != nil {
			return err
		}
		defer func() { _ = f.Stop(10 * time.Second) }()
		feds[c.Name()] = f
		if members[c.Name()], err = newMember(c, f, binDir); err != nil {
			return err
		}
		fmt.Printf("  federator %s ready: %s/debug/catalog  (log %s)\n", c.Name(), f.Monitoring, f.Proc.LogPath())
		fmt.Printf("    federation endpoint %s, east-west gateway address it gives peers %s\n",
			f.FederationAddr, net.JoinHostPort(c.WANIP().String(), fedproc.GatewayPort))
	}

	a := env.Cluster("a")
	step("cluster a: two echo pods, Service demo/echo, and a ServiceExport for it")
	for i := range 2 {
		w, err := a.RunWorkload(ctx, localcluster.WorkloadSpec{
			Name: fmt.Sprintf("echo-%d", i), Namespace: "demo", Labels: map[string]string{"app": "echo"},
			Command: []string{echoBin}, Env: []string{"CLUSTER_NAME=a"},
		})
		if err != nil {
			return err
		}
		fmt.Printf("  pod demo/%s running at %s\n", w.Name, w.IP)
	}
	if err := exportEcho(ctx, a); err != nil {
		return err
	}
	svc, err := waitForService(ctx, feds["a"], "demo", "echo", env.Isolated(), 30*time.Second)
	if err != nil {
		return err
	}
	fmt.Printf("  federator a exports demo/echo with %d ready endpoints\n", svc.ReadyEndpoints())

	step("federator a's catalog")
	d, err := feds["a"].Catalog(ctx)
	if err != nil {
		return err
	}
	out, _ := json.MarshalIndent(d, "", "  ")
	fmt.Println(string(out))
	if err := showIdentity(ctx, env, feds); err != nil {
		return err
	}

	if err := link(ctx, members["a"], members["b"]); err != nil {
		return err
	}
	if err := ensureNamespace(ctx, env.Cluster("b"), "demo"); err != nil {
		return err
	}
	if err := showImport(ctx, members["a"], members["b"], "demo", "echo"); err != nil {
		return err
	}
	if err := showImported(ctx, feds["b"], "a", "demo", "echo"); err != nil {
		return err
	}
	if err := showStatus(ctx, members["a"], members["b"]); err != nil {
		return err
	}
	fmt.Println("\nNo cluster holds credentials for the other's API server: b learnt about demo/echo only")
	fmt.Println("over the federation stream. Delete the ServiceExport in a and b's ServiceEntry goes;")
	fmt.Println("delete FederationPeer b in a and a tells b (Terminate): both drop the link's imports.")

	if exitAfter > 0 {
		step("demo ends in %s", exitAfter)
		select {
		case <-ctx.Done():
		case <-time.After(exitAfter):
		}
	} else {
		step("clusters keep running; press Ctrl-C to end the demo")
		<-ctx.Done()
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

func exportEcho(ctx context.Context, c *localcluster.Cluster) error {
	_, err := c.Client().CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080),
				Protocol: corev1.ProtocolTCP, AppProtocol: new("http")}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Service demo/echo: %w", err)
	}
	cfg, err := c.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return err
	}
	mcs, err := mcsclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	_, err = mcs.MulticlusterV1alpha1().ServiceExports("demo").Create(ctx,
		&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create ServiceExport demo/echo: %w", err)
	}
	return nil
}

// waitForService waits until f's local catalog holds ns/name, with every
// endpoint ready if wantReady (pods in loopback mode never get into
// EndpointSlices, so there are none to wait for).
func waitForService(ctx context.Context, f *fedproc.Federator, ns, name string, wantReady bool, bound time.Duration) (catalog.Service, error) {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	var last string
	for {
		d, err := f.Catalog(ctx)
		if err == nil {
			if s, ok := fedproc.LocalService(d, ns, name); ok && !wantReady {
				return s, nil
			} else if ok && s.ReadyEndpoints() > 0 {
				notReady := 0
				for _, e := range s.Endpoints {
					notReady += e.NotReady
				}
				if notReady == 0 {
					return s, nil
				}
			}
			last = fmt.Sprintf("%d sources", len(d.Sources))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return catalog.Service{}, fmt.Errorf("%s/%s not in federator %s's catalog after %s (last: %s)",
				ns, name, f.Cluster.Name(), bound, strings.TrimSpace(last))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// showIdentity has a workload of each cluster get its certificate from its
// own federator, with a real ServiceAccount token, and prints who it is and
// which root signed it: two clusters, two trust domains, two roots.
func showIdentity(ctx context.Context, env *localcluster.Env, feds map[string]*fedproc.Federator) error {
	for _, c := range env.Clusters() {
		step("cluster %s: ServiceAccount demo/client gets its certificate from federator %s", c.Name(), c.Name())
		kc := c.Client()
		if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		if _, err := kc.CoreV1().ServiceAccounts("demo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "client"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		sec, err := kc.CoreV1().Secrets("isthmus-system").Get(ctx, ca.DefaultSecretName, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("read cluster %s's root: %w", c.Name(), err)
		}
		td := spiffeid.RequireTrustDomainFromString(c.Name() + ".mesh")
		src, err := identity.New(ctx, identity.Config{
			CAAddress:   feds[c.Name()].CAAddr,
			CAID:        spiffeid.RequireFromSegments(td, "ns", "isthmus-system", "sa", "isthmus-federator"),
			RootsPEM:    sec.Data[ca.KeyRootCert],
			TrustDomain: td, Namespace: "demo", ServiceAccount: "client",
			TokenSource: func(ctx context.Context) (string, error) {
				tr, err := kc.CoreV1().ServiceAccounts("demo").CreateToken(ctx, "client", &authenticationv1.TokenRequest{
					Spec: authenticationv1.TokenRequestSpec{Audiences: []string{"isthmus-ca"}},
				}, metav1.CreateOptions{})
				if err != nil {
					return "", err
				}
				return tr.Status.Token, nil
			},
		})
		if err != nil {
			return fmt.Errorf("certificate for demo/client in cluster %s: %w", c.Name(), err)
		}
		svid, err := src.GetX509SVID()
		_ = src.Close()
		if err != nil {
			return err
		}
		leaf := svid.Certificates[0]
		fmt.Printf("  identity  %s\n  issuer    %s\n  valid     %s → %s\n",
			svid.ID, leaf.Issuer.CommonName, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
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
					f.Cluster.Name(), peer, src.Version, ns, name, s.ReadyEndpoints(), cmp.Or(strings.Join(s.Gateways, ", "), "-"), cmp.Or(strings.Join(s.Identities, ", "), "-"))
				return nil
			}
		}
	}
	return fmt.Errorf("federator %s's catalog has no %s/%s from %s", f.Cluster.Name(), ns, name, peer)
}
