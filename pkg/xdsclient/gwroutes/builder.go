package gwroutes

import (
	"slices"
	"sync"
	"unsafe"

	"github.com/isthmus-mesh/isthmus/pkg/gateway"
	"github.com/isthmus-mesh/isthmus/pkg/xdsclient"
)

// Builder is Routes with a memory: it builds each config's table from
// the last table it built, preparing only the routes of the filter
// chains that changed (gateway.Routes.Update), and hands the same table
// again for the config it built last. One Builder serves as the client's
// Check and as the Source's builder, so a config is built once per
// update, not once to check and again to route.
//
// A chain is unchanged when its server names, cluster name and idle
// timeout are the same, and so are its cluster's connect timeout and
// endpoints; the xDS client keeps the endpoints of an assignment it
// reuses, so that comparison is mostly a pointer's. The walk over the
// chains needs them sorted by their first server name, as the federator
// sends them; a config whose chains are not, or one that does not build,
// is built from scratch by Routes, whose errors the Builder returns
// unchanged. Its tables equal Routes's for the same config.
//
// A Builder is safe for concurrent use; its zero value is ready.
type Builder struct {
	// mu guards last, the config built last and its table.
	mu   sync.Mutex
	last *built
	// updates counts the tables made from the last one (tests read it).
	updates int
}

type built struct {
	cfg    *xdsclient.Config
	routes *gateway.Routes
}

// NewBuilder returns a Builder that has built nothing yet.
func NewBuilder() *Builder { return &Builder{} }

// Check is the gateway's xdsclient.ClientConfig.Check: a config the
// gateway could not route is NACKed, and the previous table stays. The
// table it builds is kept for Build.
func (b *Builder) Check(cfg *xdsclient.Config) error {
	_, err := b.Build(cfg)
	return err
}

// Build returns cfg's table: Routes(cfg), from the last table built.
func (b *Builder) Build(cfg *xdsclient.Config) (*gateway.Routes, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.last != nil && b.last.cfg == cfg {
		return b.last.routes, nil
	}
	var r *gateway.Routes
	if b.last != nil && cfg != nil {
		if r = update(b.last, cfg); r != nil {
			b.updates++
		}
	}
	if r == nil {
		var err error
		if r, err = Routes(cfg); err != nil {
			return nil, err
		}
	}
	b.last = &built{cfg: cfg, routes: r}
	return r, nil
}

// update builds next's table from prev's, or returns nil when it cannot
// (Routes then decides, with its own errors).
func update(prev *built, next *xdsclient.Config) *gateway.Routes {
	if len(prev.cfg.Listeners) != 1 || len(next.Listeners) != 1 {
		return nil
	}
	old, cur := prev.cfg.Listeners[0].Chains, next.Listeners[0].Chains
	if !sortedChains(old) || !sortedChains(cur) {
		return nil
	}
	var remove []string
	var set []gateway.Route
	gone := func(ch xdsclient.Chain) { remove = append(remove, ch.SNIs...) }
	came := func(ch xdsclient.Chain) bool {
		routes, ok := chainRoutes(ch, next)
		set = append(set, routes...)
		return ok
	}
	i, j := 0, 0
	for i < len(old) || j < len(cur) {
		switch {
		case j == len(cur) || i < len(old) && old[i].SNIs[0] < cur[j].SNIs[0]:
			gone(old[i])
			i++
		case i == len(old) || cur[j].SNIs[0] < old[i].SNIs[0]:
			if !came(cur[j]) {
				return nil
			}
			j++
		default:
			if !sameChain(old[i], prev.cfg, cur[j], next) {
				gone(old[i])
				if !came(cur[j]) {
					return nil
				}
			}
			i++
			j++
		}
	}
	if len(remove) == 0 && len(set) == 0 {
		return prev.routes
	}
	r, err := prev.routes.Update(remove, set)
	if err != nil {
		return nil
	}
	return r
}

// sortedChains reports whether chains are strictly sorted by their first
// server name (so that no two share it), each having one.
func sortedChains(chains []xdsclient.Chain) bool {
	for i, ch := range chains {
		if len(ch.SNIs) == 0 || i > 0 && chains[i-1].SNIs[0] >= ch.SNIs[0] {
			return false
		}
	}
	return true
}

// chainRoutes are the routes of one chain, as Routes makes them; false
// when its cluster is missing or cannot be routed.
func chainRoutes(ch xdsclient.Chain, cfg *xdsclient.Config) ([]gateway.Route, bool) {
	cl, ok := cfg.Clusters[ch.Cluster]
	if !ok {
		return nil, false
	}
	base := gateway.Route{Cluster: ch.Cluster, ConnectTimeout: cl.ConnectTimeout, IdleTimeout: ch.IdleTimeout}
	if setEndpoints(&base, cl) != nil {
		return nil, false
	}
	routes := make([]gateway.Route, len(ch.SNIs))
	for k, sni := range ch.SNIs {
		routes[k] = base
		routes[k].SNI = sni
	}
	return routes, true
}

// sameChain reports whether chain a of config ca and chain b of cb make
// the same routes: everything chainRoutes reads is equal.
func sameChain(a xdsclient.Chain, ca *xdsclient.Config, b xdsclient.Chain, cb *xdsclient.Config) bool {
	if a.Cluster != b.Cluster || a.IdleTimeout != b.IdleTimeout || !slices.Equal(a.SNIs, b.SNIs) {
		return false
	}
	x, ok := ca.Clusters[a.Cluster]
	if !ok {
		return false
	}
	y, ok := cb.Clusters[b.Cluster]
	if !ok || x.Name != y.Name || x.ConnectTimeout != y.ConnectTimeout || len(x.Endpoints) != len(y.Endpoints) {
		return false
	}
	if len(x.Endpoints) == 0 || unsafe.SliceData(x.Endpoints) == unsafe.SliceData(y.Endpoints) {
		return true
	}
	for k, e := range x.Endpoints {
		f := y.Endpoints[k]
		if e.Addr != f.Addr || e.Host != f.Host || e.Port != f.Port || e.Healthy != f.Healthy {
			return false
		}
	}
	return true
}
