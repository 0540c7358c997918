package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/bulk"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
)

const burstNS = "bench-burst"

// burstResult is step 2: how fast a's exporter takes in many new exports
// at once, beside how fast the API server accepted them.
type burstResult struct {
	n                   int
	created, toA, toB   time.Duration
	statusWritten       int
	statusWrittenWithin time.Duration
}

func measureBurst(ctx context.Context, cfg config, log *slog.Logger, a, b *member) (*burstResult, error) {
	for _, m := range []*member{a, b} {
		if err := m.ensureNamespace(ctx, burstNS); err != nil {
			return nil, err
		}
	}
	name := func(i int) string { return fmt.Sprintf("burst-%d", i) }
	n := cfg.burst
	if err := bulk.ForEach(ctx, n, cfg.workers, func(ctx context.Context, i int) error {
		return a.createService(ctx, burstNS, name(i))
	}); err != nil {
		return nil, err
	}
	if err := sleep(ctx, time.Second); err != nil {
		return nil, err
	}
	pa := newPoller(a.monitoring, "/debug/catalog", cfg.countPoll)
	pb := newPoller(b.monitoring, "/debug/catalog", cfg.countPoll)
	count := func(source string) func([]byte) (bool, error) {
		return func(body []byte) (bool, error) {
			c, _, err := catalogCount(body, source, burstNS, "")
			return c >= n, err
		}
	}

	res := &burstResult{n: n}
	t0 := time.Now()
	if err := bulk.ForEach(ctx, n, cfg.workers, func(ctx context.Context, i int) error {
		_, err := a.ensureExport(ctx, burstNS, name(i))
		return err
	}); err != nil {
		return nil, err
	}
	res.created = time.Since(t0)
	// 200 exports at a few per second: bound generously, but bound.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	g, gctx := errgroup.WithContext(wctx)
	g.Go(func() error {
		t, err := pa.until(gctx, fmt.Sprintf("a's catalog holds the %d exports", n), count(catalog.LocalSource))
		res.toA = t.Sub(t0)
		return err
	})
	g.Go(func() error {
		t, err := pb.until(gctx, fmt.Sprintf("b's catalog holds the %d exports from a", n), count("a"))
		res.toB = t.Sub(t0)
		return err
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	log.Info("burst in both catalogs", "created", res.created.Round(time.Millisecond), "toA", res.toA.Round(time.Millisecond), "toB", res.toB.Round(time.Millisecond))

	// How many statuses the exporter wrote by then: it writes one per
	// export, after putting the export in the catalog.
	list, err := a.mcs.MulticlusterV1alpha1().ServiceExports(burstNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	res.statusWrittenWithin = time.Since(t0)
	for _, se := range list.Items {
		if len(se.Status.Conditions) > 0 {
			res.statusWritten++
		}
	}
	if err := bulk.ForEach(ctx, n, cfg.workers, func(ctx context.Context, i int) error {
		return a.deleteExport(ctx, burstNS, name(i))
	}); err != nil {
		return nil, err
	}
	return res, nil
}

func (r *burstResult) report(rep *table.Report, cfg config) {
	n := float64(r.n)
	rep.Add(table.Section{
		Title: fmt.Sprintf("%d ServiceExports created at once in a", r.n),
		Peer:  "a's API server: the rate at which it accepted the creates",
		Rows: []table.Row{
			{Measure: "exports/s into a's catalog", Unit: table.Rate, Ours: n / r.toA.Seconds(), Peer: n / r.created.Seconds(), Target: table.None},
			{Measure: "exports/s into b's catalog", Unit: table.Rate, Ours: n / r.toB.Seconds(), Peer: n / r.created.Seconds(), Target: table.None},
			{Measure: fmt.Sprintf("time until b's catalog holds all %d", r.n), Unit: table.Seconds, Ours: r.toB.Seconds(), Peer: r.created.Seconds(), Target: table.None},
		},
	})
	rep.Note("Exporter throughput: a's exporter had written the status of %d of the %d exports %s after they were created.",
		r.statusWritten, r.n, r.statusWrittenWithin.Round(100*time.Millisecond))
}
