// Package gwroutes feeds the east-west gateway from the xDS client: it
// turns an xdsclient.Config (the listener's filter chains, the clusters
// and their endpoints) into a *gateway.Routes, and is the gateway's
// RouteSource in production.
//
//	federator ──ADS──► xdsclient.Client ──*Config──► gwroutes.Source ──*gateway.Routes──► gateway.Gateway
//	                          └── Check ──► gwroutes.Builder ◄── Build ──┘
//
// One Builder is both the client's Check and the Source's builder: a
// config is built once, when Check accepts it, and from the table before
// it, so an update costs the filter chains it changes (and a copy of the
// table's index), not a rebuild of ten thousand routes.
//
// It sits apart from pkg/xdsclient so that the client (shared with the
// sidecar) does not depend on the gateway, and so that the gateway never
// imports the client: cmd/eastwest-gw wires the three together.
package gwroutes

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Routes builds the gateway's table from cfg: one route per server name of
// the listener's filter chains, carrying its cluster's endpoints and
// timeouts. The gateway has exactly one listener (docs/gateway-xds.md); a
// STRICT_DNS cluster becomes a route that resolves its one hostname when
// dialing.
func Routes(cfg *xdsclient.Config) (*gateway.Routes, error) {
	if cfg == nil {
		return nil, errors.New("no config")
	}
	if n := len(cfg.Listeners); n != 1 {
		return nil, fmt.Errorf("the gateway serves exactly one listener, got %d", n)
	}
	l := cfg.Listeners[0]
	var routes []gateway.Route
	var errs []error
	for _, ch := range l.Chains {
		cl, ok := cfg.Clusters[ch.Cluster]
		if !ok { // a published Config never lacks one
			errs = append(errs, fmt.Errorf("listener %q: cluster %q is missing", l.Name, ch.Cluster))
			continue
		}
		base := gateway.Route{Cluster: ch.Cluster, ConnectTimeout: cl.ConnectTimeout, IdleTimeout: ch.IdleTimeout}
		if err := setEndpoints(&base, cl); err != nil {
			errs = append(errs, err)
			continue
		}
		for _, sni := range ch.SNIs {
			r := base
			r.SNI = sni
			routes = append(routes, r)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return gateway.NewRoutes(routes)
}

// setEndpoints gives r the cluster's IP endpoints, or its one hostname.
func setEndpoints(r *gateway.Route, cl xdsclient.Cluster) error {
	var hosts []xdsclient.Endpoint
	for _, e := range cl.Endpoints {
		if e.Host != "" {
			hosts = append(hosts, e)
			continue
		}
		r.Endpoints = append(r.Endpoints, gateway.Endpoint{Addr: e.Addr, Healthy: e.Healthy})
	}
	switch {
	case len(hosts) == 0:
		return nil
	case len(hosts) > 1 || len(r.Endpoints) > 0:
		return fmt.Errorf("cluster %q: the gateway resolves one hostname per STRICT_DNS cluster, got %d endpoints",
			cl.Name, len(cl.Endpoints))
	case hosts[0].Healthy:
		r.DNS = hosts[0].HostPort()
	}
	return nil
}

// Check is Routes's verdict on cfg, for an xdsclient.ClientConfig.Check
// without a Source; with one, give the client Builder.Check of the
// Builder the Source shares, so each config is built once.
func Check(cfg *xdsclient.Config) error {
	_, err := Routes(cfg)
	return err
}

// Source is the gateway's RouteSource fed by an xDS client. It is the
// only consumer of the client's Updated channel.
type Source struct {
	client  *xdsclient.Client
	builder *Builder
	table   *gateway.RouteTable
	log     *slog.Logger
}

var _ gateway.RouteSource = (*Source)(nil)

// NewSource returns a Source for c that builds its tables with b; Run
// keeps it current. Give c b.Check as its ClientConfig.Check, so every
// published config builds and the table Check built is the one routed.
// A nil b is a Builder of the Source's own.
func NewSource(c *xdsclient.Client, b *Builder, log *slog.Logger) *Source {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if b == nil {
		b = NewBuilder()
	}
	return &Source{client: c, builder: b, table: gateway.NewRouteTable(nil), log: log.With("component", "gwroutes")}
}

// Routes is the current table: nil until the client's first config.
func (s *Source) Routes() *gateway.Routes { return s.table.Routes() }

// Updated receives after the table changes.
func (s *Source) Updated() <-chan struct{} { return s.table.Updated() }

// Run updates the table after every config the client publishes, until
// ctx ends. A config that does not build (possible only without Check)
// is logged and the previous table kept.
func (s *Source) Run(ctx context.Context) error {
	s.update()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.client.Updated():
			s.update()
		}
	}
}

func (s *Source) update() {
	cfg := s.client.Current()
	if cfg == nil {
		return
	}
	r, err := s.builder.Build(cfg)
	if err != nil {
		s.log.Error("xDS config does not build a routing table; keeping the previous one", "error", err, "versions", cfg.Versions)
		return
	}
	s.table.Set(r)
	s.log.Info("routes updated", "routes", r.Len(), "versions", cfg.Versions)
}
