package sidecar

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// xfccHeader is Envoy's X-Forwarded-Client-Cert.
const xfccHeader = "X-Forwarded-Client-Cert"

// Causes of a request's end that the error handler reports.
var (
	errRouteTimeout = errors.New("route timeout")
	errStreamIdle   = errors.New("stream idle timeout")
	// errConnTermination: the upstream connection closed under a request
	// that had no response yet.
	errConnTermination = errors.New("connection termination")
)

// protocolError is an upstream's answer that broke its protocol before
// a response could start: a head the codec refuses, a frame out of
// place. Envoy answers it 502 with "reset reason: protocol error" (its
// UPE flag), where a reset or a closed connection gets 503.
type protocolError struct{ err error }

func (e *protocolError) Error() string { return "protocol error: " + e.err.Error() }
func (e *protocolError) Unwrap() error { return e.err }

// upstreamProtocolError wraps err, an upstream's breach, as a
// protocolError; an *h1Error keeps only its words, not the status a
// downstream would get for it.
func upstreamProtocolError(err error) error {
	if he, ok := err.(*h1Error); ok {
		err = errors.New(he.msg)
	}
	return &protocolError{err}
}

// connInfo is what a downstream HTTP connection brings to its requests:
// its listener, HTTP connection manager and original destination, and
// inbound, the caller's SPIFFE ID and the XFCC value describing it.
type connInfo struct {
	listener string
	hcm      *xdsclient.HTTPConnectionManager
	dst      netip.AddrPort
	// redirected is false for a connection iptables did not redirect:
	// dst is then the listener's own address (explicit mode).
	redirected bool
	// xfcc is the X-Forwarded-Client-Cert value a SANITIZE_SET manager
	// sets: By=<own ID>;Hash=<caller's leaf>;URI=<caller's ID>.
	xfcc string
	// in is an inbound connection as new configurations re-decide it
	// (revoke.go), with its caller and addresses, what RBAC reads; nil
	// outbound.
	in *inboundConn
}

// httpConn is a downstream connection handed to an HTTP server. It hides
// *tls.Conn (net/http would pick the protocol by the TLS ALPN, which is
// istio-h2 or istio-http/1.1): the server then tells HTTP/1.1 from
// HTTP/2 by the connection preface, as Envoy's codec_type AUTO does.
type httpConn struct {
	net.Conn
	info     *connInfo
	released atomic.Bool
	release  func()
	// idle: the server waits for the connection's next request (HTTP/1.1)
	// or has no stream open on it (HTTP/2).
	idle atomic.Bool
}

func (c *httpConn) Close() error {
	err := c.Conn.Close()
	if c.released.CompareAndSwap(false, true) {
		c.release()
	}
	return err
}

type connInfoKey struct{}

// setXFCC is the X-Forwarded-Client-Cert value requests on the
// connection get: the caller's under SANITIZE_SET, else none (the
// header is removed).
func (ci *connInfo) setXFCC() string {
	if ci.hcm.ForwardClientCert == xdsclient.SanitizeSet {
		return ci.xfcc
	}
	return ""
}

func connInfoOf(ctx context.Context) *connInfo {
	ci, _ := ctx.Value(connInfoKey{}).(*connInfo)
	return ci
}

// connQueue is the net.Listener an HTTP server serves: the connections
// the outbound or inbound listener routed to an HTTP connection manager.
type connQueue struct {
	ch        chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newConnQueue() *connQueue {
	return &connQueue{ch: make(chan net.Conn), done: make(chan struct{})}
}

// push hands c to the server; false when the server stopped (the caller
// closes c).
func (q *connQueue) push(c net.Conn) bool {
	select {
	case q.ch <- c:
		return true
	case <-q.done:
		return false
	}
}

func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.done:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) Close() error {
	q.closeOnce.Do(func() { close(q.done) })
	return nil
}

func (q *connQueue) Addr() net.Addr { return queueAddr{} }

type queueAddr struct{}

func (queueAddr) Network() string { return "sidecar" }
func (queueAddr) String() string  { return "sidecar" }

// newHTTPServer is an HTTP connection manager with codec_type AUTO:
// HTTP/1.1, or HTTP/2 with prior knowledge, on connections pushed to its
// queue.
func (p *Proxy) newHTTPServer(h http.Handler) *http.Server {
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	return &http.Server{
		Handler:           h,
		Protocols:         &protos,
		ReadHeaderTimeout: p.cfg.ReadHeaderTimeout,
		IdleTimeout:       p.cfg.HTTPIdleTimeout,
		HTTP2:             &http.HTTP2Config{SendPingTimeout: h2SendPingTimeout, PingTimeout: h2PingTimeout},
		ErrorLog:          log.New(debugWriter{p.log}, "", 0),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if hc, ok := c.(*httpConn); ok {
				return context.WithValue(ctx, connInfoKey{}, hc.info)
			}
			return ctx
		},
		ConnState: func(c net.Conn, s http.ConnState) {
			switch s {
			case http.StateNew:
				p.httpConns.Add(1)
			case http.StateClosed, http.StateHijacked:
				p.httpConns.Done()
			}
			if hc, ok := c.(*httpConn); ok && hc.info.in != nil {
				// A retiring connection closes once idle; the pass that
				// retires it closes it if it is idle already.
				hc.idle.Store(s == http.StateIdle)
				if s == http.StateIdle && hc.info.retiring() {
					_ = hc.Close()
				}
			}
		},
	}
}

// serveHTTP routes a request by its authority (Host, :authority, or the
// host of an absolute-form request target: the sidecar as an HTTP proxy)
// through the connection manager's route configuration, then forwards it
// to the route's cluster.
func (p *Proxy) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if !p.requests.enter() {
		w.Header().Set("Connection", "close")
		http.Error(w, "isthmus sidecar: shutting down", http.StatusServiceUnavailable)
		return
	}
	defer p.requests.leave()
	ci := connInfoOf(r.Context())
	st := p.state.Load()
	if ci == nil || st == nil {
		http.Error(w, "isthmus sidecar: no configuration", http.StatusServiceUnavailable)
		return
	}
	nw, hcm := p.rbacNow(ci)
	if ci.retiring() {
		// Its chain is gone from the configuration: this answer is its
		// last (HTTP/2: a GOAWAY).
		w.Header().Set("Connection", "close")
	}
	if hcm.NormalizePath && !normalizeRequestPath(r) {
		p.metrics.request(ci.listener, "", http.StatusBadRequest)
		http.Error(w, "isthmus sidecar: path cannot be normalized", http.StatusBadRequest)
		return
	}
	if rb := hcm.RBAC; !ci.allowedBy(nw) || rb != nil && !rbacAllowsNetHTTP(rb, ci, r) {
		// Envoy's answer. An HTTP/1.1 body the handler did not read,
		// net/http reads and drops (up to 256 KiB) for the connection
		// to be kept, or closes it: refuseLinger bounds the wait for a
		// body the caller is slow to send. HTTP/2 resets the stream.
		if r.ContentLength != 0 {
			_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(refuseLinger))
		}
		p.rbacRefused(ci, r.Method, requestPath(r))
		p.metrics.request(ci.listener, "", http.StatusForbidden)
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusForbidden)
		_, _ = io.WriteString(w, rbacDenied)
		return
	}
	d := route(st, ci, r)
	if d.err != "" {
		p.metrics.request(ci.listener, d.cluster, d.code)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(d.code)
		_, _ = io.WriteString(w, "isthmus sidecar: "+d.err+"\n")
		return
	}
	// The HTTP version upstream: the cluster's, or the app's
	// (use_downstream_protocol_config).
	h2 := d.up.c.UpstreamHTTP == xdsclient.UpstreamHTTP2 ||
		r.ProtoMajor == 2 && d.up.c.UpstreamHTTP == xdsclient.UpstreamHTTPDownstream
	f := &forward{p: p, ci: ci, up: d.up, h2: h2,
		bytes: p.metrics.bytes(ci.listener, d.up.name)}
	var ok bool
	if f.target, ok = p.target(ci, d.up); !ok {
		p.metrics.request(ci.listener, d.up.name, http.StatusBadGateway)
		http.Error(w, notRedirected(d.up.name), http.StatusBadGateway)
		return
	}
	ctx, cancel := context.WithCancelCause(context.WithValue(r.Context(), forwardKey{}, f))
	defer cancel(nil)
	if d.timeout > 0 {
		// A timer, not a deadline: a 101 stops it (modifyResponse), as
		// Envoy's route timeout never runs on an upgraded stream.
		f.route = time.AfterFunc(d.timeout, func() { cancel(errRouteTimeout) })
		defer f.route.Stop()
	}
	f.touch()
	idle := newIdleWatch(p.cfg.StreamIdleTimeout, &f.last, func() {
		cancel(errStreamIdle)
		// Unblock a body read stuck on a downstream that stopped
		// sending, and once the response started, a copy stuck on one
		// that stopped reading; before the response, the 408 or 504
		// must still go out. (idle.stop, deferred, waits for this: the
		// ResponseWriter is never touched once the handler returned.)
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now())
		if f.responded.Load() {
			_ = rc.SetWriteDeadline(time.Now())
		}
	})
	defer idle.stop()
	switch {
	case r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0:
		// Nothing to read (ReverseProxy sends no body for a length of
		// 0, so an HTTP/2 request's empty body is never read to its end).
		f.requestEnded.Store(true)
	default:
		r.Body = &countingBody{rc: r.Body, f: f, count: f.received, ended: &f.requestEnded}
	}
	p.forwarder.ServeHTTP(w, r.WithContext(ctx))
}

// decision is where a request goes: an upstream and the route's timeout,
// or an error answered with code.
type decision struct {
	up      *upstream
	cluster string
	timeout time.Duration
	code    int
	err     string
}

// target is where both HTTP paths send a request for u on ci's
// connection when u has no picker (zero when it has one): the app's port
// inbound, the original destination outbound. It is false for an
// outbound connection that was not redirected: its destination is the
// sidecar itself.
func (p *Proxy) target(ci *connInfo, u *upstream) (netip.AddrPort, bool) {
	switch {
	case u.picker != nil:
		return netip.AddrPort{}, true
	case ci.listener == listenerInbound:
		return netip.AddrPortFrom(p.cfg.AppAddr, ci.dst.Port()), true
	case !ci.redirected:
		return netip.AddrPort{}, false
	default:
		return ci.dst, true
	}
}

// notRedirected is the 502 answer to a request target refuses.
func notRedirected(cluster string) string {
	return "isthmus sidecar: " + cluster + " would send the request back to the sidecar (the connection was not redirected)"
}

// route applies the route configuration of ci's connection manager to r,
// as Envoy's router does for the subset the contract emits: the virtual
// host whose domain is the whole authority (else "*"), the first route
// whose prefix starts the path, its cluster. No virtual host or route is
// Envoy's NR: 404.
func route(st *state, ci *connInfo, r *http.Request) decision {
	return routeTo(st, ci, r.Method, r.Host, r.URL.EscapedPath())
}

// routeTo is route for a request's method, authority and escaped path,
// as both HTTP paths read them; it keeps none of the strings.
func routeTo(st *state, ci *connInfo, method, authority, path string) decision {
	if method == http.MethodConnect {
		return decision{code: http.StatusMethodNotAllowed, err: "CONNECT is not supported: send requests for http:// URLs, or call the service's name directly"}
	}
	rc := ci.hcm.Routes
	if rc == nil {
		rc = st.cfg.Sidecar.Route(ci.hcm.RouteConfigName)
	}
	vh := rc.VirtualHost(authority)
	if vh == nil {
		return decision{code: http.StatusNotFound,
			err: fmt.Sprintf("no route for host %q in route configuration %q (NR)", authority, ci.hcm.RouteConfigName)}
	}
	rt := vh.Route(path)
	if rt == nil {
		return decision{code: http.StatusNotFound,
			err: fmt.Sprintf("no route for path %q of host %q in virtual host %q (NR)", path, authority, vh.Name)}
	}
	up := st.clusters[rt.Cluster]
	if up == nil {
		return decision{code: http.StatusServiceUnavailable, cluster: rt.Cluster,
			err: fmt.Sprintf("cluster %q is not configured (NC)", rt.Cluster)}
	}
	return decision{up: up, cluster: rt.Cluster, timeout: rt.Timeout}
}

// forward is one request's way upstream, shared by the proxy's hooks
// through the request context.
type forward struct {
	p  *Proxy
	ci *connInfo
	up *upstream
	// target is the address of an ORIGINAL_DST cluster's request.
	target netip.AddrPort
	// h2 is whether the upstream speaks HTTP/2: the cluster does, or the
	// app did and the cluster uses the downstream protocol.
	h2 bool
	// last is when a byte of body last moved either way (Unix
	// nanoseconds), for the stream idle timeout.
	last atomic.Int64
	// bytes are the byte counters, looked up once.
	bytes byteCounters
	// responded is set once the upstream's response headers arrived.
	responded atomic.Bool
	// route is the route timeout's timer, nil without one.
	route *time.Timer
	// requestEnded is set once the request's body was read to its end
	// (at once without one).
	requestEnded atomic.Bool
}

type forwardKey struct{}

func forwardOf(ctx context.Context) *forward {
	f, _ := ctx.Value(forwardKey{}).(*forward)
	return f
}

func (f *forward) touch() { f.last.Store(time.Now().UnixNano()) }

func (f *forward) received(n int64) { f.bytes.received.add(n) }
func (f *forward) sent(n int64)     { f.bytes.sent.add(n) }

// rewrite makes the upstream request: origin-form, the authority as the
// app sent it, X-Forwarded-* as the app sent them (the sidecar is not a
// hop the app knows of), and X-Forwarded-Client-Cert as the connection
// manager says: removed (SANITIZE, Envoy's default) or replaced with the
// caller's (SANITIZE_SET).
func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	f := forwardOf(pr.In.Context())
	pr.Out.URL.Scheme = "http"
	pr.Out.URL.Host = f.target.String() // the endpoint's, when picked
	pr.Out.Host = pr.In.Host
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[h]; ok {
			pr.Out.Header[h] = v
		}
	}
	// The sidecar's own server answers "Expect: 100-continue" when the
	// body is first read; asked again, each sidecar on the way and the
	// app would send one more 100 (Envoy's proxy_100_continue: false).
	pr.Out.Header.Del("Expect")
	pr.Out.Header.Del(xfccHeader)
	if v := f.ci.setXFCC(); v != "" {
		pr.Out.Header.Set(xfccHeader, v)
	}
}

// modifyResponse counts the response and follows its body for the byte
// counters and the stream idle timeout. A response whose head came after
// the request ended (the Transport returns one that raced with its
// cancellation) is not passed on: proxyError answers by the cause, as
// the HTTP/1.1 path does once its deadline passed.
func (p *Proxy) modifyResponse(resp *http.Response) error {
	if ctx := resp.Request.Context(); ctx.Err() != nil {
		return context.Cause(ctx)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if err := checkSwitch(resp); err != nil {
			return err // ReverseProxy closes the body, the connection
		}
	}
	f := forwardOf(resp.Request.Context())
	if f.ci.retiring() && resp.StatusCode != http.StatusSwitchingProtocols {
		// Its chain went while the request was in flight (ReverseProxy
		// removed the upstream's hop-by-hop fields already).
		resp.Header.Set("Connection", "close")
	}
	p.metrics.request(f.ci.listener, f.up.name, resp.StatusCode)
	f.responded.Store(true)
	f.touch()
	switch {
	case resp.StatusCode == http.StatusSwitchingProtocols:
		// The body is the upgraded connection, which ReverseProxy needs
		// as an io.ReadWriteCloser. It lives as long as it carries
		// bytes: the route timeout no longer applies, and the stream
		// idle timeout counts what moves either way.
		if f.route != nil {
			f.route.Stop()
		}
		rwc, ok := resp.Body.(io.ReadWriteCloser)
		if !ok {
			return upstreamProtocolError(errors.New("101 Switching Protocols without a connection to switch"))
		}
		resp.Body = &upgradedConn{rwc: rwc, f: f}
	case resp.Body != nil && resp.Body != http.NoBody:
		resp.Body = &countingBody{rc: resp.Body, f: f, count: f.sent}
	}
	return nil
}

// upgradedConn is an upgraded connection's upstream side, counted both
// ways for the byte counters and the stream idle timeout.
type upgradedConn struct {
	rwc io.ReadWriteCloser
	f   *forward
}

func (c *upgradedConn) Read(p []byte) (int, error) {
	n, err := c.rwc.Read(p)
	if n > 0 {
		c.f.touch()
		c.f.sent(int64(n))
	}
	return n, err
}

func (c *upgradedConn) Write(p []byte) (int, error) {
	n, err := c.rwc.Write(p)
	if n > 0 {
		c.f.touch()
		c.f.received(int64(n))
	}
	return n, err
}

func (c *upgradedConn) Close() error { return c.rwc.Close() }

// checkSwitch refuses a 101 that switches to a protocol the request did
// not ask for, as the HTTP/1.1 path does. ReverseProxy would refuse it
// too, but leave the upstream connection open for good.
func checkSwitch(resp *http.Response) error {
	want, got := upgradeType(resp.Request.Header), upgradeType(resp.Header)
	switch {
	case want == "":
		return upstreamProtocolError(errors.New("101 Switching Protocols to a request without Upgrade"))
	case !strings.EqualFold(want, got):
		return upstreamProtocolError(fmt.Errorf("101 Switching Protocols to %q when %q was requested", got, want))
	}
	return nil
}

// upgradeType is the protocol a message's Upgrade names, if its
// Connection lists Upgrade.
func upgradeType(h http.Header) string {
	if !httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}

// proxyError answers a request that got no response, as Envoy words it.
func (p *Proxy) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	f := forwardOf(r.Context())
	code, msg := http.StatusGatewayTimeout, ""
	cause := context.Cause(r.Context())
	switch {
	case errors.Is(cause, errRouteTimeout):
		msg = "upstream request timeout"
	case errors.Is(cause, errStreamIdle):
		msg = "stream timeout"
		if !f.requestEnded.Load() {
			// Envoy's answer to an incomplete request; its body
			// cannot be read on, so neither can the connection.
			code = http.StatusRequestTimeout
			w.Header().Set("Connection", "close")
		}
	case r.Context().Err() != nil:
		// The downstream went away (or closed its sending side): abort,
		// as the HTTP/1.1 path closes the connection. Returning would
		// let net/http answer 200 with an empty body, which a caller
		// still reading takes for the upstream's answer.
		p.metrics.request(f.ci.listener, f.up.name, 0)
		panic(http.ErrAbortHandler)
	default:
		code, msg = failureCode(err), failureMessage(err)
	}
	p.metrics.request(f.ci.listener, f.up.name, code)
	if f.ci.retiring() {
		w.Header().Set("Connection", "close")
	}
	if p.log.Enabled(r.Context(), slog.LevelDebug) {
		p.log.Debug("request failed", "listener", f.ci.listener, "cluster", f.up.name, "code", code, "error", err)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, msg)
}

// failureCode is the status every path answers when a request got no
// response and no timeout or downstream close explains it: 502 for an
// upstream that broke its protocol, else 503.
func failureCode(err error) int {
	var pe *protocolError
	if errors.As(err, &pe) {
		return http.StatusBadGateway
	}
	return http.StatusServiceUnavailable
}

// failureMessage is the body that goes with failureCode; its words are
// Envoy's, a protocol error's followed by what broke.
func failureMessage(err error) string {
	const reset = "upstream connect error or disconnect/reset before headers. reset reason: "
	var (
		ce *connectError
		pe *protocolError
	)
	switch {
	case errors.As(err, &pe):
		return reset + "protocol error: " + pe.err.Error()
	case errors.Is(err, errNoHealthyUpstream):
		return "no healthy upstream"
	case errors.Is(err, errConnTermination):
		return reset + "connection termination"
	case errors.As(err, &ce) && ce.tls:
		return reset + "connection failure, transport failure reason: TLS error: " + ce.err.Error()
	case errors.As(err, &ce):
		return reset + "connection failure, transport failure reason: " + ce.err.Error()
	default:
		return reset + "remote reset: " + err.Error()
	}
}

// countingBody counts a body's bytes and marks the stream active.
type countingBody struct {
	rc    io.ReadCloser
	f     *forward
	count func(int64)
	// ended, when not nil, is set at the body's end.
	ended *atomic.Bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.f.touch()
		b.count(int64(n))
	}
	if err == io.EOF && b.ended != nil {
		b.ended.Store(true)
	}
	return n, err
}

func (b *countingBody) Close() error { return b.rc.Close() }

// idleWatch calls fire once when a stream has moved no body byte for
// idle: a timer re-armed for the time left, so bytes that flow cost one
// atomic store each, not a timer reset.
//
// stop waits for a check in progress: once it returns, fire is not
// running and never will, so fire may use what its caller is about to
// give back (the ResponseWriter).
type idleWatch struct {
	t *time.Timer
	// mu is held by a check and by stop; stopped is under it.
	mu      sync.Mutex
	stopped bool
}

func newIdleWatch(idle time.Duration, last *atomic.Int64, fire func()) *idleWatch {
	w := &idleWatch{}
	check := func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.stopped {
			return
		}
		if left := idle - time.Duration(time.Now().UnixNano()-last.Load()); left > 0 {
			w.t.Reset(left)
			return
		}
		fire()
	}
	// Armed only once w.t is set: check reads it.
	w.t = time.AfterFunc(math.MaxInt64, check)
	w.t.Reset(idle)
	return w
}

func (w *idleWatch) stop() {
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
	w.t.Stop()
}

// bufferPool lends ReverseProxy its copy buffers.
type bufferPool struct{}

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *copyBuffers.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { copyBuffers.Put(&b) }
