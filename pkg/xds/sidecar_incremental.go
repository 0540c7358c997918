package xds

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// SidecarTranslator is TranslateSidecar with a memory. It keeps, for
// every namespace/name of the catalogs it last translated, what
// TranslateSidecar makes of it — the clusterset service, its virtual IP,
// and per port the cluster, the ClusterLoadAssignment, the outbound TCP
// filter chain or the two virtual hosts (port route and explicit route),
// each with its deterministic encoding, and what was skipped — and
// translates again only the namespace/names whose exports changed in the
// local catalog or in any peer's imports, plus those whose virtual IP
// moved because a service was added or removed before them in host order.
// The in-cluster services are kept apart, by namespace/name too: each
// is translated again only when its entry changed, and its parts join
// the clusters, the chains of one address and the explicit route.
// The shared resources (the outbound listener, the HTTP ports' chains
// and route configurations, the explicit route) are assembled from the
// kept parts and made again only when their parts changed; the version
// of each type whose resources changed is hashed over the kept
// encodings (the endpoints' from the block of the first changed
// ClusterLoadAssignment), the others kept, never encoding a resource
// that did not change again.
//
// Its results equal TranslateSidecar's for the same catalogs and
// options, versions and skipped list included. A SidecarTranslator is not
// safe for concurrent use; its results are, like every Resources, and
// must not be modified.
type SidecarTranslator struct {
	b *sidecarBuilder
	// Resources that depend on no service, with their encodings.
	inbound        *listenerv3.Listener
	inboundEnc     []byte
	passthrough    [2]*clusterv3.Cluster
	passthroughEnc [2][]byte
	explicitChain  *listenerv3.FilterChain
	// outbound is the outbound listener without filter chains, split
	// around them as the gateway's listener is (see GatewayTranslator).
	outbound outboundShell
	// spliceRoutes says that a route configuration's encoding is its
	// name's field followed by its virtual hosts' fields (checked once).
	spliceRoutes bool

	// gen counts translations; a key's state replaced by translation gen
	// has dropped == gen, so the sorted lists below leave it out.
	gen uint64
	// What the last successful translation read and made. None of it is
	// modified once made: a translation makes new lists and states and
	// keeps them only when it succeeds.
	sources map[string]sourceState
	keys    map[catalog.ServiceKey]*sidecarKey
	// hosts are the clusterset services, by host (compareHosts).
	hosts []*sidecarKey
	// byName are every service port, by cluster name; tcp the TCP ones
	// by VIP and port; explicit the HTTP ones by virtual host name.
	byName, tcp, explicit []*sidecarPort
	// http are the HTTP port numbers in use, by number.
	http []*httpPortState
	// explicitRoute is the "explicit" route configuration.
	explicitRoute routeState
	// skipping are the keys with something skipped.
	skipping map[catalog.ServiceKey]*sidecarKey
	// inCluster is the in-cluster catalog as last translated, icKeys
	// what each of its services made, and icSkipping those with
	// something skipped. An in-cluster service's ports join byName, tcp
	// (each has a chain of its own) and explicit; never http.
	inCluster  sourceState
	icKeys     map[catalog.ServiceKey]*sidecarKey
	icSkipping map[catalog.ServiceKey]*sidecarKey
	// noInCluster stands for a missing in-cluster catalog.
	noInCluster *catalog.Snapshot
	last        Resources
	// skipped is what the services skipped; lastSkipped the last result's
	// list: skipped and what the profiles skipped.
	skipped     []Skipped
	lastSkipped []Skipped
	// profiles are the pods' inbound profiles as last made.
	profiles profileState
	// checkpoints are the endpoints' hash before every claBlock-th
	// ClusterLoadAssignment of last (see GatewayTranslator).
	checkpoints []hash.Hash
}

// sourceState is one catalog as last translated: the snapshot and its
// services in key order.
type sourceState struct {
	snap     *catalog.Snapshot
	services []*catalog.Service
}

// sidecarKey is what one namespace/name translated to.
type sidecarKey struct {
	key  catalog.ServiceKey
	host string
	// start is where the VIP probe starts: SHA-256(host)'s first two
	// bytes.
	start uint16
	// cs is the clusterset service; nil when the exporters make none
	// (none names an identity, or there is no TCP port).
	cs      *csService
	ports   []sidecarPort
	skipped []Skipped
	// cidr is the VIP as a prefix range of an HTTP port's chain.
	cidr *corev3.CidrRange
	// inCluster marks an in-cluster service's state (icKeys).
	inCluster bool
	dropped   uint64
}

// sidecarPort is one port of a clusterset service and what it adds to
// the configuration, each with its encoding.
type sidecarPort struct {
	owner      *sidecarKey
	port       csPort
	name       string // the cluster's
	vhName     string // <host>:<port>
	cluster    *clusterv3.Cluster
	clusterEnc []byte
	cla        *endpointv3.ClusterLoadAssignment
	claEnc     []byte
	// A TCP port's outbound chain, as a field of the listener.
	chain      *listenerv3.FilterChain
	chainField []byte
	// An HTTP port's virtual hosts in its port's route configuration
	// and in the explicit one, as fields of a route configuration.
	vh, explicitVH           *routev3.VirtualHost
	vhField, explicitVHField []byte
}

// httpPortState is one HTTP port number: its outbound chain (every VIP
// with the port) and its route configuration.
type httpPortState struct {
	number int32
	// byVIP are the ports of this number, by VIP: the chain's prefix
	// ranges.
	byVIP      []*sidecarPort
	chain      *listenerv3.FilterChain
	chainField []byte
	route      routeState
}

// routeState is a route configuration: its virtual hosts' ports, by
// virtual host name, and the message with what its encoding is made of.
type routeState struct {
	ports []*sidecarPort
	rc    *routev3.RouteConfiguration
	// enc is the configuration's encoding: with spliceRoutes, made of
	// the name's and the virtual hosts' fields.
	enc []byte
}

// Field numbers of the lists the translator splices.
var (
	virtualHostsField = (&routev3.RouteConfiguration{}).ProtoReflect().Descriptor().Fields().ByName("virtual_hosts").Number()
)

// NewSidecarTranslator returns a translator for opts, which has
// translated nothing yet.
func NewSidecarTranslator(opts SidecarOptions) (*SidecarTranslator, error) {
	b, err := newSidecarBuilder(opts)
	if err != nil {
		return nil, err
	}
	t := &SidecarTranslator{b: b, keys: map[catalog.ServiceKey]*sidecarKey{}, icKeys: map[catalog.ServiceKey]*sidecarKey{},
		noInCluster: catalog.NewBuilder(catalog.InClusterSource).Build()}
	t.inCluster.snap = t.noInCluster
	if t.inbound, err = b.inbound(); err != nil {
		return nil, err
	}
	if t.inboundEnc, err = encode(listenerTag, InboundListenerName, t.inbound); err != nil {
		return nil, err
	}
	t.passthrough[0], t.passthrough[1] = b.passthroughClusters()
	for i, c := range t.passthrough {
		if t.passthroughEnc[i], err = encode(clusterTag, c.GetName(), c); err != nil {
			return nil, err
		}
	}
	hcm, err := b.rdsManager(ExplicitRouteName, ExplicitRouteName)
	if err != nil {
		return nil, fmt.Errorf("listener %q: explicit chain: %w", OutboundListenerName, err)
	}
	t.explicitChain = &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(OutboundPort)},
		Filters:          []*listenerv3.Filter{hcm},
	}
	passthrough, err := b.tcpProxyFilter(PassthroughClusterName)
	if err != nil {
		return nil, fmt.Errorf("listener %q: default chain: %w", OutboundListenerName, err)
	}
	shell := &listenerv3.Listener{
		Name:    OutboundListenerName,
		Address: socketAddress(anyAddress, OutboundPort),
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       wellknown.OriginalDestination,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: b.originalDst},
		}},
		DefaultFilterChain: &listenerv3.FilterChain{Filters: []*listenerv3.Filter{passthrough}},
	}
	if t.outbound, err = newOutboundShell(shell, t.explicitChain); err != nil {
		return nil, err
	}

	// A route configuration is its name and its virtual hosts: check
	// once that the encodings say so.
	vh := b.virtualHost("h:80", []string{"h:80"}, "c")
	whole, err := deterministic.Marshal(&routev3.RouteConfiguration{Name: "80", VirtualHosts: []*routev3.VirtualHost{vh}})
	if err != nil {
		return nil, err
	}
	name, err := deterministic.Marshal(&routev3.RouteConfiguration{Name: "80"})
	if err != nil {
		return nil, err
	}
	vhEnc, err := deterministic.Marshal(vh)
	if err != nil {
		return nil, err
	}
	t.spliceRoutes = bytes.Equal(whole, slices.Concat(name, field(virtualHostsField, vhEnc)))
	if t.explicitRoute, err = t.route(ExplicitRouteName, nil); err != nil {
		return nil, err
	}
	return t, nil
}

// field encodes enc as a length-delimited field n of a message.
func field(n protowire.Number, enc []byte) []byte {
	out := protowire.AppendTag(make([]byte, 0, len(enc)+8), n, protowire.BytesType)
	return protowire.AppendBytes(out, enc)
}

// outboundShell is the outbound listener without filter chains: the
// encodings of its fields before and after filter_chains, and whether
// they enclose the chains' fields into the listener's encoding.
type outboundShell struct {
	shell      *listenerv3.Listener
	head, tail []byte
	splice     bool
	// explicitField is the explicit chain, always the last one, as a
	// field of the listener.
	explicitField []byte
}

func newOutboundShell(shell *listenerv3.Listener, explicit *listenerv3.FilterChain) (outboundShell, error) {
	o := outboundShell{shell: shell}
	fail := func(err error) (outboundShell, error) {
		return outboundShell{}, fmt.Errorf("%s %q: %w", listenerTag, OutboundListenerName, err)
	}
	// Listener.Validate() checks each chain on its own: the shell here
	// and each chain when it is made check every listener.
	if err := shell.Validate(); err != nil {
		return outboundShell{}, fmt.Errorf("%s %q is invalid: %w", listenerTag, OutboundListenerName, err)
	}
	if err := explicit.Validate(); err != nil {
		return fail(fmt.Errorf("explicit chain is invalid: %w", err))
	}
	enc, err := deterministic.Marshal(explicit)
	if err != nil {
		return fail(err)
	}
	o.explicitField = field(filterChainsField, enc)
	if o.head, o.tail, o.splice, err = splitListener(shell, explicit, o.explicitField); err != nil {
		return fail(err)
	}
	return o, nil
}

func (o outboundShell) listener(chains []*listenerv3.FilterChain) *listenerv3.Listener {
	return withChains(o.shell, chains)
}

// Translate is TranslateSidecar(in, opts) for the translator's opts.
// When it fails, the translator keeps what it had, and the error is the
// one TranslateSidecar gives (when several resources are bad, it may
// name another of them). The Skipped list is shared and must not be
// modified.
func (t *SidecarTranslator) Translate(in SidecarInput) (Resources, []Skipped, error) {
	now, err := sourcesOf(in.Local, in.Peers)
	if err != nil {
		return Resources{}, nil, err
	}
	icSnap := in.InCluster
	if icSnap == nil {
		icSnap = t.noInCluster
	}
	if icSnap.Source() != catalog.InClusterSource {
		return Resources{}, nil, fmt.Errorf("in-cluster catalog has source %q, not %q", icSnap.Source(), catalog.InClusterSource)
	}
	t.gen++

	// The in-cluster services that changed.
	icDirty := map[catalog.ServiceKey]bool{}
	icState := t.inCluster
	if icSnap != t.inCluster.snap {
		icState = sourceState{snap: icSnap, services: diffServices(t.inCluster.services, icSnap, icDirty)}
	}

	// The namespace/names whose exports changed in some catalog.
	dirty := map[catalog.ServiceKey]bool{}
	sources := make(map[string]sourceState, len(now))
	for name, snap := range now {
		prev := t.sources[name]
		if prev.snap == snap {
			sources[name] = prev
			continue
		}
		sources[name] = sourceState{snap: snap, services: diffServices(prev.services, snap, dirty)}
	}
	for name, prev := range t.sources {
		if _, ok := now[name]; !ok {
			for _, svc := range prev.services {
				dirty[svc.Key()] = true
			}
		}
	}
	if t.last.Version != "" && len(dirty) == 0 && len(icDirty) == 0 {
		// No service changed; the pods' declared ports or policies may
		// have, which only the profiles follow.
		if (in.Declared == nil || in.Declared == t.profiles.declared) && in.Policies == t.profiles.maker.policies {
			t.sources, t.inCluster = sources, icState
			return t.last, t.lastSkipped, nil
		}
		res, withProfiled, err := t.profiles.withProfiles(t.last, t.skipped, sources[catalog.LocalSource].services, icState.services, in.Declared, in.Policies, t.b.opts.TrustDomain)
		if err != nil {
			return Resources{}, nil, err
		}
		t.sources, t.inCluster, t.last, t.lastSkipped = sources, icState, res, withProfiled
		return res, withProfiled, nil
	}

	// Merge each dirty key's exporters again.
	names := make([]string, 0, len(now))
	for name := range now {
		names = append(names, name)
	}
	// The local catalog first, as TranslateSidecar adds it.
	slices.SortFunc(names, func(a, b string) int {
		return cmp.Or(-cmpBool(a == catalog.LocalSource, b == catalog.LocalSource), strings.Compare(a, b))
	})
	// In key order, so that of two bad services the same one is named
	// every time.
	keys := slices.SortedFunc(maps.Keys(dirty), catalog.CompareKeys)
	changed := map[catalog.ServiceKey]*sidecarKey{}
	var fresh []*sidecarKey // clusterset services among changed
	hostsChanged := false
	for _, key := range keys {
		var exps []*exporter
		for _, name := range names {
			snap := now[name]
			if svc, ok := snap.Get(key); ok {
				exps = append(exps, &exporter{cluster: cmp.Or(svc.Cluster, name), source: name, local: name == catalog.LocalSource, svc: svc})
			}
		}
		old := t.keys[key]
		var k *sidecarKey
		if len(exps) > 0 {
			if k, err = t.merge(key, exps, old); err != nil {
				return Resources{}, nil, err
			}
			if k.cs != nil {
				fresh = append(fresh, k)
			}
		}
		changed[key] = k
		hostsChanged = hostsChanged || (old != nil && old.cs != nil) != (k != nil && k.cs != nil)
	}
	for key := range changed {
		if old := t.keys[key]; old != nil {
			old.dropped = t.gen
		}
	}
	slices.SortFunc(fresh, compareKeyHosts)
	var dropped []*sidecarKey // the replaced clusterset services
	for key := range changed {
		if old := t.keys[key]; old != nil && old.cs != nil {
			dropped = append(dropped, old)
		}
	}
	slices.SortFunc(dropped, compareKeyHosts)
	hosts := updateSorted(t.hosts, dropped, fresh, t.kept, compareKeyHosts)
	if hostsChanged {
		if err := sharedHost(len(hosts), func(i int) *csService { return hosts[i].cs }); err != nil {
			return Resources{}, nil, err
		}
	}

	// VIPs, in host order, exactly as assignVIPs gives them; a service
	// whose VIP moved is translated again like a changed one.
	if hostsChanged || t.last.Version == "" {
		var used vipTable
		for i, k := range hosts {
			vip, ok := used.take(k.start)
			if !ok {
				return Resources{}, nil, fmt.Errorf("service %s: no free virtual IP in 240.240.0.0/16 for %d clusterset services", k.key, len(hosts))
			}
			if k.dropped != t.gen && changed[k.key] == nil && k.cs.vip != vip {
				moved := k.withVIP(vip)
				k.dropped = t.gen
				changed[k.key] = moved
				hosts[i] = moved
				fresh = append(fresh, moved)
				continue
			}
			k.cs.vip = vip
		}
	} else {
		for _, k := range fresh {
			// Unchanged hosts keep their VIPs.
			k.cs.vip = t.keys[k.key].cs.vip
		}
	}
	// Fresh states are not shared yet: their VIP-dependent parts are made
	// now, in host order so that the first error is TranslateSidecar's.
	slices.SortFunc(fresh, compareKeyHosts)
	for _, k := range fresh {
		if err := t.finish(k, t.keys[k.key]); err != nil {
			return Resources{}, nil, err
		}
	}

	// The in-cluster services, in key order as TranslateSidecar reads
	// them.
	icChanged := make(map[catalog.ServiceKey]*sidecarKey, len(icDirty))
	var icFresh []*sidecarKey
	for _, key := range slices.SortedFunc(maps.Keys(icDirty), catalog.CompareKeys) {
		var k *sidecarKey
		if svc, ok := icSnap.Get(key); ok {
			if k, err = t.inClusterKey(svc, t.icKeys[key]); err != nil {
				return Resources{}, nil, err
			}
			if k.cs != nil {
				icFresh = append(icFresh, k)
			}
		}
		icChanged[key] = k
	}
	gone := make([]*sidecarKey, 0, len(changed)+len(icChanged))
	for key := range changed {
		if old := t.keys[key]; old != nil {
			gone = append(gone, old)
		}
	}
	for key := range icChanged {
		if old := t.icKeys[key]; old != nil {
			old.dropped = t.gen
			gone = append(gone, old)
		}
	}

	res, next, err := t.assemble(gone, slices.Concat(fresh, icFresh))
	if err != nil {
		return Resources{}, nil, err
	}
	skipping, redo := redoSkipping(t.skipping, t.keys, changed)
	icSkipping, icRedo := redoSkipping(t.icSkipping, t.icKeys, icChanged)
	skipped := t.skipped
	if redo || icRedo {
		skipped = nil
		for _, m := range []map[catalog.ServiceKey]*sidecarKey{skipping, icSkipping} {
			for _, k := range m {
				skipped = append(skipped, k.skipped...)
			}
		}
		slices.SortFunc(skipped, compareSkipped)
		skipped = slices.Compact(skipped)
	}

	res, withProfiled, err := t.profiles.withProfiles(res, skipped, sources[catalog.LocalSource].services, icState.services, in.Declared, in.Policies, t.b.opts.TrustDomain)
	if err != nil {
		return Resources{}, nil, err
	}

	// Commit.
	for key, k := range changed {
		if k == nil {
			delete(t.keys, key)
		} else {
			t.keys[key] = k
		}
	}
	for key, k := range icChanged {
		if k == nil {
			delete(t.icKeys, key)
		} else {
			t.icKeys[key] = k
		}
	}
	t.inCluster, t.icSkipping = icState, icSkipping
	t.sources, t.hosts = sources, hosts
	t.byName, t.tcp, t.explicit, t.http, t.explicitRoute = next.byName, next.tcp, next.explicit, next.http, next.explicitRoute
	t.checkpoints = next.checkpoints
	t.skipping, t.skipped, t.last, t.lastSkipped = skipping, skipped, res, withProfiled
	return res, withProfiled, nil
}

// redoSkipping returns the keys with something skipped after the keys
// of changed are replaced (a nil state: removed), and whether that set
// changed; when it did not, it is skipping itself.
func redoSkipping(skipping, keys map[catalog.ServiceKey]*sidecarKey, changed map[catalog.ServiceKey]*sidecarKey) (map[catalog.ServiceKey]*sidecarKey, bool) {
	redo := false
	for key, k := range changed {
		if old := keys[key]; (old != nil && len(old.skipped) > 0) || (k != nil && len(k.skipped) > 0) {
			redo = true
			break
		}
	}
	if !redo {
		return skipping, false
	}
	out := make(map[catalog.ServiceKey]*sidecarKey, len(skipping))
	for key, k := range skipping {
		if _, ok := changed[key]; !ok {
			out[key] = k
		}
	}
	for key, k := range changed {
		if k != nil && len(k.skipped) > 0 {
			out[key] = k
		}
	}
	return out, true
}

// inClusterKey makes everything an in-cluster service adds: its
// clusters, assignments, chains and explicit virtual hosts, each with
// its encoding. Its state has no cs when it cannot be one (skipped).
// What old made of the same ClusterIP, ports and identities is taken as
// it is, so an endpoint's change makes its assignment alone again, as
// finish does for a clusterset service.
func (t *SidecarTranslator) inClusterKey(svc *catalog.Service, old *sidecarKey) (*sidecarKey, error) {
	t.b.skipped = nil
	cs := t.b.inClusterService(svc)
	k := &sidecarKey{key: svc.Key(), host: InClusterHost(svc.Namespace, svc.Name), inCluster: true, cs: cs, skipped: t.b.skipped}
	t.b.skipped = nil
	if cs == nil {
		return k, nil
	}
	same := old != nil && old.cs != nil && old.cs.vip == cs.vip && slices.Equal(old.cs.ports, cs.ports) && slices.Equal(old.cs.sans, cs.sans)
	k.cidr = hostRanges([]netip.Addr{cs.vip})[0]
	if same {
		k.cidr = old.cidr
	}
	k.ports = make([]sidecarPort, len(cs.ports))
	for i, p := range cs.ports {
		sp := &k.ports[i]
		sp.owner, sp.port = k, p
		sp.name = outboundClusterName(k.host, p.number)
		sp.vhName = k.host + ":" + strconv.Itoa(int(p.number))
		var err error
		sp.cla = t.b.loadAssignment(cs, p)
		if sp.claEnc, err = encode(endpointTag, sp.name, sp.cla); err != nil {
			return nil, err
		}
		if same {
			o := &old.ports[i]
			sp.cluster, sp.clusterEnc = o.cluster, o.clusterEnc
			sp.chain, sp.chainField = o.chain, o.chainField
			sp.explicitVH, sp.explicitVHField = o.explicitVH, o.explicitVHField
			continue
		}
		if sp.cluster, err = t.b.serviceCluster(cs, p); err != nil {
			return nil, err
		}
		if sp.clusterEnc, err = encode(clusterTag, sp.name, sp.cluster); err != nil {
			return nil, err
		}
		if sp.chain, err = t.b.addressChain(cs, p, k.cidr); err != nil {
			return nil, err
		}
		if sp.chainField, err = chainField(sp.chain); err != nil {
			return nil, fmt.Errorf("%s %q: service %s port %d: %w", listenerTag, OutboundListenerName, cs.key, p.number, err)
		}
		if p.http() {
			sp.explicitVH = t.b.explicitHost(cs, p)
			if sp.explicitVHField, err = vhField(sp.explicitVH); err != nil {
				return nil, fmt.Errorf("route configuration %q is invalid: %w", ExplicitRouteName, err)
			}
		}
	}
	// loadAssignment may skip an endpoint that is not an IP.
	k.skipped = append(k.skipped, t.b.skipped...)
	t.b.skipped = nil
	return k, nil
}

func compareSkipped(x, y Skipped) int {
	return cmp.Or(strings.Compare(x.Service, y.Service), strings.Compare(x.Cluster, y.Cluster), strings.Compare(x.Reason, y.Reason))
}

func compareKeyHosts(a, b *sidecarKey) int { return compareHosts(a.cs, b.cs) }

// kept reports whether a part or state of the last translation is still
// current in this one.
func (t *SidecarTranslator) kept(k *sidecarKey) bool { return k.dropped != t.gen }

// sourcesOf checks the catalogs as TranslateSidecar does and indexes
// them by source.
func sourcesOf(local *catalog.Snapshot, peers []*catalog.Snapshot) (map[string]*catalog.Snapshot, error) {
	now := make(map[string]*catalog.Snapshot, 1+len(peers))
	if local != nil {
		if local.Source() != catalog.LocalSource {
			return nil, fmt.Errorf("local catalog has source %q, not %q", local.Source(), catalog.LocalSource)
		}
		now[catalog.LocalSource] = local
	}
	seen := map[string]bool{}
	for _, p := range peers {
		if p == nil {
			continue
		}
		if p.Source() == catalog.LocalSource || seen[p.Source()] {
			return nil, fmt.Errorf("peer catalog source %q is the local one or listed twice", p.Source())
		}
		seen[p.Source()] = true
		now[p.Source()] = p
	}
	return now, nil
}

// diffServices marks in dirty the keys whose service differs, for the
// sidecar, between prev (a catalog's services last time, in key order)
// and snap, and returns snap's services in key order. The catalog's
// Builder keeps the entry of a service that did not change, so most are
// told apart by their address.
func diffServices(prev []*catalog.Service, snap *catalog.Snapshot, dirty map[catalog.ServiceKey]bool) []*catalog.Service {
	out := make([]*catalog.Service, 0, snap.Len())
	j := 0
	for svc := range snap.All() {
		out = append(out, svc)
		if j < len(prev) && prev[j] == svc {
			j++
			continue
		}
		for j < len(prev) && compareKeys(prev[j], svc) < 0 {
			dirty[prev[j].Key()] = true
			j++
		}
		if j < len(prev) && compareKeys(prev[j], svc) == 0 {
			if !sameForSidecar(prev[j], svc) {
				dirty[svc.Key()] = true
			}
			j++
			continue
		}
		dirty[svc.Key()] = true
	}
	for ; j < len(prev); j++ {
		dirty[prev[j].Key()] = true
	}
	return out
}

// sameForSidecar reports whether a and b translate alike for the
// sidecars: everything but the peers a local export is narrowed to.
func sameForSidecar(a, b *catalog.Service) bool {
	if a.Namespace != b.Namespace || a.Name != b.Name || a.Cluster != b.Cluster || a.ClusterIP != b.ClusterIP ||
		!slices.Equal(a.Ports, b.Ports) || !slices.Equal(a.Identities, b.Identities) ||
		!slices.Equal(a.Gateways, b.Gateways) || len(a.Endpoints) != len(b.Endpoints) {
		return false
	}
	for i, e := range a.Endpoints {
		f := b.Endpoints[i]
		if e.Locality != f.Locality || e.Ready != f.Ready || e.NotReady != f.NotReady || !slices.Equal(e.Addresses, f.Addresses) {
			return false
		}
	}
	return true
}

// merge makes the exporter-dependent part of key's state: the
// clusterset service, the ClusterLoadAssignments of its ports, and what
// was skipped. The VIP-dependent part is made by finish.
func (t *SidecarTranslator) merge(key catalog.ServiceKey, exps []*exporter, old *sidecarKey) (*sidecarKey, error) {
	k := &sidecarKey{key: key}
	if old != nil {
		k.host, k.start = old.host, old.start
	} else {
		k.host = ClusterSetHost(key.Namespace, key.Name)
		sum := sha256.Sum256([]byte(k.host))
		k.start = binary.BigEndian.Uint16(sum[:2])
	}
	t.b.skipped = nil
	k.cs = t.b.service(key, exps)
	if k.cs != nil {
		k.ports = make([]sidecarPort, len(k.cs.ports))
		for i, p := range k.cs.ports {
			sp := &k.ports[i]
			sp.owner, sp.port = k, p
			sp.name = ClusterSetClusterName(key.Namespace, key.Name, p.number)
			sp.vhName = k.host + ":" + strconv.Itoa(int(p.number))
			sp.cla = t.b.loadAssignment(k.cs, p)
			var err error
			if sp.claEnc, err = encode(endpointTag, sp.name, sp.cla); err != nil {
				return nil, err
			}
		}
	}
	k.skipped = t.b.skipped
	t.b.skipped = nil
	return k, nil
}

// withVIP is k, unchanged but for its VIP: the exporter-dependent part
// is shared, the rest is made again by finish.
func (k *sidecarKey) withVIP(vip netip.Addr) *sidecarKey {
	cs := *k.cs
	cs.vip = vip
	m := &sidecarKey{key: k.key, host: k.host, start: k.start, cs: &cs, skipped: k.skipped}
	m.ports = make([]sidecarPort, len(k.ports))
	for i, p := range k.ports {
		m.ports[i] = sidecarPort{owner: m, port: p.port, name: p.name, vhName: p.vhName, cla: p.cla, claEnc: p.claEnc}
	}
	return m
}

// finish makes the VIP-dependent part of k's state: clusters, the TCP
// ports' chains, the HTTP ports' virtual hosts. What old made of the
// same ports, identities and VIP is taken as it is.
func (t *SidecarTranslator) finish(k, old *sidecarKey) error {
	s := k.cs
	if old != nil && old.cs != nil && old.cs.vip == s.vip && slices.Equal(old.cs.ports, s.ports) && slices.Equal(old.cs.sans, s.sans) {
		k.cidr = old.cidr
		for i := range k.ports {
			p, o := &k.ports[i], &old.ports[i]
			p.cluster, p.clusterEnc = o.cluster, o.clusterEnc
			p.chain, p.chainField = o.chain, o.chainField
			p.vh, p.vhField, p.explicitVH, p.explicitVHField = o.vh, o.vhField, o.explicitVH, o.explicitVHField
		}
		return nil
	}
	k.cidr = hostRanges([]netip.Addr{s.vip})[0]
	vip := s.vip.String()
	for i := range k.ports {
		p := &k.ports[i]
		c, err := t.b.serviceCluster(s, p.port)
		if err != nil {
			return err
		}
		if p.clusterEnc, err = encode(clusterTag, p.name, c); err != nil {
			return err
		}
		p.cluster = c
		if !p.port.http() {
			proxy, err := t.b.tcpProxyFilter(p.name)
			if err != nil {
				return fmt.Errorf("listener %q: service %s port %d: %w", OutboundListenerName, s.key, p.port.number, err)
			}
			p.chain = &listenerv3.FilterChain{
				FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(p.port.number)), PrefixRanges: []*corev3.CidrRange{k.cidr}},
				Filters:          []*listenerv3.Filter{proxy},
			}
			if p.chainField, err = chainField(p.chain); err != nil {
				return fmt.Errorf("%s %q: service %s port %d: %w", listenerTag, OutboundListenerName, s.key, p.port.number, err)
			}
			continue
		}
		ps := strconv.Itoa(int(p.port.number))
		p.vh = t.b.virtualHost(p.vhName, []string{s.host, p.vhName, vip, vip + ":" + ps}, p.name)
		domains := []string{p.vhName}
		if p.port.number == 80 {
			domains = append(domains, s.host)
		}
		p.explicitVH = t.b.virtualHost(p.vhName, domains, p.name)
		if p.vhField, err = vhField(p.vh); err != nil {
			return fmt.Errorf("route configuration %q is invalid: %w", ps, err)
		}
		if p.explicitVHField, err = vhField(p.explicitVH); err != nil {
			return fmt.Errorf("route configuration %q is invalid: %w", ExplicitRouteName, err)
		}
	}
	return nil
}

// chainField validates a chain and encodes it as a field of a listener.
func chainField(c *listenerv3.FilterChain) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("filter chain is invalid: %w", err)
	}
	enc, err := deterministic.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("filter chain: encode: %w", err)
	}
	return field(filterChainsField, enc), nil
}

// vhField validates a virtual host and encodes it as a field of a route
// configuration.
func vhField(vh *routev3.VirtualHost) ([]byte, error) {
	if err := vh.Validate(); err != nil {
		return nil, err
	}
	enc, err := deterministic.Marshal(vh)
	if err != nil {
		return nil, err
	}
	return field(virtualHostsField, enc), nil
}

// mergeSorted merges the elements of old that keep (sorted by cmp) with
// fresh (sorted by cmp too) into a new slice.
func mergeSorted[T any](old []T, keep func(T) bool, fresh []T, cmp func(a, b T) int) []T {
	out := make([]T, 0, len(old)+len(fresh))
	i := 0
	for _, o := range old {
		if !keep(o) {
			continue
		}
		for i < len(fresh) && cmp(fresh[i], o) < 0 {
			out = append(out, fresh[i])
			i++
		}
		out = append(out, o)
	}
	return append(out, fresh[i:]...)
}

// smallChange is how many parts a sorted list takes out and puts in one
// at a time (binary search and a move of the rest); more, and the list
// is merged whole.
const smallChange = 64

// updateSorted returns old (sorted by cmp) without dropped and with
// fresh (both sorted by cmp too), as a new slice. A few changes are
// found by binary search, which reads only the parts it compares:
// walking every part of a large list costs a cache miss each.
func updateSorted[T comparable](old, dropped, fresh []T, keep func(T) bool, cmp func(a, b T) int) []T {
	if len(dropped)+len(fresh) > smallChange {
		return mergeSorted(old, keep, fresh, cmp)
	}
	out := make([]T, len(old), len(old)+len(fresh))
	copy(out, old)
	for _, d := range dropped {
		i, found := slices.BinarySearchFunc(out, d, cmp)
		if !found || out[i] != d {
			// Not where its order says: merge, which keeps every part
			// that is still current wherever it is.
			return mergeSorted(old, keep, fresh, cmp)
		}
		out = slices.Delete(out, i, i+1)
	}
	for _, f := range fresh {
		i, _ := slices.BinarySearchFunc(out, f, cmp)
		out = slices.Insert(out, i, f)
	}
	return out
}

// assembled is what assemble makes besides the Resources, for the
// translator to keep.
type assembled struct {
	byName, tcp, explicit []*sidecarPort
	http                  []*httpPortState
	explicitRoute         routeState
	checkpoints           []hash.Hash
}

func byClusterName(a, b *sidecarPort) int { return strings.Compare(a.name, b.name) }

func byVIPAndPort(a, b *sidecarPort) int {
	return cmp.Or(a.owner.cs.vip.Compare(b.owner.cs.vip), cmp.Compare(a.port.number, b.port.number))
}

func byVHName(a, b *sidecarPort) int { return strings.Compare(a.vhName, b.vhName) }

func byVIP(a, b *sidecarPort) int { return a.owner.cs.vip.Compare(b.owner.cs.vip) }

// portParts are ports in the lists assemble updates: every port, TCP
// ports, HTTP ports, and HTTP ports by number.
type portParts struct {
	names, tcp, explicit []*sidecarPort
	http                 map[int32][]*sidecarPort
}

// add adds k's ports, marking their HTTP port numbers touched.
func (s *portParts) add(k *sidecarKey, touched map[int32]bool) {
	for i := range k.ports {
		p := &k.ports[i]
		s.names = append(s.names, p)
		if p.port.http() {
			s.explicit = append(s.explicit, p)
		}
		if !p.port.http() || k.inCluster {
			s.tcp = append(s.tcp, p)
			continue
		}
		s.http[p.port.number] = append(s.http[p.port.number], p)
		touched[p.port.number] = true
	}
}

// assemble makes the Resources from the kept parts, without those of
// the replaced states, dropped, and with the fresh states', and the
// versions.
func (t *SidecarTranslator) assemble(dropped, fresh []*sidecarKey) (Resources, assembled, error) {
	keep := func(p *sidecarPort) bool { return t.kept(p.owner) }
	touched := map[int32]bool{}
	added := portParts{http: map[int32][]*sidecarPort{}}
	for _, k := range fresh {
		added.add(k, touched)
	}
	gone := portParts{http: map[int32][]*sidecarPort{}}
	for _, old := range dropped {
		gone.add(old, touched)
	}
	sorted := func(ps []*sidecarPort, cmp func(a, b *sidecarPort) int) []*sidecarPort {
		slices.SortFunc(ps, cmp)
		return ps
	}
	var a assembled
	a.byName = updateSorted(t.byName, sorted(gone.names, byClusterName), sorted(added.names, byClusterName), keep, byClusterName)
	a.tcp = updateSorted(t.tcp, sorted(gone.tcp, byVIPAndPort), sorted(added.tcp, byVIPAndPort), keep, byVIPAndPort)
	if err := sharedAddress(a.tcp, added.tcp); err != nil {
		return Resources{}, assembled{}, err
	}
	a.explicit = updateSorted(t.explicit, sorted(gone.explicit, byVHName), sorted(added.explicit, byVHName), keep, byVHName)

	// HTTP ports: the untouched kept as they are.
	var err error
	olds := map[int32]*httpPortState{}
	for _, hp := range t.http {
		if !touched[hp.number] {
			a.http = append(a.http, hp)
			continue
		}
		olds[hp.number] = hp
	}
	for n := range touched {
		old := olds[n]
		var oldVIP, oldVH []*sidecarPort
		if old != nil {
			oldVIP, oldVH = old.byVIP, old.route.ports
		}
		hp := &httpPortState{number: n}
		goneVIP, freshVIP := sorted(slices.Clone(gone.http[n]), byVIP), sorted(slices.Clone(added.http[n]), byVIP)
		hp.byVIP = updateSorted(oldVIP, goneVIP, freshVIP, keep, byVIP)
		if len(hp.byVIP) == 0 {
			continue
		}
		goneVH, freshVH := sorted(gone.http[n], byVHName), sorted(added.http[n], byVHName)
		routePorts := updateSorted(oldVH, goneVH, freshVH, keep, byVHName)
		if old != nil && sameParts(goneVIP, freshVIP, func(p *sidecarPort) any { return p.owner.cidr }) {
			hp.chain, hp.chainField = old.chain, old.chainField
		} else if err := t.httpChain(hp); err != nil {
			return Resources{}, assembled{}, err
		}
		if old != nil && sameParts(goneVH, freshVH, func(p *sidecarPort) any { return p.vh }) {
			hp.route = old.route
			hp.route.ports = routePorts
		} else if hp.route, err = t.route(strconv.Itoa(int(n)), routePorts); err != nil {
			return Resources{}, assembled{}, err
		}
		a.http = append(a.http, hp)
	}
	slices.SortFunc(a.http, func(x, y *httpPortState) int { return cmp.Compare(x.number, y.number) })
	if sameParts(gone.explicit, added.explicit, func(p *sidecarPort) any { return p.explicitVH }) {
		a.explicitRoute = t.explicitRoute
		a.explicitRoute.ports = a.explicit
	} else if a.explicitRoute, err = t.route(ExplicitRouteName, a.explicit); err != nil {
		return Resources{}, assembled{}, err
	}

	// The outbound listener: HTTP chains by port, TCP chains by VIP and
	// port, the explicit chain.
	chains := make([]*listenerv3.FilterChain, 0, len(a.http)+len(a.tcp)+1)
	for _, hp := range a.http {
		chains = append(chains, hp.chain)
	}
	for _, p := range a.tcp {
		chains = append(chains, p.chain)
	}
	chains = append(chains, t.explicitChain)
	outbound := t.last.outboundListener()
	if outbound == nil || !slices.Equal(outbound.GetFilterChains(), chains) {
		outbound = t.outbound.listener(chains)
	}

	clusters := make([]*clusterv3.Cluster, 0, 2+len(a.byName))
	// "PassthroughCluster" and "inbound-passthrough" sort before every
	// "outbound|…".
	clusters = append(clusters, t.passthrough[0], t.passthrough[1])
	loads := make([]*endpointv3.ClusterLoadAssignment, len(a.byName))
	for i, p := range a.byName {
		clusters = append(clusters, p.cluster)
		loads[i] = p.cla
	}
	routes := make([]*routev3.RouteConfiguration, 0, len(a.http)+1)
	routeStates := make([]*routeState, 0, len(a.http)+1)
	for _, hp := range a.http {
		routeStates = append(routeStates, &hp.route)
	}
	// By name: port numbers as strings, then "explicit".
	slices.SortFunc(routeStates, func(x, y *routeState) int { return strings.Compare(x.rc.GetName(), y.rc.GetName()) })
	routeStates = append(routeStates, &a.explicitRoute)
	for _, rs := range routeStates {
		routes = append(routes, rs.rc)
	}

	res := Resources{
		Listeners: []*listenerv3.Listener{t.inbound, outbound},
		Clusters:  clusters,
		Endpoints: loads,
		Routes:    routes,
	}
	if a.checkpoints, err = t.versions(&res, a, routeStates); err != nil {
		return Resources{}, assembled{}, err
	}
	return res, a, nil
}

// sharedAddress refuses two in-cluster services with one ClusterIP, as
// inClusterServices does, looking only around the fresh ports in the
// address-ordered list.
func sharedAddress(list, fresh []*sidecarPort) error {
	for _, f := range fresh {
		if !f.owner.inCluster {
			continue
		}
		i, _ := slices.BinarySearchFunc(list, f, byVIPAndPort)
		same := func(j int) bool { return j >= 0 && j < len(list) && list[j].owner.cs.vip == f.owner.cs.vip }
		for j := i; same(j); j-- {
			if o := list[j].owner; o != f.owner {
				return sharedClusterIP(o.cs, f.owner.cs)
			}
		}
		for j := i + 1; same(j); j++ {
			if o := list[j].owner; o != f.owner {
				return sharedClusterIP(o.cs, f.owner.cs)
			}
		}
	}
	return nil
}

// outboundListener is r's outbound listener, nil for the zero Resources.
func (r Resources) outboundListener() *listenerv3.Listener {
	if len(r.Listeners) != 2 {
		return nil
	}
	return r.Listeners[1]
}

// sameParts reports whether the parts a list loses, gone, and those it
// gains, fresh, both in the list's order, are the same messages by
// what: the list's messages are then the same as before. This reads the
// few parts that changed, not the list.
func sameParts(a, b []*sidecarPort, what func(*sidecarPort) any) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if what(a[i]) != what(b[i]) {
			return false
		}
	}
	return true
}

// httpChain makes hp's outbound chain: every VIP with an HTTP port
// hp.number, to the port's route configuration.
func (t *SidecarTranslator) httpChain(hp *httpPortState) error {
	ps := strconv.Itoa(int(hp.number))
	hcm, err := t.b.rdsManager("outbound_"+ps, ps)
	if err != nil {
		return fmt.Errorf("listener %q: HTTP port %d: %w", OutboundListenerName, hp.number, err)
	}
	ranges := make([]*corev3.CidrRange, len(hp.byVIP))
	for i, p := range hp.byVIP {
		ranges[i] = p.owner.cidr
	}
	hp.chain = &listenerv3.FilterChain{
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(uint32(hp.number)), PrefixRanges: ranges},
		Filters:          []*listenerv3.Filter{hcm},
	}
	if hp.chainField, err = chainField(hp.chain); err != nil {
		return fmt.Errorf("%s %q: HTTP port %d: %w", listenerTag, OutboundListenerName, hp.number, err)
	}
	return nil
}

// route makes the route configuration name of ports' virtual hosts
// (the explicit ones for ExplicitRouteName).
func (t *SidecarTranslator) route(name string, ports []*sidecarPort) (routeState, error) {
	rs := routeState{ports: ports}
	vhs := make([]*routev3.VirtualHost, len(ports))
	for i, p := range ports {
		vhs[i] = p.vh
		if name == ExplicitRouteName {
			vhs[i] = p.explicitVH
		}
	}
	rs.rc = &routev3.RouteConfiguration{Name: name, VirtualHosts: vhs}
	shell := &routev3.RouteConfiguration{Name: name}
	// The virtual hosts were validated when made; the rest here.
	if err := shell.Validate(); err != nil {
		return routeState{}, fmt.Errorf("route configuration %q is invalid: %w", name, err)
	}
	if !t.spliceRoutes {
		var err error
		if rs.enc, err = deterministic.Marshal(rs.rc); err != nil {
			return routeState{}, fmt.Errorf("route configuration %q: encode: %w", name, err)
		}
		return rs, nil
	}
	head, err := deterministic.Marshal(shell)
	if err != nil {
		return routeState{}, fmt.Errorf("route configuration %q: encode: %w", name, err)
	}
	size := len(head)
	for _, p := range ports {
		size += len(p.routeField(name == ExplicitRouteName))
	}
	// One piece, so that hashing it again reads no part.
	rs.enc = append(make([]byte, 0, size), head...)
	for _, p := range ports {
		rs.enc = append(rs.enc, p.routeField(name == ExplicitRouteName)...)
	}
	return rs, nil
}

// versions sets res's versions, which TranslateSidecar's
// (newResources's and withRoutes's) are, from the kept encodings. A
// type whose resources are the last result's keeps its version without
// hashing anything; the endpoints' hash resumes at the checkpoint
// before the first ClusterLoadAssignment that is not the last result's.
// It returns the endpoints' hash's checkpoints for res.
func (t *SidecarTranslator) versions(res *Resources, a assembled, routes []*routeState) ([]hash.Hash, error) {
	last := t.last
	if last.Version != "" && res.outboundListener() == last.outboundListener() {
		res.ListenersVersion = last.ListenersVersion
	} else {
		v := newVersionHash()
		v.resource(listenerTag, t.inboundEnc)
		if err := t.hashOutbound(&v, res.outboundListener(), a); err != nil {
			return nil, err
		}
		res.ListenersVersion = v.sum()
	}
	if last.Version != "" && slices.Equal(res.Clusters, last.Clusters) {
		res.ClustersVersion = last.ClustersVersion
	} else {
		v := newVersionHash()
		for _, enc := range t.passthroughEnc {
			v.resource(clusterTag, enc)
		}
		for _, p := range a.byName {
			v.resource(clusterTag, p.clusterEnc)
		}
		res.ClustersVersion = v.sum()
	}
	var checkpoints []hash.Hash
	res.EndpointsVersion, checkpoints = endpointsVersion(res.Endpoints, func(k int) []byte { return a.byName[k].claEnc },
		last.Endpoints, last.EndpointsVersion, t.checkpoints)
	if last.Version != "" && slices.Equal(res.Routes, last.Routes) {
		res.RoutesVersion = last.RoutesVersion
	} else {
		v := newVersionHash()
		for _, rs := range routes {
			v.resource(routeTag, rs.enc)
		}
		res.RoutesVersion = v.sum()
	}
	res.combine()
	return checkpoints, nil
}

func (p *sidecarPort) routeField(explicit bool) []byte {
	if explicit {
		return p.explicitVHField
	}
	return p.vhField
}

// hashOutbound writes the outbound listener: spliced from its parts'
// encodings, or encoded whole when they do not splice.
func (t *SidecarTranslator) hashOutbound(v *versionHash, outbound *listenerv3.Listener, a assembled) error {
	if !t.outbound.splice {
		enc, err := deterministic.Marshal(outbound)
		if err != nil {
			return fmt.Errorf("%s %q: encode: %w", listenerTag, OutboundListenerName, err)
		}
		v.resource(listenerTag, enc)
		return nil
	}
	size := len(t.outbound.head) + len(t.outbound.explicitField) + len(t.outbound.tail)
	for _, hp := range a.http {
		size += len(hp.chainField)
	}
	for _, p := range a.tcp {
		size += len(p.chainField)
	}
	v.record(listenerTag, size)
	v.write(t.outbound.head)
	for _, hp := range a.http {
		v.write(hp.chainField)
	}
	for _, p := range a.tcp {
		v.write(p.chainField)
	}
	v.write(t.outbound.explicitField)
	v.write(t.outbound.tail)
	return nil
}
