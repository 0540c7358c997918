// Package authz is Istio's AuthorizationPolicy and PeerAuthentication as
// the sidecars enforce them: a Store of the cluster's policies and of its
// pods' labels that knows, for each pod, which AuthorizationPolicies
// select it and what mutual TLS its PeerAuthentications say (a Set), and
// the translation of a Set's AuthorizationPolicies to the RBAC filters of
// its sidecar's inbound chains.
//
//	kube-apiserver ──informers (pkg/kube)──► Store ──Snapshot──► xDS translation (pkg/xds)
//
// The translation is Istio's: a request (HTTP chains, HTTP RBAC) or a
// connection (TCP chains, network RBAC) is refused when a DENY policy
// matches it, then, when any ALLOW policy selects the pod, unless one
// matches it. On a TCP chain a rule's HTTP-only fields (methods, paths,
// hosts, request headers) cannot match: a rule of an ALLOW policy that
// has them never matches, and a rule of a DENY policy matches without
// them, as Istio does on TCP ports. What the sidecars cannot enforce
// anywhere (request principals, path templates) fails closed the same
// way, and every such field is reported, never silently dropped.
//
// A pod's mutual TLS (MTLS) is Istio's composition of its
// PeerAuthentications, mesh, namespace and workload, port by port; the
// federator gives its PERMISSIVE ports plaintext chains beside the mutual
// TLS ones. STRICT is the default, where Istio's is PERMISSIVE.
package authz
