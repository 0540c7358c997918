package gateway

import (
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/hostport"
	"time"
)

// Config is everything the east-west gateway needs besides its routes.
// Validate reports every problem at once.
type Config struct {
	// ListenAddr is where peers' connections arrive (host:port); Istio's
	// convention is :15443.
	ListenAddr string
	// HealthAddr serves GET /healthz/ready for peers' active probes and
	// the kubelet (host:port, Istio's gateway readiness port :15021): 200
	// once routes are known, 503 before and while draining. Empty
	// disables it.
	HealthAddr string
	// MetricsAddr serves Prometheus metrics at /metrics and
	// /stats/prometheus (host:port, Istio's :15020), apart from HealthAddr
	// so peers that may probe health cannot read metrics. Empty disables
	// it.
	MetricsAddr string

	// MaxConnections bounds concurrent downstream connections, counting
	// those still sending their ClientHello; a connection beyond it is
	// closed at once without reading a byte. Required (> 0).
	MaxConnections int
	// ClientHelloTimeout bounds the wait for a whole ClientHello after
	// accept; a slower client is closed.
	ClientHelloTimeout time.Duration
	// DialTimeout bounds connecting to one endpoint, for routes that do
	// not set their own ConnectTimeout: those of a routes file. Routes
	// from xDS always carry their cluster's connect_timeout (Envoy's 5 s
	// default when unset).
	DialTimeout time.Duration
	// MaxConnectAttempts is how many endpoints one connection tries, in
	// round-robin order, before it is refused ("no_endpoint").
	MaxConnectAttempts int
	// EjectionTime is how long an endpoint the gateway failed to connect
	// to is skipped (passive health). While every healthy endpoint of a
	// cluster is ejected the gateway tries them anyway.
	EjectionTime time.Duration
	// IdleTimeout closes a routed connection after this long with no byte
	// in either direction, for routes that do not set their own (those of
	// a routes file; routes from xDS always carry the tcp_proxy's
	// idle_timeout, Envoy's 1 h default when unset), even when one side
	// has stopped reading and the gateway waits to write to it.
	IdleTimeout time.Duration
	// DrainDelay is how long, once shutdown begins, the gateway fails
	// readiness while it still accepts and routes new connections, so
	// that peers' health probes and load balancers stop sending before
	// the listener closes (Istio's terminationDrainDuration): a
	// connection arriving meanwhile is served rather than refused, or
	// reset in the accept queue. Then the listener closes and
	// DrainTimeout begins. Zero closes the listener at once.
	DrainDelay time.Duration
	// DrainTimeout bounds a graceful shutdown: after the listener closes,
	// connections in flight have this long to finish before they are
	// closed.
	DrainTimeout time.Duration
	// RouteDrainTimeout is how long the connections a route carried may
	// go on once the route has left the routing table (the service's
	// export was revoked) before they are closed, as Envoy drains the
	// connections of a removed filter chain. New connections are refused
	// at once; a route back within it keeps its connections. A change of
	// the route's endpoints never closes a connection. Zero closes them
	// at once.
	RouteDrainTimeout time.Duration
}

// DefaultConfig returns Istio's ports and conservative limits.
func DefaultConfig() Config {
	return Config{
		ListenAddr:         ":15443",
		HealthAddr:         ":15021",
		MetricsAddr:        ":15020",
		MaxConnections:     16384,
		ClientHelloTimeout: 5 * time.Second,
		DialTimeout:        time.Second,
		MaxConnectAttempts: 3,
		EjectionTime:       10 * time.Second,
		IdleTimeout:        time.Hour,
		DrainDelay:         5 * time.Second, // Istio's terminationDrainDuration
		DrainTimeout:       20 * time.Second,
		RouteDrainTimeout:  45 * time.Second, // Istio's drainDuration
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
	addr("listen address", c.ListenAddr, true)
	addr("health address", c.HealthAddr, false)
	addr("metrics address", c.MetricsAddr, false)
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, not %v", name, d))
		}
	}
	positive("ClientHello timeout", c.ClientHelloTimeout)
	positive("dial timeout", c.DialTimeout)
	positive("ejection time", c.EjectionTime)
	positive("idle timeout", c.IdleTimeout)
	positive("drain timeout", c.DrainTimeout)
	if c.DrainDelay < 0 {
		errs = append(errs, fmt.Errorf("drain delay must not be negative, not %v", c.DrainDelay))
	}
	if c.RouteDrainTimeout < 0 {
		errs = append(errs, fmt.Errorf("route drain timeout must not be negative, not %v", c.RouteDrainTimeout))
	}
	if c.MaxConnections <= 0 {
		errs = append(errs, fmt.Errorf("max connections must be positive, not %d", c.MaxConnections))
	}
	if c.MaxConnectAttempts <= 0 {
		errs = append(errs, fmt.Errorf("max connect attempts must be positive, not %d", c.MaxConnectAttempts))
	}
	return errors.Join(errs...)
}
