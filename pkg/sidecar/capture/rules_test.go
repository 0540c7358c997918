package capture

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

func TestRulesGolden(t *testing.T) {
	custom := DefaultConfig()
	custom.OutboundPort, custom.InboundPort, custom.DNSPort = 16001, 16006, 16053
	custom.ProxyUIDs = []uint32{1500, 1337, 1500}
	custom.ProxyGIDs = nil
	custom.ProxyPorts = []uint16{15000, 15090}
	custom.ExcludeInboundPorts = []uint16{22, 8443, 22}
	custom.ExcludeOutboundPorts = []uint16{5432, 3306}
	custom.ExcludeOutboundCIDRs = []netip.Prefix{
		netip.MustParsePrefix("10.1.2.3/8"), // masked to 10.0.0.0/8
		netip.MustParsePrefix("169.254.169.254/32"),
		netip.MustParsePrefix("fd00:ec2::254/128"),
	}
	custom.DNSServers = []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:10:96::a")}
	custom.IPv6 = true

	noDNS := DefaultConfig()
	noDNS.DNSPort = 0
	noDNS.ProxyGIDs = []uint32{1337}
	noDNS.ProxyUIDs = nil

	v4DNSOnly := DefaultConfig()
	v4DNSOnly.IPv6 = true
	v4DNSOnly.DNSServers = []netip.Addr{netip.MustParseAddr("10.96.0.10")}

	dual := DefaultConfig()
	dual.IPv6 = true

	for name, c := range map[string]Config{
		"default":                  DefaultConfig(),
		"default-ipv6":             dual,
		"custom":                   custom,
		"no-dns-gid-only":          noDNS,
		"ipv4-dns-server-and-ipv6": v4DNSOnly,
	} {
		t.Run(name, func(t *testing.T) {
			rs, err := Rules(c)
			require.NoError(t, err)
			if !c.IPv6 {
				require.Equal(t, blockTable().render(nil), rs.IPv6, "IPv6 not captured: refused")
			}
			golden(t, filepath.Join("testdata", name+".rules"), rs.String())
		})
	}
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "run go test -update to create it")
	require.Equal(t, string(want), got, "rules changed; if that is intended, run go test ./pkg/sidecar/capture -update and review the diff")
}

// TestRulesOrder checks the properties the golden files only show: what
// must come before what for the capture to be correct.
func TestRulesOrder(t *testing.T) {
	c := DefaultConfig()
	c.ExcludeOutboundPorts = []uint16{3306}
	rs, err := Rules(c)
	require.NoError(t, err)
	lines := strings.Split(rs.IPv4, "\n")
	idx := func(rule string) int {
		t.Helper()
		for i, l := range lines {
			if l == rule {
				return i
			}
		}
		t.Fatalf("rule %q missing from\n%s", rule, rs.IPv4)
		return -1
	}
	before := func(a, b string) {
		t.Helper()
		require.Less(t, idx(a), idx(b), "%q must come before %q", a, b)
	}
	// The sidecar's own DNS queries go out before any DNS redirect.
	before("-A ISTHMUS_OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j RETURN",
		"-A ISTHMUS_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053")
	// DNS to a resolver on loopback is still captured.
	before("-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
		"-A ISTHMUS_OUTPUT -o lo -j RETURN")
	// The sidecar calling its pod IP is captured inbound before its
	// traffic is let through.
	before("-A ISTHMUS_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTHMUS_IN_REDIRECT",
		"-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN")
	before("-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN", "-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT")
	before("-A ISTHMUS_INBOUND -p tcp -m tcp --dport 15006 -j RETURN", "-A ISTHMUS_INBOUND -p tcp -j ISTHMUS_IN_REDIRECT")
	// Jumps come last, once the chains are complete.
	before("-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001", "-A PREROUTING -p tcp -j ISTHMUS_INBOUND")
	require.Equal(t, "COMMIT", lines[len(lines)-2])
}

// TestBlockOrder checks what the block chain must let through before it
// rejects, and that it does reject.
func TestBlockOrder(t *testing.T) {
	rs, err := Rules(DefaultConfig())
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(rs.IPv6, "# Isthmus sidecar capture, IPv6 not captured, inbound IPv6 refused: input for ip6tables-restore --noflush\n*filter\n"), rs.IPv6)
	require.NotContains(t, rs.IPv6, "*nat")
	lines := strings.Split(rs.IPv6, "\n")
	idx := func(rule string) int {
		t.Helper()
		i := slices.Index(lines, rule)
		require.GreaterOrEqual(t, i, 0, "rule %q missing from\n%s", rule, rs.IPv6)
		return i
	}
	reject := idx("-A ISTHMUS_INPUT6_BLOCK -p tcp -j REJECT --reject-with tcp-reset")
	for _, accept := range []string{
		"-A ISTHMUS_INPUT6_BLOCK -i lo -j ACCEPT",
		"-A ISTHMUS_INPUT6_BLOCK -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
		"-A ISTHMUS_INPUT6_BLOCK -p ipv6-icmp -j ACCEPT",
	} {
		require.Less(t, idx(accept), reject, "%q must come before the rejects", accept)
	}
	// Neighbour discovery is untracked or INVALID to conntrack: let it
	// through before INVALID is dropped.
	require.Less(t, idx("-A ISTHMUS_INPUT6_BLOCK -p ipv6-icmp -j ACCEPT"), idx("-A ISTHMUS_INPUT6_BLOCK -m conntrack --ctstate INVALID -j DROP"))
	require.Less(t, reject, idx("-A ISTHMUS_INPUT6_BLOCK -j REJECT --reject-with icmp6-port-unreachable"))
	require.Equal(t, "-A INPUT -j ISTHMUS_INPUT6_BLOCK", lines[len(lines)-3], "the jump last, once the chain is complete")
}

func TestValidate(t *testing.T) {
	require.NoError(t, DefaultConfig().Validate())
	for name, tc := range map[string]struct {
		mutate func(*Config)
		want   []string
	}{
		"zero value": {
			mutate: func(c *Config) { *c = Config{} },
			want: []string{"outbound capture port: 0 is not a port", "inbound capture port: 0 is not a port",
				"no proxy uid or gid"},
		},
		"same capture ports": {
			mutate: func(c *Config) { c.InboundPort = c.OutboundPort; c.DNSPort = c.OutboundPort },
			want:   []string{"inbound and outbound capture ports are both 15001", "DNS capture port 15001 is also a TCP capture port"},
		},
		"DNS servers without DNS capture": {
			mutate: func(c *Config) { c.DNSPort = 0; c.DNSServers = []netip.Addr{netip.MustParseAddr("10.0.0.10")} },
			want:   []string{"DNS servers are given but DNS capture is off"},
		},
		"bad DNS servers": {
			mutate: func(c *Config) {
				c.DNSServers = []netip.Addr{{}, netip.MustParseAddr("fe80::1%eth0"), netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("fd00::53")}
			},
			want: []string{"DNS server: empty address", "DNS server fe80::1%eth0: iptables cannot match an address with a zone",
				"DNS server ::ffff:10.0.0.1: write IPv4-mapped addresses as IPv4 (10.0.0.1)", "DNS server fd00::53 is IPv6 but IPv6 capture is off"},
		},
		"uid -1": {
			mutate: func(c *Config) { c.ProxyUIDs = []uint32{1<<32 - 1}; c.ProxyGIDs = []uint32{1<<32 - 1} },
			want:   []string{"proxy uid 4294967295 is not a uid", "proxy gid 4294967295 is not a gid"},
		},
		"port 0": {
			mutate: func(c *Config) {
				c.ProxyPorts = []uint16{0}
				c.ExcludeInboundPorts = []uint16{0}
				c.ExcludeOutboundPorts = []uint16{80, 0}
			},
			want: []string{"proxy ports: 0 is not a port", "excluded inbound ports: 0 is not a port", "excluded outbound ports: 0 is not a port"},
		},
		"bad CIDRs": {
			mutate: func(c *Config) {
				c.ExcludeOutboundCIDRs = []netip.Prefix{{}, netip.MustParsePrefix("::ffff:10.0.0.0/104"), netip.MustParsePrefix("fd00::/8")}
			},
			want: []string{"excluded outbound CIDR: empty prefix", "excluded outbound CIDR ::ffff:10.0.0.0/104: write IPv4-mapped prefixes as IPv4",
				"excluded outbound CIDR fd00::/8 is IPv6 but IPv6 capture is off"},
		},
	} {
		t.Run(name, func(t *testing.T) {
			c := DefaultConfig()
			tc.mutate(&c)
			err := c.Validate()
			require.Error(t, err)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
			require.Len(t, strings.Split(err.Error(), "\n"), len(tc.want), "every problem once, nothing else: %v", err)
			_, rerr := Rules(c)
			require.Equal(t, err.Error(), rerr.Error())
		})
	}
}

const savedFresh = `# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 03:25:13 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -d 192.0.2.1/32 -m comment --comment "keep -j ISTHMUS_OUTPUT \"quoted\"" -j RETURN
COMMIT
# Completed on Sun Nov 22 03:25:13 2026
`

func TestJumpEdits(t *testing.T) {
	want := buildTable(DefaultConfig(), ipv4).jumps
	t.Run("fresh table: add both", func(t *testing.T) {
		require.Equal(t, want, jumpEdits(natChains, want, savedFresh))
	})
	t.Run("already there exactly: nothing", func(t *testing.T) {
		saved := strings.Replace(savedFresh, "-A OUTPUT -d", want[0]+"\n"+want[1]+"\n-A OUTPUT -d", 1)
		got := jumpEdits(natChains, want, saved)
		require.NotNil(t, got)
		require.Empty(t, got)
	})
	t.Run("duplicated and foreign jumps: delete all, add once", func(t *testing.T) {
		saved := strings.Replace(savedFresh, "COMMIT", want[1]+"\n"+want[1]+"\n-A POSTROUTING -j ISTHMUS_REDIRECT\n-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT\nCOMMIT", 1)
		require.Equal(t, []string{
			"-D OUTPUT -j ISTHMUS_OUTPUT",
			"-D OUTPUT -j ISTHMUS_OUTPUT",
			"-D POSTROUTING -j ISTHMUS_REDIRECT",
			want[0], want[1],
		}, jumpEdits(natChains, want, saved))
	})
	t.Run("the block's jump in the filter table", func(t *testing.T) {
		block := blockTable()
		saved := strings.Replace(savedFilterFresh, "COMMIT", "-A INPUT -j ISTHMUS_INPUT6_BLOCK\n-A INPUT -j ISTHMUS_INPUT6_BLOCK\nCOMMIT", 1)
		require.Equal(t, []string{"-D INPUT -j ISTHMUS_INPUT6_BLOCK", "-D INPUT -j ISTHMUS_INPUT6_BLOCK", block.jumps[0]}, jumpEdits(block.chains, block.jumps, saved))
		require.Equal(t, block.jumps, jumpEdits(block.chains, block.jumps, savedFilterFresh))
		require.Equal(t, want, jumpEdits(natChains, want, saved), "a jump to the block is not one to nat's chains")
	})
}

const savedFilterFresh = `# Generated by ip6tables-save v1.8.9 (nf_tables) on Sun Nov 22 03:25:13 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -s 2001:db8::1/128 -j ACCEPT
COMMIT
`

func TestRemoveInput(t *testing.T) {
	require.Empty(t, removeInput("nat", natChains, savedFresh), "nothing of ours: nothing to do")
	saved := strings.Replace(savedFresh, ":POSTROUTING ACCEPT [0:0]\n",
		":POSTROUTING ACCEPT [0:0]\n:ISTHMUS_OUTPUT - [0:0]\n:ISTHMUS_REDIRECT - [0:0]\n:OTHER - [0:0]\n", 1)
	saved = strings.Replace(saved, "COMMIT", "-A OUTPUT -j ISTHMUS_OUTPUT\n-A OTHER -g ISTHMUS_REDIRECT\n-A ISTHMUS_OUTPUT -j ISTHMUS_REDIRECT\nCOMMIT", 1)
	require.Equal(t, `# Isthmus sidecar capture: removal
*nat
-D OUTPUT -j ISTHMUS_OUTPUT
-D OTHER -g ISTHMUS_REDIRECT
-F ISTHMUS_OUTPUT
-F ISTHMUS_REDIRECT
-X ISTHMUS_OUTPUT
-X ISTHMUS_REDIRECT
COMMIT
`, removeInput("nat", natChains, saved))

	require.Empty(t, removeInput("filter", blockChains, savedFilterFresh))
	saved = strings.Replace(savedFilterFresh, ":OUTPUT ACCEPT [0:0]\n", ":OUTPUT ACCEPT [0:0]\n:ISTHMUS_INPUT6_BLOCK - [0:0]\n", 1)
	saved = strings.Replace(saved, "COMMIT", "-A INPUT -j ISTHMUS_INPUT6_BLOCK\n-A ISTHMUS_INPUT6_BLOCK -j REJECT --reject-with icmp6-port-unreachable\nCOMMIT", 1)
	require.Equal(t, `# Isthmus sidecar capture: removal
*filter
-D INPUT -j ISTHMUS_INPUT6_BLOCK
-F ISTHMUS_INPUT6_BLOCK
-X ISTHMUS_INPUT6_BLOCK
COMMIT
`, removeInput("filter", blockChains, saved))
}

// TestNoTableMessages: what the save commands print when the kernel
// cannot give them a table (no IPv6, a legacy module not loaded) marks
// the table as missing, not as a failure.
func TestNoTableMessages(t *testing.T) {
	for _, stderr := range []string{
		"ip6tables-save v1.8.9 (legacy): Cannot initialize: Table does not exist (do you need to insmod?)",
		"ip6tables-save v1.8.7 (legacy): Cannot initialize: Address family not supported by protocol",
		"ip6tables-nft-save/1.8.9 Failed to initialize nft: Protocol not supported",
		"Table `filter' does not exist",
		"can't initialize ip6tables table `filter': Table does not exist (do you need to insmod?)",
	} {
		require.True(t, noTableRe.MatchString(stderr), stderr)
	}
	for _, stderr := range []string{
		"Another app is currently holding the xtables lock. Perhaps you want to use the -w option?",
		"ip6tables-save v1.8.9 (nf_tables): Permission denied (you must be root)",
		"Chain 'NOPE' does not exist",
	} {
		require.False(t, noTableRe.MatchString(stderr), stderr)
	}
}

func TestSplitArgs(t *testing.T) {
	require.Equal(t,
		[]string{"-A", "OUTPUT", "-m", "comment", "--comment", `a "b" -j X`, "-j", "RETURN"},
		splitArgs(`-A OUTPUT -m comment --comment "a \"b\" -j X" -j RETURN`))
	require.Equal(t, []string{"-A", "X", ""}, splitArgs(`-A  X ""`))
}

func TestRestoreErrorBlamesLine(t *testing.T) {
	input := "*nat\n:ISTHMUS_OUTPUT - [0:0]\n-A ISTHMUS_OUTPUT -j NOPE\nCOMMIT\n"
	for _, stderr := range []string{
		"iptables-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\nError occurred at line: 3\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
		"iptables-restore v1.8.9 (nf_tables): \nline 3: CHAIN_USER_DEL failed (Device or resource busy): chain X\n",
	} {
		e := newRestoreError("iptables-restore --noflush", input, stderr, os.ErrInvalid)
		require.Equal(t, 3, e.Line)
		require.Equal(t, "-A ISTHMUS_OUTPUT -j NOPE", e.Input)
		require.Contains(t, e.Error(), strings.TrimSpace(stderr))
		require.Contains(t, e.Error(), "[input line 3: -A ISTHMUS_OUTPUT -j NOPE]")
		require.ErrorIs(t, e, os.ErrInvalid)
	}
	e := newRestoreError("iptables-restore --noflush", input, "line 99: nonsense", os.ErrInvalid)
	require.Zero(t, e.Line, "a line beyond the input is not quoted")
}

func TestRunnerBackend(t *testing.T) {
	for backend, want := range map[string][2]string{
		"":       {"ip6tables-restore", "iptables"},
		"nft":    {"ip6tables-nft-restore", "iptables-nft"},
		"legacy": {"ip6tables-legacy-restore", "iptables-legacy"},
	} {
		r := Runner{Backend: backend}
		require.NoError(t, r.Validate())
		for i, base := range []string{"ip6tables-restore", "iptables"} {
			got, err := r.command(base)
			require.NoError(t, err)
			require.Equal(t, want[i], got)
		}
	}
	err := Runner{Backend: "iptables-legacy"}.Validate()
	require.ErrorContains(t, err, `iptables backend "iptables-legacy": want empty (the system's default), nft or legacy`)
	_, err = Runner{Backend: "x"}.Apply(t.Context(), DefaultConfig())
	require.ErrorContains(t, err, `iptables backend "x"`)
	require.ErrorContains(t, Runner{Backend: "x"}.Remove(t.Context(), DefaultConfig()), `iptables backend "x"`)
}
