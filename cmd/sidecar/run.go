package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/internal/bootstrap"
	"github.com/isthmus-mesh/isthmus/internal/hostport"
	"github.com/isthmus-mesh/isthmus/pkg/sidecar"
	"github.com/isthmus-mesh/isthmus/pkg/sidecar/dns"
	"github.com/isthmus-mesh/isthmus/pkg/version"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

func init() { addCommand(newRunCommand) }

func newRunCommand(g *globals) *cobra.Command {
	cfg := sidecar.DefaultConfig()
	dnsCfg := dns.DefaultConfig()
	var concurrency int
	var boot bootstrap.Flags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the proxy beside the workload",
		Long: `Runs the sidecar: it gets its SVID from the federator's CA (a key made
here, a CSR authenticated with the pod's projected ServiceAccount token),
its configuration from the federator over xDS (docs/sidecar-xds.md), and
then proxies the app's outbound traffic (--outbound-addr, where
'sidecar iptables' redirects it, or explicitly as an HTTP proxy), the
pod's inbound traffic (--inbound-addr, mTLS only), and the app's DNS
queries for clusterset names (--dns-addr). It serves /config_dump, /ready
and /stats on --admin-addr, and /healthz/ready and /stats/prometheus on
--health-addr.

On SIGTERM it fails readiness, stops accepting, lets requests in flight
finish for --drain-timeout, and exits.`,
		Example: `  sidecar run --cluster-name alpha --pod-ip $POD_IP --pod-name $POD_NAME --namespace demo --service-account web
  sidecar run --xds-plaintext --xds-address 127.0.0.1:15010 --ca-address 127.0.0.1:15012 ...`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var cores error
			if concurrency < 0 {
				cores = fmt.Errorf("--concurrency %d: want 0 (Go's choice) or a number of cores", concurrency)
			}
			if err := errors.Join(boot.CheckNode(), boot.CheckAddresses(), cfg.Validate(), dnsValidate(dnsCfg), cores); err != nil {
				return err
			}
			_, env := os.LookupEnv("GOMAXPROCS")
			if n := procsFor(concurrency, cmd.Flags().Changed("concurrency"), env); n > 0 {
				runtime.GOMAXPROCS(n)
			}
			log := g.logger(cmd.ErrOrStderr())
			log.Info("configuration", "version", version.Version, "xds", boot.XDSAddress, "xdsPlaintext", boot.XDSPlaintext,
				"ca", boot.CAAddress, "cluster", boot.ClusterName, "pod", boot.PodName, "podIP", boot.PodIP, "namespace", boot.Namespace,
				"serviceAccount", boot.ServiceAccount, "trustDomain", boot.TrustDomainName(),
				"outbound", cfg.OutboundAddr, "inbound", cfg.InboundAddr, "admin", cfg.AdminAddr, "health", cfg.HealthAddr,
				"app", cfg.AppAddr, "dns", dnsCfg.ListenAddr, "maxConnections", cfg.MaxConnections, "drainTimeout", cfg.DrainTimeout,
				"gomaxprocs", runtime.GOMAXPROCS(0))
			return runSidecar(cmd.Context(), boot, cfg, dnsCfg, log)
		},
	}
	fl := cmd.Flags()
	boot.Register(fl, bootstrap.Defaults{})
	fl.StringVar(&cfg.OutboundAddr, "outbound-addr", cfg.OutboundAddr, "where the app's outbound connections arrive (iptables REDIRECT, or explicitly)")
	fl.StringVar(&cfg.InboundAddr, "inbound-addr", cfg.InboundAddr, "where connections to the pod arrive (iptables REDIRECT)")
	fl.StringVar(&cfg.AdminAddr, "admin-addr", cfg.AdminAddr, "admin: /config_dump, /ready, /stats; empty disables it")
	fl.StringVar(&cfg.HealthAddr, "health-addr", cfg.HealthAddr, "health and metrics: /healthz/ready, /stats/prometheus; empty disables it")
	fl.TextVar(&cfg.AppAddr, "app-addr", cfg.AppAddr, "the app's address: inbound traffic goes to it at the port the caller dialled (from 127.0.0.6 when it is the pod's IPv4 address, which capture lets through; an IPv6 one must be ::1)")
	fl.IntVar(&cfg.MaxConnections, "max-connections", cfg.MaxConnections, "connections open at once per listener; beyond it new ones are reset")
	fl.DurationVar(&cfg.HandshakeTimeout, "handshake-timeout", cfg.HandshakeTimeout, "bound on a TLS handshake, inbound or upstream")
	fl.DurationVar(&cfg.ReadHeaderTimeout, "read-header-timeout", cfg.ReadHeaderTimeout, "bound on reading an HTTP/1.1 request's headers")
	fl.DurationVar(&cfg.HTTPIdleTimeout, "http-idle-timeout", cfg.HTTPIdleTimeout, "close a downstream HTTP connection with no request this long")
	fl.DurationVar(&cfg.StreamIdleTimeout, "stream-idle-timeout", cfg.StreamIdleTimeout, "end a request with no byte of body either way this long")
	fl.DurationVar(&cfg.UpstreamIdleTimeout, "upstream-idle-timeout", cfg.UpstreamIdleTimeout, "close a pooled upstream connection unused this long")
	fl.IntVar(&cfg.MaxIdlePerEndpoint, "max-idle-per-endpoint", cfg.MaxIdlePerEndpoint, "idle HTTP/1.1 connections kept per upstream endpoint")
	fl.IntVar(&cfg.MaxConnectAttempts, "max-connect-attempts", cfg.MaxConnectAttempts, "endpoints a connection or request tries before it fails")
	fl.DurationVar(&cfg.EjectionTime, "ejection-time", cfg.EjectionTime, "how long an endpoint that failed to connect is skipped")
	fl.DurationVar(&cfg.DrainTimeout, "drain-timeout", cfg.DrainTimeout, "on SIGTERM, how long requests and connections in flight may finish; also how long an inbound HTTP connection whose chain a new configuration removed (a policy change) may finish its request before it is closed")
	fl.StringVar(&dnsCfg.ListenAddr, "dns-addr", dnsCfg.ListenAddr, "the DNS proxy (UDP and TCP), where 'sidecar iptables' sends the app's queries; empty disables it")
	fl.BoolVar(&dnsCfg.IPv6Loopback, "dns-ipv6-loopback", dnsCfg.IPv6Loopback, "with --dns-addr on 127.0.0.1, serve [::1] at the same port too, where 'sidecar iptables --ipv6' sends IPv6 queries")
	fl.StringVar(&dnsCfg.ResolvConf, "dns-resolv-conf", dnsCfg.ResolvConf, "resolv.conf whose nameservers and search list the DNS proxy forwards to and expands")
	fl.StringSliceVar(&dnsCfg.Upstreams, "dns-upstreams", nil, "resolvers (ip:port) to forward to instead of resolv.conf's nameservers")
	fl.IntVar(&concurrency, "concurrency", 1, "CPU cores the sidecar runs on at once (GOMAXPROCS; Istio's proxy concurrency); 0: Go's choice, the container's CPU limit else every core. The GOMAXPROCS environment variable overrides the default")
	return cmd
}

// procsFor is the GOMAXPROCS --concurrency asks for (0: leave Go's):
// GOMAXPROCS in the environment wins over the flag's default, not over
// the flag given.
func procsFor(concurrency int, given, env bool) int {
	if concurrency <= 0 || (env && !given) {
		return 0
	}
	return concurrency
}

func dnsValidate(c dns.Config) error {
	if c.ListenAddr == "" {
		return nil
	}
	// dns.Config.Validate checks host:port; a port out of range would
	// fail only at Listen, after the SVID was obtained.
	if err := c.Validate(); err != nil {
		return err
	}
	if err := hostport.CheckListen(c.ListenAddr); err != nil {
		return fmt.Errorf("--dns-addr %q: %w", c.ListenAddr, err)
	}
	return nil
}

// runSidecar is the sidecar's composition: identity, xDS client, proxy and
// DNS proxy, until ctx ends and each has stopped.
func runSidecar(ctx context.Context, boot bootstrap.Flags, cfg sidecar.Config, dnsCfg dns.Config, log *slog.Logger) error {
	// The SVID first: the data plane speaks only mTLS, whatever xDS does.
	svid, err := boot.Identity(ctx, log)
	if err != nil {
		return err
	}
	defer func() { _ = svid.Close() }()
	cc, err := boot.ClientConfig(xdsclient.SidecarNode(boot.ClusterName, boot.PodIP, boot.PodName, boot.Namespace), svid, sidecar.Check, log)
	if err != nil {
		return err
	}
	client, err := xdsclient.New(cc)
	if err != nil {
		return err
	}
	// dnsProxy is set before proxy.Run, which calls OnConfig.
	var dnsProxy *dns.Proxy
	proxy, err := sidecar.New(cfg, client, svid, sidecar.Options{
		Logger: log,
		OnConfig: func(c *xdsclient.Config) {
			if dnsProxy == nil {
				return
			}
			if err := dnsProxy.SetTable(c.Sidecar.NameTable()); err != nil {
				log.Warn("DNS name table refused; the DNS proxy keeps the last one", "error", err)
			}
		},
	})
	if err != nil {
		return err
	}
	if dnsCfg.ListenAddr != "" {
		if dnsProxy, err = dns.New(dnsCfg, dns.Options{Logger: log, Meter: proxy.Meter()}); err != nil {
			// Release the proxy's listeners: Run with an ended context
			// drains at once.
			done, cancel := context.WithCancel(ctx)
			cancel()
			_ = proxy.Run(done)
			return fmt.Errorf("DNS proxy: %w", err)
		}
	}
	eg, ectx := errgroup.WithContext(ctx)
	eg.Go(func() error { return client.Run(ectx) })
	eg.Go(func() error { return proxy.Run(ectx) })
	if dnsProxy != nil {
		eg.Go(func() error { return dnsProxy.Run(ectx) })
	}
	return eg.Wait()
}
