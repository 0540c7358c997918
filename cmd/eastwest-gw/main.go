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
//
// Once its flags are valid it executes itself again, same process, with
// GODEBUG's schedtrace set, which keeps the runtime's sysmon thread out
// of the deep sleep it would otherwise be woken from several times per
// connection (internal/sysmon); GODEBUG=schedtrace=0 keeps the default.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/internal/bootstrap"
	"github.com/isthmus-mesh/isthmus/internal/sysmon"
	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/identity"
	"github.com/isthmus-mesh/isthmus/pkg/version"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient/gwroutes"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "eastwest-gw:", err)
		os.Exit(1)
	}
}

// options are the gateway's flags.
type options struct {
	cfg         gateway.Config
	x           bootstrap.Flags
	routesFile  string
	logLevel    slog.Level
	logJSON     bool
	showVersion bool
}

// parseFlags parses args into options; pflag.ErrHelp means -h was asked
// for. Nothing is started here.
func parseFlags(args []string) (options, error) {
	o := options{cfg: gateway.DefaultConfig()}
	cfg := &o.cfg
	fl := pflag.NewFlagSet("eastwest-gw", pflag.ContinueOnError)
	fl.StringVar(&cfg.ListenAddr, "listen-addr", cfg.ListenAddr, "address peers' TLS connections arrive on")
	fl.StringVar(&cfg.HealthAddr, "health-addr", cfg.HealthAddr, "address of GET /healthz/ready for peers' probes; empty disables it")
	fl.StringVar(&cfg.MetricsAddr, "metrics-addr", cfg.MetricsAddr, "address of /metrics (Prometheus); empty disables it")
	fl.IntVar(&cfg.MaxConnections, "max-connections", cfg.MaxConnections, "concurrent downstream connections; beyond it new ones are closed")
	fl.DurationVar(&cfg.ClientHelloTimeout, "client-hello-timeout", cfg.ClientHelloTimeout, "bound on the wait for a whole ClientHello")
	fl.DurationVar(&cfg.DialTimeout, "dial-timeout", cfg.DialTimeout, "bound on connecting to one endpoint, for --routes-file routes without their own (xDS clusters carry connect_timeout, 5s unless set)")
	fl.IntVar(&cfg.MaxConnectAttempts, "max-connect-attempts", cfg.MaxConnectAttempts, "endpoints one connection tries before it is refused")
	fl.DurationVar(&cfg.EjectionTime, "ejection-time", cfg.EjectionTime, "how long an endpoint that failed to connect is skipped")
	fl.DurationVar(&cfg.IdleTimeout, "idle-timeout", cfg.IdleTimeout, "close a connection idle both ways this long, for --routes-file routes without their own (xDS routes carry the tcp_proxy's idle_timeout, 1h unless set)")
	fl.DurationVar(&cfg.DrainDelay, "drain-delay", cfg.DrainDelay, "on SIGTERM, how long the gateway still accepts connections while readiness fails, before it closes its listener")
	fl.DurationVar(&cfg.DrainTimeout, "drain-timeout", cfg.DrainTimeout, "on SIGTERM, once the listener is closed, how long connections in flight may finish")
	fl.DurationVar(&cfg.RouteDrainTimeout, "route-drain-timeout", cfg.RouteDrainTimeout, "how long connections of a route removed from the table (an export revoked) go on before they are closed; 0 closes them at once")
	fl.StringVar(&o.routesFile, "routes-file", "", "static routing table (JSON, see gateway.ParseRoutesJSON) instead of xDS")
	o.x.Register(fl, bootstrap.Defaults{Namespace: "isthmus-system", ServiceAccount: "isthmus-eastwest-gw"})
	fl.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error (debug logs every refusal)")
	fl.BoolVar(&o.logJSON, "log-json", false, "log JSON instead of text")
	fl.BoolVar(&o.showVersion, "version", false, "print the version and exit")
	if err := fl.Parse(args); err != nil {
		return o, err
	}
	// A word left over is a typo, or a boolean flag's value given
	// apart (--xds-plaintext false), which pflag leaves as an argument
	// after setting the flag to true.
	if fl.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q: eastwest-gw takes flags only (a boolean flag takes a value only after =, as in --xds-plaintext=false)", fl.Arg(0))
	}
	if o.showVersion {
		return o, nil
	}
	return o, errors.Join(o.cfg.Validate(), o.x.CheckAddresses())
}

func run() error {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil
		}
		return err
	}
	if o.showVersion {
		fmt.Println(version.Version)
		return nil
	}
	cfg, x, routesFile, logLevel, logJSON := o.cfg, o.x, o.routesFile, o.logLevel, o.logJSON
	// Run again with sysmon kept from its deep sleep (internal/sysmon):
	// a tenth less CPU per connection. Returns here only without exec.
	awakeErr := sysmon.KeepAwake()
	opts := &slog.HandlerOptions{Level: logLevel}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if logJSON {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	log := slog.New(h).With("component", "eastwest-gw")
	if awakeErr != nil {
		log.Warn("could not run again with sysmon kept awake; running with the runtime's default", "error", awakeErr)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	routes := func(ctx context.Context, g *errgroup.Group) (gateway.RouteSource, error) {
		if routesFile != "" {
			routes, err := gateway.LoadRoutesFile(routesFile)
			if err != nil {
				return nil, err
			}
			return gateway.NewRouteTable(routes), nil
		}
		return startXDS(ctx, g, x, log)
	}
	return serve(ctx, routes, func(ctx context.Context, src gateway.RouteSource) error {
		log.Info("configuration", "listen", cfg.ListenAddr, "health", cfg.HealthAddr, "metrics", cfg.MetricsAddr,
			"maxConnections", cfg.MaxConnections, "clientHelloTimeout", cfg.ClientHelloTimeout, "dialTimeout", cfg.DialTimeout,
			"maxConnectAttempts", cfg.MaxConnectAttempts, "ejectionTime", cfg.EjectionTime, "idleTimeout", cfg.IdleTimeout,
			"drainDelay", cfg.DrainDelay, "drainTimeout", cfg.DrainTimeout, "routeDrainTimeout", cfg.RouteDrainTimeout,
			"routesFile", routesFile, "xds", x.XDSAddress, "godebug", os.Getenv("GODEBUG"), "version", version.Version)
		gw, err := gateway.New(cfg, src, log)
		if err != nil {
			return err
		}
		return gw.Run(ctx)
	})
}

// serve runs the gateway (runGW) until ctx ends, and the route source
// (started by routes, in g) on a context of its own that ends only once
// the gateway has returned: through the drain (--drain-delay, then
// --drain-timeout) the table still follows xDS, so an export revoked
// then still stops new connections and a pod gone leaves the endpoints.
// A failure of the source ends the gateway too, drained the same way.
func serve(ctx context.Context, routes func(context.Context, *errgroup.Group) (gateway.RouteSource, error),
	runGW func(context.Context, gateway.RouteSource) error) error {
	srcCtx, stopSrc := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSrc()
	g, gctx := errgroup.WithContext(srcCtx)
	src, err := routes(gctx, g)
	if err != nil {
		stopSrc()
		_ = g.Wait()
		return err
	}
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	defer context.AfterFunc(gctx, stopRun)()
	g.Go(func() error {
		defer stopSrc()
		return runGW(runCtx, src)
	})
	return g.Wait()
}

// startXDS runs the xDS client (with its SVID from the federator's CA
// unless plaintext) and the route source fed by it, in g.
func startXDS(ctx context.Context, g *errgroup.Group, x bootstrap.Flags, log *slog.Logger) (*gwroutes.Source, error) {
	if err := x.CheckNode(); err != nil {
		return nil, err
	}
	var svid *identity.Source
	if !x.XDSPlaintext {
		var err error
		if svid, err = x.Identity(ctx, log); err != nil {
			return nil, err
		}
		g.Go(func() error {
			<-ctx.Done()
			return svid.Close()
		})
	}
	// The client's Check builds the table the source then routes with:
	// one build per update.
	builder := gwroutes.NewBuilder()
	cc, err := x.ClientConfig(xdsclient.GatewayNode(x.ClusterName, x.PodIP, x.PodName, x.Namespace), svid, builder.Check, log)
	if err != nil {
		return nil, err
	}
	client, err := xdsclient.New(cc)
	if err != nil {
		return nil, err
	}
	src := gwroutes.NewSource(client, builder, log)
	g.Go(func() error { return client.Run(ctx) })
	g.Go(func() error { return src.Run(ctx) })
	return src, nil
}
