package localcluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

const (
	// workloadContainer is the name of the Pod's only container.
	workloadContainer = "workload"
	// workloadImage is a placeholder: no kubelet pulls it.
	workloadImage = "isthmus.invalid/localcluster-workload:none"
	// AnnotationNetNS on a Pod names the network namespace its process runs
	// in (root mode).
	AnnotationNetNS = "localcluster.isthmus.dev/netns"
)

// WorkloadSpec describes a workload: a real process plus the Pod object a
// kubelet would have created for it.
type WorkloadSpec struct {
	// Name of the Pod. Required.
	Name string
	// Namespace of the Pod, created if missing. Default "default".
	Namespace string
	// ServiceAccount the Pod runs as, created if missing. Default "default".
	ServiceAccount string
	// Labels of the Pod (what Services select).
	Labels map[string]string
	// Node is the spec.nodeName; its zone is what EndpointSlices report.
	// Default: the cluster's default node.
	Node string
	// Command is the process to run. Required. It gets POD_IP, POD_NAME,
	// POD_NAMESPACE and NODE_NAME in its environment, and should serve on
	// POD_IP.
	Command []string
	// Env is added to the process's environment.
	Env []string
	// Ports are the container's ports (for named targetPorts).
	Ports []corev1.ContainerPort
	// ReadyPort, when set, acts as a tcpSocket readiness probe run once:
	// RunWorkload waits (at most 30 s) until POD_IP:ReadyPort accepts a
	// connection before it reports the Pod Running and Ready. Zero reports
	// it Ready as soon as the process has started, which may be before it
	// listens.
	ReadyPort int
	// ReadyHTTP, when set, is an HTTP GET readiness probe run after
	// ReadyPort: RunWorkload waits (at most 30 s) until
	// http://POD_IP:<Port><Path>, fetched from the pod's own namespace,
	// answers 200 before it reports the Pod Ready — a sidecar's readiness
	// endpoint, for example.
	ReadyHTTP *HTTPProbe

	// RunAs runs Command as this uid and gid (setpriv(1)); nil runs it as
	// the harness. It needs root.
	RunAs *Credential
	// Init are the pod's init containers: each runs to completion, in
	// order, in the pod's network namespace as root, bounded by a minute,
	// before Sidecars and Command start, with Command's environment (Env
	// and the POD_* variables). A failure fails RunWorkload, quoting the
	// step's output. `sidecar iptables` is one. Root mode only: in
	// loopback mode an init step would change the host.
	Init [][]string
	// Sidecars run beside Command in the pod's network namespace, started
	// after Init and before Command, with Command's environment added to
	// their own; Stop ends them after Command. Each Name must be a DNS
	// label (it is also a container of the Pod); its log is
	// workload-<namespace>-<pod>-<Name>.log.
	Sidecars []ProcessSpec
	// ResolvConf, when set, is the pod's /etc/resolv.conf, as a kubelet
	// writes the cluster DNS into a pod: it goes to
	// /etc/netns/<pod netns>/resolv.conf, which `ip netns exec` mounts over
	// /etc/resolv.conf for every process of the pod (Init, Sidecars,
	// Command, Workload.Command), and is removed with the pod. Root mode
	// only.
	ResolvConf string
}

// HTTPProbe is an HTTP GET readiness probe on the pod's IP.
type HTTPProbe struct {
	// Port to fetch from; required.
	Port int
	// Path to fetch; empty means "/".
	Path string
}

// readyPortTimeout bounds the wait for WorkloadSpec.ReadyPort, and that for
// ReadyHTTP.
const readyPortTimeout = 30 * time.Second

// initTimeout bounds each of WorkloadSpec.Init.
const initTimeout = time.Minute

// etcNetNSDir is where ip-netns(8) keeps per-namespace configuration files
// that `ip netns exec` mounts over /etc.
const etcNetNSDir = "/etc/netns"

// Workload is a running workload.
type Workload struct {
	// Name and Namespace of the Pod; Node is its spec.nodeName.
	Name, Namespace, Node string
	// IP is the Pod's IP, where the process should listen.
	IP netip.Addr
	// NetNS is the pod's network namespace; empty in loopback mode.
	NetNS string

	cluster    *Cluster
	podIdx     int
	proc       *Process
	sidecars   []*Process
	podCreated bool
	// etcDir is the pod's /etc/netns directory, once written.
	etcDir string

	stopOnce sync.Once
	stopErr  error
}

// RunWorkload starts spec.Command as a pod of this cluster: in its own
// network namespace on the cluster's pod network (root mode) or on a
// loopback address, with a Pod object whose status says Running and Ready
// at the process's IP.
func (c *Cluster) RunWorkload(ctx context.Context, spec WorkloadSpec) (*Workload, error) {
	if spec.Name == "" || len(spec.Command) == 0 {
		return nil, fmt.Errorf("cluster %q: workload needs Name and Command", c.name)
	}
	if err := validateWorkload(spec, c.plan.root); err != nil {
		return nil, fmt.Errorf("cluster %q: workload %s: %w", c.name, spec.Name, err)
	}
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	if spec.ServiceAccount == "" {
		spec.ServiceAccount = "default"
	}
	if spec.Node == "" {
		spec.Node = c.defaultNode
	}
	key := spec.Namespace + "/" + spec.Name
	idx, err := c.reservePod(key)
	if err != nil {
		return nil, err
	}
	w := &Workload{
		Name:      spec.Name,
		Namespace: spec.Namespace,
		Node:      spec.Node,
		IP:        c.plan.podIP(idx),
		cluster:   c,
		podIdx:    idx,
	}
	if err := w.start(ctx, spec); err != nil {
		_ = w.cleanup(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("cluster %q: workload %s: %w", c.name, key, err)
	}
	c.mu.Lock()
	c.workloads[key] = w
	c.mu.Unlock()
	c.log.Debug("workload running", "pod", key, "ip", w.IP, "pid", w.proc.Pid(), "netns", w.NetNS)
	return w, nil
}

var dnsLabelRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func validateWorkload(spec WorkloadSpec, root bool) error {
	var errs []error
	if spec.ReadyPort < 0 || spec.ReadyPort > 65535 {
		errs = append(errs, fmt.Errorf("ReadyPort %d out of range", spec.ReadyPort))
	}
	if p := spec.ReadyHTTP; p != nil && (p.Port <= 0 || p.Port > 65535 || (p.Path != "" && !strings.HasPrefix(p.Path, "/"))) {
		errs = append(errs, fmt.Errorf("ReadyHTTP: want a port of 1 to 65535 and an empty or absolute path, got %d %q", p.Port, p.Path))
	}
	if !root && (len(spec.Init) > 0 || spec.ResolvConf != "") {
		errs = append(errs, errors.New("init steps and a resolv.conf need a pod network namespace (root mode): in loopback mode they would change the host"))
	}
	for i, step := range spec.Init {
		if len(step) == 0 {
			errs = append(errs, fmt.Errorf("init step %d is empty", i))
		}
	}
	seen := map[string]bool{workloadContainer: true}
	for _, sc := range spec.Sidecars {
		if !dnsLabelRe.MatchString(sc.Name) || seen[sc.Name] {
			errs = append(errs, fmt.Errorf("sidecar name %q: want a DNS label, unique in the pod and not %q", sc.Name, workloadContainer))
		}
		seen[sc.Name] = true
		if len(sc.Command) == 0 {
			errs = append(errs, fmt.Errorf("sidecar %q has no command", sc.Name))
		}
	}
	return errors.Join(errs...)
}

// reservePod claims key and a free pod index, starting after the last one
// handed out so a stopped pod's address is not reused at once.
func (c *Cluster) reservePod(key string) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.workloads[key]; ok {
		return 0, fmt.Errorf("cluster %q: workload %s already runs", c.name, key)
	}
	for range maxPods {
		k := c.podNext
		c.podNext = c.podNext%maxPods + 1
		if !c.podUsed[k] {
			c.podUsed[k] = true
			c.workloads[key] = nil // reserved
			return k, nil
		}
	}
	return 0, fmt.Errorf("cluster %q: all %d pod addresses are in use", c.name, maxPods)
}

func (c *Cluster) releasePod(key string, idx int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.workloads, key)
	delete(c.podUsed, idx)
}

func (w *Workload) start(ctx context.Context, spec WorkloadSpec) error {
	c := w.cluster
	if err := c.ensureNamespace(ctx, spec.Namespace, spec.ServiceAccount); err != nil {
		return err
	}
	if c.plan.root {
		if err := w.setupNetwork(ctx, fmt.Sprintf("%s-%s-%s-%s", c.env.runID, c.name, spec.Namespace, spec.Name)); err != nil {
			return fmt.Errorf("network: %w", err)
		}
	}
	if spec.ResolvConf != "" {
		if err := w.writeResolvConf(spec.ResolvConf); err != nil {
			return err
		}
	}
	env := append(append([]string(nil), spec.Env...),
		"POD_IP="+w.IP.String(),
		"POD_NAME="+spec.Name,
		"POD_NAMESPACE="+spec.Namespace,
		"NODE_NAME="+spec.Node,
	)
	for i, step := range spec.Init {
		if err := w.runInit(ctx, step, env); err != nil {
			return fmt.Errorf("init step %d: %w", i, err)
		}
	}
	base := "workload-" + spec.Namespace + "-" + spec.Name
	for _, sc := range spec.Sidecars {
		sc.Name = base + "-" + sc.Name
		sc.Env = append(append([]string(nil), sc.Env...), env...)
		p, err := c.startUserProcess(w.NetNS, sc)
		if err != nil {
			return err
		}
		w.sidecars = append(w.sidecars, p)
	}
	var err error
	w.proc, err = c.startUserProcess(w.NetNS, ProcessSpec{
		Name:    base,
		Command: spec.Command,
		Env:     env,
		RunAs:   spec.RunAs,
	})
	if err != nil {
		return err
	}
	return w.createPod(ctx, spec)
}

// writeResolvConf writes the pod's resolv.conf where `ip netns exec` finds
// it.
func (w *Workload) writeResolvConf(content string) error {
	dir := filepath.Join(etcNetNSDir, w.NetNS)
	w.etcDir = dir // from here on, cleanup removes it
	var err error
	// /etc/netns itself goes when the last pod's directory does
	// (removeEtcNetNS), possibly in another environment between MkdirAll
	// and WriteFile: then try again.
	for range 3 {
		if err = os.MkdirAll(dir, 0o755); err == nil {
			err = os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(content), 0o644)
		}
		if !errors.Is(err, os.ErrNotExist) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("resolv.conf: %w", err)
	}
	return nil
}

// removeEtcNetNS removes a pod's /etc/netns directory, and /etc/netns
// when it is left empty, so nothing of the harness stays in /etc.
func removeEtcNetNS(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	_ = os.Remove(etcNetNSDir) // fails while other pods have theirs
	return nil
}

// runInit runs one init step in the pod's namespace as root, bounded.
func (w *Workload) runInit(ctx context.Context, step, env []string) error {
	ctx, cancel := context.WithTimeout(ctx, initTimeout)
	defer cancel()
	cmd := commandIn(ctx, w.NetNS, step[0], step[1:]...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(step, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// waitHTTP waits until the probe answers 200 from the pod's namespace.
func (w *Workload) waitHTTP(ctx context.Context, probe HTTPProbe) error {
	u := "http://" + netip.AddrPortFrom(w.IP, uint16(probe.Port)).String() + cmp.Or(probe.Path, "/")
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		Proxy: nil, DialContext: w.DialContext, DisableKeepAlives: true,
	}}
	defer client.CloseIdleConnections()
	var last string
	err := poll(ctx, readyPortTimeout, func(ctx context.Context) (bool, error) {
		for _, p := range w.processes() {
			if done, _ := p.Exited(); done {
				return false, p.describeExit()
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return false, err
		}
		resp, err := client.Do(req)
		if err != nil {
			last = err.Error()
			return false, nil
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		last = resp.Status
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		var tails strings.Builder
		for _, p := range w.sidecars {
			fmt.Fprintf(&tails, "\n--- last lines of %s ---\n%s", p.LogPath(), p.Tail(tailLines))
		}
		return fmt.Errorf("workload %s/%s: GET %s never answered 200 (last: %s): %w%s", w.Namespace, w.Name, u, last, err, tails.String())
	}
	return nil
}

// processes are the app's process and its sidecars'.
func (w *Workload) processes() []*Process {
	return append([]*Process{w.proc}, w.sidecars...)
}

// WaitTCP waits until the workload accepts TCP connections on its IP at
// port, dialling from its own network namespace, for at most 30 s or until
// ctx ends or the process exits.
func (w *Workload) WaitTCP(ctx context.Context, port int) error {
	addr := netip.AddrPortFrom(w.IP, uint16(port)).String()
	var last error
	err := poll(ctx, readyPortTimeout, func(ctx context.Context) (bool, error) {
		if done, _ := w.proc.Exited(); done {
			return false, w.proc.describeExit()
		}
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		conn, err := w.DialContext(dctx, "tcp", addr)
		if err != nil {
			last = err
			return false, nil
		}
		conn.Close()
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("workload %s/%s does not accept connections on %s (last: %v): %w\n--- last lines of %s ---\n%s",
			w.Namespace, w.Name, addr, last, err, w.proc.LogPath(), w.proc.Tail(tailLines))
	}
	return nil
}

// DialContext connects from the workload's network namespace (the host's in
// loopback mode): what the workload itself can reach.
func (w *Workload) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialInNetNS(ctx, w.NetNS, network, addr)
}

// setupNetwork makes the pod's namespace with eth0 on the node's bridge and
// a default route through the node (which does not forward).
func (w *Workload) setupNetwork(ctx context.Context, netns string) error {
	c := w.cluster
	if err := c.env.addNetNS(ctx, netns); err != nil {
		if !errors.Is(err, errNetNSTaken) {
			w.NetNS = netns // half made: cleanup deletes it
		}
		return err
	}
	w.NetNS = netns
	peer := "vp" + strconv.Itoa(w.podIdx)
	return ipBatch(ctx,
		[]string{"-n", w.NetNS, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", c.netns},
		[]string{"-n", c.netns, "link", "set", peer, "master", "br0"},
		[]string{"-n", c.netns, "link", "set", peer, "up"},
		[]string{"-n", w.NetNS, "addr", "add", netip.PrefixFrom(w.IP, 16).String(), "dev", "eth0"},
		[]string{"-n", w.NetNS, "link", "set", "eth0", "up"},
		[]string{"-n", w.NetNS, "route", "add", "default", "via", c.NodeIP().String()},
	)
}

func (w *Workload) createPod(ctx context.Context, spec WorkloadSpec) error {
	c := w.cluster
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:      spec.Name,
			Namespace: spec.Namespace,
			Labels:    spec.Labels,
		},
		Spec: corev1.PodSpec{
			NodeName:           spec.Node,
			ServiceAccountName: spec.ServiceAccount,
			Containers: []corev1.Container{{
				Name:    workloadContainer,
				Image:   workloadImage,
				Command: spec.Command,
				Ports:   spec.Ports,
			}},
		},
	}
	if w.NetNS != "" {
		pod.Annotations = map[string]string{AnnotationNetNS: w.NetNS}
	}
	for i, step := range spec.Init {
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{
			Name: "init-" + strconv.Itoa(i), Image: workloadImage, Command: step})
	}
	for _, sc := range spec.Sidecars {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: sc.Name, Image: workloadImage, Command: sc.Command})
	}
	created, err := c.client.CoreV1().Pods(spec.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create pod: %w", err)
	}
	w.podCreated = true
	if spec.ReadyPort != 0 {
		if err := w.WaitTCP(ctx, spec.ReadyPort); err != nil {
			return err
		}
	}
	if spec.ReadyHTTP != nil {
		if err := w.waitHTTP(ctx, *spec.ReadyHTTP); err != nil {
			return err
		}
	}
	now := metav1.Now()
	st := &created.Status
	st.Phase = corev1.PodRunning
	st.HostIP = c.NodeIP().String()
	st.HostIPs = []corev1.HostIP{{IP: st.HostIP}}
	st.PodIP = w.IP.String()
	st.PodIPs = []corev1.PodIP{{IP: st.PodIP}}
	st.StartTime = &now
	st.Conditions = nil
	for _, t := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	started := true
	st.ContainerStatuses = nil
	for i, p := range w.processes() {
		name := workloadContainer
		if i > 0 {
			name = spec.Sidecars[i-1].Name
		}
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name:        name,
			Image:       workloadImage,
			ImageID:     workloadImage,
			ContainerID: "localcluster://" + strconv.Itoa(p.Pid()),
			Ready:       true,
			Started:     &started,
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	if _, err := c.client.CoreV1().Pods(spec.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("pod status: %w", err)
	}
	return nil
}

// SetReady sets the Pod's Ready and ContainersReady conditions (and the
// container's ready flag), as a kubelet would after a readiness probe; the
// EndpointSlice controller then updates the Service's slices.
func (w *Workload) SetReady(ctx context.Context, ready bool) error {
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	pods := w.cluster.client.CoreV1().Pods(w.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		pod, err := pods.Get(ctx, w.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		for i := range pod.Status.Conditions {
			cond := &pod.Status.Conditions[i]
			if cond.Type != corev1.PodReady && cond.Type != corev1.ContainersReady {
				continue
			}
			if cond.Status != status {
				cond.Status = status
				cond.LastTransitionTime = now
			}
		}
		for i := range pod.Status.ContainerStatuses {
			pod.Status.ContainerStatuses[i].Ready = ready
		}
		_, err = pods.UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("cluster %q: set pod %s/%s ready=%t: %w", w.cluster.name, w.Namespace, w.Name, ready, err)
	}
	return nil
}

// Process is the workload's process.
func (w *Workload) Process() *Process { return w.proc }

// Sidecars are the processes of WorkloadSpec.Sidecars, in that order.
func (w *Workload) Sidecars() []*Process { return slices.Clone(w.sidecars) }

// LogPath is the file holding the process's stdout and stderr.
func (w *Workload) LogPath() string {
	if w.proc == nil {
		return filepath.Join(w.cluster.logDir, "workload-"+w.Namespace+"-"+w.Name+".log")
	}
	return w.proc.LogPath()
}

// Command is like exec.CommandContext for a short-lived command in the
// workload's network namespace (the host's in loopback mode), e.g. a client
// probing another pod. The caller waits for it; ctx ending kills its group.
func (w *Workload) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return commandIn(ctx, w.NetNS, name, args...)
}

// CommandAs is Command run as cred (setpriv(1)): what one of the pod's
// containers running as that user would do, e.g. an app whose traffic the
// pod's iptables capture. It needs root.
func (w *Workload) CommandAs(ctx context.Context, cred Credential, name string, args ...string) (*exec.Cmd, error) {
	argv, err := asUserArgv(&cred, append([]string{name}, args...))
	if err != nil {
		return nil, err
	}
	return commandArgv(ctx, netnsExecArgv(w.NetNS, argv)), nil
}

// Stop kills the process (SIGTERM, then SIGKILL after a bounded wait),
// deletes the Pod and removes the network namespace. Idempotent; after
// Env.Close it does nothing.
func (w *Workload) Stop(ctx context.Context) error {
	w.stopOnce.Do(func() { w.stopErr = w.cleanup(ctx) })
	return w.stopErr
}

func (w *Workload) cleanup(ctx context.Context) error {
	c := w.cluster
	defer c.releasePod(w.Namespace+"/"+w.Name, w.podIdx)
	if c.env.isClosed() {
		return nil
	}
	var errs []error
	// The app first, then its sidecars, the last started first.
	procs := w.processes()
	slices.Reverse(procs[1:])
	for _, p := range procs {
		if p == nil {
			continue
		}
		if err := p.Stop(stopGrace); err != nil {
			errs = append(errs, err)
		}
	}
	if w.podCreated {
		zero := int64(0)
		err := c.client.CoreV1().Pods(w.Namespace).Delete(ctx, w.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete pod: %w", err))
		}
	}
	if w.NetNS != "" {
		nctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := c.env.deleteNetNS(nctx, w.NetNS); err != nil {
			errs = append(errs, err)
		}
	}
	if w.etcDir != "" {
		if err := removeEtcNetNS(w.etcDir); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cluster %q: stop workload %s/%s: %w", c.name, w.Namespace, w.Name, err)
	}
	return nil
}
