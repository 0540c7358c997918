// Command federator is Isthmus's per-cluster control plane and the
// operator's CLI for it.
package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/federator"
	"github.com/isthmus-mesh/isthmus/pkg/version"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "federator:", err)
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "federator",
		Short:         "Isthmus per-cluster control plane",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newRunCommand(), newCACommand(), newTokenCommand(), newJoinCommand(), newStatusCommand(), newVersionCommand())
	return root
}

// groupCommand makes c, a command that only holds subcommands, refuse a
// word that names none of them, as kubectl does (cobra alone prints the
// help and succeeds, so `federator token crate` would do nothing, quietly).
// Alone, it still prints its help.
func groupCommand(c *cobra.Command) *cobra.Command {
	c.Args = cobra.NoArgs
	c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
	return c
}

func newRunCommand() *cobra.Command {
	cfg := federator.DefaultConfig()
	var logLevel slog.Level
	var logJSON bool
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the federator until SIGINT or SIGTERM",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Not given, the delay follows the --max-cert-ttl given (its
			// floor); given, Validate holds it to that floor.
			if !cmd.Flags().Changed("root-publish-delay") {
				cfg.RootPublishDelay = ca.MinPublishDelay(cfg.MaxCertTTL)
			}
			if err := cfg.Validate(); err != nil {
				return err
			}
			if !cmd.Flags().Changed("kubeconfig") {
				// As kubectl: $KUBECONFIG, a list of files merged. Not
				// ~/.kube/config: a federator outside a pod is told
				// which cluster it runs for.
				cfg.Kubeconfig = os.Getenv("KUBECONFIG")
			}
			log := newLogger(logLevel, logJSON)
			log.Info("configuration", "cluster", cfg.ClusterName, "kubeconfig", cfg.Kubeconfig,
				"monitoringAddr", cfg.MonitoringAddr, "caAndXDSAddr", cfg.CAAddr, "xdsPlaintextAddr", cfg.XDSPlaintextAddr,
				"federationAddr", cfg.FederationAddr, "gatewayFederationUpstream", cfg.FederationUpstream(), "gateways", cfg.GatewayAddresses,
				"region", cfg.Region, "rootNamespace", cfg.RootNamespace,
				"shutdownTimeout", cfg.ShutdownTimeout, "version", version.Version)
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			f, err := federator.New(ctx, cfg, log)
			if err != nil {
				return err
			}
			return f.Run(ctx)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&cfg.ClusterName, "cluster-name", cfg.ClusterName, "this cluster's unique name in the mesh (a DNS label)")
	fl.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "path to a kubeconfig (default: $KUBECONFIG, a list of files merged as kubectl merges them, else the in-cluster configuration)")
	fl.Float32Var(&cfg.KubeAPIQPS, "kube-api-qps", cfg.KubeAPIQPS, "requests per second to the API server (client-side limit)")
	fl.IntVar(&cfg.KubeAPIBurst, "kube-api-burst", cfg.KubeAPIBurst, "burst of requests to the API server")
	fl.Float32Var(&cfg.ImportWriteQPS, "import-write-qps", cfg.ImportWriteQPS, "requests per second for writing imported services as ServiceEntries and ServiceImports (3 per new service)")
	fl.IntVar(&cfg.ImportWriteBurst, "import-write-burst", cfg.ImportWriteBurst, "burst of those writes")
	fl.Float32Var(&cfg.TokenReviewQPS, "token-review-qps", cfg.TokenReviewQPS, "TokenReviews per second for the certificate service (a client-side limit of their own, apart from --kube-api-qps)")
	fl.IntVar(&cfg.TokenReviewBurst, "token-review-burst", cfg.TokenReviewBurst, "burst of those TokenReviews")
	fl.Float64Var(&cfg.EstablishQPS, "establish-qps", cfg.EstablishQPS, "Establish calls (peers linking with a token) answered per second; anyone who reaches the federation port can call it; over the limit the joiner is told to retry")
	fl.IntVar(&cfg.EstablishBurst, "establish-burst", cfg.EstablishBurst, "burst of those Establish calls")
	fl.StringVar(&cfg.MonitoringAddr, "monitoring-addr", cfg.MonitoringAddr, "address for /healthz, /readyz, /metrics and /debug/catalog")
	fl.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", cfg.ShutdownTimeout, "bound on graceful shutdown")
	fl.StringVar(&cfg.TrustDomain, "trust-domain", cfg.TrustDomain, "SPIFFE trust domain of this cluster (default <cluster-name>.mesh)")
	fl.StringVar(&cfg.Namespace, "namespace", envOr("POD_NAMESPACE", cfg.Namespace), "namespace the federator runs in and keeps its CA Secret in")
	fl.StringVar(&cfg.ServiceAccount, "service-account", cfg.ServiceAccount, "the federator's ServiceAccount (its SPIFFE ID's last segment)")
	fl.StringVar(&cfg.CAAddr, "ca-addr", cfg.CAAddr, "address of the certificate service and of xDS for the proxies (gRPC over TLS)")
	fl.StringVar(&cfg.BundleEndpointAddr, "bundle-endpoint-addr", cfg.BundleEndpointAddr, "address of the SPIFFE bundle endpoint (https_spiffe); empty disables it")
	fl.StringVar(&cfg.TokenAudience, "token-audience", cfg.TokenAudience, "audience workloads' ServiceAccount tokens must carry")
	fl.DurationVar(&cfg.CertTTL, "cert-ttl", cfg.CertTTL, "default lifetime of workload certificates")
	fl.DurationVar(&cfg.MaxCertTTL, "max-cert-ttl", cfg.MaxCertTTL, "longest lifetime of workload certificates")
	// Default 0 so that the help shows no fixed default: the default
	// follows --max-cert-ttl (RunE).
	fl.DurationVar(&cfg.RootPublishDelay, "root-publish-delay", 0, fmt.Sprintf("during a root rotation, how long the new root is trusted before it signs; at least 0.55 x --max-cert-ttl, which is the default (%s with the default --max-cert-ttl)", ca.MinPublishDelay(ca.DefaultMaxTTL)))
	fl.StringVar(&cfg.FederationAddr, "federation-addr", cfg.FederationAddr, "address of the federation API (gRPC over mTLS) for peer federators")
	fl.StringSliceVar(&cfg.GatewayAddresses, "gateway-address", nil, "host:port of this cluster's east-west gateway as peers reach it (repeatable)")
	fl.StringSliceVar(&cfg.AdvertiseAddresses, "advertise-address", nil, "host:port where peers reach this federator, told to clusters this one joins (repeatable)")
	fl.DurationVar(&cfg.Heartbeat, "heartbeat", cfg.Heartbeat, "federation heartbeat interval; a peer silent for three is disconnected")
	fl.DurationVar(&cfg.KeepFor, "keep-for", cfg.KeepFor, "how long a lost peer's imports are kept before they are drained (FederationPeer spec.staleness.keepFor overrides)")
	fl.DurationVar(&cfg.DrainFor, "drain-for", cfg.DrainFor, "how long drained imports stay before they are removed (spec.staleness.drainFor overrides)")
	fl.IntVar(&cfg.MaxImportedServices, "max-imported-services", cfg.MaxImportedServices, "most services one peer may export to this cluster")
	fl.DurationVar(&cfg.PeerSyncTimeout, "peer-sync-timeout", cfg.PeerSyncTimeout, "after a start, how long at most sidecars are served nothing (keeping their last configuration) until every peer has resent its exports; then they get what is known")
	fl.StringVar(&cfg.XDSPlaintextAddr, "xds-plaintext-addr", "", "TESTS ONLY: also serve xDS here in plaintext, with NO authentication (anyone who reaches it reads every exported service's endpoints); empty disables it. xDS over TLS is always served on --ca-addr")
	fl.StringVar(&cfg.Region, "region", "", "this cluster's region (topology.kubernetes.io/region): sidecars prefer peers in it to the others; empty matches only peers without a region")
	fl.StringVar(&cfg.RootNamespace, "root-namespace", cfg.RootNamespace, "Istio's root namespace (meshConfig.rootNamespace): an AuthorizationPolicy in it applies to the pods of every namespace, and a PeerAuthentication in it without a selector is the mesh-wide one; set it to the one the cluster's Istio uses")
	fl.StringVar(&cfg.GatewayFederationUpstream, "gateway-federation-upstream", "", "host:port the east-west gateway forwards federation traffic to (default isthmus-federator.<namespace>.svc:<federation port>)")
	fl.TextVar(&logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	fl.BoolVar(&logJSON, "log-json", false, "log JSON lines instead of text")
	return cmd
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), version.Version)
		},
	}
}

// newLogger builds the process logger and routes client-go's klog output
// into it, so there is one log stream with one format.
func newLogger(level slog.Level, asJSON bool) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if asJSON {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	log := slog.New(h)
	klog.SetSlogLogger(log.With("component", "client-go"))
	return log
}
