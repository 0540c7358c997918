package capture

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
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
				require.Empty(t, rs.IPv6)
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
		require.Equal(t, want, jumpEdits(want, savedFresh))
	})
	t.Run("already there exactly: nothing", func(t *testing.T) {
		saved := strings.Replace(savedFresh, "-A OUTPUT -d", want[0]+"\n"+want[1]+"\n-A OUTPUT -d", 1)
		got := jumpEdits(want, saved)
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
		}, jumpEdits(want, saved))
	})
}

func TestRemoveInput(t *testing.T) {
	require.Empty(t, removeInput(savedFresh), "nothing of ours: nothing to do")
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
`, removeInput(saved))
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
	require.ErrorContains(t, Runner{Backend: "x"}.Apply(t.Context(), DefaultConfig()), `iptables backend "x"`)
	require.ErrorContains(t, Runner{Backend: "x"}.Remove(t.Context(), DefaultConfig()), `iptables backend "x"`)
}
