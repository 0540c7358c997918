package localcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// maxClusters keeps every address of the plan inside its octet and the
	// root-side veth names within IFNAMSIZ.
	maxClusters = 32
	// maxSlots is how many environments may run on one machine at once;
	// slot s uses the /30 at 169.254.(100+i).4s.
	maxSlots = 64
	// maxPods is the number of pod addresses per cluster.
	maxPods = 240
	// ipTimeout bounds every ip(8) invocation.
	ipTimeout = 10 * time.Second
	// netnsDir is where ip-netns(8) keeps named namespaces.
	netnsDir = "/run/netns"
)

// addressPlan holds the addresses of cluster index i in slot s; see the
// package documentation.
type addressPlan struct {
	root bool
	slot int
	idx  int
}

// nodeIP is the cluster's node address: br0 in root mode, a loopback
// address otherwise.
func (a addressPlan) nodeIP() netip.Addr {
	if a.root {
		return netip.AddrFrom4([4]byte{10, byte(10 + a.idx), 0, 1})
	}
	return netip.AddrFrom4([4]byte{127, byte(a.slot), byte(10 + a.idx), 1})
}

// hostAPIAddr is the address the test process dials for the API server.
func (a addressPlan) hostAPIAddr() netip.Addr {
	if a.root {
		return a.uplinkNode()
	}
	return a.nodeIP()
}

// uplinkRoot and uplinkNode are the two ends of the root↔node veth.
func (a addressPlan) uplinkRoot() netip.Addr {
	return netip.AddrFrom4([4]byte{169, 254, byte(100 + a.idx), byte(4*a.slot + 1)})
}

func (a addressPlan) uplinkNode() netip.Addr {
	return netip.AddrFrom4([4]byte{169, 254, byte(100 + a.idx), byte(4*a.slot + 2)})
}

// wanIP is the node's address on the inter-cluster network.
func (a addressPlan) wanIP() netip.Addr {
	if a.root {
		return netip.AddrFrom4([4]byte{10, 254, 0, byte(a.idx + 1)})
	}
	return a.nodeIP()
}

// podIP is the address of pod k (1-based).
func (a addressPlan) podIP(k int) netip.Addr {
	if a.root {
		return netip.AddrFrom4([4]byte{10, byte(10 + a.idx), 1, byte(k)})
	}
	return netip.AddrFrom4([4]byte{127, byte(a.slot), byte(10 + a.idx), byte(k + 10)})
}

// ipCmd runs ip(8) with args, bounded by ipTimeout, and returns its output.
func ipCmd(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, ipTimeout)
	defer cancel()
	return runBounded(ctx, "ip", args...)
}

// runBounded runs a short-lived helper command in its own process group,
// killed with its group when ctx ends.
func runBounded(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = childSysProcAttr()
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// ipBatch runs each command in order and stops at the first error.
func ipBatch(ctx context.Context, cmds ...[]string) error {
	for _, args := range cmds {
		if _, err := ipCmd(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

// netnsExecArgv prefixes argv so that it runs in network namespace ns; an
// empty ns means the current one.
func netnsExecArgv(ns string, argv []string) []string {
	if ns == "" {
		return argv
	}
	return append([]string{"ip", "netns", "exec", ns}, argv...)
}

// addNetNS creates a named network namespace with lo up.
func addNetNS(ctx context.Context, name string) error {
	if len(name) > 255 {
		return fmt.Errorf("network namespace name %q is longer than 255 bytes", name)
	}
	return ipBatch(ctx,
		[]string{"netns", "add", name},
		[]string{"-n", name, "link", "set", "lo", "up"},
	)
}

// setIPForward sets net.ipv4.ip_forward inside ns (never in the root netns)
// and reads it back.
func setIPForward(ctx context.Context, ns string, on bool) error {
	if ns == "" {
		return errors.New("refusing to change ip_forward of the root network namespace")
	}
	v := "0"
	if on {
		v = "1"
	}
	ctx, cancel := context.WithTimeout(ctx, ipTimeout)
	defer cancel()
	out, err := runBounded(ctx, "ip", "netns", "exec", ns, "/bin/sh", "-c",
		"echo "+v+" > /proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward")
	if err != nil {
		return err
	}
	if got := strings.TrimSpace(out); got != v {
		return fmt.Errorf("netns %s: ip_forward is %q after setting %s", ns, got, v)
	}
	return nil
}

// netnsPids lists the processes whose network namespace is ns.
func netnsPids(ctx context.Context, ns string) ([]int, error) {
	out, err := ipCmd(ctx, "netns", "pids", ns)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(out) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// deleteNetNS SIGKILLs whatever still runs in ns (a namespace this harness
// made, so everything in it is ours) and deletes it. Deleting a namespace
// destroys its veths and their peers.
func deleteNetNS(ctx context.Context, ns string) error {
	if _, err := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	pids, err := netnsPids(ctx, ns)
	if err != nil {
		errs = append(errs, err)
	}
	for _, pid := range pids {
		if pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill pid %d in netns %s: %w", pid, ns, err))
		}
	}
	if _, err := ipCmd(ctx, "netns", "del", ns); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// deleteLink deletes a root-netns link; a missing link is not an error.
// Deleting the root end of a veth directly is synchronous, unlike the
// namespace teardown that would otherwise remove it.
func deleteLink(ctx context.Context, name string) error {
	if _, err := net.InterfaceByName(name); err != nil {
		return nil
	}
	_, err := ipCmd(ctx, "link", "del", name)
	return err
}

// uplinkName is the root-side veth of cluster idx: unique across processes
// and environments, at most 15 bytes (IFNAMSIZ-1).
func uplinkName(pid, seq, idx int) (string, error) {
	name := fmt.Sprintf("ib%xr%xc%x", pid, seq, idx)
	if len(name) > 15 {
		return "", fmt.Errorf("interface name %q is longer than 15 bytes", name)
	}
	return name, nil
}

var (
	// runNetNSRe matches namespaces of any run: isth<pid>r<seq>-...
	runNetNSRe = regexp.MustCompile(`^isth([0-9]+)r[0-9]+-`)
	// uplinkRe matches root-side veths: ib<pid hex>r<seq hex>c<idx hex>.
	uplinkRe = regexp.MustCompile(`^ib([0-9a-f]+)r[0-9a-f]+c[0-9a-f]+$`)
	// workDirRe matches default work directories: isthmus-lc-isth<pid>r<seq>-*.
	workDirRe = regexp.MustCompile(`^isthmus-lc-isth([0-9]+)r[0-9]+-`)
)

// sweepLeftovers removes what runs whose process is gone left behind:
// network namespaces (after killing what runs in them), root-side veths and
// default work directories. Only names carrying a dead pid are touched; a
// live pid (even if reused) is left alone.
func sweepLeftovers(ctx context.Context, log *slog.Logger, root bool) {
	self := os.Getpid()
	dead := func(re *regexp.Regexp, name string, base int) bool {
		m := re.FindStringSubmatch(name)
		if m == nil {
			return false
		}
		pid, err := strconv.ParseInt(m[1], base, 32)
		return err == nil && int(pid) != self && !pidAlive(int(pid))
	}
	if root {
		entries, _ := os.ReadDir(netnsDir)
		for _, e := range entries {
			if !dead(runNetNSRe, e.Name(), 10) {
				continue
			}
			if err := deleteNetNS(ctx, e.Name()); err != nil {
				log.Warn("sweep: delete leftover netns", "netns", e.Name(), "err", err)
			} else {
				log.Info("sweep: deleted leftover netns of a dead run", "netns", e.Name())
			}
		}
		// Pods' resolv.conf files (WorkloadSpec.ResolvConf).
		entries, _ = os.ReadDir(etcNetNSDir)
		for _, e := range entries {
			if !dead(runNetNSRe, e.Name(), 10) {
				continue
			}
			dir := filepath.Join(etcNetNSDir, e.Name())
			if err := os.RemoveAll(dir); err != nil {
				log.Warn("sweep: remove leftover netns configuration", "dir", dir, "err", err)
			} else {
				log.Info("sweep: removed leftover netns configuration of a dead run", "dir", dir)
			}
		}
		ifaces, _ := net.Interfaces()
		for _, ifc := range ifaces {
			if !dead(uplinkRe, ifc.Name, 16) {
				continue
			}
			if err := deleteLink(ctx, ifc.Name); err != nil {
				log.Warn("sweep: delete leftover veth", "link", ifc.Name, "err", err)
			} else {
				log.Info("sweep: deleted leftover veth of a dead run", "link", ifc.Name)
			}
		}
	}
	entries, _ := os.ReadDir(os.TempDir())
	for _, e := range entries {
		if !e.IsDir() || !dead(workDirRe, e.Name(), 10) {
			continue
		}
		dir := filepath.Join(os.TempDir(), e.Name())
		if err := os.RemoveAll(dir); err != nil {
			log.Warn("sweep: remove leftover work dir", "dir", dir, "err", err)
		} else {
			log.Info("sweep: removed leftover work dir of a dead run", "dir", dir)
		}
	}
}

// slotLock is an environment's claim on an address slot: an exclusive flock
// on a file under the system temp dir, released by Close or by the kernel
// when the process dies.
type slotLock struct {
	slot int
	f    *os.File
}

func acquireSlot() (*slotLock, error) {
	dir := filepath.Join(os.TempDir(), "isthmus-localcluster-slots")
	if err := os.MkdirAll(dir, 0o777|os.ModeSticky); err != nil {
		return nil, fmt.Errorf("slot dir: %w", err)
	}
	_ = os.Chmod(dir, 0o777|os.ModeSticky) // shared by root and non-root runs; best effort
	for s := range maxSlots {
		path := filepath.Join(dir, fmt.Sprintf("slot-%02d.lock", s))
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o666)
		if err != nil {
			continue
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			continue
		}
		return &slotLock{slot: s, f: f}, nil
	}
	return nil, fmt.Errorf("all %d address slots under %s are in use: too many environments running at once", maxSlots, dir)
}

func (l *slotLock) release() {
	if l == nil || l.f == nil {
		return
	}
	_ = syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	l.f.Close()
	l.f = nil
}

// dialInNetNS dials from inside network namespace ns (the current one when
// ns is empty). The socket is created on an OS thread that has joined ns
// and keeps living there; the thread then returns to its own namespace. If
// it cannot, it stays locked and dies with its goroutine, so no other
// goroutine ever runs in the wrong namespace. (Since Go 1.10 the runtime
// never clones new threads from a locked one.)
func dialInNetNS(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var d net.Dialer
	if ns == "" {
		return d.DialContext(ctx, network, addr)
	}
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		conn, err := dialOnLockedThread(ns, func() (net.Conn, error) { return d.DialContext(ctx, network, addr) })
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.conn, r.err
}

func dialOnLockedThread(ns string, dial func() (net.Conn, error)) (net.Conn, error) {
	runtime.LockOSThread()
	own, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", syscall.Gettid()))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("dial in netns %s: %w", ns, err)
	}
	defer own.Close()
	target, err := os.Open(filepath.Join(netnsDir, ns))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("dial in netns %s: %w", ns, err)
	}
	defer target.Close()
	if err := setns(target); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("dial in netns %s: setns: %w", ns, err)
	}
	conn, err := dial()
	if rerr := setns(own); rerr != nil {
		// Leave the thread locked: it exits with this goroutine.
		if conn != nil {
			conn.Close()
		}
		return nil, fmt.Errorf("dial in netns %s: return to own netns: %w", ns, rerr)
	}
	runtime.UnlockOSThread()
	return conn, err
}

func setns(f *os.File) error {
	return unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
}
