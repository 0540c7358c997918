package main

// The federation half of the demo: link cluster b to cluster a with the
// real `federator token create` / `federator join`, wait for both
// federators to report the link Connected, and follow a's export into b
// (ServiceEntry, ServiceImport, `federator status` on both sides).

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/pkg/kube"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// Bounds of the demo's waits. Generous: the machine may be busy, and a
// wait that runs out says what it last saw.
const (
	cliTimeout     = 30 * time.Second
	connectTimeout = 90 * time.Second
	importTimeout  = 90 * time.Second
)

// member is one cluster of the demo with its running federator and the
// clients the demo reads it with (as the cluster's admin).
type member struct {
	c     *localcluster.Cluster
	f     *fedproc.Federator
	bin   string // the federator binary
	dyn   dynamic.Interface
	istio istioclient.Interface
	mcs   mcsclient.Interface
}

func newMember(c *localcluster.Cluster, f *fedproc.Federator, binDir string) (*member, error) {
	cfg, err := c.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return nil, err
	}
	m := &member{c: c, f: f, bin: filepath.Join(binDir, "federator")}
	if m.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if m.istio, err = istioclient.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if m.mcs, err = mcsclient.NewForConfig(cfg); err != nil {
		return nil, err
	}
	return m, nil
}

// cli runs the real federator CLI in the cluster's node network with the
// cluster admin's kubeconfig, as an operator of that cluster would, after
// printing the command line. It returns stdout and stderr; a failure
// carries stderr.
func (m *member) cli(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	fmt.Printf("  [%s]$ federator %s\n", m.c.Name(), strings.Join(args, " "))
	_, kubeconfig, err := m.c.KubeconfigFor(localcluster.UserAdmin)
	if err != nil {
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(ctx, cliTimeout)
	defer cancel()
	cmd := m.c.Command(ctx, m.bin, append(args, "--kubeconfig", kubeconfig)...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), errOut.String(), fmt.Errorf("cluster %s: federator %s: %w: %s", m.c.Name(), strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), errOut.String(), nil
}

// indent prints text with every line indented, dropping trailing blanks.
func indent(text, prefix string) {
	for line := range strings.SplitSeq(strings.TrimRight(text, "\n"), "\n") {
		fmt.Println(strings.TrimRight(prefix+line, " "))
	}
}

// poll calls check every 200ms until it reports done, ctx ends, or bound
// passes; the error then says what was awaited and what check last saw.
func poll(ctx context.Context, bound time.Duration, what string, check func(context.Context) (done bool, last string)) error {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	var last string
	for {
		var done bool
		if done, last = check(ctx); done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waited %s for %s; last seen: %s", bound, what, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// peer reads the FederationPeer called name as `federator status` does.
func (m *member) peer(ctx context.Context, name string) (v1alpha1.FederationPeer, error) {
	peers, err := federation.PeerStatuses(ctx, m.dyn)
	if err != nil {
		return v1alpha1.FederationPeer{}, err
	}
	for _, p := range peers {
		if p.Name == name {
			return p, nil
		}
	}
	return v1alpha1.FederationPeer{}, fmt.Errorf("no FederationPeer %q in cluster %s", name, m.c.Name())
}

// describePeer is a FederationPeer's state and its False conditions, for
// error messages.
func describePeer(p v1alpha1.FederationPeer) string {
	parts := []string{"state " + cmp.Or(p.Status.State, "(none yet)")}
	for _, c := range p.Status.Conditions {
		if c.Status == metav1.ConditionFalse {
			parts = append(parts, fmt.Sprintf("%s=False (%s: %s)", c.Type, c.Reason, c.Message))
		}
	}
	return strings.Join(parts, "; ")
}

// waitPeer waits until m's FederationPeer peer satisfies ok. On timeout
// the error quotes the peer's status and the end of m's federator log.
func (m *member) waitPeer(ctx context.Context, peer, what string, bound time.Duration, ok func(v1alpha1.FederationPeer) bool) error {
	err := poll(ctx, bound, fmt.Sprintf("cluster %s: %s", m.c.Name(), what), func(ctx context.Context) (bool, string) {
		p, err := m.peer(ctx, peer)
		if err != nil {
			return false, err.Error()
		}
		return ok(p), describePeer(p)
	})
	if err != nil {
		return fmt.Errorf("%w\nend of federator %s's log (%s):\n%s", err, m.c.Name(), m.f.Proc.LogPath(), m.f.Proc.Tail(15))
	}
	return nil
}

// link has acceptor a create a one-time token for joiner b and b join with
// it, both with the real CLI, then waits until both sides report the link
// Connected.
func link(ctx context.Context, a, b *member) error {
	step("linking: cluster %s creates a one-time token for cluster %s", a.c.Name(), b.c.Name())
	fmt.Printf("  (each command runs bin/federator in the cluster's node network with --kubeconfig <the cluster's admin kubeconfig>)\n")
	fmt.Printf("  --address is where %s reaches %s's federation endpoint: gRPC over mTLS on port %s\n", b.c.Name(), a.c.Name(), fedproc.FederationPort)
	token, hint, err := a.cli(ctx, "token", "create", "--peer", b.c.Name(), "--address", a.f.FederationAddr)
	if err != nil {
		return err
	}
	token = strings.TrimSpace(token)
	indent(hint, "    ")
	file := filepath.Join(b.c.Dir(), a.c.Name()+".token")
	if err := os.WriteFile(file, []byte(token+"\n"), 0o600); err != nil {
		return fmt.Errorf("write the token: %w", err)
	}
	fmt.Printf("  the token (%d characters: %s's name, trust domain, federator ID, root certificate, address,\n", len(token), a.c.Name())
	fmt.Printf("  and the one-time secret, of which %s keeps only a hash) is handed to %s's operator in %s\n", a.c.Name(), b.c.Name(), file)

	step("linking: cluster %s joins %s with the token", b.c.Name(), a.c.Name())
	out, _, err := b.cli(ctx, "join", "--name", a.c.Name(), "--token-file", file)
	if err != nil {
		return err
	}
	indent(out, "    ")
	fmt.Printf("  federator %s now dials %s at %s (TLS server name %s), verifies it against the\n", b.c.Name(), a.c.Name(), a.f.FederationAddr, federation.ReservedSNI)
	fmt.Printf("  token's root, spends the secret and sends its own bundle; %s then creates its own FederationPeer %q\n", a.c.Name(), b.c.Name())

	connected := func(p v1alpha1.FederationPeer) bool { return p.Status.State == v1alpha1.StateConnected }
	t0 := time.Now()
	if err := b.waitPeer(ctx, a.c.Name(), "FederationPeer "+a.c.Name()+" Connected", connectTimeout, connected); err != nil {
		return err
	}
	if err := a.waitPeer(ctx, b.c.Name(), "FederationPeer "+b.c.Name()+" Connected", connectTimeout, connected); err != nil {
		return err
	}
	fmt.Printf("  both sides report the link Connected after %s: one mTLS gRPC stream, each federator\n", time.Since(t0).Round(100*time.Millisecond))
	fmt.Printf("  authorized against the other's trust bundle and SPIFFE ID\n")

	records, err := a.c.Client().CoreV1().Secrets("isthmus-system").List(ctx, metav1.ListOptions{LabelSelector: federation.LabelTokenFor})
	if err != nil {
		return err
	}
	joins, err := b.c.Client().CoreV1().Secrets("isthmus-system").List(ctx, metav1.ListOptions{LabelSelector: federation.LabelJoinToken})
	if err != nil {
		return err
	}
	fmt.Printf("  the secret is spent: token records left in %s: %d, join tokens left in %s: %d\n",
		a.c.Name(), len(records.Items), b.c.Name(), len(joins.Items))
	return nil
}

// ensureNamespace creates namespace ns in c unless it exists.
func ensureNamespace(ctx context.Context, c *localcluster.Cluster, ns string) error {
	_, err := c.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster %s: create namespace %s: %w", c.Name(), ns, err)
	}
	return nil
}

// showImport waits until importer writes exporter's service ns/name as a
// ServiceEntry whose weights add up to the ready endpoints the exporter's
// catalog holds now (none in loopback mode), and prints it with its
// ServiceImport.
func showImport(ctx context.Context, exporter, importer *member, ns, name string) error {
	step("cluster %s imports %s/%s from %s", importer.c.Name(), ns, name, exporter.c.Name())
	fmt.Printf("  imports land in the namespace of the same name; %s has namespace %s\n", importer.c.Name(), ns)
	fmt.Printf("  (without it the import is skipped, and `federator status` says so under ImportsWritten)\n")
	var se *networkingv1.ServiceEntry
	ready := -1
	err := poll(ctx, importTimeout, fmt.Sprintf("ServiceEntry %s/%s in cluster %s weighted by %s's ready endpoints", ns, kube.ServiceEntryName(name), importer.c.Name(), exporter.c.Name()),
		func(ctx context.Context) (bool, string) {
			d, err := exporter.f.Catalog(ctx)
			if err != nil {
				return false, err.Error()
			}
			svc, ok := fedproc.LocalService(d, ns, name)
			if !ok {
				return false, fmt.Sprintf("%s/%s is not in federator %s's catalog", ns, name, exporter.c.Name())
			}
			ready = svc.ReadyEndpoints()
			se, err = importer.istio.NetworkingV1().ServiceEntries(ns).Get(ctx, kube.ServiceEntryName(name), metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			total := 0
			for _, ep := range se.Spec.Endpoints {
				total += int(ep.Weight)
			}
			return total == ready, fmt.Sprintf("%d endpoints, total weight %d, %d ready endpoints in %s", len(se.Spec.Endpoints), total, ready, exporter.c.Name())
		})
	if err != nil {
		return fmt.Errorf("%w\nend of federator %s's log (%s):\n%s", err, importer.c.Name(), importer.f.Proc.LogPath(), importer.f.Proc.Tail(15))
	}
	printServiceEntry(se)
	if ready == 0 {
		fmt.Printf("  no endpoints: %s exports %s/%s with 0 ready endpoints (loopback mode, see above), and a locality\n", exporter.c.Name(), ns, name)
		fmt.Printf("  without ready endpoints gets no ServiceEntry endpoint; the import itself is in place\n")
	}

	si, err := importer.mcs.MulticlusterV1alpha1().ServiceImports(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("cluster %s: ServiceImport %s/%s: %w", importer.c.Name(), ns, name, err)
	}
	var ports, clusters []string
	for _, p := range si.Spec.Ports {
		ports = append(ports, fmt.Sprintf("%s %d/%s", p.Name, p.Port, p.Protocol))
	}
	for _, c := range si.Status.Clusters {
		clusters = append(clusters, c.Cluster)
	}
	fmt.Printf("\n  ServiceImport %s/%s: type %s, ports %s, clusters %s\n", ns, name, si.Spec.Type, strings.Join(ports, ", "), strings.Join(clusters, ", "))
	return nil
}

// printServiceEntry prints the fields of an imported ServiceEntry that say
// where traffic goes.
func printServiceEntry(se *networkingv1.ServiceEntry) {
	var labels, ports []string
	for _, k := range slices.Sorted(maps.Keys(se.Labels)) {
		labels = append(labels, k+"="+se.Labels[k])
	}
	for _, p := range se.Spec.Ports {
		ports = append(ports, fmt.Sprintf("%s %d/%s", p.Name, p.Number, p.Protocol))
	}
	fmt.Printf("\n  ServiceEntry %s/%s\n", se.Namespace, se.Name)
	fmt.Printf("    labels      %s\n", strings.Join(labels, ", "))
	fmt.Printf("    hosts       %s\n", strings.Join(se.Spec.Hosts, ", "))
	fmt.Printf("    ports       %s\n", strings.Join(ports, ", "))
	fmt.Printf("    location    %s, resolution %s\n", se.Spec.Location, se.Spec.Resolution)
	fmt.Printf("    SANs        %s\n", cmp.Or(strings.Join(se.Spec.SubjectAltNames, ", "), "-"))
	if len(se.Spec.Endpoints) == 0 {
		fmt.Printf("    endpoints   (none)\n")
	}
	for i, ep := range se.Spec.Endpoints {
		var epPorts []string
		for _, k := range slices.Sorted(maps.Keys(ep.Ports)) {
			epPorts = append(epPorts, fmt.Sprintf("%s→%d", k, ep.Ports[k]))
		}
		head := "endpoints"
		if i > 0 {
			head = ""
		}
		fmt.Printf("    %-11s %s  ports %s  weight %d  locality %s  network %s  source-cluster %s\n", head,
			ep.Address, strings.Join(epPorts, ","), ep.Weight, cmp.Or(ep.Locality, "-"), cmp.Or(ep.Network, "-"),
			cmp.Or(ep.Labels[kube.LabelSourceCluster], "-"))
	}
}

// showStatus waits until each side's FederationPeer status counts the
// service (status is written every few seconds), then prints the real
// `federator status` of both clusters.
func showStatus(ctx context.Context, exporter, importer *member) error {
	err := errors.Join(
		exporter.waitPeer(ctx, importer.c.Name(), "status counts 1 exported service", importTimeout,
			func(p v1alpha1.FederationPeer) bool { return p.Status.ExportedServices == 1 }),
		importer.waitPeer(ctx, exporter.c.Name(), "status counts 1 imported service", importTimeout,
			func(p v1alpha1.FederationPeer) bool { return p.Status.ImportedServices == 1 }),
	)
	if err != nil {
		return err
	}
	for _, m := range []*member{exporter, importer} {
		step("federator status in cluster %s", m.c.Name())
		out, _, err := m.cli(ctx, "status")
		if err != nil {
			return err
		}
		indent(out, "    ")
	}
	return nil
}
