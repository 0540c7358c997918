package xds

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// The inbound listener of a pod depends on the pod: Istio's inbound
// listener has a filter chain per port the pod's Services declare,
// matched on the destination port, so that a port declared HTTP is
// served by the HTTP connection manager (which replaces any
// X-Forwarded-Client-Cert the caller sent) whatever ALPN the caller
// offers, and a port declared TCP by the TCP proxy. Without them, the
// caller's ALPN alone would pick the chain, and a caller with a valid
// SVID that offers "istio" or none on an HTTP port would reach the app
// with the header it wrote.
//
// The ports come from the exporter's declared ports
// (catalog.DeclaredSource: every Service with endpoints, each address
// with its pod), or, without them, from the local and in-cluster
// catalogs. The pods with the same declared ports share a profile: the
// same inbound listener. Every sidecar of the cluster shares one
// snapshot; its listeners are its profile's (profiledSnapshot), chosen
// by the pod of the node ID (then its IP), and the base Listeners when
// the pod declares none.

// DeclaredPort is a port a pod's Services declare: the target port
// number, HTTP or TCP (IsHTTPPort of the Service's port).
type DeclaredPort struct {
	Port uint16
	HTTP bool
}

func (p DeclaredPort) String() string {
	return strconv.Itoa(int(p.Port)) + "/" + protocolName(p.HTTP)
}

// InboundProfiles are the sidecars' listeners that depend on the pod.
// Immutable once made.
type InboundProfiles struct {
	// pods maps a pod IP to its profile's key.
	pods map[podRef]string
	// byKey are the profiles by key.
	byKey map[string]*inboundProfile
	// policies say which pods the federator has not seen but policies
	// may cover (nodeProfile).
	policies *authz.Snapshot
	// Version is a hash of which pod has which profile and of every
	// profile's listeners; it changes when any of them does.
	Version string
}

// inboundProfile is one set of declared ports and the listeners of the
// pods that declare them.
type inboundProfile struct {
	// listeners are the pods' listeners: the inbound one with a chain
	// per port, and the shared outbound one; version is their version.
	listeners []*listenerv3.Listener
	version   string
	pods      int
	// mtls and policies are its pods' policy set's, for /debug/xds:
	// their mutual TLS and AuthorizationPolicies ("" and none without
	// a set).
	mtls     string
	policies []string
}

// ProfileStatus describes one profile in /debug/xds.
type ProfileStatus struct {
	// ListenersVersion is the listener version its sidecars ACK.
	ListenersVersion string `json:"listenersVersion"`
	// Pods counts the pod IPs that have it.
	Pods int `json:"pods"`
	// MTLS is its pods' inbound mutual TLS as their PeerAuthentications
	// say ("STRICT", "PERMISSIVE,9000=STRICT", …), and Policies the
	// AuthorizationPolicies that select them ("namespace/name"); both
	// empty for a profile of declared ports alone.
	MTLS     string   `json:"mtls,omitempty"`
	Policies []string `json:"policies,omitempty"`
}

// podRef names a pod: by namespace/name when its EndpointSlices say
// which pod an address is (catalog.DeclaredSource), else by IP.
type podRef struct {
	pod string
	ip  netip.Addr
}

func comparePodRefs(a, b podRef) int {
	return cmp.Or(strings.Compare(a.pod, b.pod), a.ip.Compare(b.ip))
}

func (r podRef) String() string {
	if r.pod != "" {
		return r.pod
	}
	return r.ip.String()
}

// Profile returns the key of the profile of the pod at ip, known by its
// address ("8080/HTTP,9000/TCP": its declared ports), and whether it has
// one.
func (p *InboundProfiles) Profile(ip netip.Addr) (string, bool) {
	return p.profileOf(podRef{ip: ip.Unmap()})
}

func (p *InboundProfiles) profileOf(r podRef) (string, bool) {
	if p == nil {
		return "", false
	}
	k, ok := p.pods[r]
	return k, ok
}

// nodeProfile is the profile of the node of ID id: its pod's by name
// (pod and namespace of the node ID), else by its IP.
func (p *InboundProfiles) nodeProfile(id string) (string, bool) {
	if p == nil {
		return "", false
	}
	nid, err := nodeid.Parse(id)
	if err != nil {
		return "", false
	}
	if p.policies.Unknown(nid.Namespace, nid.Pod) {
		// Policies may select it, and which is unknown until the
		// federator has seen its pod (its Service's endpoints may
		// name it before): nobody gets in until then.
		return unknownPodKey, true
	}
	ip, ipErr := netip.ParseAddr(nid.IP)
	if k, ok := p.profileOf(podRef{pod: nid.Namespace + "/" + nid.Pod}); ok {
		ports, set := splitProfileKey(k)
		if ports == "" && ipErr == nil {
			// Its policies by name, its declared ports by IP (an
			// address its EndpointSlice names no pod for): the profile
			// with both is made for every such pair.
			if ipKey, ok := p.Profile(ip); ok {
				if both := joinProfileKey(ipKey, set); p.byKey[both] != nil {
					return both, true
				}
			}
		}
		return k, true
	}
	if ipErr == nil {
		return p.Profile(ip)
	}
	return "", false
}

// unknownPodKey is the profile of a pod the policies may cover but that
// the federator has not seen: its inbound chains let nobody in.
var unknownPodKey = joinProfileKey("", unknownPodSet)

// unknownPodSet is the policy set of unknownPodKey; a set's key is
// otherwise hexadecimal.
const unknownPodSet = "unknown-pod"

// Status describes every profile, by key.
func (p *InboundProfiles) Status() map[string]ProfileStatus {
	if p == nil || len(p.byKey) == 0 {
		return nil
	}
	out := make(map[string]ProfileStatus, len(p.byKey))
	for k, pr := range p.byKey {
		out[k] = ProfileStatus{ListenersVersion: pr.version, Pods: pr.pods, MTLS: pr.mtls, Policies: pr.policies}
	}
	return out
}

// Listeners returns the listeners the node of ID id is served: its
// pod's profile's, or nil when it has none (it gets the base ones).
func (p *InboundProfiles) Listeners(id string) []*listenerv3.Listener {
	k, ok := p.nodeProfile(id)
	if !ok {
		return nil
	}
	return p.byKey[k].listeners
}

// declIndex is which ports every pod declares, kept up to date service
// by service: a change of one service costs what its pods are, and one
// that changes no pod's ports (a pod turning ready) nothing more.
type declIndex struct {
	// prev are each catalog's services as last read, in key order
	// (catalog 0 is the local one, 1 the in-cluster one, 2 the declared
	// ports).
	prev [3][]*catalog.Service
	// services are the declarations of each service.
	services map[declKey]*svcDecl
	// selecting are, by pod IP, the services that declare ports for
	// it, in declaration order (compareDeclKeys).
	selecting map[podRef][]declKey
	// keys are each pod's profile key; counts how many pods have each.
	keys   map[podRef]string
	counts map[string]int
	// conflicts are, by pod IP, the ports two of its services declare
	// with different protocols.
	conflicts map[podRef][]Skipped
	// sum is the sum of every pod's (IP, key) hash: it changes when a
	// pod's profile does, at the cost of that pod alone.
	sum [2]uint64
	// changed says that keys changed since the last snapshot of them;
	// skipped is the sorted list of every conflict, made again when
	// conflicts changed.
	changed        bool
	skipped        []Skipped
	skippedChanged bool
}

// declKey is a service of one of the catalogs.
type declKey struct {
	catalog int
	key     catalog.ServiceKey
}

func compareDeclKeys(a, b declKey) int {
	return cmp.Or(cmp.Compare(a.catalog, b.catalog), catalog.CompareKeys(a.key, b.key))
}

// svcDecl is what one service declares: its TCP ports' target ports,
// HTTP or TCP (each number once: the first of the service's ports that
// targets it, by port number), and its endpoints' addresses, ready or
// not (a pod's ports do not depend on its readiness).
type svcDecl struct {
	ports []DeclaredPort
	pods  []podRef
	// skipped is a target port two of its own ports declare with
	// different protocols.
	skipped []Skipped
}

func newDeclIndex() *declIndex {
	return &declIndex{
		services: map[declKey]*svcDecl{}, selecting: map[podRef][]declKey{},
		keys: map[podRef]string{}, counts: map[string]int{}, conflicts: map[podRef][]Skipped{},
	}
}

// declOf reads what svc declares; nil when it declares no port.
func declOf(svc *catalog.Service) *svcDecl {
	d := &svcDecl{}
	for _, p := range svc.Ports {
		if (p.Protocol != "" && p.Protocol != catalog.ProtocolTCP) || p.TargetPort < 1 || p.TargetPort > 65535 {
			continue
		}
		dp := DeclaredPort{Port: uint16(p.TargetPort), HTTP: IsHTTPPort(p)}
		i := slices.IndexFunc(d.ports, func(q DeclaredPort) bool { return q.Port == dp.Port })
		switch {
		case i < 0:
			d.ports = append(d.ports, dp)
		case d.ports[i].HTTP != dp.HTTP:
			d.skipped = append(d.skipped, Skipped{Service: svc.Key().String(), Reason: fmt.Sprintf(
				"port %d targets port %d, which an earlier port declares %s: its inbound chain is %s",
				p.Port, dp.Port, protocolName(d.ports[i].HTTP), protocolName(d.ports[i].HTTP))})
		}
	}
	if len(d.ports) == 0 {
		return nil
	}
	slices.SortFunc(d.ports, func(a, b DeclaredPort) int { return cmp.Compare(a.Port, b.Port) })
	for _, le := range svc.Endpoints {
		for _, a := range le.Addresses {
			if a.Pod != "" {
				d.pods = append(d.pods, podRef{pod: svc.Namespace + "/" + a.Pod})
			} else if ip, err := netip.ParseAddr(a.IP); err == nil {
				d.pods = append(d.pods, podRef{ip: ip.Unmap()})
			}
		}
	}
	slices.SortFunc(d.pods, comparePodRefs)
	d.pods = slices.Compact(d.pods)
	return d
}

func (d *svcDecl) equal(e *svcDecl) bool {
	if d == nil || e == nil {
		return d == e
	}
	return slices.Equal(d.ports, e.ports) && slices.Equal(d.pods, e.pods) && slices.Equal(d.skipped, e.skipped)
}

// read brings the index up to the catalogs' services (each in key
// order; see prev): the services whose entry changed since the last
// read are read again.
func (x *declIndex) read(catalogs [3][]*catalog.Service) {
	dirty := map[podRef]bool{}
	for c, now := range catalogs {
		prev := x.prev[c]
		if len(prev) == len(now) && (len(now) == 0 || &prev[0] == &now[0]) {
			continue
		}
		i, j := 0, 0
		for i < len(prev) || j < len(now) {
			if i < len(prev) && j < len(now) && prev[i] == now[j] {
				// The catalog's Builder keeps the entry of a service
				// that did not change.
				i++
				j++
				continue
			}
			switch {
			case j == len(now) || (i < len(prev) && compareKeys(prev[i], now[j]) < 0):
				x.set(declKey{c, prev[i].Key()}, nil, dirty)
				i++
			case i == len(prev) || compareKeys(prev[i], now[j]) > 0:
				x.set(declKey{c, now[j].Key()}, declOf(now[j]), dirty)
				j++
			default:
				x.set(declKey{c, now[j].Key()}, declOf(now[j]), dirty)
				i++
				j++
			}
		}
		x.prev[c] = now
	}
	for ip := range dirty {
		x.redo(ip)
	}
}

// set makes d the declaration of k, marking in dirty the pods whose
// services changed.
func (x *declIndex) set(k declKey, d *svcDecl, dirty map[podRef]bool) {
	old := x.services[k]
	if old.equal(d) {
		return
	}
	if old != nil {
		if len(old.skipped) > 0 {
			x.skippedChanged = true
		}
		for _, ip := range old.pods {
			x.selecting[ip] = slices.DeleteFunc(x.selecting[ip], func(o declKey) bool { return o == k })
			dirty[ip] = true
		}
	}
	if d == nil {
		delete(x.services, k)
		return
	}
	if len(d.skipped) > 0 {
		x.skippedChanged = true
	}
	x.services[k] = d
	for _, ip := range d.pods {
		list := x.selecting[ip]
		i, _ := slices.BinarySearchFunc(list, k, compareDeclKeys)
		x.selecting[ip] = slices.Insert(list, i, k)
		dirty[ip] = true
	}
}

// redo computes the profile of the pod at ip from its services: each
// port as the first service that declares it says.
func (x *declIndex) redo(ip podRef) {
	var ports []DeclaredPort
	var by []catalog.ServiceKey
	var conflicts []Skipped
	for _, k := range x.selecting[ip] {
		for _, p := range x.services[k].ports {
			i := slices.IndexFunc(ports, func(q DeclaredPort) bool { return q.Port == p.Port })
			switch {
			case i < 0:
				ports = append(ports, p)
				by = append(by, k.key)
			case ports[i].HTTP != p.HTTP:
				conflicts = append(conflicts, Skipped{Service: k.key.String(), Reason: fmt.Sprintf(
					"target port %d is %s here but %s in %s, which comes first, for pods both select: their inbound chain for it is %s",
					p.Port, protocolName(p.HTTP), protocolName(ports[i].HTTP), by[i], protocolName(ports[i].HTTP))})
			}
		}
	}
	if len(x.selecting[ip]) == 0 {
		delete(x.selecting, ip)
	}
	if !slices.Equal(conflicts, x.conflicts[ip]) {
		x.skippedChanged = true
		if len(conflicts) == 0 {
			delete(x.conflicts, ip)
		} else {
			x.conflicts[ip] = conflicts
		}
	}
	key := ""
	if len(ports) > 0 {
		slices.SortFunc(ports, func(a, b DeclaredPort) int { return cmp.Compare(a.Port, b.Port) })
		var kb strings.Builder
		for i, p := range ports {
			if i > 0 {
				kb.WriteByte(',')
			}
			kb.WriteString(p.String())
		}
		key = kb.String()
	}
	old, had := x.keys[ip]
	if old == key && had == (key != "") {
		return
	}
	x.changed = true
	if had {
		x.addSum(ip, old, false)
		if x.counts[old]--; x.counts[old] == 0 {
			delete(x.counts, old)
		}
		delete(x.keys, ip)
	}
	if key != "" {
		x.addSum(ip, key, true)
		x.counts[key]++
		x.keys[ip] = key
	}
}

// addSum adds the pod's hash to sum, or takes it away.
func (x *declIndex) addSum(ip podRef, key string, add bool) {
	x.sum = addPodSum(x.sum, ip, key, add)
}

// addPodSum is sum with the hash of the pod and key added, or taken
// away.
func addPodSum(sum [2]uint64, ip podRef, key string, add bool) [2]uint64 {
	h := sha256.New()
	addr, _ := ip.ip.MarshalBinary()
	h.Write(addr)
	h.Write([]byte{0})
	h.Write([]byte(ip.pod))
	h.Write([]byte{0})
	h.Write([]byte(key))
	var hash [sha256.Size]byte
	h.Sum(hash[:0])
	a, b := binary.BigEndian.Uint64(hash[0:8]), binary.BigEndian.Uint64(hash[8:16])
	if add {
		return [2]uint64{sum[0] + a, sum[1] + b}
	}
	return [2]uint64{sum[0] - a, sum[1] - b}
}

// skippedList is every conflict, sorted, without duplicates.
func (x *declIndex) skippedList() []Skipped {
	if !x.skippedChanged {
		return x.skipped
	}
	var out []Skipped
	for _, d := range x.services {
		out = append(out, d.skipped...)
	}
	for _, c := range x.conflicts {
		out = append(out, c...)
	}
	slices.SortFunc(out, compareSkipped)
	x.skipped, x.skippedChanged = slices.Compact(out), false
	return x.skipped
}

// profileMaker makes the profiles' listeners, keeping each while the
// base listeners stay the same.
type profileMaker struct {
	base string
	// outbound is the outbound listener the profiles in made serve: a
	// translation may make it again with the same content (base).
	outbound *listenerv3.Listener
	made     map[string]*inboundProfile
	pods     map[podRef]string
	counts   map[string]int
	last     *InboundProfiles
	valid    bool
	// policies are the AuthorizationPolicies the profiles were made
	// with; rbac their translations by set key, and policySum the sum
	// of every selected pod's (pod, set key) hash.
	policies  *authz.Snapshot
	localTD   string
	rbac      map[string]*setRBAC
	policySum [2]uint64
	// notes are what the policies in use do not enforce as written.
	notes []Skipped
}

// setRBAC is a policy set's RBAC for TCP chains (per connection) and
// for HTTP chains (per request), and its pods' mutual TLS (the ports
// that take plaintext too).
type setRBAC struct {
	conn, req *authz.RBAC
	mtls      authz.MTLS
	// policies name the set's AuthorizationPolicies, for /debug/xds.
	policies []string
}

// authzSep separates a profile key's declared ports from the key of
// the pods' AuthorizationPolicies: "8080/HTTP;authz=<set>", or
// "authz=<set>" for a pod that declares no port.
const authzSep = "authz="

// joinProfileKey is the key of a pod with declared ports ports (a
// profile key) and the policy set set (empty when none selects it).
func joinProfileKey(ports, set string) string {
	switch {
	case set == "":
		return ports
	case ports == "":
		return authzSep + set
	}
	return ports + ";" + authzSep + set
}

// splitProfileKey is joinProfileKey's inverse.
func splitProfileKey(key string) (ports, set string) {
	if rest, ok := strings.CutPrefix(key, authzSep); ok {
		return "", rest
	}
	ports, set, _ = strings.Cut(key, ";"+authzSep)
	return ports, set
}

// profiles returns the profiles of x's pods, and of the pods policies
// selects (whose sidecars enforce them; localTD is the local trust
// domain), for the base listeners inbound and outbound at version base:
// the last ones when none of it changed. notes are what the policies do
// not enforce as written.
func (m *profileMaker) profiles(x *declIndex, policies *authz.Snapshot, localTD string, inbound, outbound *listenerv3.Listener, base string) (p *InboundProfiles, notes []Skipped, err error) {
	if m.valid && !x.changed && m.base == base && m.outbound == outbound && m.policies == policies && m.localTD == localTD {
		return m.last, m.notes, nil
	}
	if m.policies != policies || m.localTD != localTD || x.changed || m.pods == nil {
		m.assign(x, policies, localTD)
	}
	if len(m.counts) == 0 {
		m.base, m.outbound, m.made, m.last, m.valid, x.changed = base, outbound, nil, nil, true, false
		return nil, m.notes, nil
	}
	switch {
	case m.base != base || m.made == nil:
		m.made = map[string]*inboundProfile{}
	case m.outbound != outbound:
		// The same content made again: served as the one the other
		// listeners name, not encoded again.
		for k, pr := range m.made {
			cp := *pr
			cp.listeners = []*listenerv3.Listener{pr.listeners[0], outbound}
			m.made[k] = &cp
		}
	}
	httpChain, tcpChain, err := inboundTemplates(inbound)
	if err != nil {
		return nil, nil, err
	}
	p = &InboundProfiles{pods: m.pods, byKey: make(map[string]*inboundProfile, len(m.counts)), policies: policies}
	v := newVersionHash()
	sum := binary.BigEndian.AppendUint64(nil, x.sum[0])
	sum = binary.BigEndian.AppendUint64(sum, x.sum[1])
	if m.policySum != [2]uint64{} || policies.Covers() {
		// Which pod has which policies, and which pods are known:
		// only when policies cover some, so that the versions without
		// policies stay what they were.
		sum = binary.BigEndian.AppendUint64(sum, m.policySum[0])
		sum = binary.BigEndian.AppendUint64(sum, m.policySum[1])
		sum = binary.BigEndian.AppendUint64(sum, policies.KnownSum())
	}
	v.record("pods", len(sum))
	v.write(sum)
	for _, key := range slices.Sorted(maps.Keys(m.counts)) {
		pr := m.made[key]
		if pr == nil {
			pr, err = m.makeProfile(key, inbound, outbound, base, httpChain, tcpChain)
			if err != nil {
				return nil, nil, err
			}
			m.made[key] = pr
		}
		// A profile is shared by every InboundProfiles made while the
		// base listeners stay; only its count is each one's.
		cp := *pr
		cp.pods = m.counts[key]
		p.byKey[key] = &cp
		v.record(key, len(pr.version))
		v.writeString(pr.version)
	}
	for key := range m.made {
		if _, ok := m.counts[key]; !ok {
			delete(m.made, key)
		}
	}
	p.Version = v.sum()
	m.base, m.outbound, m.last, m.valid, x.changed = base, outbound, p, true, false
	return p, m.notes, nil
}

// assign makes m.pods and m.counts each pod's profile key: its declared
// ports' (x) joined with the key of the policies that select it, and
// translates the policy sets in use.
func (m *profileMaker) assign(x *declIndex, policies *authz.Snapshot, localTD string) {
	if m.policies != policies || m.localTD != localTD {
		m.policies, m.localTD = policies, localTD
		m.policySum = [2]uint64{}
		rbac := map[string]*setRBAC{}
		for ref, set := range policies.Pods() {
			m.policySum = addPodSum(m.policySum, podRef{pod: ref}, set.Key, true)
			if _, ok := rbac[set.Key]; ok {
				continue
			}
			if n := m.rbac[set.Key]; n != nil {
				rbac[set.Key] = n
			} else {
				n := &setRBAC{conn: authz.Translate(set, localTD, authz.Connection), req: authz.Translate(set, localTD, authz.Request), mtls: set.MTLS}
				for _, p := range set.Policies {
					n.policies = append(n.policies, p.Ref())
				}
				rbac[set.Key] = n
			}
		}
		if policies.Covers() {
			rbac[unknownPodSet] = &setRBAC{conn: authz.DenyAll(authz.Connection), req: authz.DenyAll(authz.Request)}
		}
		m.rbac = rbac
		m.notes = nil
		for _, n := range rbac {
			for _, note := range slices.Concat(n.conn.Notes, n.req.Notes) {
				m.notes = append(m.notes, Skipped{Service: "AuthorizationPolicy " + note.Policy, Reason: note.Reason})
			}
		}
		for _, note := range policies.PeerNotes() {
			m.notes = append(m.notes, Skipped{Service: "PeerAuthentication " + note.Policy, Reason: note.Reason})
		}
		slices.SortFunc(m.notes, compareSkipped)
		m.notes = slices.Compact(m.notes)
	}
	if len(m.rbac) == 0 {
		m.pods, m.counts = maps.Clone(x.keys), maps.Clone(x.counts)
		return
	}
	defer func() {
		// The profiles a pod may be served without a pod of its own:
		// an unknown pod's, and each policy set with each declared
		// ports of pods known by IP only (nodeProfile).
		if policies.Covers() {
			m.counts[unknownPodKey] += 0
		}
		byIP := map[string]bool{}
		for r, ports := range x.keys {
			if r.pod == "" {
				byIP[ports] = true
			}
		}
		for ports := range byIP {
			for set := range m.rbac {
				if set != unknownPodSet {
					m.counts[joinProfileKey(ports, set)] += 0
				}
			}
		}
	}()
	m.pods = maps.Clone(x.keys)
	// Few distinct keys, many pods: each joined key is made once.
	joined := map[[2]string]string{}
	for ref, set := range policies.Pods() {
		r := podRef{pod: ref}
		pair := [2]string{m.pods[r], set.Key}
		k, ok := joined[pair]
		if !ok {
			k = joinProfileKey(pair[0], pair[1])
			joined[pair] = k
		}
		m.pods[r] = k
	}
	m.counts = make(map[string]int, len(x.counts)+len(m.rbac))
	for _, k := range m.pods {
		m.counts[k]++
	}
}

// makeProfile makes the listeners of the profile key.
func (m *profileMaker) makeProfile(key string, inbound, outbound *listenerv3.Listener, base string, httpChain, tcpChain *listenerv3.FilterChain) (*inboundProfile, error) {
	portsKey, setKey := splitProfileKey(key)
	var ports []DeclaredPort
	if portsKey != "" {
		for _, f := range strings.Split(portsKey, ",") {
			n, proto, _ := strings.Cut(f, "/")
			port, err := strconv.ParseUint(n, 10, 16)
			if err != nil {
				return nil, fmt.Errorf("profile %q: %w", key, err)
			}
			ports = append(ports, DeclaredPort{Port: uint16(port), HTTP: proto == protocolName(true)})
		}
	}
	var rbac chainRBAC
	var mtls authz.MTLS
	var policies []string
	if setKey != "" {
		n := m.rbac[setKey]
		if n == nil {
			return nil, fmt.Errorf("profile %q: no policy set %q", key, setKey)
		}
		var err error
		if rbac.tcp, err = n.conn.Filters(); err != nil {
			return nil, fmt.Errorf("profile %q: %w", key, err)
		}
		if rbac.http, err = n.req.HTTPFilters(); err != nil {
			return nil, fmt.Errorf("profile %q: %w", key, err)
		}
		mtls, policies = n.mtls, n.policies
	}
	l, err := profileInbound(inbound, ports, rbac, mtls, httpChain, tcpChain)
	if err != nil {
		return nil, fmt.Errorf("profile %q: %w", key, err)
	}
	enc, err := encode(listenerTag, l.GetName(), l)
	if err != nil {
		return nil, fmt.Errorf("inbound listener of %s: %w", key, err)
	}
	v := newVersionHash()
	v.record(listenerTag, len(base))
	v.writeString(base)
	v.resource(listenerTag, enc)
	pr := &inboundProfile{listeners: []*listenerv3.Listener{l, outbound}, version: v.sum(), policies: policies}
	if setKey != "" {
		pr.mtls = mtls.String()
	}
	return pr, nil
}

// inboundTemplates finds the base inbound listener's HTTP chain (the one
// listing the istio-http ALPNs) and TCP chain (the one listing none).
func inboundTemplates(inbound *listenerv3.Listener) (httpChain, tcpChain *listenerv3.FilterChain, err error) {
	for _, fc := range inbound.GetFilterChains() {
		if len(fc.GetFilterChainMatch().GetApplicationProtocols()) == 0 {
			tcpChain = fc
		} else {
			httpChain = fc
		}
	}
	if httpChain == nil || tcpChain == nil {
		return nil, nil, fmt.Errorf("listener %q lacks its HTTP or TCP chain", InboundListenerName)
	}
	return httpChain, tcpChain, nil
}

// chainRBAC are a pod's RBAC filters: the network ones of its TCP
// chains, and the HTTP ones of its HTTP chains' connection manager.
type chainRBAC struct {
	tcp  []*listenerv3.Filter
	http []*hcmv3.HttpFilter
}

// profileInbound is inbound with, before its own chains, a chain per
// port: transport "tls" on that destination port, with the HTTP chain's
// connection manager or the TCP chain's proxy, and the same TLS. Envoy
// matches the destination port before the ALPN, as the Go sidecar does.
// Every chain enforces the rbac filters (the pod's
// AuthorizationPolicies), when there are any: a TCP chain's start its
// filters, an HTTP chain's its connection manager's HTTP filters.
//
// Where mtls (the pod's PeerAuthentications) makes a port PERMISSIVE,
// its group of chains gains a plaintext one, as Istio's inbound listener
// has: transport "raw_buffer", the same filters, no TLS. Envoy matches
// the transport after the destination port, so a STRICT port's group,
// which has none, refuses plaintext whatever the other ports take. A
// port whose mode differs from the pod's and that no Service declares
// gets a group of its own: the base chains on that port. Plaintext on a
// port no Service declares is proxied as TCP: the HTTP chains are chosen
// by the ALPN a plaintext caller does not send (Istio would sniff HTTP).
func profileInbound(inbound *listenerv3.Listener, ports []DeclaredPort, rbac chainRBAC, mtls authz.MTLS, httpChain, tcpChain *listenerv3.FilterChain) (*listenerv3.Listener, error) {
	// The templates' filters, with the RBAC filters, made once.
	tcpFilters := withRBAC(rbac.tcp, tcpChain.GetFilters())
	httpFilters, err := withHTTPRBAC(rbac.http, httpChain.GetFilters())
	if err != nil {
		return nil, err
	}
	filtersOf := func(fc *listenerv3.FilterChain) []*listenerv3.Filter {
		if fc == httpChain {
			return httpFilters
		}
		return tcpFilters
	}
	plaintext := func(port uint16, from *listenerv3.FilterChain) *listenerv3.FilterChain {
		match := &listenerv3.FilterChainMatch{TransportProtocol: rawBufferTransport}
		if port != 0 {
			match.DestinationPort = wrapperspb.UInt32(uint32(port))
		}
		return &listenerv3.FilterChain{FilterChainMatch: match, Filters: filtersOf(from)}
	}
	chains := make([]*listenerv3.FilterChain, 0, 2*len(ports)+len(inbound.GetFilterChains())+1)
	declared := make(map[uint16]bool, len(ports))
	for _, p := range ports {
		declared[p.Port] = true
		from := tcpChain
		if p.HTTP {
			from = httpChain
		}
		chains = append(chains, &listenerv3.FilterChain{
			FilterChainMatch: &listenerv3.FilterChainMatch{
				DestinationPort:   wrapperspb.UInt32(uint32(p.Port)),
				TransportProtocol: "tls",
			},
			Filters:         filtersOf(from),
			TransportSocket: from.GetTransportSocket(),
		})
		if mtls.PortMode(p.Port) == authz.Permissive {
			chains = append(chains, plaintext(p.Port, from))
		}
	}
	for _, port := range mtls.Ports() {
		if declared[port] {
			continue
		}
		for _, fc := range inbound.GetFilterChains() {
			match := proto.Clone(fc.GetFilterChainMatch()).(*listenerv3.FilterChainMatch)
			match.DestinationPort = wrapperspb.UInt32(uint32(port))
			chains = append(chains, &listenerv3.FilterChain{FilterChainMatch: match, Filters: filtersOf(fc), TransportSocket: fc.GetTransportSocket()})
		}
		if mtls.PortMode(port) == authz.Permissive {
			chains = append(chains, plaintext(port, tcpChain))
		}
	}
	for _, fc := range inbound.GetFilterChains() {
		if len(rbac.tcp) > 0 || len(rbac.http) > 0 {
			fc = &listenerv3.FilterChain{
				FilterChainMatch: fc.GetFilterChainMatch(),
				Filters:          filtersOf(fc),
				TransportSocket:  fc.GetTransportSocket(),
			}
		}
		chains = append(chains, fc)
	}
	if mtls.Mode == authz.Permissive {
		chains = append(chains, plaintext(0, tcpChain))
	}
	return &listenerv3.Listener{
		Name:            inbound.GetName(),
		Address:         inbound.GetAddress(),
		ListenerFilters: inbound.GetListenerFilters(),
		FilterChains:    chains,
	}, nil
}

// rawBufferTransport is the transport_protocol Envoy's tls_inspector
// gives a connection that does not start with a TLS ClientHello.
const rawBufferTransport = "raw_buffer"

// withRBAC is filters after rbac, in a new slice when rbac has any.
func withRBAC(rbac, filters []*listenerv3.Filter) []*listenerv3.Filter {
	if len(rbac) == 0 {
		return filters
	}
	return slices.Concat(rbac, filters)
}

// withHTTPRBAC is filters (an HTTP chain's: its connection manager)
// with rbac before the connection manager's own HTTP filters; filters
// itself when rbac is empty.
func withHTTPRBAC(rbac []*hcmv3.HttpFilter, filters []*listenerv3.Filter) ([]*listenerv3.Filter, error) {
	if len(rbac) == 0 {
		return filters, nil
	}
	out := slices.Clone(filters)
	for i, f := range out {
		if f.GetName() != wellknown.HTTPConnectionManager {
			continue
		}
		hcm := new(hcmv3.HttpConnectionManager)
		if err := f.GetTypedConfig().UnmarshalTo(hcm); err != nil {
			return nil, fmt.Errorf("inbound HTTP connection manager: %w", err)
		}
		hcm.HttpFilters = slices.Concat(rbac, hcm.GetHttpFilters())
		cfg := new(anypb.Any)
		if err := anypb.MarshalFrom(cfg, hcm, proto.MarshalOptions{Deterministic: true}); err != nil {
			return nil, fmt.Errorf("inbound HTTP connection manager: %w", err)
		}
		out[i] = &listenerv3.Filter{Name: f.GetName(), ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: cfg}}
		return out, nil
	}
	return nil, fmt.Errorf("inbound HTTP chain without %s", wellknown.HTTPConnectionManager)
}

// profileState is what a translation keeps of the pods' profiles.
type profileState struct {
	index *declIndex
	maker profileMaker
	// declared and declaredServices are the declared ports last read,
	// and their services in key order.
	declared         *catalog.Snapshot
	declaredServices []*catalog.Service
}

// withProfiles adds to res the profiles of the pods the catalogs
// declare ports for, as st last saw them, and their conflicts to
// skipped (sorted, without duplicates; skipped itself is not
// modified). The declared ports, when given, are read alone: every
// Service with endpoints is there, exported or in-cluster ones too.
func (st *profileState) withProfiles(res Resources, skipped []Skipped, local, inCluster []*catalog.Service, declared *catalog.Snapshot, policies *authz.Snapshot, localTD string) (Resources, []Skipped, error) {
	if st.index == nil {
		st.index = newDeclIndex()
	}
	if declared != nil {
		if declared != st.declared {
			st.declared, st.declaredServices = declared, servicesOf(declared)
		}
		local, inCluster = nil, nil
	}
	st.index.read([3][]*catalog.Service{local, inCluster, st.declaredServices})
	profiles, notes, err := st.maker.profiles(st.index, policies, localTD, res.Listeners[0], res.Listeners[1], res.ListenersVersion)
	if err != nil {
		return Resources{}, nil, err
	}
	res.Inbound = profiles
	res.combine()
	if more := st.index.skippedList(); len(more) > 0 || len(notes) > 0 {
		skipped = slices.Concat(skipped, more, notes)
		slices.SortFunc(skipped, compareSkipped)
		skipped = slices.Compact(skipped)
	}
	return res, skipped, nil
}

// withProfiles is profileState.withProfiles from nothing, for the
// catalogs (nil ones are empty).
func withProfiles(res Resources, skipped []Skipped, local, inCluster, declared *catalog.Snapshot, policies *authz.Snapshot, localTD string) (Resources, []Skipped, error) {
	var st profileState
	return st.withProfiles(res, skipped, servicesOf(local), servicesOf(inCluster), declared, policies, localTD)
}

// servicesOf are snap's services in key order; none for nil.
func servicesOf(snap *catalog.Snapshot) []*catalog.Service {
	if snap == nil {
		return nil
	}
	out := make([]*catalog.Service, 0, snap.Len())
	for svc := range snap.All() {
		out = append(out, svc)
	}
	return out
}

// profiledSnapshot is the sidecars' snapshot: a pod with a profile is
// served its profile's listeners (encodedCache asks variant), every
// other type and pod the snapshot's own.
type profiledSnapshot struct {
	*cache.Snapshot
	profiles *InboundProfiles
	// listeners are each profile's listeners as the cache takes them.
	listeners map[string]map[string]types.ResourceWithTTL
}

// profiled returns snap serving profiles; snap itself when there are
// none.
func profiled(snap *cache.Snapshot, profiles *InboundProfiles) cache.ResourceSnapshot {
	if profiles == nil || len(profiles.byKey) == 0 {
		return snap
	}
	s := &profiledSnapshot{Snapshot: snap, profiles: profiles, listeners: make(map[string]map[string]types.ResourceWithTTL, len(profiles.byKey))}
	for k, pr := range profiles.byKey {
		m := make(map[string]types.ResourceWithTTL, len(pr.listeners))
		for _, l := range pr.listeners {
			m[l.GetName()] = types.ResourceWithTTL{Resource: l}
		}
		s.listeners[k] = m
	}
	return s
}

// variant returns the listeners of node's profile, named by the
// profile's key; ok is false for any other type, or a node whose pod
// IP has no profile.
func (s *profiledSnapshot) variant(node *corev3.Node, typeURL string) (name string, res map[string]types.ResourceWithTTL, version string, ok bool) {
	if typeURL != resource.ListenerType {
		return "", nil, "", false
	}
	k, ok := s.profiles.nodeProfile(node.GetId())
	if !ok {
		return "", nil, "", false
	}
	return k, s.listeners[k], s.profiles.byKey[k].version, true
}

// hasVariant reports whether name is one of the snapshot's variants.
func (s *profiledSnapshot) hasVariant(name string) bool {
	_, ok := s.listeners[name]
	return ok
}

// Make sure the cache sees the variants.
var _ variedSnapshot = (*profiledSnapshot)(nil)
