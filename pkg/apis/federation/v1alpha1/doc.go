// Package v1alpha1 is the federation.isthmus.dev/v1alpha1 API: the
// cluster-scoped FederationPeer, one per linked cluster.
//
// +kubebuilder:object:generate=true
// +groupName=federation.isthmus.dev
package v1alpha1
