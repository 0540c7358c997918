package kube

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// Node labels that place an endpoint. Region and zone are the Kubernetes
// well-known labels; subzone is Istio's.
const (
	LabelRegion  = corev1.LabelTopologyRegion
	LabelZone    = corev1.LabelTopologyZone
	LabelSubzone = "topology.istio.io/subzone"
)

// AnnotationPeers on a ServiceExport narrows the export to a comma-separated
// list of peer cluster names: the names of their FederationPeers, so
// lowercase RFC 1123 labels, compared exactly. Blanks around a name and
// empty items are ignored, and a name given twice counts once. Without the
// annotation the service is exported to every peer. Deny by default
// otherwise: an annotation that names no peer, or with any item that is
// not a peer name, exports the service to no peer, and the export's Valid
// condition is False saying why (reasons NoPeers, InvalidPeers).
const AnnotationPeers = "federation.isthmus.dev/peers"

// maxNamedInvalidPeers bounds how many bad items a condition quotes.
const maxNamedInvalidPeers = 10

// localityFunc returns the locality of a node by name; ok is false when the
// node is unknown.
type localityFunc func(node string) (catalog.Locality, bool)

// nodeLocality reads a node's topology labels.
func nodeLocality(n *corev1.Node) catalog.Locality {
	return catalog.Locality{
		Region:  n.Labels[LabelRegion],
		Zone:    n.Labels[LabelZone],
		Subzone: n.Labels[LabelSubzone],
	}
}

// parsePeers reads the peers annotation's value: the peer names it lists,
// sorted, each once, or an error naming every item that is not a peer
// name. The list is empty when the value names no peer.
func parsePeers(v string) ([]string, error) {
	var out, bad []string
	for p := range strings.SplitSeq(v, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if len(validation.IsDNS1123Label(p)) > 0 {
			bad = append(bad, describeBadPeer(p))
			continue
		}
		out = append(out, p)
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		bad = slices.Compact(bad)
		if n := len(bad); n > maxNamedInvalidPeers {
			bad = append(bad[:maxNamedInvalidPeers], fmt.Sprintf("and %d more", n-maxNamedInvalidPeers))
		}
		return nil, fmt.Errorf("%s: not a peer cluster name: %s (peer names are the names of FederationPeers: lowercase RFC 1123 labels of at most 63 characters, a-z, 0-9 and '-', starting and ending with a letter or digit)",
			AnnotationPeers, strings.Join(bad, ", "))
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// describeBadPeer quotes an item of the peers annotation that is not a
// peer name, shortened, with the name it may have meant when only its
// case is wrong: peer names compare exactly, and are lowercase.
func describeBadPeer(p string) string {
	const maxQuoted = 64
	q := p
	if len(q) > maxQuoted {
		cut := maxQuoted
		for cut > 0 && !utf8.RuneStart(q[cut]) {
			cut--
		}
		q = q[:cut] + "…"
	}
	if lower := strings.ToLower(p); lower != p && len(validation.IsDNS1123Label(lower)) == 0 {
		return fmt.Sprintf("%q (names are lowercase: %q)", q, lower)
	}
	return strconv.Quote(q)
}

// serviceFromObjects translates a Service and its EndpointSlices into the
// catalog model. Endpoints that appear in several slices (dual stack, or a
// slice being split) count once, keyed by the Pod they point at, else by
// their first address. The zone of an endpoint comes from the slice (set
// by the EndpointSlice controller from the node) and falls back to the
// node; region and subzone always come from the node.
//
// With accounts set, the service's identities are the SPIFFE IDs of the
// ServiceAccounts of the pods behind its endpoints, ready or not: a pod
// that is starting or draining still answers as itself. Endpoints that do
// not point at a pod, or at a pod not known yet, add no identity. With
// accounts nil no identity is computed.
//
// The result is not yet normalized, and its Identities may be shared with
// other results: catalog.Builder.Put copies, sorts and validates it.
func serviceFromObjects(cluster string, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, peers []string, locate localityFunc, accounts *podAccounts) catalog.Service {
	out := catalog.Service{
		Namespace: svc.Namespace,
		Name:      svc.Name,
		Cluster:   cluster,
		Ports:     servicePorts(svc),
		Peers:     peers,
	}

	// Services have endpoints in a handful of localities, so a short slice
	// searched linearly beats a map here; the dedupe set is only needed
	// when there is more than one slice.
	out.Endpoints = make([]catalog.LocalityEndpoints, 0, 4)
	var seen map[string]struct{}
	if len(endpointSlices) > 1 {
		seen = make(map[string]struct{}, 16)
	}
	// The pods behind a service nearly always share one ServiceAccount;
	// the distinct ones are collected on the stack and searched linearly.
	var acctBuf [4]*account
	accts := acctBuf[:0]
	// Addresses are collected flat and then laid out per locality in one
	// backing array: appending per locality would grow each slice.
	total := 0
	for _, s := range endpointSlices {
		total += len(s.Endpoints)
	}
	type located struct {
		loc  int
		addr catalog.Address
	}
	found := make([]located, 0, total)
	for _, s := range endpointSlices {
		if s.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		for i := range s.Endpoints {
			ep := &s.Endpoints[i]
			if len(ep.Addresses) == 0 {
				continue
			}
			if seen != nil {
				id := ep.Addresses[0]
				if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" {
					id = "pod/" + ref.Namespace + "/" + ref.Name
				}
				if _, dup := seen[id]; dup {
					continue
				}
				seen[id] = struct{}{}
			}

			var loc catalog.Locality
			if ep.NodeName != nil {
				loc, _ = locate(*ep.NodeName)
			}
			if ep.Zone != nil && *ep.Zone != "" {
				loc.Zone = *ep.Zone
			}
			j := 0
			for j < len(out.Endpoints) && out.Endpoints[j].Locality != loc {
				j++
			}
			if j == len(out.Endpoints) {
				out.Endpoints = append(out.Endpoints, catalog.LocalityEndpoints{Locality: loc})
			}
			// A nil Ready condition means unknown, which consumers are
			// told to treat as ready.
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			if ready {
				out.Endpoints[j].Ready++
			} else {
				out.Endpoints[j].NotReady++
			}
			found = append(found, located{j, catalog.Address{IP: ep.Addresses[0], Ready: ready}})

			if ref := ep.TargetRef; accounts != nil && ref != nil && ref.Kind == "Pod" {
				ns := ref.Namespace
				if ns == "" {
					ns = s.Namespace
				}
				if acct := accounts.account(ns, ref.Name); acct != nil && !slices.Contains(accts, acct) {
					accts = append(accts, acct)
				}
			}
		}
	}
	backing := make([]catalog.Address, len(found))
	start := 0
	for j := range out.Endpoints {
		n := out.Endpoints[j].Ready + out.Endpoints[j].NotReady
		out.Endpoints[j].Addresses = backing[start : start : start+n]
		start += n
	}
	for _, f := range found {
		out.Endpoints[f.loc].Addresses = append(out.Endpoints[f.loc].Addresses, f.addr)
	}
	if accounts != nil {
		out.Identities = accounts.identities(accts)
	}
	setTargetPorts(out.Ports, endpointSlices)
	return out
}

// setTargetPorts fills each port's TargetPort from the EndpointSlices'
// ports of the same name: what the endpoints listen on.
func setTargetPorts(ports []catalog.Port, slices []*discoveryv1.EndpointSlice) {
	for i := range ports {
		for _, s := range slices {
			for _, sp := range s.Ports {
				name := ""
				if sp.Name != nil {
					name = *sp.Name
				}
				if name == ports[i].Name && sp.Port != nil {
					ports[i].TargetPort = *sp.Port
				}
			}
			if ports[i].TargetPort != 0 {
				break
			}
		}
	}
}

// declaredFromObjects is a Service's entries among the declared ports
// (catalog.DeclaredSource): its ports with their target ports, and
// every address of its EndpointSlices, ready or not, of both families,
// each with the pod behind it. The slices whose ports resolve alike
// make one entry; a named targetPort that the pods resolve to different
// numbers makes one entry per set of numbers, the first (in the slices'
// name order) named as the Service and each other "<name>@<numbers>",
// so that every pod declares the port it listens on. None when the
// Service has no address.
func declaredFromObjects(cluster string, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice) []catalog.Service {
	type group struct {
		entry catalog.Service
		// seen are the addresses entry holds.
		seen map[string]bool
	}
	var groups []*group
	bySignature := map[string]*group{}
	sorted := slices.SortedFunc(slices.Values(endpointSlices), func(a, b *discoveryv1.EndpointSlice) int {
		return strings.Compare(a.Name, b.Name)
	})
	for _, es := range sorted {
		if es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		ports := servicePorts(svc)
		setTargetPorts(ports, []*discoveryv1.EndpointSlice{es})
		var sig strings.Builder
		for i, p := range ports {
			if i > 0 {
				sig.WriteByte(',')
			}
			sig.WriteString(strconv.Itoa(int(p.TargetPort)))
		}
		g := bySignature[sig.String()]
		if g == nil {
			name := svc.Name
			if len(groups) > 0 {
				name += "@" + sig.String()
			}
			g = &group{entry: catalog.Service{Namespace: svc.Namespace, Name: name, Cluster: cluster, Ports: ports,
				Endpoints: []catalog.LocalityEndpoints{{}}}, seen: map[string]bool{}}
			bySignature[sig.String()] = g
			groups = append(groups, g)
		}
		le := &g.entry.Endpoints[0]
		for i := range es.Endpoints {
			ep := &es.Endpoints[i]
			pod := ""
			if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" && (ref.Namespace == "" || ref.Namespace == svc.Namespace) {
				pod = ref.Name
			}
			ready := ep.Conditions.Ready == nil || *ep.Conditions.Ready
			for _, ip := range ep.Addresses {
				if g.seen[ip] {
					continue
				}
				g.seen[ip] = true
				le.Addresses = append(le.Addresses, catalog.Address{IP: ip, Ready: ready, Pod: pod})
				if ready {
					le.Ready++
				} else {
					le.NotReady++
				}
			}
		}
	}
	var out []catalog.Service
	for _, g := range groups {
		if len(g.entry.Endpoints[0].Addresses) > 0 {
			out = append(out, g.entry)
		}
	}
	return out
}

// servicePorts are svc's ports as the catalog has them, without their
// target ports (setTargetPorts).
func servicePorts(svc *corev1.Service) []catalog.Port {
	out := make([]catalog.Port, 0, len(svc.Spec.Ports))
	for _, p := range svc.Spec.Ports {
		port := catalog.Port{Name: p.Name, Port: p.Port, Protocol: catalog.Protocol(p.Protocol)}
		if p.AppProtocol != nil {
			port.AppProtocol = *p.AppProtocol
		}
		out = append(out, port)
	}
	return out
}
