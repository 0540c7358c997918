package gateway

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Route is one routable server name: a filter chain of the gateway's
// listener (server_names: [SNI]) and the cluster its tcp_proxy names.
// docs/gateway-xds.md is the contract it comes from.
type Route struct {
	// SNI is the TLS server name that selects this route, matched exactly
	// and case-insensitively (it is stored lowercased). Istio's grammar:
	// "outbound_.<port>_.<subset>_.<svc>.<ns>.svc.cluster.local", or the
	// federation's reserved name (federation.ReservedSNI). Required,
	// unique within a Routes value.
	SNI string
	// Cluster is the name of the upstream cluster, e.g.
	// "outbound|80||echo.demo.svc.cluster.local" or "isthmus-federation".
	// It labels metrics and logs. Required. Several routes may name the
	// same cluster.
	Cluster string
	// Endpoints are the cluster's upstream addresses (EDS, or a STATIC
	// cluster's inline load_assignment). Only Healthy ones are ever
	// picked. Empty when DNS is set; a route with neither, or with no
	// healthy endpoint, is still routable but every connection to it is
	// refused ("no_endpoint"), which is how Envoy behaves too.
	Endpoints []Endpoint
	// DNS is "host:port" of a STRICT_DNS cluster (the federation cluster
	// when the federator upstream is a hostname). The name is resolved at
	// dial time, every address the resolver returns is tried in order.
	// Empty for EDS and STATIC clusters. Mutually exclusive with
	// Endpoints.
	DNS string
	// ConnectTimeout bounds dialing one endpoint (the cluster's
	// connect_timeout); zero means Config.DialTimeout.
	ConnectTimeout time.Duration
	// IdleTimeout closes a connection after this long without a byte in
	// either direction (tcp_proxy's idle_timeout); zero means
	// Config.IdleTimeout.
	IdleTimeout time.Duration
}

// Endpoint is one upstream address of a cluster.
type Endpoint struct {
	// Addr is the pod IP and target port (an lb_endpoint's
	// socket_address). Required, must be valid with a non-zero port.
	Addr netip.AddrPort
	// Healthy is false for endpoints EDS marks UNHEALTHY (not-ready
	// pods); the gateway never picks them. Independently of this flag, the
	// gateway skips for a while an endpoint it failed to connect to
	// (passive health, Config.EjectionTime).
	Healthy bool
}

// Routes is an immutable routing table: SNI → cluster. Build it with
// NewRoutes and publish it through a RouteSource; a new table replaces the
// old one for connections accepted after the swap, connections already
// established keep their upstream as long as their route's SNI stays in
// the table (those of a route removed are closed after
// Config.RouteDrainTimeout). A nil *Routes routes nothing.
type Routes struct {
	bySNI map[string]*cluster
}

// cluster is a Route prepared for the data path. Everything but next is
// read-only after NewRoutes.
type cluster struct {
	route   Route
	healthy []netip.AddrPort
	attrs   metric.MeasurementOption // metrics labels: cluster
	// next is the round-robin cursor: the only mutable state in a Routes
	// value, shared by every connection routed through it.
	next atomic.Uint32
}

// NewRoutes validates routes and builds a table from them. It reports
// every problem at once (errors.Join), each naming the route's SNI, so an
// xDS client can put the error in a NACK. The slice and its endpoint slices
// are copied: the caller may reuse them.
func NewRoutes(routes []Route) (*Routes, error) {
	r := &Routes{bySNI: make(map[string]*cluster, len(routes))}
	var errs []error
	for i, rt := range routes {
		c, bad := prepare(i, rt)
		if _, dup := r.bySNI[c.route.SNI]; dup {
			bad = append(bad, routeError(i, rt, "duplicate sni"))
		}
		errs = append(errs, bad...)
		r.bySNI[c.route.SNI] = c
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return r, nil
}

// prepare validates rt, the i-th route given, on its own (a duplicate
// SNI is the caller's to find), and makes its cluster, keyed by the
// lowercased SNI, even when rt is invalid.
func prepare(i int, rt Route) (*cluster, []error) {
	var errs []error
	sni := strings.ToLower(rt.SNI)
	bad := func(format string, args ...any) {
		errs = append(errs, routeError(i, rt, format, args...))
	}
	if err := validServerName(sni); err != nil {
		bad("%v", err)
	}
	if rt.Cluster == "" {
		bad("cluster name is empty")
	}
	if rt.ConnectTimeout < 0 || rt.IdleTimeout < 0 {
		bad("negative timeout")
	}
	if rt.DNS != "" {
		if len(rt.Endpoints) > 0 {
			bad("both dns %q and %d endpoints are set", rt.DNS, len(rt.Endpoints))
		}
		if host, port, err := net.SplitHostPort(rt.DNS); err != nil || host == "" || port == "" || port == "0" {
			bad("dns %q is not host:port", rt.DNS)
		}
	}
	c := &cluster{route: rt, attrs: metric.WithAttributeSet(attribute.NewSet(attribute.String("cluster", rt.Cluster)))}
	c.route.SNI = sni
	c.route.Endpoints = slices.Clone(rt.Endpoints)
	for j, ep := range rt.Endpoints {
		if !ep.Addr.IsValid() || ep.Addr.Port() == 0 {
			bad("endpoint %d: invalid address %v", j, ep.Addr)
			continue
		}
		if ep.Healthy {
			c.healthy = append(c.healthy, ep.Addr)
		}
	}
	return c, errs
}

func routeError(i int, rt Route, format string, args ...any) error {
	return fmt.Errorf("route %d (sni %q): %s", i, rt.SNI, fmt.Sprintf(format, args...))
}

// Len is the number of routes; zero for a nil table.
func (r *Routes) Len() int {
	if r == nil {
		return 0
	}
	return len(r.bySNI)
}

// Route returns the route for a server name (matched case-insensitively).
// The returned Endpoints slice must not be modified.
func (r *Routes) Route(sni string) (Route, bool) {
	c := r.lookup(sni)
	if c == nil {
		return Route{}, false
	}
	return c.route, true
}

// All returns every route sorted by SNI (for logs and debug pages).
func (r *Routes) All() []Route {
	if r == nil {
		return nil
	}
	out := make([]Route, 0, len(r.bySNI))
	for _, c := range r.bySNI {
		out = append(out, c.route)
	}
	slices.SortFunc(out, func(a, b Route) int { return strings.Compare(a.SNI, b.SNI) })
	return out
}

// lookup is the data path's lookup: no allocation for a lowercase name.
func (r *Routes) lookup(sni string) *cluster {
	if r == nil {
		return nil
	}
	if c, ok := r.bySNI[sni]; ok {
		return c
	}
	if hasUpper(sni) {
		return r.bySNI[strings.ToLower(sni)]
	}
	return nil
}

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

// validServerName accepts what a TLS client may put in a host_name: DNS
// labels of letters, digits, '-' and '_' (Istio's SNIs have underscores),
// at most 255 bytes, no empty label, no trailing dot.
func validServerName[T string | []byte](s T) error {
	if len(s) == 0 {
		return errors.New("server name is empty")
	}
	if len(s) > 255 {
		return fmt.Errorf("server name is %d bytes, longer than 255", len(s))
	}
	label := 0
	for i := 0; i < len(s); i++ {
		switch b := s[i]; {
		case b == '.':
			if label == 0 {
				return errors.New("server name has an empty label")
			}
			label = 0
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9', b == '-', b == '_':
			label++
			if label > 63 {
				return errors.New("server name has a label longer than 63 bytes")
			}
		default:
			return fmt.Errorf("server name has byte %#x at %d", b, i)
		}
	}
	if label == 0 {
		return errors.New("server name ends with a dot")
	}
	return nil
}

// RouteSource gives the gateway its routing table. The production source
// is the xDS client (pkg/xdsclient), which builds a *Routes from the
// listener's filter chains, the clusters and their endpoints; tests,
// benchmarks and `eastwest-gw --routes-file` use a RouteTable.
//
// Routes is called once per accepted connection and must be cheap and safe
// for concurrent use (an atomic load); it returns nil until the first
// table is known, and the gateway refuses every connection and reports
// not ready until then. Updated has capacity one and receives (with a
// non-blocking send) after each change; the gateway uses it to close the
// connections of removed routes once Config.RouteDrainTimeout has passed,
// never on the data path.
type RouteSource interface {
	Routes() *Routes
	Updated() <-chan struct{}
}

// RouteTable is a RouteSource holding a table set by its owner: a static
// file, a test, or an xDS client that wants a ready-made holder.
// The zero value holds no table; use NewRouteTable.
type RouteTable struct {
	cur     atomic.Pointer[Routes]
	updated chan struct{}
}

var _ RouteSource = (*RouteTable)(nil)

// NewRouteTable returns a RouteTable holding r (nil: nothing yet).
func NewRouteTable(r *Routes) *RouteTable {
	t := &RouteTable{updated: make(chan struct{}, 1)}
	if r != nil {
		t.Set(r)
	}
	return t
}

// Routes returns the current table.
func (t *RouteTable) Routes() *Routes { return t.cur.Load() }

// Updated receives after Set.
func (t *RouteTable) Updated() <-chan struct{} { return t.updated }

// Set replaces the table; new connections use it at once.
func (t *RouteTable) Set(r *Routes) {
	t.cur.Store(r)
	select {
	case t.updated <- struct{}{}:
	default:
	}
}

func (c *cluster) attrsOpt() metric.AddOption { return c.attrs }
