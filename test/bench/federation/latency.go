package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1alpha1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"

	"github.com/isthmus-mesh/isthmus/pkg/catalog"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/bulk"
	"github.com/isthmus-mesh/isthmus/test/bench/internal/table"
)

const latencyNS = "bench-latency"

// latencyResult holds step 1's samples.
type latencyResult struct {
	// Creating the ServiceExport → a's catalog, b's catalog, the
	// ServiceEntry in b; then the same for deleting it.
	createA, createB, createSE table.Samples
	deleteA, deleteB, deleteSE table.Samples
	// createCall is how long the Create call itself took (included above).
	createCall table.Samples
	// missedSE counts ServiceEntries the writer never created, or created
	// only after the export was deleted again.
	missedSE     int
	pollA, pollB *poller
	// template is an export whose status a's exporter wrote.
	template *mcsv1alpha1.ServiceExport
}

// both polls a's local catalog and b's import from a until ns/name is
// there (want) or gone, and returns when each showed it.
func both(ctx context.Context, bound time.Duration, pa, pb *poller, ns, name string, want bool) (ta, tb time.Time, err error) {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	verb := "holds"
	if !want {
		verb = "no longer holds"
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) {
		ta, err = pa.until(gctx, fmt.Sprintf("a's catalog %s %s/%s", verb, ns, name), inCatalog(catalog.LocalSource, ns, name, want))
		return err
	})
	g.Go(func() (err error) {
		tb, err = pb.until(gctx, fmt.Sprintf("b's catalog %s %s/%s from a", verb, ns, name), inCatalog("a", ns, name, want))
		return err
	})
	return ta, tb, g.Wait()
}

func measureLatency(ctx context.Context, cfg config, log *slog.Logger, a, b *member, rec *entryRecorder) (*latencyResult, error) {
	for _, m := range []*member{a, b} {
		if err := m.ensureNamespace(ctx, latencyNS); err != nil {
			return nil, err
		}
	}
	total := cfg.warmup + cfg.changes
	name := func(i int) string { return fmt.Sprintf("lat-%d", i) }
	if err := bulk.ForEach(ctx, total, cfg.workers, func(ctx context.Context, i int) error {
		return a.createService(ctx, latencyNS, name(i))
	}); err != nil {
		return nil, err
	}
	// The Services are in a's informer cache within milliseconds; the
	// exports, created from now on, are what is timed.
	if err := sleep(ctx, time.Second); err != nil {
		return nil, err
	}

	res := &latencyResult{
		pollA: newPoller(a.monitoring, "/debug/catalog", cfg.poll),
		pollB: newPoller(b.monitoring, "/debug/catalog", cfg.poll),
	}
	created := map[int]time.Time{}
	deleted := map[int]time.Time{}
	counted := func(i int) bool { return i >= cfg.warmup }
	var live []int

	// retire deletes the oldest live export and times its removal.
	retire := func() error {
		i := live[0]
		live = live[1:]
		t1 := time.Now()
		if err := a.deleteExport(ctx, latencyNS, name(i)); err != nil {
			return err
		}
		ta, tb, err := both(ctx, cfg.propagateBound, res.pollA, res.pollB, latencyNS, name(i), false)
		if err != nil {
			return err
		}
		if counted(i) {
			res.deleteA = append(res.deleteA, ta.Sub(t1))
			res.deleteB = append(res.deleteB, tb.Sub(t1))
			deleted[i] = t1
		}
		return nil
	}

	for i := range total {
		tick := time.Now()
		t0 := time.Now()
		if _, err := a.createExport(ctx, latencyNS, name(i)); err != nil {
			return nil, err
		}
		call := time.Since(t0)
		ta, tb, err := both(ctx, cfg.propagateBound, res.pollA, res.pollB, latencyNS, name(i), true)
		if err != nil {
			return nil, err
		}
		if tb.Sub(t0) > 150*time.Millisecond {
			log.Info("slow change", "change", i, "createCall", call.Round(time.Microsecond), "toA", ta.Sub(t0).Round(time.Microsecond), "toB", tb.Sub(t0).Round(time.Microsecond))
		}
		if counted(i) {
			res.createA = append(res.createA, ta.Sub(t0))
			res.createB = append(res.createB, tb.Sub(t0))
			res.createCall = append(res.createCall, call)
			created[i] = t0
		}
		live = append(live, i)
		if len(live) > cfg.window {
			if err := retire(); err != nil {
				return nil, err
			}
		}
		if (i+1)%50 == 0 {
			log.Info("progress", "changes", i+1, "of", total, "lastToB", tb.Sub(t0).Round(time.Microsecond))
		}
		if i == total-1 {
			// The oldest live export has had its status written by now.
			se, err := a.mcs.MulticlusterV1alpha1().ServiceExports(latencyNS).Get(ctx, name(live[0]), metav1.GetOptions{})
			if err != nil {
				return nil, fmt.Errorf("read a status template: %w", err)
			}
			res.template = se
		}
		if err := sleep(ctx, time.Until(tick.Add(cfg.interval))); err != nil {
			return nil, err
		}
	}
	for len(live) > 0 {
		tick := time.Now()
		if err := retire(); err != nil {
			return nil, err
		}
		if err := sleep(ctx, time.Until(tick.Add(cfg.interval))); err != nil {
			return nil, err
		}
	}

	// The ServiceEntries: each created after its export and deleted after
	// the export's deletion. The last deletions need a flush or two more.
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for i := cfg.warmup; i < total; i++ {
		key := latencyNS + "/" + name(i) + ".clusterset.local"
		added, ok := rec.at(key, false)
		if !ok || !added.Before(deleted[i]) {
			// Never written while the export existed: the writer's flush
			// saw the export come and go.
			res.missedSE++
			continue
		}
		res.createSE = append(res.createSE, added.Sub(created[i]))
		gone, err := rec.wait(wctx, key, true)
		if err != nil {
			return nil, err
		}
		res.deleteSE = append(res.deleteSE, gone.Sub(deleted[i]))
	}
	if len(res.createSE) == 0 {
		return nil, fmt.Errorf("b's import writer wrote none of the %d ServiceEntries", cfg.changes)
	}
	return res, nil
}

func (r *latencyResult) report(rep *table.Report, cfg config) {
	const peer = "a's own /debug/catalog (a's exporter, fed by a's informers)"
	var created []table.Row
	created = append(created, table.LatencyRows("→ b's catalog", r.createB, r.createA, 0.200, "")...)
	created = append(created, table.LatencyRows("→ b's catalog, from the Create call's return", r.createB.Minus(r.createCall), r.createA.Minus(r.createCall), 0.200, "")...)
	created = append(created, table.LatencyRows("federation hop: b's catalog − a's catalog, same change", r.createB.Minus(r.createA), nil, table.None, "")...)
	created = append(created, table.LatencyRows("→ ServiceEntry in b's API server", r.createSE, r.createA, table.None, "writer flushes every 1 s")...)
	rep.Add(table.Section{Title: "ServiceExport created in a", Peer: peer, Rows: created})
	var deleted []table.Row
	deleted = append(deleted, table.LatencyRows("→ gone from b's catalog", r.deleteB, r.deleteA, table.None, "")...)
	deleted = append(deleted, table.LatencyRows("federation hop: b's catalog − a's catalog, same change", r.deleteB.Minus(r.deleteA), nil, table.None, "")...)
	deleted = append(deleted, table.LatencyRows("→ ServiceEntry deleted in b's API server", r.deleteSE, r.deleteA, table.None, "writer flushes every 1 s")...)
	rep.Add(table.Section{Title: "ServiceExport deleted in a", Peer: peer, Rows: deleted})
	rep.Note("Propagation: %d changes after %d not counted, one every %s, the next only once the previous reached both catalogs; each export deleted %d changes after it was created. "+
		"Catalogs polled every %s; a request took %s on a and %s on b on average, so a catalog time is late by at most about %s. "+
		"Times start just before the Create (or Delete) call; the Create call took %s at p50, %s at p99, %s at most. "+
		"ServiceEntry times are when a watch on b's API server delivered the event.",
		cfg.changes, cfg.warmup, cfg.interval, cfg.window, cfg.poll,
		r.pollA.meanRequest().Round(time.Microsecond), r.pollB.meanRequest().Round(time.Microsecond),
		(cfg.poll + max(r.pollA.meanRequest(), r.pollB.meanRequest())).Round(100*time.Microsecond),
		r.createCall.Pct(50).Round(100*time.Microsecond), r.createCall.Pct(99).Round(100*time.Microsecond), r.createCall.Max().Round(100*time.Microsecond))
	if r.missedSE > 0 {
		rep.Note("%d of %d ServiceEntries were never seen while their export existed (not counted above).", r.missedSE, cfg.changes)
	}
}

// sleep waits d (nothing if d <= 0) or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
