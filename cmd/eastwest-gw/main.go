// Command eastwest-gw is Isthmus's east-west gateway: it routes peers'
// TLS connections by SNI to exported local services without terminating
// TLS.
//
// Its routes come from a RouteSource. The production source is the xDS
// client (pkg/xdsclient), wired here once it exists; until then
// --routes-file loads a static table (for tests, benchmarks, and a
// gateway without a federator).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/version"
)

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
	fl.StringVar(&routesFile, "routes-file", "", "static routing table (JSON, see gateway.ParseRoutesJSON); required until the xDS client is wired")
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

	if routesFile == "" {
		return fmt.Errorf("--routes-file is required: the xDS route source is not wired yet")
	}
	routes, err := gateway.LoadRoutesFile(routesFile)
	if err != nil {
		return err
	}
	src := gateway.NewRouteTable(routes)

	log.Info("configuration", "listen", cfg.ListenAddr, "health", cfg.HealthAddr, "metrics", cfg.MetricsAddr,
		"maxConnections", cfg.MaxConnections, "clientHelloTimeout", cfg.ClientHelloTimeout, "dialTimeout", cfg.DialTimeout,
		"maxConnectAttempts", cfg.MaxConnectAttempts, "ejectionTime", cfg.EjectionTime, "idleTimeout", cfg.IdleTimeout,
		"drainTimeout", cfg.DrainTimeout, "routesFile", routesFile, "routes", routes.Len(), "version", version.Version)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	gw, err := gateway.New(cfg, src, log)
	if err != nil {
		return err
	}
	return gw.Run(ctx)
}
