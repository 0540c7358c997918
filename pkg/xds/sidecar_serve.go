package xds

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
)

// sidecarGroup is the snapshot cache's node group of every sidecar.
const sidecarGroup = "sidecar"

// sidecarState is what the Server serves to sidecars and what it last
// translated for them.
type sidecarState struct {
	// translator keeps what the last translation made of each clusterset
	// service, so that a change costs what it changes; made by the first
	// update. Only Run's goroutine uses it, without mu.
	translator *SidecarTranslator

	// mu guards every field below.
	mu    sync.Mutex
	res   Resources
	setAt time.Time
	// skipped is what the last good translation left out.
	skipped []Skipped
	// local and imports are the catalog versions last translated: the
	// local one, and each peer's.
	local   string
	imports map[string]string
	err     string
}

// updateSidecar translates the local catalog and every peer's imports
// for the sidecars, gives them the Secrets of the same update (when those
// translated, else the last good ones), and sets the sidecars' snapshot
// when either part is new. A failed translation keeps the last good
// configuration.
func (s *Server) updateSidecar(ctx context.Context, local *catalog.Snapshot, secrets []*tlsv3.Secret, secretsVersion string, secretsOK bool) {
	var peers []*catalog.Snapshot
	imports := map[string]string{}
	for _, src := range s.store.Sources() {
		if src == catalog.LocalSource {
			continue
		}
		// A source forgotten since Sources() reads as empty; its removal
		// has signalled a change, which translates again.
		p := s.store.Get(src)
		peers = append(peers, p)
		imports[src] = p.Version()
	}
	st := &s.sidecar
	st.mu.Lock()
	prev, skipped := st.res, st.skipped
	st.mu.Unlock()

	next := prev
	res, newSkipped, err := s.translateSidecar(local, peers)
	if err == nil {
		next, skipped = res, newSkipped
	}
	next.Secrets, next.SecretsVersion = prev.Secrets, prev.SecretsVersion
	if secretsOK {
		next.Secrets, next.SecretsVersion = secrets, secretsVersion
	}
	changed := next.Version != "" && (next.Version != prev.Version || next.SecretsVersion != prev.SecretsVersion)
	var setErr error
	if changed {
		setErr = s.setSidecar(ctx, next)
		if setErr == nil {
			// Counted before Status shows it: who sees the version there
			// sees it counted.
			s.metrics.updates.Add(ctx, 1, metric.WithAttributes(attribute.String("role", sidecarGroup)))
		}
	}
	err = errors.Join(err, setErr)

	// What Status says changes at once: a configuration is never shown
	// with the imports of the one before.
	st.mu.Lock()
	if changed && setErr == nil {
		st.res, st.setAt = next, time.Now()
	}
	if setErr == nil {
		st.skipped = skipped
	}
	st.local, st.imports = local.Version(), imports
	st.err = ""
	if err != nil {
		st.err = err.Error()
	}
	st.mu.Unlock()
	if changed && setErr == nil {
		s.log.Info("sidecar configuration updated", "version", next.Version, "secretsVersion", next.SecretsVersion,
			"clusters", len(next.Clusters), "routes", len(next.Routes), "skipped", len(skipped))
		for _, sk := range skipped {
			s.log.Debug("left out of the sidecar configuration", "service", sk.Service, "cluster", sk.Cluster, "reason", sk.Reason)
		}
	}
	switch {
	case err != nil:
		s.metrics.failures.Add(ctx, 1)
		s.log.Error("sidecar configuration not updated; sidecars keep the last good one", "catalog", local.Version(), "imports", len(peers), "error", err)
	case !changed:
		s.log.Debug("catalog or trust changed, sidecar configuration did not", "catalog", local.Version(), "imports", len(peers),
			"version", next.Version, "secretsVersion", next.SecretsVersion)
	}
}

// translateSidecar is TranslateSidecar for the local catalog, peers and
// the in-cluster services (when the Server has them), by the Server's
// SidecarTranslator.
func (s *Server) translateSidecar(local *catalog.Snapshot, peers []*catalog.Snapshot) (Resources, []Skipped, error) {
	st := &s.sidecar
	if st.translator == nil {
		t, err := NewSidecarTranslator(s.opts.Sidecar)
		if err != nil {
			return Resources{}, nil, err
		}
		st.translator = t
	}
	in := SidecarInput{Local: local, Peers: peers}
	if s.opts.Policies != nil {
		in.Policies = s.opts.Policies.Snapshot()
	}
	if s.opts.InCluster != nil {
		in.InCluster = s.opts.InCluster.Get(catalog.InClusterSource)
		// The exporter publishes the declared ports with the in-cluster
		// services; a store without them (tests) leaves the profiles to
		// the local and in-cluster catalogs.
		if slices.Contains(s.opts.InCluster.Sources(), catalog.DeclaredSource) {
			in.Declared = s.opts.InCluster.Get(catalog.DeclaredSource)
		}
	}
	return st.translator.Translate(in)
}

// setSidecar checks res's snapshot for consistency and serves it to every
// sidecar.
func (s *Server) setSidecar(ctx context.Context, res Resources) error {
	snap, err := res.served()
	if err != nil {
		return err
	}
	if err := s.cache.SetSnapshot(ctx, sidecarGroup, snap); err != nil {
		return fmt.Errorf("set sidecar snapshot %s: %w", res.Version, err)
	}
	return nil
}

// sidecarStatus is the sidecars' part of Status.
func (s *Server) sidecarStatus() SnapshotStatus {
	st := &s.sidecar
	st.mu.Lock()
	defer st.mu.Unlock()
	out := SnapshotStatus{
		Version: st.res.Version, SecretsVersion: st.res.SecretsVersion, SetAt: st.setAt,
		CatalogVersion: st.local, Imports: maps.Clone(st.imports), Skipped: slices.Clone(st.skipped), Error: st.err,
	}
	if st.res.Version != "" {
		out.Versions = st.res.TypeVersions()
		out.Resources = st.res.Names()
		out.Profiles = st.res.Inbound.Status()
	}
	return out
}

// SidecarResources returns the sidecar configuration being served (zero
// before the first).
func (s *Server) SidecarResources() Resources {
	s.sidecar.mu.Lock()
	defer s.sidecar.mu.Unlock()
	return s.sidecar.res
}
