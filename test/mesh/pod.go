package mesh

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/kube"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// The users a meshed pod's containers run as: iptables tells the app's
// traffic, which it captures, from the sidecar's, which it lets through,
// by uid (Istio's 1337 for the proxy).
var (
	AppUser   = localcluster.Credential{UID: 1000, GID: 1000}
	ProxyUser = localcluster.Credential{UID: 1337, GID: 1337}
)

// The echo app's ports and the Service ports ServeEcho gives them.
const (
	EchoHTTPPort    = 8080 // HTTP/1.1 and h2c
	EchoGRPCPort    = 9090
	EchoTCPPort     = 9000
	ServiceHTTPPort = 80 // → EchoHTTPPort, appProtocol http: HTTP/1.1 between sidecars, whatever the app spoke
	// ServiceHTTP2Port → EchoHTTPPort too, appProtocol http2: HTTP/2
	// between sidecars, whatever the app spoke.
	ServiceHTTP2Port = 81
	ServiceGRPCPort  = 9090
	ServiceTCPPort   = 9000
)

// SidecarHealthPort serves the sidecar's /healthz/ready and
// /stats/prometheus.
const SidecarHealthPort = 15020

// sidecarTokenTTL is the lifetime of the ServiceAccount token a sidecar
// authenticates to the CA with. Its certificate lives a day (the
// federator's default), so within a test or a demo it asks only once.
const sidecarTokenTTL = time.Hour

// PodSpec is a pod of the mesh.
type PodSpec struct {
	// Name and Namespace of the Pod; Namespace is created if missing
	// (default "demo").
	Name, Namespace string
	// ServiceAccount the pod runs as (created if missing); its SPIFFE ID
	// is spiffe://<cluster>.mesh/ns/<Namespace>/sa/<ServiceAccount>.
	// Default: Name.
	ServiceAccount string
	// Labels of the Pod, what Services select.
	Labels map[string]string
	// NoSidecar runs the app alone: no capture, no sidecar, no
	// certificate — a workload outside the mesh.
	NoSidecar bool
	// NoCapture runs the sidecar without `sidecar iptables`: explicit
	// mode, where the app sends its requests to 127.0.0.1:15001 itself.
	NoCapture bool
}

// Pod is a running pod: the echo app, and unless NoSidecar, its sidecar.
type Pod struct {
	W       *localcluster.Workload
	Cluster *Cluster
	Spec    PodSpec
}

// RunPod runs a pod: `sidecar iptables` as root in the pod's namespace,
// `sidecar run` as ProxyUser with a ServiceAccount token for the CA and
// the CA's roots, and the echo app as AppUser; the Pod turns Ready once
// the app listens and the sidecar is ready. It needs root
// (ErrNotIsolated).
func (c *Cluster) RunPod(ctx context.Context, spec PodSpec) (*Pod, error) {
	if !c.mesh.Env.Isolated() {
		return nil, ErrNotIsolated
	}
	if spec.Namespace == "" {
		spec.Namespace = "demo"
	}
	if spec.ServiceAccount == "" {
		spec.ServiceAccount = spec.Name
	}
	if err := c.ensureServiceAccount(ctx, spec.Namespace, spec.ServiceAccount); err != nil {
		return nil, err
	}
	bin := c.mesh.podBin
	ws := localcluster.WorkloadSpec{
		Name: spec.Name, Namespace: spec.Namespace, ServiceAccount: spec.ServiceAccount, Labels: spec.Labels,
		Command: []string{filepath.Join(bin, "echo"),
			"-listen", ":" + strconv.Itoa(EchoHTTPPort),
			"-grpc-listen", ":" + strconv.Itoa(EchoGRPCPort),
			"-tcp-listen", ":" + strconv.Itoa(EchoTCPPort)},
		Env:   []string{"CLUSTER_NAME=" + c.Name()},
		RunAs: &AppUser,
		Ports: []corev1.ContainerPort{
			{Name: "http", ContainerPort: EchoHTTPPort}, {Name: "grpc", ContainerPort: EchoGRPCPort}, {Name: "tcp", ContainerPort: EchoTCPPort},
		},
		ReadyPort: EchoHTTPPort,
		// What a kubelet writes for a pod with the default dnsPolicy. The
		// cluster DNS address is never reached: the capture sends every
		// query to the sidecar's DNS proxy, which answers clusterset
		// names itself.
		ResolvConf: fmt.Sprintf("nameserver 10.96.0.10\nsearch %s.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n", spec.Namespace),
	}
	if !spec.NoSidecar {
		// What Istio's injector sets: the federator gives the sidecars
		// mTLS to the Services whose pods all carry it.
		ws.Labels = maps.Clone(spec.Labels)
		if ws.Labels == nil {
			ws.Labels = map[string]string{}
		}
		ws.Labels[kube.TLSModeLabel] = kube.TLSModeIstio
		files, err := c.sidecarFiles(ctx, spec)
		if err != nil {
			return nil, err
		}
		if !spec.NoCapture {
			ws.Init = [][]string{{filepath.Join(bin, "sidecar"), "iptables",
				"--proxy-uid", strconv.Itoa(int(ProxyUser.UID)), "--proxy-gid", strconv.Itoa(int(ProxyUser.GID))}}
		}
		ws.Sidecars = []localcluster.ProcessSpec{{
			Name: "isthmus-proxy",
			Command: append([]string{filepath.Join(bin, "sidecar"), "run",
				"--xds-address", netip.AddrPortFrom(c.K.NodeIP(), caPort()).String(),
				"--token-file", files.token, "--ca-roots-file", files.roots,
				"--health-addr", ":" + strconv.Itoa(SidecarHealthPort)},
				c.mesh.opts.SidecarArgs...),
			Env:   []string{"CLUSTER_NAME=" + c.Name(), "SERVICE_ACCOUNT=" + spec.ServiceAccount},
			RunAs: &ProxyUser,
		}}
		ws.ReadyHTTP = &localcluster.HTTPProbe{Port: SidecarHealthPort, Path: "/healthz/ready"}
	}
	w, err := c.K.RunWorkload(ctx, ws)
	if err != nil {
		return nil, err
	}
	p := &Pod{W: w, Cluster: c, Spec: spec}
	c.mu.Lock()
	c.pods = append(c.pods, p)
	c.mu.Unlock()
	return p, nil
}

func caPort() uint16 {
	p, _ := strconv.ParseUint(fedproc.CAPort, 10, 16)
	return uint16(p)
}

func (c *Cluster) ensureServiceAccount(ctx context.Context, ns, sa string) error {
	kc := c.K.Client()
	_, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster %s: create namespace %s: %w", c.Name(), ns, err)
	}
	_, err = kc.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster %s: create service account %s/%s: %w", c.Name(), ns, sa, err)
	}
	return nil
}

// sidecarFiles are what a pod's volumes give its sidecar.
type sidecarFiles struct {
	token, roots string
}

// sidecarFiles writes what the kubelet would mount into the sidecar: a
// projected ServiceAccount token for audience isthmus-ca (readable only by
// the sidecar's user) and the CA roots from ConfigMap isthmus-ca-root-cert.
func (c *Cluster) sidecarFiles(ctx context.Context, spec PodSpec) (sidecarFiles, error) {
	kc := c.K.Client()
	ttl := int64(sidecarTokenTTL / time.Second)
	tr, err := kc.CoreV1().ServiceAccounts(spec.Namespace).CreateToken(ctx, spec.ServiceAccount, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: []string{"isthmus-ca"}, ExpirationSeconds: &ttl},
	}, metav1.CreateOptions{})
	if err != nil {
		return sidecarFiles{}, fmt.Errorf("cluster %s: token for %s/%s: %w", c.Name(), spec.Namespace, spec.ServiceAccount, err)
	}
	var roots string
	err = Poll(ctx, time.Minute, "ConfigMap isthmus-system/"+ca.RootsConfigMapName, func(ctx context.Context) (bool, string) {
		cm, err := kc.CoreV1().ConfigMaps("isthmus-system").Get(ctx, ca.RootsConfigMapName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		roots = cm.Data[ca.KeyRootCert]
		return roots != "", "no " + ca.KeyRootCert + " in it"
	})
	if err != nil {
		return sidecarFiles{}, fmt.Errorf("cluster %s: %w", c.Name(), err)
	}
	dir := filepath.Join(c.K.Dir(), "pods", spec.Namespace+"."+spec.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return sidecarFiles{}, err
	}
	f := sidecarFiles{token: filepath.Join(dir, "isthmus-ca-token"), roots: filepath.Join(dir, "root-cert.pem")}
	if err := os.WriteFile(f.roots, []byte(roots), 0o644); err != nil {
		return sidecarFiles{}, err
	}
	if err := os.WriteFile(f.token, []byte(tr.Status.Token), 0o600); err != nil {
		return sidecarFiles{}, err
	}
	if err := os.Chown(f.token, int(ProxyUser.UID), int(ProxyUser.GID)); err != nil {
		return sidecarFiles{}, err
	}
	return f, nil
}

// ServeEcho runs replicas meshed echo pods (name-0 …, ServiceAccount
// name, label app=name) behind Service ns/name with ports http 80 → 8080,
// http2 81 → 8080, grpc 9090 and tcp 9000. Export exports it.
func (c *Cluster) ServeEcho(ctx context.Context, ns, name string, replicas int) ([]*Pod, error) {
	var pods []*Pod
	for i := range replicas {
		p, err := c.RunPod(ctx, PodSpec{Name: fmt.Sprintf("%s-%d", name, i), Namespace: ns, ServiceAccount: name,
			Labels: map[string]string{"app": name}})
		if err != nil {
			return nil, err
		}
		pods = append(pods, p)
	}
	_, err := c.K.Client().CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: ServiceHTTPPort, TargetPort: intstr.FromInt32(EchoHTTPPort), Protocol: corev1.ProtocolTCP, AppProtocol: new("http")},
				{Name: "http2", Port: ServiceHTTP2Port, TargetPort: intstr.FromInt32(EchoHTTPPort), Protocol: corev1.ProtocolTCP, AppProtocol: new("http2")},
				{Name: "grpc", Port: ServiceGRPCPort, TargetPort: intstr.FromInt32(EchoGRPCPort), Protocol: corev1.ProtocolTCP, AppProtocol: new("grpc")},
				{Name: "tcp", Port: ServiceTCPPort, TargetPort: intstr.FromInt32(EchoTCPPort), Protocol: corev1.ProtocolTCP},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: create Service %s/%s: %w", c.Name(), ns, name, err)
	}
	return pods, nil
}

// Export creates the ServiceExport of ns/name and waits, at most a
// minute, until the federator's catalog holds the service with ready
// endpoints ready endpoints.
func (c *Cluster) Export(ctx context.Context, ns, name string, ready int) error {
	_, err := c.MCS.MulticlusterV1alpha1().ServiceExports(ns).Create(ctx,
		&mcsv1alpha1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("cluster %s: create ServiceExport %s/%s: %w", c.Name(), ns, name, err)
	}
	return c.WaitReadyEndpoints(ctx, ns, name, ready, time.Minute)
}

// Unexport deletes the ServiceExport of ns/name and waits, at most a
// minute, until the federator's catalog no longer holds the service.
func (c *Cluster) Unexport(ctx context.Context, ns, name string) error {
	err := c.MCS.MulticlusterV1alpha1().ServiceExports(ns).Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil {
		return fmt.Errorf("cluster %s: delete ServiceExport %s/%s: %w", c.Name(), ns, name, err)
	}
	return Poll(ctx, time.Minute, fmt.Sprintf("cluster %s: %s/%s gone from the federator's catalog", c.Name(), ns, name),
		func(ctx context.Context) (bool, string) {
			d, err := c.Federator.Catalog(ctx)
			if err != nil {
				return false, err.Error()
			}
			if s, ok := fedproc.LocalService(d, ns, name); ok {
				return false, fmt.Sprintf("still there, %d ready endpoints", s.ReadyEndpoints())
			}
			return true, ""
		})
}

// WaitReadyEndpoints waits, at most bound, until the federator's local
// catalog holds ns/name with exactly ready ready endpoints.
func (c *Cluster) WaitReadyEndpoints(ctx context.Context, ns, name string, ready int, bound time.Duration) error {
	return Poll(ctx, bound, fmt.Sprintf("cluster %s: %s/%s with %d ready endpoints in the federator's catalog", c.Name(), ns, name, ready),
		func(ctx context.Context) (bool, string) {
			d, err := c.Federator.Catalog(ctx)
			if err != nil {
				return false, err.Error()
			}
			s, ok := fedproc.LocalService(d, ns, name)
			if !ok {
				return false, "not in the catalog"
			}
			return s.ReadyEndpoints() == ready, fmt.Sprintf("%d ready endpoints", s.ReadyEndpoints())
		})
}

// Imported is ns/name as c's federator imported it from peer, if it did.
func (c *Cluster) Imported(ctx context.Context, peer, ns, name string) (catalog.Service, bool, error) {
	d, err := c.Federator.Catalog(ctx)
	if err != nil {
		return catalog.Service{}, false, err
	}
	for _, src := range d.Sources {
		if src.Source != peer {
			continue
		}
		for _, s := range src.Services {
			if s.Namespace == ns && s.Name == name {
				return s, true, nil
			}
		}
	}
	return catalog.Service{}, false, nil
}

// Name is the pod's name.
func (p *Pod) Name() string { return p.Spec.Name }

// SPIFFEID is the identity of the pod's ServiceAccount.
func (p *Pod) SPIFFEID() string { return p.Cluster.SPIFFEID(p.Spec.Namespace, p.Spec.ServiceAccount) }

// SetReady sets the Pod's readiness as a kubelet would after a probe.
func (p *Pod) SetReady(ctx context.Context, ready bool) error { return p.W.SetReady(ctx, ready) }

// Call is one `echo call`.
type Call struct {
	// Proto is http1, h2c, grpc or tcp.
	Proto string
	// Target is host:port, a name as the app would use it.
	Target string
	// Host is the Host header or :authority; empty means Target's.
	Host string
	// Headers are "Name: value" lines (HTTP headers, gRPC metadata).
	Headers []string
	// Timeout bounds the call; zero means 10 s.
	Timeout time.Duration
}

// Args are the call's `echo call` arguments.
func (c Call) Args() []string {
	args := []string{"call", "--proto", c.Proto, "--target", c.Target}
	if c.Host != "" {
		args = append(args, "--host", c.Host)
	}
	for _, h := range c.Headers {
		args = append(args, "--header", h)
	}
	if c.Timeout > 0 {
		args = append(args, "--timeout", c.Timeout.String())
	}
	return args
}

// Reply is echo's answer (test/echo's Reply, as `echo call` prints it).
type Reply struct {
	Pod            string `json:"pod"`
	Namespace      string `json:"namespace"`
	Cluster        string `json:"cluster,omitempty"`
	Method         string `json:"method,omitempty"`
	Host           string `json:"host,omitempty"`
	Path           string `json:"path,omitempty"`
	Proto          string `json:"proto"`
	XFCC           string `json:"xfcc,omitempty"`
	CallerIdentity string `json:"callerIdentity,omitempty"`
	XFCCError      string `json:"xfccError,omitempty"`
	Remote         string `json:"remote"`
	Seq            uint32 `json:"seq,omitempty"`
}

// callBound bounds a call's process beyond its own timeout.
const callBound = 30 * time.Second

// Call runs `echo call` in the pod as AppUser, as the pod's app would
// call: its DNS query and its connection go through the pod's capture
// and sidecar. It returns echo's replies; an error quotes what the call
// printed.
func (p *Pod) Call(ctx context.Context, call Call) ([]Reply, error) {
	ctx, cancel := context.WithTimeout(ctx, callBound)
	defer cancel()
	cmd, err := p.W.CommandAs(ctx, AppUser, filepath.Join(p.Cluster.mesh.podBin, "echo"), call.Args()...)
	if err != nil {
		return nil, err
	}
	// No race-detector pause at exit in -race builds.
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s/%s: echo %s: %w: %s", p.Cluster.Name(), p.Name(), strings.Join(call.Args(), " "), err, strings.TrimSpace(stderr.String()))
	}
	var replies []Reply
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		var r Reply
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return nil, fmt.Errorf("%s/%s: echo call printed %q: %w", p.Cluster.Name(), p.Name(), sc.Text(), err)
		}
		replies = append(replies, r)
	}
	if len(replies) == 0 {
		return nil, fmt.Errorf("%s/%s: echo call printed no reply", p.Cluster.Name(), p.Name())
	}
	return replies, nil
}

// Resolve looks host up (IPv4) in the pod as AppUser with the system's
// resolver (getent), as the app's libc would: through the pod's
// resolv.conf, search list and capture, to the sidecar's DNS proxy.
func (p *Pod) Resolve(ctx context.Context, host string) ([]netip.Addr, error) {
	ctx, cancel := context.WithTimeout(ctx, callBound)
	defer cancel()
	cmd, err := p.W.CommandAs(ctx, AppUser, "getent", "ahostsv4", host)
	if err != nil {
		return nil, err
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("%s/%s: getent ahostsv4 %s: %w: %s", p.Cluster.Name(), p.Name(), host, err, strings.TrimSpace(string(out)))
	}
	var addrs []netip.Addr
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		a, err := netip.ParseAddr(f[0])
		if err != nil {
			return nil, fmt.Errorf("getent printed %q", line)
		}
		if len(addrs) == 0 || addrs[len(addrs)-1] != a {
			addrs = append(addrs, a)
		}
	}
	return addrs, nil
}

// DialContext connects from the pod's network namespace as the harness
// (root): neither the app's user nor the sidecar's, so the pod's capture
// redirects it as it would an app's, except to the pod's own IP.
func (p *Pod) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return p.W.DialContext(ctx, network, addr)
}

// SidecarMetrics fetches the sidecar's Prometheus metrics from its node,
// as a scraper would.
func (p *Pod) SidecarMetrics(ctx context.Context) (string, error) {
	if p.Spec.NoSidecar {
		return "", errors.New("the pod has no sidecar")
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		Proxy: nil, DialContext: p.Cluster.K.DialContext, DisableKeepAlives: true}}
	defer client.CloseIdleConnections()
	u := "http://" + netip.AddrPortFrom(p.W.IP, SidecarHealthPort).String() + "/stats/prometheus"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return string(body), nil
}
