package localcluster

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Bounds on cluster start-up.
const (
	// readyTimeout bounds the wait for kube-apiserver's /readyz.
	readyTimeout = 60 * time.Second
	// controllersTimeout bounds the wait for kube-controller-manager to
	// create the default ServiceAccount.
	controllersTimeout = 60 * time.Second
	// pollInterval is how often start-up waits look again.
	pollInterval = 200 * time.Millisecond
	// probeTimeout bounds one readiness request.
	probeTimeout = 2 * time.Second

	apiServerPort = 6443
	etcdPort      = 2379
	etcdPeerPort  = 2380
	serviceCIDR   = "10.96.0.0/16"
	// serviceIssuer is both the issuer and the audience of service account
	// tokens, as in most clusters.
	serviceIssuer = "https://kubernetes.default.svc"
)

// Node labels written by AddNode.
const (
	LabelRegion   = "topology.kubernetes.io/region"
	LabelZone     = "topology.kubernetes.io/zone"
	LabelHostname = "kubernetes.io/hostname"
)

// kcmControllers are the kube-controller-manager controllers the harness
// runs: what a federator observes in a real cluster (EndpointSlices, service
// accounts, namespace and owner clean-up). There are no kubelets, so nothing
// that watches node health runs.
var kcmControllers = []string{
	"endpointslice", "endpointslicemirroring", "serviceaccount", "serviceaccount-token",
	"namespace", "garbagecollector", "root-ca-cert-publisher",
}

// ClusterOptions configures one cluster.
type ClusterOptions struct {
	// Name is the cluster name: 1–20 lowercase letters, digits and '-',
	// starting and ending with a letter or digit; not "wan". Required.
	Name string
	// NodeRegion and NodeZone label the default node <Name>-node-1.
	// Defaults: "r1" and "<Name>-z1".
	NodeRegion string
	NodeZone   string
	// Users are added to the built-in users (UserAdmin,
	// UserControllerManager, UserFederator); their Name must be unique.
	Users []User
}

var clusterNameRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$`)

// Cluster is one simulated cluster: its etcd, kube-apiserver and
// kube-controller-manager, network namespace (root mode), credentials and
// workloads.
type Cluster struct {
	env  *Env
	name string
	idx  int
	plan addressPlan
	log  *slog.Logger

	netns  string // the node namespace; empty in loopback mode
	uplink string // root-side veth; empty in loopback mode

	dir    string
	logDir string
	pki    *clusterPKI
	users  []User
	// kubeconfigs maps a user's Name to its host and in-cluster kubeconfig.
	kubeconfigs map[string][2]string
	defaultNode string
	nodeRegion  string
	nodeZone    string

	etcd, apiserver, kcm *Process
	client               kubernetes.Interface

	// mu guards the fields below.
	mu        sync.Mutex
	workloads map[string]*Workload // by namespace/name
	podUsed   map[int]bool         // pod indexes in use
	podNext   int                  // where the next pod index search starts
	egress    bool                 // AllowPodEgress was called
}

func newCluster(env *Env, idx int, o ClusterOptions) (*Cluster, error) {
	c := &Cluster{
		env:         env,
		name:        o.Name,
		idx:         idx,
		plan:        addressPlan{root: env.root, slot: env.slot.slot, idx: idx},
		log:         env.log.With("cluster", o.Name),
		dir:         filepath.Join(env.workDir, o.Name),
		kubeconfigs: map[string][2]string{},
		defaultNode: o.Name + "-node-1",
		nodeRegion:  o.NodeRegion,
		nodeZone:    o.NodeZone,
		workloads:   map[string]*Workload{},
		podUsed:     map[int]bool{},
		podNext:     1,
	}
	c.logDir = filepath.Join(c.dir, "logs")
	if c.nodeRegion == "" {
		c.nodeRegion = "r1"
	}
	if c.nodeZone == "" {
		c.nodeZone = o.Name + "-z1"
	}
	if env.root {
		c.netns = env.runID + "-" + o.Name
		var err error
		if c.uplink, err = uplinkName(os.Getpid(), env.seq, idx); err != nil {
			return nil, err
		}
	}
	c.users = builtinUsers()
	for _, u := range o.Users {
		if u.Name == "" || u.Username == "" {
			return nil, fmt.Errorf("cluster %q: user needs Name and Username: %+v", o.Name, u)
		}
		if slices.ContainsFunc(c.users, func(x User) bool { return x.Name == u.Name }) {
			return nil, fmt.Errorf("cluster %q: duplicate user %q", o.Name, u.Name)
		}
		u.Groups = slices.Clone(u.Groups)
		c.users = append(c.users, u)
	}
	for i := range c.users {
		c.users[i].token = randomToken()
	}
	return c, nil
}

// Name is the cluster's name.
func (c *Cluster) Name() string { return c.name }

// Index is the cluster's position in Options.Clusters; addresses derive from
// it.
func (c *Cluster) Index() int { return c.idx }

// NetNS is the node network namespace that holds the control plane and
// processes started with StartProcess; empty in loopback mode.
func (c *Cluster) NetNS() string { return c.netns }

// NodeIP is the node's address: where in-cluster processes reach the API
// server, and the pods' gateway (root mode).
func (c *Cluster) NodeIP() netip.Addr { return c.plan.nodeIP() }

// WANIP is the node's address on the inter-cluster network, where gateways
// and federators of other clusters reach this one. Only processes in a node
// namespace can reach it (root mode).
func (c *Cluster) WANIP() netip.Addr { return c.plan.wanIP() }

// PodPrefix is the cluster's pod network (root mode), or the loopback /24
// its pod addresses come from.
func (c *Cluster) PodPrefix() netip.Prefix {
	if c.plan.root {
		return netip.PrefixFrom(c.NodeIP(), 16).Masked()
	}
	return netip.PrefixFrom(c.NodeIP(), 24).Masked()
}

// APIServerURL is where the test process reaches the API server.
func (c *Cluster) APIServerURL() string { return apiURL(c.plan.hostAPIAddr()) }

// InClusterAPIServerURL is where processes in the node or a pod namespace
// reach the API server.
func (c *Cluster) InClusterAPIServerURL() string { return apiURL(c.NodeIP()) }

func apiURL(a netip.Addr) string {
	return "https://" + netip.AddrPortFrom(a, apiServerPort).String()
}

// CAFile is the path of the cluster CA certificate (PEM), which signed the
// API server's certificate.
func (c *Cluster) CAFile() string { return c.pki.caCertFile }

// CAPEM is the cluster CA certificate.
func (c *Cluster) CAPEM() []byte { return slices.Clone(c.pki.caPEM) }

// ServiceAccountSigningKeyFile is the PEM private key the API server signs
// ServiceAccount tokens with; tests use it to forge tokens the API server
// would accept but for one chosen defect (expired, wrong audience...).
func (c *Cluster) ServiceAccountSigningKeyFile() string { return c.pki.saKeyFile }

// Dir is the cluster's directory under the environment's work directory.
func (c *Cluster) Dir() string { return c.dir }

// LogDir holds the logs of the cluster's processes and workloads.
func (c *Cluster) LogDir() string { return c.logDir }

// DefaultNode is the name of the node Start created (<name>-node-1).
func (c *Cluster) DefaultNode() string { return c.defaultNode }

// Etcd is the cluster's etcd process, for tests that kill or inspect it.
func (c *Cluster) Etcd() *Process { return c.etcd }

// APIServer is the cluster's kube-apiserver process.
func (c *Cluster) APIServer() *Process { return c.apiserver }

// ControllerManager is the cluster's kube-controller-manager process.
func (c *Cluster) ControllerManager() *Process { return c.kcm }

// Client is a clientset with UserAdmin's credentials.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// KubeconfigFor returns the paths of user's kubeconfig for the test process
// (host) and for processes in the node or pod namespaces (inCluster). user
// is the User's Name, e.g. UserFederator.
func (c *Cluster) KubeconfigFor(user string) (host, inCluster string, err error) {
	kc, ok := c.kubeconfigs[user]
	if !ok {
		return "", "", fmt.Errorf("cluster %q has no user %q", c.name, user)
	}
	return kc[0], kc[1], nil
}

// RESTConfig is a client config for user (a User's Name) that the test
// process can use.
func (c *Cluster) RESTConfig(user string) (*rest.Config, error) {
	i := slices.IndexFunc(c.users, func(u User) bool { return u.Name == user })
	if i < 0 {
		return nil, fmt.Errorf("cluster %q has no user %q", c.name, user)
	}
	return &rest.Config{
		Host:            c.APIServerURL(),
		BearerToken:     c.users[i].token,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.CAPEM()},
		QPS:             50,
		Burst:           100,
		UserAgent:       "isthmus-localcluster/" + c.name + "/" + user,
		// The API server is on a link-local or loopback address of this
		// machine: never through an HTTPS_PROXY from the environment.
		Proxy: func(*http.Request) (*url.URL, error) { return nil, nil },
	}, nil
}

// ClientFor is a clientset for user (a User's Name).
func (c *Cluster) ClientFor(user string) (kubernetes.Interface, error) {
	cfg, err := c.RESTConfig(user)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// start brings the cluster up: network, credentials, etcd, kube-apiserver,
// kube-controller-manager, the default node. It returns once the API server
// is ready and the controllers run. On error the caller closes the
// environment, which cleans up whatever was made.
func (c *Cluster) start(ctx context.Context) error {
	t0 := time.Now()
	if err := os.MkdirAll(c.logDir, 0o755); err != nil {
		return err
	}
	if err := c.setupCredentials(); err != nil {
		return fmt.Errorf("credentials: %w", err)
	}
	if c.plan.root {
		if err := c.setupNetwork(ctx); err != nil {
			return fmt.Errorf("network: %w", err)
		}
	}
	if err := c.startEtcd(); err != nil {
		return err
	}
	if err := c.startAPIServer(); err != nil {
		return err
	}
	if err := c.waitReady(ctx); err != nil {
		return err
	}
	c.log.Debug("kube-apiserver ready", "after", time.Since(t0).Round(time.Millisecond))
	if err := c.startControllerManager(); err != nil {
		return err
	}
	if _, err := c.AddNode(ctx, c.defaultNode, c.nodeRegion, c.nodeZone); err != nil {
		return err
	}
	if err := c.waitControllers(ctx); err != nil {
		return err
	}
	c.log.Info("cluster ready", "api", c.APIServerURL(), "netns", c.netns, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

func (c *Cluster) setupCredentials() error {
	ips := []netip.Addr{
		c.NodeIP(), c.plan.hostAPIAddr(), c.WANIP(),
		netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("10.96.0.1"),
	}
	slices.SortFunc(ips, func(a, b netip.Addr) int { return a.Compare(b) })
	ips = slices.Compact(ips)
	dns := []string{
		"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc.cluster.local",
	}
	var err error
	if c.pki, err = newClusterPKI(filepath.Join(c.dir, "pki"), c.name, dns, ips); err != nil {
		return err
	}
	if err := writeTokenFile(filepath.Join(c.dir, "tokens.csv"), c.users); err != nil {
		return err
	}
	kcDir := filepath.Join(c.dir, "kubeconfig")
	if err := os.MkdirAll(kcDir, 0o700); err != nil {
		return err
	}
	for _, u := range c.users {
		host := filepath.Join(kcDir, u.Name+".host.kubeconfig")
		in := filepath.Join(kcDir, u.Name+".incluster.kubeconfig")
		if err := c.writeKubeconfig(host, c.APIServerURL(), u); err != nil {
			return err
		}
		if err := c.writeKubeconfig(in, c.InClusterAPIServerURL(), u); err != nil {
			return err
		}
		c.kubeconfigs[u.Name] = [2]string{host, in}
	}
	c.client, err = c.ClientFor(UserAdmin)
	return err
}

// writeKubeconfig writes a kubeconfig for u against server that trusts only
// the cluster CA. (Written by hand: clientcmd would pull modules the
// product does not otherwise need.)
func (c *Cluster) writeKubeconfig(path, server string, u User) error {
	ctxName := c.name + "-" + u.Name
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Config\n")
	fmt.Fprintf(&b, "clusters:\n- name: %q\n  cluster:\n    server: %q\n    certificate-authority-data: %s\n",
		c.name, server, base64.StdEncoding.EncodeToString(c.pki.caPEM))
	fmt.Fprintf(&b, "users:\n- name: %q\n  user:\n    token: %q\n", u.Name, u.token)
	fmt.Fprintf(&b, "contexts:\n- name: %q\n  context:\n    cluster: %q\n    user: %q\n    namespace: default\n", ctxName, c.name, u.Name)
	fmt.Fprintf(&b, "current-context: %q\n", ctxName)
	return os.WriteFile(path, []byte(b.String()), 0o600)
}

// setupNetwork makes the node namespace, its bridge, the uplink to the root
// namespace and the link into the WAN.
func (c *Cluster) setupNetwork(ctx context.Context) error {
	if err := c.env.addNetNS(ctx, c.netns); err != nil {
		return err
	}
	if err := setIPForward(ctx, c.netns, false); err != nil {
		return err
	}
	c.env.registerLink(c.uplink)
	ns := c.netns
	node := netip.PrefixFrom(c.NodeIP(), 16).String()
	up := func(a netip.Addr) string { return netip.PrefixFrom(a, 30).String() }
	wanPeer := "n" + strconv.Itoa(c.idx)
	err := ipBatch(ctx,
		[]string{"-n", ns, "link", "add", "br0", "type", "bridge"},
		[]string{"-n", ns, "addr", "add", node, "dev", "br0"},
		[]string{"-n", ns, "link", "set", "br0", "up"},

		[]string{"link", "add", c.uplink, "type", "veth", "peer", "name", "up0", "netns", ns},
		[]string{"addr", "add", up(c.plan.uplinkRoot()), "dev", c.uplink},
		[]string{"link", "set", c.uplink, "up"},
		[]string{"-n", ns, "addr", "add", up(c.plan.uplinkNode()), "dev", "up0"},
		[]string{"-n", ns, "link", "set", "up0", "up"},

		[]string{"-n", ns, "link", "add", "wan0", "type", "veth", "peer", "name", wanPeer, "netns", c.env.wanNS},
		[]string{"-n", c.env.wanNS, "link", "set", wanPeer, "master", "br0"},
		[]string{"-n", c.env.wanNS, "link", "set", wanPeer, "up"},
		[]string{"-n", ns, "addr", "add", netip.PrefixFrom(c.WANIP(), 24).String(), "dev", "wan0"},
		[]string{"-n", ns, "link", "set", "wan0", "up"},
	)
	if err != nil {
		return err
	}
	return c.guardControlPlane(ctx)
}

// guardControlPlane keeps the cluster's control plane off the WAN: the
// API server listens on every address of the node namespace, but no other
// cluster may reach it, as in a real deployment where only the east-west
// gateway faces other clusters.
func (c *Cluster) guardControlPlane(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, ipTimeout)
	defer cancel()
	_, err := runBounded(ctx, "ip", "netns", "exec", c.netns,
		"iptables", "-w", "5", "-A", "INPUT", "-i", "wan0", "-p", "tcp", "--dport", "6443", "-j", "REJECT", "--reject-with", "tcp-reset")
	if err != nil {
		return fmt.Errorf("keep the API server off the WAN (is iptables installed?): %w", err)
	}
	return nil
}

// maxEgressPorts is what one iptables multiport match takes.
const maxEgressPorts = 15

// AllowPodEgress lets the cluster's pods open TCP connections to ports on
// the WAN, masqueraded as the node's WAN address, as a real cluster's
// nodes SNAT their pods' egress: what a sidecar needs to reach the
// east-west gateways of other clusters (15443). Nothing else becomes
// reachable: the node forwards only new connections from its pod network
// to these ports on the WAN (and their replies), and it has no route to
// any other cluster's pod network, so pods of different clusters still
// reach each other only through a gateway. It can be called once per
// cluster; in loopback mode nothing is isolated and it does nothing.
func (c *Cluster) AllowPodEgress(ctx context.Context, ports ...uint16) error {
	if !c.plan.root {
		return nil
	}
	if len(ports) == 0 || len(ports) > maxEgressPorts {
		return fmt.Errorf("cluster %q: pod egress: want 1 to %d ports, got %d", c.name, maxEgressPorts, len(ports))
	}
	list := make([]string, 0, len(ports))
	for _, p := range ports {
		if p == 0 {
			return fmt.Errorf("cluster %q: pod egress: 0 is not a port", c.name)
		}
		list = append(list, strconv.Itoa(int(p)))
	}
	c.mu.Lock()
	done := c.egress
	c.egress = true
	c.mu.Unlock()
	if done {
		return fmt.Errorf("cluster %q: pod egress is already allowed", c.name)
	}
	pods := c.PodPrefix().String()
	// FORWARD first, forwarding last: there is never a moment when the
	// node forwards anything else. Bridged traffic between the node's own
	// pods passes FORWARD too where br_netfilter is loaded.
	rules := [][]string{
		{"-A", "FORWARD", "-i", "br0", "-o", "br0", "-j", "ACCEPT"},
		{"-A", "FORWARD", "-i", "br0", "-o", "wan0", "-s", pods, "-p", "tcp", "-m", "multiport", "--dports", strings.Join(list, ","),
			"-m", "conntrack", "--ctstate", "NEW,ESTABLISHED", "-j", "ACCEPT"},
		{"-A", "FORWARD", "-i", "wan0", "-o", "br0", "-d", pods, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
		{"-A", "FORWARD", "-j", "DROP"},
		{"-t", "nat", "-A", "POSTROUTING", "-s", pods, "-o", "wan0", "-j", "MASQUERADE"},
	}
	for _, r := range rules {
		rctx, cancel := context.WithTimeout(ctx, ipTimeout)
		_, err := runBounded(rctx, "ip", append([]string{"netns", "exec", c.netns, "iptables", "-w", "5"}, r...)...)
		cancel()
		if err != nil {
			return fmt.Errorf("cluster %q: pod egress: %w", c.name, err)
		}
	}
	if err := setIPForward(ctx, c.netns, true); err != nil {
		return fmt.Errorf("cluster %q: pod egress: %w", c.name, err)
	}
	c.log.Debug("pods may reach the WAN", "ports", list)
	return nil
}

// etcdAddr is where etcd listens: loopback of the node namespace, or the
// node's own loopback address in loopback mode.
func (c *Cluster) etcdAddr() netip.Addr {
	if c.plan.root {
		return netip.MustParseAddr("127.0.0.1")
	}
	return c.NodeIP()
}

func (c *Cluster) startEtcd() error {
	a := c.etcdAddr()
	client := "http://" + netip.AddrPortFrom(a, etcdPort).String()
	peer := "http://" + netip.AddrPortFrom(a, etcdPeerPort).String()
	var err error
	c.etcd, err = c.startControlPlane("etcd", true, []string{
		c.env.bins.etcd,
		"--name=" + c.name,
		"--data-dir=" + filepath.Join(c.dir, "etcd"),
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=" + c.name + "=" + peer,
		"--initial-cluster-state=new",
		"--logger=zap",
		"--log-outputs=stderr",
	})
	return err
}

func (c *Cluster) startAPIServer() error {
	bind := c.NodeIP().String()
	if c.plan.root {
		bind = "0.0.0.0"
	}
	args := []string{
		c.env.bins.apiserver,
		"--etcd-servers=http://" + netip.AddrPortFrom(c.etcdAddr(), etcdPort).String(),
		"--etcd-prefix=/" + c.name,
		"--secure-port=" + strconv.Itoa(apiServerPort),
		"--bind-address=" + bind,
		"--tls-cert-file=" + c.pki.servingCert,
		"--tls-private-key-file=" + c.pki.servingKey,
		"--client-ca-file=" + c.pki.caCertFile,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--service-account-key-file=" + c.pki.saPubFile,
		"--service-account-signing-key-file=" + c.pki.saKeyFile,
		"--service-account-issuer=" + serviceIssuer,
		"--api-audiences=" + serviceIssuer,
		"--token-auth-file=" + filepath.Join(c.dir, "tokens.csv"),
		"--authorization-mode=Node,RBAC",
		"--profiling=false",
	}
	if c.plan.root {
		args = append(args, "--advertise-address="+c.NodeIP().String())
	} else {
		// The endpoint reconciler refuses loopback addresses for the
		// kubernetes Service, so it does not run; nothing here needs it.
		args = append(args, "--advertise-address="+c.NodeIP().String(), "--endpoint-reconciler-type=none")
	}
	var err error
	c.apiserver, err = c.startControlPlane("kube-apiserver", false, args)
	return err
}

func (c *Cluster) startControllerManager() error {
	_, inCluster, err := c.KubeconfigFor(UserControllerManager)
	if err != nil {
		return err
	}
	c.kcm, err = c.startControlPlane("kube-controller-manager", false, []string{
		c.env.bins.kcm,
		"--kubeconfig=" + inCluster,
		"--leader-elect=false",
		"--controllers=" + strings.Join(kcmControllers, ","),
		"--service-account-private-key-file=" + c.pki.saKeyFile,
		"--root-ca-file=" + c.pki.caCertFile,
		"--use-service-account-credentials=true",
		"--secure-port=0",
	})
	return err
}

// startControlPlane starts a control-plane process in the node namespace
// and tracks it; etcd is stopped last.
func (c *Cluster) startControlPlane(name string, isEtcd bool, argv []string) (*Process, error) {
	logPath := filepath.Join(c.logDir, name+".log")
	p, err := startProcess(name, netnsExecArgv(c.netns, argv), nil, c.dir, logPath, c.env.onExit(c.log, true))
	if err != nil {
		return nil, fmt.Errorf("cluster %q: %w", c.name, err)
	}
	if err := c.env.track(p, isEtcd); err != nil {
		return nil, fmt.Errorf("cluster %q: %s: %w", c.name, name, err)
	}
	c.log.Debug("started", "process", name, "pid", p.Pid(), "log", logPath)
	return p, nil
}

// waitReady waits (bounded) until /readyz answers 200 to the admin.
func (c *Cluster) waitReady(ctx context.Context) error {
	rc := c.client.Discovery().RESTClient()
	var last string
	err := poll(ctx, readyTimeout, func(ctx context.Context) (bool, error) {
		for _, p := range []*Process{c.etcd, c.apiserver} {
			if done, _ := p.Exited(); done {
				return false, p.describeExit()
			}
		}
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		defer cancel()
		code := 0
		res := rc.Get().AbsPath("/readyz").Do(pctx).StatusCode(&code)
		if code == http.StatusOK {
			return true, nil
		}
		if ctx.Err() == nil {
			last = fmt.Sprintf("status %d: %v", code, res.Error())
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("cluster %q: kube-apiserver at %s not ready (%s): %w\n--- last lines of %s ---\n%s\n--- last lines of %s ---\n%s",
			c.name, c.APIServerURL(), last, err, c.apiserver.LogPath(), c.apiserver.Tail(tailLines), c.etcd.LogPath(), c.etcd.Tail(tailLines))
	}
	return nil
}

// waitControllers waits (bounded) until kube-controller-manager has created
// the default ServiceAccount: its controllers are running.
func (c *Cluster) waitControllers(ctx context.Context) error {
	var last error
	err := poll(ctx, controllersTimeout, func(ctx context.Context) (bool, error) {
		if done, _ := c.kcm.Exited(); done {
			return false, c.kcm.describeExit()
		}
		_, err := c.client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		if ctx.Err() == nil {
			last = err
		}
		return err == nil, nil
	})
	if err != nil {
		return fmt.Errorf("cluster %q: kube-controller-manager did not create the default ServiceAccount (last: %v): %w\n--- last lines of %s ---\n%s",
			c.name, last, err, c.kcm.LogPath(), c.kcm.Tail(tailLines))
	}
	return nil
}

// poll calls cond every pollInterval until it returns true or an error, ctx
// ends, or timeout passes.
func poll(ctx context.Context, timeout time.Duration, cond func(context.Context) (bool, error)) error {
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	for {
		ok, err := cond(pctx)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-pctx.Done():
			if ctx.Err() != nil {
				return fmt.Errorf("cancelled: %w", ctx.Err())
			}
			return fmt.Errorf("timed out after %s", timeout)
		case <-ticker.C:
		}
	}
}

// AddNode creates a Ready Node object (there is no kubelet behind it) with
// region, zone and hostname labels, and the cluster's node IP as its
// InternalIP.
func (c *Cluster) AddNode(ctx context.Context, name, region, zone string) (*corev1.Node, error) {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: name,
		Labels: map[string]string{
			LabelRegion:   region,
			LabelZone:     zone,
			LabelHostname: name,
		},
	}}
	created, err := c.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("cluster %q: create node %q: %w", c.name, name, err)
	}
	now := metav1.Now()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("8"),
		corev1.ResourceMemory: resource.MustParse("32Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	created.Status.Capacity = capacity
	created.Status.Allocatable = capacity
	created.Status.Phase = corev1.NodeRunning
	created.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: c.NodeIP().String()},
		{Type: corev1.NodeHostName, Address: name},
	}
	created.Status.Conditions = []corev1.NodeCondition{{
		Type:               corev1.NodeReady,
		Status:             corev1.ConditionTrue,
		Reason:             "LocalClusterNode",
		Message:            "simulated by test/localcluster",
		LastHeartbeatTime:  now,
		LastTransitionTime: now,
	}}
	updated, err := c.client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("cluster %q: node %q status: %w", c.name, name, err)
	}
	return updated, nil
}

// StartProcess runs a long-lived process in the cluster's node network
// namespace (the host's in loopback mode), where the control plane runs and
// the WAN is reachable: federators and gateways run this way. Its output
// goes to <LogDir>/<Name>.log. ctx is not the process's lifetime: Stop it,
// or Env.Close does.
func (c *Cluster) StartProcess(ctx context.Context, spec ProcessSpec) (*Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return c.startUserProcess(c.netns, spec)
}

var processNameRe = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

func (c *Cluster) startUserProcess(netns string, spec ProcessSpec) (*Process, error) {
	if !processNameRe.MatchString(spec.Name) {
		return nil, fmt.Errorf("cluster %q: process name %q: want letters, digits, '.', '_' or '-'", c.name, spec.Name)
	}
	if len(spec.Command) == 0 {
		return nil, fmt.Errorf("cluster %q: process %q: no command", c.name, spec.Name)
	}
	if c.env.isClosed() {
		return nil, fmt.Errorf("cluster %q: %w", c.name, ErrClosed)
	}
	dir := spec.Dir
	if dir == "" {
		dir = c.dir
	}
	argv, err := asUserArgv(spec.RunAs, spec.Command)
	if err != nil {
		return nil, fmt.Errorf("cluster %q: process %q: %w", c.name, spec.Name, err)
	}
	logPath := filepath.Join(c.logDir, spec.Name+".log")
	p, err := startProcess(spec.Name, netnsExecArgv(netns, argv), spec.Env, dir, logPath, c.env.onExit(c.log, false))
	if err != nil {
		return nil, fmt.Errorf("cluster %q: %w", c.name, err)
	}
	if err := c.env.track(p, false); err != nil {
		return nil, fmt.Errorf("cluster %q: %s: %w", c.name, spec.Name, err)
	}
	c.log.Debug("started", "process", spec.Name, "pid", p.Pid(), "netns", netns, "log", logPath)
	return p, nil
}

// DialContext connects from the cluster's node network namespace (the
// host's in loopback mode): what a federator or gateway there can reach —
// the cluster's pods and, over the WAN, other clusters' nodes.
func (c *Cluster) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return dialInNetNS(ctx, c.netns, network, addr)
}

// Command is like exec.CommandContext for a short-lived command in the
// cluster's node network namespace (the host's in loopback mode). The
// command gets its own process group, which is SIGKILLed when ctx ends.
// The harness does not track it: the caller waits for it.
func (c *Cluster) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return commandIn(ctx, c.netns, name, args...)
}

func commandIn(ctx context.Context, netns, name string, args ...string) *exec.Cmd {
	return commandArgv(ctx, netnsExecArgv(netns, append([]string{name}, args...)))
}

// commandArgv is commandIn's command for a full argv.
func commandArgv(ctx context.Context, argv []string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.SysProcAttr = childSysProcAttr()
	cmd.Cancel = func() error {
		err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if errors.Is(err, syscall.ESRCH) {
			return os.ErrProcessDone
		}
		return err
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// ensureNamespace creates namespace ns and ServiceAccount sa in it if they
// do not exist.
func (c *Cluster) ensureNamespace(ctx context.Context, ns, sa string) error {
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %q: %w", ns, err)
	}
	// Created here even for "default": the ServiceAccount controller would
	// make it shortly, and the Pod's admission needs it now.
	_, err = c.client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create service account %s/%s: %w", ns, sa, err)
	}
	return nil
}
