package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API's group and version.
var GroupVersion = schema.GroupVersion{Group: "federation.isthmus.dev", Version: "v1alpha1"}

// Resource is the plural resource of FederationPeer.
var Resource = GroupVersion.WithResource("federationpeers")

// FederationPeer is another cluster this cluster is linked with. Its name
// is the peer's cluster name. `federator join` creates one on the joining
// side; the accepting federator creates its own once the join succeeds.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=fp
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="State",type=string,JSONPath=`.status.state`
// +kubebuilder:printcolumn:name="Trust Domain",type=string,JSONPath=`.spec.trustDomain`
// +kubebuilder:printcolumn:name="Imported",type=integer,JSONPath=`.status.importedServices`
// +kubebuilder:printcolumn:name="Exported",type=integer,JSONPath=`.status.exportedServices`
// +kubebuilder:printcolumn:name="Last Heartbeat",type=date,JSONPath=`.status.lastHeartbeat`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type FederationPeer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   FederationPeerSpec   `json:"spec"`
	Status FederationPeerStatus `json:"status,omitempty"`
}

// FederationPeerSpec is what the operator (or `federator join`) says about
// the peer. The federator never overwrites it with what the peer says.
// +kubebuilder:validation:XValidation:rule="!has(self.tokenSecretName) || size(self.tokenSecretName) == 0 || (has(self.addresses) && size(self.addresses) > 0)",message="addresses must name at least one address of the peer's federator on the joining side (tokenSecretName set)"
type FederationPeerSpec struct {
	// TrustDomain is the peer's SPIFFE trust domain.
	// +kubebuilder:validation:MinLength=1
	TrustDomain string `json:"trustDomain"`
	// FederatorID is the SPIFFE ID the peer's federator must present.
	// +kubebuilder:validation:Pattern=`^spiffe://`
	FederatorID string `json:"federatorID"`
	// Addresses are where the peer's federation endpoint is reached
	// (host:port; hostnames allowed). Pinned by the operator.
	// +optional
	Addresses []string `json:"addresses,omitempty"`
	// TokenSecretName names the Secret in the federator's namespace holding
	// the peering token this side joins with. Empty on the accepting side.
	// +optional
	TokenSecretName string `json:"tokenSecretName,omitempty"`
	// Staleness bounds how long imports outlive a lost peer.
	// +optional
	Staleness Staleness `json:"staleness,omitempty"`
}

// Staleness bounds how long a disconnected peer's imports are kept.
//
// Both durations are written as Go writes them ("30s", "5m", "1h30m": a
// number and a unit, ns, us, ms, s, m or h) and must be positive: zero or
// a negative value is refused, not read as the default. Leave a field out
// for the federator's default (its --keep-for and --drain-for flags).
type Staleness struct {
	// KeepFor is how long imported endpoints are kept after the peer is
	// lost, before they are drained and then removed. Default: the
	// federator's --keep-for (5m).
	// +optional
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9]+([.][0-9]*)?(ns|us|µs|μs|ms|s|m|h))+$') && duration(self) > duration('0s')",message="keepFor must be a positive duration such as 30s, 5m or 1h30m (a number and a unit: ns, us, ms, s, m or h)"
	KeepFor *metav1.Duration `json:"keepFor,omitempty"`
	// DrainFor is how long drained endpoints (weight 0) stay before they
	// are removed. Default: the federator's --drain-for (1m).
	// +optional
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9]+([.][0-9]*)?(ns|us|µs|μs|ms|s|m|h))+$') && duration(self) > duration('0s')",message="drainFor must be a positive duration such as 30s, 5m or 1h30m (a number and a unit: ns, us, ms, s, m or h)"
	DrainFor *metav1.Duration `json:"drainFor,omitempty"`
}

// Peer states.
const (
	// StatePending: linked on paper, never connected yet.
	StatePending = "Pending"
	// StateConnected: the exchange stream is up.
	StateConnected = "Connected"
	// StateDisconnected: the stream is down; imports are kept, then
	// drained, then removed (see Staleness).
	StateDisconnected = "Disconnected"
	// StateFailed: the peer cannot be used until the operator acts (a
	// refused establishment, a terminated link, an identity mismatch).
	StateFailed = "Failed"
)

// Condition types.
const (
	// ConditionAccepted: the federator accepts the spec and runs the link
	// as it says. False (reason InvalidSpec) names each field it cannot
	// follow and why; the link is then not run (not dialled, and a stream
	// the peer opens is refused) until the spec changes. A spec stored
	// before the CRD checked a field is how this happens.
	ConditionAccepted = "Accepted"
	// ConditionEstablished: the one-time secret was spent and both sides
	// hold each other's bundle and federator ID.
	ConditionEstablished = "Established"
	// ConditionConnected: the exchange stream is up and heartbeats arrive.
	ConditionConnected = "Connected"
	// ConditionImportsAccepted: the peer's last update was accepted; False
	// names the refused resource and why (the last NACK sent).
	ConditionImportsAccepted = "ImportsAccepted"
	// ConditionExportsAccepted: the peer accepted what this side sent;
	// False carries the peer's last NACK.
	ConditionExportsAccepted = "ExportsAccepted"
	// ConditionImportsWritten: every import was written to this cluster;
	// False names what was skipped (reason Skipped: no such namespace, a
	// local object in the way), or says that a long write is under way
	// (reason Writing).
	ConditionImportsWritten = "ImportsWritten"
)

// ReasonInvalidSpec is the reason of a False Accepted condition.
const ReasonInvalidSpec = "InvalidSpec"

// FederationPeerStatus is what the federator observes.
type FederationPeerStatus struct {
	// State is Pending, Connected, Disconnected or Failed.
	// +optional
	State string `json:"state,omitempty"`
	// +optional
	LastHeartbeat *metav1.Time `json:"lastHeartbeat,omitempty"`
	// DisconnectedSince is when the stream was lost; imports are drained
	// keepFor after it. Unset while connected.
	// +optional
	DisconnectedSince *metav1.Time `json:"disconnectedSince,omitempty"`
	// +optional
	ImportedServices int32 `json:"importedServices,omitempty"`
	// +optional
	ExportedServices int32 `json:"exportedServices,omitempty"`
	// Sent and Acknowledged are the versions, by resource type, this side
	// last sent and the peer last acknowledged.
	// +optional
	Sent map[string]string `json:"sent,omitempty"`
	// +optional
	Acknowledged map[string]string `json:"acknowledged,omitempty"`
	// Received are the versions, by resource type, accepted from the peer.
	// +optional
	Received map[string]string `json:"received,omitempty"`
	// Bundle describes the peer's trust bundle as this side holds it.
	// +optional
	Bundle *BundleStatus `json:"bundle,omitempty"`
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// BundleStatus summarises a peer's trust bundle.
type BundleStatus struct {
	Sequence uint64 `json:"sequence"`
	Roots    int32  `json:"roots"`
	// Expires is the earliest expiry among the roots.
	// +optional
	Expires *metav1.Time `json:"expires,omitempty"`
}

// FederationPeerList is a list of FederationPeers.
//
// +kubebuilder:object:root=true
type FederationPeerList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []FederationPeer `json:"items"`
}

// AddToScheme registers the types.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &FederationPeer{}, &FederationPeerList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
