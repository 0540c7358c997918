package main

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/isthmus-mesh/isthmus/pkg/sidecar/capture"
	"github.com/isthmus-mesh/isthmus/test/netns"
)

// execute runs the sidecar command with args in process and returns its
// stdout and stderr.
func execute(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	root := newRootCommand()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(args)
	err = root.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

func TestIptablesDryRun(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		args []string
		cfg  func() capture.Config
	}{
		"defaults": {cfg: capture.DefaultConfig},
		"every flag": {
			args: []string{
				"--outbound-port", "16001", "--inbound-port=16006", "--dns-port", "16053",
				"--dns-servers", "10.96.0.10,fd00:10::a", "--proxy-uid", "1500", "--proxy-uid", "1501", "--proxy-gid=",
				"--proxy-ports", "15000", "--exclude-inbound-ports", "22, 8443", "--exclude-outbound-ports", "3306",
				"--exclude-outbound-cidrs", "169.254.169.254,10.0.0.0/8,fd00::/8", "--ipv6",
			},
			cfg: func() capture.Config {
				c := capture.DefaultConfig()
				c.OutboundPort, c.InboundPort, c.DNSPort = 16001, 16006, 16053
				c.DNSServers = []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:10::a")}
				c.ProxyUIDs, c.ProxyGIDs = []uint32{1500, 1501}, nil
				c.ProxyPorts = []uint16{15000}
				c.ExcludeInboundPorts = []uint16{22, 8443}
				c.ExcludeOutboundPorts = []uint16{3306}
				c.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32"),
					netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}
				c.IPv6 = true
				return c
			},
		},
		"no DNS capture": {
			args: []string{"--dns-port", "0"},
			cfg:  func() capture.Config { c := capture.DefaultConfig(); c.DNSPort = 0; return c },
		},
	} {
		t.Run(name, func(t *testing.T) {
			want, err := capture.Rules(tc.cfg())
			require.NoError(t, err)
			out, _, err := execute(t.Context(), append([]string{"iptables", "--dry-run"}, tc.args...)...)
			require.NoError(t, err)
			require.Equal(t, want.String(), out)
		})
	}
}

func TestIptablesBadFlags(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		args []string
		want []string
	}{
		"port out of range":  {[]string{"--outbound-port", "70000"}, []string{`invalid argument "70000" for "--outbound-port" flag: "70000" is not a port (1 to 65535)`}},
		"port zero":          {[]string{"--inbound-port", "0"}, []string{`invalid argument "0" for "--inbound-port" flag: 0 is not a port`}},
		"bad port in a list": {[]string{"--exclude-outbound-ports", "80,http"}, []string{`"--exclude-outbound-ports" flag: "http" is not a port`}},
		"empty list element": {[]string{"--exclude-inbound-ports", "80,,81"}, []string{`"--exclude-inbound-ports" flag: empty element in the list`}},
		"bad CIDR":           {[]string{"--exclude-outbound-cidrs", "10.0.0.0/33"}, []string{`"10.0.0.0/33" is not a CIDR (like 10.0.0.0/8) or an IP address`}},
		"bad uid":            {[]string{"--proxy-uid", "-1"}, []string{`"-1" is not a uid (0 to 4294967294)`}},
		"bad DNS server":     {[]string{"--dns-servers", "dns.example"}, []string{`"dns.example" is not an IP address`}},
		"no proxy identity":  {[]string{"--proxy-uid=", "--proxy-gid="}, []string{"no proxy uid or gid"}},
		"IPv6 without --ipv6": {[]string{"--dns-servers", "fd00::53", "--exclude-outbound-cidrs", "fd00::/8"},
			[]string{"DNS server fd00::53 is IPv6 but IPv6 capture is off", "excluded outbound CIDR fd00::/8 is IPv6 but IPv6 capture is off"}},
		"same ports":         {[]string{"--inbound-port", "15001"}, []string{"inbound and outbound capture ports are both 15001"}},
		"dry run and remove": {[]string{"--remove"}, []string{"if any flags in the group [dry-run remove] are set none of the others can be"}},
		"bad backend":        {[]string{"--backend", "iptables-nft"}, []string{`--backend: iptables backend "iptables-nft": want empty (the system's default), nft or legacy`}},
		"bad timeout":        {[]string{"--timeout", "0s"}, []string{"--timeout 0s: want a positive duration"}},
		"an argument":        {[]string{"extra"}, []string{`unknown command "extra" for "sidecar iptables"`}},
	} {
		t.Run(name, func(t *testing.T) {
			// --dry-run keeps a flag that slipped through from touching
			// this namespace's iptables.
			_, _, err := execute(t.Context(), append([]string{"iptables", "--dry-run"}, tc.args...)...)
			require.Error(t, err)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
		})
	}
}

func TestSubcommands(t *testing.T) {
	t.Parallel()
	var names []string
	for _, c := range newRootCommand().Commands() {
		names = append(names, c.Name())
	}
	require.Equal(t, []string{"iptables", "run"}, names)
	_, _, err := execute(t.Context(), "inject")
	require.ErrorContains(t, err, `unknown command "inject" for "sidecar"`)
}

// TestIptablesApplyAndRemove runs the command in a pod's namespace, as the
// init step would.
func TestIptablesApplyAndRemove(t *testing.T) {
	t.Parallel()
	ns := netns.New(t, "sidecar-cmd")
	save := func() string {
		out, err := ns.Run(t.Context(), "iptables-save", "-t", "nat")
		require.NoError(t, err)
		return out
	}
	save6 := func() string {
		out, err := ns.Run(t.Context(), "ip6tables-save", "-t", "filter")
		require.NoError(t, err)
		return out
	}
	var stderr string
	require.NoError(t, ns.Do(func() error {
		var err error
		_, stderr, err = execute(t.Context(), "iptables", "--exclude-outbound-ports", "3306", "--log-json")
		return err
	}))
	require.Contains(t, stderr, `"msg":"applied the capture rules"`)
	require.Contains(t, stderr, `"ipv6InboundRefused":true`)
	require.Contains(t, save6(), "-A INPUT -j "+capture.ChainInput6Block, "without --ipv6, inbound IPv6 is refused")
	saved := save()
	require.Contains(t, saved, "-A OUTPUT -j ISTHMUS_OUTPUT")
	require.Contains(t, saved, "-A ISTHMUS_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN")

	require.NoError(t, ns.Do(func() error {
		_, _, err := execute(t.Context(), "iptables", "--remove")
		return err
	}))
	require.NotContains(t, save(), "ISTHMUS")
	require.NotContains(t, save6(), "ISTHMUS")
}

// TestBinary runs the built command: its exit status and messages are
// what an init container's logs show.
func TestBinary(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "sidecar")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	out, err := build.CombinedOutput()
	require.NoError(t, err, string(out))

	out, err = exec.CommandContext(ctx, bin, "iptables", "--dry-run", "--outbound-port", "0").CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	require.Equal(t, 1, ee.ExitCode())
	require.True(t, strings.HasPrefix(string(out), `sidecar: invalid argument "0" for "--outbound-port" flag: 0 is not a port`), string(out))

	out, err = exec.CommandContext(ctx, bin, "iptables", "--dry-run").Output()
	require.NoError(t, err)
	require.Contains(t, string(out), "-A ISTHMUS_REDIRECT -p tcp -j REDIRECT --to-ports 15001")

	t.Run("apply in a namespace", func(t *testing.T) {
		ns := netns.New(t, "sidecar-bin")
		_, err := ns.Run(ctx, bin, "iptables", "--ipv6")
		require.NoError(t, err)
		saved, err := ns.Run(ctx, "ip6tables-save", "-t", "nat")
		require.NoError(t, err)
		require.Contains(t, saved, "-A ISTHMUS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006")
	})
	t.Run("without ip6tables and without IPv6 addresses: a note, not a failure", func(t *testing.T) {
		// A PATH with iptables but no ip6tables.
		dir := t.TempDir()
		for _, name := range []string{"iptables-save", "iptables-restore"} {
			p, err := exec.LookPath(name)
			require.NoError(t, err)
			require.NoError(t, os.Symlink(p, filepath.Join(dir, name)))
		}
		ns := netns.New(t, "sidecar-noip6")
		cmd := exec.CommandContext(ctx, bin, "iptables")
		cmd.Env = append(os.Environ(), "PATH="+dir)
		var stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stderr, &stderr
		require.NoError(t, ns.Start(cmd))
		require.NoError(t, cmd.Wait(), stderr.String())
		require.Contains(t, stderr.String(), "inbound IPv6 is not refused: IPv6 cannot reach the pod")
		require.Contains(t, stderr.String(), "no interface but loopback has an IPv6 address")
		saved, err := ns.Run(ctx, "iptables-save", "-t", "nat")
		require.NoError(t, err)
		require.Contains(t, saved, "-A OUTPUT -j ISTHMUS_OUTPUT", "IPv4 is captured all the same")
	})
}
