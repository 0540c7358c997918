// Package authz is Istio's AuthorizationPolicy as the sidecars enforce
// it: a Store of the cluster's policies and of its pods' labels that
// knows which policies select each pod, and the translation of a pod's
// policies to the RBAC filters of its sidecar's inbound chains.
//
//	kube-apiserver ──informers (pkg/kube)──► Store ──Snapshot──► xDS translation (pkg/xds)
//
// The translation is Istio's for TCP traffic: a connection is refused
// when a DENY policy matches it, then, when any ALLOW policy selects the
// pod, unless one matches it. The sidecar decides once per connection,
// from the caller's SPIFFE ID and the destination port, so a rule's
// HTTP-only fields (methods, paths, hosts, request principals, request
// conditions) cannot match: a rule of an ALLOW policy that has them
// never matches, and a rule of a DENY policy matches without them, as
// Istio does on TCP ports. Every field Isthmus does not enforce is
// reported, never silently dropped, and always fails closed the same way.
package authz
