// Package mesh is the multi-cluster topology that the end-to-end tests
// (test/e2e) and `make demo` (test/demo) share: simulated clusters of
// test/localcluster, each with the real federator and the real east-west
// gateway (test/fedproc), linked with the real `federator token create` and
// `federator join`, and pods that run the echo app (test/echo) beside the
// real sidecar, their traffic captured by the real `sidecar iptables`.
//
// # Topology (root)
//
// Each cluster is a node network namespace (localcluster's) holding its
// control plane on loopback — etcd, kube-apiserver, kube-controller-manager
// — and its federator and gateway, with three interfaces:
//
//	br0   10.(10+i).0.1/16   the pod network: pods' default route
//	wan0  10.254.0.(i+1)/24  the WAN, shared by every cluster's node
//	up0   169.254.…          the uplink the test process reaches it by
//
// The federator listens on every address of the node: pods reach its CA
// and xDS (15012, mTLS) at the node's pod-network address, their default
// gateway, so nothing routes for them; peers reach its federation API
// (15019) at the node's WAN address, which the token carries. The gateway
// listens on 15443 on every address and is advertised to peers with the
// node's WAN address (federator --gateway-address); it reaches its own
// pods over br0.
//
// Pods are network namespaces on their cluster's br0. Their node forwards
// nothing but their new TCP connections to port 15443 on the WAN,
// masqueraded as its WAN address (localcluster's AllowPodEgress): a
// sidecar reaches other clusters' gateways, and no pod reaches another
// cluster's pods, nodes or API servers except through a gateway.
//
// A meshed pod ([Cluster.RunPod]) is, in the order a kubelet would run it:
//
//	init       sidecar iptables                        as root: capture in the pod's namespace
//	sidecar    sidecar run                             as uid 1337 (ProxyUser): SVID from the CA
//	                                                    with a real ServiceAccount token, config over xDS
//	app        echo -listen :8080 -grpc-listen :9090   as uid 1000 (AppUser): its traffic is captured
//	           -tcp-listen :9000
//
// with the pod's own resolv.conf (nameserver 10.96.0.10, the usual
// Kubernetes search list and ndots:5), whose queries the capture sends to
// the sidecar's DNS proxy, and the Pod object a kubelet would write:
// Running, Ready once the app listens and the sidecar is ready, with its
// ServiceAccount, so its identity is
// spiffe://<cluster>.mesh/ns/<namespace>/sa/<serviceaccount>. Clients
// ([Pod.Call]) are `echo call` run in a pod as the app's user, so their
// DNS and connections go through the pod's sidecar as an app's would.
//
// The pods' binaries (sidecar, echo) are copied under the environment's
// work directory, which other users may pass through, so the build
// directory may be private.
//
// Without root there are no namespaces: [Start] still runs the clusters,
// federators and gateways on loopback addresses, but [Cluster.RunPod]
// refuses (ErrNotIsolated).
package mesh
