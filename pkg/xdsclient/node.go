package xdsclient

import (
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/isthmus-mesh/isthmus/internal/nodeid"
	"github.com/isthmus-mesh/isthmus/pkg/version"
)

// Node identity conventions (docs/gateway-xds.md and docs/sidecar-xds.md,
// "Node").
const (
	// RoleGateway is the east-west gateway's role: the first segment of
	// its node id and the value of its MetadataRole.
	RoleGateway = nodeid.RoleGateway
	// RoleSidecar is the sidecar's role, likewise.
	RoleSidecar = nodeid.RoleSidecar
	// MetadataRole is the node metadata key naming the proxy's role.
	MetadataRole = "ISTHMUS_ROLE"
)

// Node is how the proxy identifies itself to the federator.
type Node struct {
	// ID is the node id; the federator picks the snapshot by it.
	// Required.
	ID string
	// Cluster is the proxy's Isthmus cluster name.
	Cluster string
	// Metadata becomes the node's metadata struct (string values).
	Metadata map[string]string
}

// GatewayNode is the east-west gateway's node: id
// "eastwest-gw~<pod-ip>~<pod>.<namespace>~<namespace>.svc.cluster.local"
// (Istio's router~ shape, with our role first), cluster the Isthmus
// cluster name, metadata {ISTHMUS_ROLE: eastwest-gw}.
func GatewayNode(clusterName, podIP, podName, namespace string) Node {
	return Node{
		ID:       nodeid.ID{Role: RoleGateway, IP: podIP, Pod: podName, Namespace: namespace}.String(),
		Cluster:  clusterName,
		Metadata: map[string]string{MetadataRole: RoleGateway},
	}
}

// SidecarNode is a sidecar's node: id
// "sidecar~<pod-ip>~<pod>.<namespace>~<namespace>.svc.cluster.local"
// (Istio's shape), cluster the Isthmus cluster name, metadata
// {ISTHMUS_ROLE: sidecar}.
func SidecarNode(clusterName, podIP, podName, namespace string) Node {
	return Node{
		ID:       nodeid.ID{Role: RoleSidecar, IP: podIP, Pod: podName, Namespace: namespace}.String(),
		Cluster:  clusterName,
		Metadata: map[string]string{MetadataRole: RoleSidecar},
	}
}

// Role is the proxy's role, which decides the subset of xDS the client
// accepts: the metadata's ISTHMUS_ROLE when set, else the node id's first
// "~" segment. Decoding refuses every role but RoleGateway and
// RoleSidecar.
func (n Node) Role() string {
	if r := n.Metadata[MetadataRole]; r != "" {
		return r
	}
	return nodeid.Role(n.ID)
}

// proto is the node as sent in the first request of every stream.
func (n Node) proto() *corev3.Node {
	p := &corev3.Node{
		Id:                   n.ID,
		Cluster:              n.Cluster,
		UserAgentName:        "isthmus",
		UserAgentVersionType: &corev3.Node_UserAgentVersion{UserAgentVersion: version.Version},
	}
	if len(n.Metadata) > 0 {
		fields := make(map[string]*structpb.Value, len(n.Metadata))
		for k, v := range n.Metadata {
			fields[k] = structpb.NewStringValue(v)
		}
		p.Metadata = &structpb.Struct{Fields: fields}
	}
	return p
}
