package capture

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
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/test/netns"
)

// The users of these tests: the app, the sidecar (uid and gid 1337, as
// DefaultConfig expects), and a sidecar known only by its gid.
var (
	appUser         = syscall.Credential{Uid: 1000, Gid: 1000}
	sidecarUser     = syscall.Credential{Uid: DefaultProxyUID, Gid: DefaultProxyUID}
	sidecarGIDOnly  = syscall.Credential{Uid: 2000, Gid: DefaultProxyUID}
	hitTimeout      = 10 * time.Second
	outboundDst     = netip.MustParseAddrPort("10.99.0.1:80")
	excludedPortDst = netip.MustParseAddrPort("10.99.0.1:3306")
	excludedCIDRDst = netip.MustParseAddrPort("10.98.0.1:80")
)

// hit is a connection or query one of the test's servers received.
type hit struct {
	server string
	msg    string
	// orig is OriginalDst of a TCP connection; origErr its error.
	orig    netip.AddrPort
	origErr error
	remote  string
}

// pod is a workload's namespace with capture applied, a peer namespace on
// the same network, and servers recording what reaches them.
type pod struct {
	t    *testing.T
	net  *netns.Network
	ns   *netns.NS
	peer *netns.NS
	bin  string
	hits chan hit
}

func newPod(t *testing.T, opts netns.NetworkOptions, cfg Config) *pod {
	t.Helper()
	n := netns.NewNetwork(t, opts)
	p := &pod{t: t, net: n, ns: n.NewNS(t, "pod"), peer: n.NewNS(t, "peer"), bin: netns.Executable(t), hits: make(chan hit, 16)}
	requireTool(t, "iptables-restore")
	p.apply(cfg)
	return p
}

// apply applies cfg in the pod's namespace.
func (p *pod) apply(cfg Config) Result {
	p.t.Helper()
	var res Result
	require.NoError(p.t, p.ns.Do(func() (err error) {
		res, err = Apply(p.t.Context(), cfg)
		return err
	}))
	return res
}

func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is missing (%v): install the iptables package (`make tools` does)", name, err)
	}
}

// serveTCP records every connection to addr in ns: it reads one line,
// answers "<server> <original destination>" and records a hit.
func (p *pod) serveTCP(ns *netns.NS, server, addr string) {
	p.t.Helper()
	ln, err := ns.Listen("tcp", addr)
	require.NoError(p.t, err)
	p.t.Cleanup(func() { ln.Close() })
	go p.acceptLoop(ln, server)
}

func (p *pod) acceptLoop(ln net.Listener, server string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go p.handleTCP(c.(*net.TCPConn), server)
	}
}

func (p *pod) handleTCP(c *net.TCPConn, server string) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(hitTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return
	}
	h := hit{server: server, msg: strings.TrimSpace(line), remote: c.RemoteAddr().String()}
	h.orig, h.origErr = OriginalDst(c)
	orig := "-"
	if h.origErr == nil {
		orig = h.orig.String()
	}
	_, _ = fmt.Fprintf(c, "%s %s\n", server, orig)
	p.record(h)
}

// record hands h to expect; a hit nobody expects any more is dropped
// after a while, so no server goroutine outlives the test for long.
func (p *pod) record(h hit) {
	select {
	case p.hits <- h:
	case <-time.After(hitTimeout):
	}
}

// serveDNS answers DNS queries on addr in ns by echoing them as responses,
// and records them.
func (p *pod) serveDNS(ns *netns.NS, server, addr string) {
	p.t.Helper()
	pc, err := ns.ListenPacket("udp", addr)
	require.NoError(p.t, err)
	p.t.Cleanup(func() { pc.Close() })
	go p.dnsLoop(pc, server)
}

func (p *pod) dnsLoop(pc net.PacketConn, server string) {
	buf := make([]byte, 512)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, name, err := parseDNSName(buf[:n])
		if err != nil {
			continue
		}
		resp := append([]byte(nil), buf[:n]...)
		resp[2] |= 0x80 // QR: a response
		_, _ = pc.WriteTo(resp, from)
		p.record(hit{server: server, msg: name, remote: from.String()})
	}
}

// run starts the helper client in the pod's namespace as user and returns
// what it printed after "reply ".
func (p *pod) run(user syscall.Credential, mode, addr, msg string) string {
	p.t.Helper()
	cmd := exec.CommandContext(p.t.Context(), p.bin, addr, msg)
	// Without the race detector's one-second pause at exit.
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &user}
	var out, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &stderr
	require.NoError(p.t, p.ns.Start(cmd))
	require.NoError(p.t, cmd.Wait(), "client as uid %d: %s", user.Uid, stderr.String())
	reply, ok := strings.CutPrefix(strings.TrimSpace(out.String()), "reply ")
	require.True(p.t, ok, "client printed %q", out.String())
	return reply
}

// expect returns the next hit, which must carry msg.
func (p *pod) expect(msg string) hit {
	p.t.Helper()
	select {
	case h := <-p.hits:
		require.Equal(p.t, msg, h.msg, "a hit for another message: %+v", h)
		return h
	case <-time.After(hitTimeout):
		p.t.Fatalf("no server received %q", msg)
	}
	return hit{}
}

// addAddr puts addr on ns's lo.
func addAddr(t testing.TB, ns *netns.NS, addr netip.Addr) {
	t.Helper()
	require.NoError(t, ns.AddAddr(t.Context(), "lo", netip.PrefixFrom(addr, addr.BitLen())))
}

// nameserver is the first IPv4 nameserver of /etc/resolv.conf, which the
// app's resolver would query, or 10.96.0.10 when there is none usable.
func nameserver(t testing.TB, avoid netip.Prefix) netip.Addr {
	data, err := os.ReadFile("/etc/resolv.conf")
	if err == nil {
		for _, m := range regexp.MustCompile(`(?m)^\s*nameserver\s+(\S+)`).FindAllStringSubmatch(string(data), -1) {
			if a, err := netip.ParseAddr(m[1]); err == nil && a.Is4() && !avoid.Contains(a) {
				return a
			}
		}
	}
	t.Logf("no usable IPv4 nameserver in /etc/resolv.conf; using 10.96.0.10")
	return netip.MustParseAddr("10.96.0.10")
}

func TestCaptureIPv4(t *testing.T) {
	t.Parallel()
	cfg := DefaultConfig()
	cfg.ExcludeInboundPorts = []uint16{2222}
	cfg.ExcludeOutboundPorts = []uint16{3306}
	cfg.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("10.98.0.0/16")}
	p := newPod(t, netns.NetworkOptions{Label: "cap4"}, cfg)
	router := p.net.Router()
	podIP := p.ns.Addr()

	// The sidecar's listeners, as the proxy will open them.
	p.serveTCP(p.ns, "outbound", ":15001")
	p.serveTCP(p.ns, "inbound", ":15006")
	p.serveTCP(p.ns, "dns-proxy-tcp", "127.0.0.1:15053")
	p.serveDNS(p.ns, "dns-proxy", "127.0.0.1:15053")
	p.serveTCP(p.ns, "health", ":15020")
	// The app's own listeners.
	p.serveTCP(p.ns, "app", ":8080")
	p.serveTCP(p.ns, "app-ssh", ":2222")
	p.serveTCP(p.ns, "app-local", "127.0.0.1:9000")
	// The world beyond the pod, on the router.
	for _, a := range []netip.AddrPort{outboundDst, excludedCIDRDst} {
		addAddr(t, router, a.Addr())
	}
	p.serveTCP(router, "remote", outboundDst.String())
	p.serveTCP(router, "remote-db", excludedPortDst.String())
	p.serveTCP(router, "remote-excluded-cidr", excludedCIDRDst.String())
	dns := nameserver(t, p.net.Prefix())
	resolverNS := router
	if dns.IsLoopback() {
		resolverNS = p.ns // a local resolver such as systemd-resolved's 127.0.0.53
	} else {
		addAddr(t, router, dns)
	}
	dnsAddr := netip.AddrPortFrom(dns, 53)
	p.serveDNS(resolverNS, "resolver", dnsAddr.String())
	p.serveTCP(resolverNS, "resolver-tcp", dnsAddr.String())

	t.Run("the app's outbound connection lands on 15001 with its original destination", func(t *testing.T) {
		reply := p.run(appUser, "tcp", outboundDst.String(), "out1")
		h := p.expect("out1")
		require.Equal(t, "outbound", h.server)
		require.NoError(t, h.origErr)
		require.Equal(t, outboundDst, h.orig)
		require.Equal(t, "outbound "+outboundDst.String(), reply)
	})
	t.Run("the sidecar's own connection reaches the real destination", func(t *testing.T) {
		for name, user := range map[string]syscall.Credential{"by uid": sidecarUser, "by gid": sidecarGIDOnly} {
			msg := "own-" + strings.ReplaceAll(name, " ", "-")
			p.run(user, "tcp", outboundDst.String(), msg)
			h := p.expect(msg)
			require.Equal(t, "remote", h.server, name)
			require.Equal(t, podIP, netip.MustParseAddrPort(h.remote).Addr(), "seen from the pod's address")
		}
	})
	t.Run("excluded outbound port and CIDR are not captured", func(t *testing.T) {
		p.run(appUser, "tcp", excludedPortDst.String(), "db")
		require.Equal(t, "remote-db", p.expect("db").server)
		p.run(appUser, "tcp", excludedCIDRDst.String(), "cidr")
		require.Equal(t, "remote-excluded-cidr", p.expect("cidr").server)
	})
	t.Run("inbound from another namespace lands on 15006 with its original destination", func(t *testing.T) {
		dst := netip.AddrPortFrom(podIP, 8080)
		reply := dialFrom(t, p.peer, dst.String(), "in1")
		h := p.expect("in1")
		require.Equal(t, "inbound", h.server)
		require.NoError(t, h.origErr)
		require.Equal(t, dst, h.orig)
		require.Equal(t, "inbound "+dst.String(), reply)
		require.True(t, strings.HasPrefix(h.remote, p.peer.Addr().String()+":"), "the peer's own address: %s", h.remote)
	})
	t.Run("excluded inbound ports and the sidecar's own ports are not captured", func(t *testing.T) {
		dst := netip.AddrPortFrom(podIP, 2222)
		reply := dialFrom(t, p.peer, dst.String(), "ssh")
		h := p.expect("ssh")
		require.Equal(t, "app-ssh", h.server)
		// Not redirected, but tracked: the original destination is the
		// connection's own.
		require.NoError(t, h.origErr)
		require.Equal(t, dst, h.orig)
		require.Equal(t, "app-ssh "+dst.String(), reply)

		dialFrom(t, p.peer, netip.AddrPortFrom(podIP, 15020).String(), "health")
		require.Equal(t, "health", p.expect("health").server)
	})
	t.Run("a peer dialling the outbound port lands on 15006", func(t *testing.T) {
		// Not the outbound listener, which would carry the peer's
		// requests into the mesh as this workload.
		dst := netip.AddrPortFrom(podIP, 15001)
		dialFrom(t, p.peer, dst.String(), "out-from-peer")
		h := p.expect("out-from-peer")
		require.Equal(t, "inbound", h.server)
		require.Equal(t, dst, h.orig)
	})
	t.Run("the app calling itself is not captured; the sidecar calling the pod IP is captured inbound", func(t *testing.T) {
		p.run(appUser, "tcp", netip.AddrPortFrom(podIP, 8080).String(), "self")
		require.Equal(t, "app", p.expect("self").server)
		p.run(appUser, "tcp", "127.0.0.1:9000", "local")
		require.Equal(t, "app-local", p.expect("local").server)

		dst := netip.AddrPortFrom(podIP, 8080)
		p.run(sidecarUser, "tcp", dst.String(), "vip-self")
		h := p.expect("vip-self")
		require.Equal(t, "inbound", h.server)
		require.Equal(t, dst, h.orig)
	})
	t.Run("the app's DNS queries land on 15053, answered as if by the server", func(t *testing.T) {
		reply := p.run(appUser, "udp", dnsAddr.String(), "q1")
		require.Equal(t, "dns-proxy", p.expect("q1").server)
		require.Equal(t, "q1 from "+dnsAddr.String(), reply)

		reply = p.run(appUser, "tcp", dnsAddr.String(), "q2")
		require.Equal(t, "dns-proxy-tcp", p.expect("q2").server)
		require.Equal(t, "dns-proxy-tcp "+dnsAddr.String(), reply)
	})
	t.Run("the sidecar's DNS queries reach the server", func(t *testing.T) {
		reply := p.run(sidecarUser, "udp", dnsAddr.String(), "up1")
		require.Equal(t, "resolver", p.expect("up1").server)
		require.Equal(t, "up1 from "+dnsAddr.String(), reply)
		p.run(sidecarUser, "tcp", dnsAddr.String(), "up2")
		require.Equal(t, "resolver-tcp", p.expect("up2").server)
	})
	select {
	case h := <-p.hits:
		t.Fatalf("unexpected hit: %+v", h)
	default:
	}
}

// dialFrom connects from ns, sends msg and returns the server's answer.
func dialFrom(t testing.TB, ns *netns.NS, addr, msg string) string {
	t.Helper()
	c, err := ns.DialContext(t.Context(), "tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(hitTimeout)))
	_, err = fmt.Fprintf(c, "%s\n", msg)
	require.NoError(t, err)
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	return strings.TrimSpace(line)
}

func TestCaptureIPv6(t *testing.T) {
	t.Parallel()
	cfg := DefaultConfig()
	cfg.IPv6 = true
	p := newPod(t, netns.NetworkOptions{Label: "cap6", IPv6: true}, cfg)
	requireTool(t, "ip6tables-restore")
	remote := netip.MustParseAddrPort("[fd00:99::1]:80")
	addAddr(t, p.net.Router(), remote.Addr())
	p.serveTCP(p.ns, "outbound", ":15001")
	p.serveTCP(p.ns, "inbound", ":15006")
	p.serveTCP(p.net.Router(), "remote", remote.String())

	reply := p.run(appUser, "tcp", remote.String(), "out6")
	h := p.expect("out6")
	require.Equal(t, "outbound", h.server)
	require.NoError(t, h.origErr)
	require.Equal(t, remote, h.orig)
	require.Equal(t, "outbound "+remote.String(), reply)

	p.run(sidecarUser, "tcp", remote.String(), "own6")
	require.Equal(t, "remote", p.expect("own6").server)

	dst := netip.AddrPortFrom(p.ns.Addr6(), 8080)
	require.Equal(t, "inbound "+dst.String(), dialFrom(t, p.peer, dst.String(), "in6"))
	h = p.expect("in6")
	require.Equal(t, dst, h.orig)

	// IPv4 still works beside it, through the same dual-stack listener.
	dst4 := netip.AddrPortFrom(p.ns.Addr(), 8080)
	require.Equal(t, "inbound "+dst4.String(), dialFrom(t, p.peer, dst4.String(), "in4"))
	require.Equal(t, dst4, p.expect("in4").orig)
}

// TestIPv6RefusedWithoutIPv6Capture is the dual-stack pod with the
// default capture (IPv4 only): IPv6 from outside must not reach the app
// around the sidecar, while the pod's own IPv6 keeps working.
func TestIPv6RefusedWithoutIPv6Capture(t *testing.T) {
	t.Parallel()
	cfg := DefaultConfig()
	p := newPod(t, netns.NetworkOptions{Label: "noip6", IPv6: true}, cfg)
	requireTool(t, "ip6tables-restore")
	router := p.net.Router()
	remote := netip.MustParseAddrPort("[fd00:99::1]:80")
	addAddr(t, router, remote.Addr())
	p.serveTCP(p.ns, "inbound", ":15006")
	p.serveTCP(p.ns, "app", ":8080")
	p.serveTCP(p.ns, "app-local6", "[::1]:9000")
	p.serveTCP(router, "remote", remote.String())
	dst6 := netip.AddrPortFrom(p.ns.Addr6(), 8080)
	dst4 := netip.AddrPortFrom(p.ns.Addr(), 8080)

	refused := func(t *testing.T, addr netip.AddrPort) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), hitTimeout)
		defer cancel()
		c, err := p.peer.DialContext(ctx, "tcp", addr.String())
		if err == nil {
			c.Close()
		}
		// A reset, at once: not a timeout, which would also mean that
		// neighbour discovery broke.
		require.ErrorIs(t, err, syscall.ECONNREFUSED, "a peer's IPv6 connection to %s", addr)
	}

	t.Run("a peer's IPv6 connection is refused, its IPv4 one lands on 15006", func(t *testing.T) {
		refused(t, dst6)
		refused(t, netip.AddrPortFrom(p.ns.Addr6(), 15006)) // the sidecar's ports too
		require.Equal(t, "inbound "+dst4.String(), dialFrom(t, p.peer, dst4.String(), "in4"))
		require.Equal(t, "inbound", p.expect("in4").server)
	})
	t.Run("the app's own IPv6 connections work: out to the router, and on loopback", func(t *testing.T) {
		reply := p.run(appUser, "tcp", remote.String(), "out6")
		h := p.expect("out6")
		require.Equal(t, "remote", h.server, "not captured: IPv6 capture is off")
		require.Equal(t, p.ns.Addr6(), netip.MustParseAddrPort(h.remote).Addr().Unmap())
		// The reply came back through the block: the connection's replies
		// are ESTABLISHED. (The router tracks nothing, so no original
		// destination there.)
		require.Equal(t, "remote -", reply)

		p.run(appUser, "tcp", "[::1]:9000", "local6")
		require.Equal(t, "app-local6", p.expect("local6").server)
		p.run(appUser, "tcp", dst6.String(), "self6")
		require.Equal(t, "app", p.expect("self6").server, "the pod calling its own IPv6 address, over lo")
	})
	t.Run("turning IPv6 capture on replaces the block; off again restores it", func(t *testing.T) {
		on := cfg
		on.IPv6 = true
		require.Equal(t, Result{}, p.apply(on))
		require.NotContains(t, savedTableIn(t, p.ns, "ip6tables-save", "filter"), ChainInput6Block)
		require.Equal(t, "inbound "+dst6.String(), dialFrom(t, p.peer, dst6.String(), "in6"))
		require.Equal(t, dst6, p.expect("in6").orig)

		require.Equal(t, Result{IPv6Refused: true}, p.apply(cfg))
		require.NotContains(t, natTable(t, p.ns, "ip6tables-save"), "ISTHMUS", "IPv6's capture is gone")
		refused(t, dst6)
	})
	select {
	case h := <-p.hits:
		t.Fatalf("unexpected hit: %+v", h)
	default:
	}
}

// TestApplyWithoutIP6tables: without ip6tables, or with a kernel that
// cannot give it a table (no IPv6), IPv6 is left alone when no interface
// but loopback has an IPv6 address, and Apply fails when one has.
func TestApplyWithoutIP6tables(t *testing.T) {
	t.Parallel()
	requireTool(t, "iptables-restore")
	// What a legacy ip6tables-save prints on a kernel without IPv6, which
	// this machine's kernel cannot show. Written first, long before it
	// runs (a file still open for writing cannot be executed).
	noKernel := filepath.Join(t.TempDir(), "ip6tables-save")
	require.NoError(t, os.WriteFile(noKernel, []byte("#!/bin/sh\necho 'ip6tables-save v1.8.9 (legacy): Cannot initialize: Address family not supported by protocol' >&2\nexit 1\n"), 0o755))
	for name, lookPath := range map[string]func(string) (string, error){
		"not installed": func(name string) (string, error) {
			if strings.HasPrefix(name, "ip6tables") {
				return "", &exec.Error{Name: name, Err: exec.ErrNotFound}
			}
			return exec.LookPath(name)
		},
		"kernel without IPv6": func(name string) (string, error) {
			if name == "ip6tables-save" {
				return noKernel, nil
			}
			return exec.LookPath(name)
		},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			r := Runner{lookPath: lookPath}
			apply := func(ns *netns.NS, c Config) (res Result, err error) {
				err = ns.Do(func() (err error) {
					res, err = r.Apply(t.Context(), c)
					return err
				})
				return res, err
			}
			cfg := DefaultConfig()

			t.Run("no IPv6 address but on lo: IPv6 left alone, and said so", func(t *testing.T) {
				ns := netns.New(t, "noip6tables")
				res, err := apply(ns, cfg)
				require.NoError(t, err)
				require.False(t, res.IPv6Refused)
				require.ErrorIs(t, res.IPv6Skipped, errNoTable)
				require.ErrorContains(t, res.IPv6Skipped, "no interface but loopback has an IPv6 address")
				require.ErrorContains(t, res.IPv6Skipped, "ip6tables-save -t filter")
				require.Contains(t, natTable(t, ns, "iptables-save"), "-A OUTPUT -j ISTHMUS_OUTPUT", "IPv4 is captured")
				require.NoError(t, ns.Do(func() error { return r.Remove(t.Context(), cfg) }), "nothing of IPv6 to remove")
				require.NotContains(t, natTable(t, ns, "iptables-save"), "ISTHMUS")

				on := cfg
				on.IPv6 = true
				_, err = apply(ns, on)
				require.ErrorIs(t, err, errNoTable, "IPv6 capture asked for: ip6tables is needed")
				require.NotContains(t, natTable(t, ns, "iptables-save"), "ISTHMUS", "IPv4 rolled back")
				require.Error(t, ns.Do(func() error { return r.Remove(t.Context(), on) }))
			})
			t.Run("an IPv6 address on eth0: Apply fails, closed", func(t *testing.T) {
				n := netns.NewNetwork(t, netns.NetworkOptions{Label: "noip6tables6", IPv6: true})
				ns := n.NewNS(t, "pod")
				_, err := apply(ns, cfg)
				require.ErrorIs(t, err, errNoTable)
				require.ErrorContains(t, err, "yet the pod has IPv6 addresses ("+ns.Addr6().String()+" on eth0")
				require.ErrorContains(t, err, "install ip6tables")
				require.NotContains(t, natTable(t, ns, "iptables-save"), "ISTHMUS", "IPv4 rolled back: the init step failed as a whole")
			})
		})
	}
}

func TestOriginalDstWithoutConntrack(t *testing.T) {
	t.Parallel()
	// A namespace without any NAT rule: conntrack does not track its
	// connections, so there is no original destination to ask for.
	ns := netns.New(t, "noct")
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	c, err := ns.DialContext(t.Context(), "tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	s, err := ln.Accept()
	require.NoError(t, err)
	defer s.Close()
	got, err := OriginalDst(s.(*net.TCPConn))
	if err == nil {
		// A kernel that tracks it anyway answers with the local address.
		require.Equal(t, s.LocalAddr().String(), got.String())
		return
	}
	require.ErrorIs(t, err, ErrNoOriginalDst)
	require.ErrorContains(t, err, ln.Addr().String())
}

// natTable returns the nat table as save prints it, inside ns, without
// comments and counters.
func natTable(t testing.TB, ns *netns.NS, save string) string {
	t.Helper()
	return savedTableIn(t, ns, save, "nat")
}

// savedTableIn returns table as save prints it, inside ns, without
// comments and counters.
func savedTableIn(t testing.TB, ns *netns.NS, save, table string) string {
	t.Helper()
	out, err := ns.Run(t.Context(), save, "-t", table)
	require.NoError(t, err)
	var b strings.Builder
	counters := regexp.MustCompile(`\[[0-9]+:[0-9]+\]`)
	for line := range strings.Lines(out) {
		if !strings.HasPrefix(line, "#") {
			b.WriteString(counters.ReplaceAllString(line, "[0:0]"))
		}
	}
	return b.String()
}

// ours splits a saved or generated table into the rules of our chains and
// the jumps into them, each in order.
func ours(table string) (chainRules, jumps []string) {
	for line := range strings.Lines(table) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "-A ISTHMUS_"):
			chainRules = append(chainRules, line)
		case strings.HasPrefix(line, "-A ") && regexp.MustCompile(`-j ISTHMUS_[A-Z0-9_]+$`).MatchString(line):
			jumps = append(jumps, line)
		}
	}
	return chainRules, jumps
}

func TestApplyIdempotentAndRemove(t *testing.T) {
	t.Parallel()
	for _, backend := range []string{"", "legacy"} {
		t.Run("backend="+backend, func(t *testing.T) {
			t.Parallel()
			r := Runner{Backend: backend}
			tool := func(base string) string {
				name, err := r.command(base)
				require.NoError(t, err)
				return name
			}
			if _, err := exec.LookPath(tool("iptables-restore")); err != nil && backend != "" {
				t.Skipf("%s is not installed", tool("iptables-restore"))
			}
			ns := netns.New(t, "idem")
			families := []struct{ cmd, save, other string }{
				{tool("iptables"), tool("iptables-save"), "192.0.2.1/32"},
				{tool("ip6tables"), tool("ip6tables-save"), "2001:db8::1/128"},
			}
			// Someone else's rules, which must survive everything.
			for _, f := range families {
				for _, args := range [][]string{
					{"-t", "nat", "-A", "OUTPUT", "-d", f.other, "-j", "RETURN"},
					{"-t", "nat", "-N", "FOREIGN"},
					{"-t", "nat", "-A", "FOREIGN", "-p", "tcp", "-j", "RETURN"},
					{"-t", "nat", "-A", "PREROUTING", "-j", "FOREIGN"},
				} {
					_, err := ns.Run(t.Context(), f.cmd, args...)
					require.NoError(t, err)
				}
			}
			// And in ip6tables' filter table, where the IPv6 block goes.
			save6, cmd6 := families[1].save, families[1].cmd
			for _, args := range [][]string{
				{"-A", "INPUT", "-s", "2001:db8::1/128", "-j", "ACCEPT"},
				{"-N", "FOREIGN"},
				{"-A", "FOREIGN", "-p", "tcp", "-j", "RETURN"},
				{"-A", "INPUT", "-j", "FOREIGN"},
			} {
				_, err := ns.Run(t.Context(), cmd6, append([]string{"-t", "filter"}, args...)...)
				require.NoError(t, err)
			}
			filter := func() string { return savedTableIn(t, ns, save6, "filter") }
			before := map[string]string{}
			for _, f := range families {
				before[f.save] = natTable(t, ns, f.save)
			}
			beforeFilter := filter()

			cfg := DefaultConfig()
			cfg.IPv6 = true
			apply := func(c Config) {
				t.Helper()
				require.NoError(t, ns.Do(func() error {
					_, err := r.Apply(t.Context(), c)
					return err
				}))
			}
			apply(cfg)
			once := map[string]string{}
			for _, f := range families {
				once[f.save] = natTable(t, ns, f.save)
				require.NotEqual(t, before[f.save], once[f.save])
			}
			apply(cfg)
			rs, err := Rules(cfg)
			require.NoError(t, err)
			for i, f := range families {
				require.Equal(t, once[f.save], natTable(t, ns, f.save), "%s: applying twice differs from once", f.save)
				want := rs.IPv4
				if i == 1 {
					want = rs.IPv6
				}
				wantRules, wantJumps := ours(want)
				gotRules, gotJumps := ours(once[f.save])
				require.Equal(t, wantRules, gotRules, "%s prints the rules as Rules writes them", f.save)
				require.Equal(t, wantJumps, gotJumps)
				require.Empty(t, jumpEdits(natChains, wantJumps, once[f.save]), "the saved jumps are recognised as ours")
				require.Contains(t, once[f.save], "-A OUTPUT -d "+f.other+" -j RETURN")
			}
			require.Equal(t, beforeFilter, filter(), "IPv6 captured: nothing to refuse")

			t.Run("a changed config replaces the rules", func(t *testing.T) {
				changed := cfg
				changed.ExcludeOutboundPorts = []uint16{3306}
				changed.DNSPort = 0
				apply(changed)
				crs, err := Rules(changed)
				require.NoError(t, err)
				wantRules, wantJumps := ours(crs.IPv4)
				gotRules, gotJumps := ours(natTable(t, ns, families[0].save))
				require.Equal(t, wantRules, gotRules)
				require.Equal(t, wantJumps, gotJumps)
			})
			t.Run("a duplicated jump is repaired", func(t *testing.T) {
				_, err := ns.Run(t.Context(), families[0].cmd, "-t", "nat", "-A", "OUTPUT", "-j", ChainOutput)
				require.NoError(t, err)
				apply(cfg)
				require.Equal(t, once[families[0].save], natTable(t, ns, families[0].save))
			})

			t.Run("IPv6 off: the block replaces IPv6's capture, and back", func(t *testing.T) {
				off := cfg
				off.IPv6 = false
				rs, err := Rules(off)
				require.NoError(t, err)
				wantRules, wantJumps := ours(rs.IPv6)
				require.Equal(t, []string{"-A INPUT -j " + ChainInput6Block}, wantJumps)
				var res Result
				require.NoError(t, ns.Do(func() (err error) {
					res, err = r.Apply(t.Context(), off)
					return err
				}))
				require.Equal(t, Result{IPv6Refused: true}, res)
				blocked := filter()
				gotRules, gotJumps := ours(blocked)
				require.Equal(t, wantRules, gotRules, "%s prints the block as Rules writes it", save6)
				require.Equal(t, wantJumps, gotJumps)
				require.Contains(t, blocked, "-A INPUT -s 2001:db8::1/128 -j ACCEPT")
				require.Contains(t, blocked, "-A INPUT -j FOREIGN")
				require.Equal(t, before[save6], natTable(t, ns, save6), "IPv6's capture is gone")
				require.Equal(t, once[families[0].save], natTable(t, ns, families[0].save), "IPv4's stays")

				apply(off)
				require.Equal(t, blocked, filter(), "applying twice is applying once")
				_, err = ns.Run(t.Context(), cmd6, "-t", "filter", "-A", "INPUT", "-j", ChainInput6Block)
				require.NoError(t, err)
				apply(off)
				require.Equal(t, blocked, filter(), "a duplicated jump is repaired")

				apply(cfg)
				require.Equal(t, beforeFilter, filter(), "IPv6 on again: the block is gone")
				require.Equal(t, once[save6], natTable(t, ns, save6))

				apply(off)
				require.Equal(t, blocked, filter())
				require.NoError(t, ns.Do(func() error { return r.Remove(t.Context(), off) }))
				require.Equal(t, beforeFilter, filter(), "Remove must leave the filter table as it was")
				apply(cfg)
			})

			remove := func() {
				t.Helper()
				require.NoError(t, ns.Do(func() error { return r.Remove(t.Context(), cfg) }))
			}
			remove()
			for _, f := range families {
				require.Equal(t, before[f.save], natTable(t, ns, f.save), "%s: Remove must leave the table as it was", f.save)
			}
			require.Equal(t, beforeFilter, filter())
			remove() // nothing left to remove: not an error
			for _, f := range families {
				require.Equal(t, before[f.save], natTable(t, ns, f.save))
			}
			require.Equal(t, beforeFilter, filter())
		})
	}
}

func TestRestoreIsAtomicAndQuotesTheError(t *testing.T) {
	t.Parallel()
	requireTool(t, "iptables-restore")
	ns := netns.New(t, "atomic")
	before := natTable(t, ns, "iptables-save")
	input := "*nat\n:ISTHMUS_OUTPUT - [0:0]\n-A ISTHMUS_OUTPUT -j RETURN\n-A OUTPUT -j ISTHMUS_OUTPUT\n-A ISTHMUS_OUTPUT -j NO_SUCH_CHAIN\nCOMMIT\n"
	err := ns.Do(func() error { return Runner{}.restore(t.Context(), ipv4, input, "--noflush") })
	var re *RestoreError
	require.ErrorAs(t, err, &re)
	t.Logf("the error as a user sees it: %v", err)
	// The legacy backend blames the rule; nft checks at COMMIT and blames
	// that.
	require.Contains(t, []int{5, 6}, re.Line)
	require.Equal(t, strings.Split(input, "\n")[re.Line-1], re.Input)
	require.Contains(t, re.Stderr, "NO_SUCH_CHAIN")
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	require.Equal(t, before, natTable(t, ns, "iptables-save"), "nothing of a failed input is applied")
}

func TestApplyRollsBackWhenIPv6Fails(t *testing.T) {
	t.Parallel()
	requireTool(t, "ip6tables-restore")
	ns := netns.New(t, "rollback")
	before := natTable(t, ns, "iptables-save")
	cfg := DefaultConfig()
	cfg.IPv6 = true
	steps := Runner{}.applySteps(cfg, new(Result))
	require.Equal(t, "nat", steps[1].table)
	require.True(t, steps[1].f.v6)
	steps[1].input = func(string) string { return "*nat\n-A OUTPUT -j NO_SUCH_CHAIN\nCOMMIT\n" }
	err := ns.Do(func() error { return Runner{}.edit(t.Context(), steps) })
	var re *RestoreError
	require.ErrorAs(t, err, &re)
	require.True(t, strings.HasPrefix(re.Command, "ip6tables-restore --noflush"), re.Command)
	require.Equal(t, before, natTable(t, ns, "iptables-save"), "IPv4 must be rolled back")

	t.Run("turning IPv6 off: a failed block puts IPv6's capture back", func(t *testing.T) {
		require.NoError(t, ns.Do(func() error {
			_, err := Apply(t.Context(), cfg)
			return err
		}))
		on4, on6 := natTable(t, ns, "iptables-save"), natTable(t, ns, "ip6tables-save")
		filter := savedTableIn(t, ns, "ip6tables-save", "filter")
		off := cfg
		off.IPv6 = false
		off.ExcludeOutboundPorts = []uint16{3306} // so that IPv4 changes too
		steps := Runner{}.applySteps(off, new(Result))
		last := &steps[len(steps)-1]
		require.Equal(t, "filter", last.table)
		last.input = func(string) string { return "*filter\n-A INPUT -j NO_SUCH_CHAIN\nCOMMIT\n" }
		err := ns.Do(func() error { return Runner{}.edit(t.Context(), steps) })
		require.ErrorAs(t, err, &re)
		require.Equal(t, on4, natTable(t, ns, "iptables-save"))
		require.Equal(t, on6, natTable(t, ns, "ip6tables-save"), "the removed IPv6 capture is back")
		require.Equal(t, filter, savedTableIn(t, ns, "ip6tables-save", "filter"))
	})
}

func TestApplyRejectsBadConfig(t *testing.T) {
	t.Parallel()
	_, err := Apply(t.Context(), Config{})
	require.ErrorContains(t, err, "outbound capture port: 0 is not a port")
	require.False(t, errors.As(err, new(*RestoreError)), "rejected before any command ran")
}
