package localcluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// KubeVersion is the version of kube-apiserver and kube-controller-manager
// that hack/kube-binaries.sh builds.
const KubeVersion = "v1.36.3"

// Sentinel errors.
var (
	// ErrMissingBinary: etcd, kube-apiserver, kube-controller-manager or
	// ip(8) is not installed. Not worth retrying.
	ErrMissingBinary = errors.New("localcluster: missing binary")
	// ErrClosed: the environment was closed.
	ErrClosed = errors.New("localcluster: environment closed")

	// errNetNSTaken: another part of the environment uses the name (two
	// workloads whose cluster, namespace and pod names join the same way).
	errNetNSTaken = errors.New("already used in this environment")
)

// Options configures Start. The zero value starts clusters "a" and "b" in a
// new temporary directory, isolated by network namespaces when running as
// root.
type Options struct {
	// Clusters to start, in address order (see the package documentation).
	// Names must be unique. Empty means two clusters, "a" and "b".
	Clusters []ClusterOptions
	// WorkDir is where the environment keeps its files (a subdirectory
	// named after the run id is made in it and removed by Close). Empty
	// means a new directory under os.TempDir().
	WorkDir string
	// KeepWorkDir leaves the work directory (logs, kubeconfigs) after Close.
	KeepWorkDir bool
	// Logger receives lifecycle messages. Nil discards them.
	Logger *slog.Logger
	// ForceLoopback uses loopback mode even when running as root.
	ForceLoopback bool
	// KubeBinDir holds kube-apiserver and kube-controller-manager. Empty
	// means $ISTHMUS_KUBE_BIN_DIR, else DefaultKubeBinDir().
	KubeBinDir string
}

// Env is a running set of clusters. Close it.
type Env struct {
	runID   string
	seq     int
	root    bool
	slot    *slotLock
	workDir string
	// removeDir is what Close removes: workDir itself.
	removeDir string
	keepDir   bool
	wanNS     string
	log       *slog.Logger
	bins      binaries
	clusters  []*Cluster
	startup   time.Duration

	// mu guards the fields below.
	mu     sync.Mutex
	procs  []trackedProcess
	netns  []string // in creation order
	links  []string // root-side veths
	closed bool

	closeOnce sync.Once
	closeErr  error
}

type trackedProcess struct {
	p      *Process
	isEtcd bool
}

// runSeq numbers environments started by this process.
var runSeq atomic.Int32

// loopbackNotice is printed to stderr once per process.
var loopbackNotice sync.Once

const loopbackWarning = "localcluster: not running as root: clusters share the host network, isolation is NOT enforced"

// Start starts the clusters of opts in parallel and returns once every API
// server is ready and its controllers run. On error nothing is left behind.
// ctx bounds start-up only; the clusters run until Close.
func Start(ctx context.Context, opts Options) (*Env, error) {
	t0 := time.Now()
	if len(opts.Clusters) == 0 {
		opts.Clusters = []ClusterOptions{{Name: "a"}, {Name: "b"}}
	}
	if err := validateOptions(opts); err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "localcluster")
	root := os.Geteuid() == 0 && !opts.ForceLoopback
	bins, err := findBinaries(opts.KubeBinDir, root)
	if err != nil {
		return nil, err
	}
	if !root {
		log.Warn(loopbackWarning)
		loopbackNotice.Do(func() { fmt.Fprintln(os.Stderr, loopbackWarning) })
	}
	sweepLeftovers(ctx, log, root)

	seq := int(runSeq.Add(1))
	e := &Env{
		runID:   fmt.Sprintf("isth%dr%d", os.Getpid(), seq),
		seq:     seq,
		root:    root,
		keepDir: opts.KeepWorkDir,
		bins:    bins,
	}
	e.log = log.With("run", e.runID)
	if e.slot, err = acquireSlot(); err != nil {
		return nil, err
	}
	if opts.WorkDir == "" {
		e.workDir, err = os.MkdirTemp("", "isthmus-lc-"+e.runID+"-")
		if err == nil {
			// Others may pass through but not list it: pod processes that
			// run as another user (WorkloadSpec.RunAs) read files made for
			// them under it; keys and kubeconfigs keep their own modes.
			err = os.Chmod(e.workDir, 0o711)
		}
	} else {
		e.workDir = filepath.Join(opts.WorkDir, e.runID)
		err = os.MkdirAll(e.workDir, 0o755)
	}
	if err != nil {
		e.slot.release()
		return nil, fmt.Errorf("work dir: %w", err)
	}
	e.removeDir = e.workDir

	if err := e.start(ctx, opts.Clusters); err != nil {
		if cerr := e.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up after failed start: %w", cerr))
		}
		return nil, err
	}
	e.startup = time.Since(t0)
	if e.keepDir {
		e.log.Info("the work directory will be kept", "workdir", e.workDir)
	}
	e.log.Info("environment ready", "clusters", len(e.clusters), "isolated", e.root, "slot", e.slot.slot,
		"workdir", e.workDir, "startup", e.startup.Round(time.Millisecond))
	return e, nil
}

func (e *Env) start(ctx context.Context, clusters []ClusterOptions) error {
	if e.root {
		if fwd, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); err == nil && strings.TrimSpace(string(fwd)) != "0" {
			// Still isolated: no node namespace has a route to another
			// cluster's uplink, and node namespaces do not forward.
			e.log.Warn("the root network namespace forwards IPv4 (net.ipv4.ip_forward=1); the harness does not change it")
		}
		e.wanNS = e.runID + "-wan"
		if err := e.addNetNS(ctx, e.wanNS); err != nil {
			return fmt.Errorf("wan: %w", err)
		}
		if err := ipBatch(ctx,
			[]string{"-n", e.wanNS, "link", "add", "br0", "type", "bridge"},
			[]string{"-n", e.wanNS, "link", "set", "br0", "up"},
		); err != nil {
			return fmt.Errorf("wan: %w", err)
		}
	}
	for i, o := range clusters {
		c, err := newCluster(e, i, o)
		if err != nil {
			return err
		}
		e.clusters = append(e.clusters, c)
	}
	// In parallel; the first failure cancels the others, whose
	// cancellation errors are then noise.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(e.clusters))
	for i, c := range e.clusters {
		wg.Go(func() {
			if errs[i] = c.start(sctx); errs[i] != nil {
				cancel()
			}
		})
	}
	wg.Wait()
	if ctx.Err() == nil && slices.ContainsFunc(errs, func(err error) bool { return err != nil && !errors.Is(err, context.Canceled) }) {
		errs = slices.DeleteFunc(errs, func(err error) bool { return errors.Is(err, context.Canceled) })
	}
	return errors.Join(errs...)
}

func validateOptions(opts Options) error {
	var errs []error
	if len(opts.Clusters) > maxClusters {
		errs = append(errs, fmt.Errorf("%d clusters: at most %d", len(opts.Clusters), maxClusters))
	}
	seen := map[string]bool{}
	for _, c := range opts.Clusters {
		switch {
		case !clusterNameRe.MatchString(c.Name):
			errs = append(errs, fmt.Errorf("cluster name %q: want 1-20 lowercase letters, digits or '-', starting and ending with a letter or digit", c.Name))
		case c.Name == "wan":
			errs = append(errs, errors.New(`cluster name "wan" is reserved for the inter-cluster network`))
		case seen[c.Name]:
			errs = append(errs, fmt.Errorf("cluster name %q used twice", c.Name))
		}
		seen[c.Name] = true
	}
	return errors.Join(errs...)
}

// binaries are the absolute paths of the programs the harness runs.
type binaries struct {
	etcd, apiserver, kcm string
}

// DefaultKubeBinDir is where hack/kube-binaries.sh puts kube-apiserver and
// kube-controller-manager: ${ISTHMUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/isthmus}/kube-<KubeVersion>.
func DefaultKubeBinDir() string {
	cache := os.Getenv("ISTHMUS_CACHE")
	if cache == "" {
		base := os.Getenv("XDG_CACHE_HOME")
		if base == "" {
			home, _ := os.UserHomeDir()
			base = filepath.Join(home, ".cache")
		}
		cache = filepath.Join(base, "isthmus")
	}
	return filepath.Join(cache, "kube-"+KubeVersion)
}

func findBinaries(dir string, root bool) (binaries, error) {
	if dir == "" {
		dir = os.Getenv("ISTHMUS_KUBE_BIN_DIR")
	}
	if dir == "" {
		dir = DefaultKubeBinDir()
	}
	var b binaries
	var errs []error
	for _, x := range []struct {
		name string
		dst  *string
	}{{"kube-apiserver", &b.apiserver}, {"kube-controller-manager", &b.kcm}} {
		path := filepath.Join(dir, x.name)
		if st, err := os.Stat(path); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			errs = append(errs, fmt.Errorf("%w: %s not found in %s: run `make kube-binaries`", ErrMissingBinary, x.name, dir))
			continue
		}
		*x.dst = path
	}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		errs = append(errs, fmt.Errorf("%w: etcd not found: run `make tools` or apt-get install etcd-server", ErrMissingBinary))
	}
	b.etcd = etcd
	if root {
		if _, err := exec.LookPath("ip"); err != nil {
			errs = append(errs, fmt.Errorf("%w: ip not found: apt-get install iproute2", ErrMissingBinary))
		}
	}
	return b, errors.Join(errs...)
}

// RunID is the environment's run id (isth<pid>r<seq>); every network
// namespace it makes starts with it.
func (e *Env) RunID() string { return e.runID }

// WorkDir holds the clusters' files: one directory per cluster with pki/,
// kubeconfig/, logs/ and etcd/.
func (e *Env) WorkDir() string { return e.workDir }

// Isolated reports root mode: each cluster in its own network namespaces.
// When false (loopback mode) every process shares the host network, and
// EndpointSlices cannot carry the workloads' loopback addresses.
func (e *Env) Isolated() bool { return e.root }

// WANNetNS is the namespace of the inter-cluster network's bridge; empty in
// loopback mode.
func (e *Env) WANNetNS() string { return e.wanNS }

// StartupDuration is how long Start took.
func (e *Env) StartupDuration() time.Duration { return e.startup }

// Clusters returns the clusters in Options order.
func (e *Env) Clusters() []*Cluster { return slices.Clone(e.clusters) }

// Cluster returns the cluster called name, or nil.
func (e *Env) Cluster(name string) *Cluster {
	for _, c := range e.clusters {
		if c.name == name {
			return c
		}
	}
	return nil
}

func (e *Env) isClosed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closed
}

// track records p for Close. If the environment is already closed, it kills
// p and returns ErrClosed.
func (e *Env) track(p *Process, isEtcd bool) error {
	e.mu.Lock()
	if !e.closed {
		e.procs = append(e.procs, trackedProcess{p: p, isEtcd: isEtcd})
		e.mu.Unlock()
		return nil
	}
	e.mu.Unlock()
	_ = p.Kill()
	return ErrClosed
}

// onExit returns a hook that logs a process's exit unless it was stopped or
// the environment is closing.
func (e *Env) onExit(log *slog.Logger, controlPlane bool) func(*Process) {
	return func(p *Process) {
		if e.isClosed() || p.stopping.Load() {
			return
		}
		_, err := p.Exited()
		level := slog.LevelInfo
		if controlPlane {
			level = slog.LevelWarn
		}
		log.Log(context.Background(), level, "process exited", "process", p.Name(), "pid", p.Pid(), "err", err, "log", p.LogPath())
	}
}

// addNetNS creates a network namespace and records it for Close.
func (e *Env) addNetNS(ctx context.Context, name string) error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return ErrClosed
	}
	if slices.Contains(e.netns, name) {
		e.mu.Unlock()
		return fmt.Errorf("network namespace %q: %w", name, errNetNSTaken)
	}
	// Recorded before it exists, so a half-made namespace is deleted too.
	e.netns = append(e.netns, name)
	e.mu.Unlock()
	return addNetNS(ctx, name)
}

// deleteNetNS deletes a namespace made by addNetNS.
func (e *Env) deleteNetNS(ctx context.Context, name string) error {
	err := deleteNetNS(ctx, name)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.netns = slices.DeleteFunc(e.netns, func(n string) bool { return n == name })
	return err
}

func (e *Env) registerLink(name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.links = append(e.links, name)
}

// closeTimeout bounds the network clean-up helpers.
const closeTimeout = 30 * time.Second

// Close stops every process (SIGTERM, then SIGKILL after a bounded wait):
// workloads, user processes, kube-controller-manager and kube-apiserver
// first, etcd last. It then deletes the network namespaces and veths it
// made, releases the address slot and removes the work directory. It is
// idempotent and safe for concurrent use; later calls return the first
// call's result.
func (e *Env) Close() error {
	e.closeOnce.Do(func() { e.closeErr = e.close() })
	return e.closeErr
}

func (e *Env) close() error {
	t0 := time.Now()
	e.mu.Lock()
	e.closed = true
	procs := slices.Clone(e.procs)
	netns := slices.Clone(e.netns)
	links := slices.Clone(e.links)
	e.mu.Unlock()

	var errs []error
	// Everything but etcd, then etcd: kube-apiserver hangs on SIGTERM once
	// etcd is gone.
	for _, etcdPhase := range []bool{false, true} {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, tp := range procs {
			if tp.isEtcd != etcdPhase {
				continue
			}
			wg.Go(func() {
				t0 := time.Now()
				err := tp.p.Stop(stopGrace)
				e.log.Debug("stopped", "process", tp.p.Name(), "pid", tp.p.Pid(), "took", time.Since(t0).Round(time.Millisecond), "err", err)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}

	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	for _, l := range links {
		if err := deleteLink(ctx, l); err != nil {
			errs = append(errs, err)
		}
	}
	// Pods, then nodes, then the WAN: the reverse of creation.
	for _, ns := range slices.Backward(netns) {
		if err := deleteNetNS(ctx, ns); err != nil {
			errs = append(errs, err)
		}
		// A pod's resolv.conf (WorkloadSpec.ResolvConf).
		if err := removeEtcNetNS(filepath.Join(etcNetNSDir, ns)); err != nil {
			errs = append(errs, err)
		}
	}
	e.mu.Lock()
	e.netns = nil
	e.links = nil
	e.mu.Unlock()

	e.slot.release()
	if !e.keepDir && e.removeDir != "" {
		if err := os.RemoveAll(e.removeDir); err != nil {
			errs = append(errs, fmt.Errorf("remove work dir: %w", err))
		}
	}
	err := errors.Join(errs...)
	e.log.Info("environment closed", "took", time.Since(t0).Round(time.Millisecond), "err", err)
	return err
}

// pids lists every process the environment started (for tests).
func (e *Env) pids() []int {
	e.mu.Lock()
	defer e.mu.Unlock()
	var pids []int
	for _, tp := range e.procs {
		pids = append(pids, tp.p.Pid())
	}
	return pids
}

// StartT starts clusters named names ("a" and "b" when none are given) for a
// test, logging to t.Logf and closing them in t.Cleanup. It fails the test
// (it does not skip) when binaries are missing.
func StartT(t testing.TB, names ...string) *Env {
	t.Helper()
	var opts Options
	for _, n := range names {
		opts.Clusters = append(opts.Clusters, ClusterOptions{Name: n})
	}
	return StartTWith(t, opts)
}

// StartTWith is StartT with full Options; a nil Logger logs to t.Logf.
// Setting ISTHMUS_LOCALCLUSTER_KEEP=1 in the environment keeps the work
// directory (logs, kubeconfigs) for debugging.
func StartTWith(t testing.TB, opts Options) *Env {
	t.Helper()
	if os.Getenv("ISTHMUS_LOCALCLUSTER_KEEP") != "" {
		opts.KeepWorkDir = true
	}
	var tw *testLogWriter
	if opts.Logger == nil {
		tw = &testLogWriter{t: t}
		opts.Logger = slog.New(slog.NewTextHandler(tw, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	e, err := Start(t.Context(), opts)
	if err != nil {
		if tw != nil {
			tw.stop()
		}
		t.Fatalf("localcluster: start: %v", err)
	}
	t.Logf("localcluster: %d clusters up in %s (isolated=%t, run %s)", len(e.clusters), e.startup.Round(time.Millisecond), e.root, e.runID)
	t.Cleanup(func() {
		if t.Failed() && !e.isClosed() {
			e.logTails(t)
		}
		if err := e.Close(); err != nil {
			t.Errorf("localcluster: close: %v", err)
		}
		if tw != nil {
			tw.stop()
		}
	})
	return e
}

// logTails logs the end of every control-plane log, to explain a failure
// before Close removes the logs.
func (e *Env) logTails(t testing.TB) {
	for _, c := range e.clusters {
		for _, p := range []*Process{c.etcd, c.apiserver, c.kcm} {
			if p != nil {
				t.Logf("--- cluster %s: last lines of %s ---\n%s", c.name, p.LogPath(), p.Tail(tailLines))
			}
		}
	}
}

// testLogWriter sends slog output to t.Logf until stop; afterwards (a
// process exiting after the test) it drops it, as t.Logf would panic.
type testLogWriter struct {
	t testing.TB
	// mu guards stopped.
	mu      sync.Mutex
	stopped bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.stopped {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testLogWriter) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
}
