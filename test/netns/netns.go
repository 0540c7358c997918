package netns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// netnsDir is where ip-netns(8) keeps named namespaces.
	netnsDir = "/run/netns"
	// namePrefix starts every namespace this package makes; see the
	// package documentation.
	namePrefix = "isthnet"
	// maxLabel bounds the caller's part of a namespace name.
	maxLabel = 40
	// cmdTimeout bounds every ip(8) invocation of the harness.
	cmdTimeout = 10 * time.Second
	// cleanupTimeout bounds the whole clean-up of one namespace.
	cleanupTimeout = 30 * time.Second
)

// seq numbers the namespaces of this process.
var seq atomic.Int64

// NS is a named network namespace the harness made for one test. Its
// methods are safe for concurrent use.
type NS struct {
	name string
	path string

	// mu guards the fields below.
	mu sync.Mutex
	// links counts the Networks the namespace is plugged into (eth0, eth1 …).
	links int
	// addr and addr6 are eth0's addresses, once it exists.
	addr, addr6 netip.Addr
	// procs are the processes started with Start, killed at clean-up.
	procs []*os.Process
}

// New makes an empty network namespace (only lo, up) for tb and deletes it
// in tb.Cleanup. label (letters, digits, '-', '_' and '.'; empty means
// "ns") ends its name, to tell namespaces apart in `ip netns list`. It
// skips tb when not running as root; see RequireRoot.
func New(tb testing.TB, label string) *NS {
	tb.Helper()
	RequireRoot(tb)
	sweepOnce.Do(func() { sweepLeftovers(tb.Logf) })
	ns, err := newNS(label)
	if ns != nil {
		// Registered even when creation failed, so a half-made one goes.
		tb.Cleanup(func() {
			if err := ns.destroy(); err != nil {
				tb.Errorf("netns: clean up %s: %v", ns.name, err)
			}
		})
	}
	if err != nil {
		tb.Fatalf("netns: %v", err)
	}
	return ns
}

// Open is New for a program (a benchmark) rather than a test: it returns
// an error where New skips or fails, and the caller must Close the
// namespace, also when Open failed after making it (ns is then non-nil).
func Open(label string) (ns *NS, err error) {
	if ok, reason := Available(); !ok {
		return nil, fmt.Errorf("netns: %s", reason)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("netns: ip(8) is missing (%w): install iproute2", err)
	}
	sweepOnce.Do(func() { sweepLeftovers(func(string, ...any) {}) })
	return newNS(label)
}

// Close kills what still runs in the namespace and deletes it: what
// New's clean-up does, for a namespace from Open. Closing twice is
// harmless.
func (ns *NS) Close() error {
	if ns == nil {
		return nil
	}
	if err := ns.destroy(); err != nil {
		return fmt.Errorf("netns: clean up %s: %w", ns.name, err)
	}
	return nil
}

var labelRe = regexp.MustCompile(`^[A-Za-z0-9._-]*$`)

// newNS makes the namespace. Once it returns a non-nil NS, the caller
// must destroy it, whatever the error.
func newNS(label string) (*NS, error) {
	if !labelRe.MatchString(label) {
		return nil, fmt.Errorf("label %q: want letters, digits, '.', '_' or '-'", label)
	}
	if label == "" {
		label = "ns"
	}
	if len(label) > maxLabel {
		label = label[:maxLabel]
	}
	name := fmt.Sprintf("%s%ds%d-%s", namePrefix, os.Getpid(), seq.Add(1), label)
	ns := &NS{name: name, path: filepath.Join(netnsDir, name)}
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	if err := ipBatch(ctx,
		[]string{"netns", "add", name},
		[]string{"-n", name, "link", "set", "lo", "up"},
	); err != nil {
		return ns, err
	}
	return ns, nil
}

// Name is the namespace's name, as `ip netns` knows it.
func (ns *NS) Name() string { return ns.name }

// Path is the namespace's file, for setns(2) or nsenter --net=.
func (ns *NS) Path() string { return ns.path }

// Addr is the IPv4 address of eth0: the address on the first Network the
// namespace joined. It is the zero Addr before that.
func (ns *NS) Addr() netip.Addr {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	return ns.addr
}

// Addr6 is the IPv6 address of eth0 when its Network has IPv6, else the
// zero Addr.
func (ns *NS) Addr6() netip.Addr {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	return ns.addr6
}

// Do runs fn on an OS thread that has joined the namespace, and returns
// fn's error. Sockets fn creates belong to the namespace for their whole
// life, wherever they are used afterwards; processes fn starts run in it.
// Goroutines fn starts do not run in it, and fn must not call t.FailNow
// (require.*): it runs on a goroutine of its own — return an error
// instead.
//
// The thread returns to the caller's namespace before it is reused. If it
// cannot, it stays locked to its goroutine and ends with it, so no other
// goroutine ever runs in the wrong namespace.
func (ns *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go doInNetNS(ns.path, fn, errc)
	return <-errc
}

// doInNetNS is Do's goroutine: it locks its thread, joins the namespace at
// path, runs fn and returns to the thread's own namespace.
func doInNetNS(path string, fn func() error, errc chan<- error) {
	runtime.LockOSThread()
	own, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		errc <- fmt.Errorf("netns: open own namespace: %w", err)
		return
	}
	defer own.Close()
	target, err := os.Open(path)
	if err != nil {
		runtime.UnlockOSThread()
		errc <- fmt.Errorf("netns: open %s: %w", path, err)
		return
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		errc <- fmt.Errorf("netns: setns %s: %w", path, err)
		return
	}
	fnErr := fn()
	if err := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread stays locked: the runtime ends it with this goroutine.
		errc <- errors.Join(fnErr, fmt.Errorf("netns: return from %s to the own namespace: %w", path, err))
		return
	}
	runtime.UnlockOSThread()
	errc <- fnErr
}

// Listen is net.Listen inside the namespace.
func (ns *NS) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// ListenPacket is net.ListenPacket inside the namespace.
func (ns *NS) ListenPacket(network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := ns.Do(func() error {
		var err error
		pc, err = net.ListenPacket(network, address)
		return err
	})
	return pc, err
}

// DialContext connects from inside the namespace. The connection attempt
// itself runs inside Do, bounded by ctx.
func (ns *NS) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Start starts cmd inside the namespace: it is forked from a thread that
// joined it, so cmd.SysProcAttr is honoured as given (Credential to run as
// another user, for example). The child is put in its own process group
// (unless cmd asks for Setsid) and gets SIGKILL if the harness dies. The
// caller waits for it (cmd.Wait); if it still runs when the namespace is
// cleaned up, it is killed then.
func (ns *NS) Start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	if !cmd.SysProcAttr.Setsid {
		cmd.SysProcAttr.Setpgid = true
	}
	if cmd.SysProcAttr.Pdeathsig == 0 {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	if err := ns.Do(cmd.Start); err != nil {
		return fmt.Errorf("netns %s: start %s: %w", ns.name, cmd.Path, err)
	}
	ns.mu.Lock()
	ns.procs = append(ns.procs, cmd.Process)
	ns.mu.Unlock()
	return nil
}

// Run runs a short-lived command inside the namespace, bounded by ctx, and
// returns its combined output. A failure's error quotes the output.
func (ns *NS) Run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.WaitDelay = 5 * time.Second
	if err := ns.Start(cmd); err != nil {
		return "", err
	}
	if err := cmd.Wait(); err != nil {
		return out.String(), fmt.Errorf("netns %s: %s %s: %w: %s", ns.name, name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// AddAddr adds address p to interface dev of the namespace (lo for
// addresses that stand for hosts beyond a Network's router). IPv6
// addresses skip duplicate address detection, so they work at once.
func (ns *NS) AddAddr(ctx context.Context, dev string, p netip.Prefix) error {
	args := []string{"-n", ns.name, "addr", "add", p.String(), "dev", dev}
	if p.Addr().Is6() {
		args = append(args, "nodad")
	}
	_, err := ipCmd(ctx, args...)
	return err
}

// plug reserves the next interface index of the namespace (eth<i>).
func (ns *NS) plug() int {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	i := ns.links
	ns.links++
	return i
}

func (ns *NS) setAddrs(a, a6 netip.Addr) {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	ns.addr, ns.addr6 = a, a6
}

// destroy kills what still runs in the namespace and deletes it. A
// namespace that does not exist (creation failed early) is not an error.
func (ns *NS) destroy() error {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	if _, err := os.Stat(ns.path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	ns.mu.Lock()
	procs := ns.procs
	ns.procs = nil
	ns.mu.Unlock()
	for _, p := range procs {
		// os.Process signals through a pidfd: never a reused pid.
		if err := p.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			errs = append(errs, fmt.Errorf("kill pid %d: %w", p.Pid, err))
		}
	}
	if err := killMembers(ns.path); err != nil {
		errs = append(errs, err)
	}
	if _, err := ipCmd(ctx, "netns", "del", ns.name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ipCmd runs ip(8) with args, bounded by ctx and cmdTimeout, and returns
// its output.
func ipCmd(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// ipBatch runs each ip(8) command in order and stops at the first error.
func ipBatch(ctx context.Context, cmds ...[]string) error {
	for _, args := range cmds {
		if _, err := ipCmd(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

// Executable returns a copy of the running test binary that any user may
// run, removed in tb.Cleanup: go test builds the binary in a directory
// only its owner can enter, so a helper process started with another
// Credential could not exec it.
func Executable(tb testing.TB) string {
	tb.Helper()
	path, err := copyExecutable()
	if err != nil {
		tb.Fatalf("netns: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(filepath.Dir(path)) })
	return path
}

func copyExecutable() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "isthmus-netns-exe-")
	if err != nil {
		return "", err
	}
	dst, err := CopyExecutable(self, dir)
	if err = errors.Join(err, os.Chmod(dir, 0o755)); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("copy test binary: %w", err)
	}
	return dst, nil
}

// CopyExecutable copies the program at src into dir, executable by
// anyone, and returns the copy's path.
//
// No process may start while the copy is open for writing: a child
// forked then would hold the descriptor until its own exec, and running
// the copy in that window fails with ETXTBSY ("text file busy"; Go issue
// 22315). Parallel tests start ip and nsenter all the time, so the copy
// holds syscall.ForkLock, which every fork in this process waits for.
func CopyExecutable(src, dir string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	dst := filepath.Join(dir, filepath.Base(src))
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return "", err
	}
	_, err = io.Copy(out, in)
	if err = errors.Join(err, out.Close()); err != nil {
		return "", err
	}
	return dst, nil
}
