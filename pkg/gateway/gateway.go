package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"
	"k8s.io/utils/clock"

	"github.com/isthmus-mesh/isthmus/internal/outlier"
	"github.com/isthmus-mesh/isthmus/internal/relay"
)

// Gateway is the east-west gateway: an SNI router that never terminates
// TLS. New binds its listeners; Run serves until its context ends.
type Gateway struct {
	cfg     Config
	src     RouteSource
	log     *slog.Logger
	metrics *metrics
	dialer  net.Dialer

	ln                  *net.TCPListener
	healthLn, metricsLn net.Listener

	// active counts downstream connections, for MaxConnections.
	active   atomic.Int64
	draining atomic.Bool
	// handlers tracks every connection in flight, for the drain.
	handlers sync.WaitGroup
	// work hands an accepted connection to an idle worker; workers
	// tracks the worker goroutines, which end when work is closed.
	work    chan *net.TCPConn
	workers sync.WaitGroup
	health  outlier.Ejections

	// connsMu guards conns and routed.
	connsMu sync.Mutex
	// conns holds every open socket, downstream and upstream, closed
	// when the drain timeout passes, each with the route that routed
	// its connection (nil until then), closed when that route has
	// left the table for RouteDrainTimeout.
	conns map[*net.TCPConn]*cluster
	// routed counts the routed connections by SNI: a table update
	// checks the routes in use, not every socket.
	routed map[string]int

	// httpIdleTimeout is the health and metrics servers' IdleTimeout:
	// the constant of that name, which tests shorten.
	httpIdleTimeout time.Duration
	// httpMaxConns is how many connections each of the health and
	// metrics servers holds at once: the constant of that name, which
	// tests lower.
	httpMaxConns int
	// clock times the drain delay, the drain timeout and the route
	// drain timeout: the real one, which tests replace to move time
	// when they choose.
	clock clock.WithTicker
}

// Timeouts of the health and metrics servers, whose requests are small
// GETs from the kubelet and Prometheus: a slow or idle client must not
// hold a connection and its goroutine for ever. The idle timeout is
// longer than a one-minute scrape interval, so Prometheus keeps its
// connection between scrapes.
const (
	httpReadHeaderTimeout = 5 * time.Second
	httpReadTimeout       = 10 * time.Second
	httpWriteTimeout      = 30 * time.Second // a scrape of every series
	httpIdleTimeout       = 90 * time.Second
	// httpMaxConns bounds each server's connections: the health port
	// faces every peer, and a flood of idle connections there must not
	// take the file descriptors the routed connections need. Beyond it,
	// connections wait in the listen backlog until one ends; the
	// kubelet, a few peers and Prometheus need a handful.
	httpMaxConns = 128
)

// New validates cfg and binds the listeners; the gateway serves once Run
// is called. src supplies the routing table (see RouteSource); log may be
// nil.
func New(cfg Config, src RouteSource, log *slog.Logger) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if src == nil {
		return nil, errors.New("gateway: no route source")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(src)
	if err != nil {
		return nil, err
	}
	g := &Gateway{
		cfg:     cfg,
		src:     src,
		log:     log,
		metrics: m,
		conns:   make(map[*net.TCPConn]*cluster),
		routed:  make(map[string]int),
		work:    make(chan *net.TCPConn),

		httpIdleTimeout: httpIdleTimeout,
		httpMaxConns:    httpMaxConns,
		clock:           clock.RealClock{},
	}
	g.health.EjectFor = cfg.EjectionTime
	// Upstream connections go to local pods and get no keep-alive, as in
	// Envoy by default: a dead pod's connection ends at the idle timeout.
	g.dialer.KeepAlive = -1
	// A TLS client speaks first: accept it with its ClientHello, and the
	// ClientHello deadline runs from there.
	plc := relay.ListenConfig(relay.DeferAccept)
	ln, err := plc.Listen(context.Background(), "tcp", cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.ListenAddr, err)
	}
	g.ln = ln.(*net.TCPListener)
	var lc net.ListenConfig
	if cfg.HealthAddr != "" {
		if g.healthLn, err = lc.Listen(context.Background(), "tcp", cfg.HealthAddr); err != nil {
			g.closeListeners()
			return nil, fmt.Errorf("health listener on %s: %w", cfg.HealthAddr, err)
		}
	}
	if cfg.MetricsAddr != "" {
		if g.metricsLn, err = lc.Listen(context.Background(), "tcp", cfg.MetricsAddr); err != nil {
			g.closeListeners()
			return nil, fmt.Errorf("metrics listener on %s: %w", cfg.MetricsAddr, err)
		}
	}
	return g, nil
}

// Addr is the address the gateway accepts connections on.
func (g *Gateway) Addr() net.Addr { return g.ln.Addr() }

// HealthAddr is the health listener's address; nil when disabled.
func (g *Gateway) HealthAddr() net.Addr { return addrOf(g.healthLn) }

// MetricsAddr is the metrics listener's address; nil when disabled.
func (g *Gateway) MetricsAddr() net.Addr { return addrOf(g.metricsLn) }

func addrOf(ln net.Listener) net.Addr {
	if ln == nil {
		return nil
	}
	return ln.Addr()
}

func (g *Gateway) closeListeners() {
	for _, ln := range []net.Listener{g.ln, g.healthLn, g.metricsLn} {
		if ln != nil {
			_ = ln.Close()
		}
	}
}

// Ready reports whether the gateway should receive traffic: it has a
// routing table and is not draining.
func (g *Gateway) Ready() bool {
	return g.src.Routes() != nil && !g.draining.Load()
}

// Run accepts connections until ctx ends, then drains: it fails
// readiness at once, goes on accepting and routing new connections for
// Config.DrainDelay, closes its listener, lets connections in flight
// finish for up to Config.DrainTimeout, closes the rest, and returns
// nil. It returns an error only if a listener fails. Run may be called
// once.
func (g *Gateway) Run(ctx context.Context) error {
	eg, ectx := errgroup.WithContext(ctx)
	var servers []*http.Server
	var httpConns sync.WaitGroup
	serve := func(name string, ln net.Listener, h http.Handler) {
		if ln == nil {
			return
		}
		srv := &http.Server{
			Handler:           h,
			ReadHeaderTimeout: httpReadHeaderTimeout,
			ReadTimeout:       httpReadTimeout,
			WriteTimeout:      httpWriteTimeout,
			IdleTimeout:       g.httpIdleTimeout,
			// Counted from Serve's goroutine (StateNew) to the
			// connection's end, so that Run waits for every one.
			ConnState: func(_ net.Conn, s http.ConnState) {
				switch s {
				case http.StateNew:
					httpConns.Add(1)
				case http.StateClosed, http.StateHijacked:
					httpConns.Done()
				}
			},
		}
		servers = append(servers, srv)
		limited := netutil.LimitListener(ln, g.httpMaxConns)
		eg.Go(func() error {
			if err := srv.Serve(limited); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("%s server: %w", name, err)
			}
			return nil
		})
	}
	serve("health", g.healthLn, g.healthHandler())
	serve("metrics", g.metricsLn, g.metricsHandler())
	// Both outlive ctx: the accept loop serves DrainDelay longer, until
	// the listener closes; the route watch closes removed routes'
	// connections until the drain ends.
	wctx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWatch()
	eg.Go(func() error { g.watchRoutes(wctx); return nil })
	actx, stopAccept := context.WithCancel(context.WithoutCancel(ctx))
	defer stopAccept()
	acceptDone := make(chan struct{})
	eg.Go(func() error {
		defer close(acceptDone)
		return g.acceptLoop(actx)
	})
	g.log.Info("east-west gateway serving", "addr", g.ln.Addr().String(), "routes", g.src.Routes().Len())

	<-ectx.Done()
	g.draining.Store(true)
	g.delayDrain(acceptDone)
	stopAccept()
	_ = g.ln.Close()
	<-acceptDone // no handler starts after this: drain may Wait
	g.drain()
	stopWatch()
	close(g.work) // idle workers end; busy ones have ended with drain
	g.workers.Wait()
	for _, srv := range servers {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		if err := srv.Shutdown(sctx); err != nil {
			// A request still coming in (a peer's probe that stopped
			// mid-header, a slow scrape): closed, not left to its
			// timeouts after Run has returned.
			_ = srv.Close()
		}
		cancel()
	}
	err := eg.Wait() // the servers' Serve loops: no connection is added after
	// Every connection is closed by now; its goroutine ends at once.
	httpConns.Wait()
	// The metrics provider is left as it is: its one reader is the
	// Prometheus exporter's, read on a scrape, with nothing to stop, and
	// the counts of the drain stay readable.
	g.log.Info("east-west gateway stopped")
	return err
}

// delayDrain keeps serving, readiness failing, for DrainDelay: peers'
// probes and load balancers see the 503 and stop sending while the
// connections they still send are served. It ends early if the accept
// loop has (its listener failed).
func (g *Gateway) delayDrain(acceptDone <-chan struct{}) {
	if g.cfg.DrainDelay <= 0 {
		return
	}
	g.log.Info("shutting down: not ready, still accepting for the drain delay", "delay", g.cfg.DrainDelay)
	select {
	case <-g.clock.After(g.cfg.DrainDelay):
	case <-acceptDone:
	}
}

// drain waits for connections in flight up to DrainTimeout, then closes
// what is left and waits for their goroutines.
func (g *Gateway) drain() {
	done := make(chan struct{})
	go func() {
		g.handlers.Wait()
		close(done)
	}()
	g.log.Info("draining", "connections", g.active.Load(), "timeout", g.cfg.DrainTimeout)
	t := g.clock.NewTimer(g.cfg.DrainTimeout)
	defer t.Stop()
	select {
	case <-done:
		return
	case <-t.C():
	}
	g.connsMu.Lock()
	n, routed := len(g.conns), 0
	for c := range g.conns {
		_ = c.Close()
	}
	for _, k := range g.routed {
		routed += k
	}
	g.connsMu.Unlock()
	g.metrics.closed(ReasonDrainTimeout, routed)
	g.log.Info("drain timeout passed: closed the connections left", "sockets", n, "routed", routed)
	<-done
}

func (g *Gateway) acceptLoop(ctx context.Context) error {
	var delay time.Duration
	for {
		c, err := g.ln.AcceptTCP()
		if err != nil {
			if ctx.Err() != nil { // the listener is being closed
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept: %w", err)
			}
			// Out of file descriptors and the like: back off as
			// net/http does, and keep serving the connections open.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			g.log.Warn("accept failed; retrying", "error", err, "in", delay)
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		delay = 0
		g.metrics.accepted.Add(context.Background(), 1)
		if g.active.Add(1) > int64(g.cfg.MaxConnections) {
			g.active.Add(-1)
			g.metrics.refuse(ReasonOverLimit)
			_ = c.SetLinger(0) // RST: spend nothing more on it
			_ = c.Close()
			continue
		}
		g.metrics.active.Add(context.Background(), 1)
		g.handlers.Add(1)
		select {
		case g.work <- c: // an idle worker takes it
		default:
			g.workers.Add(1)
			go g.worker(c)
		}
	}
}

// workerIdle is how long a worker waits for another connection before
// it ends.
const workerIdle = 10 * time.Second

// worker serves c, then the connections handed to it while it waits,
// until none comes for workerIdle or the gateway stops. Serving a
// connection takes a deeper stack than a goroutine starts with (the net
// package's dial path is deep): with a goroutine per connection, growing
// and copying that stack (runtime.newstack) was 6.7% of the gateway's
// CPU at 1,800 connections/s (perf record during bench-gateway's conns
// measure). A worker grows it once, and again only after a garbage
// collection shrank it while it waited: 1.8%.
func (g *Gateway) worker(c *net.TCPConn) {
	defer g.workers.Done()
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for {
		g.serveConn(c)
		idle.Reset(workerIdle)
		var ok bool
		select {
		case c, ok = <-g.work:
			if !ok {
				return
			}
		case <-idle.C:
			return
		}
	}
}

// watchRoutes follows the routing table until ctx ends. When a route
// that carried connections leaves the table (the export was revoked),
// they are closed RouteDrainTimeout later, unless the route is back by
// then; new connections are refused at once by the lookup. Routes are
// told apart by SNI, never by their endpoints: a route whose endpoints
// changed is the same route, and its connections keep their pod.
func (g *Gateway) watchRoutes(ctx context.Context) {
	// gone maps the SNI of each route that left the table with
	// connections open to when they are closed.
	gone := make(map[string]time.Time)
	timer := g.clock.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.src.Updated():
			routes := g.src.Routes()
			g.log.Debug("routes updated", "routes", routes.Len())
			g.markGone(routes, gone)
		case <-timer.C():
		}
		if next := g.closeGone(gone); !next.IsZero() {
			timer.Reset(next.Sub(g.clock.Now()))
		}
	}
}

// markGone adds to gone the routes in use that routes lacks, and takes
// out of it those back in routes.
func (g *Gateway) markGone(routes *Routes, gone map[string]time.Time) {
	for sni := range gone {
		if routes.lookup(sni) != nil {
			delete(gone, sni)
			g.log.Debug("route back before its connections were closed: they stay", "sni", sni)
		}
	}
	closeAt := g.clock.Now().Add(g.cfg.RouteDrainTimeout)
	var added []string
	g.connsMu.Lock()
	for sni := range g.routed {
		if _, ok := gone[sni]; ok || routes.lookup(sni) != nil {
			continue
		}
		gone[sni] = closeAt
		added = append(added, sni)
	}
	g.connsMu.Unlock()
	for _, sni := range added {
		g.log.Debug("route removed: its connections close after the route drain timeout",
			"sni", sni, "timeout", g.cfg.RouteDrainTimeout)
	}
}

// closeGone closes the connections of the routes in gone whose time
// has come, and returns the earliest time still ahead (zero: none).
func (g *Gateway) closeGone(gone map[string]time.Time) (next time.Time) {
	now := g.clock.Now()
	var due map[string]int // SNI → connections closed
	for sni, at := range gone {
		switch {
		case at.After(now):
			if next.IsZero() || at.Before(next) {
				next = at
			}
		default:
			if due == nil {
				due = make(map[string]int)
			}
			due[sni] = 0
		}
	}
	if due == nil {
		return next
	}
	var socks []*net.TCPConn
	g.connsMu.Lock()
	// An update not yet seen may have brought a route back. Read under
	// the lock: a connection trackRouted counts after this read finds
	// the route back, and one counted before it is closed only if the
	// route is still gone.
	routes := g.src.Routes()
	for sni := range due {
		if routes.lookup(sni) != nil {
			// markGone will see the update too; until then, stay.
			delete(due, sni)
			continue
		}
		delete(gone, sni)
		due[sni] = g.routed[sni]
		// No longer routed: an update before their goroutines untrack
		// them must not find the route in use and close (and count)
		// them again.
		delete(g.routed, sni)
	}
	for s, c := range g.conns {
		if c != nil {
			if _, ok := due[c.route.SNI]; ok {
				socks = append(socks, s)
				g.conns[s] = nil // untrackAndClose: nothing left to uncount
			}
		}
	}
	g.connsMu.Unlock()
	// Closed outside the lock, which the data path takes; each
	// connection's goroutine ends and untracks its sockets.
	for _, s := range socks {
		_ = s.Close()
	}
	for sni, n := range due {
		if n == 0 {
			continue
		}
		g.metrics.closed(ReasonRouteRemoved, n)
		g.log.Info("route removed: closed its connections", "sni", sni, "connections", n, "after", g.cfg.RouteDrainTimeout)
	}
	return next
}

// track records down, a connection not routed yet.
func (g *Gateway) track(down *net.TCPConn) {
	g.connsMu.Lock()
	g.conns[down] = nil
	g.connsMu.Unlock()
}

// trackRouted records up, the socket c's endpoint answered on for
// down, and that c routed them. It reports whether c is still in the
// table: if not, the route left it while the connection was being
// routed, perhaps after watchRoutes last looked at the connections in
// use, and down must be refused.
func (g *Gateway) trackRouted(down, up *net.TCPConn, c *cluster) bool {
	g.connsMu.Lock()
	g.conns[down] = c
	g.conns[up] = c
	g.routed[c.route.SNI]++
	g.connsMu.Unlock()
	// After the lock: watchRoutes either saw this connection, or read
	// the table it saw before this load.
	return g.src.Routes().lookup(c.route.SNI) != nil
}

// untrackAndClose forgets and closes down and up (nil if none).
func (g *Gateway) untrackAndClose(down, up *net.TCPConn) {
	g.connsMu.Lock()
	if c := g.conns[down]; c != nil {
		if n := g.routed[c.route.SNI] - 1; n > 0 {
			g.routed[c.route.SNI] = n
		} else {
			delete(g.routed, c.route.SNI)
		}
	}
	delete(g.conns, down)
	if up != nil {
		delete(g.conns, up)
	}
	g.connsMu.Unlock()
	if up != nil {
		_ = up.Close()
	}
	_ = down.Close()
}

func (g *Gateway) healthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", g.serveReady)
	return mux
}

func (g *Gateway) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	h := promhttp.HandlerFor(g.metrics.registry, promhttp.HandlerOpts{})
	mux.Handle("GET /metrics", h)
	mux.Handle("GET /stats/prometheus", h) // Istio's scrape path on 15020
	mux.HandleFunc("GET /healthz/ready", g.serveReady)
	return mux
}

func (g *Gateway) serveReady(w http.ResponseWriter, _ *http.Request) {
	switch {
	case g.draining.Load():
		http.Error(w, "draining", http.StatusServiceUnavailable)
	case g.src.Routes() == nil:
		http.Error(w, "no routes yet", http.StatusServiceUnavailable)
	default:
		_, _ = w.Write([]byte("ok\n"))
	}
}
