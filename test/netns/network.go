package netns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"sync"
	"testing"
)

// Default address ranges of a Network. Every Network is isolated in its
// own namespaces, so parallel tests can all use the defaults; only a
// namespace joined to several Networks needs them to differ.
var (
	DefaultPrefix  = netip.MustParsePrefix("10.200.0.0/24")
	DefaultPrefix6 = netip.MustParsePrefix("fd00:200::/64")
)

// NetworkOptions shape a Network. The zero value is an IPv4-only network
// on DefaultPrefix.
type NetworkOptions struct {
	// Label ends the namespaces' names; empty means "net".
	Label string
	// Prefix is the IPv4 subnet: the router (gateway) is its first host
	// address, namespaces get the next ones. Zero means DefaultPrefix.
	Prefix netip.Prefix
	// IPv6 also gives the router and every namespace an IPv6 address (with
	// duplicate address detection off, so they work at once) and an IPv6
	// default route.
	IPv6 bool
	// Prefix6 is the IPv6 subnet when IPv6 is set; zero means
	// DefaultPrefix6.
	Prefix6 netip.Prefix
}

// Network is a bridge in a namespace of its own (the router, which owns
// the gateway address) and the namespaces plugged into it. Safe for
// concurrent use.
type Network struct {
	router          *NS
	label           string
	prefix, prefix6 netip.Prefix
	gateway, gw6    netip.Addr

	// mu guards next and owned.
	mu sync.Mutex
	// next is the host number the next namespace gets; also names the
	// router's end of its veth (v<next-2>).
	next int
	// owned are the namespaces Add made, for Close.
	owned []*NS
}

// NewNetwork makes a Network for tb; its namespaces are deleted in
// tb.Cleanup. It skips tb when not running as root (see RequireRoot).
func NewNetwork(tb testing.TB, opts NetworkOptions) *Network {
	tb.Helper()
	RequireRoot(tb)
	sweepOnce.Do(func() { sweepLeftovers(tb.Logf) })
	n, err := newNetwork(opts)
	if n != nil {
		tb.Cleanup(func() {
			if err := n.router.destroy(); err != nil {
				tb.Errorf("netns: clean up %s: %v", n.router.name, err)
			}
		})
	}
	if err != nil {
		tb.Fatalf("netns: %v", err)
	}
	return n
}

// OpenNetwork is NewNetwork for a program (a benchmark) rather than a
// test: it returns an error where NewNetwork skips or fails, and the
// caller must Close the network, which deletes its router and every
// namespace Add made.
func OpenNetwork(opts NetworkOptions) (*Network, error) {
	if ok, reason := Available(); !ok {
		return nil, fmt.Errorf("netns: %s", reason)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("netns: ip(8) is missing (%w): install iproute2", err)
	}
	sweepOnce.Do(func() { sweepLeftovers(func(string, ...any) {}) })
	n, err := newNetwork(opts)
	if err != nil {
		if n != nil {
			err = errors.Join(err, n.Close())
		}
		return nil, fmt.Errorf("netns: %w", err)
	}
	return n, nil
}

// newNetwork makes the router. Once it returns a non-nil Network, the
// caller must destroy its router, whatever the error.
func newNetwork(opts NetworkOptions) (*Network, error) {
	if opts.Label == "" {
		opts.Label = "net"
	}
	if !opts.Prefix.IsValid() {
		opts.Prefix = DefaultPrefix
	}
	if !opts.Prefix.Addr().Is4() || opts.Prefix.Bits() > 29 {
		return nil, fmt.Errorf("network %s: prefix %s: want an IPv4 prefix of /29 or wider", opts.Label, opts.Prefix)
	}
	n := &Network{label: opts.Label, prefix: opts.Prefix.Masked(), next: 2}
	n.gateway = n.prefix.Addr().Next()
	if opts.IPv6 {
		if !opts.Prefix6.IsValid() {
			opts.Prefix6 = DefaultPrefix6
		}
		if !opts.Prefix6.Addr().Is6() || opts.Prefix6.Addr().Is4In6() || opts.Prefix6.Bits() > 120 {
			return nil, fmt.Errorf("network %s: prefix %s: want an IPv6 prefix of /120 or wider", opts.Label, opts.Prefix6)
		}
		n.prefix6 = opts.Prefix6.Masked()
		n.gw6 = n.prefix6.Addr().Next()
	}
	router, err := newNS(opts.Label + "-router")
	if router == nil {
		return nil, err
	}
	n.router = router
	if err != nil {
		return n, err
	}
	r := n.router.name
	cmds := [][]string{
		{"-n", r, "link", "add", "br0", "type", "bridge"},
		{"-n", r, "addr", "add", netip.PrefixFrom(n.gateway, n.prefix.Bits()).String(), "dev", "br0"},
	}
	if n.gw6.IsValid() {
		cmds = append(cmds, []string{"-n", r, "addr", "add", netip.PrefixFrom(n.gw6, n.prefix6.Bits()).String(), "dev", "br0", "nodad"})
	}
	cmds = append(cmds, []string{"-n", r, "link", "set", "br0", "up"})
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	if err := ipBatch(ctx, cmds...); err != nil {
		return n, fmt.Errorf("network %s: %w", opts.Label, err)
	}
	return n, nil
}

// Add is NewNS for a program: a namespace plugged into the network as
// eth0, deleted by Close.
func (n *Network) Add(label string) (*NS, error) {
	ns, err := newNS(label)
	if ns != nil {
		n.mu.Lock()
		n.owned = append(n.owned, ns)
		n.mu.Unlock()
	}
	if err != nil {
		return nil, fmt.Errorf("netns: %w", err)
	}
	if _, _, err := n.connect(ns); err != nil {
		return nil, fmt.Errorf("netns: %w", err)
	}
	return ns, nil
}

// Close deletes the namespaces Add made, then the router, killing what
// still runs in them. Closing twice is harmless. A Network from
// NewNetwork is cleaned up by its test instead.
func (n *Network) Close() error {
	n.mu.Lock()
	owned := n.owned
	n.owned = nil
	n.mu.Unlock()
	var errs []error
	for i := len(owned) - 1; i >= 0; i-- {
		errs = append(errs, owned[i].Close())
	}
	return errors.Join(append(errs, n.router.Close())...)
}

// Router is the namespace holding the bridge and the gateway address. Add
// addresses to its lo (NS.AddAddr) to stand for hosts beyond the network:
// namespaces reach them through their default route.
func (n *Network) Router() *NS { return n.router }

// Prefix is the network's IPv4 subnet.
func (n *Network) Prefix() netip.Prefix { return n.prefix }

// Gateway is the router's IPv4 address, every namespace's default route.
func (n *Network) Gateway() netip.Addr { return n.gateway }

// Prefix6 is the network's IPv6 subnet; zero without IPv6.
func (n *Network) Prefix6() netip.Prefix { return n.prefix6 }

// Gateway6 is the router's IPv6 address; zero without IPv6.
func (n *Network) Gateway6() netip.Addr { return n.gw6 }

// NewNS makes a namespace plugged into the network as eth0, with the next
// free address and a default route via the gateway. It is deleted in
// tb.Cleanup.
func (n *Network) NewNS(tb testing.TB, label string) *NS {
	tb.Helper()
	ns := New(tb, label)
	if _, _, err := n.connect(ns); err != nil {
		tb.Fatalf("netns: %v", err)
	}
	return ns
}

// Connect plugs ns into the network as its next interface (eth0, eth1 …)
// with the next free address, and returns the addresses (the IPv6 one is
// zero without IPv6). Only a namespace's first network gives it a default
// route (and its Addr); further ones are reached through their subnet.
func (n *Network) Connect(tb testing.TB, ns *NS) (netip.Addr, netip.Addr) {
	tb.Helper()
	a, a6, err := n.connect(ns)
	if err != nil {
		tb.Fatalf("netns: %v", err)
	}
	return a, a6
}

func (n *Network) connect(ns *NS) (netip.Addr, netip.Addr, error) {
	n.mu.Lock()
	host := n.next
	n.next++
	n.mu.Unlock()
	a, err := nthAddr(n.prefix, host)
	if err != nil {
		return netip.Addr{}, netip.Addr{}, fmt.Errorf("network %s: %w", n.label, err)
	}
	var a6 netip.Addr
	if n.gw6.IsValid() {
		if a6, err = nthAddr(n.prefix6, host); err != nil {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("network %s: %w", n.label, err)
		}
	}
	idx := ns.plug()
	eth := "eth" + strconv.Itoa(idx)
	peer := "v" + strconv.Itoa(host-2)
	r := n.router.name
	cmds := [][]string{
		// Both ends are made in the harness's namespaces: ip enters ns, and
		// the kernel creates the peer directly in the router's.
		{"-n", ns.name, "link", "add", eth, "type", "veth", "peer", "name", peer, "netns", r},
		{"-n", r, "link", "set", peer, "master", "br0"},
		{"-n", r, "link", "set", peer, "up"},
		{"-n", ns.name, "addr", "add", netip.PrefixFrom(a, n.prefix.Bits()).String(), "dev", eth},
	}
	if a6.IsValid() {
		cmds = append(cmds, []string{"-n", ns.name, "addr", "add", netip.PrefixFrom(a6, n.prefix6.Bits()).String(), "dev", eth, "nodad"})
	}
	cmds = append(cmds, []string{"-n", ns.name, "link", "set", eth, "up"})
	if idx == 0 {
		cmds = append(cmds, []string{"-n", ns.name, "route", "add", "default", "via", n.gateway.String(), "dev", eth})
		if a6.IsValid() {
			cmds = append(cmds, []string{"-n", ns.name, "-6", "route", "add", "default", "via", n.gw6.String(), "dev", eth})
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	if err := ipBatch(ctx, cmds...); err != nil {
		return netip.Addr{}, netip.Addr{}, fmt.Errorf("network %s: plug %s in: %w", n.label, ns.name, err)
	}
	if idx == 0 {
		ns.setAddrs(a, a6)
	}
	return a, a6, nil
}

// nthAddr is host number i of p, refusing the broadcast address and
// anything outside p.
func nthAddr(p netip.Prefix, i int) (netip.Addr, error) {
	a := p.Addr()
	for range i {
		a = a.Next()
	}
	last := a.Next()
	if !p.Contains(a) || (a.Is4() && !p.Contains(last)) {
		return netip.Addr{}, fmt.Errorf("no free address left in %s", p)
	}
	return a, nil
}
