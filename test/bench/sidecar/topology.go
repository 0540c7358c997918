package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/internal/fedtest"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/procs"
	"github.com/isthmus-mesh/isthmus/test/netns"
)

// The bench's mesh: one cluster, one service, two workloads.
const (
	clusterName = "bench"
	namespace   = "demo"
	serviceHost = "echo.demo.svc.clusterset.local"
	// appPort is the backend's port behind the sidecar (the service's
	// target port); directPort the same backend, excluded from capture.
	appPort    = 8080
	directPort = 8081
	// The back nginx's TLS ports, excluded from capture: proxy_pass
	// (HTTP/1.1 to the backend) and grpc_pass (HTTP/2).
	nginxBackPort   = 9443
	nginxBackH2Port = 9444
	// proxyUID is the sidecar's user: `sidecar iptables` exempts its own
	// traffic from capture by it (Istio's 1337).
	proxyUID = 1337
	// The client side's listeners, in the client's namespace.
	sidecarOutbound = "127.0.0.1:15001"
	nginxH1         = "127.0.0.1:18001"
	nginxH2         = "127.0.0.1:18002"
	nginxH2Pass     = "127.0.0.1:18003"
	// readyTimeout bounds every wait for a process to serve.
	readyTimeout = 30 * time.Second
)

// Load kinds.
const (
	modeFixed = "fixed"
	modeMax   = "max"
)

// target is one way from the load generator to the backend.
type target struct {
	name string
	// urls by protocol (h1, h2).
	urls map[string]string
	// authority is the Host or :authority the requests carry (empty:
	// serviceHost).
	authority string
	// procs are the proxies on the way (none for direct).
	procs []*procs.Proc
}

// serves reports whether t is measured over proto.
func (t target) serves(proto string) bool { return t.urls[proto] != "" }

func (t target) spec(proto string) loadSpec {
	authority := t.authority
	if authority == "" {
		authority = serviceHost
	}
	return loadSpec{url: t.urls[proto], h2: proto == "h2", authority: authority}
}

// usage is the proxies' CPU seconds and read and write system calls,
// both sides together.
func (t target) usage() usage {
	var u usage
	for _, p := range t.procs {
		u.cpu += p.CPU()
		u.ioCalls += p.IOCalls()
	}
	return u
}

// memory is the proxies' /proc/<pid>/status field (MB), both sides
// together.
func (t target) memory(field string) float64 {
	var s float64
	for _, p := range t.procs {
		s += p.Memory(field)
	}
	return s
}

// env is the running topology; close tears it down.
type env struct {
	dir    string
	keep   bool
	fortio string
	// sidecarEnv is added to the sidecars' environment (--sidecar-env).
	sidecarEnv     []string
	net            *netns.Network
	client, server *netns.NS
	serverIP       netip.Addr
	ca             *fedtest.CA
	xds            *fedtest.XDS
	// all are the processes started, stopped in reverse.
	all     []*procs.Proc
	targets []target
	// nginxNote says why there is no nginx column, if there is none.
	nginxNote string
	// idle and peak are the proxies' resident sets (MB) by target name.
	idle, peak map[string]float64
}

func (e *env) start(name string, ns *netns.NS, cmd *exec.Cmd) (*procs.Proc, error) {
	p, err := procs.Start(name, cmd, filepath.Join(e.dir, name+".log"), ns.Start)
	if err != nil {
		return nil, err
	}
	e.all = append(e.all, p)
	return p, nil
}

// alive reports a process that has ended: its log says why.
func (e *env) alive() error {
	for _, p := range e.all {
		if p.Exited() {
			return fmt.Errorf("%s exited; see %s", p.Name, e.logTail(p.Name))
		}
	}
	return nil
}

// logTail is the last lines of a child's log, or its path when kept.
func (e *env) logTail(name string) string {
	file := filepath.Join(e.dir, name+".log")
	b, err := os.ReadFile(file)
	if err != nil {
		return file
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return file + ":\n" + strings.Join(lines[max(len(lines)-15, 0):], "\n")
}

func (e *env) close() {
	for i := len(e.all) - 1; i >= 0; i-- {
		e.all[i].Stop()
	}
	if e.xds != nil {
		e.xds.Close()
	}
	if e.ca != nil {
		e.ca.Close()
	}
	if e.net != nil {
		if err := e.net.Close(); err != nil {
			log.Printf("clean up the network namespaces: %v", err)
		}
	}
	if e.keep {
		log.Printf("work directory kept: %s", e.dir)
		return
	}
	_ = os.RemoveAll(e.dir)
}

// setUp builds the topology of the package documentation. A non-nil env
// must be closed, whatever the error.
func setUp(ctx context.Context, o options) (*env, error) {
	sidecarBin := filepath.Join(o.binDir, "sidecar")
	if _, err := os.Stat(sidecarBin); err != nil {
		return nil, fmt.Errorf("%s: %w (make build)", sidecarBin, err)
	}
	fortio, err := findFortio(o)
	if err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("h2load"); err != nil {
		return nil, errors.New("h2load is not installed (Debian's nghttp2-client; make bench-sidecar installs it)")
	}
	dir, err := os.MkdirTemp("", "bench-sidecar-")
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir, keep: o.keep, fortio: fortio, sidecarEnv: o.sidecarEnv, idle: map[string]float64{}, peak: map[string]float64{}}
	// The server-side sidecar runs as proxyUID: it must reach its binary,
	// token and roots here.
	if err := os.Chmod(dir, 0o755); err != nil {
		return e, err
	}
	if sidecarBin, err = netns.CopyExecutable(sidecarBin, dir); err != nil {
		return e, err
	}
	self, err := os.Executable()
	if err != nil {
		return e, err
	}

	if e.net, err = netns.OpenNetwork(netns.NetworkOptions{Label: "bench-sc"}); err != nil {
		return e, fmt.Errorf("%w (bench-sidecar needs network namespaces: run it as root)", err)
	}
	if e.client, err = e.net.Add("bench-sc-client"); err != nil {
		return e, err
	}
	if e.server, err = e.net.Add("bench-sc-server"); err != nil {
		return e, err
	}
	e.serverIP = e.server.Addr()

	if err := e.startControlPlane(ctx); err != nil {
		return e, err
	}
	backend, err := e.start("backend", e.server, exec.Command(self, "backend",
		"--listen", ":"+strconv.Itoa(appPort), "--listen", ":"+strconv.Itoa(directPort), "--body", strconv.Itoa(o.body)))
	if err != nil {
		return e, err
	}
	if err := e.waitListening(backend, e.server, "127.0.0.1:"+strconv.Itoa(appPort)); err != nil {
		return e, err
	}
	// Capture in the server's namespace, as the pod's init step.
	ictx, cancel := context.WithTimeout(ctx, time.Minute)
	out, err := e.server.Run(ictx, sidecarBin, "iptables", "--dns-port", "0",
		"--exclude-inbound-ports", fmt.Sprintf("%d,%d,%d", directPort, nginxBackPort, nginxBackH2Port))
	cancel()
	if err != nil {
		return e, fmt.Errorf("sidecar iptables: %w", err)
	}
	log.Printf("server namespace captured: %s", strings.TrimSpace(out))

	serverSide, err := e.startSidecar(sidecarBin, e.server, "sidecar-server", "echo", ":15001", ":15006")
	if err != nil {
		return e, err
	}
	clientSide, err := e.startSidecar(sidecarBin, e.client, "sidecar-client", "client", sidecarOutbound, "127.0.0.1:15006")
	if err != nil {
		return e, err
	}
	// Port 80 is declared http: the sidecars speak HTTP/1.1 between them
	// whatever the client spoke, as nginx's proxy_pass does; port 81 is
	// declared http2: HTTP/2 between them, as grpc_pass.
	e.targets = append(e.targets, target{name: "isthmus", procs: []*procs.Proc{clientSide, serverSide},
		urls: map[string]string{"h1": "http://" + sidecarOutbound + "/", "h2": "http://" + sidecarOutbound + "/"}},
		target{name: "isthmus-h2", procs: []*procs.Proc{clientSide, serverSide}, authority: serviceHost + ":81",
			urls: map[string]string{"h2": "http://" + sidecarOutbound + "/"}})

	if o.noNginx {
		e.nginxNote = "left out (--no-nginx)"
	} else if _, err := exec.LookPath("nginx"); err != nil {
		e.nginxNote = "nginx is not installed (Debian's nginx; make bench-sidecar installs it)"
	} else {
		front, back, err := e.startNginx(ctx)
		if err != nil {
			return e, err
		}
		e.targets = append(e.targets, target{name: "nginx", procs: []*procs.Proc{front, back},
			urls: map[string]string{"h1": "http://" + nginxH1 + "/", "h2": "http://" + nginxH2 + "/"}},
			target{name: "nginx-h2", procs: []*procs.Proc{front, back},
				urls: map[string]string{"h2": "http://" + nginxH2Pass + "/"}})
	}
	if e.nginxNote != "" {
		log.Printf("no nginx column: %s", e.nginxNote)
	}
	direct := "http://" + netip.AddrPortFrom(e.serverIP, directPort).String() + "/"
	e.targets = append(e.targets, target{name: "direct", urls: map[string]string{"h1": direct, "h2": direct}})

	// Each target must answer, in both protocols, before anything is
	// measured; the sidecar's must go through the server side's inbound.
	for _, t := range e.targets {
		for _, proto := range o.protocols {
			if !t.serves(proto) {
				continue
			}
			if err := e.check(ctx, t.spec(proto), o.body); err != nil {
				return e, fmt.Errorf("%s over %s: %w", t.name, proto, err)
			}
		}
	}
	if err := e.checkInbound(ctx); err != nil {
		return e, err
	}
	time.Sleep(time.Second)
	for _, t := range e.targets {
		if len(t.procs) > 0 {
			e.idle[t.name] = t.memory("VmRSS")
		}
	}
	return e, nil
}

// startControlPlane serves the CA and xDS from this process on the
// client namespace's address (ns.Listen), and publishes the federator's
// translation of one exported service: echo, ports 80 (declared http:
// HTTP/1.1 between the sidecars) and 81 (declared http2: HTTP/2) →
// target port appPort on the server namespace's address, served by
// demo/echo's identity.
func (e *env) startControlPlane(ctx context.Context) error {
	td := spiffeid.RequireTrustDomainFromString(clusterName + ".mesh")
	caLn, err := e.client.Listen("tcp", e.client.Addr().String()+":0")
	if err != nil {
		return err
	}
	e.ca, err = fedtest.StartCA(ctx, caLn, td, fedtest.Tokens{
		"client-token": caserver.Caller{Namespace: namespace, ServiceAccount: "client"},
		"echo-token":   caserver.Caller{Namespace: namespace, ServiceAccount: "echo"},
	})
	if err != nil {
		_ = caLn.Close()
		return err
	}
	for name, data := range map[string][]byte{"roots.pem": e.ca.RootsPEM(), "client-token": []byte("client-token"), "echo-token": []byte("echo-token")} {
		if err := os.WriteFile(filepath.Join(e.dir, name), data, 0o644); err != nil {
			return err
		}
	}
	xdsLn, err := e.client.Listen("tcp", e.client.Addr().String()+":0")
	if err != nil {
		return err
	}
	e.xds = fedtest.StartXDS(xdsLn)
	local, err := catalog.NewSnapshot(catalog.LocalSource, []catalog.Service{{
		Namespace: namespace, Name: "echo", Cluster: clusterName,
		Ports: []catalog.Port{{Name: "http", Port: 80, Protocol: catalog.ProtocolTCP, TargetPort: appPort},
			{Name: "http2", Port: 81, Protocol: catalog.ProtocolTCP, TargetPort: appPort}},
		Endpoints: []catalog.LocalityEndpoints{{Locality: catalog.Locality{Region: "r1", Zone: "z1"}, Ready: 1,
			Addresses: []catalog.Address{{IP: e.serverIP.String(), Ready: true}}}},
		Identities: []string{spiffeid.RequireFromSegments(td, "ns", namespace, "sa", "echo").String()},
	}})
	if err != nil {
		return err
	}
	snap, err := fedtest.SidecarSnapshot(local, nil, xds.SidecarOptions{Region: "r1"}, e.ca.Bundle())
	if err != nil {
		return err
	}
	return e.xds.Set(ctx, snap)
}

// startSidecar runs `sidecar run` in ns as proxyUID with the service
// account's token, and waits until it is ready (an SVID and the
// configuration).
func (e *env) startSidecar(bin string, ns *netns.NS, name, serviceAccount, outbound, inbound string) (*procs.Proc, error) {
	cmd := exec.Command(bin, "run", "--log-level", "warn",
		"--xds-plaintext", "--xds-address", e.xds.Addr, "--ca-address", e.ca.Addr,
		"--cluster-name", clusterName, "--pod-ip", ns.Addr().String(), "--pod-name", name, "--namespace", namespace,
		"--service-account", serviceAccount, "--token-file", filepath.Join(e.dir, serviceAccount+"-token"),
		"--ca-roots-file", filepath.Join(e.dir, "roots.pem"),
		"--outbound-addr", outbound, "--inbound-addr", inbound,
		"--admin-addr", "127.0.0.1:15000", "--health-addr", "127.0.0.1:15020", "--dns-addr", "")
	cmd.Dir = e.dir
	if len(e.sidecarEnv) > 0 {
		cmd.Env = append(os.Environ(), e.sidecarEnv...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: proxyUID, Gid: proxyUID}}
	p, err := e.start(name, ns, cmd)
	if err != nil {
		return nil, err
	}
	client := nsClient(ns, false)
	err = procs.WaitFor(readyTimeout, func() bool {
		if p.Exited() {
			return true
		}
		resp, err := client.Get("http://127.0.0.1:15020/healthz/ready")
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if p.Exited() || err != nil {
		return nil, fmt.Errorf("%s never became ready (%v); see %s", name, err, e.logTail(name))
	}
	return p, nil
}

// startNginx runs the back nginx in the server's namespace and the front
// in the client's.
func (e *env) startNginx(ctx context.Context) (front, back *procs.Proc, err error) {
	if err := writeNginxPKI(e.dir); err != nil {
		return nil, nil, err
	}
	backAddr := netip.AddrPortFrom(e.serverIP, nginxBackPort).String()
	backH2Addr := netip.AddrPortFrom(e.serverIP, nginxBackH2Port).String()
	confs := []struct {
		name, conf, addr string
		ns               *netns.NS
		p                **procs.Proc
	}{
		{"nginx-back", nginxBackConf(e.dir, backAddr, backH2Addr, "127.0.0.1:"+strconv.Itoa(appPort)), backAddr, e.server, &back},
		{"nginx-front", nginxFrontConf(e.dir, nginxH1, nginxH2, nginxH2Pass, backAddr, backH2Addr), nginxH1, e.client, &front},
	}
	for _, c := range confs {
		file := filepath.Join(e.dir, c.name+".conf")
		if err := os.WriteFile(file, []byte(c.conf), 0o644); err != nil {
			return nil, nil, err
		}
		tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		out, err := c.ns.Run(tctx, "nginx", "-t", "-q", "-p", e.dir, "-c", file)
		cancel()
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w: %s", c.name, err, out)
		}
		p, err := e.start(c.name, c.ns, exec.Command("nginx", "-p", e.dir, "-c", file, "-g", "daemon off;"))
		if err != nil {
			return nil, nil, err
		}
		if err := e.waitListening(p, c.ns, c.addr); err != nil {
			return nil, nil, err
		}
		*c.p = p
	}
	return front, back, nil
}

// waitListening waits until addr accepts connections in ns.
func (e *env) waitListening(p *procs.Proc, ns *netns.NS, addr string) error {
	err := procs.WaitFor(readyTimeout, func() bool {
		if p.Exited() {
			return true
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := ns.DialContext(ctx, "tcp", addr)
		if err != nil {
			return false
		}
		_ = c.Close()
		return true
	})
	if p.Exited() || err != nil {
		return fmt.Errorf("%s does not listen on %s (%v); see %s", p.Name, addr, err, e.logTail(p.Name))
	}
	return nil
}

// check sends one request as the load generator will, from the client's
// namespace: it must answer 200 with the backend's body.
func (e *env) check(ctx context.Context, s loadSpec, bodySize int) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return err
	}
	req.Host = s.authority
	c := nsClient(e.client, s.h2)
	defer c.CloseIdleConnections()
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || len(body) != bodySize {
		return fmt.Errorf("%s answered %s with %d bytes: %.200q", s.url, resp.Status, len(body), body)
	}
	if want := map[bool]int{false: 1, true: 2}[s.h2]; resp.ProtoMajor != want {
		return fmt.Errorf("%s answered in %s", s.url, resp.Proto)
	}
	return nil
}

// checkInbound makes sure the sidecar's requests went through the server
// side's inbound listener (capture works), not around it.
func (e *env) checkInbound(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:15020/stats/prometheus", nil)
	if err != nil {
		return err
	}
	resp, err := nsClient(e.server, false).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "isthmus_sidecar_requests_total{") && strings.Contains(line, `listener="inbound"`) &&
			strings.Contains(line, `code="200"`) {
			return nil
		}
	}
	return errors.New("the server-side sidecar counted no inbound request: the capture did not send the client side's connection to it")
}

// nsClient is an HTTP client dialling from ns, HTTP/1.1 or h2c.
func nsClient(ns *netns.NS, h2 bool) *http.Client {
	tr := &http.Transport{DialContext: ns.DialContext, DisableCompression: true}
	if h2 {
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		tr.Protocols = &p
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// findFortio is --fortio, else <bin-dir>/fortio, else fortio on $PATH.
func findFortio(o options) (string, error) {
	if o.fortio != "" {
		return o.fortio, nil
	}
	if p := filepath.Join(o.binDir, "fortio"); isExecutable(p) {
		return filepath.Abs(p)
	}
	if p, err := exec.LookPath("fortio"); err == nil {
		return p, nil
	}
	return "", errors.New("fortio is not installed (make bench-sidecar installs it into bin/)")
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}
