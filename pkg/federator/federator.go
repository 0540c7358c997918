// Package federator is the composition root of the federator binary: it
// builds the Kubernetes clients, the local catalog, the exporter that fills
// it, the cluster CA and its certificate service, the xDS server that
// configures the proxies (on the certificate service's TLS port), the
// federation manager that links peers and imports what they export, the
// writer of imported ServiceEntries, the publisher of the CA's roots in
// every namespace, and the monitoring server, and runs them until the
// context ends.
//
// Nothing imports this package but cmd/federator.
package federator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/authz"
	"github.com/isthmus-mesh/isthmus/pkg/ca"
	"github.com/isthmus-mesh/isthmus/pkg/caserver"
	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/federation"
	"github.com/isthmus-mesh/isthmus/pkg/kube"
	"github.com/isthmus-mesh/isthmus/pkg/trust"
	"github.com/isthmus-mesh/isthmus/pkg/xds"
)

// Federator is one cluster's control plane.
type Federator struct {
	cfg   Config
	log   *slog.Logger
	store *catalog.Store
	// inCluster holds catalog.InClusterSource, for the sidecars only.
	inCluster *catalog.Store
	// policies holds the cluster's AuthorizationPolicies and
	// PeerAuthentications and what they say of each pod, for the
	// sidecars only.
	policies *authz.Store
	exporter *kube.Exporter
	registry *prometheus.Registry
	provider *sdkmetric.MeterProvider

	ca       *ca.CA
	trust    *trust.Store
	self     *ca.SelfSource
	id       spiffeid.ID
	caServer *caserver.Server

	federation *federation.Manager
	imports    *kube.ImportWriter
	roots      *kube.RootsPublisher
	xds        *xds.Server
}

// New connects to the cluster and wires the components; nothing runs until
// Run. It loads (or at first start creates) the cluster CA, so it needs
// the API server to answer.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Federator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	restCfg, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return nil, err
	}
	restCfg.UserAgent = "isthmus-federator/" + cfg.ClusterName
	// client-go's default of 5 requests/s (burst 10) throttled the
	// exporter's ServiceExport status writes to about 5 exports/s and the
	// import writer to about 2.5 services/s (make bench-federation).
	restCfg.QPS, restCfg.Burst = cfg.KubeAPIQPS, cfg.KubeAPIBurst
	kubeClient, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	reviewClient, err := tokenReviewClient(restCfg, cfg.TokenReviewQPS, cfg.TokenReviewBurst)
	if err != nil {
		return nil, err
	}
	mcs, err := mcsclient.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("multicluster client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	istio, err := istioclient.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("istio client: %w", err)
	}
	f := &Federator{cfg: cfg, log: log, store: catalog.NewStore()}
	// The in-cluster services are the sidecars' alone: a Store of their
	// own, which the federation and the import writer never read.
	f.inCluster = catalog.NewStore()
	// So are the AuthorizationPolicies and PeerAuthentications, which
	// the exporter reads along with the pods' labels.
	f.policies = authz.NewStore(cfg.RootNamespace)
	f.exporter, err = kube.NewExporter(kubeClient, mcs, f.store, kube.Options{
		ClusterName: cfg.ClusterName, Logger: log, TrustDomain: cfg.TrustDomainName(), InCluster: f.inCluster,
		Policies: f.policies, Istio: istio,
	})
	if err != nil {
		return nil, err
	}
	f.imports, err = kube.NewImportWriter(kubeClient, istio, mcs, f.store, kube.ImportOptions{
		ClusterName: cfg.ClusterName, Logger: log,
		QPS: cfg.ImportWriteQPS, Burst: cfg.ImportWriteBurst,
		Synced: func() bool { return f.federation.Synced() },
	})
	if err != nil {
		return nil, err
	}
	if err := f.setUpMetrics(); err != nil {
		return nil, err
	}
	if err := f.setUpIdentity(ctx, kubeClient, reviewClient); err != nil {
		return nil, err
	}
	// Every namespace's pods mount the roots from a ConfigMap of their
	// own namespace to verify the CA before they hold a certificate.
	f.roots, err = kube.NewRootsPublisher(kubeClient, f.ca, kube.RootsOptions{Logger: log})
	if err != nil {
		return nil, err
	}
	if err := f.setUpTrustMetrics(); err != nil {
		return nil, err
	}
	f.federation, err = federation.NewManager(kubeClient, dyn, f.store, f.trust, f.self, federation.Config{
		ClusterName: cfg.ClusterName, Namespace: cfg.Namespace, FederatorID: f.id,
		Gateways: cfg.GatewayAddresses, AdvertiseAddresses: cfg.AdvertiseAddresses,
		Heartbeat: cfg.Heartbeat, KeepFor: cfg.KeepFor, DrainFor: cfg.DrainFor,
		Limits:        federation.Limits{MaxServices: cfg.MaxImportedServices},
		EstablishRate: cfg.EstablishQPS, EstablishBurst: cfg.EstablishBurst,
		ImportProblems: f.importProblems,
		ImportsWriting: f.imports.Writing,
		Logger:         log,
	})
	if err != nil {
		return nil, err
	}
	if err := f.setUpFederationMetrics(); err != nil {
		return nil, err
	}
	f.xds, err = xds.NewServer(f.store, f.id.TrustDomain(), f.trust, xds.Options{
		// The gateways run beside the federator (deploy/multicluster).
		Gateway:   xds.GatewayOptions{FederationUpstream: cfg.FederationUpstream(), Namespace: cfg.Namespace},
		Sidecar:   xds.SidecarOptions{Region: cfg.Region},
		InCluster: f.inCluster,
		Policies:  f.policies,
		// Sidecars keep their last configuration, imports included,
		// rather than get one without imports while the peers resync.
		PeersSynced:      func() bool { return f.federation.Synced() },
		PeersSyncTimeout: cfg.PeerSyncTimeout,
		Logger:           log, Meter: f.meter(),
	})
	if err != nil {
		return nil, err
	}
	if len(cfg.GatewayAddresses) == 0 {
		log.Warn("no --gateway-address: peers cannot reach this cluster's exported services and will refuse them")
	}
	return f, nil
}

// importProblems names, for the peer's status, the imports the writer
// could not write.
func (f *Federator) importProblems(peer string) []string {
	var out []string
	for _, s := range f.imports.Skipped()[peer] {
		out = append(out, s.Namespace+"/"+s.Name+": "+s.Reason)
	}
	return out
}

// tokenReviewClient returns the client the certificate service reviews
// tokens with: the federator's credentials, with a client-side rate
// limiter of its own (qps, burst). Whoever reaches :15012 can make the
// federator review any token; with a limiter of their own, a flood of
// reviews waits for its own budget and never for the one the exporter, the
// import writer, the CA, the roots publisher and the federation share.
// (On the API server's side both are still the federator's user, in one
// API Priority and Fairness flow.)
func tokenReviewClient(base *rest.Config, qps float32, burst int) (kubernetes.Interface, error) {
	cfg := rest.CopyConfig(base)
	cfg.QPS, cfg.Burst = qps, burst
	cfg.RateLimiter = nil
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("token review client: %w", err)
	}
	return c, nil
}

// setUpIdentity loads the cluster CA, the local trust bundle, the
// federator's own SVID and the certificate service, which reviews tokens
// through reviewClient.
func (f *Federator) setUpIdentity(ctx context.Context, kubeClient, reviewClient kubernetes.Interface) error {
	td, err := spiffeid.TrustDomainFromString(f.cfg.TrustDomainName())
	if err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	f.ca, err = ca.New(ctx, kubeClient, ca.Options{
		TrustDomain:  td,
		Namespace:    f.cfg.Namespace,
		Authority:    ca.AuthorityOptions{DefaultTTL: f.cfg.CertTTL, MaxTTL: f.cfg.MaxCertTTL},
		PublishDelay: f.cfg.RootPublishDelay,
		Logger:       f.log,
	})
	if err != nil {
		return err
	}
	f.trust = trust.NewStore(td)
	f.syncLocalBundle()
	// Proxies in this namespace (the east-west gateway) mount the roots to
	// verify this CA before they hold any credential: written before Run,
	// so they are there as soon as the federator is; from then on the
	// roots publisher keeps them current here as in every namespace.
	if err := f.ca.PublishRoots(ctx); err != nil {
		return err
	}
	id, err := spiffeid.FromSegments(td, "ns", f.cfg.Namespace, "sa", f.cfg.ServiceAccount)
	if err != nil {
		return fmt.Errorf("federator identity: %w", err)
	}
	f.id = id
	f.self, err = ca.NewSelfSource(f.ca.Authority, id, nil)
	if err != nil {
		return err
	}
	// Every request that gets as far as its token costs a TokenReview
	// unless the cache has the answer: a workload renewing with the same
	// token, or a caller repeating a junk one, costs one per token and TTL.
	auth := caserver.NewCachingAuthenticator(caserver.TokenReviewAuthenticator{
		Client:    reviewClient,
		Audiences: []string{f.cfg.TokenAudience},
	}, caserver.CacheOptions{})
	f.caServer = caserver.New(f.ca, auth, caserver.Options{Logger: f.log, Meter: f.meter()})
	if err := federation.PublishClusterInfo(ctx, kubeClient, f.cfg.Namespace, federation.ClusterInfo{
		ClusterName: f.cfg.ClusterName, TrustDomain: td, FederatorID: id,
	}); err != nil {
		return err
	}
	f.log.Info("cluster identity ready", "trustDomain", td.Name(), "federatorID", id.String(),
		"pluggedCA", f.ca.Plugged(), "bundleSequence", f.ca.BundleSequence())
	return nil
}

func (f *Federator) syncLocalBundle() {
	f.trust.SetLocal(f.ca.Bundle().X509Authorities(), f.ca.BundleSequence(), trust.DefaultRefreshHint)
}

// runBundleSync copies every change of the CA's roots into the trust
// store. The roots ConfigMaps follow the same changes through the roots
// publisher, which retries its own failed writes.
func (f *Federator) runBundleSync(ctx context.Context) error {
	changed, cancel := f.ca.Subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			f.syncLocalBundle()
		}
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	var paths []string
	for _, p := range filepath.SplitList(kubeconfig) {
		if p != "" {
			paths = append(paths, p)
		}
	}
	switch len(paths) {
	case 0:
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig given and not running in a cluster: %w", err)
		}
		return cfg, nil
	case 1:
		cfg, err := clientcmd.BuildConfigFromFlags("", paths[0])
		if err != nil {
			return nil, fmt.Errorf("load kubeconfig %q: %w", paths[0], err)
		}
		return cfg, nil
	}
	// A list, as kubectl reads $KUBECONFIG: the files merged, the first
	// to set a value winning, a missing file skipped. With none of them
	// there, say so rather than fall back to the in-cluster
	// configuration as client-go's deferred loader would.
	merged, err := (&clientcmd.ClientConfigLoadingRules{Precedence: paths}).Load()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfigs %s: %w", strings.Join(paths, ", "), err)
	}
	if clientcmdapi.IsConfigEmpty(merged) {
		return nil, fmt.Errorf("load kubeconfigs %s: none of them exists or has anything in it", strings.Join(paths, ", "))
	}
	if err := clientcmd.ConfirmUsable(*merged, ""); err != nil {
		return nil, fmt.Errorf("load kubeconfigs %s: %w", strings.Join(paths, ", "), err)
	}
	cfg, err := clientcmd.NewDefaultClientConfig(*merged, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfigs %s: %w", strings.Join(paths, ", "), err)
	}
	return cfg, nil
}

// setUpMetrics exports OpenTelemetry instruments, plus Go runtime and
// process metrics, in Prometheus format.
func (f *Federator) setUpMetrics() error {
	f.registry = prometheus.NewRegistry()
	f.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exporter, err := otelprom.New(otelprom.WithRegisterer(f.registry), otelprom.WithoutScopeInfo())
	if err != nil {
		return fmt.Errorf("prometheus exporter: %w", err)
	}
	f.provider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	meter := f.meter()
	services, err := meter.Int64ObservableGauge("isthmus_catalog_services",
		metric.WithDescription("Services in the catalog, by source (local or the peer they came from)."))
	if err != nil {
		return err
	}
	endpoints, err := meter.Int64ObservableGauge("isthmus_catalog_ready_endpoints",
		metric.WithDescription("Ready endpoints over all services in the catalog, by source."))
	if err != nil {
		return err
	}
	_, err = meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for _, src := range f.sources() {
			snap := f.store.Get(src)
			ready := 0
			for svc := range snap.All() {
				ready += svc.ReadyEndpoints()
			}
			attrs := metric.WithAttributes(attribute.String("source", src))
			o.ObserveInt64(services, int64(snap.Len()), attrs)
			o.ObserveInt64(endpoints, int64(ready), attrs)
		}
		return nil
	}, services, endpoints)
	return err
}

func (f *Federator) meter() metric.Meter {
	return f.provider.Meter("github.com/isthmus-mesh/isthmus/pkg/federator")
}

// setUpTrustMetrics exports what an operator watches during a rotation and
// before a root expires.
func (f *Federator) setUpTrustMetrics() error {
	m := f.meter()
	roots, err := m.Int64ObservableGauge("isthmus_trust_bundle_roots",
		metric.WithDescription("Root certificates in each trust domain's bundle."))
	if err != nil {
		return err
	}
	seq, err := m.Int64ObservableGauge("isthmus_trust_bundle_sequence",
		metric.WithDescription("Sequence number of each trust domain's bundle."))
	if err != nil {
		return err
	}
	expiry, err := m.Float64ObservableGauge("isthmus_ca_signing_certificate_expiry_seconds",
		metric.WithDescription("Unix time at which the CA's signing certificate expires."), metric.WithUnit("s"))
	if err != nil {
		return err
	}
	conflicts, err := m.Int64ObservableGauge("isthmus_ca_root_configmap_conflicts",
		metric.WithDescription("Namespaces where a ConfigMap isthmus-ca-root-cert not managed by Isthmus keeps the CA's roots out (listed in /debug/trust)."))
	if err != nil {
		return err
	}
	_, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for _, td := range f.trust.TrustDomains() {
			b, err := f.trust.GetBundleForTrustDomain(td)
			if err != nil {
				continue
			}
			attrs := metric.WithAttributes(attribute.String("trust_domain", td.Name()))
			o.ObserveInt64(roots, int64(len(b.X509Authorities())), attrs)
			n, _ := b.SequenceNumber()
			o.ObserveInt64(seq, int64(n), attrs)
		}
		o.ObserveFloat64(expiry, float64(f.ca.SigningCertificate().NotAfter.Unix()))
		o.ObserveInt64(conflicts, int64(len(f.roots.Conflicts())))
		return nil
	}, roots, seq, expiry, conflicts)
	return err
}

// Run serves until ctx ends, then shuts everything down within the
// configured timeout. It returns nil on a clean shutdown.
func (f *Federator) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", f.cfg.MonitoringAddr)
	if err != nil {
		return fmt.Errorf("monitoring listener: %w", err)
	}
	srv := &http.Server{
		Handler:           f.monitoringHandler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
	}
	// One TLS port for the certificate service and xDS, as Istio's 15012:
	// workloads without a certificate yet authenticate to the CA with
	// their token, proxies to xDS with their SVID. The transport's message
	// bound is xDS's (xds.MaxRequestBytes), not caserver.ServerOptions'
	// smaller one: the certificate service applies its own bound to each
	// request once decoded, before it looks at the token.
	grpcServer := grpc.NewServer(f.xds.SecureServerOptions(f.self)...)
	f.caServer.Register(grpcServer)
	f.xds.Register(grpcServer)
	var bundleSrv *http.Server
	if f.cfg.BundleEndpointAddr != "" {
		if bundleSrv, err = trust.NewBundleEndpoint(f.cfg.BundleEndpointAddr, f.trust, f.self); err != nil {
			_ = ln.Close()
			return err
		}
	}
	caLn, err := net.Listen("tcp", f.cfg.CAAddr)
	if err != nil {
		_ = ln.Close()
		return fmt.Errorf("certificate service listener: %w", err)
	}
	var bundleLn net.Listener
	if bundleSrv != nil {
		if bundleLn, err = net.Listen("tcp", f.cfg.BundleEndpointAddr); err != nil {
			_ = ln.Close()
			_ = caLn.Close()
			return fmt.Errorf("bundle endpoint listener: %w", err)
		}
	}
	fedLn, err := net.Listen("tcp", f.cfg.FederationAddr)
	if err != nil {
		_ = ln.Close()
		_ = caLn.Close()
		if bundleLn != nil {
			_ = bundleLn.Close()
		}
		return fmt.Errorf("federation listener: %w", err)
	}
	var plainLn net.Listener
	if f.cfg.XDSPlaintextAddr != "" {
		if plainLn, err = net.Listen("tcp", f.cfg.XDSPlaintextAddr); err != nil {
			for _, l := range []net.Listener{ln, caLn, bundleLn, fedLn} {
				if l != nil {
					_ = l.Close()
				}
			}
			return fmt.Errorf("plaintext xDS listener: %w", err)
		}
		f.log.Warn("SERVING xDS IN PLAINTEXT, WITHOUT AUTHENTICATION: anyone who reaches this address reads every exported service's endpoints; --xds-plaintext-addr is for tests only",
			"xdsPlaintext", plainLn.Addr().String())
	}
	fedServer := grpc.NewServer(f.federation.ServerOptions()...)
	f.federation.Register(fedServer)
	f.log.Info("federator starting", "cluster", f.cfg.ClusterName, "monitoring", ln.Addr().String(),
		"caAndXDS", caLn.Addr().String(), "bundleEndpoint", f.cfg.BundleEndpointAddr, "federation", fedLn.Addr().String(),
		"gatewayFederationUpstream", f.cfg.FederationUpstream())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return f.exporter.Run(gctx) })
	g.Go(func() error { return f.ca.Run(gctx) })
	g.Go(func() error { return f.self.Run(gctx) })
	g.Go(func() error { return f.runBundleSync(gctx) })
	g.Go(func() error { return f.federation.Run(gctx) })
	g.Go(func() error { return f.imports.Run(gctx) })
	g.Go(func() error { return f.roots.Run(gctx) })
	g.Go(func() error { return f.xds.Run(gctx) })
	if plainLn != nil {
		plainServer := grpc.NewServer(f.xds.PlaintextServerOptions()...)
		f.xds.Register(plainServer)
		g.Go(func() error {
			if err := plainServer.Serve(plainLn); err != nil {
				return fmt.Errorf("plaintext xDS: %w", err)
			}
			return nil
		})
		g.Go(func() error {
			<-gctx.Done()
			stopGRPC(plainServer, f.cfg.ShutdownTimeout)
			return nil
		})
	}
	g.Go(func() error {
		if err := fedServer.Serve(fedLn); err != nil {
			return fmt.Errorf("federation service: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		stopGRPC(fedServer, f.cfg.ShutdownTimeout)
		return nil
	})
	g.Go(func() error {
		if err := grpcServer.Serve(caLn); err != nil {
			return fmt.Errorf("certificate service: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		stopGRPC(grpcServer, f.cfg.ShutdownTimeout)
		return nil
	})
	if bundleSrv != nil {
		f.serveHTTP(gctx, g, "bundle endpoint", bundleSrv, func() error { return bundleSrv.ServeTLS(bundleLn, "", "") })
	}
	f.serveHTTP(gctx, g, "monitoring server", srv, func() error { return srv.Serve(ln) })
	err = g.Wait()
	if perr := f.provider.Shutdown(context.WithoutCancel(ctx)); perr != nil && err == nil {
		err = perr
	}
	f.log.Info("federator stopped")
	return err
}

// serveHTTP runs serve in g and shuts srv down gracefully, bounded by the
// shutdown timeout, once ctx ends.
func (f *Federator) serveHTTP(ctx context.Context, g *errgroup.Group, name string, srv *http.Server, serve func() error) {
	g.Go(func() error {
		if err := serve(); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.cfg.ShutdownTimeout)
		defer cancel()
		return srv.Shutdown(sctx)
	})
}

// stopGRPC stops gracefully, and forcibly once the timeout passes.
func stopGRPC(s *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.Stop()
		<-done
	}
}

func (f *Federator) monitoringHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !f.exporter.Ready() {
			http.Error(w, "catalog not built yet: waiting for informer caches", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(f.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /debug/catalog", f.serveCatalog)
	mux.HandleFunc("GET /debug/trust", f.serveTrust)
	mux.HandleFunc("GET /debug/federation", f.serveFederation)
	mux.HandleFunc("GET /debug/xds", f.serveXDS)
	return mux
}

// sources lists the catalog's sources, the local one always first.
func (f *Federator) sources() []string {
	out := []string{catalog.LocalSource}
	for _, s := range f.store.Sources() {
		if s != catalog.LocalSource {
			out = append(out, s)
		}
	}
	return out
}

// CatalogDump is the JSON shape of /debug/catalog: one entry per source.
type CatalogDump struct {
	Cluster string              `json:"cluster"`
	Sources []CatalogSourceDump `json:"sources"`
	// InCluster are the in-cluster services: every meshed Service of the
	// cluster, which only the cluster's own sidecars are given.
	InCluster CatalogSourceDump `json:"inCluster"`
}

// CatalogSourceDump is one source's snapshot.
type CatalogSourceDump struct {
	Source   string            `json:"source"`
	Version  string            `json:"version"`
	Services []catalog.Service `json:"services"`
}

func (f *Federator) serveCatalog(w http.ResponseWriter, _ *http.Request) {
	dump := CatalogDump{Cluster: f.cfg.ClusterName}
	for _, src := range f.sources() {
		snap := f.store.Get(src)
		dump.Sources = append(dump.Sources, CatalogSourceDump{Source: src, Version: snap.Version(), Services: snap.Services()})
	}
	in := f.inCluster.Get(catalog.InClusterSource)
	dump.InCluster = CatalogSourceDump{Source: catalog.InClusterSource, Version: in.Version(), Services: in.Services()}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(dump)
}

// TrustDump is the JSON shape of /debug/trust.
type TrustDump struct {
	TrustDomain string            `json:"trustDomain"`
	PluggedCA   bool              `json:"pluggedCA"`
	Rotation    ca.RotationStatus `json:"rotation"`
	Bundles     []TrustBundleDump `json:"bundles"`
	// RootsConfigMapConflicts are the namespaces where someone else's
	// ConfigMap isthmus-ca-root-cert keeps the CA's roots out.
	RootsConfigMapConflicts []kube.RootsConflict `json:"rootsConfigMapConflicts,omitempty"`
}

// TrustBundleDump describes one trust domain's bundle.
type TrustBundleDump struct {
	TrustDomain string     `json:"trustDomain"`
	Sequence    uint64     `json:"sequence"`
	Roots       []RootDump `json:"roots"`
}

// RootDump describes one root certificate.
type RootDump struct {
	Subject  string    `json:"subject"`
	NotAfter time.Time `json:"notAfter"`
	SHA256   string    `json:"sha256"`
}

func (f *Federator) serveTrust(w http.ResponseWriter, r *http.Request) {
	dump := TrustDump{TrustDomain: f.trust.LocalTrustDomain().Name(), PluggedCA: f.ca.Plugged(), RootsConfigMapConflicts: f.roots.Conflicts()}
	rot, err := f.ca.RotationStatus(r.Context())
	if err != nil {
		http.Error(w, "read CA state: "+err.Error(), http.StatusInternalServerError)
		return
	}
	dump.Rotation = rot
	for _, td := range f.trust.TrustDomains() {
		b, err := f.trust.GetBundleForTrustDomain(td)
		if err != nil {
			continue
		}
		seq, _ := b.SequenceNumber()
		bd := TrustBundleDump{TrustDomain: td.Name(), Sequence: seq}
		for _, c := range b.X509Authorities() {
			sum := sha256.Sum256(c.Raw)
			bd.Roots = append(bd.Roots, RootDump{Subject: c.Subject.String(), NotAfter: c.NotAfter, SHA256: hex.EncodeToString(sum[:])})
		}
		dump.Bundles = append(dump.Bundles, bd)
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(dump)
}

// FederationDump is the JSON shape of /debug/federation.
type FederationDump struct {
	Cluster string                          `json:"cluster"`
	Peers   []federation.PeerStatus         `json:"peers"`
	Skipped map[string][]kube.SkippedImport `json:"skippedImports,omitempty"`
}

func (f *Federator) serveFederation(w http.ResponseWriter, _ *http.Request) {
	dump := FederationDump{Cluster: f.cfg.ClusterName, Peers: f.federation.Statuses(), Skipped: f.imports.Skipped()}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(dump)
}

// serveXDS shows the configuration served to proxies (version and
// resource names) and the proxies connected.
func (f *Federator) serveXDS(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(f.xds.Status())
}

// setUpFederationMetrics exports each peer's link state.
func (f *Federator) setUpFederationMetrics() error {
	m := f.meter()
	connected, err := m.Int64ObservableGauge("isthmus_federation_peer_connected",
		metric.WithDescription("1 while the exchange stream with the peer is up, else 0."))
	if err != nil {
		return err
	}
	stale, err := m.Float64ObservableGauge("isthmus_federation_peer_disconnected_seconds",
		metric.WithDescription("Seconds since the stream with the peer was lost (0 while connected)."), metric.WithUnit("s"))
	if err != nil {
		return err
	}
	services, err := m.Int64ObservableGauge("isthmus_federation_services",
		metric.WithDescription("Services imported from and exported to each peer, by direction."))
	if err != nil {
		return err
	}
	updates, err := m.Int64ObservableCounter("isthmus_federation_updates_total",
		metric.WithDescription("Updates exchanged with each peer, by direction."))
	if err != nil {
		return err
	}
	_, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		now := time.Now()
		for _, s := range f.federation.Statuses() {
			peer := attribute.String("peer", s.Name)
			up, lost := int64(0), 0.0
			if s.State == "Connected" {
				up = 1
			} else if !s.DisconnectedSince.IsZero() {
				lost = now.Sub(s.DisconnectedSince).Seconds()
			}
			o.ObserveInt64(connected, up, metric.WithAttributes(peer))
			o.ObserveFloat64(stale, lost, metric.WithAttributes(peer))
			o.ObserveInt64(services, int64(s.Imported), metric.WithAttributes(peer, attribute.String("direction", "imported")))
			o.ObserveInt64(services, int64(s.Exported), metric.WithAttributes(peer, attribute.String("direction", "exported")))
			o.ObserveInt64(updates, int64(s.UpdatesReceived), metric.WithAttributes(peer, attribute.String("direction", "received")))
			o.ObserveInt64(updates, int64(s.UpdatesSent), metric.WithAttributes(peer, attribute.String("direction", "sent")))
		}
		return nil
	}, connected, stale, services, updates)
	return err
}
