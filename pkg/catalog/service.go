package catalog

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Protocol is a port's transport protocol, spelled as Kubernetes spells it.
type Protocol string

// Transport protocols a Service port may use.
const (
	ProtocolTCP  Protocol = "TCP"
	ProtocolUDP  Protocol = "UDP"
	ProtocolSCTP Protocol = "SCTP"
)

// Port is one port of a service.
type Port struct {
	// Name is the port's name in the Service; empty when the Service has a
	// single unnamed port.
	Name string `json:"name,omitempty"`
	// Port is the service port number, 1–65535.
	Port int32 `json:"port"`
	// Protocol is the transport protocol; the zero value means TCP.
	Protocol Protocol `json:"protocol"`
	// AppProtocol is the application protocol (Kubernetes appProtocol, such
	// as "http", "http2", "grpc"); empty when the Service does not say.
	AppProtocol string `json:"appProtocol,omitempty"`
	// TargetPort is, for a local service, the port its endpoints listen
	// on (from the EndpointSlices); zero when unknown or for imports.
	TargetPort int32 `json:"targetPort,omitempty"`
}

// Locality is where endpoints run, in Kubernetes topology terms
// (topology.kubernetes.io/region and zone, Istio's topology.istio.io/subzone).
type Locality struct {
	Region  string `json:"region,omitempty"`
	Zone    string `json:"zone,omitempty"`
	Subzone string `json:"subzone,omitempty"`
}

// String formats the locality the way Istio writes it: region/zone/subzone,
// trailing empty parts dropped.
func (l Locality) String() string {
	switch {
	case l.Subzone != "":
		return l.Region + "/" + l.Zone + "/" + l.Subzone
	case l.Zone != "":
		return l.Region + "/" + l.Zone
	default:
		return l.Region
	}
}

func compareLocality(a, b Locality) int {
	return cmp.Or(
		strings.Compare(a.Region, b.Region),
		strings.Compare(a.Zone, b.Zone),
		strings.Compare(a.Subzone, b.Subzone),
	)
}

// LocalityEndpoints counts a service's endpoints in one locality.
type LocalityEndpoints struct {
	Locality Locality `json:"locality"`
	// Ready is the number of endpoints that can take traffic.
	Ready int `json:"ready"`
	// NotReady is the number of endpoints that exist but cannot take
	// traffic (starting, failing readiness, terminating).
	NotReady int `json:"notReady,omitempty"`
	// Addresses are, for a local service, the endpoints themselves
	// (sorted by IP); imports carry counts only, since a peer's pod
	// addresses are not reachable from here.
	Addresses []Address `json:"addresses,omitempty"`
}

// Address is one endpoint of a local service.
type Address struct {
	IP    string `json:"ip"`
	Ready bool   `json:"ready"`
	// Pod is, in DeclaredSource, the name of the pod behind the address
	// (its EndpointSlice's targetRef), in the service's namespace; empty
	// elsewhere, and for an address that is not a pod.
	Pod string `json:"pod,omitempty"`
}

// ServiceKey names a service within a cluster.
type ServiceKey struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

func (k ServiceKey) String() string { return k.Namespace + "/" + k.Name }

// CompareKeys orders keys as a Snapshot does: by namespace, then name.
func CompareKeys(a, b ServiceKey) int {
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

// Service is one exported service as the rest of Isthmus sees it.
//
// A Service taken from a Snapshot shares memory with the snapshot and must
// not be modified; use Clone for a private copy.
type Service struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Cluster is the name of the cluster that exports the service.
	Cluster string `json:"cluster"`
	// Ports are sorted by port number, then protocol.
	Ports []Port `json:"ports"`
	// Endpoints are grouped by locality and sorted by it; localities with
	// no endpoint at all are absent.
	Endpoints []LocalityEndpoints `json:"endpoints"`
	// Peers, when not empty, narrows the export to these peer clusters
	// (sorted); empty means every peer. A service exported to no peer is
	// not in the catalog at all: pkg/kube leaves out an export whose
	// peers annotation names no peer or an invalid one (deny by default),
	// so that neither a peer nor the gateway's routes see it.
	Peers []string `json:"peers,omitempty"`
	// Identities are the SPIFFE IDs of the workloads that serve the
	// service (sorted).
	Identities []string `json:"identities,omitempty"`
	// Gateways, for a service imported from a peer, are the host:port
	// addresses of the exporting cluster's east-west gateways (sorted).
	// Empty for local services: they are reached directly.
	Gateways []string `json:"gateways,omitempty"`
	// ClusterIP, for an in-cluster service (InClusterSource), is its
	// Service's primary ClusterIP: the address the sidecars recognise it
	// by. Empty in every other catalog; the federation never carries it.
	ClusterIP string `json:"clusterIP,omitempty"`
}

// Key returns the service's namespace and name.
func (s Service) Key() ServiceKey { return ServiceKey{Namespace: s.Namespace, Name: s.Name} }

// ReadyEndpoints is the number of ready endpoints over all localities.
func (s Service) ReadyEndpoints() int {
	n := 0
	for _, e := range s.Endpoints {
		n += e.Ready
	}
	return n
}

// ExportedTo reports whether the service is visible to the named peer.
func (s Service) ExportedTo(peer string) bool {
	if len(s.Peers) == 0 {
		return true
	}
	_, found := slices.BinarySearch(s.Peers, peer)
	return found
}

// Clone returns a deep copy.
func (s Service) Clone() Service {
	c := s
	c.Ports = slices.Clone(s.Ports)
	c.Endpoints = slices.Clone(s.Endpoints)
	for i := range c.Endpoints {
		c.Endpoints[i].Addresses = slices.Clone(c.Endpoints[i].Addresses)
	}
	c.Peers = slices.Clone(s.Peers)
	c.Identities = slices.Clone(s.Identities)
	c.Gateways = slices.Clone(s.Gateways)
	return c
}

// checkCounts refuses negative endpoint counts; it runs before normalize,
// which would otherwise merge them away.
func (s Service) checkCounts() error {
	var errs []error
	for i, e := range s.Endpoints {
		if e.Ready < 0 || e.NotReady < 0 {
			errs = append(errs, fmt.Errorf("endpoints[%d] (%s): negative count", i, e.Locality))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("service %s: %w", s.Key(), err)
	}
	return nil
}

// normalize sorts the service's lists into their canonical order, merges
// duplicate localities and defaults the protocol, so that equal services
// hash equally.
func (s *Service) normalize() {
	for i := range s.Ports {
		if s.Ports[i].Protocol == "" {
			s.Ports[i].Protocol = ProtocolTCP
		}
	}
	slices.SortFunc(s.Ports, func(a, b Port) int {
		return cmp.Or(cmp.Compare(a.Port, b.Port), strings.Compare(string(a.Protocol), string(b.Protocol)))
	})
	slices.SortFunc(s.Endpoints, func(a, b LocalityEndpoints) int { return compareLocality(a.Locality, b.Locality) })
	merged := s.Endpoints[:0]
	for _, e := range s.Endpoints {
		if e.Ready == 0 && e.NotReady == 0 {
			continue
		}
		if n := len(merged); n > 0 && merged[n-1].Locality == e.Locality {
			merged[n-1].Ready += e.Ready
			merged[n-1].NotReady += e.NotReady
			merged[n-1].Addresses = append(merged[n-1].Addresses, e.Addresses...)
			continue
		}
		merged = append(merged, e)
	}
	s.Endpoints = merged
	for i := range s.Endpoints {
		slices.SortFunc(s.Endpoints[i].Addresses, func(a, b Address) int { return strings.Compare(a.IP, b.IP) })
	}
	slices.Sort(s.Peers)
	s.Peers = slices.Compact(s.Peers)
	slices.Sort(s.Identities)
	s.Identities = slices.Compact(s.Identities)
	slices.Sort(s.Gateways)
	s.Gateways = slices.Compact(s.Gateways)
}

// validate reports every problem with a normalized service at once.
func (s *Service) validate() error {
	var errs []error
	if s.Namespace == "" {
		errs = append(errs, errors.New("namespace is empty"))
	}
	if s.Name == "" {
		errs = append(errs, errors.New("name is empty"))
	}
	if len(s.Ports) == 0 {
		errs = append(errs, errors.New("no ports"))
	}
	if s.ClusterIP != "" {
		if _, err := netip.ParseAddr(s.ClusterIP); err != nil {
			errs = append(errs, fmt.Errorf("clusterIP %q is not an IP address", s.ClusterIP))
		}
	}
	for i, p := range s.Ports {
		if p.Port < 1 || p.Port > 65535 {
			errs = append(errs, fmt.Errorf("ports[%d]: port %d out of range 1-65535", i, p.Port))
		}
		switch p.Protocol {
		case ProtocolTCP, ProtocolUDP, ProtocolSCTP:
		default:
			errs = append(errs, fmt.Errorf("ports[%d]: unknown protocol %q", i, p.Protocol))
		}
		if i > 0 && s.Ports[i-1].Port == p.Port && s.Ports[i-1].Protocol == p.Protocol {
			errs = append(errs, fmt.Errorf("ports[%d]: duplicate port %d/%s", i, p.Port, p.Protocol))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("service %s: %w", s.Key(), err)
	}
	return nil
}
