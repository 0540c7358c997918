package capture

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
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
	require.NoError(t, p.ns.Do(func() error { return Apply(t.Context(), cfg) }))
	return p
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
	out, err := ns.Run(t.Context(), save, "-t", "nat")
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
		case strings.HasPrefix(line, "-A ") && regexp.MustCompile(`-j ISTHMUS_[A-Z_]+$`).MatchString(line):
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
			before := map[string]string{}
			for _, f := range families {
				before[f.save] = natTable(t, ns, f.save)
			}

			cfg := DefaultConfig()
			cfg.IPv6 = true
			apply := func(c Config) {
				t.Helper()
				require.NoError(t, ns.Do(func() error { return r.Apply(t.Context(), c) }))
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
				require.Empty(t, jumpEdits(wantJumps, once[f.save]), "the saved jumps are recognised as ours")
				require.Contains(t, once[f.save], "-A OUTPUT -d "+f.other+" -j RETURN")
			}

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

			remove := func() {
				t.Helper()
				require.NoError(t, ns.Do(func() error { return r.Remove(t.Context(), cfg) }))
			}
			remove()
			for _, f := range families {
				require.Equal(t, before[f.save], natTable(t, ns, f.save), "%s: Remove must leave the table as it was", f.save)
			}
			remove() // nothing left to remove: not an error
			for _, f := range families {
				require.Equal(t, before[f.save], natTable(t, ns, f.save))
			}
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
	err := ns.Do(func() error {
		return Runner{}.edit(t.Context(), families(cfg), func(f family, saved string) string {
			if f.v6 {
				return "*nat\n-A OUTPUT -j NO_SUCH_CHAIN\nCOMMIT\n"
			}
			return buildTable(cfg, f).render(jumpEdits(buildTable(cfg, f).jumps, saved))
		})
	})
	var re *RestoreError
	require.ErrorAs(t, err, &re)
	require.True(t, strings.HasPrefix(re.Command, "ip6tables-restore --noflush"), re.Command)
	require.Equal(t, before, natTable(t, ns, "iptables-save"), "IPv4 must be rolled back")
}

func TestApplyRejectsBadConfig(t *testing.T) {
	t.Parallel()
	err := Apply(t.Context(), Config{})
	require.ErrorContains(t, err, "outbound capture port: 0 is not a port")
	require.False(t, errors.As(err, new(*RestoreError)), "rejected before any command ran")
}
