// Package fedproc runs the real federator binary inside a harness cluster
// (test/localcluster) and talks to its monitoring port, and runs the real
// eastwest-gw beside it fed over xDS, for the e2e tests, the demo and the
// benchmarks.
package fedproc

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"time"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federator"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/test/localcluster"
)

// The federator's ports.
const (
	MonitoringPort     = "15014" // Istio's monitoring port
	CAPort             = "15012" // certificate service, gRPC over TLS
	BundleEndpointPort = "8443"  // SPIFFE bundle endpoint
	FederationPort     = "15019" // federation API, gRPC over mTLS
	GatewayPort        = "15443" // east-west gateway
	XDSPlaintextPort   = "15010" // xDS without TLS: the harness only
)

// Federator is a federator process running in a cluster's node network.
type Federator struct {
	Cluster *localcluster.Cluster
	Proc    *localcluster.Process
	// Host is the address the host (the test process) reaches it at.
	Host string
	// Monitoring is the base URL of its monitoring port, CAAddr its
	// certificate service, BundleEndpoint its SPIFFE bundle endpoint, as
	// the host reaches them.
	Monitoring, CAAddr, BundleEndpoint string
	// FederationAddr is where other clusters' federators reach it: its
	// node's WAN address.
	FederationAddr string
	// XDSAddr is its plaintext xDS port (--xds-plaintext-addr) as the
	// host reaches it; processes in the cluster's node network (the
	// gateway) reach it on the same address.
	XDSAddr string
}

// Start runs binDir/federator in cluster c as the least-privileged
// federator user and waits, at most a minute, until it is ready.
func Start(ctx context.Context, c *localcluster.Cluster, binDir string, extraArgs ...string) (*Federator, error) {
	_, kubeconfig, err := c.KubeconfigFor(localcluster.UserFederator)
	if err != nil {
		return nil, err
	}
	host, err := HostAddr(c)
	if err != nil {
		return nil, err
	}
	// In its own network namespace the federator listens on every address
	// so the host reaches it over the uplink; sharing the host network it
	// listens on the cluster's own loopback address.
	bind, local := host, host
	if c.NetNS() != "" {
		bind, local = "0.0.0.0", "127.0.0.1"
	}
	args := append([]string{filepath.Join(binDir, "federator"), "run",
		"--cluster-name", c.Name(), "--kubeconfig", kubeconfig,
		"--monitoring-addr", net.JoinHostPort(bind, MonitoringPort),
		"--ca-addr", net.JoinHostPort(bind, CAPort),
		"--bundle-endpoint-addr", net.JoinHostPort(bind, BundleEndpointPort),
		"--federation-addr", net.JoinHostPort(bind, FederationPort),
		"--advertise-address", net.JoinHostPort(c.WANIP().String(), FederationPort),
		"--gateway-address", net.JoinHostPort(c.WANIP().String(), GatewayPort),
		// The harness's gateway runs in the node network beside the
		// federator, not behind a Service, and fetches its configuration
		// in plaintext.
		"--gateway-federation-upstream", net.JoinHostPort(local, FederationPort),
		"--xds-plaintext-addr", net.JoinHostPort(bind, XDSPlaintextPort)}, extraArgs...)
	p, err := c.StartProcess(ctx, localcluster.ProcessSpec{Name: "federator", Command: args})
	if err != nil {
		return nil, err
	}
	f := &Federator{
		Cluster:        c,
		Proc:           p,
		Host:           host,
		Monitoring:     "http://" + net.JoinHostPort(host, MonitoringPort),
		CAAddr:         net.JoinHostPort(host, CAPort),
		BundleEndpoint: "https://" + net.JoinHostPort(host, BundleEndpointPort),
		FederationAddr: net.JoinHostPort(c.WANIP().String(), FederationPort),
		XDSAddr:        net.JoinHostPort(host, XDSPlaintextPort),
	}
	if err := f.waitReady(ctx, time.Minute); err != nil {
		_ = p.Stop(5 * time.Second)
		return nil, err
	}
	return f, nil
}

func (f *Federator) waitReady(ctx context.Context, bound time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		if exited, err := f.Proc.Exited(); exited {
			return fmt.Errorf("federator in cluster %s exited: %v\n%s", f.Cluster.Name(), err, f.Proc.Tail(30))
		}
		if _, lastErr = f.Get(ctx, "/readyz"); lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("federator in cluster %s not ready after %s: %v\n%s", f.Cluster.Name(), bound, lastErr, f.Proc.Tail(30))
		case <-tick.C:
		}
	}
}

// HostAddr is the address of c's node network that the host reaches: the
// host side of the API server URL.
func HostAddr(c *localcluster.Cluster) (string, error) {
	u, err := url.Parse(c.APIServerURL())
	if err != nil {
		return "", err
	}
	return u.Hostname(), nil
}

var client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}

// Get fetches a path of the monitoring port and returns the body of a 200.
func (f *Federator) Get(ctx context.Context, path string) ([]byte, error) {
	return get(ctx, f.Monitoring+path)
}

// get fetches u and returns the body of a 200.
func get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", u, resp.Status, body)
	}
	return body, nil
}

// Catalog fetches /debug/catalog.
func (f *Federator) Catalog(ctx context.Context) (federator.CatalogDump, error) {
	var d federator.CatalogDump
	body, err := f.Get(ctx, "/debug/catalog")
	if err != nil {
		return d, err
	}
	return d, json.Unmarshal(body, &d)
}

// Federation fetches /debug/federation.
func (f *Federator) Federation(ctx context.Context) (federator.FederationDump, error) {
	var d federator.FederationDump
	body, err := f.Get(ctx, "/debug/federation")
	if err != nil {
		return d, err
	}
	return d, json.Unmarshal(body, &d)
}

// XDS fetches /debug/xds.
func (f *Federator) XDS(ctx context.Context) (xds.Status, error) {
	var d xds.Status
	body, err := f.Get(ctx, "/debug/xds")
	if err != nil {
		return d, err
	}
	return d, json.Unmarshal(body, &d)
}

// Metrics fetches /metrics.
func (f *Federator) Metrics(ctx context.Context) (string, error) {
	body, err := f.Get(ctx, "/metrics")
	return string(body), err
}

// Stop ends the federator with SIGTERM, then SIGKILL after grace.
func (f *Federator) Stop(grace time.Duration) error { return f.Proc.Stop(grace) }

// LocalService finds namespace/name among the local (exported) services.
func LocalService(d federator.CatalogDump, ns, name string) (catalog.Service, bool) {
	for _, src := range d.Sources {
		if src.Source != catalog.LocalSource {
			continue
		}
		for _, s := range src.Services {
			if s.Namespace == ns && s.Name == name {
				return s, true
			}
		}
	}
	return catalog.Service{}, false
}

// LocalVersion is the content version of the local catalog.
func LocalVersion(d federator.CatalogDump) string {
	for _, src := range d.Sources {
		if src.Source == catalog.LocalSource {
			return src.Version
		}
	}
	return ""
}

// The gateway's other ports (Istio's conventions).
const (
	GatewayHealthPort  = "15021"
	GatewayMetricsPort = "15020"
)

// Gateway is an eastwest-gw process beside a federator, in its cluster's
// node network, configured only over the federator's plaintext xDS.
type Gateway struct {
	Proc *localcluster.Process
	// Addr is its TLS listener (GatewayPort) as the host reaches it.
	Addr string
	// Health and Metrics are the base URLs of its health and metrics
	// ports as the host reaches them.
	Health, Metrics string
}

// StartGateway runs binDir/eastwest-gw beside f, fed by f's plaintext
// xDS, and waits, at most a minute, until it is ready: it holds a routing
// table from the federator. extraArgs are appended (a later flag wins).
// It runs with --drain-delay=0: no load balancer needs time to notice its
// readiness fail, and every environment's teardown would wait 5s for it.
func StartGateway(ctx context.Context, f *Federator, binDir string, extraArgs ...string) (*Gateway, error) {
	bind := f.Host
	if f.Cluster.NetNS() != "" {
		bind = "0.0.0.0"
	}
	args := append([]string{filepath.Join(binDir, "eastwest-gw"),
		"--xds-plaintext", "--xds-address", f.XDSAddr,
		"--cluster-name", f.Cluster.Name(), "--pod-ip", f.Host, "--pod-name", "eastwest-gw-0",
		"--listen-addr", net.JoinHostPort(bind, GatewayPort),
		"--health-addr", net.JoinHostPort(bind, GatewayHealthPort),
		"--metrics-addr", net.JoinHostPort(bind, GatewayMetricsPort),
		"--drain-delay=0s"}, extraArgs...)
	p, err := f.Cluster.StartProcess(ctx, localcluster.ProcessSpec{Name: "eastwest-gw", Command: args})
	if err != nil {
		return nil, err
	}
	g := &Gateway{
		Proc:    p,
		Addr:    net.JoinHostPort(f.Host, GatewayPort),
		Health:  "http://" + net.JoinHostPort(f.Host, GatewayHealthPort),
		Metrics: "http://" + net.JoinHostPort(f.Host, GatewayMetricsPort),
	}
	if err := g.waitReady(ctx, time.Minute); err != nil {
		_ = p.Stop(5 * time.Second)
		return nil, err
	}
	return g, nil
}

func (g *Gateway) waitReady(ctx context.Context, bound time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		if exited, err := g.Proc.Exited(); exited {
			return fmt.Errorf("eastwest-gw exited: %v\n%s", err, g.Proc.Tail(30))
		}
		if _, lastErr = get(ctx, g.Health+"/healthz/ready"); lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("eastwest-gw not ready after %s: %v\n%s", bound, lastErr, g.Proc.Tail(30))
		case <-tick.C:
		}
	}
}

// Stop ends the gateway with SIGTERM (it drains), then SIGKILL after
// grace.
func (g *Gateway) Stop(grace time.Duration) error { return g.Proc.Stop(grace) }
