package sidecar

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Upstream HTTP/2 liveness: a connection silent this long is pinged, and
// closed if the answer takes longer than the timeout.
const (
	h2SendPingTimeout = time.Minute
	h2PingTimeout     = 15 * time.Second
)

var errNoHealthyUpstream = errors.New("no healthy upstream")

// connectError is a failure to connect to one endpoint: TCP, or the TLS
// handshake (a certificate that does not verify, a SPIFFE ID the cluster
// does not list). Nothing was sent, so another endpoint may be tried.
type connectError struct {
	cluster string
	addr    string
	tls     bool
	err     error
}

func (e *connectError) Error() string {
	what := "connect to"
	if e.tls {
		what = "TLS handshake with"
	}
	return fmt.Sprintf("cluster %s: %s %s: %v", e.cluster, what, e.addr, e.err)
}

func (e *connectError) Unwrap() error { return e.err }

// pool holds one cluster's upstream connections: an HTTP/1.1 and an
// HTTP/2 keep-alive pool per endpoint (the version spoken upstream), and
// the TLS client configurations. It outlives configurations that keep
// the cluster's connection settings (poolKey).
type pool struct {
	p       *Proxy
	key     string
	cluster string
	// original is an ORIGINAL_DST cluster: plaintext to where the
	// connection was going.
	original       bool
	connectTimeout time.Duration
	// tlsH1, tlsH2 and tlsTCP are the mTLS client configurations for an
	// app speaking HTTP/1.1, HTTP/2, or opaque TCP; nil for plaintext.
	tlsH1, tlsH2, tlsTCP *tls.Config

	// mu guards h1 and h2, made on first use.
	mu     sync.Mutex
	h1, h2 *http.Transport
	// h1mu guards h1idle, the idle connections of the HTTP/1.1 path by
	// endpoint, and h1closed, set when the pool closes its idle
	// connections for good.
	h1mu     sync.Mutex
	h1idle   map[netip.AddrPort][]*h1Up
	h1closed bool
	// h2mu guards h2conns, the HTTP/2 path's connections by endpoint,
	// each carrying many streams.
	h2mu    sync.Mutex
	h2conns map[netip.AddrPort][]*h2Conn
	// conns counts this pool's upstream connections open.
	conns atomic.Int64
	// retiredAt is when a newer configuration replaced the pool; set
	// under p.poolsMu.
	retiredAt time.Time
}

func (p *Proxy) newPool(c *xdsclient.Cluster, key string) *pool {
	pl := &pool{p: p, key: key, cluster: c.Name, original: c.Type == xdsclient.OriginalDst, connectTimeout: c.ConnectTimeout}
	if pl.connectTimeout <= 0 {
		pl.connectTimeout = 5 * time.Second // Envoy's default; the decoder never leaves it zero
	}
	if t := c.TLS; t != nil {
		mk := func(alpn []string) *tls.Config {
			cfg := tlsconfig.MTLSClientConfig(p.svid, p.bundles, authorizer(t.SANs))
			cfg.ServerName = t.SNI
			cfg.NextProtos = alpn
			return cfg
		}
		// The HTTP version spoken upstream picks the ALPN the cluster
		// offers; a cluster without the istio HTTP protocols offers what
		// it lists.
		pick := func(want string) []string {
			if slices.Contains(t.ALPN, want) {
				return []string{want}
			}
			return slices.Clone(t.ALPN)
		}
		pl.tlsH1 = mk(pick(alpnHTTP1))
		pl.tlsH2 = mk(pick(alpnHTTP2))
		pl.tlsTCP = mk(slices.Clone(t.ALPN))
	}
	return pl
}

// transport is the pool for the version spoken upstream: HTTP/2 (h2c to
// the app, HTTP/2 inside mTLS to a peer) or HTTP/1.1 (forward.h2). Requests name the
// endpoint in URL.Host, so each endpoint has its own connections.
func (pl *pool) transport(h2 bool) *http.Transport {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	t := &pl.h1
	tlsCfg := pl.tlsH1
	if h2 {
		t, tlsCfg = &pl.h2, pl.tlsH2
	}
	if *t != nil {
		return *t
	}
	var protos http.Protocols
	if h2 {
		// Prior knowledge over whatever DialContext returns: the mTLS
		// connection negotiated istio-h2, which Go's own ALPN check (h2)
		// would refuse, so the Transport sees a plain connection.
		protos.SetUnencryptedHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	*t = &http.Transport{
		Protocols: &protos,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			// addr is the URL.Host RoundTrip set: an AddrPort's String.
			ep, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, fmt.Errorf("sidecar: upstream address %q: %w", addr, err)
			}
			return pl.dialPooled(ctx, ep, tlsCfg)
		},
		MaxIdleConnsPerHost: pl.p.cfg.MaxIdlePerEndpoint,
		IdleConnTimeout:     pl.p.cfg.UpstreamIdleTimeout,
		DisableCompression:  true, // the app's Accept-Encoding, untouched
		HTTP2:               &http.HTTP2Config{SendPingTimeout: h2SendPingTimeout, PingTimeout: h2PingTimeout},
	}
	return *t
}

// closeIdle closes the pool's idle connections.
func (pl *pool) closeIdle() {
	pl.h1CloseIdle()
	pl.h2CloseIdle()
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for _, t := range []*http.Transport{pl.h1, pl.h2} {
		if t != nil {
			t.CloseIdleConnections()
		}
	}
}

// drained reports whether a retired pool has no connection left.
func (pl *pool) drained() bool { return pl.conns.Load() == 0 }

// dialPooled is the Transports' dialer: one connection to ep, counted
// until it closes.
func (pl *pool) dialPooled(ctx context.Context, ep netip.AddrPort, tlsCfg *tls.Config) (net.Conn, error) {
	if !pl.p.upstreams.enter() {
		return nil, errors.New("sidecar: stopping")
	}
	c, err := pl.dial(ctx, ep, tlsCfg)
	if err != nil {
		pl.p.upstreams.leave()
		return nil, err
	}
	c = withRawIO(c)
	pl.conns.Add(1)
	return &upConn{Conn: c, pool: pl}, nil
}

// dial connects to ep within the cluster's connect timeout and, for a
// TLS cluster, completes the mTLS handshake within HandshakeTimeout. A
// failure is counted, and the endpoint ejected when it was picked from
// EDS (passive health).
func (pl *pool) dial(ctx context.Context, ep netip.AddrPort, tlsCfg *tls.Config) (net.Conn, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(pl.p.dials, cancel)()
	d := net.Dialer{Timeout: pl.connectTimeout, LocalAddr: appSource(ep, pl.p.cfg.AppAddr)}
	raw, err := d.DialContext(ctx, "tcp", ep.String())
	if err != nil {
		return nil, pl.failed(ep, false, err)
	}
	if tlsCfg == nil {
		return raw, nil
	}
	under := raw
	if tcp, ok := raw.(*net.TCPConn); ok {
		under = newTryConn(tcp) // raw I/O, and the HTTP/2 path's non-blocking writes
	}
	tc := tls.Client(under, tlsCfg)
	hctx, cancel := context.WithTimeout(ctx, pl.p.cfg.HandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		_ = raw.Close()
		return nil, pl.failed(ep, true, err)
	}
	return tc, nil
}

// inboundPassthrough is the source the sidecar delivers inbound
// connections from when the app listens on a pod address: the capture
// rules let it through (Istio's 127.0.0.6), where any other source of the
// sidecar's own would be captured inbound again, into a loop.
var inboundPassthrough = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 6)}

// appSource is the local address to dial ep from: inboundPassthrough
// when ep is the app on a non-loopback address (Config.AppAddr), else
// nil (the kernel's choice).
func appSource(ep netip.AddrPort, app netip.Addr) net.Addr {
	if app = app.Unmap(); app.IsLoopback() || !app.Is4() || ep.Addr().Unmap() != app {
		return nil
	}
	return inboundPassthrough
}

func (pl *pool) failed(ep netip.AddrPort, isTLS bool, err error) error {
	pl.p.metrics.connectFailure(pl.cluster)
	if !pl.original {
		pl.p.health.Eject(ep)
	}
	return &connectError{cluster: pl.cluster, addr: ep.String(), tls: isTLS, err: err}
}

// upConn is a pooled upstream connection, counted until closed. It
// keeps how many bytes it read and whether a read or write failed, which
// tell a malformed response from a failed connection (send).
type upConn struct {
	net.Conn
	pool   *pool
	closed atomic.Bool
	read   atomic.Int64
	ioErr  atomic.Bool
}

func (c *upConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.read.Add(int64(n))
	if err != nil {
		c.ioErr.Store(true)
	}
	return n, err
}

func (c *upConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil {
		c.ioErr.Store(true)
	}
	return n, err
}

func (c *upConn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		c.pool.conns.Add(-1)
		c.pool.p.upstreams.leave()
	}
	return err
}

// dialTCP connects a tcp_proxy to cluster u: an endpoint picked by the
// cluster's rules, trying up to MaxConnectAttempts of them, with mTLS
// (ALPN "istio") for a TLS cluster; for an ORIGINAL_DST cluster, target
// as it is.
func (p *Proxy) dialTCP(ctx context.Context, u *upstream, target netip.AddrPort) (net.Conn, error) {
	if u.picker == nil {
		return u.pool.dial(ctx, target, nil)
	}
	var lastErr error
	for range p.cfg.MaxConnectAttempts {
		ep, ok := u.picker.Pick()
		if !ok {
			return nil, errNoHealthyUpstream
		}
		c, err := u.pool.dial(ctx, ep, u.pool.tlsTCP)
		if err == nil {
			p.health.Restore(ep)
			return c, nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("%d connect attempts failed, the last: %w", p.cfg.MaxConnectAttempts, lastErr)
}

// roundTripper sends a request to the upstream its forward context names:
// an endpoint picked per request (so HTTP/2 streams spread over endpoints
// as in Envoy), and another when one cannot be connected to, as long as
// nothing of the request was sent.
type roundTripper struct{ p *Proxy }

func (rt roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	f := forwardOf(req.Context())
	if f == nil {
		return nil, errors.New("sidecar: request without a route")
	}
	tr := f.up.pool.transport(f.h2)
	if f.up.picker == nil {
		req.URL.Host = f.target.String()
		return send(tr, req, !f.h2)
	}
	var body *retryBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &retryBody{rc: req.Body}
		req.Body = body
	}
	var err error
	for range rt.p.cfg.MaxConnectAttempts {
		ep, ok := f.up.picker.Pick()
		if !ok {
			err = errNoHealthyUpstream
			break
		}
		req.URL.Host = ep.String()
		var resp *http.Response
		resp, err = send(tr, req, !f.h2)
		if err == nil {
			rt.p.health.Restore(ep)
			return resp, nil
		}
		var ce *connectError
		if !errors.As(err, &ce) || (body != nil && body.started.Load()) || req.Context().Err() != nil {
			break
		}
	}
	if body != nil {
		body.release()
	}
	return nil, err
}

// send is one attempt of req over tr. An HTTP/1.1 upstream's response
// that the Transport could not read as one, a malformed head, becomes a
// protocolError: the Transport's error for it has no type to tell it by,
// but the connection it used does, having read bytes with no read or
// write failing (a cut connection fails one).
func send(tr *http.Transport, req *http.Request, h1 bool) (*http.Response, error) {
	if !h1 {
		return tr.RoundTrip(req)
	}
	var (
		used *upConn
		mark int64
	)
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		if c, ok := info.Conn.(*upConn); ok {
			used, mark = c, c.read.Load()
		}
	}}
	resp, err := tr.RoundTrip(req.WithContext(httptrace.WithClientTrace(req.Context(), trace)))
	if err != nil && used != nil && used.read.Load() > mark && !used.ioErr.Load() && req.Context().Err() == nil {
		err = &protocolError{err}
	}
	return resp, err
}

// retryBody keeps a request body open across connect attempts: the
// Transport closes the body when a dial fails, before reading any of it.
// Once read from, it is the body itself.
type retryBody struct {
	rc io.ReadCloser
	// started is set at the first Read; deferred when a Close came
	// before it.
	started, deferred atomic.Bool
}

func (b *retryBody) Read(p []byte) (int, error) {
	b.started.Store(true)
	return b.rc.Read(p)
}

func (b *retryBody) Close() error {
	if !b.started.Load() {
		b.deferred.Store(true)
		return nil
	}
	return b.rc.Close()
}

// release closes the body if a Close was held back.
func (b *retryBody) release() {
	if b.deferred.Load() {
		_ = b.rc.Close()
	}
}
