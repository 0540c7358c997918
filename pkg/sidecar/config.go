package sidecar

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/hostport"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Config is everything the sidecar's data plane needs besides its xDS
// configuration and its SVID. Validate reports every problem at once.
type Config struct {
	// OutboundAddr receives the app's outbound connections, redirected by
	// iptables or sent explicitly (host:port; Istio's :15001).
	OutboundAddr string
	// InboundAddr receives connections to the pod, redirected by iptables
	// (host:port; Istio's :15006). It must bind every address the pod is
	// reached on: REDIRECT in PREROUTING keeps the interface's address.
	InboundAddr string
	// AdminAddr serves /config_dump, /ready and /stats (host:port;
	// Istio's 127.0.0.1:15000). Empty disables it.
	AdminAddr string
	// HealthAddr serves /healthz/ready and /stats/prometheus (host:port;
	// Istio's :15020). Empty disables it.
	HealthAddr string
	// AppAddr is where the app listens: inbound traffic goes to
	// AppAddr:<original destination port> (docs/sidecar-xds.md,
	// inbound-passthrough).
	AppAddr netip.Addr

	// MaxConnections bounds the connections open at once on each of the
	// outbound and inbound listeners; one beyond it is reset before a
	// byte is read.
	MaxConnections int
	// HandshakeTimeout bounds a TLS handshake: an inbound caller's, and
	// the sidecar's own with an upstream (after ConnectTimeout). Where
	// the inbound listener has plaintext (raw_buffer) chains, it also
	// bounds the wait for an inbound caller's first byte, which tells
	// TLS from plaintext: a caller that sends nothing first is refused
	// when it passes.
	HandshakeTimeout time.Duration
	// ReadHeaderTimeout bounds reading an HTTP/1.1 request's headers.
	ReadHeaderTimeout time.Duration
	// HTTPIdleTimeout closes a downstream HTTP connection with no request
	// in flight for this long (Envoy's HCM idle_timeout, one hour).
	HTTPIdleTimeout time.Duration
	// StreamIdleTimeout ends an HTTP request or stream with no byte of
	// body either way for this long (Envoy's stream_idle_timeout, five
	// minutes): with no route timeout (timeout: 0s), it is what bounds a
	// request whose peer went silent.
	StreamIdleTimeout time.Duration
	// UpstreamIdleTimeout closes a pooled upstream connection unused for
	// this long.
	UpstreamIdleTimeout time.Duration
	// MaxIdlePerEndpoint bounds the idle HTTP/1.1 connections kept per
	// upstream endpoint.
	MaxIdlePerEndpoint int
	// MaxConnectAttempts is how many endpoints one connection or request
	// tries before it fails: an endpoint that cannot be connected to (or
	// whose TLS handshake fails) is ejected and another is picked.
	MaxConnectAttempts int
	// EjectionTime is how long an endpoint that failed to connect is
	// skipped (passive health).
	EjectionTime time.Duration
	// NetHTTP1 serves HTTP/1.1 with net/http's server and transport, as
	// HTTP/2 is, instead of the sidecar's own HTTP/1.1 path: the zero
	// value is the sidecar's path; true is there to compare the two.
	NetHTTP1 bool
	// NetHTTP2 serves HTTP/2 with net/http's server and transport
	// instead of the sidecar's own HTTP/2 path (h2conn.go): true is
	// there to compare the two.
	NetHTTP2 bool
	// DrainTimeout bounds a graceful shutdown: after the listeners close,
	// requests and connections in flight have this long to finish before
	// they are closed. It bounds, the same way, an inbound HTTP
	// connection whose chain a new configuration removed (revoke.go).
	DrainTimeout time.Duration
}

// DefaultConfig returns Istio's ports and Envoy's timeouts where the
// contract leaves them to the proxy.
func DefaultConfig() Config {
	return Config{
		OutboundAddr:        ":15001",
		InboundAddr:         ":15006",
		AdminAddr:           "127.0.0.1:15000",
		HealthAddr:          ":15020",
		AppAddr:             netip.AddrFrom4([4]byte{127, 0, 0, 1}),
		MaxConnections:      16384,
		HandshakeTimeout:    10 * time.Second,
		ReadHeaderTimeout:   30 * time.Second,
		HTTPIdleTimeout:     time.Hour,
		StreamIdleTimeout:   5 * time.Minute,
		UpstreamIdleTimeout: 5 * time.Minute,
		MaxIdlePerEndpoint:  64,
		MaxConnectAttempts:  3,
		EjectionTime:        5 * time.Second,
		DrainTimeout:        5 * time.Second,
	}
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	addr := func(name, v string, required bool) {
		if v == "" {
			if required {
				errs = append(errs, fmt.Errorf("%s is required", name))
			}
			return
		}
		if err := hostport.CheckListen(v); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", name, v, err))
		}
	}
	addr("outbound address", c.OutboundAddr, true)
	addr("inbound address", c.InboundAddr, true)
	addr("admin address", c.AdminAddr, false)
	addr("health address", c.HealthAddr, false)
	switch a := c.AppAddr; {
	case !a.IsValid():
		errs = append(errs, errors.New("app address is required"))
	case a.Is6() && !a.Is4In6() && !a.IsLoopback():
		// The sidecar reaches an app on a pod address from 127.0.0.6,
		// which the capture rules let through; IPv6 has no such source
		// on every pod, and its connection would be captured again.
		errs = append(errs, fmt.Errorf("app address %s: an IPv6 app address must be ::1 (an app listening on the pod's IPv6 address alone cannot be reached without being captured again); use ::1, 127.0.0.1 or the pod's IPv4 address", a))
	}
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, not %v", name, d))
		}
	}
	positive("handshake timeout", c.HandshakeTimeout)
	positive("read header timeout", c.ReadHeaderTimeout)
	positive("HTTP idle timeout", c.HTTPIdleTimeout)
	positive("stream idle timeout", c.StreamIdleTimeout)
	positive("upstream idle timeout", c.UpstreamIdleTimeout)
	positive("ejection time", c.EjectionTime)
	positive("drain timeout", c.DrainTimeout)
	for name, n := range map[string]int{"max connections": c.MaxConnections, "max idle per endpoint": c.MaxIdlePerEndpoint,
		"max connect attempts": c.MaxConnectAttempts} {
		if n <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, not %d", name, n))
		}
	}
	return errors.Join(errs...)
}

// ConfigSource supplies the sidecar's xDS configuration: *xdsclient.Client
// is one. Current is nil until the first configuration; Updated receives
// after Current changes (capacity one; the proxy is its only reader).
type ConfigSource interface {
	Current() *xdsclient.Config
	Updated() <-chan struct{}
}

var _ ConfigSource = (*xdsclient.Client)(nil)

// Options are the optional knobs of a Proxy. The zero value is usable.
type Options struct {
	// OriginalDst returns where a connection accepted on the outbound or
	// inbound listener was going before iptables redirected it. Nil means
	// capture.OriginalDst. An error wrapping capture.ErrNoOriginalDst
	// means the connection was not redirected.
	OriginalDst func(*net.TCPConn) (netip.AddrPort, error)
	// OnConfig, when set, is called with every configuration the proxy
	// adopts, on the proxy's configuration goroutine and before Updated
	// is read again: the DNS proxy's name table hangs off it. It must not
	// block for long.
	OnConfig func(*xdsclient.Config)
	// Logger receives lifecycle lines at Info and refusals at Debug. Nil
	// discards.
	Logger *slog.Logger
}
