package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/bulk"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// member is one cluster of the benchmark, its admin clients (with a high
// client-side rate limit, so the benchmark's own writes are never what
// is slow) and its running federator.
type member struct {
	c      *localcluster.Cluster
	binDir string
	args   []string
	kube   kubernetes.Interface
	mcs    mcsclient.Interface
	istio  istioclient.Interface
	// monitoring is the base URL of the federator's monitoring port, known
	// before the federator starts, so its start-up can be timed from
	// outside.
	monitoring string
	f          *fedproc.Federator
}

func newMember(ctx context.Context, c *localcluster.Cluster, binDir string, args []string) (*member, error) {
	cfg, err := c.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return nil, err
	}
	if err := install.Isthmus(ctx, cfg, "system:isthmus:federator"); err != nil {
		return nil, fmt.Errorf("install Isthmus into %s: %w", c.Name(), err)
	}
	if err := install.Apply(ctx, cfg, install.IstioServiceEntryCRD, install.IstioAuthorizationPolicyCRD, install.IstioPeerAuthenticationCRD); err != nil {
		return nil, fmt.Errorf("install Istio's ServiceEntry, AuthorizationPolicy and PeerAuthentication CRDs into %s: %w", c.Name(), err)
	}
	cfg.QPS, cfg.Burst = 5000, 10000
	host, err := fedproc.HostAddr(c)
	if err != nil {
		return nil, err
	}
	m := &member{c: c, binDir: binDir, args: args,
		monitoring: "http://" + net.JoinHostPort(host, fedproc.MonitoringPort)}
	if m.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if m.mcs, err = mcsclient.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if m.istio, err = istioclient.NewForConfig(cfg); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *member) name() string { return m.c.Name() }

// start runs the federator and returns once it is ready (fedproc waits at
// most a minute).
func (m *member) start(ctx context.Context) error {
	f, err := fedproc.Start(ctx, m.c, m.binDir, m.args...)
	if err != nil {
		return err
	}
	m.f = f
	if n := procName(f.Proc.Pid()); n != "federator" {
		return fmt.Errorf("federator %s: pid %d is %q, not the federator: memory figures would be wrong", m.name(), f.Proc.Pid(), n)
	}
	return nil
}

func (m *member) stop() error {
	if m.f == nil {
		return nil
	}
	err := m.f.Stop(10 * time.Second)
	m.f = nil
	return err
}

// cli runs the federator CLI in the cluster's node network as its admin.
func (m *member) cli(ctx context.Context, args ...string) (string, error) {
	_, kubeconfig, err := m.c.KubeconfigFor(localcluster.UserAdmin)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := m.c.Command(ctx, filepath.Join(m.binDir, "federator"), append(args, "--kubeconfig", kubeconfig)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("federator %s in %s: %w: %s", strings.Join(args, " "), m.name(), err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

// link has joiner join acceptor as an operator would, and waits until
// both report the stream up.
func link(ctx context.Context, acceptor, joiner *member, dir string, poll time.Duration) error {
	token, err := acceptor.cli(ctx, "token", "create", "--peer", joiner.name(), "--address", acceptor.f.FederationAddr)
	if err != nil {
		return err
	}
	file := filepath.Join(dir, "token-"+acceptor.name())
	if err := os.WriteFile(file, []byte(token), 0o600); err != nil {
		return err
	}
	if _, err := joiner.cli(ctx, "join", "--name", acceptor.name(), "--token-file", file); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, p := range [][2]*member{{acceptor, joiner}, {joiner, acceptor}} {
		if _, err := p[0].waitConnected(ctx, p[1].name(), poll); err != nil {
			return err
		}
	}
	return nil
}

// waitConnected polls /debug/federation until the stream to peer is up.
func (m *member) waitConnected(ctx context.Context, peer string, poll time.Duration) (time.Time, error) {
	return newPoller(m.monitoring, "/debug/federation", poll).until(ctx,
		fmt.Sprintf("federator %s connected to %s", m.name(), peer),
		func(body []byte) (bool, error) {
			v, err := federationPeer(body, peer)
			return v.connected, err
		})
}

func (m *member) ensureNamespace(ctx context.Context, ns string) error {
	_, err := m.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s in %s: %w", ns, m.name(), err)
	}
	return nil
}

// createService creates a Service with one HTTP port and no selector: no
// EndpointSlice is made for it, so it is exported with no endpoints, and
// the only objects the exporter reads are the Service and its export.
// Transient errors are retried.
func (m *member) createService(ctx context.Context, ns, name string) error {
	return bulk.Retry(ctx, func() error {
		_, err := m.kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, AppProtocol: new("http")},
			}},
		}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create Service %s/%s in %s: %w", ns, name, m.name(), err)
		}
		return nil
	})
}

// ensureExport creates a ServiceExport, retrying transient errors, and
// returns it as the API server holds it; for bulk creation, not timed.
func (m *member) ensureExport(ctx context.Context, ns, name string) (*mcsv1alpha1.ServiceExport, error) {
	client := m.mcs.MulticlusterV1alpha1().ServiceExports(ns)
	var se *mcsv1alpha1.ServiceExport
	err := bulk.Retry(ctx, func() (err error) {
		se, err = client.Create(ctx, &mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			se, err = client.Get(ctx, name, metav1.GetOptions{})
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create ServiceExport %s/%s in %s: %w", ns, name, m.name(), err)
	}
	return se, nil
}

// setExportStatus writes conditions on the export's status, retrying
// transient errors (after a conflict, on the export as it is now).
func (m *member) setExportStatus(ctx context.Context, se *mcsv1alpha1.ServiceExport, conds []metav1.Condition) error {
	client := m.mcs.MulticlusterV1alpha1().ServiceExports(se.Namespace)
	cur := se.DeepCopy()
	err := bulk.Retry(ctx, func() error {
		cur.Status.Conditions = conds
		_, err := client.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			if fresh, gerr := client.Get(ctx, se.Name, metav1.GetOptions{}); gerr == nil {
				cur = fresh
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("write the status of ServiceExport %s/%s in %s: %w", se.Namespace, se.Name, m.name(), err)
	}
	return nil
}

func (m *member) createExport(ctx context.Context, ns, name string) (*mcsv1alpha1.ServiceExport, error) {
	se, err := m.mcs.MulticlusterV1alpha1().ServiceExports(ns).Create(ctx,
		&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create ServiceExport %s/%s in %s: %w", ns, name, m.name(), err)
	}
	return se, nil
}

func (m *member) deleteExport(ctx context.Context, ns, name string) error {
	err := m.mcs.MulticlusterV1alpha1().ServiceExports(ns).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete ServiceExport %s/%s in %s: %w", ns, name, m.name(), err)
	}
	return nil
}

// errNoTemplate: the exporter never wrote a status to copy.
var errNoTemplate = errors.New("no ServiceExport status written by the exporter to copy")

// exportStatus returns a function that gives, for ns/name, the status
// conditions the exporter wrote on template (a ServiceExport of a service
// like it), with template's namespace/name replaced. Writing these on a
// new ServiceExport makes it look as if the exporter had already
// reconciled it, so a restarted exporter has nothing to write.
func exportStatus(template *mcsv1alpha1.ServiceExport) (func(ns, name string, generation int64) []metav1.Condition, error) {
	if len(template.Status.Conditions) == 0 {
		return nil, errNoTemplate
	}
	old := template.Namespace + "/" + template.Name
	return func(ns, name string, generation int64) []metav1.Condition {
		out := make([]metav1.Condition, 0, len(template.Status.Conditions))
		for _, c := range template.Status.Conditions {
			c.Message = strings.ReplaceAll(c.Message, old, ns+"/"+name)
			c.ObservedGeneration = generation
			c.LastTransitionTime = metav1.Now()
			out = append(out, c)
		}
		return out
	}, nil
}
