package capture

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The chains Isthmus owns. Apply flushes and refills them; Remove deletes
// them.
const (
	// ChainInbound sees every TCP connection arriving at the pod
	// (PREROUTING): the sidecar's own ports and excluded ports return,
	// the rest goes to ChainInRedirect.
	ChainInbound = "ISTHMUS_INBOUND"
	// ChainInRedirect redirects to the inbound capture port.
	ChainInRedirect = "ISTHMUS_IN_REDIRECT"
	// ChainOutput sees everything the pod sends (OUTPUT): DNS goes to the
	// DNS port, the sidecar's own traffic, loopback and exclusions return,
	// other TCP goes to ChainRedirect.
	ChainOutput = "ISTHMUS_OUTPUT"
	// ChainRedirect redirects to the outbound capture port.
	ChainRedirect = "ISTHMUS_REDIRECT"
	// ChainInput6Block refuses inbound IPv6 when IPv6 is not captured
	// (Config.IPv6 off): in ip6tables' filter table, reached from INPUT,
	// it lets through loopback, the replies of the pod's own connections
	// and ICMPv6 (neighbour discovery), and rejects the rest, so IPv6
	// cannot reach the app around the sidecar. Istio does the same.
	ChainInput6Block = "ISTHMUS_INPUT6_BLOCK"
)

// natChains lists the nat table's chains in the order they are declared.
var natChains = []string{ChainInbound, ChainInRedirect, ChainOutput, ChainRedirect}

// blockChains lists the filter table's chains (ip6tables only).
var blockChains = []string{ChainInput6Block}

// Ruleset is what Apply loads, as iptables-restore input for tables that
// have no Isthmus rules yet. Applying it where the rules already exist
// does not add the jumps from the built-in chains a second time (see
// Apply).
type Ruleset struct {
	// IPv4 is the input for iptables-restore --noflush: the nat table's
	// capture.
	IPv4 string
	// IPv6 is the input for ip6tables-restore --noflush: with Config.IPv6
	// the nat table's capture, as for IPv4; without it the filter table's
	// ChainInput6Block, which refuses inbound IPv6.
	IPv6 string
}

// String is both inputs, each introduced by a comment line naming the
// command it is for.
func (r Ruleset) String() string { return r.IPv4 + r.IPv6 }

// Rules generates the capture rules for c, or says what is wrong with c.
// The rules are written as iptables-save prints them, so a saved table can
// be compared with them line by line.
func Rules(c Config) (Ruleset, error) {
	if err := c.Validate(); err != nil {
		return Ruleset{}, err
	}
	rs := Ruleset{IPv4: buildTable(c, ipv4).render(nil)}
	if c.IPv6 {
		rs.IPv6 = buildTable(c, ipv6).render(nil)
	} else {
		rs.IPv6 = blockTable().render(nil)
	}
	return rs, nil
}

// family holds what differs between iptables and ip6tables.
type family struct {
	name string
	v6   bool
	// localhost is the loopback address REDIRECT sends local traffic to.
	localhost string
	// inboundPassthrough is the source Envoy uses to reach the app on the
	// pod IP (Istio's 127.0.0.6 and ::6): such connections are the
	// sidecar's inbound side delivering, never capture.
	inboundPassthrough string
	// restore and save are the commands' base names.
	restore, save string
}

var (
	ipv4 = family{name: "IPv4", localhost: "127.0.0.1/32", inboundPassthrough: "127.0.0.6/32", restore: "iptables-restore", save: "iptables-save"}
	ipv6 = family{name: "IPv6", v6: true, localhost: "::1/128", inboundPassthrough: "::6/128", restore: "ip6tables-restore", save: "ip6tables-save"}
)

func (f family) has(a netip.Addr) bool { return a.Is6() == f.v6 }

// table is one family's rules in one of its tables, apart from the
// restore framing.
type table struct {
	f family
	// name is the iptables table: nat or filter.
	name string
	// title says what the rules are for, in the input's first line.
	title string
	// chains are ours in this table, in the order they are declared.
	chains []string
	// rules are "-A <our chain> …" lines, grouped by chain.
	rules []string
	// jumps are the "-A <built-in chain> … -j <our chain>" lines.
	jumps []string
}

// buildTable is f's capture: the nat table.
func buildTable(c Config, f family) table {
	t := table{f: f, name: "nat", title: f.name, chains: natChains}
	add := func(chain string, args ...string) {
		t.rules = append(t.rules, "-A "+chain+" "+strings.Join(args, " "))
	}
	port := func(p uint16) string { return strconv.Itoa(int(p)) }
	type owner struct{ match, id string }
	var owners []owner
	for _, u := range sortedUnique(c.ProxyUIDs) {
		owners = append(owners, owner{"--uid-owner", strconv.FormatUint(uint64(u), 10)})
	}
	for _, g := range sortedUnique(c.ProxyGIDs) {
		owners = append(owners, owner{"--gid-owner", strconv.FormatUint(uint64(g), 10)})
	}

	add(ChainInRedirect, "-p tcp -j REDIRECT --to-ports", port(c.InboundPort))
	add(ChainRedirect, "-p tcp -j REDIRECT --to-ports", port(c.OutboundPort))

	// The outbound port is captured like any other: a peer that dials
	// it lands on the inbound listener and must present a certificate,
	// as in Istio. Left uncaptured, it would reach the outbound listener,
	// which sends requests into the mesh with this workload's identity.
	inboundExcluded := append([]uint16{c.InboundPort}, c.ProxyPorts...)
	if c.DNSPort != 0 {
		inboundExcluded = append(inboundExcluded, c.DNSPort)
	}
	inboundExcluded = append(inboundExcluded, c.ExcludeInboundPorts...)
	for _, p := range sortedUnique(inboundExcluded) {
		add(ChainInbound, "-p tcp -m tcp --dport", port(p), "-j RETURN")
	}
	add(ChainInbound, "-p tcp -j", ChainInRedirect)

	// DNS first: the app's queries go to the DNS proxy even when they are
	// for a resolver on loopback, which the TCP rules below leave alone.
	if c.DNSPort != 0 {
		var dsts []string
		for _, a := range sortedUniqueAddrs(c.DNSServers) {
			if f.has(a) {
				dsts = append(dsts, "-d "+netip.PrefixFrom(a, a.BitLen()).String()+" ")
			}
		}
		if len(c.DNSServers) == 0 {
			dsts = []string{""}
		}
		if len(dsts) > 0 {
			for _, o := range owners {
				for _, proto := range []string{"udp", "tcp"} {
					add(ChainOutput, "-p", proto, "-m", proto, "--dport 53 -m owner", o.match, o.id, "-j RETURN")
				}
			}
			for _, d := range dsts {
				for _, proto := range []string{"udp", "tcp"} {
					add(ChainOutput, d+"-p", proto, "-m", proto, "--dport 53 -j REDIRECT --to-ports", port(c.DNSPort))
				}
			}
		}
	}
	add(ChainOutput, "! -p tcp -j RETURN")
	add(ChainOutput, "-s", f.inboundPassthrough, "-o lo -j RETURN")
	// The sidecar calling its own pod's address (the app called itself
	// through a service): inbound capture, so inbound policy applies.
	for _, o := range owners {
		add(ChainOutput, "! -d", f.localhost, "-o lo -m owner", o.match, o.id, "-j", ChainInRedirect)
	}
	// The app calling its own pod's address, or anything on loopback:
	// direct, as in Istio.
	add(ChainOutput, "-o lo -j RETURN")
	for _, o := range owners {
		add(ChainOutput, "-m owner", o.match, o.id, "-j RETURN")
	}
	add(ChainOutput, "-d", f.localhost, "-j RETURN")
	for _, p := range sortedUniquePrefixes(c.ExcludeOutboundCIDRs) {
		if f.has(p.Addr()) {
			add(ChainOutput, "-d", p.String(), "-j RETURN")
		}
	}
	for _, p := range sortedUnique(c.ExcludeOutboundPorts) {
		add(ChainOutput, "-p tcp -m tcp --dport", port(p), "-j RETURN")
	}
	add(ChainOutput, "-j", ChainRedirect)

	t.jumps = []string{
		"-A PREROUTING -p tcp -j " + ChainInbound,
		"-A OUTPUT -j " + ChainOutput,
	}
	return t
}

// blockTable is what refuses inbound IPv6 when IPv6 is not captured: the
// filter table's ChainInput6Block, reached from INPUT. In order:
//
//	loopback (the pod calling itself)                  → ACCEPT
//	replies to the pod's own connections, ICMP errors  → ACCEPT
//	ICMPv6 (neighbour discovery: without it a peer
//	cannot even be refused, nor the router answer)     → ACCEPT
//	conntrack INVALID (a stray segment of a live
//	connection, which a reset could kill)              → DROP
//	TCP                                                → REJECT with a reset
//	anything else                                      → REJECT (port unreachable)
func blockTable() table {
	t := table{f: ipv6, name: "filter", title: "IPv6 not captured, inbound IPv6 refused", chains: blockChains}
	for _, r := range []string{
		"-i lo -j ACCEPT",
		"-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
		"-p ipv6-icmp -j ACCEPT",
		"-m conntrack --ctstate INVALID -j DROP",
		"-p tcp -j REJECT --reject-with tcp-reset",
		"-j REJECT --reject-with icmp6-port-unreachable",
	} {
		t.rules = append(t.rules, "-A "+ChainInput6Block+" "+r)
	}
	t.jumps = []string{"-A INPUT -j " + ChainInput6Block}
	return t
}

// render writes the iptables-restore input: our chains declared (which
// flushes them when they exist, even with --noflush), their rules, then
// jumpEdits, or t.jumps when jumpEdits is nil.
func (t table) render(jumpEdits []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Isthmus sidecar capture, %s: input for %s --noflush\n", t.title, t.f.restore)
	b.WriteString("*" + t.name + "\n")
	for _, c := range t.chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	// Grouped by chain, in declaration order, as iptables-save lists them.
	for _, c := range t.chains {
		for _, r := range t.rules {
			if strings.HasPrefix(r, "-A "+c+" ") {
				b.WriteString(r + "\n")
			}
		}
	}
	if jumpEdits == nil {
		jumpEdits = t.jumps
	}
	for _, j := range jumpEdits {
		b.WriteString(j + "\n")
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// sortedUnique returns a sorted copy of s without duplicates.
func sortedUnique[T cmp.Ordered](s []T) []T {
	out := slices.Clone(s)
	slices.Sort(out)
	return slices.Compact(out)
}

// sortedUniqueAddrs is sortedUnique for addresses.
func sortedUniqueAddrs(s []netip.Addr) []netip.Addr {
	out := slices.Clone(s)
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// sortedUniquePrefixes masks, sorts and deduplicates prefixes (iptables
// masks them the same way).
func sortedUniquePrefixes(ps []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
	return slices.Compact(out)
}
