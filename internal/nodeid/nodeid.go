// Package nodeid is the xDS node ID a proxy sends and the federator reads:
// Istio's shape, "<role>~<pod-ip>~<pod>.<namespace>~<namespace>.svc.cluster.local",
// with the Isthmus role first. pkg/xdsclient builds it; pkg/xds picks a
// snapshot by its role and checks its namespace against the proxy's
// certificate.
package nodeid

import (
	"fmt"
	"strings"
)

// The roles, the ID's first field.
const (
	RoleGateway = "eastwest-gw"
	RoleSidecar = "sidecar"
)

// ID is a node ID's fields. Domain is the cluster's DNS domain,
// "cluster.local" when empty.
type ID struct {
	Role, IP, Pod, Namespace, Domain string
}

// String is the node ID.
func (id ID) String() string {
	domain := id.Domain
	if domain == "" {
		domain = "cluster.local"
	}
	return id.Role + "~" + id.IP + "~" + id.Pod + "." + id.Namespace + "~" + id.Namespace + ".svc." + domain
}

// Role is the first "~" field of node ID s, whatever the rest.
func Role(s string) string {
	role, _, _ := strings.Cut(s, "~")
	return role
}

// Parse reads node ID s, of any cluster domain (Istio's proxies send
// theirs). It refuses an ID of another shape, or whose third and fourth
// fields name different namespaces.
func Parse(s string) (ID, error) {
	fields := strings.Split(s, "~")
	if len(fields) != 4 {
		return ID{}, fmt.Errorf("node ID is not of the form <role>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local")
	}
	ns, rest, _ := strings.Cut(fields[3], ".")
	domain, svc := strings.CutPrefix(rest, "svc.")
	// A pod's name may have dots; a namespace's may not.
	var pod, podNS string
	if i := strings.LastIndexByte(fields[2], '.'); i >= 0 {
		pod, podNS = fields[2][:i], fields[2][i+1:]
	}
	switch {
	case fields[0] == "":
		return ID{}, fmt.Errorf("node ID has no role")
	case ns == "" || !svc || domain == "":
		return ID{}, fmt.Errorf("node ID's last field is not <namespace>.svc.<cluster domain>")
	case pod == "" || podNS != ns:
		return ID{}, fmt.Errorf("node ID's third field is not <pod>.%s", ns)
	}
	return ID{Role: fields[0], IP: fields[1], Pod: pod, Namespace: ns, Domain: domain}, nil
}
