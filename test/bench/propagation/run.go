package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/tlsbackend"
	"github.com/isthmus-mesh/isthmus/test/fedproc"
	"github.com/isthmus-mesh/isthmus/test/install"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// Namespaces of the measured services and of the background ones.
const (
	measuredNS   = "bench-propagation"
	backgroundNS = "bench-background"
)

// bench is the running set-up: the cluster, its clients, the federator,
// the gateway and the backend every service's endpoint points at.
type bench struct {
	c    *localcluster.Cluster
	kube kubernetes.Interface
	mcs  mcsclient.Interface
	f    *fedproc.Federator
	gw   *fedproc.Gateway
	// backend is the endpoint of every service: the node IP and the
	// backend's port.
	backend endpoint
	probe   *prober
	events  *exportEvents
}

// endpoint is the backend's address as an EndpointSlice names it.
type endpoint struct {
	ip   string
	port int32
}

func run(ctx context.Context, cfg config, log *slog.Logger) (rep *table.Report, err error) {
	if cfg.binDir, err = filepath.Abs(cfg.binDir); err != nil {
		return nil, err
	}
	for _, b := range []string{"federator", "eastwest-gw"} {
		if _, err := os.Stat(filepath.Join(cfg.binDir, b)); err != nil {
			return nil, fmt.Errorf("no %s binary (run make build): %w", b, err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	started := time.Now()
	loadBefore := table.LoadAverage()

	step(log, "starting cluster a")
	env, err := localcluster.Start(ctx, localcluster.Options{Clusters: []localcluster.ClusterOptions{{Name: "a"}}, Logger: log, KeepWorkDir: cfg.keep})
	if err != nil {
		return nil, err
	}
	defer func() {
		step(log, "tearing down")
		if cerr := env.Close(); cerr != nil {
			log.Error("tear-down", "err", cerr)
		}
		if cfg.keep {
			log.Info("logs kept", "dir", env.WorkDir())
		}
	}()
	if !env.Isolated() {
		return nil, errors.New("needs root: without network namespaces every address is a loopback one, " +
			"which EndpointSlices refuse, so no exported service could point at the backend")
	}
	c := env.Cluster("a")
	restCfg, err := c.RESTConfig(localcluster.UserAdmin)
	if err != nil {
		return nil, err
	}
	if err := install.Isthmus(ctx, restCfg, "system:isthmus:federator"); err != nil {
		return nil, fmt.Errorf("install Isthmus: %w", err)
	}
	// The benchmark's own requests are never what is slow.
	restCfg.QPS, restCfg.Burst = 5000, 10000
	b := &bench{c: c}
	if b.kube, err = kubernetes.NewForConfig(restCfg); err != nil {
		return nil, err
	}
	if b.mcs, err = mcsclient.NewForConfig(restCfg); err != nil {
		return nil, err
	}

	pki := filepath.Join(env.WorkDir(), "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, err
	}
	if err := tlsbackend.WritePKI(pki); err != nil {
		return nil, err
	}
	if b.backend, err = startBackend(ctx, c, self, pki); err != nil {
		return nil, err
	}

	step(log, "starting the federator and the gateway")
	if b.f, err = fedproc.Start(ctx, c, cfg.binDir, "--log-level", cfg.federatorLog); err != nil {
		return nil, err
	}
	defer func() { _ = b.f.Stop(10 * time.Second) }()
	if b.gw, err = fedproc.StartGateway(ctx, b.f, cfg.binDir, "--log-level", cfg.gatewayLog); err != nil {
		return nil, err
	}
	defer func() { _ = b.gw.Stop(10 * time.Second) }()
	client, err := tlsbackend.ClientConfig(pki, "")
	if err != nil {
		return nil, err
	}
	b.probe = newProber(b.gw.Addr, client, cfg.poll)

	for _, ns := range []string{measuredNS, backgroundNS} {
		if err := b.ensureNamespace(ctx, ns); err != nil {
			return nil, err
		}
	}
	if b.events, err = watchExports(ctx, b.mcs, measuredNS); err != nil {
		return nil, err
	}
	defer b.events.close()

	step(log, "creating the measured Services and EndpointSlices", "services", cfg.services)
	if err := b.createServices(ctx, measuredNS, measuredName, cfg.services, cfg.workers); err != nil {
		return nil, err
	}
	// The objects reach the federator's informer caches within
	// milliseconds; only the exports, from now on, are timed.
	time.Sleep(time.Second)

	rep = &table.Report{}
	step(log, "measuring with no other service exported", "services", cfg.services, "poll", cfg.poll)
	alone, err := b.measure(ctx, cfg, log, "no other service exported")
	if err != nil {
		return rep, err
	}
	alone.report(rep, cfg)

	if cfg.background > 0 {
		step(log, "exporting the background services", "services", cfg.background)
		bg, err := b.exportBackground(ctx, cfg, log)
		if err != nil {
			return rep, fmt.Errorf("background: %w", err)
		}
		step(log, "measuring beside the background", "services", cfg.services, "background", cfg.background)
		bg.report(rep)
		busy, err := b.measure(ctx, cfg, log, fmt.Sprintf("%d other services exported", cfg.background))
		if err != nil {
			return rep, err
		}
		busy.report(rep, cfg)
		compare(rep, alone, busy)
	}

	rep.Note("Changes: each of the %d services exported, then unexported, one change at a time, %s apart; from each call's return a new connection through the gateway every %s, each a full mTLS 1.3 handshake (X25519, P-256) with the backend through the gateway. "+
		"A routed attempt took %s on average and a refused one %s, so a time is late by at most about the poll interval plus one attempt.",
		cfg.services, cfg.pause, cfg.poll, b.probe.mean(routed).Round(10*time.Microsecond), b.probe.mean(refused).Round(10*time.Microsecond))
	if n := b.probe.failures(); n > 0 {
		rep.Note("%d attempts failed otherwise than routed or refused (last: %v); they count as not routed yet.", n, b.probe.lastFailure)
	}
	rep.Note("Run: %s, %d CPUs, %s, cluster isolated by network namespaces: %t, kube-apiserver %s, federator with default flags plus --log-level %s, eastwest-gw with --log-level %s; %s in all.",
		time.Now().UTC().Format(time.RFC3339), runtime.NumCPU(), runtime.Version(), env.Isolated(), localcluster.KubeVersion,
		cfg.federatorLog, cfg.gatewayLog, time.Since(started).Round(time.Second))
	rep.Note("Load average (1, 5, 15 min) at the start: %s; at the end: %s. The machine is shared: figures move with what else runs.", loadBefore, table.LoadAverage())
	return rep, nil
}

// startBackend runs this program as the mTLS backend in c's node network,
// listening on every address, and returns where an EndpointSlice points
// at it: the node IP and its port.
func startBackend(ctx context.Context, c *localcluster.Cluster, self, pki string) (endpoint, error) {
	p, err := c.StartProcess(ctx, localcluster.ProcessSpec{Name: "tls-backend",
		Command: []string{self, "backend", "--pki", pki, "--listen", "0.0.0.0:0"}})
	if err != nil {
		return endpoint{}, err
	}
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if exited, err := p.Exited(); exited {
			return endpoint{}, fmt.Errorf("backend exited: %v\n%s", err, p.Tail(20))
		}
		if addr, ok := firstLine(p.LogPath()); ok {
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return endpoint{}, fmt.Errorf("backend printed %q: %w", addr, err)
			}
			var n int32
			if _, err := fmt.Sscan(port, &n); err != nil {
				return endpoint{}, fmt.Errorf("backend port %q: %w", port, err)
			}
			return endpoint{ip: c.NodeIP().String(), port: n}, nil
		}
		if time.Now().After(deadline) {
			return endpoint{}, fmt.Errorf("backend printed no address within 30s\n%s", p.Tail(20))
		}
		select {
		case <-ctx.Done():
			return endpoint{}, ctx.Err()
		case <-tick.C:
		}
	}
}

// firstLine is the first whole line of a process's log after the
// harness's header lines (which start with "#"), if there is one.
func firstLine(file string) (string, bool) {
	f, err := os.Open(file)
	if err != nil {
		return "", false
	}
	defer f.Close()
	r := bufio.NewReader(f)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return "", false
		}
		if !strings.HasPrefix(line, "#") {
			return strings.TrimSpace(line), true
		}
	}
}

func step(log *slog.Logger, msg string, args ...any) {
	log.Info("==> "+msg, args...)
}
