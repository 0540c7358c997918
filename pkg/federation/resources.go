package federation

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/util/validation"

	fedv1 "github.com/isthmus-mesh/isthmus/api/federation/v1"
	"github.com/isthmus-mesh/isthmus/internal/clip"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// Resource types carried by the exchange stream.
const (
	TypeService = "isthmus.federation.v1.ExportedService"
	TypeBundle  = "isthmus.federation.v1.TrustBundle"
)

// resourceTypes are the types in the order they are sent after Open: the
// bundle first, so the peer trusts the identities the services name.
var resourceTypes = []string{TypeBundle, TypeService}

// Limits bound what one peer can make this federator hold or do. The zero
// value of a field means its default.
type Limits struct {
	// MaxServices is the most services one peer may export to this
	// cluster (default 20,000). An update that would exceed it is refused
	// as a whole.
	MaxServices int
	// MaxMessageBytes bounds one received message (default 32 MiB).
	MaxMessageBytes int
	// MaxResourceBytes bounds one resource (default 16 KiB).
	MaxResourceBytes int
	// UpdatesPerSecond and UpdateBurst bound how often a peer's updates
	// are applied (defaults 50 and 100), over all its streams; one beyond
	// waits, and the session does not read from the peer meanwhile.
	UpdatesPerSecond float64
	UpdateBurst      int
}

func (l Limits) withDefaults() Limits {
	if l.MaxServices <= 0 {
		l.MaxServices = 20000
	}
	if l.MaxMessageBytes <= 0 {
		l.MaxMessageBytes = 32 << 20
	}
	if l.MaxResourceBytes <= 0 {
		l.MaxResourceBytes = 16 << 10
	}
	if l.UpdatesPerSecond <= 0 {
		l.UpdatesPerSecond = 50
	}
	if l.UpdateBurst <= 0 {
		l.UpdateBurst = 100
	}
	return l
}

// Namespaces no peer can import into: the cluster's own machinery.
var reservedNamespaces = []string{"kube-system", "kube-public", "kube-node-lease"}

// digest identifies a resource's content: SHA-256 of its deterministic
// protobuf encoding.
type digest [sha256.Size]byte

var deterministic = proto.MarshalOptions{Deterministic: true}

func digestOf(r *fedv1.Resource) (digest, int, error) {
	b, err := deterministic.Marshal(r)
	if err != nil {
		return digest{}, 0, err
	}
	return sha256.Sum256(b), len(b), nil
}

// setVersion is the version of a whole set of resources. Each digest
// covers its resource's name, so the XOR of the digests identifies the
// set without sorting it, and a receiver keeps it current change by
// change; both sides compute it alike, so a receiver can tell when it no
// longer holds what the sender thinks. The empty set's version is "".
func setVersion(set map[string]digest) string {
	var acc digest
	for _, d := range set {
		acc.xor(d)
	}
	return versionOf(acc, len(set))
}

func (d *digest) xor(o digest) {
	for i := range d {
		d[i] ^= o[i]
	}
}

func versionOf(acc digest, n int) string {
	if n == 0 {
		return ""
	}
	return hex.EncodeToString(acc[:8])
}

// serviceResource turns a local service into what a peer receives.
func serviceResource(svc *catalog.Service, gateways []string) *fedv1.Resource {
	es := &fedv1.ExportedService{
		Namespace:        svc.Namespace,
		Name:             svc.Name,
		GatewayAddresses: gateways,
		SpiffeIds:        svc.Identities,
	}
	for _, p := range svc.Ports {
		es.Ports = append(es.Ports, &fedv1.ServicePort{Name: p.Name, Port: uint32(p.Port), Protocol: string(p.Protocol), AppProtocol: p.AppProtocol})
	}
	for _, e := range svc.Endpoints {
		es.Endpoints = append(es.Endpoints, &fedv1.LocalityEndpoints{
			Region: e.Locality.Region, Zone: e.Locality.Zone, Subzone: e.Locality.Subzone,
			Ready: clampUint32(e.Ready), NotReady: clampUint32(e.NotReady),
		})
	}
	return &fedv1.Resource{Name: svc.Key().String(), Body: &fedv1.Resource_Service{Service: es}}
}

func clampUint32(n int) uint32 {
	if n < 0 {
		return 0
	}
	return uint32(min(n, math.MaxUint32))
}

// maxListLen bounds every repeated field of a received service.
const maxListLen = 256

// importService checks a received service and turns it into the catalog's
// model, attributed to the peer. Every problem names the field.
func importService(peer string, peerTD spiffeid.TrustDomain, r *fedv1.Resource) (catalog.Service, error) {
	es := r.GetService()
	if es == nil {
		return catalog.Service{}, errors.New("resource carries no ExportedService")
	}
	var errs []error
	if want := es.GetNamespace() + "/" + es.GetName(); r.GetName() != want {
		errs = append(errs, fmt.Errorf("resource name %q is not %q", r.GetName(), want))
	}
	if msgs := validation.IsDNS1123Label(es.GetNamespace()); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("namespace %q: %s", es.GetNamespace(), strings.Join(msgs, "; ")))
	} else if slices.Contains(reservedNamespaces, es.GetNamespace()) {
		errs = append(errs, fmt.Errorf("namespace %s is reserved for the cluster's own services and is never imported", es.GetNamespace()))
	}
	if msgs := validation.IsDNS1035Label(es.GetName()); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("name %q: %s", es.GetName(), strings.Join(msgs, "; ")))
	}
	for field, n := range map[string]int{"ports": len(es.GetPorts()), "endpoints": len(es.GetEndpoints()),
		"gateway_addresses": len(es.GetGatewayAddresses()), "spiffe_ids": len(es.GetSpiffeIds())} {
		if n > maxListLen {
			errs = append(errs, fmt.Errorf("%s: %d entries, more than %d", field, n, maxListLen))
		}
	}
	if len(es.GetGatewayAddresses()) == 0 {
		errs = append(errs, errors.New("no gateway_addresses: the service cannot be reached"))
	}
	for _, a := range es.GetGatewayAddresses() {
		if err := CheckAddress(a); err != nil {
			errs = append(errs, fmt.Errorf("gateway_addresses: %w", err))
		}
	}
	for _, s := range es.GetSpiffeIds() {
		id, err := spiffeid.FromString(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("spiffe_ids: %q: %v", s, err))
		} else if !id.MemberOf(peerTD) {
			errs = append(errs, fmt.Errorf("spiffe_ids: %s is not in the peer's trust domain %s", id, peerTD))
		}
	}
	svc := catalog.Service{
		Namespace: es.GetNamespace(), Name: es.GetName(), Cluster: peer,
		Identities: slices.Clone(es.GetSpiffeIds()), Gateways: slices.Clone(es.GetGatewayAddresses()),
	}
	for i, p := range es.GetPorts() {
		if p.GetPort() > math.MaxUint16 {
			errs = append(errs, fmt.Errorf("ports[%d]: port %d out of range", i, p.GetPort()))
			continue
		}
		svc.Ports = append(svc.Ports, catalog.Port{Name: p.GetName(), Port: int32(p.GetPort()),
			Protocol: catalog.Protocol(p.GetProtocol()), AppProtocol: p.GetAppProtocol()})
	}
	for i, e := range es.GetEndpoints() {
		// Locality parts are Kubernetes topology label values (at most
		// 63 characters, no "/"), as the exporter read them: an Istio
		// ServiceEntry refuses a locality of more than 2048 bytes, and
		// with it the object every peer's endpoints share.
		for _, part := range []struct{ field, value string }{{"region", e.GetRegion()}, {"zone", e.GetZone()}, {"subzone", e.GetSubzone()}} {
			if msgs := validation.IsValidLabelValue(part.value); len(msgs) > 0 {
				errs = append(errs, fmt.Errorf("endpoints[%d].%s %q: %s", i, part.field, clip.String(part.value, 70), strings.Join(msgs, "; ")))
			}
		}
		svc.Endpoints = append(svc.Endpoints, catalog.LocalityEndpoints{
			Locality: catalog.Locality{Region: e.GetRegion(), Zone: e.GetZone(), Subzone: e.GetSubzone()},
			Ready:    int(min(e.GetReady(), math.MaxInt32)), NotReady: int(min(e.GetNotReady(), math.MaxInt32)),
		})
	}
	if err := errors.Join(errs...); err != nil {
		return catalog.Service{}, err
	}
	// The catalog's own checks (ports, protocols, duplicates) complete these.
	if err := catalog.NewBuilder(peer).Put(svc); err != nil {
		return catalog.Service{}, err
	}
	return svc, nil
}

// bundleResource is the local trust bundle as sent to peers.
func bundleResource(b *spiffebundle.Bundle) *fedv1.Resource {
	seq, _ := b.SequenceNumber()
	hint, _ := b.RefreshHint()
	tb := &fedv1.TrustBundle{TrustDomain: b.TrustDomain().Name(), Sequence: seq, RefreshHintSeconds: int64(hint / time.Second)}
	for _, c := range b.X509Authorities() {
		tb.X509Authorities = append(tb.X509Authorities, c.Raw)
	}
	return &fedv1.Resource{Name: tb.TrustDomain, Body: &fedv1.Resource_TrustBundle{TrustBundle: tb}}
}

// maxRoots bounds a received bundle.
const maxRoots = 16

// parseBundle checks a received bundle: the trust domain the peer was
// linked with, CA certificates only.
func parseBundle(tb *fedv1.TrustBundle, want spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if tb == nil {
		return nil, errors.New("no trust bundle")
	}
	td, err := spiffeid.TrustDomainFromString(tb.GetTrustDomain())
	if err != nil {
		return nil, fmt.Errorf("trust domain %q: %v", tb.GetTrustDomain(), err)
	}
	if td != want {
		return nil, fmt.Errorf("bundle is for trust domain %s, the peer was linked as %s", td, want)
	}
	if n := len(tb.GetX509Authorities()); n == 0 || n > maxRoots {
		return nil, fmt.Errorf("bundle has %d roots; want 1 to %d", n, maxRoots)
	}
	roots := make([]*x509.Certificate, 0, len(tb.GetX509Authorities()))
	for i, der := range tb.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("x509_authorities[%d]: %v", i, err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("x509_authorities[%d] (%s) is not a CA certificate", i, c.Subject)
		}
		roots = append(roots, c)
	}
	b := spiffebundle.FromX509Authorities(td, roots)
	b.SetSequenceNumber(tb.GetSequence())
	if h := tb.GetRefreshHintSeconds(); h > 0 && h < int64(24*time.Hour/time.Second) {
		b.SetRefreshHint(time.Duration(h) * time.Second)
	}
	return b, nil
}
