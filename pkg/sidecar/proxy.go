package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/internal/outlier"
	"github.com/isthmus-mesh/isthmus/internal/relay"
	"github.com/isthmus-mesh/isthmus/pkg/sidecar/capture"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Proxy is the sidecar's data plane: the outbound and inbound listeners,
// the admin and health servers, and the upstream connection pools. New
// binds its listeners; Run serves until its context ends.
type Proxy struct {
	cfg         Config
	src         ConfigSource
	svid        x509svid.Source
	onConfig    func(*xdsclient.Config)
	originalDst func(*net.TCPConn) (netip.AddrPort, error)
	log         *slog.Logger
	metrics     *metrics
	// health is passive health, shared by every cluster's picker and
	// kept across configurations.
	health outlier.Ejections
	// opsMaxConns bounds the connections each of the admin and health
	// servers holds (opsMaxConns, the constant; tests lower it).
	opsMaxConns int
	// ifAddrs are this network namespace's addresses, for telling
	// connections from this pod apart.
	ifAddrs ifAddrs

	outLn, inLn       *net.TCPListener
	adminLn, healthLn net.Listener
	outHTTP, inHTTP   *http.Server
	outQueue, inQueue *connQueue
	forwarder         *httputil.ReverseProxy
	bundles           bundleSource
	running           atomic.Bool
	draining          atomic.Bool
	active            [2]atomic.Int64 // outbound, inbound connections open
	// connGoroutines is every goroutine the accept loops started,
	// httpConns every downstream connection the HTTP servers serve,
	// requests every HTTP handler running and upstreams every upstream
	// connection open or being dialed: Run waits for all of them.
	connGoroutines sync.WaitGroup
	httpConns      sync.WaitGroup
	requests       gauge
	upstreams      gauge
	// dials ends when the drain timeout passes (cutDials): the dials
	// and handshakes still in flight then give up, as the connections
	// left are closed.
	dials    context.Context
	cutDials context.CancelFunc

	// state is the configuration adopted last and what was built from
	// it; nil until the first. gens numbers them (state.gen).
	state atomic.Pointer[state]
	gens  atomic.Uint64

	// inMu guards inConns: the inbound connections open, which each
	// adopted configuration re-decides (revoke.go). revoke wakes
	// revokeLoop, which does (capacity one: requests coalesce).
	inMu    sync.Mutex
	inConns map[*inboundConn]struct{}
	revoke  chan struct{}

	// poolsMu guards pools and retired: the upstream connection pools
	// by cluster name, kept across configurations while the cluster's
	// TLS settings stay the same, and the ones replaced since, whose
	// connections still in use close when they go idle.
	poolsMu sync.Mutex
	pools   map[string]*pool
	retired []*pool

	// tcpMu guards tcpConns: the sockets of TCP proxies in flight,
	// closed when the drain timeout passes.
	tcpMu    sync.Mutex
	tcpConns map[net.Conn]struct{}

	// h1Mu guards h1Conns: the downstream connections on the HTTP/1.1
	// path, which the drain closes when idle and cuts at its timeout.
	h1Mu    sync.Mutex
	h1Conns map[*h1Conn]struct{}

	// h2Mu guards h2Conns: the downstream connections on the HTTP/2
	// path, which the drain sends a GOAWAY and cuts at its timeout.
	h2Mu    sync.Mutex
	h2Conns map[*h2Conn]struct{}

	// bridgeWork hands a bridged exchange to an idle bridge worker
	// (startBridge); bridgeWorkers are those goroutines, which end when
	// idle for bridgeWorkerIdle or when bridgeStop closes.
	bridgeWork    chan *h1Bridge
	bridgeStop    chan struct{}
	bridgeWorkers sync.WaitGroup
}

// New validates cfg and binds the listeners; the proxy serves once Run is
// called. src supplies the xDS configuration (an *xdsclient.Client); svid
// is the sidecar's own X.509 SVID (an *identity.Source), presented to
// every peer and read at every handshake.
func New(cfg Config, src ConfigSource, svid x509svid.Source, opts Options) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if src == nil {
		return nil, errors.New("sidecar: no configuration source")
	}
	if svid == nil {
		return nil, errors.New("sidecar: no SVID source")
	}
	m, err := newMetrics()
	if err != nil {
		return nil, err
	}
	if err := m.observe(src, svid); err != nil {
		return nil, err
	}
	p := &Proxy{
		opsMaxConns: opsMaxConns,
		cfg:         cfg,
		src:         src,
		svid:        svid,
		onConfig:    opts.OnConfig,
		originalDst: opts.OriginalDst,
		log:         opts.Logger,
		metrics:     m,
		pools:       map[string]*pool{},
		tcpConns:    map[net.Conn]struct{}{},
		h1Conns:     map[*h1Conn]struct{}{},
		h2Conns:     map[*h2Conn]struct{}{},
		inConns:     map[*inboundConn]struct{}{},
		revoke:      make(chan struct{}, 1),
		bridgeWork:  make(chan *h1Bridge),
		bridgeStop:  make(chan struct{}),
	}
	p.dials, p.cutDials = context.WithCancel(context.Background())
	if p.originalDst == nil {
		p.originalDst = capture.OriginalDst
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.log = p.log.With("component", "sidecar")
	p.health.EjectFor = cfg.EjectionTime
	p.bundles = bundleSource{p}
	p.forwarder = &httputil.ReverseProxy{
		Rewrite:        p.rewrite,
		Transport:      roundTripper{p},
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.proxyError,
		BufferPool:     bufferPool{},
		ErrorLog:       log.New(debugWriter{p.log}, "", 0),
	}
	p.outQueue, p.inQueue = newConnQueue(), newConnQueue()
	p.outHTTP = p.newHTTPServer(http.HandlerFunc(p.serveHTTP))
	p.inHTTP = p.newHTTPServer(http.HandlerFunc(p.serveHTTP))

	if err := p.listen(); err != nil {
		p.closeListeners()
		return nil, err
	}
	return p, nil
}

func (p *Proxy) listen() error {
	lc := relay.ListenConfig()
	ln, err := lc.Listen(context.Background(), "tcp", p.cfg.OutboundAddr)
	if err != nil {
		return fmt.Errorf("outbound listener on %s: %w", p.cfg.OutboundAddr, err)
	}
	p.outLn = ln.(*net.TCPListener)
	if ln, err = lc.Listen(context.Background(), "tcp", p.cfg.InboundAddr); err != nil {
		return fmt.Errorf("inbound listener on %s: %w", p.cfg.InboundAddr, err)
	}
	p.inLn = ln.(*net.TCPListener)
	var plain net.ListenConfig
	if p.cfg.AdminAddr != "" {
		if p.adminLn, err = plain.Listen(context.Background(), "tcp", p.cfg.AdminAddr); err != nil {
			return fmt.Errorf("admin listener on %s: %w", p.cfg.AdminAddr, err)
		}
	}
	if p.cfg.HealthAddr != "" {
		if p.healthLn, err = plain.Listen(context.Background(), "tcp", p.cfg.HealthAddr); err != nil {
			return fmt.Errorf("health listener on %s: %w", p.cfg.HealthAddr, err)
		}
	}
	return nil
}

func (p *Proxy) closeListeners() {
	for _, ln := range []net.Listener{p.outLn, p.inLn, p.adminLn, p.healthLn} {
		if ln != nil && !isNilTCP(ln) {
			_ = ln.Close()
		}
	}
}

// isNilTCP reports a typed nil *net.TCPListener in an interface.
func isNilTCP(ln net.Listener) bool {
	t, ok := ln.(*net.TCPListener)
	return ok && t == nil
}

// OutboundAddr is the address of the outbound listener.
func (p *Proxy) OutboundAddr() net.Addr { return p.outLn.Addr() }

// InboundAddr is the address of the inbound listener.
func (p *Proxy) InboundAddr() net.Addr { return p.inLn.Addr() }

// AdminAddr is the admin listener's address; nil when disabled.
func (p *Proxy) AdminAddr() net.Addr { return addrOf(p.adminLn) }

// HealthAddr is the health listener's address; nil when disabled.
func (p *Proxy) HealthAddr() net.Addr { return addrOf(p.healthLn) }

func addrOf(ln net.Listener) net.Addr {
	if ln == nil {
		return nil
	}
	return ln.Addr()
}

// Ready reports whether the sidecar should receive traffic: it has
// adopted a configuration, holds a valid SVID, and is not draining. The
// reason is empty when ready.
func (p *Proxy) Ready() (bool, string) {
	switch {
	case p.draining.Load():
		return false, "draining"
	case p.state.Load() == nil:
		return false, "no xDS configuration yet"
	}
	if _, err := p.svid.GetX509SVID(); err != nil {
		return false, "no SVID: " + err.Error()
	}
	return true, ""
}

// opsMaxConns bounds the connections each of the admin and health
// servers holds at once. The health port is outside the capture, so any
// pod can reach it: a flood of idle connections there must not take the
// file descriptors the proxied connections need. Beyond it, connections
// wait in the listen backlog until one ends; the kubelet and Prometheus
// need a handful.
const opsMaxConns = 64

// Run serves until ctx ends, then drains: it fails readiness and stops
// accepting at once, lets requests and connections in flight finish for
// up to Config.DrainTimeout, closes the rest, and returns nil once every
// goroutine it started has ended. It returns an error only if a listener
// fails. Run may be called once.
func (p *Proxy) Run(ctx context.Context) error {
	if !p.running.CompareAndSwap(false, true) {
		return errors.New("sidecar: Run called twice")
	}
	if cfg := p.src.Current(); cfg != nil {
		p.adopt(cfg)
	}
	eg, ectx := errgroup.WithContext(ctx)
	var ops []*http.Server
	serve := func(name string, ln net.Listener, h http.Handler) {
		if ln == nil {
			return
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute,
			ErrorLog: log.New(debugWriter{p.log}, "", 0)}
		ops = append(ops, srv)
		limited := netutil.LimitListener(ln, p.opsMaxConns)
		eg.Go(func() error {
			if err := srv.Serve(limited); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("%s server: %w", name, err)
			}
			return nil
		})
	}
	serve("admin", p.adminLn, p.adminHandler())
	serve("health", p.healthLn, p.healthHandler())
	configDone := make(chan struct{})
	eg.Go(func() error { defer close(configDone); p.watchConfig(ectx); return nil })
	// Re-decides the inbound connections open after every configuration
	// until none can be adopted any more (configDone).
	revokeStop := make(chan struct{})
	eg.Go(func() error { p.revokeLoop(revokeStop); return nil })
	for _, s := range []struct {
		srv *http.Server
		q   *connQueue
	}{{p.outHTTP, p.outQueue}, {p.inHTTP, p.inQueue}} {
		eg.Go(func() error {
			if err := s.srv.Serve(s.q); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("HTTP server: %w", err)
			}
			return nil
		})
	}
	acceptDone := make(chan struct{}, 2)
	eg.Go(func() error {
		defer func() { acceptDone <- struct{}{} }()
		return p.acceptLoop(ectx, p.outLn, listenerOutbound)
	})
	eg.Go(func() error {
		defer func() { acceptDone <- struct{}{} }()
		return p.acceptLoop(ectx, p.inLn, listenerInbound)
	})
	p.log.Info("sidecar serving", "outbound", p.outLn.Addr().String(), "inbound", p.inLn.Addr().String(),
		"admin", addrString(p.adminLn), "health", addrString(p.healthLn), "have_config", p.state.Load() != nil)

	<-ectx.Done()
	p.draining.Store(true)
	_ = p.outLn.Close()
	_ = p.inLn.Close()
	<-acceptDone
	<-acceptDone // no connection goroutine starts after this
	p.drain()
	<-configDone
	close(revokeStop)
	p.closePools()
	close(p.bridgeStop) // no exchange is bridged after closePools
	p.bridgeWorkers.Wait()
	for _, srv := range ops {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		_ = srv.Shutdown(sctx)
		cancel()
		_ = srv.Close()
	}
	err := eg.Wait()
	_ = p.metrics.provider.Shutdown(context.WithoutCancel(ctx))
	p.log.Info("sidecar stopped")
	return err
}

func addrString(ln net.Listener) string {
	if ln == nil {
		return ""
	}
	return ln.Addr().String()
}

// drain lets HTTP requests and TCP proxies in flight finish for up to
// DrainTimeout (HTTP/1.1 connections close when idle or after the
// request in flight, HTTP/2 ones get a GOAWAY), then closes what is left
// and waits for every goroutine.
func (p *Proxy) drain() {
	p.log.Info("draining", "outbound", p.active[0].Load(), "inbound", p.active[1].Load(), "timeout", p.cfg.DrainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), p.cfg.DrainTimeout)
	defer cancel()
	p.h1KickIdle()
	p.h2GoAwayAll()
	var wg sync.WaitGroup
	for _, srv := range []*http.Server{p.outHTTP, p.inHTTP} {
		wg.Go(func() {
			if err := srv.Shutdown(dctx); err != nil {
				_ = srv.Close() // the drain timeout passed
			}
		})
	}
	wg.Go(func() {
		done := make(chan struct{})
		go func() { p.connGoroutines.Wait(); close(done) }()
		select {
		case <-done:
			return
		case <-dctx.Done():
		}
		p.cutDials()
		p.tcpMu.Lock()
		n := len(p.tcpConns)
		for c := range p.tcpConns {
			_ = c.Close()
		}
		p.tcpMu.Unlock()
		n += p.h1CutAll()
		n += p.h2CutAll()
		if n > 0 {
			p.log.Info("drain timeout passed: closed the TCP and HTTP/1.1 connections left", "sockets", n)
		}
		<-done
	})
	wg.Wait()
	p.connGoroutines.Wait()
	p.httpConns.Wait()
	p.requests.closeAndWait()
}

// closePools closes every upstream pool's idle connections (all are idle
// once every handler has returned) and waits for them to close.
func (p *Proxy) closePools() {
	p.poolsMu.Lock()
	all := append([]*pool(nil), p.retired...)
	for _, pl := range p.pools {
		all = append(all, pl)
	}
	p.retired = nil
	p.poolsMu.Unlock()
	for _, pl := range all {
		pl.closeIdle()
	}
	if !p.upstreams.waitFor(5 * time.Second) {
		p.log.Warn("upstream connections still open 5s after the drain", "open", p.upstreams.value())
		p.upstreams.waitFor(time.Minute)
	}
}

// watchConfig adopts every configuration the source publishes.
func (p *Proxy) watchConfig(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.src.Updated():
			if cfg := p.src.Current(); cfg != nil {
				p.adopt(cfg)
			}
		}
	}
}

// adopt builds what serving cfg needs and swaps it in. A configuration
// without the sidecar's part (Check refuses it) is logged and skipped:
// the last good one stays.
func (p *Proxy) adopt(cfg *xdsclient.Config) {
	if prev := p.state.Load(); prev != nil && prev.cfg == cfg {
		return
	}
	if err := Check(cfg); err != nil {
		p.log.Warn("configuration refused, keeping the last one", "error", err)
		return
	}
	st := p.buildState(cfg)
	st.gen = p.gens.Add(1)
	p.state.Store(st)
	p.requestRevokes()
	p.log.Info("configuration adopted", "versions", cfg.Versions, "clusters", len(cfg.Clusters),
		"outbound_chains", len(cfg.Sidecar.Outbound.Chains), "routes", len(cfg.Sidecar.Routes), "hosts", cfg.Sidecar.Hosts())
	if p.onConfig != nil {
		p.onConfig(cfg)
	}
}

// acceptLoop accepts connections on ln until it is closed.
func (p *Proxy) acceptLoop(ctx context.Context, ln *net.TCPListener, listener string) error {
	idx := listenerIndex(listener)
	serve := p.serveOutbound
	if listener == listenerInbound {
		serve = p.serveInbound
	}
	var delay time.Duration
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if ctx.Err() != nil || p.draining.Load() {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("accept on %s: %w", listener, err)
			}
			// Out of file descriptors and the like: back off as net/http
			// does, and keep serving the connections open.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed; retrying", "listener", listener, "error", err, "in", delay)
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		delay = 0
		p.metrics.accepted[idx].add(1)
		if p.active[idx].Add(1) > int64(p.cfg.MaxConnections) {
			p.active[idx].Add(-1)
			p.metrics.refuse(listener, ReasonOverLimit)
			_ = c.SetLinger(0) // RST: spend nothing more on it
			_ = c.Close()
			continue
		}
		p.metrics.active[idx].add(1)
		p.connGoroutines.Add(1)
		go serve(c)
	}
}

func listenerIndex(listener string) int {
	if listener == listenerInbound {
		return 1
	}
	return 0
}

// release is a downstream connection's end: it no longer counts against
// MaxConnections.
func (p *Proxy) release(listener string) {
	idx := listenerIndex(listener)
	p.active[idx].Add(-1)
	p.metrics.active[idx].add(-1)
}

// refuse counts a refusal and closes c.
func (p *Proxy) refuse(c net.Conn, listener, reason string, logArgs ...any) {
	p.metrics.refuse(listener, reason)
	if p.log.Enabled(context.Background(), slog.LevelDebug) {
		p.log.Debug("refused", append([]any{"listener", listener, "reason", reason, "remote", c.RemoteAddr().String()}, logArgs...)...)
	}
	_ = c.Close()
}

func (p *Proxy) track(c net.Conn) {
	p.tcpMu.Lock()
	p.tcpConns[c] = struct{}{}
	p.tcpMu.Unlock()
}

func (p *Proxy) untrackAndClose(c net.Conn) {
	p.tcpMu.Lock()
	delete(p.tcpConns, c)
	p.tcpMu.Unlock()
	_ = c.Close()
}

// gauge counts things in flight that may start while Run waits for them
// to end (a WaitGroup forbids that): HTTP handlers a connection already
// read the request of, upstream dials the Transport finishes in the
// background.
type gauge struct {
	// mu guards n, closed and zero.
	mu     sync.Mutex
	n      int
	closed bool
	// zero is closed when n reaches 0; nil while nobody waits.
	zero chan struct{}
}

// enter counts one more, unless closeAndWait was called: then it
// reports false and counts nothing.
func (g *gauge) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.n++
	return true
}

func (g *gauge) leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.n--
	if g.n == 0 && g.zero != nil {
		close(g.zero)
		g.zero = nil
	}
}

func (g *gauge) value() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}

// waitFor waits until the count is zero, at most d; it reports whether
// it saw zero.
func (g *gauge) waitFor(d time.Duration) bool {
	g.mu.Lock()
	if g.n == 0 {
		g.mu.Unlock()
		return true
	}
	if g.zero == nil {
		g.zero = make(chan struct{})
	}
	ch := g.zero
	g.mu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

// closeAndWait refuses further enters and waits until the count is zero.
func (g *gauge) closeAndWait() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	for !g.waitFor(time.Minute) {
	}
}

// debugWriter sends the standard library's server and proxy logs to the
// logger at Debug: they are per connection.
type debugWriter struct{ log *slog.Logger }

func (w debugWriter) Write(b []byte) (int, error) {
	if w.log.Enabled(context.Background(), slog.LevelDebug) {
		w.log.Debug(string(trimNewline(b)))
	}
	return len(b), nil
}

func trimNewline(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		return b[:n-1]
	}
	return b
}
