// Command eastwest-gw is Isthmus's east-west gateway: it routes peers'
// TLS connections by SNI to exported local services without terminating
// TLS.
//
// Its routes come from the federator over xDS (pkg/xdsclient, decoded by
// pkg/xdsclient/gwroutes): on 15012 over mTLS with the gateway's own SVID
// from the federator's CA, or in plaintext on 15010 for tests. The
// federator is verified against the trust bundle it publishes over SDS
// (the ROOTCA Secret) for its own trust domain, and against
// --ca-roots-file (then the roots the CA sends with each SVID) until the
// first one arrives, so a root rotation does not strand the gateway on a
// reconnect. A static --routes-file replaces xDS for benchmarks and a
// gateway without a federator.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/identity"
	"github.com/isthmus-mesh/isthmus/pkg/version"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient/gwroutes"
)

// xdsFlags say where the routes come from when no --routes-file is given.
type xdsFlags struct {
	address, clusterName, podIP, podName, namespace string
	plaintext                                       bool
	trustDomain, serviceAccount, federatorNS        string
	federatorSA, tokenFile, rootsFile               string
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "eastwest-gw:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg := gateway.DefaultConfig()
	var (
		routesFile  string
		logLevel    slog.Level
		logJSON     bool
		showVersion bool
	)
	fl := pflag.NewFlagSet("eastwest-gw", pflag.ContinueOnError)
	fl.StringVar(&cfg.ListenAddr, "listen-addr", cfg.ListenAddr, "address peers' TLS connections arrive on")
	fl.StringVar(&cfg.HealthAddr, "health-addr", cfg.HealthAddr, "address of GET /healthz/ready for peers' probes; empty disables it")
	fl.StringVar(&cfg.MetricsAddr, "metrics-addr", cfg.MetricsAddr, "address of /metrics (Prometheus); empty disables it")
	fl.IntVar(&cfg.MaxConnections, "max-connections", cfg.MaxConnections, "concurrent downstream connections; beyond it new ones are closed")
	fl.DurationVar(&cfg.ClientHelloTimeout, "client-hello-timeout", cfg.ClientHelloTimeout, "bound on the wait for a whole ClientHello")
	fl.DurationVar(&cfg.DialTimeout, "dial-timeout", cfg.DialTimeout, "bound on connecting to one endpoint (routes may set their own)")
	fl.IntVar(&cfg.MaxConnectAttempts, "max-connect-attempts", cfg.MaxConnectAttempts, "endpoints one connection tries before it is refused")
	fl.DurationVar(&cfg.EjectionTime, "ejection-time", cfg.EjectionTime, "how long an endpoint that failed to connect is skipped")
	fl.DurationVar(&cfg.IdleTimeout, "idle-timeout", cfg.IdleTimeout, "close a connection idle both ways this long (routes may set their own)")
	fl.DurationVar(&cfg.DrainTimeout, "drain-timeout", cfg.DrainTimeout, "on SIGTERM, how long connections in flight may finish")
	fl.StringVar(&routesFile, "routes-file", "", "static routing table (JSON, see gateway.ParseRoutesJSON) instead of xDS")
	var x xdsFlags
	fl.StringVar(&x.address, "xds-address", "isthmus-federator.isthmus-system.svc:15012", "the federator's xDS (and CA) address")
	fl.BoolVar(&x.plaintext, "xds-plaintext", false, "speak plaintext xDS (the federator's --xds-plaintext-addr; tests only)")
	fl.StringVar(&x.clusterName, "cluster-name", os.Getenv("CLUSTER_NAME"), "this cluster's name (xDS node cluster)")
	fl.StringVar(&x.podIP, "pod-ip", os.Getenv("POD_IP"), "this pod's IP (xDS node ID)")
	fl.StringVar(&x.podName, "pod-name", os.Getenv("POD_NAME"), "this pod's name (xDS node ID)")
	fl.StringVar(&x.namespace, "namespace", envOr("POD_NAMESPACE", "isthmus-system"), "this pod's namespace")
	fl.StringVar(&x.serviceAccount, "service-account", "isthmus-eastwest-gw", "this pod's ServiceAccount (its SPIFFE ID)")
	fl.StringVar(&x.trustDomain, "trust-domain", "", "the cluster's trust domain (default <cluster-name>.mesh)")
	fl.StringVar(&x.federatorNS, "federator-namespace", "isthmus-system", "the federator's namespace (its SPIFFE ID)")
	fl.StringVar(&x.federatorSA, "federator-service-account", "isthmus-federator", "the federator's ServiceAccount (its SPIFFE ID)")
	fl.StringVar(&x.tokenFile, "token-file", "/var/run/secrets/tokens/isthmus-ca", "projected ServiceAccount token (audience isthmus-ca) for the CA")
	fl.StringVar(&x.rootsFile, "ca-roots-file", "/var/run/secrets/isthmus/root-cert.pem", "PEM roots that verify the federator until it publishes its trust bundle over SDS")
	fl.TextVar(&logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error (debug logs every refusal)")
	fl.BoolVar(&logJSON, "log-json", false, "log JSON instead of text")
	fl.BoolVar(&showVersion, "version", false, "print the version and exit")
	if err := fl.Parse(os.Args[1:]); err != nil {
		if err == pflag.ErrHelp {
			return nil
		}
		return err
	}
	if showVersion {
		fmt.Println(version.Version)
		return nil
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	opts := &slog.HandlerOptions{Level: logLevel}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if logJSON {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	log := slog.New(h).With("component", "eastwest-gw")

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	g, gctx := errgroup.WithContext(ctx)
	var src gateway.RouteSource
	if routesFile != "" {
		routes, err := gateway.LoadRoutesFile(routesFile)
		if err != nil {
			return err
		}
		src = gateway.NewRouteTable(routes)
	} else {
		xsrc, err := startXDS(gctx, g, x, log)
		if err != nil {
			return err
		}
		src = xsrc
	}

	log.Info("configuration", "listen", cfg.ListenAddr, "health", cfg.HealthAddr, "metrics", cfg.MetricsAddr,
		"maxConnections", cfg.MaxConnections, "clientHelloTimeout", cfg.ClientHelloTimeout, "dialTimeout", cfg.DialTimeout,
		"maxConnectAttempts", cfg.MaxConnectAttempts, "ejectionTime", cfg.EjectionTime, "idleTimeout", cfg.IdleTimeout,
		"drainTimeout", cfg.DrainTimeout, "routesFile", routesFile, "xds", x.address, "version", version.Version)
	gw, err := gateway.New(cfg, src, log)
	if err != nil {
		stop()
		_ = g.Wait()
		return err
	}
	g.Go(func() error { return gw.Run(gctx) })
	return g.Wait()
}

// startXDS runs the xDS client (with its SVID from the federator's CA
// unless plaintext) and the route source fed by it, in g.
func startXDS(ctx context.Context, g *errgroup.Group, x xdsFlags, log *slog.Logger) (*gwroutes.Source, error) {
	if x.clusterName == "" || x.podIP == "" || x.podName == "" {
		return nil, fmt.Errorf("--cluster-name, --pod-ip and --pod-name (or CLUSTER_NAME, POD_IP, POD_NAME) are required for xDS: they name this gateway to the federator")
	}
	cc := xdsclient.ClientConfig{
		Server: x.address, Plaintext: x.plaintext, Check: gwroutes.Check, Logger: log,
		Node: xdsclient.GatewayNode(x.clusterName, x.podIP, x.podName, x.namespace),
	}
	if !x.plaintext {
		tdName := x.trustDomain
		if tdName == "" {
			tdName = x.clusterName + ".mesh"
		}
		td, err := spiffeid.TrustDomainFromString(tdName)
		if err != nil {
			return nil, fmt.Errorf("--trust-domain %q: %w", tdName, err)
		}
		federator, err := spiffeid.FromSegments(td, "ns", x.federatorNS, "sa", x.federatorSA)
		if err != nil {
			return nil, fmt.Errorf("federator identity: %w", err)
		}
		roots, err := os.ReadFile(x.rootsFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-roots-file: %w", err)
		}
		svid, err := identity.New(ctx, identity.Config{
			CAAddress: x.address, CAID: federator, RootsPEM: roots, TrustDomain: td,
			Namespace: x.namespace, ServiceAccount: x.serviceAccount, TokenFile: x.tokenFile, Logger: log,
		})
		if err != nil {
			return nil, err
		}
		g.Go(func() error {
			<-ctx.Done()
			return svid.Close()
		})
		// The identity Source's bundle (--ca-roots-file, then the roots
		// the CA returns with each SVID) verifies the federator until the
		// ROOTCA Secret names its trust domain; from then on the bundle the
		// federator publishes does, rotations included.
		cc.TLS = &xdsclient.TLSConfig{SVID: svid, Bundle: svid, Authorizer: tlsconfig.AuthorizeID(federator), FollowSDS: true}
	}
	client, err := xdsclient.New(cc)
	if err != nil {
		return nil, err
	}
	src := gwroutes.NewSource(client, log)
	g.Go(func() error { return client.Run(ctx) })
	g.Go(func() error { return src.Run(ctx) })
	return src, nil
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
