package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/pkg/sidecar/capture"
)

func init() { addCommand(newIptablesCommand) }

func newIptablesCommand(g *globals) *cobra.Command {
	cfg := capture.DefaultConfig()
	var (
		runner         capture.Runner
		dryRun, remove bool
	)
	cmd := &cobra.Command{
		Use:   "iptables",
		Short: "Redirect the pod's traffic to the sidecar (the pod's init step)",
		Long: `Writes the nat rules that send the pod's TCP traffic through the sidecar
(outbound to --outbound-port, inbound to --inbound-port) and the app's DNS
queries to --dns-port, as Istio's istio-iptables does. Run it once in the
pod's network namespace, as root or with CAP_NET_ADMIN, before the app
starts; the sidecar itself must run as --proxy-uid or --proxy-gid.

Without --ipv6 it captures IPv4 only and refuses inbound IPv6 (ip6tables'
filter table: loopback, replies to the pod's own connections and ICMPv6
pass, the rest is rejected), as Istio does, so IPv6 cannot reach the app
around the sidecar; the app's outbound IPv6 is not captured. With no
ip6tables (or a kernel without IPv6) and no IPv6 address on any interface
but lo, IPv6 cannot reach the pod: it says so and carries on. With an IPv6
address there, it fails.

Each table is loaded with one iptables-restore --noflush, applied whole or
not at all. Running it again changes nothing; running it with other flags
(--ipv6 included) replaces the rules. --remove deletes the rules and chains
it made (ISTHMUS_*) and nothing else.`,
		Example: `  sidecar iptables --dry-run
  sidecar iptables --proxy-uid 1337 --exclude-inbound-ports 22 --exclude-outbound-cidrs 169.254.169.254/32
  sidecar iptables --remove`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if runner.Timeout <= 0 {
				return fmt.Errorf("--timeout %s: want a positive duration", runner.Timeout)
			}
			if err := runner.Validate(); err != nil {
				return fmt.Errorf("--backend: %w", err)
			}
			if dryRun {
				rs, err := capture.Rules(cfg)
				if err != nil {
					return err
				}
				_, err = fmt.Fprint(cmd.OutOrStdout(), rs)
				return err
			}
			log := g.logger(cmd.ErrOrStderr()).With("component", "iptables")
			if remove {
				if err := runner.Remove(cmd.Context(), cfg); err != nil {
					return fmt.Errorf("remove capture rules: %w", err)
				}
				log.Info("removed the capture rules", "ipv6", cfg.IPv6)
				return nil
			}
			res, err := runner.Apply(cmd.Context(), cfg)
			if err != nil {
				return fmt.Errorf("apply capture rules: %w", err)
			}
			log.Info("applied the capture rules", "outboundPort", cfg.OutboundPort, "inboundPort", cfg.InboundPort,
				"dnsPort", cfg.DNSPort, "dnsServers", cfg.DNSServers, "proxyUIDs", cfg.ProxyUIDs, "proxyGIDs", cfg.ProxyGIDs,
				"proxyPorts", cfg.ProxyPorts, "excludeInboundPorts", cfg.ExcludeInboundPorts,
				"excludeOutboundPorts", cfg.ExcludeOutboundPorts, "excludeOutboundCIDRs", cfg.ExcludeOutboundCIDRs,
				"ipv6", cfg.IPv6, "ipv6InboundRefused", res.IPv6Refused, "backend", runner.Backend)
			if res.IPv6Skipped != nil {
				// Fine today; an IPv6 address added later would not be
				// covered, so say so where the pod's logs show it.
				log.Warn("inbound IPv6 is not refused: IPv6 cannot reach the pod", "reason", res.IPv6Skipped)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.Var(portValue{p: &cfg.OutboundPort}, "outbound-port", "where the app's outbound TCP connections go (the sidecar's outbound listener)")
	fl.Var(portValue{p: &cfg.InboundPort}, "inbound-port", "where TCP connections to the pod go (the sidecar's inbound listener)")
	fl.Var(portValue{p: &cfg.DNSPort, allowZero: true}, "dns-port", "where the app's DNS queries (UDP and TCP port 53) go, on 127.0.0.1; 0 leaves DNS alone")
	fl.Var(addrsFlag(&cfg.DNSServers), "dns-servers", "capture DNS only to these servers (comma-separated); empty captures port 53 to any server")
	fl.Var(idsFlag(&cfg.ProxyUIDs, "uid"), "proxy-uid", "uids of the sidecar's processes, whose traffic is never captured (comma-separated; empty for none)")
	fl.Var(idsFlag(&cfg.ProxyGIDs, "gid"), "proxy-gid", "gids of the sidecar's processes, whose traffic is never captured (comma-separated; empty for none)")
	fl.Var(portsFlag(&cfg.ProxyPorts), "proxy-ports", "inbound ports the sidecar serves itself (admin, health), never captured; the capture ports never are either")
	fl.Var(portsFlag(&cfg.ExcludeInboundPorts), "exclude-inbound-ports", "inbound ports that reach the app directly (comma-separated)")
	fl.Var(portsFlag(&cfg.ExcludeOutboundPorts), "exclude-outbound-ports", "destination ports the app reaches directly (comma-separated)")
	fl.Var(prefixesFlag(&cfg.ExcludeOutboundCIDRs), "exclude-outbound-cidrs", "destinations the app reaches directly (comma-separated CIDRs or IPs)")
	fl.BoolVar(&cfg.IPv6, "ipv6", false, "capture IPv6 too (ip6tables nat); without it inbound IPv6 is refused and the app's outbound IPv6 goes direct")
	fl.StringVar(&runner.Backend, "backend", "", "iptables backend: empty for the system's default, nft or legacy")
	fl.DurationVar(&runner.Timeout, "timeout", capture.DefaultTimeout, "bound on each iptables command")
	fl.BoolVar(&dryRun, "dry-run", false, "print the iptables-restore input instead of applying it (needs no privileges)")
	fl.BoolVar(&remove, "remove", false, "remove the capture rules instead of applying them, IPv4 and IPv6 (with --ipv6 a missing ip6tables is an error)")
	cmd.MarkFlagsMutuallyExclusive("dry-run", "remove")
	return cmd
}
