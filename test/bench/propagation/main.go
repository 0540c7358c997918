// Command propagation is what `make bench-propagation` runs: how soon a
// new ServiceExport is routable through the east-west gateway, and how
// soon an unexport stops new connections, end to end through the real
// binaries. The issue's words: "a new export is routable within a
// second, an unexport stops new connections at once".
//
// One simulated cluster (test/localcluster: a real etcd, kube-apiserver
// and kube-controller-manager; as root in its own network namespaces),
// the real federator (test/fedproc, default flags), the real eastwest-gw
// fed only over the federator's xDS (fedproc.StartGateway), and an mTLS
// backend (test/bench/internal/tlsbackend, this program re-executed as
// `propagation backend`) in the cluster's node network. Every exported
// Service has no selector and one EndpointSlice, written by this program,
// whose one ready endpoint is the backend (the node IP: EndpointSlices
// refuse loopback addresses, so the backend listens on the node's
// address, which the gateway beside it reaches without leaving the node).
// The Services and EndpointSlices exist before anything is timed; only
// the ServiceExport changes.
//
// For each of --services services, one after another, --pause apart:
//
//  1. export: create the ServiceExport; from the moment the Create call
//     returns, open a new connection through the gateway every --poll
//     with SNI outbound_.8443_._.<svc>.<ns>.svc.cluster.local, until a
//     full mTLS handshake with the backend completes (the backend then
//     answers a ping, proof it accepted the client; not timed). The time
//     is when that handshake completed.
//  2. unexport: delete the ServiceExport; from the Delete call's return,
//     the same until the gateway refuses the connection with its
//     unrecognized_name alert.
//
// This runs twice: with no other service exported, and with
// --background other services exported (created in bulk, untimed; the
// measure starts once the gateway routes them all and the exporter has
// written every status), so the figures show whether propagation
// degrades with the size of the catalog: every change is a new catalog
// snapshot and a new state-of-the-world xDS push of every service.
//
// # Reference and stages
//
// The target is the 1 s, beside every percentile with the ratio
// to it. The same-run reference (the peer column) is the floor no
// controller can beat: the round-trip of the Create (or Delete) call
// itself. Two more rows say where the time goes: an informer in this
// process timestamps the API server's watch event (what the federator's
// own informers see first), and after each change the federator's
// /debug/xds gives the moment it set the xDS snapshot with (or without)
// the service, which splits the time into the federator's part (watch,
// reconcile, the exporter's 50 ms coalescing, the xDS server's 5 ms
// coalescing, translation) and the delivery part (ADS push, the gateway's
// decode, validation and table swap, and this program's poll).
//
// # Output
//
// Progress goes to stderr; the results table (Markdown, the same one as
// bench-federation's) to stdout. A missed target says MISSED and does not
// fail the program, which exits non-zero only when it could not measure.
// Every wait is bounded (--bound per change); the harness removes every
// process, network namespace and file on exit, also on Ctrl-C.
//
// Without root there are no network namespaces, every address is a
// loopback one, and EndpointSlices cannot point at the backend: the
// program says so and exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/tlsbackend"
)

// config is the command line.
type config struct {
	binDir       string
	services     int
	background   int
	poll         time.Duration
	pause        time.Duration
	bound        time.Duration
	workers      int
	federatorLog string
	gatewayLog   string
	verbose      bool
	keep         bool
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "backend" {
		if err := tlsbackend.Run(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "propagation backend:", err)
			os.Exit(1)
		}
		return
	}
	var cfg config
	flag.StringVar(&cfg.binDir, "bin-dir", "bin", "directory holding the federator and eastwest-gw binaries (make build)")
	flag.IntVar(&cfg.services, "services", 50, "services exported and unexported one after another, in each of the two runs")
	flag.IntVar(&cfg.background, "background", 1000, "services already exported during the second run (0 skips it)")
	flag.DurationVar(&cfg.poll, "poll", 5*time.Millisecond, "interval between new connections through the gateway while waiting for a change")
	flag.DurationVar(&cfg.pause, "pause", 200*time.Millisecond, "quiet time between one change reaching the gateway and the next change")
	flag.DurationVar(&cfg.bound, "bound", 30*time.Second, "longest wait for one change to reach the gateway")
	flag.IntVar(&cfg.workers, "workers", 16, "goroutines creating the background objects")
	flag.StringVar(&cfg.federatorLog, "federator-log-level", "info", "the federator's --log-level")
	flag.StringVar(&cfg.gatewayLog, "gateway-log-level", "info", "the gateway's --log-level")
	flag.BoolVar(&cfg.verbose, "v", false, "log the harness's debug messages and every change")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the harness's work directory (the federator's, gateway's and API server's logs) after the run")
	flag.Parse()
	if cfg.services < 1 || cfg.background < 0 || cfg.poll <= 0 || cfg.pause < 0 || cfg.bound <= 0 || cfg.workers < 1 {
		fmt.Fprintln(os.Stderr, "bench-propagation: --services, --poll, --bound and --workers must be positive, --background and --pause not negative")
		os.Exit(2)
	}

	level := slog.LevelInfo
	if cfg.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx, cfg, log)
	if rep != nil {
		rep.Write(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-propagation: could not measure:", err)
		os.Exit(1)
	}
}
