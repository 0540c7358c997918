package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/xds"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/bulk"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
)

// backgroundResult is how the background got in: n exports created at
// once, timed from the first Create.
type backgroundResult struct {
	n, workers int
	// created: until the API server had accepted every Create.
	created time.Duration
	// acked: until the gateway had accepted (ACKed) an xDS snapshot
	// holding all n.
	acked time.Duration
	// statuses: until the exporter had written every export's status.
	statuses time.Duration
}

// exportBackground exports cfg.background services at once and returns
// when the gateway routes them all and the exporter has written every
// status, so that the measure beside them starts from a quiet federator.
func (b *bench) exportBackground(ctx context.Context, cfg config, log *slog.Logger) (*backgroundResult, error) {
	n := cfg.background
	if err := b.createServices(ctx, backgroundNS, backgroundName, n, cfg.workers); err != nil {
		return nil, err
	}
	time.Sleep(time.Second)
	res := &backgroundResult{n: n, workers: cfg.workers}
	t0 := time.Now()
	if err := bulk.ForEach(ctx, n, cfg.workers, func(ctx context.Context, i int) error {
		return bulk.Retry(ctx, func() error {
			err := b.createExport(ctx, backgroundNS, backgroundName(i))
			if apierrors.IsAlreadyExists(err) {
				return nil
			}
			return err
		})
	}); err != nil {
		return nil, err
	}
	res.created = time.Since(t0)

	// Bounded generously, but bounded: the statuses are written at the
	// federator's 50 requests/s, 20 ms each.
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute+time.Duration(n)*40*time.Millisecond)
	defer cancel()
	suffix := "." + backgroundNS + ".svc.cluster.local"
	var last string
	for res.acked == 0 {
		st, err := b.f.XDS(wctx)
		if err != nil {
			return nil, fmt.Errorf("read /debug/xds: %w", err)
		}
		have := 0
		for _, c := range st.Gateway.Resources[resource.ClusterType] {
			if strings.HasSuffix(c, suffix) {
				have++
			}
		}
		acked := len(st.Proxies) > 0
		for _, p := range st.Proxies {
			for _, t := range []string{resource.ListenerType, resource.ClusterType, resource.EndpointType} {
				acked = acked && p.Acked[t] == st.Gateway.Versions[t]
			}
		}
		if have == n && acked {
			res.acked = time.Since(t0)
			break
		}
		last = fmt.Sprintf("%d of %d in the snapshot %s, acked by the gateway: %t", have, n, st.Gateway.Version, acked)
		select {
		case <-wctx.Done():
			return nil, fmt.Errorf("the gateway never acked a snapshot with all %d background services (last: %s)", n, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
	log.Info("background in the gateway's configuration", "services", n, "created", res.created.Round(time.Millisecond), "acked", res.acked.Round(time.Millisecond))
	// Proof, untimed: every one of them is routable.
	for i := range n {
		sni := xds.ServiceSNI(backgroundNS, backgroundName(i), servicePort)
		if _, _, err := b.probe.until(wctx, sni, routed, cfg.bound); err != nil {
			return nil, fmt.Errorf("background service %d: %w", i, err)
		}
	}

	for {
		list, err := b.mcs.MulticlusterV1alpha1().ServiceExports(backgroundNS).List(wctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("list the background exports: %w", err)
		}
		done := 0
		for _, se := range list.Items {
			if meta.IsStatusConditionTrue(se.Status.Conditions, string(mcsv1alpha1.ServiceExportConditionReady)) {
				done++
			}
		}
		if done == n {
			res.statuses = time.Since(t0)
			break
		}
		select {
		case <-wctx.Done():
			return nil, fmt.Errorf("the exporter wrote %d of %d background statuses", done, n)
		case <-time.After(250 * time.Millisecond):
		}
	}
	log.Info("background statuses written", "services", n, "after", res.statuses.Round(time.Millisecond))
	return res, nil
}

func (r *backgroundResult) report(rep *table.Report) {
	rep.Add(table.Section{
		Title: fmt.Sprintf("The %d background exports, created at once", r.n),
		Peer:  "the API server: until it had accepted every Create",
		Rows: []table.Row{
			{Measure: fmt.Sprintf("first Create → the gateway ACKs an xDS snapshot holding all %d", r.n), Unit: table.Seconds,
				Ours: r.acked.Seconds(), Peer: r.created.Seconds(), Target: table.None},
			{Measure: "first Create → the exporter has written every status", Unit: table.Seconds,
				Ours: r.statuses.Seconds(), Peer: r.created.Seconds(), Target: table.None},
		},
	})
	rep.Note("Background: %d Services with their EndpointSlices created first, then their %d ServiceExports by %d goroutines; /debug/xds polled every 50 ms; every background service was then checked routable through the gateway before the measure began.",
		r.n, r.n, r.workers)
}
