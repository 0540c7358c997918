package dns

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"go.opentelemetry.io/otel/metric"
)

// Config is the DNS proxy's configuration. Validate reports every problem
// at once.
type Config struct {
	// ListenAddr is where the proxy serves, UDP and TCP on the same port
	// (host:port). Istio's convention, and the default, is
	// 127.0.0.1:15053; iptables redirects the workload's DNS there. Port
	// 0 picks a free port, the same for both transports.
	ListenAddr string
	// IPv6Loopback, when ListenAddr's host is 127.0.0.1, serves on
	// [::1] at the same port too: ip6tables capture (`sidecar iptables
	// --ipv6`) sends the app's IPv6 queries there. A pod without IPv6
	// loopback is told in the log, and served on ListenAddr alone.
	IPv6Loopback bool
	// ResolvConf is a resolv.conf(5) file read once by New: its
	// nameservers (port 53, the first three, as glibc) are the upstreams
	// unless Upstreams is set, and its search list is the one whose
	// expansions of table names are answered NXDOMAIN unless
	// SearchDomains is set. Empty reads nothing; Upstreams is then
	// required.
	ResolvConf string
	// Upstreams, when set, replaces resolv.conf's nameservers: IP
	// address and port pairs ("10.96.0.10:53", "[fd00::a]:53"), tried in
	// order.
	Upstreams []string
	// SearchDomains, when non-nil, replaces resolv.conf's search list
	// (an empty, non-nil slice means none).
	SearchDomains []string

	// TTL is the time to live of answers from the table, in whole
	// seconds. The VIPs are stable, so the TTL only bounds how long a
	// client may use a removed name.
	TTL time.Duration
	// NegativeTTL is the SOA minimum of negative answers under
	// ClustersetZone (whole seconds): how long a client may cache "no
	// such service" before a newly imported service resolves.
	NegativeTTL time.Duration
	// UpstreamTimeout bounds one attempt at one upstream: send the query
	// and receive an answer (connect too, over TCP). Upstreams are tried
	// in order, so a client waits at most len(upstreams)×UpstreamTimeout
	// for SERVFAIL; keep that under the client's own timeout (glibc: 5 s).
	UpstreamTimeout time.Duration
	// MaxForwards bounds queries being forwarded at once, UDP and TCP
	// together. A query beyond it is answered SERVFAIL at once.
	MaxForwards int
	// MaxTCPConnections bounds open client TCP connections; one beyond
	// it is closed at once.
	MaxTCPConnections int
	// TCPIdleTimeout closes a client TCP connection that has not started
	// a new query for this long (RFC 7766 asks for seconds, not minutes).
	TCPIdleTimeout time.Duration
	// IOTimeout bounds reading the rest of a TCP query once its length
	// has arrived, and writing any answer over TCP.
	IOTimeout time.Duration
}

// DefaultConfig returns Istio's port and conservative limits.
func DefaultConfig() Config {
	return Config{
		ListenAddr:        "127.0.0.1:15053",
		IPv6Loopback:      true,
		ResolvConf:        "/etc/resolv.conf",
		TTL:               30 * time.Second,
		NegativeTTL:       5 * time.Second,
		UpstreamTimeout:   2 * time.Second,
		MaxForwards:       1024,
		MaxTCPConnections: 256,
		TCPIdleTimeout:    10 * time.Second,
		IOTimeout:         2 * time.Second,
	}
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.ListenAddr); err != nil {
		errs = append(errs, fmt.Errorf("listen address %q: %w", c.ListenAddr, err))
	}
	if c.ResolvConf == "" && len(c.Upstreams) == 0 {
		errs = append(errs, errors.New("neither a resolv.conf path nor upstreams: nowhere to forward to"))
	}
	for _, u := range c.Upstreams {
		if _, err := netip.ParseAddrPort(u); err != nil {
			errs = append(errs, fmt.Errorf("upstream %q: want an IP address and port: %w", u, err))
		}
	}
	for _, d := range c.SearchDomains {
		if _, err := canonicalName(d, 1); err != nil {
			errs = append(errs, fmt.Errorf("search domain: %w", err))
		}
	}
	seconds := func(name string, d time.Duration) {
		if d < time.Second || d%time.Second != 0 || d > 1<<31*time.Second {
			errs = append(errs, fmt.Errorf("%s must be a whole number of seconds, at least 1, not %v", name, d))
		}
	}
	seconds("TTL", c.TTL)
	seconds("negative TTL", c.NegativeTTL)
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, not %v", name, d))
		}
	}
	positive("upstream timeout", c.UpstreamTimeout)
	positive("TCP idle timeout", c.TCPIdleTimeout)
	positive("I/O timeout", c.IOTimeout)
	if c.MaxForwards <= 0 {
		errs = append(errs, fmt.Errorf("max forwards must be positive, not %d", c.MaxForwards))
	}
	if c.MaxTCPConnections <= 0 {
		errs = append(errs, fmt.Errorf("max TCP connections must be positive, not %d", c.MaxTCPConnections))
	}
	return errors.Join(errs...)
}

// Options are the optional knobs of a Proxy. The zero value is usable.
type Options struct {
	// Logger receives lifecycle lines at Info and one Debug line per
	// failed upstream attempt and per table swap. Nil discards.
	Logger *slog.Logger
	// Meter records the isthmus_dns_* instruments (see the package
	// documentation). Nil records nothing.
	Meter metric.Meter
}
