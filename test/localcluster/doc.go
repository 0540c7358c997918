// Package localcluster starts N simulated Kubernetes clusters on this machine,
// each with its own real etcd, kube-apiserver and kube-controller-manager, so
// the federator, gateways and sidecars can be tested against real API servers,
// real RBAC, real TLS and real EndpointSlice controllers. Tests use
// [StartT]; `make demo` uses [Start].
//
// There are no kubelets: [Cluster.RunWorkload] runs a workload as a real
// process, creates its Pod object and writes the status a kubelet would (phase
// Running, the process's IP, Ready conditions). kube-controller-manager's
// EndpointSlice controller then maintains the slices, exactly as in a real
// cluster. Nodes exist only as objects ([Cluster.AddNode]).
//
// # Address plan
//
// Cluster i (0-based, in the order given to [Start]) of an environment whose
// run id is R (isth<pid>r<seq>) gets these addresses. S is the environment's
// slot, 0 unless several environments run on the machine at once (slots are
// taken with flock under the system temp dir, so they free themselves when a
// process dies).
//
// Root mode (the default when running as root) gives every cluster its own
// network namespaces, so isolation between clusters is enforced by the kernel:
//
//	netns R-<cluster>        the cluster's "node": etcd (127.0.0.1:2379),
//	                         kube-apiserver (0.0.0.0:6443), kube-controller-manager,
//	                         and processes started with Cluster.StartProcess
//	                         (federator, gateway); ip_forward=0, so nothing
//	                         routes through it
//	  br0   10.(10+i).0.1/16 the node IP; the pod network's bridge
//	  up0   169.254.(100+i).(4S+2)/30  uplink to the root netns
//	  wan0  10.254.0.(i+1)/24          the inter-cluster network (WAN)
//	root netns
//	  ib<pid>r<seq>c<i>  169.254.(100+i).(4S+1)/30  the test process's side of
//	                     the uplink; root's ip_forward stays 0 and there is no
//	                     route to any pod or WAN address
//	netns R-wan              a bridge joining every node's wan0
//	netns R-<cluster>-<namespace>-<pod>  one per workload
//	  eth0  10.(10+i).1.k/16, default route via 10.(10+i).0.1
//
// So: the test process reaches each API server at
// https://169.254.(100+i).(4S+2):6443 ([Cluster.APIServerURL]); processes in
// the node or pod namespaces reach it at https://10.(10+i).0.1:6443
// ([Cluster.InClusterAPIServerURL]); pods reach pods of their own cluster over
// br0, and nothing else: a pod's packets to another cluster or to the WAN die
// at its node, which does not forward. Only processes in node namespaces
// (gateways, federators) reach the WAN, at 10.254.0.0/24, and an iptables
// rule in each node namespace rejects the API server port on wan0, so no
// cluster ever reaches another's API server. The test process
// itself has no route to pod or WAN addresses; [Cluster.DialContext] and
// [Workload.DialContext] dial from inside a node's or a pod's namespace, and
// [Cluster.Command] and [Workload.Command] run helpers there.
//
// [Cluster.AllowPodEgress] opens one door, as a real cluster's node SNAT
// does: the node then forwards its pods' new TCP connections to the given
// ports on the WAN (the east-west gateways' 15443), masqueraded as its WAN
// address, and their replies; nothing else. Pods of different clusters
// still never reach each other except through a gateway.
//
// Loopback mode (not root, or Options.ForceLoopback) uses no namespaces and
// does not isolate anything; every address is on lo:
//
//	node IP, WAN IP, API server  127.S.(10+i).1 (:6443; etcd :2379/:2380)
//	pod k                        127.S.(10+i).(k+10)
//
// Kubernetes refuses loopback addresses in EndpointSlices, so in loopback mode
// the EndpointSlice controller cannot publish the workloads' addresses; see
// [Env.Isolated].
//
// # Pods
//
// A [WorkloadSpec] can describe a meshed pod: Init steps run as root in
// the pod's namespace before anything else (`sidecar iptables`), Sidecars
// run beside the app, the app runs as another user (RunAs, with
// setpriv(1), so iptables can tell it from its sidecar), ReadyHTTP gates
// the Pod's readiness on a sidecar's, and ResolvConf is the pod's
// /etc/resolv.conf (written to /etc/netns/<pod netns>/resolv.conf, which
// `ip netns exec` mounts for every process of the pod, and removed with
// it). [Workload.CommandAs] runs a client in the pod as the app's user.
//
// # Credentials
//
// Each cluster has its own CA (crypto/x509, generated at start), an API server
// certificate valid for every address above, and static bearer tokens for
// [UserAdmin] (system:masters), [UserControllerManager] and [UserFederator]
// (system:isthmus:federator, no groups: its permissions come only from the
// RBAC the test applies). [Cluster.KubeconfigFor] gives each user's kubeconfig
// for the host and for in-cluster processes; both verify the server against
// the cluster CA.
//
// # Debugging
//
// Every process logs to <WorkDir>/<cluster>/logs/<name>.log. A start-up
// failure quotes the end of the relevant log; [StartT] prints the ends of the
// control-plane logs when the test failed. Options.KeepWorkDir (or
// ISTHMUS_LOCALCLUSTER_KEEP=1 with [StartT]) keeps the directory after Close,
// until the next Start sweeps it.
//
// # Cleanliness
//
// Every child runs in its own process group with Pdeathsig=SIGKILL and is
// tracked by pid; [Env.Close] stops them (SIGTERM, a bounded wait, SIGKILL),
// deletes every namespace and root-side veth it made and removes the work
// directory. [Start] first sweeps what dead earlier runs left behind (their
// pid is in every name).
package localcluster
