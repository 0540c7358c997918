// Command sidecar is what `make bench-sidecar` runs: two real `sidecar
// run` processes (bin/sidecar, client side and server side, mTLS between
// them) beside two nginx (Debian's; a front proxying over mTLS to a back,
// the same machine, the same run) and a direct call, for HTTP/1.1 and
// HTTP/2.
//
// Topology: two network namespaces on one bridge (test/netns), as two
// pods of one cluster:
//
//	client ns   load generators (fortio, h2load)
//	            sidecar (client side) 127.0.0.1:15001, explicit mode: the Host
//	              header names the service, as docs/sidecar-xds.md allows without capture
//	            nginx front 127.0.0.1:<h1>, 127.0.0.1:<h2c> (proxy_pass:
//	              HTTP/1.1 to the back), 127.0.0.1:<h2c> (grpc_pass: HTTP/2
//	              to the back)
//	            the bench's CA (pkg/ca, pkg/caserver) and xDS (go-control-plane
//	              serving xds.TranslateSidecar of a one-service catalog): internal/fedtest
//	server ns   `sidecar iptables` capture (real nat rules), so the client
//	              side's connection to <server ip>:8080 lands on the server
//	              side's inbound listener (:15006) with its original
//	              destination: the sidecar's inbound only serves redirected
//	              connections (it forwards to 127.0.0.1:<original port>)
//	            sidecar (server side), as uid 1337 like a pod's
//	            nginx back <server ip>:9443 (proxy_pass) and :9444 (grpc_pass),
//	              excluded from capture
//	            backend (this program re-executed: HTTP/1.1 and h2c, a small
//	              body) on :8080 (behind the sidecar) and :8081 (excluded
//	              from capture: the direct call)
//
// Every path crosses the bridge once: direct is client → backend;
// isthmus is client → sidecar → mTLS → sidecar → backend; nginx is client
// → front → mTLS → back → backend. The certificates of the sidecars come
// from the CA over its real protocol; nginx's from a root of its own
// (nginx verifies DNS names, not SPIFFE IDs). Both sides use TLS 1.3
// with AES-128-GCM and ECDSA P-256 certificates, and keep-alive
// connections between the proxies.
//
// For HTTP/2 the client speaks h2c to the first proxy, and each proxy
// pair is measured both ways it can carry it: converted to HTTP/1.1 at
// the first proxy (nginx's proxy_pass, which speaks only HTTP/1.1 to
// upstreams; the sidecars for port 80, declared http, as Istio's do) and
// HTTP/2 end to end (nginx's grpc_pass; the sidecars for port 81,
// declared http2). Each is judged against its nginx counterpart.
//
// Each --runs times, for each protocol, the targets in an order
// rotated from run to run, after an unmeasured warm-up of --warmup:
//
//   - fixed rate: fortio at --rate requests/s over --rate-conns
//     connections for --duration: p50 and p99 latency, and their excess
//     over the direct call measured in the same run (added latency);
//   - maximum rate: h2load for --duration with --max-conns-h1
//     connections (HTTP/1.1) or --max-conns-h2 connections of
//     --max-streams streams (HTTP/2): requests/s, and requests/s per core
//     of proxy CPU (both proxies' user+system CPU from /proc over the
//     window), and the proxies' read and write system calls per request
//     (/proc/<pid>/io), which say how much of that CPU is the kernel's;
//   - memory: both proxies' resident set, idle before the load and at
//     its peak (VmHWM) after all runs.
//
// The table (Markdown, on stdout) gives the median of the runs with the
// range in brackets and the ratio to each nginx, then the targets as
// met or MISSED. A missed target never fails the program; it exits
// non-zero only when it could not measure. It needs root (network
// namespaces, iptables), nginx, h2load and fortio: make bench-sidecar
// installs them.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "backend" {
		if err := runBackend(os.Args[2:]); err != nil {
			log.Fatal(err)
		}
		return
	}
	var o options
	flag.StringVar(&o.binDir, "bin-dir", "bin", "directory holding sidecar (make build)")
	flag.StringVar(&o.fortio, "fortio", "", "fortio binary (default: <bin-dir>/fortio, else $PATH)")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured window of each load (the fixed rate's p99 stands on rate×duration samples)")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured load before each window, and before each slice of the fixed rate")
	flag.IntVar(&o.slices, "slices", 4, "slices each fixed-rate window is cut into, taken in turn across the targets and pooled per target")
	flag.IntVar(&o.runs, "runs", 3, "runs of every measure; the median and range are reported")
	flag.Float64Var(&o.rate, "rate", 1000, "the fixed rate (requests/s)")
	flag.IntVar(&o.rateConns, "rate-conns", 8, "connections of the fixed-rate load")
	flag.IntVar(&o.maxConnsH1, "max-conns-h1", 64, "HTTP/1.1 connections of the maximum-rate load")
	flag.IntVar(&o.maxConnsH2, "max-conns-h2", 4, "HTTP/2 connections of the maximum-rate load")
	flag.IntVar(&o.maxStreams, "max-streams", 16, "concurrent streams per HTTP/2 connection of the maximum-rate load")
	flag.IntVar(&o.body, "body", 64, "response body size (bytes)")
	protocols := flag.String("protocols", "h1,h2", "protocols to measure (comma-separated): h1, h2")
	flag.BoolVar(&o.noNginx, "no-nginx", false, "leave the nginx column out")
	flag.Var(&o.sidecarEnv, "sidecar-env", "`NAME=VALUE` added to the sidecars' environment, e.g. GOGC=400 or GODEBUG=gctrace=1 (repeatable; the logs are kept with --keep)")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (logs, configurations) and print its path")
	flag.BoolVar(&o.accessLogs, "access-logs", false, "have fortio log every request of the measured fixed-rate slices (start, latency) as fortio-<proto>-<target>-<run>-<slice>.access, to line slow requests up with a `perf sched record -k mono` of the same time; implies --keep")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("bench-sidecar: ")
	for _, p := range strings.Split(*protocols, ",") {
		switch p = strings.TrimSpace(p); p {
		case "h1", "h2":
			o.protocols = append(o.protocols, p)
		default:
			log.Fatalf("--protocols: %q is not h1 or h2", p)
		}
	}
	o.keep = o.keep || o.accessLogs
	if err := o.validate(); err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o)
	stop()
	if err != nil {
		log.Fatal(err)
	}
}

type options struct {
	binDir, fortio                    string
	duration, warmup                  time.Duration
	runs, slices                      int
	rate                              float64
	rateConns, maxConnsH1, maxConnsH2 int
	maxStreams, body                  int
	protocols                         []string
	noNginx, keep, accessLogs         bool
	sidecarEnv                        listFlag
}

func (o options) validate() error {
	var bad []string
	if o.duration < time.Second {
		bad = append(bad, "--duration must be at least 1s")
	}
	if o.warmup < 0 {
		bad = append(bad, "--warmup must not be negative")
	}
	if o.runs < 1 {
		bad = append(bad, "--runs must be at least 1")
	}
	if o.rate <= 0 || o.rateConns < 1 || o.maxConnsH1 < 1 || o.maxConnsH2 < 1 || o.maxStreams < 1 {
		bad = append(bad, "--rate, --rate-conns, --max-conns-h1, --max-conns-h2 and --max-streams must be positive")
	}
	if o.body < 0 {
		bad = append(bad, "--body must not be negative")
	}
	for _, kv := range o.sidecarEnv {
		if name, _, ok := strings.Cut(kv, "="); !ok || name == "" {
			bad = append(bad, fmt.Sprintf("--sidecar-env %q is not NAME=VALUE", kv))
		}
	}
	if o.slices < 1 || o.duration/time.Duration(max(o.slices, 1)) < time.Second {
		bad = append(bad, "--slices must be at least 1, and --duration at least 1s per slice")
	}
	if len(bad) > 0 {
		return fmt.Errorf("%s", strings.Join(bad, "; "))
	}
	return nil
}

func run(ctx context.Context, o options) error {
	env, err := setUp(ctx, o)
	if env != nil {
		defer env.close()
	}
	if err != nil {
		return err
	}
	log.Printf("%d cores (GOMAXPROCS %d); %d runs of %v after %v warm-up; fixed rate %.0f req/s over %d connections, in %d slices taken in turn; max rate over %d HTTP/1.1 connections, %d HTTP/2 connections × %d streams; body %d B",
		runtime.NumCPU(), runtime.GOMAXPROCS(0), o.runs, o.duration, o.warmup, o.rate, o.rateConns, o.slices,
		o.maxConnsH1, o.maxConnsH2, o.maxStreams, o.body)
	res := newResults()
	ld := loader{ns: env.client, fortio: env.fortio, dir: env.dir, accessLogs: o.accessLogs}
	for r := 1; r <= o.runs; r++ {
		for _, proto := range o.protocols {
			var targets []target
			for i := range env.targets {
				// Rotate the order every run: no target is always the
				// one measured right after another's load.
				if t := env.targets[(i+r-1)%len(env.targets)]; t.serves(proto) {
					targets = append(targets, t)
				}
			}
			// The fixed rate, in slices taken in turn: every target
			// meets the same spells of noise from the rest of the
			// machine, which a window measured after another's would
			// not, and its slices are pooled into one window.
			slices := map[string][]window{}
			for s := range o.slices {
				for i := range targets {
					t := targets[(i+s)%len(targets)]
					if err := ctx.Err(); err != nil {
						return err
					}
					name := fmt.Sprintf("%s-%s-%d-%d", proto, t.name, r, s+1)
					w, err := ld.fixed(ctx, name, t.spec(proto), o.rate, o.rateConns, o.warmup, o.duration/time.Duration(o.slices), t.usage)
					if err := measured(ctx, env, err, r, proto, modeFixed, t); err != nil {
						return err
					}
					slices[t.name] = append(slices[t.name], w)
				}
			}
			for _, t := range targets {
				w := pool(slices[t.name])
				res.add(key{proto, modeFixed, t.name}, w)
				log.Printf("run %d %s %-5s %-7s %s", r, proto, modeFixed, t.name, w.describe(modeFixed))
			}
			for _, t := range targets {
				if err := ctx.Err(); err != nil {
					return err
				}
				conns := o.maxConnsH1
				if proto == "h2" {
					conns = o.maxConnsH2
				}
				w, err := ld.max(ctx, t.spec(proto), conns, o.maxStreams, o.warmup, o.duration, t.usage)
				if err := measured(ctx, env, err, r, proto, modeMax, t); err != nil {
					return err
				}
				res.add(key{proto, modeMax, t.name}, w)
				log.Printf("run %d %s %-5s %-7s %s", r, proto, modeMax, t.name, w.describe(modeMax))
			}
		}
	}
	for _, t := range env.targets {
		if len(t.procs) > 0 {
			env.peak[t.name] = t.memory("VmHWM")
		}
	}
	fmt.Print(res.table(env, o))
	return nil
}

// measured turns a load's error into the run's, and checks that every
// process of the topology still runs after it.
func measured(ctx context.Context, e *env, err error, r int, proto, mode string, t target) error {
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("interrupted: %w", context.Cause(ctx))
		}
		return fmt.Errorf("run %d, %s %s, %s: %w", r, proto, mode, t.name, err)
	}
	return e.alive()
}
