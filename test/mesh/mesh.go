package mesh

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/dynamic"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/apis/federation/v1alpha1"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
	"github.com/isthmus-mesh/isthmus/test/netns"
)

// Binaries Start needs in Options.BinDir.
var Binaries = []string{"federator", "eastwest-gw", "sidecar", "echo"}

// podBinaries are the binaries pods run as AppUser and ProxyUser, copied
// where those users can reach them.
var podBinaries = []string{"sidecar", "echo"}

// DefaultRegion is a cluster's region when its ClusterSpec names none.
const DefaultRegion = "r1"

// Bounds of the waits in this package. Generous: the machines that run the
// suite are shared and noisy, and a wait that runs out says what it saw.
const (
	cliTimeout  = 30 * time.Second
	linkTimeout = 90 * time.Second
	pollEvery   = 200 * time.Millisecond
)

// ErrNotIsolated: pods with sidecars need network namespaces (root).
var ErrNotIsolated = errors.New("mesh: pods with sidecars need a network namespace per pod: run as root")

// ClusterSpec is one cluster of the mesh.
type ClusterSpec struct {
	// Name is the cluster's name (its trust domain is <Name>.mesh).
	Name string
	// Region is its node's topology.kubernetes.io/region and its
	// federator's --region: sidecars prefer peers of their own region to
	// the others. Empty means DefaultRegion.
	Region string
}

// Options configure Start.
type Options struct {
	// Clusters to run; empty means "a" and "b" in DefaultRegion.
	Clusters []ClusterSpec
	// BinDir holds Binaries. The ones pods run as AppUser and ProxyUser
	// are copied under the environment's work directory, so BinDir may be
	// private (a clone under /root).
	BinDir string
	// FederatorArgs, GatewayArgs and SidecarArgs are added to every
	// federator's, gateway's and sidecar's command line (a later flag
	// wins).
	FederatorArgs, GatewayArgs, SidecarArgs []string
	// Logger receives the harness's lifecycle messages; nil discards them
	// (StartT logs to the test).
	Logger *slog.Logger
	// ForceLoopback, KubeBinDir and KeepWorkDir are localcluster's.
	ForceLoopback bool
	KubeBinDir    string
	KeepWorkDir   bool
}

// Mesh is a running set of clusters with their federators and gateways.
type Mesh struct {
	// Env is the clusters' harness.
	Env  *localcluster.Env
	opts Options
	// podBin holds copies of podBinaries that AppUser and ProxyUser can
	// run (root mode).
	podBin   string
	clusters []*Cluster
}

// Cluster is one cluster of the mesh with its control plane.
type Cluster struct {
	// K is the simulated Kubernetes cluster.
	K *localcluster.Cluster
	// Region is the cluster's region.
	Region string
	// Federator and Gateway are its federator and east-west gateway.
	Federator *fedproc.Federator
	Gateway   *fedproc.Gateway
	// MCS, Istio and Dynamic are clients of its API server as its admin.
	MCS     mcsclient.Interface
	Istio   istioclient.Interface
	Dynamic dynamic.Interface

	mesh *Mesh

	// mu guards pods.
	mu   sync.Mutex
	pods []*Pod
}

// Start runs the clusters of opts, installs Isthmus in each, and starts
// their federators and gateways. ctx bounds start-up only. On error
// nothing is left behind.
func Start(ctx context.Context, opts Options) (*Mesh, error) {
	opts = withDefaults(opts)
	if err := checkBinDir(opts.BinDir); err != nil {
		return nil, err
	}
	env, err := localcluster.Start(ctx, envOptions(opts))
	if err != nil {
		return nil, err
	}
	m, err := New(ctx, env, opts)
	if err != nil {
		return nil, errors.Join(err, env.Close())
	}
	return m, nil
}

// StartT is Start for a test: it logs to t, closes the mesh in
// t.Cleanup (quoting the end of every federator's, gateway's and pod's
// log when the test failed), and skips t, saying why, without root: the
// pods of a mesh need network namespaces.
func StartT(t testing.TB, opts Options) *Mesh {
	t.Helper()
	if os.Geteuid() != 0 && !opts.ForceLoopback {
		t.Skipf("mesh: skipped, running as uid %d: sidecars capture traffic with iptables in a network namespace per pod, which needs root (CI runs as root)", os.Geteuid())
	}
	opts = withDefaults(opts)
	if err := checkBinDir(opts.BinDir); err != nil {
		t.Fatal(err)
	}
	lopts := envOptions(opts)
	lopts.Logger = nil // localcluster logs to t
	env := localcluster.StartTWith(t, lopts)
	m, err := New(t.Context(), env, opts)
	if err != nil {
		t.Fatalf("mesh: %v", err)
	}
	// Registered after StartTWith's, so it runs first: the logs are
	// still there.
	t.Cleanup(func() {
		if t.Failed() {
			m.logTails(t)
		}
	})
	return m
}

func withDefaults(opts Options) Options {
	if len(opts.Clusters) == 0 {
		opts.Clusters = []ClusterSpec{{Name: "a"}, {Name: "b"}}
	}
	opts.Clusters = slices.Clone(opts.Clusters)
	for i := range opts.Clusters {
		opts.Clusters[i].Region = cmp.Or(opts.Clusters[i].Region, DefaultRegion)
	}
	return opts
}

func envOptions(opts Options) localcluster.Options {
	lo := localcluster.Options{
		Logger: opts.Logger, ForceLoopback: opts.ForceLoopback, KubeBinDir: opts.KubeBinDir, KeepWorkDir: opts.KeepWorkDir,
	}
	for _, c := range opts.Clusters {
		lo.Clusters = append(lo.Clusters, localcluster.ClusterOptions{Name: c.Name, NodeRegion: c.Region})
	}
	return lo
}

// checkBinDir checks that the binaries are there.
func checkBinDir(dir string) error {
	var errs []error
	for _, b := range Binaries {
		st, err := os.Stat(filepath.Join(dir, b))
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("mesh: %w (make build)", err))
		case st.IsDir() || st.Mode().Perm()&0o100 == 0:
			errs = append(errs, fmt.Errorf("mesh: %s is not an executable file", filepath.Join(dir, b)))
		}
	}
	return errors.Join(errs...)
}

// copyPodBinaries copies podBinaries into dir, where AppUser and ProxyUser
// can run them: every directory above it must let others pass.
func copyPodBinaries(from, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("mesh: %s is %s: pods run binaries under it as uids %d and %d, so others need x (set TMPDIR elsewhere)",
				d, st.Mode().Perm(), AppUser.UID, ProxyUser.UID)
		}
		if d == filepath.Dir(d) {
			break
		}
	}
	for _, b := range podBinaries {
		if _, err := netns.CopyExecutable(filepath.Join(from, b), dir); err != nil {
			return fmt.Errorf("mesh: copy %s for the pods: %w", b, err)
		}
	}
	return nil
}

// New starts the mesh on env, whose clusters it takes in order with the
// regions of opts.Clusters (matched by name): it installs Isthmus and
// Istio's ServiceEntry CRD, lets pods reach the WAN's gateway port, and
// starts a federator and a gateway per cluster, in parallel. The processes
// belong to env: env.Close stops them.
func New(ctx context.Context, env *localcluster.Env, opts Options) (*Mesh, error) {
	opts = withDefaults(opts)
	m := &Mesh{Env: env, opts: opts}
	if env.Isolated() {
		m.podBin = filepath.Join(env.WorkDir(), "bin")
		if err := copyPodBinaries(opts.BinDir, m.podBin); err != nil {
			return nil, err
		}
	}
	for _, kc := range env.Clusters() {
		c := &Cluster{K: kc, Region: DefaultRegion, mesh: m}
		for _, s := range opts.Clusters {
			if s.Name == kc.Name() {
				c.Region = s.Region
			}
		}
		m.clusters = append(m.clusters, c)
	}
	errs := make([]error, len(m.clusters))
	var wg sync.WaitGroup
	for i, c := range m.clusters {
		wg.Go(func() {
			if err := c.start(ctx); err != nil {
				errs[i] = fmt.Errorf("cluster %s: %w", c.K.Name(), err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return m, nil
}

func (c *Cluster) start(ctx context.Context) error {
	cfg, err := c.K.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return err
	}
	if c.MCS, err = mcsclient.NewForConfig(cfg); err != nil {
		return err
	}
	if c.Istio, err = istioclient.NewForConfig(cfg); err != nil {
		return err
	}
	if c.Dynamic, err = dynamic.NewForConfig(cfg); err != nil {
		return err
	}
	ictx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := install.Isthmus(ictx, cfg, "system:isthmus:federator"); err != nil {
		return fmt.Errorf("install Isthmus: %w", err)
	}
	// Istio's installation provides them in a real cluster; federators
	// write what they import as ServiceEntries and read the
	// AuthorizationPolicies and PeerAuthentications their sidecars enforce.
	if err := install.Apply(ictx, cfg, install.IstioServiceEntryCRD, install.IstioAuthorizationPolicyCRD, install.IstioPeerAuthenticationCRD); err != nil {
		return fmt.Errorf("install Istio's ServiceEntry, AuthorizationPolicy and PeerAuthentication CRDs: %w", err)
	}
	if err := c.K.AllowPodEgress(ctx, GatewayPort); err != nil {
		return err
	}
	bin := c.mesh.opts.BinDir
	if c.Federator, err = fedproc.Start(ctx, c.K, bin, c.federatorArgs()...); err != nil {
		return err
	}
	if c.Gateway, err = fedproc.StartGateway(ctx, c.Federator, bin, c.mesh.opts.GatewayArgs...); err != nil {
		return err
	}
	return nil
}

// federatorArgs are the flags of c's federator besides fedproc's.
func (c *Cluster) federatorArgs() []string {
	return append([]string{"--region", c.Region}, c.mesh.opts.FederatorArgs...)
}

// StopFederator stops c's federator as a rollout would (SIGTERM, then
// SIGKILL after ten seconds); the gateway and the pods stay up, with the
// configuration they hold.
func (c *Cluster) StopFederator() error {
	if err := c.Federator.Stop(10 * time.Second); err != nil {
		return fmt.Errorf("cluster %s: stop the federator: %w", c.Name(), err)
	}
	return nil
}

// StartFederator starts c's federator again after StopFederator, with the
// same flags; it knows only what the API server holds, and the gateway's
// and the pods' xDS clients redial it. It returns once the federator is
// ready (its catalog built), not once its peers resynced. Nothing else may
// use c.Federator meanwhile.
func (c *Cluster) StartFederator(ctx context.Context) error {
	f, err := fedproc.Start(ctx, c.K, c.mesh.opts.BinDir, c.federatorArgs()...)
	if err != nil {
		return fmt.Errorf("cluster %s: start the federator again: %w", c.Name(), err)
	}
	c.Federator = f
	return nil
}

// RestartFederator is StopFederator, then StartFederator.
func (c *Cluster) RestartFederator(ctx context.Context) error {
	if err := c.StopFederator(); err != nil {
		return err
	}
	return c.StartFederator(ctx)
}

// GatewayPort is the east-west gateway's port, the only one pods reach on
// the WAN.
const GatewayPort = 15443

// Close stops everything the mesh runs and removes what it made.
func (m *Mesh) Close() error { return m.Env.Close() }

// Clusters are the mesh's clusters in Options order.
func (m *Mesh) Clusters() []*Cluster { return slices.Clone(m.clusters) }

// Cluster is the cluster called name, or nil.
func (m *Mesh) Cluster(name string) *Cluster {
	for _, c := range m.clusters {
		if c.K.Name() == name {
			return c
		}
	}
	return nil
}

// Name is the cluster's name.
func (c *Cluster) Name() string { return c.K.Name() }

// TrustDomain is the cluster's trust domain.
func (c *Cluster) TrustDomain() string { return c.K.Name() + ".mesh" }

// SPIFFEID is the identity of ServiceAccount sa in namespace ns of c.
func (c *Cluster) SPIFFEID(ns, sa string) string {
	return "spiffe://" + c.TrustDomain() + "/ns/" + ns + "/sa/" + sa
}

// CLI runs the real federator CLI in the cluster's node network with its
// admin's kubeconfig, as the cluster's operator would, bounded. A failure
// carries stderr.
func (c *Cluster) CLI(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	_, kubeconfig, err := c.K.KubeconfigFor(localcluster.UserAdmin)
	if err != nil {
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(ctx, cliTimeout)
	defer cancel()
	cmd := c.K.Command(ctx, filepath.Join(c.mesh.opts.BinDir, "federator"), append(args, "--kubeconfig", kubeconfig)...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), errOut.String(), fmt.Errorf("cluster %s: federator %s: %w: %s", c.Name(), strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), errOut.String(), nil
}

// Link links joiner to acceptor as an operator would — `federator token
// create` on the acceptor, `federator join` with the token on the joiner
// — and waits until both report the link Connected.
func Link(ctx context.Context, acceptor, joiner *Cluster) error {
	token, _, err := acceptor.CLI(ctx, "token", "create", "--peer", joiner.Name(), "--address", acceptor.Federator.FederationAddr)
	if err != nil {
		return err
	}
	file := filepath.Join(joiner.K.Dir(), acceptor.Name()+".token")
	if err := os.WriteFile(file, []byte(strings.TrimSpace(token)+"\n"), 0o600); err != nil {
		return fmt.Errorf("write the token: %w", err)
	}
	if _, _, err := joiner.CLI(ctx, "join", "--name", acceptor.Name(), "--token-file", file); err != nil {
		return err
	}
	return errors.Join(
		joiner.WaitPeer(ctx, acceptor.Name(), "Connected", linkTimeout, Connected),
		acceptor.WaitPeer(ctx, joiner.Name(), "Connected", linkTimeout, Connected),
	)
}

// Connected reports a FederationPeer whose stream is up.
func Connected(p v1alpha1.FederationPeer) bool { return p.Status.State == v1alpha1.StateConnected }

// Peer reads FederationPeer name as `federator status` does.
func (c *Cluster) Peer(ctx context.Context, name string) (v1alpha1.FederationPeer, error) {
	peers, err := federation.PeerStatuses(ctx, c.Dynamic)
	if err != nil {
		return v1alpha1.FederationPeer{}, err
	}
	for _, p := range peers {
		if p.Name == name {
			return p, nil
		}
	}
	return v1alpha1.FederationPeer{}, fmt.Errorf("no FederationPeer %q in cluster %s", name, c.Name())
}

// WaitPeer waits, at most bound, until FederationPeer peer satisfies ok.
// The error quotes the peer's status and the end of the federator's log.
func (c *Cluster) WaitPeer(ctx context.Context, peer, what string, bound time.Duration, ok func(v1alpha1.FederationPeer) bool) error {
	err := Poll(ctx, bound, fmt.Sprintf("cluster %s: FederationPeer %s %s", c.Name(), peer, what), func(ctx context.Context) (bool, string) {
		p, err := c.Peer(ctx, peer)
		if err != nil {
			return false, err.Error()
		}
		return ok(p), DescribePeer(p)
	})
	if err != nil {
		return fmt.Errorf("%w\nend of federator %s's log (%s):\n%s", err, c.Name(), c.Federator.Proc.LogPath(), c.Federator.Proc.Tail(15))
	}
	return nil
}

// DescribePeer is a FederationPeer's state and its False conditions.
func DescribePeer(p v1alpha1.FederationPeer) string {
	parts := []string{"state " + cmp.Or(p.Status.State, "(none yet)")}
	for _, c := range p.Status.Conditions {
		if c.Status == "False" {
			parts = append(parts, fmt.Sprintf("%s=False (%s: %s)", c.Type, c.Reason, c.Message))
		}
	}
	return strings.Join(parts, "; ")
}

// Poll calls check every 200 ms until it reports done, ctx ends or bound
// passes; the error then says what was awaited and what check last saw.
func Poll(ctx context.Context, bound time.Duration, what string, check func(context.Context) (done bool, last string)) error {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	var last string
	for {
		var done bool
		if done, last = check(ctx); done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waited %s for %s; last seen: %s", bound, what, last)
		case <-tick.C:
		}
	}
}

// logTails logs the end of every federator's, gateway's and pod's logs.
func (m *Mesh) logTails(t testing.TB) {
	for _, c := range m.clusters {
		var procs []*localcluster.Process
		if c.Federator != nil {
			procs = append(procs, c.Federator.Proc)
		}
		if c.Gateway != nil {
			procs = append(procs, c.Gateway.Proc)
		}
		for _, p := range c.Pods() {
			procs = append(procs, p.W.Process())
			procs = append(procs, p.W.Sidecars()...)
		}
		for _, p := range procs {
			t.Logf("--- cluster %s: last lines of %s ---\n%s", c.Name(), p.LogPath(), p.Tail(40))
		}
	}
}

// Pods are the pods RunPod started in c, in order.
func (c *Cluster) Pods() []*Pod {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.pods)
}
