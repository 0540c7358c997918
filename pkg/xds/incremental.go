package xds

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

// deterministic is the encoding every version hashes.
var deterministic = proto.MarshalOptions{Deterministic: true}

// Type names in the versions' encoding (typeVersion's), which errors
// name resources with too.
const (
	listenerTag = "listener"
	clusterTag  = "cluster"
	endpointTag = "ClusterLoadAssignment"
	routeTag    = "route configuration"
)

// GatewayTranslator is TranslateGateway with a memory: it keeps, for every
// service of the last catalog it translated, the filter chains, clusters
// and ClusterLoadAssignments of its ports with their encodings, and gives
// them again, unchanged, while the service's catalog entry is the same
// (the catalog's Builder keeps the entry of a service that did not change)
// or differs only in what the gateway does not see. A change of one
// service costs that service's translation plus an assembly of the
// whole: a walk of the catalog, a sorted merge, and the hashes of the
// versions of the types that changed over the kept encodings (the
// endpoints' from the block of the first changed
// ClusterLoadAssignment), never a new encoding of a resource that did
// not change. When only endpoints changed, the listener is the last
// one, message and version.
//
// Its results equal TranslateGateway's for the same catalog, versions
// included. A GatewayTranslator is not safe for concurrent use; its
// results are, like every Resources.
type GatewayTranslator struct {
	// shell is the listener without filter chains; head and tail are
	// the encodings of its fields before and after filter_chains, and
	// splice says that head, the chains' field encodings and tail make
	// the listener's encoding (checked once; when they do not, the
	// listener is encoded whole each time).
	shell      *listenerv3.Listener
	head, tail []byte
	splice     bool

	eds        edsParts
	localities *localities
	federation *portUnit

	// services is what the last successful translation made of each
	// service, in the catalog's order (by key); units are all of their
	// ports and the federation unit, sorted by cluster name.
	services []*serviceUnits
	units    []*portUnit
	// gen counts translations: a service seen by the current one has it.
	gen  uint64
	last Resources
	// checkpoints[k] is the endpoints' hash (EndpointsVersion), for
	// last, just before its k*claBlock-th ClusterLoadAssignment, so that
	// the hash resumes at the block of the first change
	// (endpointsVersion).
	checkpoints []hash.Hash
}

// serviceUnits are the resources of the TCP ports of one service.
type serviceUnits struct {
	svc   *catalog.Service
	units []portUnit
	gen   uint64
}

// portUnit is one filter chain with its cluster and, for a service port,
// its ClusterLoadAssignment, each with its deterministic encoding.
type portUnit struct {
	name, sni string
	chain     *listenerv3.FilterChain
	// chainField is the chain encoded as an element of the listener's
	// filter_chains: tag, length, message.
	chainField []byte
	cluster    *clusterv3.Cluster
	clusterEnc []byte
	cla        *endpointv3.ClusterLoadAssignment // nil for the federation cluster
	claEnc     []byte
	// owner is the service whose port this is; nil for the federation
	// chain.
	owner *serviceUnits
}

// filterChainsField is the field number of Listener.filter_chains.
var filterChainsField = (&listenerv3.Listener{}).ProtoReflect().Descriptor().Fields().ByName("filter_chains").Number()

// NewGatewayTranslator returns a translator for opts, which has
// translated nothing yet. It refuses options TranslateGateway refuses,
// with the same error.
func NewGatewayTranslator(opts GatewayOptions) (*GatewayTranslator, error) {
	fed, err := federationCluster(opts.FederationUpstream)
	if err != nil {
		return nil, err
	}
	shell, err := gatewayListener(opts.ListenerPort)
	if err != nil {
		return nil, err
	}
	// Listener.Validate() checks each filter chain on its own, so the
	// shell once and every chain when it is made check every listener.
	if err := shell.Validate(); err != nil {
		return nil, fmt.Errorf("%s %q is invalid: %w", listenerTag, shell.GetName(), err)
	}
	t := &GatewayTranslator{
		shell:      shell,
		eds:        newEDSParts(),
		localities: &localities{m: map[catalog.Locality]*corev3.Locality{}},
	}
	t.federation = &portUnit{}
	if err := t.federation.route(federation.ReservedSNI, FederationClusterName, fed); err != nil {
		return nil, err
	}
	t.units = []*portUnit{t.federation}
	if err := t.splitShell(); err != nil {
		return nil, err
	}
	return t, nil
}

// splitShell encodes the shell's fields on either side of filter_chains
// and checks, with the federation chain, that they enclose the chains
// into the listener's own encoding.
func (t *GatewayTranslator) splitShell() error {
	var err error
	if t.head, t.tail, t.splice, err = splitListener(t.shell, t.federation.chain, t.federation.chainField); err != nil {
		return fmt.Errorf("%s %q: encode: %w", listenerTag, t.shell.GetName(), err)
	}
	return nil
}

// splitListener encodes shell's fields before filter_chains (head) and
// after it (tail), and reports whether head, a chain's field and tail
// concatenated are the encoding of shell with that chain, checked with
// probe, whose field is probeField.
func splitListener(shell *listenerv3.Listener, probe *listenerv3.FilterChain, probeField []byte) (head, tail []byte, splice bool, err error) {
	h, t := &listenerv3.Listener{}, &listenerv3.Listener{}
	shell.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		dst := h
		if fd.Number() > filterChainsField {
			dst = t
		}
		dst.ProtoReflect().Set(fd, v)
		return true
	})
	if head, err = deterministic.Marshal(h); err != nil {
		return nil, nil, false, err
	}
	if tail, err = deterministic.Marshal(t); err != nil {
		return nil, nil, false, err
	}
	whole, err := deterministic.Marshal(withChains(shell, []*listenerv3.FilterChain{probe}))
	if err != nil {
		return nil, nil, false, err
	}
	return head, tail, bytes.Equal(whole, slices.Concat(head, probeField, tail)), nil
}

// listener is the shell with chains.
func (t *GatewayTranslator) listener(chains []*listenerv3.FilterChain) *listenerv3.Listener {
	return withChains(t.shell, chains)
}

// withChains is a copy of shell with chains.
func withChains(shell *listenerv3.Listener, chains []*listenerv3.FilterChain) *listenerv3.Listener {
	lis, _ := proto.Clone(shell).(*listenerv3.Listener)
	lis.FilterChains = chains
	return lis
}

// Translate is TranslateGateway(local, opts) for the translator's opts.
// When it fails, the translator keeps what it had, and the error names
// the resource that failed.
func (t *GatewayTranslator) Translate(local *catalog.Snapshot) (Resources, error) {
	t.gen++
	// The catalog yields services in key order, the order of
	// t.services: walk both together.
	prev := t.services
	var next, added []*serviceUnits
	gone, j := false, 0
	if local != nil {
		next = make([]*serviceUnits, 0, local.Len())
		for svc := range local.All() {
			var old *serviceUnits
			if j < len(prev) && prev[j].svc == svc {
				old = prev[j]
				j++
			} else {
				for j < len(prev) && compareKeys(prev[j].svc, svc) < 0 {
					gone = true
					j++
				}
				if j < len(prev) && compareKeys(prev[j].svc, svc) == 0 {
					old = prev[j]
					j++
				}
			}
			if old != nil && (old.svc == svc || sameForGateway(old.svc, svc)) {
				// Keep the entry the catalog holds now, so that the next
				// translation compares pointers again.
				old.svc, old.gen = svc, t.gen
				next = append(next, old)
				continue
			}
			su, err := t.translateService(svc, old)
			if err != nil {
				return Resources{}, err
			}
			added = append(added, su)
			next = append(next, su)
		}
	}
	gone = gone || j < len(prev)
	if t.last.Version != "" && len(added) == 0 && !gone {
		return t.last, nil
	}

	// The units of services kept (their gen is this translation's) and
	// those of services translated now; not those of services replaced
	// or gone.
	var fresh []*portUnit
	for _, su := range added {
		for i := range su.units {
			fresh = append(fresh, &su.units[i])
		}
	}
	slices.SortFunc(fresh, byName)
	units := mergeUnits(t.units, fresh, t.gen)
	res, checkpoints, err := t.assemble(units)
	if err != nil {
		return Resources{}, err
	}
	t.services, t.units, t.last, t.checkpoints = next, units, res, checkpoints
	return res, nil
}

// compareKeys orders services as the catalog does: by namespace, then
// name.
func compareKeys(a, b *catalog.Service) int { return catalog.CompareKeys(a.Key(), b.Key()) }

func byName(a, b *portUnit) int { return strings.Compare(a.name, b.name) }

// mergeUnits merges the units of old whose service is still current
// (seen by translation gen) with fresh, both sorted by name, into a new
// slice.
func mergeUnits(old, fresh []*portUnit, gen uint64) []*portUnit {
	out := make([]*portUnit, 0, len(old)+len(fresh))
	i := 0
	for _, u := range old {
		if u.owner != nil && u.owner.gen != gen {
			continue
		}
		for i < len(fresh) && byName(fresh[i], u) < 0 {
			out = append(out, fresh[i])
			i++
		}
		out = append(out, u)
	}
	return append(out, fresh[i:]...)
}

// translateService makes the units of svc's TCP ports. A port old had
// keeps its chain and cluster, which depend on its name alone.
func (t *GatewayTranslator) translateService(svc *catalog.Service, old *serviceUnits) (*serviceUnits, error) {
	su := &serviceUnits{svc: svc, gen: t.gen}
	for _, p := range svc.Ports {
		if p.Protocol != catalog.ProtocolTCP {
			// The gateway forwards TLS over TCP only: UDP and SCTP
			// ports are not reachable through it.
			continue
		}
		name := ServiceClusterName(svc.Namespace, svc.Name, p.Port)
		u := portUnit{owner: su}
		if prev := old.unit(name); prev != nil {
			u.name, u.sni = prev.name, prev.sni
			u.chain, u.chainField = prev.chain, prev.chainField
			u.cluster, u.clusterEnc = prev.cluster, prev.clusterEnc
		} else if err := u.route(ServiceSNI(svc.Namespace, svc.Name, p.Port), name, t.eds.cluster(name)); err != nil {
			return nil, err
		}
		if err := u.load(loadAssignment(name, svc, p, t.localities)); err != nil {
			return nil, err
		}
		su.units = append(su.units, u)
	}
	return su, nil
}

// unit returns the unit of su named name, if there is one.
func (su *serviceUnits) unit(name string) *portUnit {
	if su == nil {
		return nil
	}
	for i := range su.units {
		if su.units[i].name == name {
			return &su.units[i]
		}
	}
	return nil
}

// route makes the chain from sni to the cluster, and validates and
// encodes both.
func (u *portUnit) route(sni, name string, cluster *clusterv3.Cluster) error {
	chain, err := filterChain(sni, name)
	if err != nil {
		return err
	}
	if err := chain.Validate(); err != nil {
		return fmt.Errorf("%s %q: filter chain %q is invalid: %w", listenerTag, GatewayListenerName, sni, err)
	}
	enc, err := deterministic.Marshal(chain)
	if err != nil {
		return fmt.Errorf("%s %q: filter chain %q: encode: %w", listenerTag, GatewayListenerName, sni, err)
	}
	clusterEnc, err := encode(clusterTag, name, cluster)
	if err != nil {
		return err
	}
	u.name, u.sni, u.chain, u.cluster, u.clusterEnc = name, sni, chain, cluster, clusterEnc
	u.chainField = field(filterChainsField, enc)
	return nil
}

// load validates and encodes the cluster's load assignment.
func (u *portUnit) load(cla *endpointv3.ClusterLoadAssignment) error {
	enc, err := encode(endpointTag, u.name, cla)
	if err != nil {
		return err
	}
	u.cla, u.claEnc = cla, enc
	return nil
}

// encode validates m and encodes it deterministically; errors name the
// resource as newResources's do.
func encode(typ, name string, m interface {
	proto.Message
	Validate() error
}) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("%s %q is invalid: %w", typ, name, err)
	}
	b, err := deterministic.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("%s %q: encode: %w", typ, name, err)
	}
	return b, nil
}

// assemble makes the Resources of units, and their versions: those
// newResources computes, from the kept encodings. A type whose parts
// are the last result's keeps its version (the listener its message
// too) without hashing anything; the endpoints' hash resumes at the
// checkpoint before the first ClusterLoadAssignment that is not the
// last result's. It also returns the endpoints' hash's checkpoints for
// the result.
func (t *GatewayTranslator) assemble(units []*portUnit) (Resources, []hash.Hash, error) {
	for i := 1; i < len(units); i++ {
		if units[i-1].name == units[i].name {
			return Resources{}, nil, fmt.Errorf("%s %q: two service ports have this name", clusterTag, units[i].name)
		}
	}
	clusters := make([]*clusterv3.Cluster, len(units))
	loads := make([]*endpointv3.ClusterLoadAssignment, 0, len(units))
	withLoad := make([]*portUnit, 0, len(units))
	for i, u := range units {
		clusters[i] = u.cluster
		if u.cla != nil {
			loads = append(loads, u.cla)
			withLoad = append(withLoad, u)
		}
	}
	res := Resources{Clusters: clusters, Endpoints: loads}
	sameChains, sameClusters := t.unchangedParts(units)
	if sameChains {
		res.Listeners, res.ListenersVersion = t.last.Listeners, t.last.ListenersVersion
	} else {
		// Chains are sorted by SNI, clusters by name; with Istio's
		// grammar the two orders agree, and this is only checked.
		byChain := units
		if !slices.IsSortedFunc(byChain, bySNI) {
			byChain = slices.SortedFunc(slices.Values(units), bySNI)
		}
		chains := make([]*listenerv3.FilterChain, len(byChain))
		for i, u := range byChain {
			chains[i] = u.chain
		}
		lis := t.listener(chains)
		v, err := t.listenerVersion(lis, byChain)
		if err != nil {
			return Resources{}, nil, err
		}
		res.Listeners, res.ListenersVersion = []*listenerv3.Listener{lis}, v
	}
	if sameClusters {
		res.ClustersVersion = t.last.ClustersVersion
	} else {
		v := newVersionHash()
		for _, u := range units {
			v.resource(clusterTag, u.clusterEnc)
		}
		res.ClustersVersion = v.sum()
	}
	var checkpoints []hash.Hash
	res.EndpointsVersion, checkpoints = endpointsVersion(loads, func(k int) []byte { return withLoad[k].claEnc },
		t.last.Endpoints, t.last.EndpointsVersion, t.checkpoints)
	res.combine()
	return res, checkpoints, nil
}

// unchangedParts reports whether units have the last result's chains, in
// the same order (the listener is then the last one), and its clusters.
func (t *GatewayTranslator) unchangedParts(units []*portUnit) (chains, clusters bool) {
	if t.last.Version == "" || len(units) != len(t.units) {
		return false, false
	}
	chains, clusters = true, true
	for i, u := range units {
		chains = chains && u.chain == t.units[i].chain
		clusters = clusters && u.cluster == t.units[i].cluster
	}
	return chains, clusters
}

// claBlock is how many ClusterLoadAssignments a checkpoint of the
// endpoints' hash covers.
const claBlock = 256

// endpointsVersion is typeVersion of loads, whose encodings enc gives,
// hashed from the checkpoint before the first of loads that is not
// last's (the last result's, whose version is lastVersion and whose
// hash's checkpoints are lastCheckpoints): a change of one
// ClusterLoadAssignment hashes from its block on, not every one. It also
// returns the hash's checkpoints for loads: checkpoints[k] is the hash
// just before loads[k*claBlock]; nil when the hash cannot be copied,
// and every version is then hashed whole.
func endpointsVersion(loads []*endpointv3.ClusterLoadAssignment, enc func(int) []byte,
	last []*endpointv3.ClusterLoadAssignment, lastVersion string, lastCheckpoints []hash.Hash) (string, []hash.Hash) {
	first := 0
	for first < len(loads) && first < len(last) && loads[first] == last[first] {
		first++
	}
	if len(lastCheckpoints) > 0 && first == len(loads) && first == len(last) {
		return lastVersion, lastCheckpoints
	}
	var v versionHash
	var checkpoints []hash.Hash
	from := 0
	if b := first / claBlock; b < len(lastCheckpoints) {
		if h, ok := clone(lastCheckpoints[b]); ok {
			v.h, from = h, b*claBlock
			checkpoints = slices.Clone(lastCheckpoints[:b])
		}
	}
	if v.h == nil {
		v.h = sha256.New()
	}
	complete := true
	for k := from; ; k++ {
		if complete && k%claBlock == 0 {
			h, ok := clone(v.h)
			checkpoints, complete = append(checkpoints, h), ok
		}
		if k == len(loads) {
			break
		}
		e := enc(k)
		v.resource(endpointTag, e)
	}
	if !complete {
		checkpoints = nil
	}
	return v.sum(), checkpoints
}

// listenerVersion is typeVersion of lis, spliced from the head, the
// chains' fields and the tail when they make its encoding, else
// encoded whole.
func (t *GatewayTranslator) listenerVersion(lis *listenerv3.Listener, byChain []*portUnit) (string, error) {
	v := newVersionHash()
	if t.splice {
		size := len(t.head) + len(t.tail)
		for _, u := range byChain {
			size += len(u.chainField)
		}
		v.record(listenerTag, size)
		v.write(t.head)
		for _, u := range byChain {
			v.write(u.chainField)
		}
		v.write(t.tail)
		return v.sum(), nil
	}
	enc, err := deterministic.Marshal(lis)
	if err != nil {
		return "", fmt.Errorf("%s %q: encode: %w", listenerTag, lis.GetName(), err)
	}
	v.resource(listenerTag, enc)
	return v.sum(), nil
}

// clone copies a hash's state; a hash that cannot be copied makes no
// checkpoints, and every version is then hashed whole.
func clone(h hash.Hash) (hash.Hash, bool) {
	c, ok := h.(hash.Cloner)
	if !ok {
		return nil, false
	}
	d, err := c.Clone()
	if err != nil {
		return nil, false
	}
	hh, ok := d.(hash.Hash)
	return hh, ok
}

func bySNI(a, b *portUnit) int { return strings.Compare(a.sni, b.sni) }

// versionHash is the hash of a type's version (typeVersion), fed a
// resource at a time: the type and the message, each length-prefixed,
// so no two different lists encode alike.
type versionHash struct {
	h   hash.Hash
	buf []byte
}

// record starts a resource of type typ whose encoding is size bytes.
func (v *versionHash) record(typ string, size int) {
	v.buf = binary.AppendUvarint(v.buf[:0], uint64(len(typ)))
	v.buf = append(v.buf, typ...)
	v.buf = binary.AppendUvarint(v.buf, uint64(size))
	v.h.Write(v.buf)
}

func newVersionHash() versionHash { return versionHash{h: sha256.New()} }

// resource writes one resource of type typ by its encoding.
func (v *versionHash) resource(typ string, enc []byte) {
	v.record(typ, len(enc))
	v.write(enc)
}

func (v *versionHash) write(b []byte) { v.h.Write(b) }

func (v *versionHash) writeString(s string) { _, _ = io.WriteString(v.h, s) }

func (v *versionHash) sum() string { return hex.EncodeToString(v.h.Sum(nil)[:12]) }

// sameForGateway reports whether a and b translate alike: the same key,
// TCP ports with the same numbers and target ports, the same addresses
// with the same readiness in the same localities. What only the rest of
// Isthmus reads (identities, app protocols, port names, counts) may
// differ.
func sameForGateway(a, b *catalog.Service) bool {
	if a.Namespace != b.Namespace || a.Name != b.Name ||
		len(a.Ports) != len(b.Ports) || len(a.Endpoints) != len(b.Endpoints) {
		return false
	}
	for i, p := range a.Ports {
		q := b.Ports[i]
		if p.Port != q.Port || p.Protocol != q.Protocol || p.TargetPort != q.TargetPort {
			return false
		}
	}
	for i, e := range a.Endpoints {
		f := b.Endpoints[i]
		if e.Locality != f.Locality || !slices.Equal(e.Addresses, f.Addresses) {
			return false
		}
	}
	return true
}

// localities gives one Locality message per locality, shared by every
// ClusterLoadAssignment of a translator. There are as many as the
// cluster has zones and subzones.
type localities struct {
	m map[catalog.Locality]*corev3.Locality
}

func (l *localities) get(loc catalog.Locality) *corev3.Locality {
	if m, ok := l.m[loc]; ok {
		return m
	}
	m := &corev3.Locality{Region: loc.Region, Zone: loc.Zone, SubZone: loc.Subzone}
	l.m[loc] = m
	return m
}
