package kube

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	networkingapi "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
)

// Labels and names of the objects the import writer owns.
const (
	// LabelManagedBy marks what Isthmus wrote. The import writer changes and
	// deletes only objects carrying it with the value ManagedByIsthmus.
	LabelManagedBy = "app.kubernetes.io/managed-by"
	// ManagedByIsthmus is LabelManagedBy's value on Isthmus's objects.
	ManagedByIsthmus = "isthmus"
	// LabelSourceCluster, on a ServiceEntry endpoint, names the peer cluster
	// the endpoint leads to (the MCS well-known label).
	LabelSourceCluster = mcsv1alpha1.LabelSourceCluster
	// LabelServiceName names the imported service, on the ServiceEntry, the
	// ServiceImport and every endpoint (the MCS well-known label).
	LabelServiceName = mcsv1alpha1.LabelServiceName
	// ClusterSetDomain is the DNS zone of imported services:
	// <service>.<namespace>.svc.clusterset.local (KEP-1645).
	ClusterSetDomain = "clusterset.local"
)

// Limits of the ServiceEntry CRD (istio.io/api, networking.istio.io_serviceentries):
// spec.endpoints has maxItems 4096, and each endpoint's ports map has
// maxProperties 128 (one entry per ServiceEntry port).
const (
	maxServiceEntryEndpoints = 4096
	maxServiceEntryPorts     = 128
)

// ServiceEntryName is the name of the ServiceEntry that imports the service
// called name: "<name>.clusterset.local", in the service's own namespace.
// It reads as the service's clusterset host without the namespace (which
// the object's namespace already says), cannot be mistaken for a Kubernetes
// Service name (those have no dots), and is a valid DNS subdomain for every
// valid Service name.
func ServiceEntryName(name string) string { return name + "." + ClusterSetDomain }

// ClusterSetHost is the host an imported service is reached at.
func ClusterSetHost(key catalog.ServiceKey) string {
	return key.Name + "." + key.Namespace + ".svc." + ClusterSetDomain
}

// SkippedImport is one thing the import writer could not write for a peer's
// service, and why. A service can have several.
type SkippedImport struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Reason    string `json:"reason"`
}

func compareSkipped(a, b SkippedImport) int {
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name), strings.Compare(a.Reason, b.Reason))
}

// skipList collects SkippedImports by peer.
type skipList map[string][]SkippedImport

func (s skipList) add(peer string, key catalog.ServiceKey, format string, args ...any) {
	s[peer] = append(s[peer], SkippedImport{Namespace: key.Namespace, Name: key.Name, Reason: fmt.Sprintf(format, args...)})
}

func (s skipList) addAll(peers []string, key catalog.ServiceKey, format string, args ...any) {
	for _, p := range peers {
		s.add(p, key, format, args...)
	}
}

// normalize sorts each peer's list and drops duplicates and empty peers.
func (s skipList) normalize() map[string][]SkippedImport {
	out := make(map[string][]SkippedImport, len(s))
	for peer, list := range s {
		if len(list) == 0 {
			continue
		}
		list = slices.Clone(list)
		slices.SortFunc(list, compareSkipped)
		out[peer] = slices.Compact(list)
	}
	return out
}

// importedService is what the writer wants in the cluster for one service
// that at least one peer exports.
type importedService struct {
	key catalog.ServiceKey
	// peers export the service (sorted).
	peers []string
	se    *networkingv1.ServiceEntry
	si    *mcsv1alpha1.ServiceImport
}

// importPlan is the whole desired state: the services to write, sorted by
// key, and what cannot be written.
type importPlan struct {
	services []*importedService
	skipped  skipList
}

// peerService is one peer's copy of a service.
type peerService struct {
	peer string
	svc  *catalog.Service
}

// planImports translates the imported catalog into the objects to write.
// It is a pure function of its arguments: the same catalog gives the same
// objects, field for field and in the same order, so an unchanged catalog
// never causes a write. Sources named catalog.LocalSource or cluster are not
// peers and are ignored. namespaceProblem returns why nothing can be
// imported into a namespace, or "" when imports may land there.
func planImports(cluster string, snaps []*catalog.Snapshot, namespaceProblem func(ns string) string) importPlan {
	byKey := map[catalog.ServiceKey][]peerService{}
	for _, snap := range snaps {
		peer := snap.Source()
		if peer == catalog.LocalSource || peer == cluster {
			continue
		}
		for svc := range snap.All() {
			byKey[svc.Key()] = append(byKey[svc.Key()], peerService{peer: peer, svc: svc})
		}
	}
	plan := importPlan{skipped: skipList{}}
	for _, key := range slices.SortedFunc(maps.Keys(byKey), func(a, b catalog.ServiceKey) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	}) {
		copies := byKey[key]
		slices.SortFunc(copies, func(a, b peerService) int { return strings.Compare(a.peer, b.peer) })
		if is := planService(key, copies, namespaceProblem, plan.skipped); is != nil {
			plan.services = append(plan.services, is)
		}
	}
	return plan
}

// importPort is one port of the imported service.
type importPort struct {
	name        string // unique, a DNS-1123 label
	number      int32
	protocol    string // Istio's: HTTP, HTTP2, GRPC, TLS or TCP
	appProtocol string
	peer        string // whose definition this is
}

// planService builds the ServiceEntry and ServiceImport for one service,
// or returns nil (with the reasons in skipped) when nothing can be written.
func planService(key catalog.ServiceKey, copies []peerService, namespaceProblem func(string) string, skipped skipList) *importedService {
	peers := make([]string, len(copies))
	for i, c := range copies {
		peers[i] = c.peer
	}
	if msgs := validation.IsDNS1123Label(key.Namespace); len(msgs) > 0 {
		skipped.addAll(peers, key, "namespace %q is not a valid namespace name: %s", key.Namespace, strings.Join(msgs, "; "))
		return nil
	}
	if msgs := validation.IsDNS1035Label(key.Name); len(msgs) > 0 {
		skipped.addAll(peers, key, "%q is not a valid Service name: %s", key.Name, strings.Join(msgs, "; "))
		return nil
	}
	if reason := namespaceProblem(key.Namespace); reason != "" {
		skipped.addAll(peers, key, "%s", reason)
		return nil
	}

	ports := unionPorts(key, copies, skipped)
	if len(ports) == 0 {
		skipped.addAll(peers, key, "no TCP port to import")
		return nil
	}
	if len(ports) > maxServiceEntryPorts {
		skipped.addAll(peers, key, "%d ports: a ServiceEntry endpoint carries at most %d", len(ports), maxServiceEntryPorts)
		return nil
	}

	var endpoints []*networkingapi.WorkloadEntry
	var sans []string
	static := true
	for _, c := range copies {
		sans = append(sans, c.svc.Identities...)
		gws := parseGateways(key, c, skipped)
		for _, loc := range c.svc.Endpoints {
			for i, gw := range gws {
				w := share(loc.Ready, len(gws), i)
				if w == 0 {
					// Istio reads weight 0 as "unset" and gives the
					// endpoint weight 1, so a drained locality (or a
					// gateway whose share rounds to nothing) gets no
					// endpoint at all rather than a weight of 0.
					continue
				}
				ep := &networkingapi.WorkloadEntry{
					Address:  gw.host,
					Ports:    make(map[string]uint32, len(ports)),
					Labels:   map[string]string{LabelSourceCluster: c.peer, LabelServiceName: key.Name},
					Network:  c.peer,
					Locality: loc.Locality.String(),
					Weight:   w,
				}
				for _, p := range ports {
					ep.Ports[p.name] = gw.port
				}
				endpoints = append(endpoints, ep)
				static = static && gw.ip
			}
		}
	}
	if len(endpoints) > maxServiceEntryEndpoints {
		skipped.addAll(peers, key, "%d endpoints (peers × gateways × localities): a ServiceEntry holds at most %d", len(endpoints), maxServiceEntryEndpoints)
		return nil
	}
	slices.Sort(sans)
	sans = slices.Compact(sans)

	se := &networkingv1.ServiceEntry{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: key.Namespace,
			Name:      ServiceEntryName(key.Name),
			Labels:    map[string]string{LabelManagedBy: ManagedByIsthmus, LabelServiceName: key.Name},
		},
	}
	se.Spec.Hosts = []string{ClusterSetHost(key)}
	se.Spec.Location = networkingapi.ServiceEntry_MESH_INTERNAL
	se.Spec.Resolution = networkingapi.ServiceEntry_DNS
	if static {
		se.Spec.Resolution = networkingapi.ServiceEntry_STATIC
	}
	se.Spec.SubjectAltNames = sans
	se.Spec.Endpoints = endpoints
	for _, p := range ports {
		se.Spec.Ports = append(se.Spec.Ports, &networkingapi.ServicePort{Number: uint32(p.number), Protocol: p.protocol, Name: p.name})
	}

	si := &mcsv1alpha1.ServiceImport{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: key.Namespace,
			Name:      key.Name,
			Labels:    map[string]string{LabelManagedBy: ManagedByIsthmus, LabelServiceName: key.Name},
		},
		Spec: mcsv1alpha1.ServiceImportSpec{Type: mcsv1alpha1.ClusterSetIP},
	}
	for _, p := range ports {
		sp := mcsv1alpha1.ServicePort{Name: p.name, Protocol: corev1.ProtocolTCP, Port: p.number}
		if p.appProtocol != "" {
			sp.AppProtocol = new(p.appProtocol)
		}
		si.Spec.Ports = append(si.Spec.Ports, sp)
	}
	for _, p := range peers {
		si.Status.Clusters = append(si.Status.Clusters, mcsv1alpha1.ClusterStatus{Cluster: p})
	}
	return &importedService{key: key, peers: peers, se: se, si: si}
}

// unionPorts merges the peers' ports by number. Peers are visited in name
// order and the first definition of a number wins; a later peer that
// disagrees is told so in skipped. Only TCP ports are imported: a
// ServiceEntry port is always TCP-based (Istio has no UDP or SCTP
// protocol), and the east-west gateway routes TLS by SNI, so UDP and SCTP
// ports are skipped with a reason.
func unionPorts(key catalog.ServiceKey, copies []peerService, skipped skipList) []importPort {
	// Longer names (a Service port name may have 63 characters) fall back
	// to <protocol>-<port> too: Istio's ServiceEntry CRD refuses them as
	// endpoint port keys, and with them the whole object every peer's
	// endpoints share.
	const maxEndpointPortName = 62
	byNumber := map[int32]*importPort{}
	for _, c := range copies {
		for _, p := range c.svc.Ports {
			proto := p.Protocol
			if proto == "" {
				proto = catalog.ProtocolTCP
			}
			if proto != catalog.ProtocolTCP {
				skipped.add(c.peer, key, "port %d/%s not imported: ServiceEntry ports carry only TCP-based protocols", p.Port, proto)
				continue
			}
			ip := importPort{name: p.Name, number: p.Port, protocol: istioProtocol(p), appProtocol: p.AppProtocol, peer: c.peer}
			if first, ok := byNumber[p.Port]; ok {
				if first.name != ip.name || first.protocol != ip.protocol || first.appProtocol != ip.appProtocol {
					skipped.add(c.peer, key, "port %d defined differently (name %q, protocol %s) than by peer %s (name %q, protocol %s); %s's definition is used",
						p.Port, ip.name, ip.protocol, first.peer, first.name, first.protocol, first.peer)
				}
				continue
			}
			byNumber[p.Port] = &ip
		}
	}
	numbers := slices.Sorted(maps.Keys(byNumber))
	out := make([]importPort, 0, len(numbers))
	taken := map[string]bool{}
	for _, n := range numbers {
		p := *byNumber[n]
		name := p.name
		if name == "" || len(validation.IsDNS1123Label(name)) > 0 || len(name) > maxEndpointPortName || taken[name] {
			name = strings.ToLower(p.protocol) + "-" + strconv.Itoa(int(p.number))
		}
		if taken[name] {
			skipped.add(p.peer, key, "port %d not imported: its name %q is already used by another port", p.number, name)
			continue
		}
		taken[name] = true
		p.name = name
		out = append(out, p)
	}
	return out
}

// istioProtocol chooses a ServiceEntry port protocol the way Istio's
// explicit protocol selection does: the port's appProtocol, else the port
// name's prefix before "-" (Istio's "<protocol>[-<suffix>]" convention),
// else TCP. Spelled out rather than left to sniffing so that every reader
// of the ServiceEntry sees the same protocol.
func istioProtocol(p catalog.Port) string {
	if proto := protocolFromName(p.AppProtocol); proto != "" {
		return proto
	}
	prefix, _, _ := strings.Cut(p.Name, "-")
	if proto := protocolFromName(prefix); proto != "" {
		return proto
	}
	return "TCP"
}

func protocolFromName(s string) string {
	switch strings.ToLower(s) {
	case "http", "kubernetes.io/ws":
		return "HTTP"
	case "http2", "h2c", "kubernetes.io/h2c":
		return "HTTP2"
	case "grpc":
		return "GRPC"
	case "https", "tls", "kubernetes.io/wss":
		// The caller's sidecar cannot look inside TLS it did not
		// originate, so HTTPS is opaque TLS to the mesh.
		return "TLS"
	case "tcp":
		return "TCP"
	}
	return ""
}

// gateway is one parsed east-west gateway address.
type gateway struct {
	host string
	port uint32
	ip   bool
}

// parseGateways reads a peer's gateway addresses, reporting the ones that
// are not host:port (a peer's data is not trusted to be well formed).
func parseGateways(key catalog.ServiceKey, c peerService, skipped skipList) []gateway {
	var out []gateway
	for _, s := range c.svc.Gateways {
		gw, err := parseGateway(s)
		if err != nil {
			skipped.add(c.peer, key, "gateway %q ignored: %v", s, err)
			continue
		}
		out = append(out, gw)
	}
	if len(out) == 0 && c.svc.ReadyEndpoints() > 0 {
		skipped.add(c.peer, key, "no usable gateway address: the peer's %d ready endpoints cannot be reached", c.svc.ReadyEndpoints())
	}
	// Parsing may have canonicalized (lower case, IPv6 form), so sort and
	// compact again to keep the output deterministic.
	slices.SortFunc(out, func(a, b gateway) int {
		return cmp.Or(strings.Compare(a.host, b.host), cmp.Compare(a.port, b.port))
	})
	return slices.Compact(out)
}

func parseGateway(s string) (gateway, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return gateway{}, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return gateway{}, fmt.Errorf("port %q is not 1-65535", portStr)
	}
	if addr, err := netip.ParseAddr(host); err == nil {
		if addr.Zone() != "" {
			return gateway{}, fmt.Errorf("address %q has a zone", host)
		}
		if err := federation.CheckDialIP(addr); err != nil {
			return gateway{}, err
		}
		return gateway{host: addr.Unmap().String(), port: uint32(port), ip: true}, nil
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if msgs := validation.IsDNS1123Subdomain(host); len(msgs) > 0 {
		return gateway{}, fmt.Errorf("%q is neither an IP address nor a DNS name: %s", host, strings.Join(msgs, "; "))
	}
	// A top-level label is never all digits (RFC 3696 section 2): such a
	// name is an address written wrongly ("10.1.0.1." is no IPv4
	// address, and no name a resolver would find).
	if last := host[strings.LastIndexByte(host, '.')+1:]; strings.Trim(last, "0123456789") == "" {
		return gateway{}, fmt.Errorf("%q is neither an IP address nor a DNS name: its last label is all digits", host)
	}
	return gateway{host: host, port: uint32(port)}, nil
}

// share splits a locality's ready count over n gateways, so that one
// peer's endpoints in one locality weigh exactly its ready count together,
// however many gateways it has: gateway i gets ready/n, and the first
// ready%n gateways one more.
func share(ready, n, i int) uint32 {
	if ready <= 0 || n <= 0 {
		return 0
	}
	w := ready / n
	if i < ready%n {
		w++
	}
	return uint32(min(w, math.MaxUint32))
}
