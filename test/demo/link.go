package main

// The federation half of the demo: link cluster b to clusters a and c
// with the real `federator token create` / `federator join`, wait for the
// federators to report each link Connected, and follow a's and c's export
// into b (ServiceEntry, ServiceImport, `federator status`).

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
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/pkg/kube"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/mesh"
)

// Bounds of the demo's waits. Generous: the machine may be busy, and a
// wait that runs out says what it last saw.
const (
	connectTimeout = 90 * time.Second
	importTimeout  = 90 * time.Second
)

// cli runs the real federator CLI in the cluster's node network with the
// cluster admin's kubeconfig, as an operator of that cluster would, after
// printing the command line. It returns stdout and stderr; a failure
// carries stderr.
func cli(ctx context.Context, c *mesh.Cluster, args ...string) (stdout, stderr string, err error) {
	fmt.Printf("  [%s]$ federator %s\n", c.Name(), strings.Join(args, " "))
	return c.CLI(ctx, args...)
}

// indent prints text with every line indented, dropping trailing blanks.
func indent(text, prefix string) {
	for line := range strings.SplitSeq(strings.TrimRight(text, "\n"), "\n") {
		fmt.Println(strings.TrimRight(prefix+line, " "))
	}
}

// link has acceptor a create a one-time token for joiner b and b join with
// it, both with the real CLI, then waits until both sides report the link
// Connected.
func link(ctx context.Context, a, b *mesh.Cluster) error {
	step("linking: cluster %s creates a one-time token for cluster %s", a.Name(), b.Name())
	fmt.Printf("  (each command runs bin/federator in the cluster's node network with --kubeconfig <the cluster's admin kubeconfig>)\n")
	fmt.Printf("  --address is where %s reaches %s's federation endpoint: gRPC over mTLS on port %s\n", b.Name(), a.Name(), fedproc.FederationPort)
	token, hint, err := cli(ctx, a, "token", "create", "--peer", b.Name(), "--address", a.Federator.FederationAddr)
	if err != nil {
		return err
	}
	token = strings.TrimSpace(token)
	indent(hint, "    ")
	file := filepath.Join(b.K.Dir(), a.Name()+".token")
	if err := os.WriteFile(file, []byte(token+"\n"), 0o600); err != nil {
		return fmt.Errorf("write the token: %w", err)
	}
	fmt.Printf("  the token (%d characters: %s's name, trust domain, federator ID, root certificate, address,\n", len(token), a.Name())
	fmt.Printf("  and the one-time secret, of which %s keeps only a hash) is handed to %s's operator in %s\n", a.Name(), b.Name(), file)

	step("linking: cluster %s joins %s with the token", b.Name(), a.Name())
	out, _, err := cli(ctx, b, "join", "--name", a.Name(), "--token-file", file)
	if err != nil {
		return err
	}
	indent(out, "    ")
	fmt.Printf("  federator %s now dials %s at %s (TLS server name %s), verifies it against the\n", b.Name(), a.Name(), a.Federator.FederationAddr, federation.ReservedSNI)
	fmt.Printf("  token's root, spends the secret and sends its own bundle; %s then creates its own FederationPeer %q\n", a.Name(), b.Name())

	t0 := time.Now()
	if err := b.WaitPeer(ctx, a.Name(), "Connected", connectTimeout, mesh.Connected); err != nil {
		return err
	}
	if err := a.WaitPeer(ctx, b.Name(), "Connected", connectTimeout, mesh.Connected); err != nil {
		return err
	}
	fmt.Printf("  both sides report the link Connected after %s: one mTLS gRPC stream, each federator\n", time.Since(t0).Round(100*time.Millisecond))
	fmt.Printf("  authorized against the other's trust bundle and SPIFFE ID\n")

	records, err := a.K.Client().CoreV1().Secrets("isthmus-system").List(ctx, metav1.ListOptions{LabelSelector: federation.LabelTokenFor})
	if err != nil {
		return err
	}
	joins, err := b.K.Client().CoreV1().Secrets("isthmus-system").List(ctx, metav1.ListOptions{LabelSelector: federation.LabelJoinToken})
	if err != nil {
		return err
	}
	fmt.Printf("  the secret is spent: token records left in %s: %d, join tokens left in %s: %d\n",
		a.Name(), len(records.Items), b.Name(), len(joins.Items))
	return nil
}

// ensureNamespace creates namespace ns in c unless it exists.
func ensureNamespace(ctx context.Context, c *mesh.Cluster, ns string) error {
	_, err := c.K.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster %s: create namespace %s: %w", c.Name(), ns, err)
	}
	return nil
}

// showImport waits until importer writes the exporters' service ns/name
// as one ServiceEntry with an endpoint per exporter, whose weights add up
// to the ready endpoints the exporters' catalogs hold now (none in
// loopback mode), and prints it with its ServiceImport.
func showImport(ctx context.Context, importer *mesh.Cluster, ns, name string, exporters ...*mesh.Cluster) error {
	var names []string
	for _, e := range exporters {
		names = append(names, e.Name())
	}
	step("cluster %s imports %s/%s from %s", importer.Name(), ns, name, strings.Join(names, " and "))
	fmt.Printf("  imports land in the namespace of the same name; %s has namespace %s\n", importer.Name(), ns)
	fmt.Printf("  (without it the import is skipped, and `federator status` says so under ImportsWritten)\n")
	var se *networkingv1.ServiceEntry
	ready := -1
	err := mesh.Poll(ctx, importTimeout, fmt.Sprintf("ServiceEntry %s/%s in cluster %s weighted by the ready endpoints of %s", ns, kube.ServiceEntryName(name), importer.Name(), strings.Join(names, " and ")),
		func(ctx context.Context) (bool, string) {
			ready = 0
			for _, e := range exporters {
				d, err := e.Federator.Catalog(ctx)
				if err != nil {
					return false, err.Error()
				}
				svc, ok := fedproc.LocalService(d, ns, name)
				if !ok {
					return false, fmt.Sprintf("%s/%s is not in federator %s's catalog", ns, name, e.Name())
				}
				ready += svc.ReadyEndpoints()
			}
			var err error
			se, err = importer.Istio.NetworkingV1().ServiceEntries(ns).Get(ctx, kube.ServiceEntryName(name), metav1.GetOptions{})
			if err != nil {
				return false, err.Error()
			}
			total := 0
			sources := map[string]bool{}
			for _, ep := range se.Spec.Endpoints {
				total += int(ep.Weight)
				sources[ep.Labels[kube.LabelSourceCluster]] = true
			}
			done := total == ready && (ready == 0 || len(sources) == len(exporters))
			return done, fmt.Sprintf("%d endpoints from %d clusters, total weight %d, %d ready endpoints in the exporters", len(se.Spec.Endpoints), len(sources), total, ready)
		})
	if err != nil {
		return fmt.Errorf("%w\nend of federator %s's log (%s):\n%s", err, importer.Name(), importer.Federator.Proc.LogPath(), importer.Federator.Proc.Tail(15))
	}
	printServiceEntry(se)
	if ready == 0 {
		fmt.Printf("  no endpoints: %s export %s/%s with 0 ready endpoints (loopback mode, see above), and a locality\n", strings.Join(names, " and "), ns, name)
		fmt.Printf("  without ready endpoints gets no ServiceEntry endpoint; the import itself is in place\n")
	}

	si, err := importer.MCS.MulticlusterV1alpha1().ServiceImports(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("cluster %s: ServiceImport %s/%s: %w", importer.Name(), ns, name, err)
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
// `federator status` of the importer and of each exporter.
func showStatus(ctx context.Context, importer *mesh.Cluster, exporters ...*mesh.Cluster) error {
	var errs []error
	for _, exporter := range exporters {
		errs = append(errs,
			exporter.WaitPeer(ctx, importer.Name(), "status counts 1 exported service", importTimeout,
				func(p v1alpha1.FederationPeer) bool { return p.Status.ExportedServices == 1 }),
			importer.WaitPeer(ctx, exporter.Name(), "status counts 1 imported service", importTimeout,
				func(p v1alpha1.FederationPeer) bool { return p.Status.ImportedServices == 1 }))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, m := range append([]*mesh.Cluster{importer}, exporters...) {
		step("federator status in cluster %s", m.Name())
		out, _, err := cli(ctx, m, "status")
		if err != nil {
			return err
		}
		indent(out, "    ")
	}
	return nil
}
