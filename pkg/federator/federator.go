// Package federator is the composition root of the federator binary: it
// builds the Kubernetes clients, the local catalog, the exporter that fills
// it, and the monitoring server, and runs them until the context ends.
//
// Nothing imports this package but cmd/federator.
package federator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/pkg/kube"
)

// Federator is one cluster's control plane.
type Federator struct {
	cfg      Config
	log      *slog.Logger
	store    *catalog.Store
	exporter *kube.Exporter
	registry *prometheus.Registry
	provider *sdkmetric.MeterProvider
}

// New connects to the cluster and wires the components; nothing runs until
// Run.
func New(cfg Config, log *slog.Logger) (*Federator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	restCfg, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return nil, err
	}
	restCfg.UserAgent = "isthmus-federator/" + cfg.ClusterName
	kubeClient, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	mcs, err := mcsclient.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("multicluster client: %w", err)
	}
	f := &Federator{cfg: cfg, log: log, store: catalog.NewStore()}
	f.exporter, err = kube.NewExporter(kubeClient, mcs, f.store, kube.Options{ClusterName: cfg.ClusterName, Logger: log})
	if err != nil {
		return nil, err
	}
	if err := f.setUpMetrics(); err != nil {
		return nil, err
	}
	return f, nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig given and not running in a cluster: %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %q: %w", kubeconfig, err)
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
	meter := f.provider.Meter("github.com/isthmus-mesh/isthmus/pkg/federator")
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
	f.log.Info("federator starting", "cluster", f.cfg.ClusterName, "monitoring", ln.Addr().String())

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return f.exporter.Run(gctx) })
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("monitoring server: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.cfg.ShutdownTimeout)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	err = g.Wait()
	if perr := f.provider.Shutdown(context.WithoutCancel(ctx)); perr != nil && err == nil {
		err = perr
	}
	f.log.Info("federator stopped")
	return err
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
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(dump)
}
