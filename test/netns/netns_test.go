package netns

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ioTimeout bounds every network exchange in these tests.
const ioTimeout = 10 * time.Second

func TestNetwork(t *testing.T) {
	t.Parallel()
	n := NewNetwork(t, NetworkOptions{Label: "basic", IPv6: true})
	a := n.NewNS(t, "a")
	b := n.NewNS(t, "b")

	require.Equal(t, netip.MustParseAddr("10.200.0.1"), n.Gateway())
	require.Equal(t, netip.MustParseAddr("10.200.0.2"), a.Addr())
	require.Equal(t, netip.MustParseAddr("10.200.0.3"), b.Addr())
	require.Equal(t, netip.MustParseAddr("fd00:200::3"), b.Addr6())

	routes, err := a.Run(t.Context(), "ip", "route", "show", "default")
	require.NoError(t, err)
	require.Contains(t, routes, "default via 10.200.0.1 dev eth0")
	routes6, err := a.Run(t.Context(), "ip", "-6", "route", "show", "default")
	require.NoError(t, err)
	require.Contains(t, routes6, "default via fd00:200::1 dev eth0")

	ln, err := b.Listen("tcp", ":8080")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go echoServer(ln)

	for _, addr := range []netip.Addr{b.Addr(), b.Addr6()} {
		dst := netip.AddrPortFrom(addr, 8080).String()
		t.Run("a to b at "+dst, func(t *testing.T) {
			require.Equal(t, "via "+dst, echo(t, a, dst))
		})
	}

	t.Run("through the router to addresses on its lo", func(t *testing.T) {
		require.NoError(t, n.Router().AddAddr(t.Context(), "lo", netip.MustParsePrefix("10.99.0.1/32")))
		rl, err := n.Router().Listen("tcp", "10.99.0.1:80")
		require.NoError(t, err)
		t.Cleanup(func() { rl.Close() })
		go echoServer(rl)
		require.Equal(t, "via 10.99.0.1:80", echo(t, a, "10.99.0.1:80"))

		require.NoError(t, n.Router().AddAddr(t.Context(), "lo", netip.MustParsePrefix("fd00:99::1/128")))
		rl6, err := n.Router().Listen("tcp", "[fd00:99::1]:80")
		require.NoError(t, err, "an IPv6 address is usable at once")
		t.Cleanup(func() { rl6.Close() })
		go echoServer(rl6)
		require.Equal(t, "via [fd00:99::1]:80", echo(t, a, "[fd00:99::1]:80"))
	})
}

// echoServer answers every connection with "via <local address>".
func echoServer(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = fmt.Fprintf(c, "via %s\n", c.LocalAddr())
		c.Close()
	}
}

// echo dials addr from ns and returns the server's line.
func echo(t testing.TB, ns *NS, addr string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), ioTimeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(ioTimeout)))
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	return strings.TrimSpace(line)
}

// TestDoRestoresNamespace is not parallel: it checks that every thread of
// the process is back home, which another test's Do would contradict.
func TestDoRestoresNamespace(t *testing.T) {
	ns := New(t, "do")
	want := nsIno(t, ns.Path())
	own := nsIno(t, "/proc/self/ns/net")
	require.NotEqual(t, own, want)

	for range 20 {
		var inside uint64
		require.NoError(t, ns.Do(func() error {
			var err error
			inside, err = inoOf("/proc/thread-self/ns/net")
			return err
		}))
		require.Equal(t, want, inside)
	}
	// Every thread of this process is back in the namespace it started in.
	tasks, err := os.ReadDir("/proc/self/task")
	require.NoError(t, err)
	for _, task := range tasks {
		ino, err := inoOf(filepath.Join("/proc/self/task", task.Name(), "ns/net"))
		if errors.Is(err, os.ErrNotExist) {
			continue // the thread just ended
		}
		require.NoError(t, err)
		require.Equal(t, own, ino, "thread %s is in another network namespace", task.Name())
	}

	wantErr := errors.New("from fn")
	require.ErrorIs(t, ns.Do(func() error { return wantErr }), wantErr)
}

func nsIno(t testing.TB, path string) uint64 {
	t.Helper()
	ino, err := inoOf(path)
	require.NoError(t, err)
	return ino
}

func inoOf(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return st.Ino, nil
}

func TestStartAsAnotherUser(t *testing.T) {
	t.Parallel()
	n := NewNetwork(t, NetworkOptions{Label: "start"})
	ns := n.NewNS(t, "proc")
	cmd := exec.CommandContext(t.Context(), "/bin/sh", "-c", "id -u; id -g; readlink /proc/self/ns/net; ip -o -4 addr show dev eth0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4321, Gid: 4322}}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, ns.Start(cmd))
	require.NoError(t, cmd.Wait(), out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 4, out.String())
	require.Equal(t, "4321", lines[0])
	require.Equal(t, "4322", lines[1])
	require.Equal(t, fmt.Sprintf("net:[%d]", nsIno(t, ns.Path())), lines[2])
	require.Contains(t, lines[3], "inet "+ns.Addr().String()+"/24")

	_, err := ns.Run(t.Context(), "/bin/sh", "-c", "echo to-quote >&2; exit 3")
	require.ErrorContains(t, err, "to-quote")
	require.ErrorContains(t, err, "exit status 3")
}

func TestCleanupLeavesNothing(t *testing.T) {
	// Not parallel: it compares the host's interfaces and routes before and
	// after, and another test's namespaces would only confuse the listing.
	RequireRoot(t)
	ifacesBefore := hostInterfaces(t)
	routesBefore := hostRoutes(t)

	var names []string
	exited := make(chan error, 1)
	t.Run("a test that ends early", func(t *testing.T) {
		n := NewNetwork(t, NetworkOptions{Label: "leak", IPv6: true})
		a := n.NewNS(t, "a")
		b := n.NewNS(t, "b")
		names = []string{n.Router().Name(), a.Name(), b.Name()}
		// A process the test forgets, holding the namespace.
		cmd := exec.Command("sleep", "600")
		require.NoError(t, b.Start(cmd))
		go func() { exited <- cmd.Wait() }()
		for _, name := range names {
			require.FileExists(t, filepath.Join(netnsDir, name))
		}
		t.Skip("ending the test early: the clean-up must still remove everything")
	})

	for _, name := range names {
		require.NoFileExists(t, filepath.Join(netnsDir, name))
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
		require.Equal(t, syscall.SIGKILL, ee.Sys().(syscall.WaitStatus).Signal())
	case <-time.After(ioTimeout):
		t.Fatal("the process left in the namespace was not killed")
	}
	require.Equal(t, ifacesBefore, hostInterfaces(t), "interfaces of the host's namespace changed")
	require.Equal(t, routesBefore, hostRoutes(t), "routes of the host's namespace changed")
}

// harnessName matches the interface names the harness gives (br0, eth0,
// v0 …, lo): other test binaries running at the same time (go test ./...
// runs packages in parallel; test/localcluster makes host veths) add and
// remove interfaces and routes of their own in the host's namespace, so
// only these are compared.
var harnessName = regexp.MustCompile(`^(lo|br0|eth[0-9]+|v[0-9]+)$`)

// A program's Network (OpenNetwork, Add, Close) works as a test's does,
// and Close removes every namespace and kills what runs there.
func TestOpenNetwork(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	n, err := OpenNetwork(NetworkOptions{Label: "prog"})
	require.NoError(t, err)
	closed := false
	defer func() {
		if !closed {
			_ = n.Close()
		}
	}()
	a, err := n.Add("a")
	require.NoError(t, err)
	b, err := n.Add("b")
	require.NoError(t, err)
	ln, err := b.Listen("tcp", b.Addr().String()+":0")
	require.NoError(t, err)
	defer ln.Close()
	go echoServer(ln)
	require.Equal(t, "via "+ln.Addr().String(), echo(t, a, ln.Addr().String()))

	cmd := exec.Command("sleep", "600")
	require.NoError(t, a.Start(cmd))
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	names := []string{n.Router().Name(), a.Name(), b.Name()}
	require.NoError(t, n.Close())
	closed = true
	require.NoError(t, n.Close(), "closing twice is harmless")
	for _, name := range names {
		require.NoFileExists(t, filepath.Join(netnsDir, name))
	}
	select {
	case err := <-exited:
		require.Error(t, err, "killed")
	case <-time.After(ioTimeout):
		t.Fatal("the process left in the namespace was not killed")
	}

	_, err = OpenNetwork(NetworkOptions{Prefix: netip.MustParsePrefix("fd00::/64")})
	require.ErrorContains(t, err, "want an IPv4 prefix")
}

func hostInterfaces(t testing.TB) []string {
	ifs, err := net.Interfaces()
	require.NoError(t, err)
	var names []string
	for _, i := range ifs {
		if harnessName.MatchString(i.Name) {
			names = append(names, i.Name)
		}
	}
	slices.Sort(names)
	return names
}

// hostRoutes lists the host namespace's routes through interfaces
// named as the harness names them (the first field of a /proc/net/route
// line, the last of an ipv6_route one).
func hostRoutes(t testing.TB) string {
	var b strings.Builder
	for _, f := range []string{"/proc/net/route", "/proc/net/ipv6_route"} {
		data, err := os.ReadFile(f)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		require.NoError(t, err)
		for line := range strings.Lines(string(data)) {
			fields := strings.Fields(line)
			if len(fields) == 0 {
				continue
			}
			iface := fields[len(fields)-1]
			if f == "/proc/net/route" {
				iface = fields[0]
			}
			if harnessName.MatchString(iface) {
				b.WriteString(line)
			}
		}
	}
	return b.String()
}

// TestParallelNetworks runs several networks on the same default prefix
// at once: names and addresses must not collide.
func TestParallelNetworks(t *testing.T) {
	t.Parallel()
	for i := range 6 {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			n := NewNetwork(t, NetworkOptions{Label: "par"})
			a := n.NewNS(t, "a")
			b := n.NewNS(t, "b")
			ln, err := b.Listen("tcp", ":7000")
			require.NoError(t, err)
			t.Cleanup(func() { ln.Close() })
			go echoServer(ln)
			require.Equal(t, "via "+b.Addr().String()+":7000", echo(t, a, b.Addr().String()+":7000"))
		})
	}
}

// TestTwoNetworks plugs one namespace into two networks, as a gateway
// between a cluster network and a WAN would be.
func TestTwoNetworks(t *testing.T) {
	t.Parallel()
	lan := NewNetwork(t, NetworkOptions{Label: "lan"})
	wan := NewNetwork(t, NetworkOptions{Label: "wan", Prefix: netip.MustParsePrefix("10.254.0.0/24")})
	gw := lan.NewNS(t, "gw")
	wanAddr, _ := wan.Connect(t, gw)
	require.Equal(t, netip.MustParseAddr("10.254.0.2"), wanAddr)
	peer := wan.NewNS(t, "peer")

	ln, err := gw.Listen("tcp", netip.AddrPortFrom(wanAddr, 15443).String())
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go echoServer(ln)
	require.Equal(t, "via 10.254.0.2:15443", echo(t, peer, "10.254.0.2:15443"))

	links, err := gw.Run(t.Context(), "ip", "-o", "link", "show")
	require.NoError(t, err)
	assert.Contains(t, links, "eth0")
	assert.Contains(t, links, "eth1")
}

func TestBadOptions(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	_, err := newNetwork(NetworkOptions{Prefix: netip.MustParsePrefix("fd00::/64")})
	require.ErrorContains(t, err, "want an IPv4 prefix")
	_, err = newNetwork(NetworkOptions{IPv6: true, Prefix6: netip.MustParsePrefix("10.0.0.0/8")})
	require.ErrorContains(t, err, "want an IPv6 prefix")
	_, err = newNS("no spaces")
	require.ErrorContains(t, err, `label "no spaces"`)

	n := NewNetwork(t, NetworkOptions{Label: "tiny", Prefix: netip.MustParsePrefix("10.1.1.0/29")})
	for i := range 5 { // .2 to .6
		n.NewNS(t, "h"+strconv.Itoa(i))
	}
	_, _, err = n.connect(New(t, "one-too-many"))
	require.ErrorContains(t, err, "no free address left in 10.1.1.0/29")
}

// TestSkipWithoutRoot runs this package's tests as an unprivileged user:
// they must skip, saying why.
func TestSkipWithoutRoot(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("already not root: the other tests show the skip")
	}
	bin := Executable(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run", "^TestNetwork$", "-test.v", "-test.count=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Dir = filepath.Dir(bin)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	require.Contains(t, string(out), "--- SKIP: TestNetwork")
	require.Contains(t, string(out), "network namespaces need root, and this test runs as uid 65534")
}
